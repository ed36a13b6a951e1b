# shellcheck shell=bash
# What tpu_pod.sh and tpu_queued.sh share: their flags, a dry-run-aware `gcloud`, and
# the commands that install and run mrl_jax on every worker of a TPU VM. Sourced, not run.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 3))); then
  echo "error: $0 needs bash >= 4.3 (macOS: brew install bash)" >&2
  exit 2
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# On each worker, relative to the login directory (ssh commands start there).
REMOTE_DIR=mrl_jax
REMOTE_VENV=mrl_jax_venv
REMOTE_TGZ=/tmp/mrl_jax_src.tgz
REMOTE_LOG=/tmp/mrl_jax.log
# Keepalives make ssh notice a vanished worker in ~5 min instead of never.
SSH_FLAGS=(--ssh-flag=-oServerAliveInterval=60 --ssh-flag=-oServerAliveCountMax=5)
JOB_PIDS=()

log() { echo "[${0##*/}] $*" >&2; }
die() { log "error: $*"; exit 1; }
usage_error() { usage >&2; echo >&2; log "error: $*"; exit 2; }

# Defaults shared by both scripts; the environment variables are the older interface.
NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
CONFIG="${CONFIG:-configs/demo.py}"
WORKDIR="${WORKDIR:-}"
PYTHON=3.11  # the workers' venv; not read from the environment, where PYTHON is often a path
LOG_DIR="${LOG_DIR:-}"
DRY_RUN=0
OVERRIDES=()

# --node_count=2 or --node_count 2 sets NODE_COUNT=2, a boolean flag sets it to 1; what
# follows `--` goes to OVERRIDES. $VALUE_FLAGS and $BOOL_FLAGS (set by the script) list
# the flags it takes.
parse_flags() {
  local arg name value
  while (($#)); do
    arg=$1
    shift
    case "$arg" in
      --) OVERRIDES=("$@"); return 0 ;;
      -h | --help) usage; exit 0 ;;
      --*) ;;
      *) usage_error "unexpected argument '$arg' (mrl_jax.main overrides go after --)" ;;
    esac
    name=${arg#--}
    name=${name%%=*}
    if [[ " $BOOL_FLAGS " == *" $name "* && "$arg" != *=* ]]; then
      value=1
    elif [[ " $VALUE_FLAGS " != *" $name "* ]]; then
      usage_error "unknown flag '$arg' (mrl_jax.main overrides go after --)"
    elif [[ "$arg" == *=* ]]; then
      value=${arg#*=}
    elif (($#)); then
      value=$1
      shift
    else
      usage_error "$arg needs a value"
    fi
    printf -v "${name^^}" '%s' "$value"
  done
}

# Checks what both scripts need and sets LOC, the --zone/--project flags of every call.
check_common_flags() {
  [[ -n "$NAME" ]] || usage_error "--name is required"
  [[ -n "$ZONE" ]] || usage_error "--zone is required"
  [[ -n "$WORKDIR" ]] || usage_error "--workdir is required (gs://bucket/path)"
  WORKDIR=${WORKDIR%/}
  [[ -f "$REPO_ROOT/${CONFIG%%:*}" ]] ||
    usage_error "--config=$CONFIG: no such file in this checkout (give a path relative to $REPO_ROOT)"
  LOC=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then LOC+=(--project="$PROJECT"); fi
  if ((DRY_RUN)); then
    exec 3>&1  # the commands go to stdout, everything else to stderr
  fi
}

# One process per worker writes to WORKDIR: workers share no disk, so it must be a bucket.
require_bucket_workdir() {  # reason
  [[ "$WORKDIR" == gs://* ]] ||
    usage_error "--workdir=$WORKDIR is not a gs:// bucket path; $1"
}

# TPU VMs (workers) of a slice of this type, where gcloud can't say (before it exists): types
# up to 8 chips/cores (v4-8, v5litepod-8, v6e-8, ...) are one VM; bigger v5e/v6e slices
# have 4 chips per VM, the others (v2-v4, v5p, counted in cores) 8 cores per VM.
vms_of() {  # accelerator type
  local n=${1##*-} per=8
  if [[ ! "$n" =~ ^[0-9]+$ ]] || ((n <= 8)); then echo 1; return; fi
  case "$1" in v5litepod-* | v5e-* | v6e-*) per=4 ;; esac
  echo $(((n + per - 1) / per))
}

# The arguments printed as a shell command, quoted only where needed: --flag="value".
shell_quote() {
  local safe='^[A-Za-z0-9_@%+=:,./-]+$' flag='^(--[A-Za-z0-9_.-]+=)(.*)$' out=() a
  for a in "$@"; do
    if [[ "$a" =~ $safe ]]; then
      out+=("$a")
    elif [[ "$a" =~ $flag ]]; then
      out+=("${BASH_REMATCH[1]}$(quote_word "${BASH_REMATCH[2]}")")
    else
      out+=("$(quote_word "$a")")
    fi
  done
  printf '%s\n' "${out[*]}"
}

quote_word() {
  if [[ "$1" != *[\$\`\"\\!]* ]]; then
    echo "\"$1\""
  else
    echo "'${1//\'/\'\\\'\'}'"
  fi
}

# gcloud, or with --dry_run the command line it would run.
gc() {
  if ((DRY_RUN)); then
    shell_quote gcloud "$@" >&3
    return 0
  fi
  gcloud "$@"
}

# Runs "$@" in the background in its own process group, so stop_jobs ends it with its
# children (gcloud's ssh processes); stdin is /dev/null, or ssh would stop on reading the
# terminal from the background. With --dry_run, runs it at once (it only prints).
spawn() {
  if ((DRY_RUN)); then "$@"; return; fi
  set -m
  "$@" </dev/null &
  JOB_PIDS+=("$!")
  set +m
}

# 0 if every spawned job exits 0. At the first failure stops the others: a worker that is
# gone leaves the rest waiting on it.
wait_jobs() {
  local status=0 _
  for _ in "${JOB_PIDS[@]}"; do
    if ! wait -n; then status=1; break; fi
  done
  stop_jobs
  return "$status"
}

stop_jobs() {
  local pid
  for pid in "${JOB_PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  if ((${#JOB_PIDS[@]})); then wait 2>/dev/null || true; fi
  JOB_PIDS=()
}

# The checkout, packed once; every worker runs the same program.
pack_repo() {
  SRC_TGZ="${TMPDIR:-/tmp}/mrl_jax_src_$NAME.tgz"
  if ((DRY_RUN)); then return 0; fi
  tar -C "$REPO_ROOT" --exclude=.git --exclude=__pycache__ --exclude='*.pyc' \
    --exclude=.pytest_cache --exclude=.venv --exclude=./wheels --exclude=./workdirs \
    -czf "$SRC_TGZ" .
}

node_ssh() {  # node command
  gc compute tpus tpu-vm ssh "$1" "${LOC[@]}" --worker=all "${SSH_FLAGS[@]}" --command="$2"
}

# requirements.txt pins the CPU jaxlib; jax[tpu] at the same version adds libtpu. The TPU VM
# images have Python 3.10, older than the pins need, so uv makes a venv with $PYTHON.
install_on_node() {  # node
  local jax_version
  jax_version="$(sed -n 's/^jax==//p' "$REPO_ROOT/requirements.txt")"
  gc compute tpus tpu-vm scp "$SRC_TGZ" "$1:$REMOTE_TGZ" "${LOC[@]}" --worker=all &&
    node_ssh "$1" "set -e; mkdir -p $REMOTE_DIR; tar -C $REMOTE_DIR -xzf $REMOTE_TGZ; \
python3 -m pip install -q --user uv; \
[ -x $REMOTE_VENV/bin/python ] || python3 -m uv venv -q --python $PYTHON $REMOTE_VENV; \
python3 -m uv pip install -q --python $REMOTE_VENV/bin/python -r $REMOTE_DIR/requirements.txt \
$(shell_quote "jax[tpu]==$jax_version")"
}

# --distributed=on, no coordinator flags: each worker learns its id and worker 0's address
# from the GCE metadata server (and, in a multi-slice job, the MEGASCALE settings the
# runtime provides). Each line is prefixed with the worker's host name; the whole stream is
# kept in $2 here and in $REMOTE_LOG on each worker.
train_on_node() {  # node local_log
  local args=(--distributed=on --config="$CONFIG" --workdir="$WORKDIR" "${OVERRIDES[@]}")
  local cmd
  cmd="set -o pipefail; cd $REMOTE_DIR && ../$REMOTE_VENV/bin/python -m mrl_jax.main \
$(shell_quote "${args[@]}") 2>&1 | tee -a $REMOTE_LOG | sed -u \"s/^/[\$(hostname)] /\""
  if ((DRY_RUN)); then node_ssh "$1" "$cmd"; return; fi
  node_ssh "$1" "$cmd" 2>&1 | tee -a "$2"
}

worker_count() {  # node; with --dry_run, $SIMULATED_WORKERS
  if ((DRY_RUN)); then
    gc compute tpus tpu-vm describe "$1" "${LOC[@]}" --flatten=networkEndpoints \
      --format='value(networkEndpoints.ipAddress)'
    echo "${SIMULATED_WORKERS:-1}"
    return 0
  fi
  gcloud compute tpus tpu-vm describe "$1" "${LOC[@]}" --flatten=networkEndpoints \
    --format='value(networkEndpoints.ipAddress)' | grep -c .
}

# Copies each worker's $REMOTE_LOG to local_dir/<node>-w<i>.log (scp from a TPU VM takes one
# worker at a time). A failure is only a warning: the streamed log is already here.
fetch_worker_logs() {  # node local_dir
  local n i
  n="$(worker_count "$1")" || { log "warning: cannot list the workers of $1; no worker logs"; return 0; }
  for ((i = 0; i < n; i++)); do
    gc compute tpus tpu-vm scp "$1:$REMOTE_LOG" "$2/$1-w$i.log" "${LOC[@]}" --worker="$i" ||
      log "warning: could not copy the log of $1 worker $i"
  done
}
