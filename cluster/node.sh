#!/usr/bin/env bash
# Node-side steps of raymix's Ray clusters. The cluster files that
# cluster/generate.py writes (aws-gpu.yaml, gcp-gpu.yaml,
# kuberay-raycluster.yaml) call it on every node, from the raymix checkout that
# file_mounts (cluster launcher) or a git clone (KubeRay) puts at $RAYMIX_REPO.
#
#   node.sh install        pip install -e the checkout, so pyproject.toml's pins apply,
#                          plus the provider's clients; then check the installed
#                          versions against those pins, and CUDA on GPU nodes
#   node.sh env head|worker
#                          write ~/raymix.env (sourced before `ray start`, and from ~/.bashrc):
#                          RAYMIX_CACHE, HF_HOME and RAYMIX_OUTPUT_ROOT on the shared
#                          filesystem, RAYMIX_STORAGE, and MLFLOW_TRACKING_URI pointing
#                          at the head's private address
#   node.sh data [SPACE.yaml ...]
#                          fetch the Natural Instructions task files the spaces name
#                          (default tune_spaces/adapt_paper.yaml) onto the shared
#                          filesystem, once, by a sparse clone of $RAYMIX_NI_REPO
#   node.sh mlflow         (re)start the MLflow tracking server on the head, bound to
#                          $RAYMIX_MLFLOW_HOST (a private address: wildcard, loopback and
#                          public ones are refused), and wait until it answers
#   node.sh check-shared   fail unless the shared filesystem is mounted at $RAYMIX_SHARED
#
# Inputs (environment; the cluster files set them):
#   RAYMIX_REPO        the raymix checkout (default /home/ray/raymix)
#   RAYMIX_SHARED      shared filesystem mounted at the same path on every node (default /mnt/raymix)
#   RAYMIX_ARTIFACTS   MLflow artifact destination, a bucket URI (s3://... or gs://...)
#   RAYMIX_STORAGE     bucket URI for Ray storage (checkpoints, Tune/Train state)
#   RAYMIX_MLFLOW_DB   MLflow backend store (default sqlite:////home/ray/mlflow/mlflow.db;
#                      postgresql://user@host:5432/db with the password in ~/.pgpass)
#   RAYMIX_MLFLOW_HOST head: address MLflow binds (default: the node's IP as Ray sees it);
#                      worker: address of the head (default $RAY_HEAD_IP, set by the launcher)
#   RAYMIX_MLFLOW_PORT default 5000
#   RAYMIX_MLFLOW_ALLOWED_HOSTS  optional --allowed-hosts for the server (KubeRay: the head
#                      service's name; the default already allows localhost and private IPs)
#   RAYMIX_PIP_EXTRA   extra packages for the same pip command (the provider's clients)
#   RAYMIX_NI_REPO     git URL of Natural Instructions; empty: `data` does nothing
set -euo pipefail

RAYMIX_REPO=${RAYMIX_REPO:-/home/ray/raymix}
RAYMIX_SHARED=${RAYMIX_SHARED:-/mnt/raymix}
ENV_FILE=$HOME/raymix.env
MLFLOW_DIR=$HOME/mlflow

die() {
  echo "raymix: error: $*" >&2
  exit 1
}

load_env() {
  # shellcheck disable=SC1090
  [ -f "$ENV_FILE" ] && . "$ENV_FILE"
  return 0
}

no_placeholders() {
  local name
  for name in "$@"; do
    case "${!name:-}" in
      *CHANGE-ME*) die "$name=${!name} is a placeholder: render the cluster file with your values (python cluster/generate.py --set ...)" ;;
    esac
  done
}

# A writable directory owned by this user (sudo where the mount point is root's).
own_dir() {
  local d=$1
  mkdir -p "$d" 2>/dev/null || sudo mkdir -p "$d"
  if [ ! -w "$d" ]; then sudo chown "$(id -u):$(id -g)" "$d" || true; fi
  [ -w "$d" ] || die "$d is not writable by $(id -un) (uid $(id -u))"
}

# Refuses an address that is unspecified (the IPv4 or IPv6 wildcard), loopback or globally routable.
check_private() {
  python - "$1" <<'PY'
import ipaddress
import sys

host = sys.argv[1]
try:
    ip = ipaddress.ip_address(host)
except ValueError:
    sys.exit(f"raymix: error: MLflow must bind an IP address of this node, got {host!r}")
if ip.is_unspecified or ip.is_loopback or ip.is_global:
    sys.exit(f"raymix: error: refusing to bind MLflow to {host}: not a private address of this node")
PY
}

cmd_install() {
  [ -f "$RAYMIX_REPO/pyproject.toml" ] || die "no raymix checkout at $RAYMIX_REPO (file_mounts or the git clone did not run)"
  [ -w "$RAYMIX_REPO" ] || sudo chown -R "$(id -u):$(id -g)" "$RAYMIX_REPO"
  local extra=()
  # shellcheck disable=SC2206
  if [ -n "${RAYMIX_PIP_EXTRA:-}" ]; then extra=($RAYMIX_PIP_EXTRA); fi
  case "${RAYMIX_MLFLOW_DB:-}" in postgresql*) extra+=(psycopg2-binary) ;; esac
  # One resolver run: the clients cannot move any of pyproject's pins.
  python -m pip install --no-cache-dir --disable-pip-version-check -e "$RAYMIX_REPO" "${extra[@]}"
  python - "$RAYMIX_REPO/pyproject.toml" <<'PY'
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet

with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
bad = []
for dep in deps:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(==\s*[^\s;,]+)\s*", dep)
    if not m:
        continue
    name, spec = m.group(1), m.group(3).replace(" ", "")
    try:
        got = version(name)
    except PackageNotFoundError:
        got = None
    if got is None or not SpecifierSet(spec).contains(got, prereleases=True):
        bad.append(f"{name}: installed {got}, pyproject.toml pins {spec}")
if bad:
    sys.exit("raymix: error: installed versions differ from pyproject.toml's pins:\n  " + "\n  ".join(bad))
print(f"raymix: installed versions match pyproject.toml's {sum(1 for d in deps if '==' in d)} pins")
PY
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'raymix: error: torch ' + torch.__version__ + ' sees no CUDA device on this GPU node')"
  fi
}

cmd_env() {
  local role=${1:-} host
  case "$role" in
    head) host=${RAYMIX_MLFLOW_HOST:-$(python -c 'import ray.util; print(ray.util.get_node_ip_address())')} ;;
    worker) host=${RAYMIX_MLFLOW_HOST:-${RAY_HEAD_IP:-}} ;;
    *) die "usage: node.sh env head|worker" ;;
  esac
  [ -n "$host" ] || die "no address for the head (RAYMIX_MLFLOW_HOST or RAY_HEAD_IP)"
  no_placeholders RAYMIX_ARTIFACTS RAYMIX_STORAGE RAYMIX_MLFLOW_DB
  if [ "$role" = head ]; then check_private "$host"; fi
  local port=${RAYMIX_MLFLOW_PORT:-5000}
  {
    echo "# Written by $RAYMIX_REPO/cluster/node.sh env $role"
    printf 'export %s=%q\n' \
      RAYMIX_REPO "$RAYMIX_REPO" \
      RAYMIX_SHARED "$RAYMIX_SHARED" \
      RAYMIX_CACHE "$RAYMIX_SHARED/cache" \
      HF_HOME "$RAYMIX_SHARED/hf" \
      RAYMIX_OUTPUT_ROOT "$RAYMIX_SHARED/runs" \
      RAYMIX_STORAGE "${RAYMIX_STORAGE:-}" \
      RAYMIX_MLFLOW_HOST "$host" \
      RAYMIX_MLFLOW_PORT "$port" \
      MLFLOW_TRACKING_URI "http://$host:$port"
    if [ "$role" = head ]; then
      printf 'export %s=%q\n' \
        RAYMIX_ARTIFACTS "${RAYMIX_ARTIFACTS:?RAYMIX_ARTIFACTS (the MLflow artifact bucket URI) is not set}" \
        RAYMIX_MLFLOW_DB "${RAYMIX_MLFLOW_DB:-sqlite:////home/ray/mlflow/mlflow.db}" \
        RAYMIX_MLFLOW_ALLOWED_HOSTS "${RAYMIX_MLFLOW_ALLOWED_HOSTS:-}"
    fi
  } >"$ENV_FILE.tmp"
  chmod 600 "$ENV_FILE.tmp"
  mv "$ENV_FILE.tmp" "$ENV_FILE"
  grep -qxF '[ -f ~/raymix.env ] && . ~/raymix.env' "$HOME/.bashrc" 2>/dev/null \
    || echo '[ -f ~/raymix.env ] && . ~/raymix.env' >>"$HOME/.bashrc"
  local d
  for d in cache hf runs data; do own_dir "$RAYMIX_SHARED/$d"; done
  echo "raymix: $ENV_FILE ($role): MLFLOW_TRACKING_URI=http://$host:$port"
}

cmd_data() {
  if [ -z "${RAYMIX_NI_REPO:-}" ]; then
    echo "raymix: RAYMIX_NI_REPO is empty: not fetching Natural Instructions"
    return 0
  fi
  local spaces=("$@")
  [ ${#spaces[@]} -gt 0 ] || spaces=("$RAYMIX_REPO/tune_spaces/adapt_paper.yaml")
  python - "$RAYMIX_NI_REPO" "${spaces[@]}" <<'PY'
import subprocess
import sys
from pathlib import Path

import yaml

repo_url, spaces = sys.argv[1], sys.argv[2:]


def git(*args, cwd=None):
    subprocess.run(["git", *args], cwd=cwd, check=True)


for space in spaces:
    base = (yaml.safe_load(Path(space).read_text()) or {}).get("base") or {}
    for src in base.get("data.sources") or []:
        if src.get("kind") != "natural_instructions":
            continue
        tasks_dir = Path(src["path"])
        root = tasks_dir.parent
        wanted = [f"/{tasks_dir.name}/{t}.json" for t in src.get("tasks") or []] or [f"/{tasks_dir.name}/"]
        if src.get("tasks") and all((root / w.lstrip("/")).is_file() for w in wanted):
            print(f"raymix: {len(wanted)} task files already in {tasks_dir}")
            continue
        if not (root / ".git").is_dir():
            root.parent.mkdir(parents=True, exist_ok=True)
            git("clone", "--filter=blob:none", "--no-checkout", "--depth", "1", repo_url, str(root))
            git("sparse-checkout", "set", "--no-cone", "/README.md", cwd=root)
        git("sparse-checkout", "add", *wanted, cwd=root)
        git("checkout", cwd=root)
        print(f"raymix: fetched {len(wanted)} task file(s) of {repo_url} into {tasks_dir}")
PY
}

cmd_mlflow() {
  load_env
  local host=${RAYMIX_MLFLOW_HOST:?run node.sh env head first} port=${RAYMIX_MLFLOW_PORT:-5000}
  check_private "$host"
  no_placeholders RAYMIX_ARTIFACTS RAYMIX_MLFLOW_DB
  own_dir "$MLFLOW_DIR"
  local pidfile=$MLFLOW_DIR/server.pid pid
  if [ -f "$pidfile" ] && pid=$(cat "$pidfile") && kill -0 "$pid" 2>/dev/null; then
    # setsid made the server its own process group: stop it and its workers.
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || true; sleep 2; fi
  fi
  case "$RAYMIX_MLFLOW_DB" in sqlite:////*) mkdir -p "$(dirname "${RAYMIX_MLFLOW_DB#sqlite:///}")" ;; esac
  local args=(server --backend-store-uri "$RAYMIX_MLFLOW_DB" --artifacts-destination "$RAYMIX_ARTIFACTS"
    --host "$host" --port "$port")
  if [ -n "${RAYMIX_MLFLOW_ALLOWED_HOSTS:-}" ]; then args+=(--allowed-hosts "$RAYMIX_MLFLOW_ALLOWED_HOSTS"); fi
  # SQLite: one server worker, the only process that opens the file (MLflow's
  # default four are four writers on one file: "database is locked" under
  # concurrent trials). PostgreSQL takes the default.
  case "$RAYMIX_MLFLOW_DB" in sqlite:*) args+=(--workers 1) ;; esac
  # The inner shell records its own pid, which exec hands to mlflow.
  setsid bash -c 'echo $$ >"$0"; exec mlflow "$@"' "$pidfile" "${args[@]}" \
    >>"$MLFLOW_DIR/server.log" 2>&1 </dev/null &
  local url="http://$host:$port"
  for _ in $(seq 150); do  # a fresh SQLite store runs its migrations first
    if python -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$url" 2>/dev/null; then
      echo "raymix: MLflow at $url (backend $RAYMIX_MLFLOW_DB, artifacts $RAYMIX_ARTIFACTS; log $MLFLOW_DIR/server.log)"
      return 0
    fi
    sleep 2
  done
  tail -n 40 "$MLFLOW_DIR/server.log" >&2 || true
  die "MLflow did not answer at $url/health within 300 s"
}

cmd_check_shared() {
  [ -f "$RAYMIX_SHARED/.raymix-shared" ] \
    || die "the shared filesystem is not mounted at $RAYMIX_SHARED (no .raymix-shared marker): raymix's pool cache, runs and the task data must be on storage every node sees"
}

case "${1:-}" in
  install) shift; cmd_install "$@" ;;
  env) shift; cmd_env "$@" ;;
  data) shift; cmd_data "$@" ;;
  mlflow) shift; cmd_mlflow "$@" ;;
  check-shared) shift; cmd_check_shared "$@" ;;
  *) die "usage: node.sh install | env head|worker | data [SPACE.yaml ...] | mlflow | check-shared" ;;
esac
