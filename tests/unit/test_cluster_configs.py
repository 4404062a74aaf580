"""The files in cluster/: the cluster launcher config against the schema shipped in the installed
Ray and the cross-references the schema cannot see; the KubeRay manifests against the fields and
rules of KubeRay's ray.io/v1 CRDs; every job they run against jobs/ and the config tree.

Each check returns a list of problems, so a test of a shipped file asserts an empty list and a
test of a broken copy asserts the problem it expects. No cluster, no network.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from clara_ray.cli import WORKER_ENV
from clara_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SHARED_STORAGE = "/mnt/cluster_storage"
JOB_FILES = {job: f"rayjob-{job}.yaml" for job in ("pipeline", "encode", "sweep")}


def read_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def pinned_ray_version() -> str:
    match = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert match, "constraints.txt pins no ray version"
    return match.group(1)


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


# ------------------------------------------------------------------ cluster launcher (autoscaler.yaml)


def schema_problems(config: dict) -> list[str]:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'.'.join(map(str, error.absolute_path)) or '<top>'}: {error.message}"
            for error in validator.iter_errors(config)]


def node_setup_commands(config: dict, node_type: str) -> list[str]:
    """The setup commands a node of `node_type` runs, as the launcher picks them."""
    if node_type == config["head_node_type"]:
        return config.get("setup_commands", []) + config.get("head_setup_commands", [])
    node = config["available_node_types"][node_type]
    if "worker_setup_commands" in node:  # replaces the global lists
        return node["worker_setup_commands"]
    return config.get("setup_commands", []) + config.get("worker_setup_commands", [])


def launcher_problems(config: dict) -> list[str]:
    """What jsonschema cannot check: references between fields, and what this project needs."""
    problems = []
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    if head not in types:
        return [f"head_node_type {head!r} is not one of available_node_types {sorted(types)}"]
    if sum(node.get("min_workers", 0) for node in types.values()) > config["max_workers"]:
        problems.append("the min_workers of all node types exceed max_workers")
    gpu_types = [name for name, node in types.items() if node["resources"].get("GPU", 0) > 0]
    if not gpu_types:
        problems.append("no node type declares GPU resources (resources: {GPU: n})")
    for name, node in types.items():
        if name != head:
            low, high = node.get("min_workers", 0), node.get("max_workers", config["max_workers"])
            if not 0 <= low <= high <= config["max_workers"]:
                problems.append(f"{name}: needs 0 <= min_workers ({low}) <= max_workers ({high}) "
                                f"<= the global max_workers ({config['max_workers']})")
        if not str(node["node_config"].get("ImageId", "")).startswith("ami-"):
            problems.append(f"{name}: no ImageId (Ray would pick its default Ubuntu 18.04 AMI)")
        commands = " && ".join(node_setup_commands(config, name))
        extra = "gpu" if name in gpu_types else "cpu"  # faiss-gpu-cu12 or faiss-cpu, never both
        if not re.search(rf'pip install .*-c constraints\.txt .*-e "\.\[{extra}\]"', commands):
            problems.append(f'{name}: setup commands do not pip install -c constraints.txt -e ".[{extra}]"')
        if not re.search(rf"\bmount .*{SHARED_STORAGE}", commands):
            problems.append(f"{name}: setup commands do not mount {SHARED_STORAGE}")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [command for command in config.get(key, []) if "ray start" in command]
        if not starts or not all("RAY_AUTH_MODE=token" in command for command in starts):
            problems.append(f"{key}: `ray start` without RAY_AUTH_MODE=token")
    user = config.get("auth", {}).get("ssh_user", "ubuntu")
    if f"/home/{user}/.ray/auth_token" not in config.get("file_mounts", {}):
        problems.append(f"file_mounts: no token copied to /home/{user}/.ray/auth_token")
    return problems


@pytest.fixture(scope="module")
def launcher_config() -> dict:
    return read_yaml(CLUSTER / "autoscaler.yaml")


def test_launcher_config_matches_the_ray_schema(launcher_config):
    assert schema_problems(launcher_config) == []


def test_launcher_config_passes_the_checks_of_ray_up(launcher_config):
    # What `ray up` runs before touching the cloud: provider defaults filled in, then
    # the schema, head_node_type and the min_workers sum.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher_config)))


def test_launcher_config_cross_references(launcher_config):
    assert launcher_problems(launcher_config) == []


def _node(config, name):
    return config["available_node_types"][name]


def _gpu(config):
    return _node(config, "gpu-train")


@pytest.mark.parametrize("mutate, expected", [
    (lambda config: config.update(max_worker=config.pop("max_workers")), "'max_worker' was unexpected"),
    (lambda config: config.pop("provider"), "'provider' is a required property"),
    (lambda config: _node(config, "gpu-train").pop("resources"), "'resources' is a required property"),
    (lambda config: _node(config, "cpu-encode").update(min_workers="1"), "is not of type 'integer'"),
], ids=["misspelled-key", "missing-provider", "node-type-without-resources", "string-min-workers"])
def test_schema_rejects_a_broken_launcher_config(launcher_config, mutate, expected):
    config = copy.deepcopy(launcher_config)
    mutate(config)
    assert any(expected in problem for problem in schema_problems(config)), schema_problems(config)




@pytest.mark.parametrize("mutate, expected", [
    (lambda config: config.update(head_node_type="ray.head.default"), "head_node_type"),
    (lambda config: _gpu(config).update(min_workers=5, max_workers=4),
     "min_workers (5) <= max_workers (4)"),
    (lambda config: _gpu(config).update(max_workers=20), "<= the global max_workers"),
    (lambda config: _gpu(config)["resources"].pop("GPU"), "no node type declares GPU"),
    (lambda config: _gpu(config)["worker_setup_commands"].pop(), "gpu-train: setup commands do not pip install"),
    (lambda config: config["head_setup_commands"].pop(1), "head: setup commands do not mount"),
    (lambda config: config.update(worker_start_ray_commands=["ray start --address=$RAY_HEAD_IP:6379"]),
     "worker_start_ray_commands: `ray start` without RAY_AUTH_MODE=token"),
    (lambda config: config["file_mounts"].pop("/home/ubuntu/.ray/auth_token"), "no token copied"),
], ids=["unknown-head-type", "min-above-max", "above-global-max", "no-gpu-type", "no-install",
        "no-shared-storage", "no-token-mode", "no-token-file"])
def test_cross_reference_checks_reject_a_broken_launcher_config(launcher_config, mutate, expected):
    config = copy.deepcopy(launcher_config)
    mutate(config)
    assert schema_problems(config) == []  # the schema alone lets each of these through
    assert any(expected in problem for problem in launcher_problems(config)), launcher_problems(config)


# ------------------------------------------------------------------ KubeRay manifests (kuberay/)

# Fields of KubeRay's ray.io/v1 CRDs (ray-operator/config/crd/bases/ray.io_rayclusters.yaml and
# ray.io_rayjobs.yaml); the API server drops unknown fields, so a misspelled one would silently
# do nothing. authOptions needs KubeRay >= 1.5.1.
RAY_CLUSTER_SPEC_FIELDS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy",
    "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams",
                     "resources", "serviceType", "template"}
WORKER_GROUP_FIELDS = {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas",
                       "numOfHosts", "priority", "rayStartParams", "replicas", "resources",
                       "scaleStrategy", "suspend", "template"}
AUTOSCALER_OPTIONS_FIELDS = {"args", "command", "env", "envFrom", "idleTimeoutSeconds", "image",
                             "imagePullPolicy", "resources", "securityContext", "upscalingMode",
                             "version", "volumeMounts"}
AUTH_OPTIONS_FIELDS = {"enableK8sTokenAuth", "mode", "secretName"}
RAY_JOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy",
    "metadata", "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML",
    "shutdownAfterJobFinishes", "submissionMode", "submitterConfig", "submitterPodTemplate",
    "suspend", "ttlSecondsAfterFinished",
}
# rayStartParams that KubeRay refuses beside a group's `resources` field.
RAY_START_RESOURCE_PARAMS = {"num-cpus", "num-gpus", "memory", "resources"}
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def unknown_fields(where: str, mapping: dict, known: set[str]) -> list[str]:
    return [f"{where}: unknown field {key!r}" for key in sorted(set(mapping) - known)]


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def pod_problems(where: str, template) -> list[str]:
    """A group's Pod template: the Ray container first, each container named and with an image,
    the shared volume mounted from a PersistentVolumeClaim."""
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        return [f"{where}: template.spec is required"]
    spec = template["spec"]
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return [f"{where}: template.spec.containers needs at least one container"]
    problems = [f"{where}: container {index} needs {key}"
                for index, container in enumerate(containers) for key in ("name", "image")
                if not container.get(key)]
    claims = {volume["name"] for volume in spec.get("volumes", []) if "persistentVolumeClaim" in volume}
    mounted = {mount.get("name") for mount in containers[0].get("volumeMounts", [])
               if mount.get("mountPath") == SHARED_STORAGE}
    if not claims & mounted:
        problems.append(f"{where}: the Ray container does not mount a PersistentVolumeClaim "
                        f"at {SHARED_STORAGE}")
    return problems


def ray_start_params_problems(where: str, group: dict) -> list[str]:
    params = group.get("rayStartParams", {})
    problems = [f"{where}: rayStartParams[{key!r}] must be a string" for key, value in params.items()
                if not isinstance(value, str)]
    if group.get("resources") and RAY_START_RESOURCE_PARAMS & set(params):
        problems.append(f"{where}: resources set both in rayStartParams and in resources")
    return problems


def ray_cluster_spec_problems(spec: dict) -> list[str]:
    """A RayClusterSpec: what the CRD requires, what KubeRay's validation refuses, and what this
    project needs (autoscaling, token authentication, a GPU group, one image)."""
    if not isinstance(spec.get("headGroupSpec"), dict):
        return ["headGroupSpec is required"]
    problems = unknown_fields("spec", spec, RAY_CLUSTER_SPEC_FIELDS)
    head = spec["headGroupSpec"]
    problems += unknown_fields("headGroupSpec", head, HEAD_GROUP_FIELDS)
    problems += ray_start_params_problems("headGroupSpec", head)
    problems += pod_problems("headGroupSpec", head.get("template"))

    groups = spec.get("workerGroupSpecs", [])
    names = [group.get("groupName") for group in groups]
    if len(set(names)) != len(names):
        problems.append(f"workerGroupSpecs: group names repeat: {names}")
    gpu_groups = []
    for index, group in enumerate(groups):
        where = f"workerGroupSpecs[{group.get('groupName', index)}]"
        problems += unknown_fields(where, group, WORKER_GROUP_FIELDS)
        problems += [f"{where}: {key} is required"
                     for key in ("groupName", "minReplicas", "maxReplicas", "template") if key not in group]
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
        replicas = group.get("replicas", 0)
        if not all(map(is_count, (low, high, replicas))) or not low <= replicas <= high:
            problems.append(f"{where}: needs integers 0 <= minReplicas ({low}) <= replicas ({replicas}) "
                            f"<= maxReplicas ({high})")
        problems += ray_start_params_problems(where, group)
        problems += pod_problems(where, group.get("template"))
        containers = (group.get("template") or {}).get("spec", {}).get("containers") or [{}]
        if int(containers[0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) > 0:
            gpu_groups.append(group.get("groupName"))
    if not gpu_groups:
        problems.append("no worker group has nvidia.com/gpu in its Ray container's limits")

    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true: the worker groups start from zero")
    options = spec.get("autoscalerOptions", {})
    problems += unknown_fields("autoscalerOptions", options, AUTOSCALER_OPTIONS_FIELDS)
    if not is_count(options.get("idleTimeoutSeconds")):
        problems.append("autoscalerOptions.idleTimeoutSeconds must be a non-negative integer")
    if options.get("upscalingMode", "Default") not in {"Default", "Aggressive", "Conservative"}:
        problems.append(f"autoscalerOptions.upscalingMode {options['upscalingMode']!r} is not allowed")

    auth = spec.get("authOptions", {})
    problems += unknown_fields("authOptions", auth, AUTH_OPTIONS_FIELDS)
    if auth.get("mode") != "token":
        problems.append("authOptions.mode must be 'token'")
    version, pinned = str(spec.get("rayVersion", "")), pinned_ray_version()
    if version != pinned:
        problems.append(f"rayVersion {version!r} is not the ray of constraints.txt ({pinned})")
    elif version_tuple(version) < (2, 52, 0):
        problems.append("token authentication needs rayVersion >= 2.52.0")

    templates = [head.get("template")] + [group.get("template") for group in groups]
    images = {container.get("image") for template in templates if isinstance(template, dict)
              for container in template.get("spec", {}).get("containers", [])[:1]}
    if len(images) > 1:
        problems.append(f"the Ray containers run different images {sorted(map(str, images))}: "
                        "Ray and the package must be the same on every node")
    return problems


def manifest_problems(manifest: dict, kind: str, max_name_length: int) -> list[str]:
    problems = []
    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") != kind:
        problems.append(f"expected apiVersion ray.io/v1, kind {kind}")
    name = manifest.get("metadata", {}).get("name", "")
    if not DNS_1035_LABEL.match(name) or len(name) > max_name_length:
        problems.append(f"metadata.name {name!r}: a DNS-1035 label of at most {max_name_length} characters")
    return problems


@pytest.fixture(scope="module")
def ray_cluster() -> dict:
    return read_yaml(KUBERAY / "raycluster.yaml")


@pytest.fixture(scope="module")
def ray_jobs() -> dict[str, dict]:
    return {job: read_yaml(KUBERAY / file) for job, file in JOB_FILES.items()}


def test_ray_cluster_manifest(ray_cluster):
    assert manifest_problems(ray_cluster, "RayCluster", max_name_length=53) == []
    assert ray_cluster_spec_problems(ray_cluster["spec"]) == []


def test_shared_volume_claim_is_read_write_many(ray_cluster):
    claim = read_yaml(KUBERAY / "storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    volumes = ray_cluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {volume["persistentVolumeClaim"]["claimName"] for volume in volumes
            if "persistentVolumeClaim" in volume} == {claim["metadata"]["name"]}


def _worker(spec, name):
    return next(group for group in spec["workerGroupSpecs"] if group["groupName"] == name)


def _ray_container(group):
    return group["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("mutate, expected", [
    (lambda spec: spec.update(enableInTreeAutoScaling=True), "unknown field 'enableInTreeAutoScaling'"),
    (lambda spec: spec["headGroupSpec"].pop("template"), "headGroupSpec: template.spec is required"),
    (lambda spec: _worker(spec, "cpu-encode").pop("groupName"), "groupName is required"),
    (lambda spec: _ray_container(_worker(spec, "cpu-encode")).pop("image"), "container 0 needs image"),
    (lambda spec: _worker(spec, "gpu-train").update(minReplicas=5), "minReplicas (5) <= replicas (0)"),
    (lambda spec: spec["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "must be a string"),
    (lambda spec: _ray_container(_worker(spec, "cpu-encode")).pop("volumeMounts"), "does not mount"),
    (lambda spec: spec["autoscalerOptions"].update(upscalingMode="Fast"), "upscalingMode 'Fast'"),
], ids=["misspelled-field", "head-without-template", "group-without-name", "container-without-image",
        "min-above-replicas", "non-string-start-param", "no-shared-volume", "bad-upscaling-mode"])
def test_crd_checks_reject_a_broken_ray_cluster(ray_cluster, mutate, expected):
    spec = copy.deepcopy(ray_cluster["spec"])
    mutate(spec)
    problems = ray_cluster_spec_problems(spec)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize("mutate, expected", [
    (lambda spec: _ray_container(_worker(spec, "gpu-train"))["resources"]["limits"].pop("nvidia.com/gpu"),
     "no worker group has nvidia.com/gpu"),
    (lambda spec: spec.update(enableInTreeAutoscaling=False), "enableInTreeAutoscaling must be true"),
    (lambda spec: spec.pop("authOptions"), "authOptions.mode must be 'token'"),
    (lambda spec: spec.update(rayVersion="2.51.0"), "is not the ray of constraints.txt"),
    (lambda spec: _ray_container(_worker(spec, "gpu-train")).update(image="rayproject/ray:2.60.0"),
     "different images"),
], ids=["no-gpu-limit", "no-autoscaling", "no-token-auth", "other-ray-version", "mixed-images"])
def test_project_checks_reject_a_broken_ray_cluster(ray_cluster, mutate, expected):
    spec = copy.deepcopy(ray_cluster["spec"])
    mutate(spec)
    problems = ray_cluster_spec_problems(spec)
    assert any(expected in problem for problem in problems), problems


# ------------------------------------------------------------------ RayJobs and their entrypoints

# Options each job script takes (jobs/*.py, clara_ray/cli.py) and which it requires.
JOB_OPTIONS = {
    "jobs/pipeline.py": ({"--config"}, {"--config"}),
    "jobs/encode_corpus.py": ({"--model-dir", "--output", "--input", "--format", "--config"},
                              {"--model-dir", "--output", "--input"}),
    "jobs/sweep.py": ({"--from-run", "--name"}, {"--from-run"}),
}
PATH_OPTIONS = {"--model-dir", "--output", "--from-run"}  # written or read on every node


def split_entrypoint(entrypoint: str) -> tuple[str, dict[str, str], list[str]]:
    """`python jobs/x.py --opt value ... key=value ...` -> (script, options, overrides)."""
    words = shlex.split(entrypoint)
    if len(words) < 2 or words[0] != "python":
        raise ValueError(f"entrypoint must be `python jobs/<job>.py ...`, got {entrypoint!r}")
    options, overrides, rest = {}, [], iter(words[2:])
    for word in rest:
        if word.startswith("--"):
            options[word] = next(rest, "")
        elif "=" in word:
            overrides.append(word)
        else:
            raise ValueError(f"unexpected argument {word!r} in {entrypoint!r}")
    return words[1], options, overrides


def entrypoint_problems(entrypoint: str) -> list[str]:
    """The script exists, takes these options, its config file exists and the overrides load."""
    try:
        script, options, overrides = split_entrypoint(entrypoint)
    except ValueError as error:
        return [str(error)]
    if script not in JOB_OPTIONS or not (ROOT / script).is_file():
        return [f"{script}: not a job under jobs/ ({sorted(JOB_OPTIONS)})"]
    known, required = JOB_OPTIONS[script]
    problems = [f"{script}: unknown option {option}" for option in sorted(set(options) - known)]
    problems += [f"{script}: missing {option}" for option in sorted(required - set(options))]
    if "--config" in options:
        config_path = ROOT / options["--config"]
        if config_path.parent != ROOT / "jobs" / "configs" or not config_path.is_file():
            problems.append(f"{options['--config']}: not a config file under jobs/configs/")
        else:
            try:
                config = load_config(config_path, overrides)
            except ConfigError as error:
                problems.append(str(error))
            else:  # the pipeline writes its run directory there; the encoder writes --output
                run_root = str(config.run.output_dir)
                if script == "jobs/pipeline.py" and not run_root.startswith(SHARED_STORAGE):
                    problems.append(f"run.output_dir {config.run.output_dir} is not on {SHARED_STORAGE}")
    problems += [f"{option} {options[option]} is not on {SHARED_STORAGE}"
                 for option in sorted(PATH_OPTIONS & set(options))
                 if not options[option].startswith(SHARED_STORAGE)]
    return problems


def runtime_env_problems(text) -> list[str]:
    try:
        runtime_env = yaml.safe_load(text)
    except yaml.YAMLError as error:
        return [f"runtimeEnvYAML is not YAML: {error}"]
    if not isinstance(runtime_env, dict):
        return ["runtimeEnvYAML must be a mapping"]
    problems = []
    working_dir = str(runtime_env.get("working_dir", ""))
    if not (working_dir.startswith("/") or re.match(r"^[a-z0-9]+://", working_dir)):
        problems.append(f"working_dir {working_dir!r}: an absolute path in the image or a remote URI")
    env_vars = runtime_env.get("env_vars", {})
    if not all(isinstance(value, str) for value in env_vars.values()):
        problems.append("env_vars values must be strings")
    # The jobs pass WORKER_ENV to ray.init(); Ray refuses to merge a job runtime env that
    # sets any of the same keys, even to the same values.
    problems += [f"env_vars sets {key}, which the jobs set in ray.init()"
                 for key in sorted(set(env_vars) & set(WORKER_ENV))]
    return problems


def ray_job_problems(job: dict) -> list[str]:
    problems = manifest_problems(job, "RayJob", max_name_length=47)
    spec = job.get("spec", {})
    problems += unknown_fields("spec", spec, RAY_JOB_SPEC_FIELDS)
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        problems.append("entrypoint is required")
    else:
        problems += entrypoint_problems(spec["entrypoint"])
    problems += runtime_env_problems(spec.get("runtimeEnvYAML", ""))
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true: the job's cluster holds GPU nodes")
    for key in ("ttlSecondsAfterFinished", "backoffLimit"):
        if not is_count(spec.get(key, 0)):
            problems.append(f"{key} must be a non-negative integer")
    if not isinstance(spec.get("rayClusterSpec"), dict):
        problems.append("rayClusterSpec is required (this project's RayJobs bring their own cluster)")
    else:
        problems += [f"rayClusterSpec: {problem}"
                     for problem in ray_cluster_spec_problems(spec["rayClusterSpec"])]
    return problems


@pytest.mark.parametrize("job", sorted(JOB_FILES))
def test_ray_job_manifest(ray_jobs, job):
    assert ray_job_problems(ray_jobs[job]) == []


@pytest.mark.parametrize("job", sorted(JOB_FILES))
def test_ray_job_brings_the_cluster_of_raycluster_yaml(ray_jobs, ray_cluster, job):
    # One cluster shape, written four times: a change to one copy must reach the others.
    assert ray_jobs[job]["spec"]["rayClusterSpec"] == ray_cluster["spec"]


def test_jobs_work_on_the_same_run(ray_jobs):
    _, pipeline, overrides = split_entrypoint(ray_jobs["pipeline"]["spec"]["entrypoint"])
    config = load_config(ROOT / pipeline["--config"], overrides)
    run_directory = f"{config.run.output_dir}/{config.run.name}"
    _, encode, _ = split_entrypoint(ray_jobs["encode"]["spec"]["entrypoint"])
    _, sweep, sweep_overrides = split_entrypoint(ray_jobs["sweep"]["spec"]["entrypoint"])
    assert encode["--model-dir"] == f"{run_directory}/models/stage1"
    assert sweep["--from-run"] == run_directory
    # The sweep's overrides apply to the run's config.
    assert load_config(ROOT / pipeline["--config"], overrides + sweep_overrides).sweep.max_concurrent_trials


def test_image_holds_the_working_dir_and_the_pinned_ray(ray_jobs):
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = rf"^FROM rayproject/ray:{re.escape(pinned_ray_version())}-py\d+-gpu$"
    assert re.search(base, dockerfile, re.MULTILINE)
    assert "pip install --no-cache-dir -c /home/ray/clara_ray/constraints.txt" in dockerfile
    copied_to = re.search(r"^COPY \S+ \. (\S+)$", dockerfile, re.MULTILINE).group(1)
    for job in ray_jobs.values():
        assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == copied_to


def _entrypoint(job, old, new):
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace(old, new)


@pytest.mark.parametrize("job_name, mutate, expected", [
    ("pipeline", lambda job: job["spec"].update(shutdownAfterJobFinishes=False),
     "shutdownAfterJobFinishes must be true"),
    ("pipeline", lambda job: job["spec"].update(ttlSecondsAfterFinished=-1),
     "ttlSecondsAfterFinished must be"),
    ("pipeline", lambda job: job["spec"].update(runtimeEnvYAML="working_dir: [unclosed"), "not YAML"),
    ("pipeline", lambda job: job["spec"].update(runtimeEnvYAML="working_dir: .\n"), "working_dir '.'"),
    ("encode", lambda job: job["spec"].update(
        runtimeEnvYAML="working_dir: /home/ray/clara_ray\nenv_vars: {HF_HUB_OFFLINE: '1'}\n"),
     "sets HF_HUB_OFFLINE"),
    ("sweep", lambda job: job["spec"].pop("rayClusterSpec"), "rayClusterSpec is required"),
    ("sweep", lambda job: job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("maxReplicas"),
     "rayClusterSpec: workerGroupSpecs[cpu-encode]: maxReplicas is required"),
    ("pipeline", lambda job: job.update(metadata={"name": "Clara_Pipeline"}), "DNS-1035"),
    ("pipeline", lambda job: job["spec"].update(entryPoint="x"), "unknown field 'entryPoint'"),
], ids=["no-shutdown", "negative-ttl", "runtime-env-not-yaml", "relative-working-dir", "repeats-worker-env",
        "no-cluster-spec", "cluster-spec-checked", "bad-name", "misspelled-field"])
def test_crd_checks_reject_a_broken_ray_job(ray_jobs, job_name, mutate, expected):
    job = copy.deepcopy(ray_jobs[job_name])
    mutate(job)
    assert any(expected in problem for problem in ray_job_problems(job)), ray_job_problems(job)


@pytest.mark.parametrize("job_name, old, new, expected", [
    ("pipeline", "jobs/pipeline.py", "jobs/train.py", "not a job under jobs/"),
    ("pipeline", "mistral7b_gpu.yaml", "mistral7b.yaml", "not a config file under jobs/configs/"),
    ("pipeline", "run.name=m7b", "run.nmae=m7b", "run.nmae"),
    ("pipeline", "run.output_dir=/mnt/cluster_storage/runs", "run.output_dir=runs",
     "is not on /mnt/cluster_storage"),
    ("encode", "--output /mnt/cluster_storage/enc/wiki", "--output enc/wiki",
     "--output enc/wiki is not on"),
    ("encode", "--input", "--inputs", "unknown option --inputs"),
    ("sweep", "--from-run", "--run", "missing --from-run"),
], ids=["missing-job", "missing-config", "unknown-override", "local-run-dir", "local-output",
        "unknown-option", "missing-option"])
def test_repository_checks_reject_a_broken_entrypoint(ray_jobs, job_name, old, new, expected):
    job = copy.deepcopy(ray_jobs[job_name])
    _entrypoint(job, old, new)
    assert any(expected in problem for problem in ray_job_problems(job)), ray_job_problems(job)
