"""A run step by step as jobs, then `ray job submit` against a head started with
`ray start --head`, token authentication on.

The head and the submissions are the README's commands ("On one machine"), parsed out
of it and run with only these changes: the head gets free ports, its own temp dir and
`--block` (so the test can stop it by its process group: `ray stop` would stop every
Ray process on the machine, other test sessions' too), `http://127.0.0.1:8265` becomes
the head's job API, `$PWD/runs` a temporary directory, `<submission id>` the pipeline
job's id, and the pipeline command gets the overrides that make it small. The token
lives in a temporary file (RAY_AUTH_TOKEN_PATH), so ~/.ray is not touched.

Before the pipeline is submitted, its first steps run as the README's "One job per step"
does, each a `python jobs/<step>.py` process joining the head with the same config and
overrides: the submitted pipeline then trains only stage 3 and evaluates, and never
trains stage 1 again. A step whose inputs are missing names the step to run first.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPOSITORY = Path(__file__).parents[2]
README_ADDRESS = "http://127.0.0.1:8265"
SMALL_PIPELINE = [
    "data.trap.num_entities=12", "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64", "model.tiny.vocab_size=300", "train.num_workers=1",
    "stage1.steps=4", "stage1.report_every=2", "stage1.micro_batch_size_per_worker=4",
    "stage3.steps=2", "stage3.report_every=2", "stage3.micro_batch_size_per_worker=4", "stage3.attempts=1",
    "stage3.top_k=2", "stage3.num_candidates=8", "eval.baselines=[bm25]", "encode.max_actors=1",
]


def readme_commands(heading: str) -> list[list[str]]:
    """The commands of each ```bash block in the README section `heading`:
    continuation lines joined, trailing comments dropped."""
    section = (REPOSITORY / "README.md").read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        text = re.sub(r"\s+#[^\n]*", "", block.replace("\\\n", " "))
        blocks.append([" ".join(line.split()) for line in text.splitlines() if line.strip()])
    return blocks


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class Head:
    """`ray start --head ... --block` in its own session; stop() ends exactly its processes."""

    def __init__(self, command: str, base: Path, env: dict[str, str], log: Path):
        self.base, self.log, self.env = base, log, env
        self.gcs_port, dashboard_port, client_port, agent_port = free_ports(4)
        self.job_api = f"http://127.0.0.1:{dashboard_port}"
        self.job_agent = f"http://127.0.0.1:{agent_port}"
        isolation = (f" --port {self.gcs_port} --dashboard-port {dashboard_port} --ray-client-server-port {client_port}"
                     f" --dashboard-agent-listen-port {agent_port} --temp-dir {base / 'ray'} --block")
        with open(log, "ab") as out:
            self.process = subprocess.Popen(["bash", "-c", command + isolation], cwd=REPOSITORY, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def wait_until_serving(self, token: str, timeout: float = 180) -> bool:
        """True once the job API answers and the head's job agent serves HTTP; False if
        the head exited first. The API is up before the agent that runs submitted jobs,
        and a submission that finds no agent within Ray's 10 s fails with "No available
        agent to submit job, please try again later" (seen on a loaded machine)."""
        headers = {"Authorization": f"Bearer {token}"}
        version = urllib.request.Request(self.job_api + "/api/version", headers=headers)
        agent = urllib.request.Request(self.job_agent + "/api/job_agent/jobs/none/logs", headers=headers)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if _answers(version, ok_only=True) and _answers(agent, ok_only=False):
                return True
            time.sleep(0.5)
        raise AssertionError(f"the head's job API or job agent did not answer in {timeout} s:\n"
                             f"{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        import psutil

        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers and job drivers run in process groups of their own; what is left
        # of this head still names its temp dir on its command line or as its cwd.
        marker = str(self.base)
        left = []
        for proc in psutil.process_iter(["cmdline", "cwd"]):
            try:
                if marker in " ".join(proc.info["cmdline"] or []) or marker in (proc.info["cwd"] or ""):
                    left.append(proc)
            except psutil.Error:
                pass
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)


def _answers(request: urllib.request.Request, ok_only: bool) -> bool:
    """Whether an HTTP server answers `request` (with 200 when `ok_only`, else any status)."""
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200 or not ok_only
    except urllib.error.HTTPError:
        return not ok_only  # it answered, with an error status (e.g. no such job)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def run(command: str, env: dict[str, str], log: Path, timeout: float) -> str:
    """Runs `command` in bash from the repository root; its output, or a failure with it."""
    result = subprocess.run(["bash", "-c", command], cwd=REPOSITORY, env=env, capture_output=True, text=True,
                            timeout=timeout)
    with open(log, "a") as out:
        out.write(f"$ {command}\n{result.stdout}{result.stderr}\n")
    assert result.returncode == 0, f"{command}\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def test_a_run_step_by_step_as_jobs_then_the_readme_job_submit_commands_on_a_head_with_token_auth(tmp_path):
    start, jobs = readme_commands("On one machine: `ray start --head` and `ray job submit`")
    activate, auth_mode, get_token, start_head, submit_pipeline, submit_encode, stop = start
    assert activate == "source .venv/bin/activate"
    assert auth_mode == "export RAY_AUTH_MODE=token"
    assert get_token == "ray get-auth-token --generate"
    assert start_head.startswith("ray start --head") and stop == "ray stop"
    runtime_env = "cluster/local-runtime-env.yaml"
    submit = f"ray job submit --address {README_ADDRESS} --working-dir . --runtime-env {runtime_env} -- "
    assert submit_pipeline.startswith(submit + "python jobs/pipeline.py ")
    assert submit_encode.startswith(submit + "python jobs/encode_corpus.py ")
    status, logs = (next(c for c in jobs if c.startswith(f"ray job {verb} ")) for verb in ("status", "logs"))

    # A short path: Ray's socket paths under the temp dir must stay under 108 characters.
    base = Path(tempfile.mkdtemp(prefix="clara-head-", dir="/tmp"))
    token = secrets.token_hex(32)
    (base / "token").write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(base / "token"))
    log = tmp_path / "commands.log"
    runs = tmp_path / "runs"

    # The venv of the interpreter running the tests: .venv in a checkout made by `make install`.
    activate = f"source {Path(sys.prefix) / 'bin' / 'activate'}"

    def readme(command: str) -> str:
        """A README command as the README's shell runs it, after `activate`."""
        return f"{activate} && " + command.replace(README_ADDRESS, head.job_api).replace("$PWD/runs", str(runs))

    head = None
    try:
        # The token comes from RAY_AUTH_TOKEN_PATH; --generate leaves ~/.ray alone when one exists.
        assert run(f"{activate} && {get_token}", env, log, timeout=60).strip().splitlines()[-1] == token
        for _attempt in range(3):  # a free port taken by someone else before the head bound it
            head = Head(f"{activate} && exec {start_head}", base, env, tmp_path / "head.log")
            if head.wait_until_serving(token):
                break
            head.stop()
        else:
            raise AssertionError((tmp_path / "head.log").read_text()[-3000:])
        client_env = {**env, "RAY_ADDRESS": head.job_api}

        # The pipeline's config, as the step jobs below are given it.
        pipeline_arguments = submit_pipeline.split(" -- python jobs/pipeline.py ", 1)[1].replace("$PWD/runs", str(runs))
        run_dir = runs / "exp1"
        before = _run_first_steps_as_jobs([*pipeline_arguments.split(), *SMALL_PIPELINE], run_dir,
                                          {**env, "RAY_ADDRESS": f"127.0.0.1:{head.gcs_port}"})
        stage1_files = {p: p.stat().st_mtime_ns for p in (run_dir / "models" / "stage1").rglob("*") if p.is_file()}

        output = run(readme(submit_pipeline) + " " + " ".join(SMALL_PIPELINE), client_env, log, timeout=900)
        (job_id,) = set(re.findall(r"Job '(raysubmit_\w+)' succeeded", output))
        assert "stage1 finished in an earlier attempt" in output  # the step jobs' stage 1, read back
        assert {p: p.stat().st_mtime_ns for p in (run_dir / "models" / "stage1").rglob("*") if p.is_file()} == stage1_files
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert set(metrics["results"]) == {"bm25", "query reasoner before stage 3", "query reasoner after stage 3"}
        assert metrics["results"]["query reasoner before stage 3"] == before["query reasoner before stage 3"]
        assert json.loads((run_dir / "steps" / "stage3.json").read_text())["history"][0]["step"] == 2  # report_every
        assert (run_dir / "models" / "stage3" / "adapters.safetensors").exists()
        assert (run_dir / "report.md").exists()
        for command, expected in ((status, "succeeded"), (logs, "query reasoner after stage 3")):
            assert expected in run(readme(command).replace("<submission id>", job_id), client_env, log, timeout=120)

        output = run(readme(submit_encode), client_env, log, timeout=600)
        assert re.search(r"Job 'raysubmit_\w+' succeeded", output)
        num_documents = sum(1 for line in (run_dir / "data" / "corpus.jsonl").read_text().splitlines() if line.strip())
        manifest = json.loads((runs / "exp1-memory" / "manifest.json").read_text())
        assert manifest["num_encoded"] == num_documents > 0

        # Without --address, clara-ray's commands join the running head (found through
        # Ray's address file, here under the head's temp dir) instead of failing.
        join = "from clara_ray.cli import start_ray; import ray; start_ray(None); print(ray.cluster_resources())"
        output = run(f"{activate} && python -c '{join}'", {**env, "RAY_TMPDIR": str(base)}, log, timeout=300)
        assert re.search(rf"joining the Ray cluster running on this machine at \S+:{head.gcs_port}\b", output)
        assert "'CPU': 4.0" in output  # the head's --num-cpus, not a new local instance's
    finally:
        if head is not None:
            head.stop()
        shutil.rmtree(base, ignore_errors=True)


def _run_first_steps_as_jobs(arguments: list[str], run_dir: Path, env: dict[str, str]) -> dict:
    """Prepare, stage 1, encode, index and the evaluation before stage 3, each a
    `python jobs/<step>.py` process on the head; the evaluation's results."""
    from clara_ray.config import load_config
    from clara_ray.pipeline import Run, StepNotReady

    # Out of order: each says which step comes first (no Ray needed to find out).
    config_file = arguments[arguments.index("--config") + 1]
    overrides = [a for a in arguments if a not in ("--config", config_file)]
    early = Run(load_config(REPOSITORY / config_file, overrides), log=lambda line: None)
    with pytest.raises(StepNotReady, match=r"run `train --stage 1` first"):
        early.train(3)
    with pytest.raises(StepNotReady, match=r"run `encode_corpus` first"):
        early.build_index()

    prepared = _job("prepare_data", arguments, env)
    assert prepared["corpus"] > 0 and prepared["test_qa"] > 0 and prepared["run_dir"] == str(run_dir)
    stage1 = _job("train", ["--stage", "1", *arguments], env)
    assert stage1["steps"] == 4 and Path(stage1["model_dir"]) == run_dir / "models" / "stage1"
    encoded = _job("encode_corpus", arguments, env)
    assert encoded["num_encoded"] == prepared["corpus"] and encoded["num_quarantined"] == 0
    index = _job("build_index", arguments, env)
    assert (run_dir / "index" / "CURRENT").read_text().strip() == index["version"]
    before = _job("evaluate", arguments, env)
    assert set(before) == {"query reasoner before stage 3"}
    return before


def _job(step: str, arguments: list[str], env: dict[str, str]) -> dict:
    """`python jobs/<step>.py ...` from the repository: its last line, as JSON."""
    done = subprocess.run([sys.executable, f"jobs/{step}.py", *arguments], cwd=REPOSITORY, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_start_ray_joins_only_a_cluster_that_runs(monkeypatch):
    """The choice start_ray makes without --address, Ray's lookup mocked."""
    import ray
    from ray._private import services

    from clara_ray import cli

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: "10.0.0.5:6379")

    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset({"10.0.0.5:6379"}))
    cli.start_ray(None)
    cli.start_ray("local")
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset())  # a killed head's address file
    cli.start_ray(None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    cli.start_ray(None)

    assert [(call["address"], "num_cpus" in call) for call in calls] == [
        ("10.0.0.5:6379", False), ("local", True), ("local", True), ("10.0.0.7:6379", False)]


def test_workers_of_a_local_instance_find_it_beside_another_one(local_ray, tmp_path):
    """With a second Ray instance on the machine, a worker's State API call (as Train's
    placement-group cleaner makes every second) still finds its own cluster: start_ray
    tells the workers of the instance it starts its address."""
    other = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys; ray.init(address='local', num_cpus=1, include_dashboard=False); "
                               "print('up', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert other.stdout.readline().strip() == "up"

        @local_ray.remote
        def own_cluster():
            from ray.util.state import list_nodes

            nodes = [node.node_id for node in list_nodes()]  # beside another instance: which cluster?
            return os.environ.get("RAY_ADDRESS", ""), nodes

        address, nodes = local_ray.get(own_cluster.remote())
        assert address.endswith(":" + local_ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
        assert nodes == [local_ray.get_runtime_context().get_node_id()]
    finally:
        other.stdin.close()
        other.wait(timeout=60)
