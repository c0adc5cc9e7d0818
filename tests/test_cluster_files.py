"""Offline checks of the deployment files under cluster/.

The Ray cluster launcher files are filled with Ray's defaults and validated by
Ray's own code (`prepare_config`, `validate_config`, which checks
ray/autoscaler/ray-schema.json with jsonschema); nothing here talks to a cloud.
The KubeRay RayJob is checked against the fields the RayJob CRD requires and
the types Kubernetes expects, and its runtime environment by Ray's `RuntimeEnv`.
"""

import copy
import os
import re
import shlex
import tomllib

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(REPO, "cluster")
LAUNCHERS = ["gcp-gpu.yaml", "gcp-tpu.yaml", "aws-gpu.yaml"]
ALL_FILES = LAUNCHERS + ["rayjob.yaml"]
EXAMPLE = "examples/train_digits.py"


def load(name):
    with open(os.path.join(CLUSTER, name)) as f:
        return yaml.safe_load(f)


def comments(name):
    """The text of the file's comment lines, '#' stripped."""
    with open(os.path.join(CLUSTER, name)) as f:
        return "\n".join(line.strip()[1:].strip() for line in f if line.strip().startswith("#"))


def ray_schema():
    import json
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def example_flags():
    with open(os.path.join(REPO, EXAMPLE)) as f:
        return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", f.read()))


def check_example_command(argv):
    """argv: `python examples/train_digits.py ...`; returns the --out value."""
    assert argv[:2] == ["python", EXAMPLE], argv
    assert os.path.isfile(os.path.join(REPO, argv[1]))
    flags = example_flags()
    assert "--out" in flags, "the example lost its --out flag"
    for arg in argv[2:]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in flags, "%s is not a flag of %s (%s)" % (arg, EXAMPLE, sorted(flags))
    assert "--out" in argv, argv
    return argv[argv.index("--out") + 1]


def worker_types(config):
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def pinned_ray_version(commands):
    versions = {m for c in commands for m in re.findall(r"ray\[default\]==([\w.]+)", c)}
    assert len(versions) == 1, commands
    return versions.pop()


# ---------------------------------------------------------------- cluster launcher files

@pytest.fixture(scope="module")
def prepared():
    return {name: prepare_config(copy.deepcopy(load(name))) for name in LAUNCHERS}


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_file_passes_rays_schema_and_validation(name, prepared):
    raw = load(name)
    jsonschema.validate(raw, ray_schema())  # the file as written, before defaults
    config = prepared[name]
    validate_config(config)                 # what `ray up` runs after filling in the defaults
    # prepare_config merged the common setup commands in and set per-type worker limits.
    assert config["worker_setup_commands"][:len(raw["setup_commands"])] == raw["setup_commands"]
    assert config["available_node_types"][config["head_node_type"]]["max_workers"] == 0


def _unknown_top_level_key(c):
    c["max_worker"] = 2


def _gpu_count_as_string(c):
    node_type = next(iter(worker_types(c).values()))
    node_type["resources"] = dict(node_type["resources"], GPU="1")


def _worker_without_node_config(c):
    next(iter(worker_types(c).values())).pop("node_config")


def _unknown_node_type_key(c):
    next(iter(worker_types(c).values()))["min_worker"] = 1


def _setup_commands_not_a_list(c):
    c["setup_commands"] = "pip install -e ~/rayhooks"


def _head_type_not_defined(c):
    c["head_node_type"] = "no_such_type"


def _more_min_workers_than_max(c):
    next(iter(worker_types(c).values()))["min_workers"] = c["max_workers"] + 1


def _defaults_missing(c):
    c.pop("cluster_synced_files")


@pytest.mark.parametrize("mutate, error", [
    (_unknown_top_level_key, jsonschema.ValidationError),
    (_gpu_count_as_string, jsonschema.ValidationError),
    (_worker_without_node_config, jsonschema.ValidationError),
    (_unknown_node_type_key, jsonschema.ValidationError),
    (_setup_commands_not_a_list, jsonschema.ValidationError),
    (_head_type_not_defined, ValueError),
    (_more_min_workers_than_max, ValueError),
    (_defaults_missing, RuntimeError),
], ids=lambda v: getattr(v, "__name__", "").strip("_"))
@pytest.mark.parametrize("name", LAUNCHERS)
def test_validate_config_rejects_a_broken_copy(name, prepared, mutate, error):
    config = copy.deepcopy(prepared[name])
    validate_config(copy.deepcopy(config))
    mutate(config)
    with pytest.raises(error):
        validate_config(config)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_head_runs_no_training_workers_and_enough_workers_start(name):
    config = load(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    start = " ".join(config["head_start_ray_commands"])
    assert "--head" in start and "--num-cpus=0" in start, start
    assert "--dashboard-host=0.0.0.0" in start  # `ray job submit --address http://<head>:8265`
    workers = worker_types(config)
    assert workers
    min_workers = sum(t.get("min_workers", 0) for t in workers.values())
    assert min_workers >= 2, "the example runs 2 workers"
    assert config["max_workers"] >= min_workers


@pytest.mark.parametrize("name", LAUNCHERS)
def test_this_working_copy_is_installed_on_every_node(name):
    config = load(name)
    mounts = config["file_mounts"]
    (remote, local), = [(r, l) for r, l in mounts.items() if r.rstrip("/").endswith("/rayhooks")]
    # `ray up` resolves a relative local path against its working directory: the repository root.
    with open(os.path.join(REPO, local, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["name"] == "rayhooks"
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        assert "examples" in tomllib.load(f)["project"]["optional-dependencies"]
    remote_home = remote.replace("~", "$HOME", 1)
    installs = [c for c in config["setup_commands"] if "pip install -e" in c]  # setup_commands run on every node
    assert installs, config["setup_commands"]
    assert any(remote_home + "[examples]" in c or remote + "[examples]" in c for c in installs), installs
    assert "**/.git" in config.get("rsync_exclude", [])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_node_pins_the_same_ray(name):
    config = load(name)
    version = pinned_ray_version(config["setup_commands"])
    image = load("rayjob.yaml")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith("rayproject/ray:%s-" % version), (version, image)


def test_gcp_gpu_workers_have_a_t4(prepared):
    config = load("gcp-gpu.yaml")
    assert config["provider"]["type"] == "gcp"
    (name, gpu), = worker_types(config).items()
    node = gpu["node_config"]
    accelerators = node["guestAccelerators"]
    assert [a["acceleratorType"] for a in accelerators] == ["nvidia-tesla-t4"]
    assert sum(a["acceleratorCount"] for a in accelerators) == gpu["resources"]["GPU"] == 1
    assert node["machineType"].startswith("n1-")  # T4s attach to N1 machines only
    # GPU VMs cannot live-migrate; `scheduling` is the GCE API's object, not a list.
    assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert {"key": "install-nvidia-driver", "value": "True"} in node["metadata"]["items"]


def test_aws_gpu_workers_are_g4dn():
    config = load("aws-gpu.yaml")
    assert config["provider"]["type"] == "aws"
    (name, gpu), = worker_types(config).items()
    assert gpu["node_config"]["InstanceType"] == "g4dn.xlarge"
    assert gpu["resources"]["GPU"] == 1
    images = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    assert len(images) == 1, "head and workers need the same image (Ray needs one Python version)"
    assert config["provider"]["cache_stopped_nodes"] is False
    assert any("s3fs" in c for c in config["setup_commands"])
    arn = gpu["node_config"]["IamInstanceProfile"]["Arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), arn


def test_gcp_tpu_workers_are_single_host_tpu_vms():
    from ray._private.accelerators import TPUAcceleratorManager
    from ray._private.accelerators import tpu

    config = load("gcp-tpu.yaml")
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    assert "machineType" in head and "acceleratorType" not in head  # a TPU cannot be the head
    (name, worker), = worker_types(config).items()
    node = worker["node_config"]
    assert "machineType" not in node  # with machineType Ray would create a Compute Engine VM
    accelerator = node["acceleratorType"]
    assert TPUAcceleratorManager.is_valid_tpu_accelerator_type(accelerator)
    assert node["runtimeVersion"]
    chips = int(accelerator.split("-")[1]) // tpu.get_tpu_cores_per_chip(accelerator)
    assert chips <= tpu.get_num_tpu_visible_chips_per_host(accelerator), "a TPU pod: one Ray node per host"
    assert worker["resources"]["TPU"] == chips


def test_gcp_tpu_node_type_as_rays_gcp_provider_sees_it():
    gcp_config = pytest.importorskip(
        "ray.autoscaler._private.gcp.config", exc_type=ImportError,
        reason="Ray's GCP provider needs google-api-python-client")
    config = load("gcp-tpu.yaml")
    assert gcp_config._has_tpus_in_node_configs(config)
    assert not gcp_config._is_head_node_a_tpu(config)


@pytest.mark.parametrize("name", ["gcp-gpu.yaml", "gcp-tpu.yaml"])
def test_gcp_workers_can_write_to_gcs(name):
    config = load(name)
    project = config["provider"]["project_id"]
    assert project and re.fullmatch(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", project)
    for worker in worker_types(config).values():
        (account,) = worker["node_config"]["serviceAccounts"]
        assert account["email"].endswith("@%s.iam.gserviceaccount.com" % project), (account, project)
        assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"]
    assert any("google-api-python-client" in c for c in config["head_setup_commands"])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_comments_say_how_to_run(name):
    text = comments(name)
    assert "ray up cluster/%s" % name in text
    assert "ray down cluster/%s" % name in text
    submits = [line for line in text.splitlines() if line.startswith("ray job submit")]
    assert submits, "no `ray job submit` command in the comments of %s" % name
    outs = []
    for line in submits:
        argv = shlex.split(line)
        assert "--address" in argv and "--working-dir" in argv
        assert argv[argv.index("--working-dir") + 1] == "."
        outs.append(check_example_command(argv[argv.index("--") + 1:]))
    assert any(out.startswith("gs://") for out in outs), outs
    for edit in ("BUCKET", "region"):
        assert edit in text
    if config_is_gcp(name):
        assert "project_id" in text


def config_is_gcp(name):
    return load(name)["provider"]["type"] == "gcp"


# ---------------------------------------------------------------- KubeRay RayJob

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[mkMGTPE])?$")


def pod_specs(doc):
    cluster = doc["spec"]["rayClusterSpec"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group.get("groupName"), group["template"]["spec"]


def rayjob_problems(doc):
    """What the API server, KubeRay or Ray would reject in a RayJob, or what would keep the example from
    running with GCS storage; an empty list if nothing."""
    from ray.runtime_env import RuntimeEnv

    problems = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob":
        problems.append("not a ray.io/v1 RayJob")
    name = doc.get("metadata", {}).get("name")
    if not isinstance(name, str) or len(name) > 63 or not DNS_LABEL.match(name):
        problems.append("metadata.name %r is not a DNS-1123 label" % (name,))
    spec = doc.get("spec", {})
    if not isinstance(spec.get("entrypoint"), str):
        problems.append("spec.entrypoint is not a string")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes is not true")
    cluster = spec.get("rayClusterSpec")
    if not isinstance(cluster, dict) or "headGroupSpec" not in cluster:
        return problems + ["spec.rayClusterSpec.headGroupSpec is missing"]

    groups = [("headGroupSpec", cluster["headGroupSpec"])]
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        where = "workerGroupSpecs[%d]" % i
        groups.append((where, group))
        if not isinstance(group.get("groupName"), str) or not group["groupName"]:
            problems.append(where + ".groupName is missing")
        counts = {}
        for key in ("replicas", "minReplicas", "maxReplicas"):
            value = group.get(key)
            if type(value) is not int or value < 0:
                problems.append("%s.%s is %r, not a non-negative integer" % (where, key, value))
            else:
                counts[key] = value
        if len(counts) == 3 and not counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"]:
            problems.append(where + ": not minReplicas <= replicas <= maxReplicas")
    if not cluster.get("workerGroupSpecs"):
        problems.append("no workerGroupSpecs")

    for where, group in groups:
        params = group.get("rayStartParams")
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            problems.append(where + ".rayStartParams is not a map of strings")
        pod = group.get("template", {}).get("spec", {})
        containers = pod.get("containers") or []
        if not containers:
            problems.append(where + ": no containers")
        volumes = {v.get("name"): v for v in pod.get("volumes", [])}
        for c in containers:
            cwhere = "%s container %r" % (where, c.get("name"))
            if not isinstance(c.get("name"), str) or not DNS_LABEL.match(c["name"]):
                problems.append(cwhere + ": name is not a DNS-1123 label")
            if not isinstance(c.get("image"), str) or not c["image"]:
                problems.append(cwhere + ": no image")
            resources = c.get("resources", {})
            for kind in ("requests", "limits"):
                for resource, q in (resources.get(kind) or {}).items():
                    if type(q) is not int and not (isinstance(q, str) and QUANTITY.match(q)):
                        problems.append("%s: %s.%s = %r is not a quantity" % (cwhere, kind, resource, q))
            gpu_limit = (resources.get("limits") or {}).get("nvidia.com/gpu")
            gpu_request = (resources.get("requests") or {}).get("nvidia.com/gpu")
            if gpu_request is not None and gpu_request != gpu_limit:
                problems.append(cwhere + ": nvidia.com/gpu requests must equal limits")
            if where != "headGroupSpec" and (type(gpu_limit) is not int or gpu_limit < 1):
                problems.append(cwhere + ": no nvidia.com/gpu limit")
            # Credentials for gs://: the env var names a file on a mounted secret volume.
            env = {e.get("name"): e.get("value") for e in c.get("env", [])}
            path = env.get("GOOGLE_APPLICATION_CREDENTIALS")
            mounts = [m for m in c.get("volumeMounts", [])
                      if path and path.startswith(m.get("mountPath", "").rstrip("/") + "/")]
            if not path:
                problems.append(cwhere + ": no GOOGLE_APPLICATION_CREDENTIALS")
            elif not mounts or "secret" not in volumes.get(mounts[0].get("name"), {}):
                problems.append(cwhere + ": GOOGLE_APPLICATION_CREDENTIALS is not on a mounted secret volume")

    head = cluster["headGroupSpec"].get("rayStartParams") or {}
    if head.get("num-cpus") != "0":
        problems.append("the head would take training workers (rayStartParams num-cpus is not \"0\")")

    try:
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
        RuntimeEnv(**runtime_env)  # Ray's own validation of the fields
    except Exception as e:  # noqa: BLE001 - any rejection is a problem to report
        problems.append("runtimeEnvYAML: %s: %s" % (type(e).__name__, e))
    return problems


def test_rayjob_has_what_kuberay_requires():
    assert rayjob_problems(load("rayjob.yaml")) == []


def _set(path, value):
    def mutate(doc):
        *parents, last = path
        node = doc
        for key in parents:
            node = node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    mutate.__name__ = "%s=%r" % (".".join(map(str, path)), value)
    return mutate


RC = ["spec", "rayClusterSpec"]
HEAD_C = RC + ["headGroupSpec", "template", "spec", "containers", 0]
W0 = RC + ["workerGroupSpecs", 0]
W0_C = W0 + ["template", "spec", "containers", 0]


@pytest.mark.parametrize("mutate", [
    _set(["apiVersion"], "ray.io/v1alpha2"),
    _set(["metadata", "name"], "Rayhooks_Digits"),
    _set(["spec", "entrypoint"], KeyError),
    _set(["spec", "shutdownAfterJobFinishes"], "true"),
    _set(RC + ["headGroupSpec", "rayStartParams", "num-cpus"], 0),
    _set(RC + ["headGroupSpec", "rayStartParams"], KeyError),
    _set(HEAD_C + ["image"], KeyError),
    _set(HEAD_C + ["name"], "Ray Head"),
    _set(HEAD_C + ["resources", "limits", "cpu"], 0.5),
    _set(W0 + ["replicas"], "2"),
    _set(W0 + ["replicas"], 3),
    _set(W0 + ["groupName"], KeyError),
    _set(W0_C + ["resources", "limits", "nvidia.com/gpu"], "one"),
    _set(W0_C + ["resources", "limits", "nvidia.com/gpu"], KeyError),
    _set(W0_C + ["resources", "limits", "memory"], "16 GB"),
    _set(W0_C + ["env"], []),
    _set(W0_C + ["volumeMounts"], []),
    _set(W0 + ["template", "spec", "volumes"], []),
    _set(["spec", "runtimeEnvYAML"], "working_dir: https://example.com/rayhooks.tar\n"),
    _set(["spec", "runtimeEnvYAML"], "config: {setup_timeout_seconds: soon}\n"),
], ids=lambda m: m.__name__)
def test_rayjob_check_catches_a_broken_copy(mutate):
    doc = load("rayjob.yaml")
    mutate(doc)
    assert rayjob_problems(doc)


def test_rayjob_runs_the_example_on_gcs():
    doc = load("rayjob.yaml")
    out = check_example_command(shlex.split(doc["spec"]["entrypoint"]))
    assert out.startswith("gs://"), out
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    # The code: a working_dir archive (Ray puts it on every worker's PYTHONPATH) or rayhooks from pip.
    pip = runtime_env.get("pip", [])
    pip_names = {canonicalize_name(Requirement(p).name) for p in pip}
    wd = runtime_env.get("working_dir", "")
    assert re.match(r"(https?|gs)://.+\.zip$", wd) or "rayhooks" in pip_names, runtime_env
    # rayhooks' dependencies and the example's, except Ray, which the image has.
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    needed = {canonicalize_name(Requirement(r).name)
              for r in project["dependencies"] + project["optional-dependencies"]["examples"]}
    if "rayhooks" not in pip_names:
        assert needed - {"ray"} <= pip_names, sorted(needed - {"ray"} - pip_names)


def test_rayjob_images_match_the_ray_version():
    doc = load("rayjob.yaml")
    version = doc["spec"]["rayClusterSpec"]["rayVersion"]
    images = {c["image"] for _, pod in pod_specs(doc) for c in pod["containers"]}
    assert images == {"rayproject/ray:%s-py311-gpu" % version}, images


def test_rayjob_comments_say_how_to_run():
    text = comments("rayjob.yaml")
    doc = load("rayjob.yaml")
    assert "kubectl apply -f cluster/rayjob.yaml" in text
    secrets = {v["secret"]["secretName"] for _, pod in pod_specs(doc) for v in pod.get("volumes", []) if "secret" in v}
    (secret,) = secrets
    create = [line for line in text.splitlines() if line.startswith("kubectl create secret generic")]
    assert create and shlex.split(create[0])[4] == secret, (create, secret)
    key = os.path.basename(next(e["value"] for e in doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
                                ["spec"]["containers"][0]["env"] if e["name"] == "GOOGLE_APPLICATION_CREDENTIALS"))
    assert "--from-file=%s=" % key in create[0]
    submits = [line for line in text.splitlines() if line.startswith("ray job submit")]
    assert submits
    for line in submits:
        argv = shlex.split(line)
        assert check_example_command(argv[argv.index("--") + 1:]).startswith("gs://")


def test_cluster_readme_gives_the_order():
    with open(os.path.join(CLUSTER, "README.md")) as f:
        text = f.read()
    for name in ALL_FILES:
        assert "`%s`" % name in text
    up, submit, down = (text.index(s) for s in ("ray up cluster/", "ray job submit", "ray down cluster/"))
    assert up < submit < down
    assert "kubectl apply -f cluster/rayjob.yaml" in text
