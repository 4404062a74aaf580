"""Corpus encoding at scale: every input row is encoded or quarantined, exactly once,
also when the driver or an encoder actor is killed mid-run."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clara_ray import encode
from clara_ray.encode import EncodeSettings, checkpoint_dir, encode_corpus
from clara_ray.errors import UserError
from clara_ray.modeling.checkpoint import save_model
from tests.tiny_model import make_model

pytestmark = pytest.mark.ray

SETTINGS = EncodeSettings(doc_max_len=64, batch_size=32, min_actors=1, max_actors=2, rows_per_shard=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tokenizer = make_model(num_memory_tokens=2)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("model"), backbone_ref="tiny", save_backbone=True)


def _good_line(doc_id: str, words: int = 8) -> bytes:
    text = " ".join(f"w{(zlib.crc32(doc_id.encode()) + i) % 97}" for i in range(words))
    return json.dumps({"id": doc_id, "text": text, "title": f"title {doc_id}"}).encode()


def _mixed_corpus(directory: Path, num_rows: int, seed: int = 0):
    """Two JSONL files of good rows and every kind of bad row; returns (paths, good ids,
    expected quarantine counts by kind, number of over-long good rows)."""
    rng = random.Random(seed)
    expected, good_ids, num_long = Counter(), [], 0
    bad_rows = [
        ("malformed JSON", lambda i: b'{"id": "b%d", "text": ' % i),
        ("not a JSON object", lambda i: b'["b%d", "text"]' % i),
        ("missing field", lambda i: json.dumps({"text": f"no id {i}"}).encode()),
        ("missing field", lambda i: json.dumps({"id": f"no-text-{i}"}).encode()),
        ("empty field", lambda i: json.dumps({"id": f"blank-{i}", "text": "   "}).encode()),
        ("wrong type", lambda i: json.dumps({"id": f"num-{i}", "text": 42}).encode()),
        ("invalid UTF-8", lambda i: b'{"id": "u%d", "text": "caf\xe9 \xff"}' % i),
    ]
    paths = []
    for part in range(2):
        lines = []
        for i in range(num_rows // 2):
            row = part * num_rows + i
            roll = rng.random()
            if roll < 0.25:
                kind, make = rng.choice(bad_rows)
                lines.append(make(row))
                expected[kind] += 1
            elif roll < 0.30 and good_ids:
                # A repeat of an id seen earlier (in this file or the first one).
                lines.append(_good_line(rng.choice(good_ids)))
                expected["duplicate id"] += 1
            else:
                doc_id = f"d{row}"
                long = roll > 0.97
                lines.append(_good_line(doc_id, words=60 if long else 8))
                good_ids.append(doc_id)
                num_long += long
            if rng.random() < 0.02:
                lines.append(b"")  # blank lines are not rows
        path = directory / f"part-{part}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        paths.append(str(path))
    return paths, good_ids, expected, num_long


def _encoded_ids(output_dir: Path) -> list[str]:
    return [i for path in sorted(output_dir.glob("*.parquet")) for i in pq.read_table(path, columns=["doc_id"]).column(0).to_pylist()]


def test_thousands_of_mixed_bad_rows_are_all_accounted_for(local_ray, model_dir, tmp_path):
    paths, good_ids, expected, num_long = _mixed_corpus(tmp_path, 4000)
    summary = encode_corpus(paths, model_dir, tmp_path / "out", SETTINGS)

    assert summary.num_input_rows == 4000 == summary.num_encoded + summary.num_quarantined
    assert summary.quarantined_by_kind == dict(expected)
    assert sum(expected.values()) > 1000
    assert sorted(_encoded_ids(tmp_path / "out")) == sorted(good_ids)  # each exactly once
    assert summary.num_truncated == num_long > 0
    quarantined = [json.loads(line) for path in (tmp_path / "out" / "quarantine").glob("*.json")
                   for line in path.read_text().splitlines()]
    assert len(quarantined) == summary.num_quarantined
    assert all(row["reason"] and row["source"] and row["row_number"] >= 1 for row in quarantined)
    assert not checkpoint_dir(tmp_path / "out").exists()  # removed once the write finished
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sum(shard["rows"] for shard in manifest["shards"]) == len(good_ids)

    with pytest.raises(FileExistsError, match="finished encoding"):
        encode_corpus(paths, model_dir, tmp_path / "out", SETTINGS)


def test_encoders_the_cluster_cannot_place_are_a_clear_error_when_asked_to_wait(local_ray, model_dir, tmp_path):
    paths, _, _, _ = _mixed_corpus(tmp_path, 40)
    settings = dataclasses.replace(SETTINGS, wait_for_min_actors_s=3, resources_per_actor={"no_such_node": 1})
    with pytest.raises(UserError, match=r"1 encoder actor\(s\) did not start within encode.wait_for_min_actors_s=3 s"):
        encode_corpus(paths, model_dir, tmp_path / "out", settings)
    assert not list((tmp_path / "out").glob("*.parquet"))


_DRIVER = """
import sys, ray
from clara_ray.encode import EncodeSettings, encode_corpus
ray.init(address=sys.argv[1])
encode_corpus(sys.argv[2:4], sys.argv[4], sys.argv[5],
              EncodeSettings(doc_max_len=64, batch_size=32, min_actors=1, max_actors=1, rows_per_shard=64))
"""


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_killed_driver_then_rerun_encodes_every_id_exactly_once(local_ray, model_dir, tmp_path):
    paths, good_ids, _, _ = _mixed_corpus(tmp_path, 12000, seed=1)
    output = tmp_path / "out"
    address = local_ray.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, address, *paths, str(model_dir), str(output)],
        cwd=Path(__file__).parents[2], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: len(list(output.glob("*.parquet"))) >= 3, 120, "the first shards")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert not (output / "manifest.json").exists()
    assert checkpoint_dir(output).exists()

    summary = encode_corpus(paths, model_dir, output, SETTINGS)
    assert 0 < summary.num_encoded_this_run < len(good_ids)  # resumed, not redone
    assert sorted(_encoded_ids(output)) == sorted(good_ids)
    assert summary.num_input_rows == summary.num_encoded + summary.num_quarantined


class _Interrupted(Exception):
    pass


def _interrupt(*args, **kwargs):
    raise _Interrupted


def _rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def test_rerun_after_an_interrupted_write_never_counts_a_half_written_shard(local_ray, model_dir, tmp_path, monkeypatch):
    """No kill, so nothing depends on timing: a run stopped after its write and
    before its manifest, then edited into every state a kill can leave."""
    paths, good_ids, _, _ = _mixed_corpus(tmp_path, 1200, seed=3)
    output, records = tmp_path / "out", checkpoint_dir(tmp_path / "out")
    with monkeypatch.context() as patch:
        patch.setattr(encode, "_finished_shards", _interrupt)
        with pytest.raises(_Interrupted):
            encode_corpus(paths, model_dir, output, SETTINGS)
    shards = sorted(output.glob("*.parquet"))
    commits = sorted(records.glob("*.parquet"))
    assert len(shards) == len(commits) >= 6 and not (output / "manifest.json").exists()

    def commit_of(shard: Path) -> Path:
        [commit] = [c for c in commits if shard.name.startswith(c.name.removesuffix(".parquet"))]
        return commit

    # Every other task never ran: no shard, no commit record.
    never_written = shards[1::2]
    for shard in never_written:
        commit_of(shard).unlink()
        shard.unlink()
    # One committed shard lost its tail after the commit: its rows must be encoded again.
    lost = shards[0]
    lost_rows = _rows(lost)
    lost.write_bytes(lost.read_bytes()[: lost.stat().st_size // 2])
    # Killed mid-write: a truncated shard and an empty one, each under a pending record.
    whole = shards[2]
    (output / "zz_000998.parquet").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (output / "zz_000999.parquet").write_bytes(b"")
    for name in ("zz_000998", "zz_000999"):
        (records / f"{name}.pending.parquet").write_bytes(commit_of(whole).read_bytes())
    kept_before = {shard.name for shard in shards[2::2]}

    summary = encode_corpus(paths, model_dir, output, SETTINGS)
    assert sorted(_encoded_ids(output)) == sorted(good_ids)  # each exactly once
    manifest = json.loads((output / "manifest.json").read_text())
    listed = {shard["file"] for shard in manifest["shards"]}
    assert listed == {path.name for path in output.glob("*.parquet")}
    assert not listed & {"zz_000998.parquet", "zz_000999.parquet", lost.name}
    assert kept_before <= listed
    assert summary.num_encoded_this_run == len(good_ids) - sum(_rows(output / name) for name in kept_before)
    assert summary.num_encoded_this_run > lost_rows
    assert summary.num_input_rows == summary.num_encoded + summary.num_quarantined
    assert not records.exists()


def _encoder_actor_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"CompressorActor" in command:
                pids.append(int(entry.name))
    return pids


def test_killed_encoder_actor_is_replaced_and_nothing_is_lost_or_doubled(local_ray, model_dir, tmp_path):
    paths, good_ids, _, _ = _mixed_corpus(tmp_path, 12000, seed=2)
    output = tmp_path / "out"
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(summary=encode_corpus(paths, model_dir, output, SETTINGS)))
    worker.start()
    _wait_for(lambda: len(list(output.glob("*.parquet"))) >= 2 and _encoder_actor_pids(), 120, "an encoder at work")
    os.kill(_encoder_actor_pids()[0], signal.SIGKILL)
    assert not (output / "manifest.json").exists(), "killed too late: the encode had finished"
    worker.join(timeout=300)
    assert "summary" in result, "the encode did not finish after its actor was killed"
    assert sorted(_encoded_ids(output)) == sorted(good_ids)
    assert result["summary"].num_encoded == len(good_ids)


@pytest.mark.parametrize("driver_max_rows", [10, 0], ids=["counted in the driver", "Ray Data groupby"])
def test_an_id_written_to_two_shards_fails_the_exactly_once_check(local_ray, tmp_path, driver_max_rows):
    """The manifest's last check, both ways it counts: ids unique across shards pass;
    one id in two shards is named in the error."""
    import numpy as np

    from clara_ray.memory_shards import memory_table

    def shard(name, ids):
        path = tmp_path / name
        pq.write_table(memory_table(ids, np.ones((len(ids), 2, 4), np.float32), [3] * len(ids), [False] * len(ids)),
                       path)
        return path

    unique = [shard("a.parquet", ["d1", "d2"]), shard("b.parquet", ["d3"])]
    encode._check_exactly_once(tmp_path, unique, {"num_encoded": 3}, 3, None, driver_max_rows)
    doubled = [*unique, shard("c.parquet", ["d2"])]
    with pytest.raises(RuntimeError, match="encoded more than once.*d2"):
        encode._check_exactly_once(tmp_path, doubled, {"num_encoded": 4}, 4, None, driver_max_rows)
