"""The Ray cluster configs in cluster/: offline checks (no cloud, no network, no Ray start).

- The checked-in files are exactly what cluster/generate.py renders (they cannot drift).
- The launcher configs validate against Ray's own cluster-config JSON schema
  (ray/autoscaler/ray-schema.json of the installed, pinned Ray), and pass
  ``prepare_config`` + ``validate_config`` as ``ray up`` runs them before it
  touches a cloud.
- The KubeRay manifest has the RayCluster structure KubeRay needs.
- Every ``pkg==version`` in cluster/ is pyproject.toml's pin, and the Ray image
  is the pinned Ray.
- MLflow is never bound to 0.0.0.0: not in the files, not in Ray's defaults the
  launcher merges in, and node.sh refuses such an address at run time.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = ("aws-gpu.yaml", "gcp-gpu.yaml")
KUBERAY = "kuberay-raycluster.yaml"
SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
NODE_SH = CLUSTER / "node.sh"
PIN_RE = re.compile(r"(?<![\w.\-\[])([A-Za-z0-9][A-Za-z0-9_.\-]*)(\[[^\]\s]*\])?==([0-9][^\s'\",;)\]]*)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = PIN_RE.fullmatch(dep.replace(" ", ""))
        if m:
            pins[_norm(m.group(1))] = m.group(3)
    return pins


def _generator():
    spec = importlib.util.spec_from_file_location("raymix_cluster_generate", CLUSTER / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


# -- generator ---------------------------------------------------------------------------------


def test_checked_in_files_are_the_generators_output(tmp_path):
    gen = _generator()
    written = gen.write(tmp_path)
    assert sorted(p.name for p in written) == sorted(gen.FILES)
    for path in written:
        checked_in = CLUSTER / path.name
        assert checked_in.is_file(), f"{checked_in} is missing: run python cluster/generate.py"
        assert checked_in.read_text() == path.read_text(), (
            f"cluster/{path.name} differs from cluster/generate.py's output: edit the template and "
            "run python cluster/generate.py")
    assert sorted(p.name for p in CLUSTER.glob("*.yaml")) == sorted(gen.FILES), "stray YAML in cluster/"
    assert gen.main(["--check"]) == 0


def test_generator_overrides_and_refusals(tmp_path):
    gen = _generator()
    out = gen.render({"aws_bucket": "s3://my-bucket/raymix", "max_workers_1x": "4"})
    aws = yaml.safe_load(out["aws-gpu.yaml"])
    assert aws["available_node_types"]["gpu-1x"]["max_workers"] == 4
    assert "RAYMIX_ARTIFACTS=s3://my-bucket/raymix/mlflow-artifacts" in " ".join(aws["head_setup_commands"])
    with pytest.raises(SystemExit, match="unknown variable"):
        gen.render({"aws_bukket": "s3://x"})
    with pytest.raises(SystemExit, match="whole number"):
        gen.render({"max_workers_8x": "two"})
    (tmp_path / "aws-gpu.yaml").write_text("stale\n")
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1


# -- launcher configs against Ray's schema ------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_validates_against_rays_schema(name, schema):
    config = _load(name)
    jsonschema.validate(config, schema)
    # What `ray up` does before any cloud call: merge the provider's defaults.yaml, then validate.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_setup_commands"] == config["setup_commands"] + config["head_setup_commands"]
    assert prepared["worker_setup_commands"] == config["setup_commands"] + config["worker_setup_commands"]
    # Ray's defaults start the dashboard on 0.0.0.0: ours must replace every default command.
    assert "0.0.0.0" not in json.dumps(prepared)


def test_the_schema_check_has_teeth(schema):
    config = _load("aws-gpu.yaml")
    bad_key = copy.deepcopy(config) | {"head_setup_comands": []}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_key, schema)
    bad_resources = copy.deepcopy(config)
    bad_resources["available_node_types"]["gpu-1x"]["resources"]["GPU"] = "1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_resources, schema)
    bad_head = copy.deepcopy(config) | {"head_node_type": "nope"}
    with pytest.raises(ValueError):
        validate_config(prepare_config(bad_head))


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_node_types(name):
    config = _load(name)
    provider = config["provider"]["type"]
    assert provider == name.split("-")[0]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"] and head["resources"]["CPU"] > 0
    workers = {k: t for k, t in types.items() if k != config["head_node_type"]}
    assert sorted(t["resources"]["GPU"] for t in workers.values()) == [1, 8]
    for key, t in workers.items():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, key
        assert t["resources"]["CPU"] >= 8, key
        if provider == "gcp":
            (acc,) = t["node_config"]["guestAccelerators"]
            assert acc["acceleratorCount"] == t["resources"]["GPU"]
            assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    one = next(t for t in workers.values() if t["resources"]["GPU"] == 1)["node_config"]
    if provider == "aws":
        assert one["InstanceMarketOptions"]["MarketType"] == "spot"
    else:
        assert one["scheduling"]["provisioningModel"] == "SPOT"


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_installs_the_checkout_and_wires_mlflow(name):
    config = _load(name)
    assert config["file_mounts"] == {"/home/ray/raymix": "."}
    assert ".gitignore" in config["rsync_filter"]
    setup = " && ".join(config["setup_commands"])
    assert "node.sh install" in setup
    assert "node.sh env head" in " ".join(config["head_setup_commands"])
    assert "node.sh env worker" in " ".join(config["worker_setup_commands"])
    head_start = config["head_start_ray_commands"]
    assert any("ray start --head" in c for c in head_start)
    assert head_start[-1].endswith("node.sh mlflow")
    assert all("source ~/raymix.env" in c for c in head_start + config["worker_start_ray_commands"]
               if "ray start" in c)
    head_env = " ".join(config["head_setup_commands"])
    assert "RAYMIX_MLFLOW_DB=sqlite:////home/ray/mlflow/mlflow.db" in head_env
    bucket = "s3://" if name.startswith("aws") else "gs://"
    assert f"RAYMIX_ARTIFACTS={bucket}" in head_env and f"RAYMIX_STORAGE={bucket}" in head_env
    assert "-v /var/lib/raymix/mlflow:/home/ray/mlflow" in config["docker"]["head_run_options"]


def test_node_sh_installs_editable_with_the_pins():
    text = NODE_SH.read_text()
    assert re.search(r'pip install [^\n]*-e "\$RAYMIX_REPO"', text)
    assert "tomllib" in text and "SpecifierSet" in text  # the installed versions are checked against the pins
    subprocess.run(["bash", "-n", str(NODE_SH)], check=True)


# -- KubeRay -------------------------------------------------------------------------------------


def test_kuberay_manifest_structure():
    docs = list(yaml.safe_load_all((CLUSTER / KUBERAY).read_text()))
    (rc,) = [d for d in docs if d and d.get("kind") == "RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    spec = rc["spec"]
    assert spec["rayVersion"] == _pyproject_pins()["ray"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    (head_c,) = head["template"]["spec"]["containers"]
    assert head_c["image"] and head_c["name"] == "ray-head"
    assert "node.sh mlflow" in head_c["args"][0] and head_c["args"][0].endswith("$KUBERAY_GEN_RAY_START_CMD")
    assert {"containerPort": 5000, "name": "mlflow"} in head_c["ports"]
    head_env = {e["name"]: e for e in head_c["env"]}
    assert head_env["RAYMIX_MLFLOW_HOST"]["value"] == "$(POD_IP)"
    assert head_env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    claims = {d["metadata"]["name"]: d for d in docs if d and d.get("kind") == "PersistentVolumeClaim"}
    head_vols = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in head_c["volumeMounts"]}
    assert head_vols[mounts["/home/ray/mlflow"]]["persistentVolumeClaim"]["claimName"] in claims
    groups = spec["workerGroupSpecs"]
    assert sorted(len(g["template"]["spec"]["containers"]) for g in groups) == [1, 1]
    gpus = []
    for g in groups:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams"} <= set(g), g["groupName"]
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] >= 1
        (c,) = g["template"]["spec"]["containers"]
        limits = c["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert c["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        gpus.append(int(limits["nvidia.com/gpu"]))
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["RAYMIX_MLFLOW_HOST"] == f"{rc['metadata']['name']}-head-svc"
        assert c["image"] == head_c["image"]
        vols = {v["name"]: v for v in g["template"]["spec"]["volumes"]}
        shared = {m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/mnt/raymix"}
        (claim,) = [vols[n]["persistentVolumeClaim"]["claimName"] for n in shared]
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert sorted(gpus) == [1, 8]


# -- pins ----------------------------------------------------------------------------------------


def test_every_pin_in_cluster_files_is_pyprojects_pin():
    pins = _pyproject_pins()
    found = []
    for path in _cluster_files():
        for m in PIN_RE.finditer(path.read_text()):
            name, version = _norm(m.group(1)), m.group(3)
            found.append((path.name, name, version))
            assert name in pins, f"{path.name}: {m.group(0)} pins a package pyproject.toml does not pin"
            assert version == pins[name], f"{path.name}: {m.group(0)} but pyproject.toml pins {name}=={pins[name]}"
    assert {n for _, n, _ in found} >= set(pins), "the generated headers list every pyproject pin"


def test_ray_image_is_the_pinned_ray():
    ray_pin = _pyproject_pins()["ray"]
    images = set()
    for path in CLUSTER.glob("*.yaml"):
        images |= set(re.findall(r"rayproject/ray(?:-ml)?:([\w.\-]+)", path.read_text()))
    assert images and all(tag.split("-")[0] == ray_pin for tag in images), images
    for name in LAUNCHER:
        assert _load(name)["docker"]["image"] == f"rayproject/ray:{ray_pin}-py311-gpu"


# -- MLflow binding --------------------------------------------------------------------------------


def test_no_wildcard_bind_anywhere_in_cluster():
    for path in _cluster_files():
        text = path.read_text()
        assert "0.0.0.0" not in text, path.name
        assert not re.search(r"--host[= ]+['\"]?(0\.0\.0\.0|::|\*)", text), path.name
    server = [line for line in NODE_SH.read_text().splitlines() if "--host" in line]
    assert server and all('--host "$host"' in line for line in server)
    assert 'check_private "$host"' in NODE_SH.read_text()


def _node_sh(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
            "RAYMIX_SHARED": str(tmp_path / "shared"), "RAYMIX_REPO": str(REPO)}
    return subprocess.run(["bash", str(NODE_SH), *args], env=base | env, capture_output=True, text=True,
                          timeout=60)


def test_node_sh_env_points_workers_at_the_head(tmp_path):
    r = _node_sh(["env", "worker"], tmp_path, RAY_HEAD_IP="10.1.2.3", RAYMIX_STORAGE="s3://b/ray-storage")
    assert r.returncode == 0, r.stderr
    env = (tmp_path / "raymix.env").read_text()
    assert "export MLFLOW_TRACKING_URI=http://10.1.2.3:5000" in env
    assert f"export RAYMIX_CACHE={tmp_path}/shared/cache" in env
    assert "export RAYMIX_STORAGE=s3://b/ray-storage" in env
    assert "raymix.env" in (tmp_path / ".bashrc").read_text()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "127.0.0.1", "8.8.8.8", "mlflow.example.com"])
def test_node_sh_refuses_to_bind_mlflow_off_a_private_address(tmp_path, host):
    r = _node_sh(["env", "head"], tmp_path, RAYMIX_MLFLOW_HOST=host, RAYMIX_ARTIFACTS="s3://b/a")
    assert r.returncode != 0 and "MLflow" in r.stderr
    assert not (tmp_path / "raymix.env").exists()


def test_node_sh_head_env_and_placeholders(tmp_path):
    r = _node_sh(["env", "head"], tmp_path, RAYMIX_MLFLOW_HOST="10.0.0.7", RAYMIX_ARTIFACTS="gs://b/mlflow")
    assert r.returncode == 0, r.stderr
    env = (tmp_path / "raymix.env").read_text()
    assert "export MLFLOW_TRACKING_URI=http://10.0.0.7:5000" in env
    assert "export RAYMIX_MLFLOW_DB=sqlite:////home/ray/mlflow/mlflow.db" in env
    r = _node_sh(["env", "head"], tmp_path, RAYMIX_MLFLOW_HOST="10.0.0.7",
                 RAYMIX_ARTIFACTS="s3://CHANGE-ME-raymix-bucket/mlflow-artifacts")
    assert r.returncode != 0 and "placeholder" in r.stderr
    r = _node_sh(["check-shared"], tmp_path)
    assert r.returncode != 0 and "shared filesystem" in r.stderr


def test_node_sh_data_fetches_only_the_spaces_task_files(tmp_path):
    src = tmp_path / "ni"
    (src / "tasks").mkdir(parents=True)
    for t in ("task001_a", "task002_b", "task003_c"):
        (src / "tasks" / f"{t}.json").write_text(json.dumps({"Definition": [t]}))
    (src / "README.md").write_text("ni\n")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(src)], check=True)
    subprocess.run([*git, "-C", str(src), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(src), "commit", "-qm", "tasks"], check=True)
    tasks_dir = tmp_path / "data" / "natural-instructions" / "tasks"
    space = tmp_path / "space.yaml"

    def write_space(tasks):
        space.write_text(yaml.safe_dump({"name": "t", "grid": {"seed": [0]}, "base": {"data.sources": [
            {"kind": "natural_instructions", "path": str(tasks_dir), "tasks": tasks}]}}))

    write_space(["task001_a", "task003_c"])
    r = _node_sh(["data", str(space)], tmp_path, RAYMIX_NI_REPO=src.as_uri())
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tasks_dir.iterdir()) == ["task001_a.json", "task003_c.json"]
    write_space(["task001_a", "task002_b"])  # a later space adds a task: the clone is reused
    r = _node_sh(["data", str(space)], tmp_path, RAYMIX_NI_REPO=src.as_uri())
    assert r.returncode == 0, r.stderr
    assert (tasks_dir / "task002_b.json").is_file()
    r = _node_sh(["data", str(space)], tmp_path, RAYMIX_NI_REPO=src.as_uri())
    assert r.returncode == 0 and "already in" in r.stdout
