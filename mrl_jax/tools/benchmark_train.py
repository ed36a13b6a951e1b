"""Train-step throughput (img/s) of a config on synthetic device-resident batches.

Measures the jitted, sharded MRL train step alone: one batch of random uint8
images is placed on the devices once and fed to every step, so the number is
the model's, not the input pipeline's. Prints the device and versions with
the figures, and the MFU: the FLOPs XLA counts for one step of the compiled
program (per device) over the step time and the device's dense bf16 peak.

  python -m mrl_jax.tools.benchmark_train --config=configs/vit_b16_i1k.py:synthetic \
      --config.input.batch_size=256 --steps=50

`--sweep=<preset or file>` runs a list of named variants of a config (sweeps/*.json:
config overrides, XLA flags) and the PyTorch baseline, and prints one table. A
variant with XLA flags runs in its own process (XLA reads them at start-up): this
program again, with `--variant=NAME` and XLA_FLAGS set. `--profile=DIR` writes a
`jax.profiler` trace of a few steps and prints the top kernels by time.

  python -m mrl_jax.tools.benchmark_train --sweep=vit_levers --isolate --profile=/tmp/prof
"""

import collections
import copy
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Sequence

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from configs import common
from mrl_jax import cli, config_checks, experiment, sharding, xla_flags
from mrl_jax.errors import UserError
from mrl_jax.tools import benchmark_env

FLAGS = flags.FLAGS
SWEEPS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweeps")
ROW_PREFIX = "benchmark_row: "  # how a variant's process hands its result to the sweep
# Dense bf16 peak TFLOP/s per device, by a substring of `device_kind` (first match).
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("TPU v4", 275.0),
               ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0),
               ("TPU v5", 459.0), ("TPU v6 lite", 918.0), ("TPU v6e", 918.0))
PROFILE_STEPS = 3


def _define_flags() -> None:
  # Only when run as a program: importing `benchmark` (tests) defines no flags.
  config_flags.DEFINE_config_file("config", None, "Experiment config (path[:variant]); "
                                  "with --sweep, the base of every variant (default: the "
                                  "sweep's own config).")
  flags.DEFINE_integer("steps", 30, "Timed steps (after warm-up).")
  flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.")
  flags.DEFINE_string("sweep", None, f"A preset ({', '.join(presets())}) or a JSON file "
                      "of variants (see mrl_jax/tools/sweeps/).")
  flags.DEFINE_string("variant", None, "Run only this variant of --sweep, print its row.")
  flags.DEFINE_list("only", [], "Run only these variants of --sweep (comma-separated), "
                    "e.g. to fit a short GPU session.")
  flags.DEFINE_bool("isolate", False, "Run every variant in its own process (a clean "
                    "peak-memory figure each; variants with XLA flags always do).")
  flags.DEFINE_bool("torch", True, "Add the PyTorch baseline row when torch is importable.")
  flags.DEFINE_string("profile", None, "Write a jax.profiler trace here (a folder per "
                      "variant in a sweep) and print the top kernels by time.")
  flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device for the MFU "
                     "(default: from the device kind).")
  flags.DEFINE_string("out", None, "Also write the sweep's rows to this JSON file.")


def presets() -> list:
  return sorted(f[:-5] for f in os.listdir(SWEEPS_DIR) if f.endswith(".json"))


def peak_tflops(device_kind: str, override=None):
  """Dense bf16 TFLOP/s of one device, or None (CPU, unknown kinds)."""
  if override:
    return float(override)
  return next((v for k, v in PEAK_TFLOPS if k.lower() in device_kind.lower()), None)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def _peak_bytes():
  stats = jax.local_devices()[0].memory_stats()
  return (stats or {}).get("peak_bytes_in_use")


def benchmark(config, num_steps: int, warmup: int, *, profile_dir=None,
              peak=None) -> dict:
  mesh = sharding.make_mesh(config.mesh)
  config_checks.check_config(config, sharding.data_parallel_size(mesh))
  # Only the learning-rate values depend on the length; keep the config's warm-up valid.
  length = max(num_steps + warmup + PROFILE_STEPS + 1, config.optim.warmup_steps + 1)
  exp = experiment.build_experiment(config, mesh, length)
  state, batch_sharding = exp.state, exp.batch_sharding
  b, s = config.input.batch_size, config.input.image_size
  rng = np.random.default_rng(0)
  labels = rng.integers(0, config.num_classes, b, np.int32)
  if config.input.multi_label:  # a few positives per image, as in JFT
    labels = np.zeros((b, config.num_classes), np.int32)
    labels[np.arange(b)[:, None], rng.integers(0, config.num_classes, (b, 3))] = 1
  batch = {"image": jax.device_put(rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
                                   batch_sharding),
           "label": jax.device_put(labels, batch_sharding)}
  start = time.perf_counter()
  # Compiled ahead, so that its cost analysis is the program that runs.
  train_step = exp.train_step.lower(state, batch).compile()
  state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(num_steps):
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  elapsed = time.perf_counter() - start
  kernels = None
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      for _ in range(PROFILE_STEPS):
        state, metrics = train_step(state, batch)
      jax.block_until_ready(metrics)
    kernels = kernel_table(_newest_xplane(profile_dir))
  device = jax.devices()[0]
  flops, step_s = _flops(train_step), elapsed / num_steps
  peak_tf = peak_tflops(device.device_kind, peak)
  peak_bytes = _peak_bytes()
  return {"model": f"{config.model.name} {config.model.variant}", "mode": config.mrl.mode,
          "dtype": config.model.dtype, "batch": b, "image_size": s,
          "devices": benchmark_env.devices(),
          "jax": jax.__version__, "flax": benchmark_env.versions()["flax"],
          "compile_s": round(compile_s, 2), "step_ms": round(1000 * step_s, 2),
          "img_per_sec": round(b * num_steps / elapsed, 1),
          "tflop_per_step": flops / 1e12,  # per device, as XLA counts the program
          "mfu": flops / step_s / (peak_tf * 1e12) if peak_tf and flops else None,
          "peak_gib": peak_bytes / 2**30 if peak_bytes is not None else None,
          "final_loss": float(metrics["loss"]), "kernels": kernels,
          "custom_calls": custom_call_targets(train_step.as_text())}


def custom_call_targets(hlo_text: str) -> list:
  """The library kernels the compiled step calls (e.g. `__cudnn$fmha...` for cuDNN's
  fused attention, `__cublas$lt$matmul...`): the proof that a lever took effect."""
  return sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo_text)))


def _newest_xplane(profile_dir: str) -> str:
  files = glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise UserError(f"jax.profiler wrote no *.xplane.pb under {profile_dir}.")
  return max(files, key=os.path.getmtime)


def kernel_table(xplane_path: str, top: int = 15) -> list:
  """[(name, count, total ms, % of the total)] of the costliest ops in a trace.

  Device planes' "XLA Ops" lines where there are some (GPU, TPU: one event per op
  launch); otherwise (CPU) every event that names its HLO op."""
  space = jax.profiler.ProfileData.from_file(xplane_path)
  events = [(e.name, e.duration_ns) for p in space.planes if p.name.startswith("/device:")
            for line in p.lines if line.name == "XLA Ops" for e in line.events]
  if not events:
    events = [(e.name, e.duration_ns) for p in space.planes for line in p.lines
              for e in line.events if any(k == "hlo_op" for k, _ in e.stats)]
  total_ns, count = collections.Counter(), collections.Counter()
  for name, ns in events:
    total_ns[name] += ns
    count[name] += 1
  whole = sum(total_ns.values()) or 1
  return [(name, count[name], ns / 1e6, 100 * ns / whole)
          for name, ns in total_ns.most_common(top)]


def format_kernels(kernels: list) -> str:
  lines = [f"{'kernel':<60} {'count':>6} {'ms':>10} {'%':>6}"]
  lines += [f"{name[:60]:<60} {n:>6} {ms:>10.3f} {pct:>6.1f}" for name, n, ms, pct in kernels]
  return "\n".join(lines)


# --- sweeps ---------------------------------------------------------------------------

def load_sweep(name_or_path: str, only: Sequence[str] = ()) -> dict:
  """{"config": "path[:variant]", "torch": "vit_b16", "variants": [{"name",
  "overrides": {dotted key: value}, "xla_flags": "--flag=value ..."}, ...]};
  `only`: keep just these variants (in the sweep's order)."""
  path = name_or_path if os.path.isfile(name_or_path) else os.path.join(
      SWEEPS_DIR, f"{name_or_path}.json")
  if not os.path.isfile(path):
    raise UserError(f"No sweep {name_or_path!r}: give a JSON file or one of {presets()}.")
  with open(path) as f:
    sweep = json.load(f)
  names = [v["name"] for v in sweep["variants"]]
  if len(set(names)) != len(names):
    raise UserError(f"Sweep {path} repeats a variant name: {names}.")
  for v in sweep["variants"]:
    unknown = set(v) - {"name", "overrides", "xla_flags"}
    if unknown:
      raise UserError(f"Variant {v['name']!r} of {path} has unknown keys {sorted(unknown)}.")
  if only:
    missing = sorted(set(only) - set(names))
    if missing:
      raise UserError(f"--only names {missing}, not in sweep {path}; its variants: {names}.")
    sweep["variants"] = [v for v in sweep["variants"] if v["name"] in set(only)]
  return sweep


def load_config(spec: str):
  """`configs/x.py:arg` → its get_config(arg), as --config loads it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_sweep_config", path)
  if module_spec is None:
    raise UserError(f"Cannot load the sweep's config {spec!r}.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def variant_config(base, variant: dict):
  config = copy.deepcopy(base)
  config.unlock()
  return common.apply_overrides(config, variant.get("overrides", {}))


def _run_child(args: list, env_extra: dict, name: str) -> dict:
  """Runs `python *args`; its row is the last JSON line of its output (a variant's
  prefixed with ROW_PREFIX, the torch baseline's bare), or an error row."""
  proc = subprocess.run([sys.executable, *args], env=dict(os.environ, **env_extra),
                        capture_output=True, text=True, check=False)
  rows = [line.removeprefix(ROW_PREFIX) for line in proc.stdout.splitlines()]
  rows = [line for line in rows if line.startswith("{")]
  if proc.returncode or not rows:
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"variant": name, "error": f"exit {proc.returncode}: {tail[-200:]}"}
  return json.loads(rows[-1])


def _child_args(argv: list, variant: str) -> list:
  """A command line (this program's `argv`, sweep flags and all) for one variant."""
  args = [a for a in argv if not a.startswith(("--variant", "--out", "--isolate",
                                               "--noisolate", "--torch", "--notorch"))]
  return ["-m", "mrl_jax.tools.benchmark_train", *args, f"--variant={variant}"]


def _torch_row(model: str, batch: int, steps: int, warmup: int) -> dict:
  name = f"torch.compile {model}"
  missing = [m for m in ("timm", "torchvision") if importlib.util.find_spec(m) is None]
  if missing:
    return {"variant": name, "error": f"skipped: the baseline needs {', '.join(missing)}"}
  row = _run_child(["-m", "mrl_jax.tools.benchmark_torch_baseline", f"--model={model}",
                    f"--batch_size={batch}", f"--steps={steps}", f"--warmup={warmup}"],
                   {}, name)
  row["variant"] = name
  return row


def run_variant(base, variant: dict, steps: int, warmup: int, profile, peak) -> dict:
  profile_dir = os.path.join(profile, variant["name"]) if profile else None
  try:
    row = benchmark(variant_config(base, variant), steps, warmup, profile_dir=profile_dir,
                    peak=peak)
  except Exception as e:  # pylint: disable=broad-except  # a row, not the end of the sweep
    row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
  row.update(variant=variant["name"], xla_flags=os.environ.get("XLA_FLAGS", ""))
  return row


def sweep(sweep_def: dict, base, steps: int, warmup: int, *, argv: list, isolate=False,
          torch=True, profile=None, peak=None) -> list:
  """The rows of every variant, in the sweep's order. `argv`: the command line that
  gave this sweep (a variant's process reruns it with --variant). Processes first: the
  torch baseline and the variants with XLA flags run before this process touches the
  accelerator (JAX preallocates most of a GPU's memory)."""
  rows, torch_key = {}, object()  # a key no variant name can take
  if torch and sweep_def.get("torch") and importlib.util.find_spec("torch"):
    rows[torch_key] = _torch_row(sweep_def["torch"], base.input.batch_size, steps, warmup)
  inherited = os.environ.get("XLA_FLAGS", "")
  for v in sweep_def["variants"]:
    if v.get("xla_flags") or isolate:
      # One value per flag: the variant's replaces an inherited one of the same name.
      flags_ = xla_flags.merge(v.get("xla_flags", ""), shlex.split(inherited))
      rows[v["name"]] = _run_child(_child_args(argv, v["name"]), {"XLA_FLAGS": flags_},
                                   v["name"])
  for v in sweep_def["variants"]:
    if v["name"] not in rows:
      rows[v["name"]] = run_variant(base, v, steps, warmup, profile, peak)
  order = [v["name"] for v in sweep_def["variants"]] + [torch_key] * (torch_key in rows)
  out = [rows[name] for name in order]
  _share_model_flops(out, peak)
  return out


def _share_model_flops(rows: list, peak) -> None:
  """MFU counts the model's FLOPs, not a variant's: every row of the same work (batch,
  image size) is scored with the first row's XLA count, since fused kernels (cuDNN
  attention) are custom calls whose FLOPs XLA does not see."""
  ref = next((r for r in rows if r.get("tflop_per_step")), None)
  if ref is None:
    return
  for r in rows:
    if "error" in r or (r.get("batch"), r.get("image_size")) != (ref["batch"],
                                                                 ref["image_size"]):
      continue
    count, _, kind = r["devices"].partition(" x ")
    if not kind and not ref["devices"].startswith("1 x "):
      continue  # the torch baseline runs the whole batch on one device: not comparable
    kind = kind or count
    peak_tf = peak_tflops(kind, peak)
    r["mfu"] = (ref["tflop_per_step"] * 1e12 / (r["step_ms"] / 1e3) / (peak_tf * 1e12)
                if peak_tf else None)


def format_table(rows: list) -> str:
  fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
  head = f"{'variant':<28} {'img/s':>9} {'ms/step':>9} {'MFU':>6} {'peak GiB':>9} {'compile s':>9}"
  lines = [head, "-" * len(head)]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['variant'][:28]:<28} failed: {r['error']}")
      continue
    mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    lines.append(f"{r['variant'][:28]:<28} {r['img_per_sec']:>9.1f} {r['step_ms']:>9.2f} "
                 f"{mfu:>6} {fmt(r.get('peak_gib'), '.2f'):>9} "
                 f"{r['compile_s']:>9.1f}")
  done = [r for r in rows if "error" not in r]
  lines += [f"custom calls, {r['variant']}: {', '.join(r['custom_calls'])}"
            for r in done if r.get("custom_calls")]
  devices = sorted({r["devices"] for r in done})
  lines.append(f"device: {', '.join(devices) or 'n/a'}; batch {done[0]['batch'] if done else '?'}")
  lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in benchmark_env.versions().items()))
  return "\n".join(lines)


def main(argv):
  del argv
  if not FLAGS.sweep:
    if FLAGS.config is None:
      raise UserError("Give --config (one run) or --sweep (a table of variants).")
    result = benchmark(FLAGS.config, FLAGS.steps, FLAGS.warmup, profile_dir=FLAGS.profile,
                       peak=FLAGS.peak_tflops)
    kernels = result.pop("kernels")
    print(json.dumps(result), flush=True)
    if kernels:
      print(format_kernels(kernels), flush=True)
    return
  sweep_def = load_sweep(FLAGS.sweep, FLAGS.only)
  if FLAGS.config is None and not sweep_def.get("config"):
    raise UserError(f"Sweep {FLAGS.sweep!r} names no config: give --config.")
  base = FLAGS.config if FLAGS.config is not None else load_config(sweep_def["config"])
  if FLAGS.variant:
    variant = next((v for v in sweep_def["variants"] if v["name"] == FLAGS.variant), None)
    if variant is None:
      raise UserError(f"No variant {FLAGS.variant!r} in sweep {FLAGS.sweep!r}.")
    row = run_variant(base, variant, FLAGS.steps, FLAGS.warmup, FLAGS.profile,
                      FLAGS.peak_tflops)
    print(ROW_PREFIX + json.dumps(row), flush=True)
    return
  rows = sweep(sweep_def, base, FLAGS.steps, FLAGS.warmup, argv=sys.argv[1:],
               isolate=FLAGS.isolate,
               torch=FLAGS.torch, profile=FLAGS.profile, peak=FLAGS.peak_tflops)
  print(format_table(rows), flush=True)
  for r in rows:
    if r.get("kernels"):
      print(f"\ntop kernels, {r['variant']} ({PROFILE_STEPS} steps):\n"
            + format_kernels(r["kernels"]), flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
