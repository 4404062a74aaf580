"""A benchmark's section of BENCHMARKS.md, replaced between its own markers."""

from __future__ import annotations

from pathlib import Path

HEADER = "# Benchmarks\n\nEvery figure here was printed by the command shown with it.\n"


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    """Put `section` (which starts with `begin` and ends with `end`) in place of the
    old one, or at the end of the file when there is none."""
    text = path.read_text() if path.exists() else HEADER
    if begin in text:
        before, rest = text.split(begin, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
