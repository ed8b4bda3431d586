"""The cluster files users apply as they are: checked against Ray's and KubeRay's own schemas, and run end to end.

Static checks: the launcher YAML against Ray's ``ray-schema.json`` (and its EC2 ``node_config`` against botocore's
RunInstances model), the KubeRay manifests against the v1 CRDs in ``../shared/kuberay-crds`` with unknown keys
rejected, the RayService's Serve config against Serve's schema and ``configs/serve.yaml``, and the Dockerfile against
the pins. End to end: a two-node Ray cluster on loopback with token authentication, and the training and labeling
jobs submitted to it with ``scripts/submit.sh`` (``ray job submit``) as a user would.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
import tomllib
import yaml

from genderrec import cli
from genderrec.config import load_config
from tests.helpers.net import free_ports

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
CRDS = Path(os.environ.get("GENDERREC_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RAY_PIN = next(dep for dep in PYPROJECT["project"]["dependencies"] if dep.startswith("ray[")).split("==")[1]
IMAGE = f"genderrec:{PYPROJECT['project']['version']}"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
MANIFESTS = ("raycluster.yaml", "rayjob-train-all.yaml", "rayjob-label.yaml", "rayservice.yaml")


def read_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def pins() -> dict[str, str]:
    """``name -> version`` of every ``name==version`` pin in pyproject.toml (extras dropped)."""
    deps = [*PYPROJECT["project"]["dependencies"], *sum(PYPROJECT["project"]["optional-dependencies"].values(), [])]
    return {re.sub(r"\[.*\]", "", dep.split("==")[0]): dep.split("==")[1] for dep in deps if "==" in dep}


def run_count(config: Path) -> int:
    cfg = load_config(config)
    return len(cfg.models.architectures) * len(cfg.models.modes)


# --------------------------------------------------------------------------------------------- cluster launcher

LAUNCHER = CLUSTER / "aws-gpu.yaml"


def launcher_schema() -> dict:
    """Ray's own schema, with the provider section closed to the keys it names (Ray leaves it open for plugins)."""
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    schema["properties"]["provider"]["additionalProperties"] = False
    return schema


def check_launcher(config: dict) -> None:
    """What ``ray up`` checks before it calls AWS, plus botocore's RunInstances model for every ``node_config``."""
    import botocore.session
    from botocore.validate import ParamValidator
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, launcher_schema())
    validate_config(prepare_config(copy.deepcopy(config)))
    run_instances = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    for name, node_type in config["available_node_types"].items():
        report = ParamValidator().validate(
            {"MinCount": 1, "MaxCount": 1, **node_type["node_config"]}, run_instances.input_shape
        )
        if report.has_errors():
            raise ValueError(f"node type {name}: {report.generate_report()}")


def test_launcher_config_validates_against_ray_schema():
    check_launcher(read_yaml(LAUNCHER))


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


@pytest.mark.parametrize(
    "misspell",
    [
        lambda c: _rename(c, "max_workers", "max_worker"),
        lambda c: _rename(c["docker"], "image", "imgae"),
        lambda c: _rename(c["provider"], "availability_zone", "availability_zones"),
        lambda c: _rename(c["available_node_types"]["gpu_worker"], "min_workers", "min_worker"),
        lambda c: _rename(c["available_node_types"]["gpu_worker"]["node_config"], "InstanceType", "InstanceTyp"),
        lambda c: c["available_node_types"]["gpu_worker"].update(resources={"GPU": "one"}),
    ],
    ids=["top-level", "docker", "provider", "node-type", "node-config", "resource-value"],
)
def test_launcher_misspelled_key_fails(misspell):
    config = read_yaml(LAUNCHER)
    misspell(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        check_launcher(config)


def test_launcher_gives_each_of_the_ten_runs_a_gpu_and_installs_the_pinned_project():
    config = read_yaml(LAUNCHER)
    seed = load_config(REPO / "configs" / "celeba_seed.yaml")
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["min_workers"] == 0 and worker["resources"]["GPU"] == 1
    assert seed.resources.use_gpu and min(worker["max_workers"], config["max_workers"]) >= run_count(
        REPO / "configs" / "celeba_seed.yaml"
    )
    assert worker["resources"]["CPU"] >= seed.resources.cpus_per_run
    assert config["available_node_types"][config["head_node_type"]]["resources"]["GPU"] == 0
    assert config["docker"]["image"] == f"rayproject/ray:{RAY_PIN}-py311-gpu"
    assert config["file_mounts"]["~/genderrec"] == "." and ".gitignore" in config["rsync_filter"]
    assert any('"$HOME/genderrec[gpu]"' in command for command in config["setup_commands"])
    # Token auth on every node, with the token users generate locally; the SDKs' region is the provider's.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert f"--env AWS_DEFAULT_REGION={config['provider']['region']}" in config["docker"]["run_options"]


# --------------------------------------------------------------------------------------------- KubeRay

OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def closed(schema):
    """Reject keys an object schema does not name: the API server would silently prune them, and the typo with them."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {
        key: ({name: closed(sub) for name, sub in value.items()} if key == "properties" else closed(value))
        for key, value in schema.items()
    }
    if (
        "properties" in result
        and "additionalProperties" not in result
        and not result.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


@functools.cache
def crd_validator(kind: str):
    # libyaml when available: the CRDs are 20,000 lines each.
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    schema = closed({**schema, "properties": {**schema["properties"], "metadata": OBJECT_META}})
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft202012Validator(schema)


def check_manifest(manifest: dict) -> None:
    assert manifest["apiVersion"] == "ray.io/v1"
    errors = sorted(crd_validator(manifest["kind"]).iter_errors(manifest), key=lambda error: list(error.path))
    if errors:
        raise jsonschema.ValidationError(
            "; ".join(f"{'.'.join(map(str, error.path)) or '<top>'}: {error.message}" for error in errors)
        )


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_validates_against_crd(name):
    check_manifest(read_yaml(KUBERAY / name))


def _head_container(manifest: dict) -> dict:
    spec = manifest["spec"].get("rayClusterSpec") or manifest["spec"].get("rayClusterConfig") or manifest["spec"]
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    "name, misspell",
    [
        ("raycluster.yaml", lambda m: _rename(m["spec"], "rayVersion", "rayVerison")),
        ("rayjob-train-all.yaml", lambda m: _rename(m["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinished")),
        ("rayjob-label.yaml", lambda m: _rename(_head_container(m), "imagePullPolicy", "pullPolicy")),
        ("rayservice.yaml", lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replica=2)),
        ("raycluster.yaml", lambda m: m["metadata"].update(nmae="x")),
        ("raycluster.yaml", lambda m: m["spec"]["authOptions"].update(mode="tokens")),
    ],
    ids=["spec", "rayjob", "container", "worker-group", "metadata", "enum-value"],
)
def test_kuberay_unknown_key_fails(name, misspell):
    manifest = read_yaml(KUBERAY / name)
    misspell(manifest)
    with pytest.raises(jsonschema.ValidationError):
        check_manifest(manifest)


def test_kuberay_clusters_are_one_spec_on_the_pinned_ray_and_image():
    cluster = read_yaml(KUBERAY / "raycluster.yaml")["spec"]
    job_specs = [
        read_yaml(KUBERAY / name)["spec"]["rayClusterSpec"] for name in ("rayjob-train-all.yaml", "rayjob-label.yaml")
    ]
    assert job_specs == [cluster, cluster]
    assert read_yaml(KUBERAY / "rayservice.yaml")["spec"]["rayClusterConfig"] == cluster
    assert cluster["rayVersion"] == RAY_PIN and cluster["authOptions"]["mode"] == "token"

    account = read_yaml(KUBERAY / "serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount" and "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        assert [container["image"] for container in pod["containers"]] == [IMAGE]
        assert not any("AWS_SECRET_ACCESS_KEY" in json.dumps(container) for container in pod["containers"])

    (gpu,) = cluster["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    seed = load_config(REPO / "configs" / "celeba_seed.yaml")
    assert limits["nvidia.com/gpu"] == "1" and gpu["maxReplicas"] >= run_count(REPO / "configs" / "celeba_seed.yaml")
    assert float(limits["cpu"]) >= seed.resources.cpus_per_run


def entrypoint_arguments(manifest: dict):
    """The job's command parsed by the real ``genderrec`` parser: the script must exist and call that subcommand."""
    python, script, *arguments = shlex.split(manifest["spec"]["entrypoint"])
    assert python == "python" and (REPO / script).is_file(), script
    subcommand = re.search(r'main\(\["([\w-]+)"', (REPO / script).read_text()).group(1)
    return cli.build_parser().parse_args([subcommand, *arguments])


def test_rayjob_train_all_runs_the_seed_config_from_the_image_working_dir():
    manifest = read_yaml(KUBERAY / "rayjob-train-all.yaml")
    args = entrypoint_arguments(manifest)
    assert args.func is cli.cmd_train_all and args.config == "configs/celeba_seed.yaml"
    load_config(REPO / args.config, args.set or [])
    assert args.celeba_dir.startswith("s3://") and args.storage_path.startswith("s3://")
    assert yaml.safe_load(manifest["spec"]["runtimeEnvYAML"]) == {"working_dir": dockerfile_settings()["WORKDIR"]}


def test_rayjob_label_labels_with_the_selected_model_of_the_train_job():
    args = entrypoint_arguments(read_yaml(KUBERAY / "rayjob-label.yaml"))
    train = entrypoint_arguments(read_yaml(KUBERAY / "rayjob-train-all.yaml"))
    run_name = load_config(REPO / train.config).run.name
    assert args.func is cli.cmd_label
    assert args.model == f"{train.storage_path}/{run_name}/selected"
    assert args.input.startswith("s3://") and args.output.startswith("s3://") and args.gpus_per_actor == 1


def unknown_serve_keys(config: dict) -> list[str]:
    """Keys Serve's schema would silently ignore (it accepts extra keys to stay forward-compatible)."""
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    unknown = [key for key in config if key not in ServeDeploySchema.model_fields]
    unknown += [
        f"http_options.{key}" for key in config.get("http_options", {}) if key not in HTTPOptionsSchema.model_fields
    ]
    for app in config["applications"]:
        unknown += [f"applications.{key}" for key in app if key not in ServeApplicationSchema.model_fields]
    return unknown


def test_rayservice_serves_the_app_of_configs_serve_yaml_from_s3():
    from ray.serve.schema import ServeDeploySchema

    from genderrec import serving

    config = yaml.safe_load(read_yaml(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])
    serving.application(ServeDeploySchema.model_validate(config), "rayservice.yaml")  # our args, strictly
    assert unknown_serve_keys(config) == []
    assert config["http_options"]["host"] == "0.0.0.0"

    local = read_yaml(REPO / "configs" / "serve.yaml")
    assert config["http_options"]["port"] == local["http_options"]["port"]
    assert config["logging_config"] == local["logging_config"]
    assert len(config["applications"]) == len(local["applications"])
    for cluster_app, local_app in zip(config["applications"], local["applications"], strict=True):
        assert {**cluster_app, "args": None} == {**local_app, "args": None}
        cluster_args, local_args = dict(cluster_app["args"]), dict(local_app["args"])
        assert cluster_args.pop("model").startswith("s3://")
        local_args.pop("model")
        assert cluster_args == local_args


def test_unknown_serve_key_is_found():
    config = yaml.safe_load(read_yaml(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])
    config["applications"][0]["import_pth"] = config["applications"][0].pop("import_path")
    config["http_option"] = config.pop("http_options")
    assert unknown_serve_keys(config) == ["http_option", "applications.import_pth"]


# --------------------------------------------------------------------------------------------- image and configs


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_settings() -> dict[str, str]:
    instructions = dockerfile_instructions()
    settings = {key: value for key, value in instructions if key in ("FROM", "WORKDIR")}
    settings.update(value.split("=", 1) for key, value in instructions if key == "ENV")
    return settings


def test_dockerfile_builds_the_pinned_project_with_staged_weights():
    instructions = dockerfile_instructions()
    settings = dockerfile_settings()
    assert settings["FROM"] == f"rayproject/ray:{RAY_PIN}-py311-gpu"
    assert settings["WORKDIR"].startswith("/home/ray/")
    for key, value in instructions:
        if key == "COPY":
            *sources, _ = [part for part in value.split() if not part.startswith("--")]
            assert all((REPO / source).exists() for source in sources), value
    runs = [value for key, value in instructions if key == "RUN"]
    assert 'pip install --no-cache-dir ".[gpu]"' in runs
    # The extra adds CUDA to exactly the pinned TensorFlow.
    assert PYPROJECT["project"]["optional-dependencies"]["gpu"] == [f"tensorflow[and-cuda]=={pins()['tensorflow']}"]
    assert runs.index("python cluster/stage_weights.py") > runs.index('pip install --no-cache-dir ".[gpu]"')
    assert settings["KERAS_HOME"].startswith("/home/ray/")
    copied = " ".join(value for key, value in instructions if key == "COPY")
    assert "jobs/" in copied and "configs/" in copied
    # The build command the Dockerfile documents tags the image the manifests run.
    assert f"-t {IMAGE} ." in (CLUSTER / "Dockerfile").read_text()


def test_project_wheel_ships_every_module_and_the_serving_page(tmp_path):
    """What ``pip install .`` puts in the image (a wheel, not this checkout): the Serve page must be in it."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "genderrec", source / "genderrec", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", tmp_path, source],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("genderrec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {path.relative_to(REPO).as_posix() for path in (REPO / "genderrec").rglob("*") if path.is_file()}
    expected = {name for name in expected if "__pycache__" not in name}
    assert "genderrec/static/index.html" in expected and expected <= names, expected - names


def test_cluster_smoke_config_uses_s3_and_imagenet_on_one_gpu_per_run(monkeypatch):
    for variable in ("CELEBA_DIR", "RUNS_URI", "GOOGLENET_WEIGHTS"):
        monkeypatch.delenv(variable, raising=False)
    cfg = load_config(REPO / "configs" / "cluster_smoke.yaml")
    assert cfg.data.celeba_dir.startswith("s3://") and cfg.run.storage_path.startswith("s3://")
    assert cfg.models.weights_for("resnet50") == "imagenet" and cfg.resources.use_gpu
    worker = read_yaml(LAUNCHER)["available_node_types"]["gpu_worker"]
    assert cfg.resources.cpus_per_run <= worker["resources"]["CPU"]
    assert cfg.resources.max_concurrent_trials >= run_count(REPO / "configs" / "cluster_smoke.yaml")


def test_submit_without_a_token_says_where_to_put_one(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    result = subprocess.run(
        [REPO / "scripts" / "submit.sh", "--", "python", "-V"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "no Ray auth token" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr


# --------------------------------------------------------------------------------------------- end to end


class LoopbackCluster:
    """Two ``ray start`` nodes on 127.0.0.1 with token auth, in a private temp dir, owned (and stopped) by this test.

    Every process of the cluster carries ``GENDERREC_TEST_CLUSTER=<its temp dir>`` in its environment; stopping kills
    the nodes' process groups and then any process with that marker, and nothing else on the machine.
    """

    START_TIMEOUT_S = 300

    def __init__(self):
        # Short: Ray's Unix socket paths live under it and must stay below 108 characters.
        self.root = Path(tempfile.mkdtemp(prefix="grc-", dir="/tmp"))
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = {
            **{key: value for key, value in os.environ.items() if not key.startswith("RAY_")},
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
            "GENDERREC_TEST_CLUSTER": str(self.root),
        }
        self.nodes: list[subprocess.Popen] = []
        self.dashboard = ""

    def start(self) -> None:
        gcs, dashboard, client, head_agent, worker_agent = free_ports(5)
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        common = [
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "2",
            "--min-worker-port",
            "0",
            "--max-worker-port",
            "0",
        ]
        self._start(
            "head",
            [
                "--head",
                f"--port={gcs}",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={head_agent}",
                *common,
            ],
        )
        self._start("worker", [f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={worker_agent}", *common])

    def _start(self, name: str, arguments: list[str]) -> None:
        log = self.root / f"{name}.log"
        with log.open("w") as out:
            node = subprocess.Popen(
                ["nice", "-n", "19", "ray", "start", "--block", f"--temp-dir={self.root / name}", *arguments],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the node and every process it starts
            )
        self.nodes.append(node)
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while "Ray runtime started" not in log.read_text():
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start ({name}) did not start:\n{log.read_text()[-3000:]}")
            time.sleep(2)

    def ray(self, *arguments: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["nice", "-n", "19", "ray", *arguments],
            env=env or self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, *command: str, timeout: float = 1200) -> subprocess.CompletedProcess:
        """``scripts/submit.sh --working-dir . -- <command>`` from the repository root, as the README says."""
        env = {**self.env, "RAY_ADDRESS": self.dashboard}
        return subprocess.run(
            ["nice", "-n", "19", REPO / "scripts" / "submit.sh", "--working-dir", ".", "--", *command],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def state(self, resource: str, *arguments: str) -> list[dict]:
        result = self.ray("list", resource, f"--address={self.dashboard}", "--format=json", "--limit=10000", *arguments)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=60)
            deadline = time.monotonic() + 30
            with contextlib.suppress(ProcessLookupError):
                while time.monotonic() < deadline:  # until the last of the group is gone (or reaped)
                    os.killpg(node.pid, 0)
                    time.sleep(0.5)
        marker = f"GENDERREC_TEST_CLUSTER={self.root}".encode()
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass  # gone, or not ours to read
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def loopback_cluster():
    cluster = LoopbackCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def job_output(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-3000:]}"


@pytest.mark.cluster
def test_jobs_submitted_to_a_two_node_cluster(loopback_cluster, celeba_dir, tmp_path):
    cluster = loopback_cluster
    nodes = cluster.state("nodes")
    assert len(nodes) == 2 and all(node["state"] == "ALIVE" for node in nodes)

    # The newcomer's first submit: plain `ray job submit` without RAY_AUTH_MODE is refused.
    unauthenticated = {key: value for key, value in cluster.env.items() if not key.startswith("RAY_AUTH")}
    refused = cluster.ray("job", "list", f"--address={cluster.dashboard}", env=unauthenticated, timeout=300)
    assert refused.returncode != 0 and "Unauthorized" in refused.stderr + refused.stdout

    # Two runs of 1.5 CPUs on nodes of 2 CPUs each: they can only train at the same time on different nodes.
    runs = tmp_path / "runs"
    train = cluster.submit(
        *("python", "jobs/train_all.py", "--config", "configs/tiny.yaml"),
        *("--celeba-dir", str(celeba_dir), "--storage-path", str(runs)),
        *("--set", "models.architectures=[googlenet]", "--set", "resources.cpus_per_run=1.5"),
        *("--set", "resources.max_concurrent_trials=2", "--set", "run.name=cluster"),
    )
    assert train.returncode == 0 and "succeeded" in train.stdout, job_output(train)
    run_dir = runs / "cluster"
    board = pd.read_parquet(run_dir / "leaderboard.parquet")
    assert sorted(board["mode"]) == ["fine_tune", "transfer"] and board["test_accuracy"].between(0, 1).all()
    assert (run_dir / "selected" / "model.keras").is_file() and (run_dir / "selected" / "card.json").is_file()

    train_workers = cluster.state("actors", "--detail", "--filter", "class_name=RayTrainWorker")
    assert len(train_workers) >= 2
    assert {actor["node_id"] for actor in train_workers} == {node["node_id"] for node in nodes}

    labels = tmp_path / "labels"
    label = cluster.submit(
        *("python", "jobs/label.py", "--model", str(run_dir / "selected")),
        *("--input", str(run_dir / "manifest.parquet"), "--output", str(labels)),
    )
    assert label.returncode == 0 and "succeeded" in label.stdout, job_output(label)
    labeled = pd.read_parquet(labels)
    faces = pd.read_parquet(run_dir / "manifest.parquet")
    assert sorted(labeled["image_uri"]) == sorted(faces["image_uri"])
    assert labeled["error"].isna().all() and labeled["p_male"].between(0, 1).all()
    assert set(labeled["label"]) <= {"female", "male"}
