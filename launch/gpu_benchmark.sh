#!/usr/bin/env bash
# Every GPU speed figure of docs/benchmarks.md in one call on one GPU machine:
# the train-step sweeps (ours, each lever, all levers, the PyTorch baseline, MFU,
# memory, top kernels), the MRL head's overhead, and the end-to-end input + step.
#
#   launch/gpu_benchmark.sh OUT_DIR [STAGES]
#
# Run it from the repository root. STAGES is a comma-separated list, in priority order:
#   headline  ViT-B/16 and ResNet50: baseline, all levers, torch.compile (with a profile)
#   levers    each lever on its own (ViT-B/16, ResNet50), no PyTorch row
#   overhead  the MRL heads vs mrl.mode=none, at 1,000 and 18,291 classes
#   e2e       the real grain pipeline on generated JPEG shards feeding the real loop
# Default: all four. BUDGET_S (default 420) bounds the whole call: a stage whose
# estimate does not fit in what is left is skipped and named, so one call always
# returns its results, and a second call can run the rest (STAGES=levers,e2e).
# Results, two files (a device call brings back few): OUT_DIR/gpu_benchmark.log (the
# tables, the top kernels) and OUT_DIR/results.json ({run name: its rows}), updated
# after every run. Where grain, ml-collections or simplejpeg is missing (the GPU image lacks
# them), the wheels in .whl/ are installed first; `launch/gpu_wheels.sh` downloads them.
#
# Environment (for a smaller machine, or a CPU smoke run): VIT_CONFIG, RESNET_CONFIG,
# BATCH (256), STEPS (30), WORKERS (16, e2e), TORCH (1: add the PyTorch rows),
# DRY_RUN=1 prints the commands instead of running them.
set -uo pipefail

out=${1:?usage: launch/gpu_benchmark.sh OUT_DIR [STAGES]}
stages=${2:-headline,levers,overhead,e2e}
budget=${BUDGET_S:-420}
vit_config=${VIT_CONFIG:-configs/vit_b16_i1k.py:synthetic}
resnet_config=${RESNET_CONFIG:-configs/resnet50_i1k.py:synthetic}
batch=${BATCH:-256}
steps=${STEPS:-30}
workers=${WORKERS:-16}
dry_run=${DRY_RUN:-0}
torch_flag=--torch
[[ ${TORCH:-1} == 1 ]] || torch_flag=--notorch
start=$SECONDS

parts=$(mktemp -d)  # one JSON file per run, merged into results.json after each
mkdir -p "$out"
log=$out/gpu_benchmark.log
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1

if [[ $dry_run != 1 ]] && ! python3 -c "import grain, ml_collections, simplejpeg" 2>/dev/null \
    && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "error: installing .whl/ failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

left() { echo $((budget - (SECONDS - start))); }

# run ESTIMATE_S NAME COMMAND...: runs COMMAND within what is left of the budget.
run() {
  local estimate=$1 name=$2
  shift 2
  if ((estimate > $(left))); then
    echo "== skipped $name: $(left) s left of BUDGET_S=$budget, needs about $estimate s"
    return 0
  fi
  echo "== $name ($(left) s left): $*"
  [[ $dry_run == 1 ]] && return 0
  timeout --kill-after=10 "$(left)" "$@" || echo "== $name ended with exit $?"
  python3 - "$parts" "$out/results.json" <<'MERGE'
import glob, json, os, sys
parts, target = sys.argv[1:]
results = {}
if os.path.exists(target):  # an earlier call's runs into the same OUT_DIR stay
  with open(target) as f:
    results = json.load(f)
for path in sorted(glob.glob(os.path.join(parts, "*.json"))):
  with open(path) as f:
    results[os.path.basename(path)[:-5]] = json.load(f)
with open(target + ".tmp", "w") as f:
  json.dump(results, f, indent=1)
os.replace(target + ".tmp", target)
MERGE
}

train_bench=(python3 -m mrl_jax.tools.benchmark_train "--steps=$steps" --warmup=5)
vit=(--sweep=vit_levers "--config=$vit_config" "--config.input.batch_size=$batch")
resnet=(--sweep=resnet_levers "--config=$resnet_config" "--config.input.batch_size=$batch")

echo "== $(date -u +%FT%TZ) git $(git rev-parse --short HEAD 2>/dev/null || echo '?')," \
     "stages $stages, budget $budget s"
[[ $dry_run == 1 ]] || nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"

for stage in ${stages//,/ }; do
  case $stage in
    headline)
      run 200 vit_headline "${train_bench[@]}" "${vit[@]}" "$torch_flag" \
        --only=baseline,all_model_options,all --profile=/tmp/prof_vit \
        "--out=$parts/vit_headline.json"
      run 120 resnet_headline "${train_bench[@]}" "${resnet[@]}" "$torch_flag" \
        --only=baseline,all --profile=/tmp/prof_resnet "--out=$parts/resnet_headline.json" ;;
    levers)
      run 240 vit_levers "${train_bench[@]}" "${vit[@]}" --notorch \
        --only=patch_matmul,attention_xla,attention_cudnn,attention_cudnn_nopad,drop_path_per_step,gelu_tanh,fp8,all_fp8,no_triton_gemm,cublaslt,triton_gemm_any,cudnn_layer_norm \
        "--out=$parts/vit_levers.json"
      run 60 resnet_levers "${train_bench[@]}" "${resnet[@]}" --notorch \
        --only=no_triton_gemm,cublaslt "--out=$parts/resnet_levers.json" ;;
    overhead)
      run 120 vit_overhead "${train_bench[@]}" "${vit[@]}" --notorch \
        --only=baseline,mrl_none,jft_classes,jft_classes_mrl_none "--out=$parts/vit_overhead.json"
      run 100 resnet_overhead "${train_bench[@]}" "${resnet[@]}" --notorch \
        --only=baseline,mrl_none,jft_classes,jft_classes_mrl_none \
        "--out=$parts/resnet_overhead.json" ;;
    e2e)
      for model in vit resnet; do
        config=$vit_config
        [[ $model == resnet ]] && config=$resnet_config
        run 90 "${model}_e2e" python3 -m mrl_jax.tools.benchmark_end_to_end \
          "--config=$config" "--config.input.batch_size=$batch" "--workers=$workers" \
          "--steps=$steps" --data_dir=/tmp/mrl_jax_e2e_shards "--out=$parts/${model}_e2e.json"
      done ;;
    *) echo "error: unknown stage '$stage' (headline, levers, overhead, e2e)"; exit 2 ;;
  esac
done
echo "== done in $((SECONDS - start)) s; results in $out"
