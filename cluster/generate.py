"""Renders raymix's Ray cluster configs from one template: this file.

    python cluster/generate.py                     # rewrite the checked-in files in cluster/
    python cluster/generate.py --set aws_bucket=s3://my-bucket/raymix \\
        --set aws_nfs=fs-0123456789abcdef0.efs.us-west-2.amazonaws.com:/ --out ~/raymix-cluster
    python cluster/generate.py --check             # exit 1 when the checked-in files are stale
    python cluster/generate.py --list              # the template variables and their defaults

Writes ``aws-gpu.yaml`` and ``gcp-gpu.yaml`` (Ray cluster launcher: ``ray up``)
and ``kuberay-raycluster.yaml`` (a KubeRay ``RayCluster`` with its two
PersistentVolumeClaims: ``kubectl apply -f``). All three share what this file
defines once: the Ray image (``rayproject/ray:<ray pin>-py311-gpu``, so the
image follows pyproject.toml's pin of ray), the node steps of
``cluster/node.sh`` (install raymix with ``pip install -e`` so that exactly
pyproject.toml's pins apply, write the node's environment, fetch the task data,
start MLflow), the shared filesystem layout and the MLflow server. The
checked-in files are this script's output with the defaults below; values with
``CHANGE-ME`` are placeholders that node.sh refuses, so render your own copy
with ``--set`` (and ``--out``) rather than editing the generated files
(tests/test_cluster.py fails when they differ from this script's output).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FILES = ("aws-gpu.yaml", "gcp-gpu.yaml", "kuberay-raycluster.yaml")

# Template variables: name -> (default, description). --set name=value overrides.
VARIABLES: dict[str, tuple[str, str]] = {
    "cluster_name": ("raymix", "Ray cluster name (KubeRay: the RayCluster, its head service is NAME-head-svc)"),
    "max_workers_1x": ("16", "most 1-GPU worker nodes"),
    "max_workers_8x": ("2", "most 8-GPU worker nodes"),
    "mlflow_db": ("sqlite:////home/ray/mlflow/mlflow.db",
                  "MLflow backend store (RAYMIX_MLFLOW_DB); a postgresql://user@host:5432/db URI for RDS or "
                  "Cloud SQL, with its password in the head's ~/.pgpass"),
    "ni_repo": ("https://github.com/allenai/natural-instructions.git",
                "Natural Instructions repository the head sparse-clones the spaces' task files from "
                "(empty: fetch nothing)"),
    "aws_region": ("us-west-2", "AWS region"),
    "aws_zones": ("us-west-2a,us-west-2b", "availability zones (the EFS needs a mount target in each)"),
    "aws_ami": ("resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id",
                "AMI with Docker, the NVIDIA driver and container toolkit (an AMI id or an SSM parameter)"),
    "aws_bucket": ("s3://CHANGE-ME-raymix-bucket", "S3 prefix: MLflow artifacts and RAYMIX_STORAGE go under it"),
    "aws_nfs": ("CHANGE-ME-fs-0123456789abcdef0.efs.us-west-2.amazonaws.com:/",
                "EFS (NFS 4.1) export mounted at /mnt/raymix on every node"),
    "gcp_project": ("CHANGE-ME-project-id", "GCP project id"),
    "gcp_region": ("us-central1", "GCP region"),
    "gcp_zone": ("us-central1-a", "GCP zone (with A100 capacity)"),
    "gcp_image": ("projects/deeplearning-platform-release/global/images/family/common-cu124-ubuntu-2204-py310",
                  "boot image with Docker and the NVIDIA container toolkit (a Deep Learning VM family)"),
    "gcp_bucket": ("gs://CHANGE-ME-raymix-bucket", "GCS prefix: MLflow artifacts and RAYMIX_STORAGE go under it"),
    "gcp_nfs": ("CHANGE-ME-10.0.0.2:/raymix", "Filestore (NFS) export mounted at /mnt/raymix on every node"),
    "k8s_bucket": ("s3://CHANGE-ME-raymix-bucket",
                   "s3:// or gs:// prefix for MLflow artifacts and RAYMIX_STORAGE (the head pod's service "
                   "account needs write access: IRSA or Workload Identity)"),
    "k8s_rwx_storage_class": ("CHANGE-ME-rwx-storage-class",
                              "StorageClass of the ReadWriteMany claim shared by all pods (EFS, Filestore, ...)"),
    "k8s_rwo_storage_class": ("", "StorageClass of the head's MLflow claim (empty: the cluster's default)"),
    "repo_url": ("https://github.com/CHANGE-ME/raymix.git", "git URL KubeRay pods clone raymix from"),
    "repo_ref": ("main", "branch or tag of repo_url to clone"),
}

PYTHON_TAG = "py311"
REMOTE_REPO = "/home/ray/raymix"
SHARED = "/mnt/raymix"
DATA = "/mnt/data"  # where tune_spaces/adapt_paper.yaml expects natural-instructions/tasks
MLFLOW_DIR = "/home/ray/mlflow"
MLFLOW_PORT = 5000
NODE = f"bash {REMOTE_REPO}/cluster/node.sh"
RAY_START_HEAD = ("ray start --head --port=6379 --object-manager-port=8076 "
                  "--autoscaling-config=~/ray_bootstrap_config.yaml")
RAY_START_WORKER = "ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076"


def pins(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """pyproject.toml's exact pins: package name (lower case) -> requirement as written."""
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*", dep)
        if m:
            out[m.group(1).lower()] = dep.replace(" ", "")
    return out


def ray_image(pinned: dict[str, str]) -> str:
    return f"rayproject/ray:{pinned['ray'].split('==')[1]}-{PYTHON_TAG}-gpu"


def env_prefix(env: dict[str, str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


def header(title: str, usage: list[str], notes: list[str], pinned: dict[str, str], values: dict[str, str],
           names: list[str]) -> str:
    lines = [f"# {title}", "#",
             "# GENERATED by cluster/generate.py from its one template: do not edit; render your own copy",
             "# with `python cluster/generate.py --set NAME=VALUE --out DIR` (CHANGE-ME values are",
             "# placeholders the nodes refuse). tests/test_cluster.py checks this file is current.", "#"]
    lines += [f"# {u}" if u else "#" for u in usage]
    lines.append("#")
    for n in notes:
        lines += [f"# {w}".rstrip() for w in _wrap(n)]
    lines += ["#", "# Template variables used here (value: description):"]
    for name in names:
        lines.append(f"#   {name} = {values[name] or '(empty)'}")
        lines += [f"# {w}" for w in _wrap(VARIABLES[name][1], "      ")]
    lines += ["#", "# raymix is installed with `pip install -e` from the checkout, so exactly pyproject.toml's pins",
              "# apply, and node.sh checks the installed versions against them:"]
    lines += [f"#   {p}" for p in pinned.values()]
    lines.append(f"# The image's Ray ({ray_image(pinned)}) is the pinned one.")
    return "\n".join(lines) + "\n"


COMMON_NOTES = [
    "MLflow: the head runs `mlflow server` bound to its PRIVATE address (node.sh refuses the unspecified, "
    "loopback and public addresses), port 5000, backend store RAYMIX_MLFLOW_DB, artifacts proxied to the "
    "bucket (--artifacts-destination), so only the head needs bucket credentials. Every node gets "
    "MLFLOW_TRACKING_URI=http://<head private address>:5000 in ~/raymix.env, which `ray start`, and hence "
    "every Ray worker, job driver and trial, inherits.",
    "Shared filesystem: raymix's pool cache (RAYMIX_CACHE), Hugging Face downloads (HF_HOME), sweep outputs "
    f"(RAYMIX_OUTPUT_ROOT) and the task data ({DATA}) live under {SHARED}, the same on every node: raymix "
    "writes tokenised shards and reads them from the nodes that train, so node-local disks do not work for "
    f"a multi-node sweep. Give sweeps `--output {SHARED}/runs/NAME`.",
    "RAYMIX_STORAGE: a bucket URI for Ray storage (checkpoints, Tune and Train state), exported on every "
    "node. raymix 0.1.0 does not read it yet: its sweep puts Tune's and Train's storage_path under --output "
    "(hence the shared filesystem); pass RAYMIX_STORAGE as storage_path once raymix takes one.",
]


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, width=98, initial_indent=indent, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False) or [indent]


def launcher_config(provider: str, v: dict[str, str], pinned: dict[str, str]) -> tuple[dict[str, Any], str]:
    """Ray cluster-launcher config (``ray up``) for ``aws`` or ``gcp``, and its header."""
    bucket = v[f"{provider}_bucket"].rstrip("/")
    nfs = v[f"{provider}_nfs"]
    if provider == "aws":
        fstype, nfs_opts = "nfs4", "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport"
        pip_extra = "boto3"  # the AWS node provider (autoscaler) and MLflow's S3 artifact store
    else:
        fstype, nfs_opts = "nfs", "hard,timeo=600,retrans=3,rsize=1048576,wsize=1048576"
        # the GCP node provider (autoscaler) and MLflow's GCS artifact store
        pip_extra = "google-api-python-client google-cloud-storage"
    common = {"RAYMIX_REPO": REMOTE_REPO, "RAYMIX_SHARED": SHARED, "RAYMIX_STORAGE": f"{bucket}/ray-storage"}
    head_env = common | {"RAYMIX_ARTIFACTS": f"{bucket}/mlflow-artifacts", "RAYMIX_MLFLOW_DB": v["mlflow_db"],
                         "RAYMIX_MLFLOW_PORT": str(MLFLOW_PORT)}
    worker_env = common | {"RAYMIX_MLFLOW_PORT": str(MLFLOW_PORT)}
    host_dirs = f"{SHARED} {SHARED}/data /var/lib/raymix/mlflow"
    initialization_commands = [
        # On the host, before Docker: the shared filesystem (also in fstab, for restarts of stopped
        # nodes, which skip these commands) and the head's MLflow directory on its boot disk.
        f"case {shlex.quote(nfs)} in *CHANGE-ME*) echo 'raymix: error: {provider}_nfs is a placeholder: "
        f"render this file with --set {provider}_nfs=...' >&2; exit 1;; esac",
        "command -v mount.nfs >/dev/null || (sudo apt-get -o DPkg::Lock::Timeout=600 update -y "
        "&& sudo apt-get -o DPkg::Lock::Timeout=600 install -y nfs-common)",
        f"sudo mkdir -p {SHARED} && (mountpoint -q {SHARED} || sudo mount -t {fstype} -o {nfs_opts} "
        f"{shlex.quote(nfs)} {SHARED})",
        f"grep -qs ' {SHARED} ' /etc/fstab || echo {shlex.quote(f'{nfs} {SHARED} {fstype} {nfs_opts},_netdev,nofail 0 0')}"
        " | sudo tee -a /etc/fstab",
        f"sudo mkdir -p {host_dirs} && sudo chown 1000:100 {host_dirs} && sudo touch {SHARED}/.raymix-shared",
    ]
    if provider == "aws":
        ami = v["aws_ami"]

        def disk(gb: int) -> list[dict[str, Any]]:
            return [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": gb, "VolumeType": "gp3"}}]

        node_types: dict[str, Any] = {
            "head": {
                "resources": {"CPU": 8},
                "node_config": {"InstanceType": "m6i.2xlarge", "ImageId": ami, "BlockDeviceMappings": disk(200)},
            },
            "gpu-1x": {  # 1x NVIDIA L40S 48 GB, 8 vCPU: one adapt_paper trial (1 GPU, 4 CPUs) per node
                "min_workers": 0, "max_workers": int(v["max_workers_1x"]),
                "resources": {"CPU": 8, "GPU": 1},
                "node_config": {"InstanceType": "g6e.2xlarge", "ImageId": ami, "BlockDeviceMappings": disk(300),
                                "InstanceMarketOptions": {"MarketType": "spot"}},
            },
            "gpu-8x": {  # 8x NVIDIA A100 40 GB, 96 vCPU; on-demand: spot p4d capacity is rare
                "min_workers": 0, "max_workers": int(v["max_workers_8x"]),
                "resources": {"CPU": 96, "GPU": 8},
                "node_config": {"InstanceType": "p4d.24xlarge", "ImageId": ami, "BlockDeviceMappings": disk(500)},
            },
        }
        provider_cfg = {"type": "aws", "region": v["aws_region"], "availability_zone": v["aws_zones"],
                        "cache_stopped_nodes": True}
        names = ["cluster_name", "max_workers_1x", "max_workers_8x", "aws_region", "aws_zones", "aws_ami",
                 "aws_bucket", "aws_nfs", "mlflow_db", "ni_repo"]
        title = "raymix on AWS: CPU head (m6i.2xlarge), spot 1-GPU workers (g6e.2xlarge), 8-GPU workers (p4d.24xlarge)."
        db_note = ("The default SQLite store is on the head's EBS boot disk (bind-mounted at /home/ray/mlflow): it "
                   "survives `ray down` (cache_stopped_nodes: the head is stopped, not terminated) but not the "
                   "head's termination; for a store that outlives it use RDS PostgreSQL (mlflow_db). The head "
                   "writes artifacts to S3 with the instance role Ray gives it (AmazonS3FullAccess).")
        tunnel_key = f"~/.ssh/ray-autoscaler_{v['aws_region']}.pem"
    else:
        zone = v["gcp_zone"]

        def gdisk(gb: int) -> list[dict[str, Any]]:
            return [{"boot": True, "autoDelete": True, "type": "PERSISTENT",
                     "initializeParams": {"diskSizeGb": gb, "diskType": f"zones/{zone}/diskTypes/pd-balanced",
                                          "sourceImage": v["gcp_image"]}}]

        driver = {"items": [{"key": "install-nvidia-driver", "value": "True"}]}
        node_types = {
            "head": {
                "resources": {"CPU": 8},
                "node_config": {"machineType": "n2-standard-8", "disks": gdisk(200)},
            },
            "gpu-1x": {  # 1x NVIDIA A100 40 GB, 12 vCPU; spot
                "min_workers": 0, "max_workers": int(v["max_workers_1x"]),
                "resources": {"CPU": 12, "GPU": 1},
                "node_config": {
                    "machineType": "a2-highgpu-1g", "disks": gdisk(300),
                    "guestAccelerators": [{"acceleratorType": "nvidia-tesla-a100", "acceleratorCount": 1}],
                    "metadata": driver,
                    "scheduling": {"provisioningModel": "SPOT", "instanceTerminationAction": "DELETE",
                                   "onHostMaintenance": "TERMINATE", "automaticRestart": False},
                },
            },
            "gpu-8x": {  # 8x NVIDIA A100 40 GB, 96 vCPU; on-demand
                "min_workers": 0, "max_workers": int(v["max_workers_8x"]),
                "resources": {"CPU": 96, "GPU": 8},
                "node_config": {
                    "machineType": "a2-highgpu-8g", "disks": gdisk(500),
                    "guestAccelerators": [{"acceleratorType": "nvidia-tesla-a100", "acceleratorCount": 8}],
                    "metadata": driver,
                    "scheduling": {"onHostMaintenance": "TERMINATE", "automaticRestart": True},
                },
            },
        }
        provider_cfg = {"type": "gcp", "region": v["gcp_region"], "availability_zone": zone,
                        "project_id": v["gcp_project"], "cache_stopped_nodes": True}
        names = ["cluster_name", "max_workers_1x", "max_workers_8x", "gcp_project", "gcp_region", "gcp_zone",
                 "gcp_image", "gcp_bucket", "gcp_nfs", "mlflow_db", "ni_repo"]
        title = ("raymix on GCP: CPU head (n2-standard-8), spot 1-GPU workers (a2-highgpu-1g), "
                 "8-GPU workers (a2-highgpu-8g).")
        db_note = ("The default SQLite store is on the head's boot disk (bind-mounted at /home/ray/mlflow): it "
                   "survives `ray down` (cache_stopped_nodes: the head is stopped, not deleted) but not the "
                   "head's deletion; for a store that outlives it use Cloud SQL PostgreSQL (mlflow_db). The head "
                   "writes artifacts to GCS with the service account Ray gives it (roles/storage.objectAdmin).")
        tunnel_key = f"~/.ssh/ray-autoscaler_gcp_{v['gcp_region']}_{v['gcp_project']}_ubuntu_0"
    fname = f"{provider}-gpu.yaml"
    config: dict[str, Any] = {
        "cluster_name": v["cluster_name"],
        "max_workers": int(v["max_workers_1x"]) + int(v["max_workers_8x"]),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": provider_cfg,
        "auth": {"ssh_user": "ubuntu"},
        "docker": {
            "image": ray_image(pinned),
            "container_name": "ray_container",
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536", f"-v {SHARED}:{SHARED}", f"-v {SHARED}/data:{DATA}"],
            "head_run_options": [f"-v /var/lib/raymix/mlflow:{MLFLOW_DIR}"],
        },
        "available_node_types": node_types,
        "head_node_type": "head",
        # The checkout `ray up` runs in (the repository root), without what .gitignore names (.venv, runs, ...).
        "file_mounts": {REMOTE_REPO: "."},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": ["**/.git", "**/.git/**"],
        "rsync_filter": [".gitignore"],
        "initialization_commands": initialization_commands,
        "setup_commands": [
            f"{NODE} check-shared",
            f"{env_prefix({'RAYMIX_REPO': REMOTE_REPO, 'RAYMIX_PIP_EXTRA': pip_extra, 'RAYMIX_MLFLOW_DB': v['mlflow_db']})}"
            f" {NODE} install",
        ],
        "head_setup_commands": [
            f"{env_prefix(head_env)} {NODE} env head",
            f"{env_prefix({'RAYMIX_REPO': REMOTE_REPO, 'RAYMIX_NI_REPO': v['ni_repo']})} {NODE} data",
        ],
        "worker_setup_commands": [f"{env_prefix(worker_env)} {NODE} env worker"],
        "head_start_ray_commands": [
            "ray stop",
            f"source ~/raymix.env && {NODE} check-shared && ulimit -n 65536 && {RAY_START_HEAD}",
            f"{NODE} mlflow",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"source ~/raymix.env && {NODE} check-shared && ulimit -n 65536 && {RAY_START_WORKER}",
        ],
    }
    usage = [
        "From the repository root (file_mounts syncs `.` to /home/ray/raymix on every node):",
        f"  ray up cluster/{fname}",
        f"  ray dashboard cluster/{fname}        # tunnels the Ray dashboard/job API to localhost:8265",
        "  ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\",
        f"      python -m raymix.sweep --space tune_spaces/adapt_paper.yaml --output {SHARED}/runs/adapt_paper",
        "  MLflow UI: MLflow listens on the head's private address only; tunnel to it (the key is the",
        "  one in the ssh command `ray up` prints):",
        f"    ssh -i {tunnel_key} -N -L 5000:$(ray exec cluster/{fname} 'echo $RAYMIX_MLFLOW_HOST' | tail -n 1):5000 \\",
        f"        ubuntu@$(ray get-head-ip cluster/{fname} | tail -n 1)      # then http://localhost:5000",
        "    (`ray attach -p 5000` forwards to the head's localhost, where nothing listens.)",
        f"  ray down cluster/{fname}",
    ]
    return config, header(title, usage, COMMON_NOTES + [db_note], pinned, v, names)


def kuberay_manifests(v: dict[str, str], pinned: dict[str, str]) -> tuple[list[dict[str, Any]], str]:
    name = v["cluster_name"]
    head_svc = f"{name}-head-svc"
    bucket = v["k8s_bucket"].rstrip("/")
    image = ray_image(pinned)
    pip_extra = "boto3" if bucket.startswith("s3://") else "google-cloud-storage"
    shared_claim, mlflow_claim = f"{name}-shared", f"{name}-mlflow"

    def claim(claim_name: str, mode: str, size: str, storage_class: str) -> dict[str, Any]:
        spec: dict[str, Any] = {"accessModes": [mode], "resources": {"requests": {"storage": size}}}
        if storage_class:
            spec["storageClassName"] = storage_class
        return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim_name}, "spec": spec}

    clone = {
        "name": "clone-raymix",
        "image": image,
        "command": ["/bin/bash", "-lc", "--"],
        "args": [f"[ -d {REMOTE_REPO}/.git ] || git clone --depth 1 --branch {shlex.quote(v['repo_ref'])} "
                 f"{shlex.quote(v['repo_url'])} {REMOTE_REPO}"],
        "volumeMounts": [{"name": "raymix-src", "mountPath": REMOTE_REPO}],
    }
    common_env = [
        {"name": "RAYMIX_REPO", "value": REMOTE_REPO},
        {"name": "RAYMIX_SHARED", "value": SHARED},
        {"name": "RAYMIX_STORAGE", "value": f"{bucket}/ray-storage"},
        {"name": "RAYMIX_MLFLOW_PORT", "value": str(MLFLOW_PORT)},
        {"name": "RAYMIX_PIP_EXTRA", "value": pip_extra},
    ]
    head_env = common_env + [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "RAYMIX_MLFLOW_HOST", "value": "$(POD_IP)"},
        {"name": "RAYMIX_MLFLOW_ALLOWED_HOSTS",
         "value": f"localhost,localhost:*,127.0.0.1,127.0.0.1:*,$(POD_IP),$(POD_IP):*,{head_svc},{head_svc}:*,{head_svc}.*"},
        {"name": "RAYMIX_ARTIFACTS", "value": f"{bucket}/mlflow-artifacts"},
        # A PostgreSQL URI in this optional Secret replaces the default SQLite store on the claim:
        #   kubectl create secret generic NAME-mlflow-db --from-literal=uri=postgresql://user:pw@host:5432/mlflow
        {"name": "RAYMIX_MLFLOW_DB",
         "valueFrom": {"secretKeyRef": {"name": f"{name}-mlflow-db", "key": "uri", "optional": True}}},
        {"name": "RAYMIX_NI_REPO", "value": v["ni_repo"]},
    ]
    worker_env = common_env + [{"name": "RAYMIX_MLFLOW_HOST", "value": head_svc}]
    shared_mounts = [
        {"name": "raymix-src", "mountPath": REMOTE_REPO},
        {"name": "shared", "mountPath": SHARED},
        {"name": "shared", "mountPath": DATA, "subPath": "data"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    shared_volumes = [
        {"name": "raymix-src", "emptyDir": {}},
        {"name": "shared", "persistentVolumeClaim": {"claimName": shared_claim}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    start = "source ~/raymix.env && ulimit -n 65536 && $KUBERAY_GEN_RAY_START_CMD"
    head_cmd = (f"{NODE} install && {NODE} env head && {NODE} data && {NODE} mlflow && {start}")
    worker_cmd = f"{NODE} install && {NODE} env worker && {start}"

    def worker_group(group: str, gpus: int, cpu: str, memory: str, max_replicas: int) -> dict[str, Any]:
        res = {"cpu": cpu, "memory": memory, "nvidia.com/gpu": gpus}
        return {
            "groupName": group,
            "replicas": 0,
            "minReplicas": 0,
            "maxReplicas": max_replicas,
            "rayStartParams": {},
            "template": {"spec": {
                "securityContext": {"fsGroup": 100},  # the image's ray user is 1000:100
                "initContainers": [clone],
                "containers": [{
                    "name": "ray-worker",
                    "image": image,
                    "command": ["/bin/bash", "-lc", "--"],
                    "args": [worker_cmd],
                    "env": worker_env,
                    "resources": {"requests": dict(res), "limits": dict(res)},
                    "volumeMounts": shared_mounts,
                }],
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "volumes": shared_volumes,
            }},
        }

    head_res = {"cpu": "7", "memory": "28Gi"}
    raycluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {
            "name": name,
            # KubeRay runs `command`/`args` as given; they end with its generated `ray start`.
            "annotations": {"ray.io/overwrite-container-cmd": "true"},
        },
        "spec": {
            "rayVersion": pinned["ray"].split("==")[1],
            "enableInTreeAutoscaling": True,
            "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 600},
            "headGroupSpec": {
                "serviceType": "ClusterIP",
                "rayStartParams": {"num-gpus": "0"},
                "template": {"spec": {
                    "securityContext": {"fsGroup": 100},
                    "initContainers": [clone],
                    "containers": [{
                        "name": "ray-head",
                        "image": image,
                        "command": ["/bin/bash", "-lc", "--"],
                        "args": [head_cmd],
                        "env": head_env,
                        "ports": [
                            {"containerPort": 6379, "name": "gcs-server"},
                            {"containerPort": 8265, "name": "dashboard"},
                            {"containerPort": 10001, "name": "client"},
                            {"containerPort": MLFLOW_PORT, "name": "mlflow"},
                        ],
                        "resources": {"requests": dict(head_res), "limits": dict(head_res)},
                        "volumeMounts": shared_mounts + [{"name": "mlflow", "mountPath": MLFLOW_DIR}],
                    }],
                    "volumes": shared_volumes + [{"name": "mlflow",
                                                  "persistentVolumeClaim": {"claimName": mlflow_claim}}],
                }},
            },
            "workerGroupSpecs": [
                worker_group("gpu-1x", 1, "7", "56Gi", int(v["max_workers_1x"])),
                worker_group("gpu-8x", 8, "90", "600Gi", int(v["max_workers_8x"])),
            ],
        },
    }
    docs = [
        claim(shared_claim, "ReadWriteMany", "500Gi", v["k8s_rwx_storage_class"]),
        claim(mlflow_claim, "ReadWriteOnce", "20Gi", v["k8s_rwo_storage_class"]),
        raycluster,
    ]
    usage = [
        "Needs the KubeRay operator (v1.1+), the NVIDIA device plugin, a ReadWriteMany StorageClass,",
        "and the raymix repository at repo_url (every pod clones it and runs cluster/node.sh from it).",
        "  kubectl apply -f cluster/kuberay-raycluster.yaml",
        f"  kubectl port-forward svc/{head_svc} 8265:8265 5000:5000   # Ray job API + MLflow UI on localhost",
        "  ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\",
        f"      python -m raymix.sweep --space tune_spaces/adapt_paper.yaml --output {SHARED}/runs/adapt_paper",
        "  kubectl delete -f cluster/kuberay-raycluster.yaml   # deletes the claims too: keep them to keep MLflow",
    ]
    notes = COMMON_NOTES + [
        f"Here MLflow binds the head pod's IP; workers reach it through the head service ({head_svc}:5000), "
        "which --allowed-hosts admits. The default SQLite store is on the head's ReadWriteOnce claim "
        f"({mlflow_claim}); the optional Secret {name}-mlflow-db (key uri) replaces it with PostgreSQL.",
        "Each pod pip-installs raymix at start; an image built FROM the one below with raymix installed "
        "starts workers faster.",
    ]
    names = ["cluster_name", "max_workers_1x", "max_workers_8x", "k8s_bucket", "k8s_rwx_storage_class",
             "k8s_rwo_storage_class", "repo_url", "repo_ref", "ni_repo"]
    title = "raymix on Kubernetes (KubeRay): a RayCluster with a CPU head and 1-GPU and 8-GPU worker groups."
    return docs, header(title, usage, notes, pinned, v, names)


class _Dumper(yaml.SafeDumper):
    """Block style, indented sequences, long commands folded for reading (they load back unchanged)."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else (">" if len(value) > 90 and " " in value and "  " not in value else None)
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)
_Dumper.ignore_aliases = lambda self, data: True  # type: ignore[method-assign]  # no &id001 anchors


def dump(docs: list[Any]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=100, default_flow_style=False,
                         allow_unicode=False, explicit_start=len(docs) > 1)


def values(overrides: dict[str, str] | None = None) -> dict[str, str]:
    out = {k: d for k, (d, _) in VARIABLES.items()}
    for k, val in (overrides or {}).items():
        if k not in VARIABLES:
            raise SystemExit(f"generate.py: error: unknown variable {k!r}; known: {', '.join(VARIABLES)}")
        out[k] = val
    for k in ("max_workers_1x", "max_workers_8x"):
        if not out[k].isdigit():
            raise SystemExit(f"generate.py: error: {k} must be a whole number, got {out[k]!r}")
    return out


def render(overrides: dict[str, str] | None = None, pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """File name -> text of every cluster file."""
    v = values(overrides)
    pinned = pins(pyproject)
    if "ray" not in pinned:
        raise SystemExit("generate.py: error: pyproject.toml does not pin ray (ray==X.Y.Z): the image tag needs it")
    out = {}
    for provider in ("aws", "gcp"):
        config, head = launcher_config(provider, v, pinned)
        out[f"{provider}-gpu.yaml"] = head + "\n" + dump([config])
    docs, head = kuberay_manifests(v, pinned)
    out["kuberay-raycluster.yaml"] = head + "\n" + dump(docs)
    return out


def write(out_dir: Path, overrides: dict[str, str] | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, text in render(overrides).items():
        path = out_dir / fname
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python cluster/generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                        help="override a template variable (see --list)")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory (default: cluster/)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the files in --out differ from the output")
    parser.add_argument("--list", action="store_true", help="print the template variables and exit")
    args = parser.parse_args(argv)
    if args.list:
        for k, (default, desc) in VARIABLES.items():
            print(f"{k} = {default or '(empty)'}\n    {desc}")
        return 0
    overrides = {}
    for item in args.sets:
        k, sep, val = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected NAME=VALUE")
        overrides[k.strip()] = val
    if args.check:
        stale = [f for f, text in render(overrides).items()
                 if not (args.out / f).is_file() or (args.out / f).read_text() != text]
        if stale:
            print(f"stale: {', '.join(stale)} (run python cluster/generate.py)", file=sys.stderr)
            return 1
        return 0
    for path in write(args.out, overrides):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
