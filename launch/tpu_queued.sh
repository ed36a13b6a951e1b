#!/usr/bin/env bash
# Trains on a Cloud TPU slice (or N slices) requested as a queued resource, and survives
# preemption: when the slice goes away, or training exits 0 after saving on SIGTERM without
# having finished, the slice is deleted, requested again and the same command resumes from
# the checkpoint in the gs:// workdir. The queued resource is deleted at the end, on error
# and on Ctrl-C.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"

usage() {
  cat <<USAGE
Usage: $0 --name=NAME --zone=ZONE --workdir=gs://BUCKET/PATH [flag ...] [-- mrl_jax.main flag ...]

Requests a TPU slice as a queued resource, waits until it is ACTIVE, copies this checkout
to every worker, installs it, runs python3 -m mrl_jax.main --distributed=on on all workers
of all slices, copies the logs back and deletes the queued resource. On preemption it
requests the slice again and resumes, at most --max_restarts times.

Flags (defaults in brackets; the environment variable in parentheses):
  --name              the queued resource; its node is NAME, or NAME-0 .. NAME-<N-1>  (TPU_NAME)
  --zone              e.g. us-central2-b                               (ZONE)
  --project           gcloud project                    [gcloud default] (PROJECT)
  --accelerator_type  per slice, e.g. v4-32, v5litepod-16, v6e-8     [v4-32]
  --runtime_version   the TPU VM image (v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e)
                                                       [tpu-ubuntu2204-base]
  --node_count        N slices joined into one job (multi-slice)       [1]
  --spot              spot capacity: cheaper, can be preempted at any time
  --reserved          your reservation's capacity          [neither: on-demand]
  --config            config path[:variant] in this checkout [configs/demo.py] (CONFIG)
  --workdir           gs://bucket/path: checkpoints, logs, results  [required] (WORKDIR)
  --max_restarts      re-requests after a preemption before giving up  [5]
  --log_dir           where the logs are copied    [~/mrl_jax_logs/NAME-<time>]
  --python            Python version of the workers' venv              [$PYTHON]
  --dry_run           print the gcloud commands of a run (slice ACTIVE at once, training
                      finishing) and run nothing
Everything after -- is passed to mrl_jax.main, e.g. -- --config.total_steps=1000.
Polls the slice's state every \$MRL_LAUNCH_POLL_S seconds [30].
USAGE
}

ACCELERATOR_TYPE=v4-32
RUNTIME_VERSION=tpu-ubuntu2204-base
NODE_COUNT=1
SPOT=0
RESERVED=0
MAX_RESTARTS=5
POLL_S="${MRL_LAUNCH_POLL_S:-30}"
VALUE_FLAGS="name zone project accelerator_type runtime_version node_count config workdir \
max_restarts log_dir python"
BOOL_FLAGS="spot reserved dry_run"
parse_flags "$@"
check_common_flags
[[ "$NODE_COUNT" =~ ^[1-9][0-9]*$ ]] || usage_error "--node_count must be a positive integer"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || usage_error "--max_restarts must be an integer >= 0"
((SPOT + RESERVED < 2)) || usage_error "--spot and --reserved exclude each other"
# Even on one host a local workdir is lost with the slice: on preemption and at the end.
if ((NODE_COUNT > 1 || $(vms_of "$ACCELERATOR_TYPE") > 1)); then
  require_bucket_workdir "the $NODE_COUNT × $ACCELERATOR_TYPE workers share no disk, and the \
slice's disks are deleted on preemption and at the end"
else
  require_bucket_workdir "the slice's disk is deleted on preemption and at the end"
fi
LOG_DIR="${LOG_DIR:-$HOME/mrl_jax_logs/$NAME-$(date +%Y%m%d-%H%M%S)}"
SIMULATED_WORKERS=$(vms_of "$ACCELERATOR_TYPE")

NODES=()
CREATE=(compute tpus queued-resources create "$NAME" "${LOC[@]}"
  --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
if ((NODE_COUNT == 1)); then
  NODES=("$NAME")
  CREATE+=(--node-id="$NAME")
else  # gcloud names the nodes <prefix>-0 .. <prefix>-<N-1>
  for ((i = 0; i < NODE_COUNT; i++)); do NODES+=("$NAME-$i"); done
  CREATE+=(--node-count="$NODE_COUNT" --node-prefix="$NAME")
  # Data parallel across the slices over the data-centre network (docs/multihost.md);
  # the user's overrides come after, so an explicit --config.mesh.dcn_data wins.
  OVERRIDES=(--config.mesh.dcn_data="$NODE_COUNT" "${OVERRIDES[@]}")
fi
if ((SPOT)); then CREATE+=(--spot); fi
if ((RESERVED)); then CREATE+=(--reserved); fi

CREATED=0
delete_slice() {
  stop_jobs
  if ((CREATED)); then
    log "deleting queued resource $NAME"
    gc compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet ||
      log "warning: could not delete $NAME; delete it by hand: gcloud compute tpus queued-resources delete $NAME --zone=$ZONE --force"
    CREATED=0
  fi
}
# shellcheck disable=SC2317  # called by the traps
on_exit() {
  local status=$?
  delete_slice
  if ((!DRY_RUN)) && [[ -d "$LOG_DIR" ]]; then log "logs in $LOG_DIR"; fi
  exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

qr_state() {
  if ((DRY_RUN)); then
    gc compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format='value(state.state)'
    echo ACTIVE
    return 0
  fi
  gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" \
    --format='value(state.state)' 2>/dev/null || true
}

# 0 once ACTIVE; 1 if the request failed or its slice went away before.
wait_active() {
  local state unknown=0
  while :; do
    state="$(qr_state)"
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING) log "queued resource $NAME is $state"; return 1 ;;
      "") log "cannot describe queued resource $NAME"; ((++unknown < 10)) || return 1 ;;
      *) log "queued resource $NAME is $state; waiting"; unknown=0 ;;
    esac
    sleep "$POLL_S"
  done
}

# After a failed command: 0 if the slice has gone (preempted), 1 if it is still ACTIVE (the
# command itself failed). The state can lag the loss of the workers, so ask a few times.
slice_gone() {
  local i state
  for i in 1 2 3; do
    state="$(qr_state)"
    if [[ "$state" != ACTIVE ]]; then log "queued resource $NAME is ${state:-gone}"; return 0; fi
    if ((i < 3)); then sleep "$POLL_S"; fi
  done
  return 1
}

# train.py writes summary.json last; a run has finished when this attempt (re)wrote it, so
# its generation differs from the one before the first attempt (none, for a new workdir).
summary_generation() {  # before|after (the dry run simulates none before, one after)
  if ((DRY_RUN)); then
    gc storage objects describe "$WORKDIR/summary.json" --format='value(generation)'
    if [[ "$1" == after ]]; then echo 1; fi
    return 0
  fi
  gcloud storage objects describe "$WORKDIR/summary.json" --format='value(generation)' \
    2>/dev/null || true
}

# Runs `function node` for every node at once; 0 if all succeed.
run_on_all_nodes() {  # function
  local node
  for node in "${NODES[@]}"; do spawn "$1" "$node"; done
  if ((DRY_RUN)); then return 0; fi
  wait_jobs
}

train_node() { train_on_node "$1" "$ATTEMPT_DIR/$1.log"; }

if ((!DRY_RUN)); then mkdir -p "$LOG_DIR"; fi
pack_repo
before="$(summary_generation before)"
for ((attempt = 0; ; attempt++)); do
  ATTEMPT_DIR="$LOG_DIR/attempt-$attempt"
  if ((!DRY_RUN)); then mkdir -p "$ATTEMPT_DIR"; fi
  log "attempt $attempt: requesting $NODE_COUNT × $ACCELERATOR_TYPE as queued resource $NAME"
  CREATED=1  # from here on, an interrupt deletes what may exist
  if ! gc "${CREATE[@]}"; then
    CREATED=0  # not ours (the name may be taken): leave it alone
    die "could not request the queued resource (see above)"
  fi
  outcome=preempted  # or saved (exit 0 on SIGTERM, not finished), finished, failed
  if wait_active; then
    if ! run_on_all_nodes install_on_node; then
      slice_gone || die "installing on the workers failed (see above)"
    elif run_on_all_nodes train_node; then
      now="$(summary_generation after)"
      if [[ -n "$now" && "$now" != "$before" ]]; then
        outcome=finished
      else
        outcome=saved
        log "training exited 0 without writing $WORKDIR/summary.json: saved on SIGTERM"
      fi
    elif ! slice_gone; then
      outcome=failed
    fi
  fi
  if [[ "$outcome" == finished || "$outcome" == failed ]] ||
    [[ "$outcome" == saved && "$(qr_state)" == ACTIVE ]]; then
    for node in "${NODES[@]}"; do fetch_worker_logs "$node" "$ATTEMPT_DIR"; done
  fi
  delete_slice
  case "$outcome" in
    finished) log "finished: $WORKDIR/summary.json"; exit 0 ;;
    failed) die "training failed on an ACTIVE slice (see $ATTEMPT_DIR); not restarting" ;;
  esac
  if ((attempt >= MAX_RESTARTS)); then
    die "preempted $((attempt + 1)) times; giving up (--max_restarts=$MAX_RESTARTS). \
Running this command again resumes from $WORKDIR."
  fi
  log "preempted; requesting the slice again (restart $((attempt + 1)) of at most $MAX_RESTARTS)"
done
