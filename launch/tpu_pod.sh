#!/usr/bin/env bash
# Runs mrl_jax on every worker of a Cloud TPU VM (pod slice), one process per worker.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: TPU_NAME=my-tpu ZONE=us-central2-b [VAR=...] $0 [--config.field=value ...]

Copies this repository to every worker of the TPU VM \$TPU_NAME, installs it,
then runs the same training command on all workers at once. Extra arguments
are passed to mrl_jax.main (config overrides).

Environment (defaults in brackets):
  TPU_NAME          the TPU VM / pod slice                      [required]
  ZONE              its zone                                    [required]
  PROJECT           gcloud project                              [gcloud default]
  ACCELERATOR_TYPE  with CREATE=1: e.g. v4-32, v5litepod-16     [v4-32]
  RUNTIME_VERSION   with CREATE=1: the TPU VM image             [tpu-ubuntu2204-base]
  CREATE            1: create the TPU VM first                  [0]
  INSTALL           0: skip copying and pip install (re-runs)   [1]
  CONFIG            config path[:variant] on the workers        [configs/demo.py]
  WORKDIR           output dir; use gs:// or a shared disk for
                    multi-worker runs (process 0 writes)        [/tmp/mrl_jax]
  REMOTE_DIR        checkout location on the workers            [~/mrl_jax]
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
if [[ -z "${TPU_NAME:-}" || -z "${ZONE:-}" ]]; then usage >&2; exit 2; fi

ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
CREATE="${CREATE:-0}"
INSTALL="${INSTALL:-1}"
CONFIG="${CONFIG:-configs/demo.py}"
WORKDIR="${WORKDIR:-/tmp/mrl_jax}"
REMOTE_DIR="${REMOTE_DIR:-~/mrl_jax}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Overrides reach the remote shell as one quoted string.
EXTRA_ARGS=""
if (($#)); then EXTRA_ARGS="$(printf ' %q' "$@")"; fi

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command "$1"
}

if [[ "$CREATE" == "1" ]]; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION"
fi

if [[ "$INSTALL" == "1" ]]; then
  # The same code on every worker: all processes must run the same program.
  tar -C "$REPO_ROOT" --exclude=.git --exclude='*.pyc' -czf /tmp/mrl_jax_src.tgz .
  gcloud compute tpus tpu-vm scp /tmp/mrl_jax_src.tgz "$TPU_NAME":/tmp/mrl_jax_src.tgz \
    --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all
  # requirements.txt pins the CPU jaxlib; jax[tpu] at the same version adds libtpu.
  on_all_workers "set -e; mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/mrl_jax_src.tgz \
    && cd $REMOTE_DIR && python3 -m pip install -q -r requirements.txt \
    && python3 -m pip install -q \"jax[tpu]==\$(python3 -c 'import jax; print(jax.__version__)')\""
fi

# --distributed=on, no coordinator flags: on a TPU VM each worker learns its id and worker 0's
# address from the GCE metadata server. Logs stream here, prefixed per worker.
on_all_workers "set -o pipefail; cd $REMOTE_DIR && python3 -m mrl_jax.main --distributed=on --config=$CONFIG \
  --workdir=$WORKDIR$EXTRA_ARGS 2>&1 | tee -a /tmp/mrl_jax_\$(hostname).log"
