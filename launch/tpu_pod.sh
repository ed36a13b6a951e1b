#!/usr/bin/env bash
# Runs mrl_jax on every worker of an existing Cloud TPU VM (pod slice), one process per
# worker, once. To request a slice, restart after preemption and delete it at the end,
# use tpu_queued.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"

usage() {
  cat <<USAGE
Usage: $0 --name=TPU --zone=ZONE --workdir=DIR [flag ...] [-- mrl_jax.main flag ...]

Copies this checkout to every worker of the TPU VM, installs it, runs
python3 -m mrl_jax.main --distributed=on on all workers at once and copies each
worker's log back.

Flags (defaults in brackets; the environment variable in parentheses):
  --name        the TPU VM / pod slice                         [required] (TPU_NAME)
  --zone        its zone                                       [required] (ZONE)
  --project     gcloud project                        [gcloud default] (PROJECT)
  --config      config path[:variant] in this checkout [configs/demo.py] (CONFIG)
  --workdir     output dir; gs://bucket/path when the VM has several workers
                (they share no disk)                           [required] (WORKDIR)
  --no_install  skip copying and installing (a re-run of the same checkout)
  --log_dir     where the logs are copied    [~/mrl_jax_logs/NAME-<time>]
  --python      Python version of the workers' venv            [$PYTHON]
  --dry_run     print the gcloud commands and run nothing
Everything after -- is passed to mrl_jax.main, e.g. -- --config.total_steps=1000.
USAGE
}

NO_INSTALL=0
if [[ "${INSTALL:-1}" == 0 ]]; then NO_INSTALL=1; fi
VALUE_FLAGS="name zone project config workdir log_dir python"
BOOL_FLAGS="no_install dry_run"
parse_flags "$@"
check_common_flags
LOG_DIR="${LOG_DIR:-$HOME/mrl_jax_logs/$NAME-$(date +%Y%m%d-%H%M%S)}"

workers="$(worker_count "$NAME")" || die "cannot describe TPU VM $NAME in $ZONE"
if ((workers > 1)); then
  require_bucket_workdir "the $workers workers of $NAME share no disk"
fi
if ((!DRY_RUN)); then mkdir -p "$LOG_DIR"; fi
if ((!NO_INSTALL)); then
  pack_repo
  install_on_node "$NAME"
fi
status=0
train_on_node "$NAME" "$LOG_DIR/$NAME.log" || status=$?
fetch_worker_logs "$NAME" "$LOG_DIR"
if ((!DRY_RUN)); then log "logs in $LOG_DIR"; fi
exit "$status"
