#!/usr/bin/env bash
# N mrl_jax processes on this machine, wired by explicit coordinator flags:
# the multi-host code path (per-process data shards, cross-process collectives,
# process-0-only writes) on a laptop's CPU. tests/test_multihost.py does the same.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: [VAR=...] $0 [--config.field=value ...]

Environment (defaults in brackets):
  NUM_PROCESSES   processes to start                          [2]
  LOCAL_DEVICES   fake CPU devices per process                [2]
  CONFIG          config path[:variant]                       [configs/demo.py:runlocal]
  WORKDIR         output dir (process 0 writes)               [/tmp/mrl_jax_local]
  PORT            coordinator port on localhost               [a free one]
  PLATFORM        JAX_PLATFORMS for every process             [cpu]
Logs: \$WORKDIR/logs/process<i>.log. Extra arguments go to mrl_jax.main.
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi

NUM_PROCESSES="${NUM_PROCESSES:-2}"
LOCAL_DEVICES="${LOCAL_DEVICES:-2}"
CONFIG="${CONFIG:-configs/demo.py:runlocal}"
WORKDIR="${WORKDIR:-/tmp/mrl_jax_local}"
PLATFORM="${PLATFORM:-cpu}"
PORT="${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$WORKDIR/logs"

pids=()
# shellcheck disable=SC2317  # called by the trap
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
# One failed process leaves the others waiting on it: stop them all.
trap cleanup EXIT INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS="$PLATFORM" \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$LOCAL_DEVICES" \
    python3 -m mrl_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
      --coordinator_address="localhost:$PORT" --num_processes="$NUM_PROCESSES" \
      --process_id="$i" "$@" >"$WORKDIR/logs/process$i.log" 2>&1 &
  pids+=("$!")
done
echo "Started $NUM_PROCESSES processes (coordinator localhost:$PORT); logs in $WORKDIR/logs/."

# wait -n: notice the first failure, whichever process it is.
status=0
for ((i = 0; i < NUM_PROCESSES; i++)); do
  if ! wait -n; then
    echo "A process failed; see $WORKDIR/logs/process*.log" >&2
    status=1
    break
  fi
done
if [[ "$status" == 0 ]]; then
  pids=()
  tail -n 12 "$WORKDIR/logs/process0.log"
fi
exit "$status"
