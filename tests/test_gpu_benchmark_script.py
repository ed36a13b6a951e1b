"""launch/gpu_benchmark.sh, dry: every command it would run on a GPU names a preset,
variants and flags that exist, and the budget skips what would not fit.

GPU time comes in one short call, so a typo found there costs the session; this runs the
script's own bash (DRY_RUN=1) and checks its commands against the programs here."""

import os
import re
import shlex
import subprocess

from mrl_jax.tools import benchmark_end_to_end, benchmark_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "gpu_benchmark.sh")


def _dry_run(tmp_path, *args, **env):
  proc = subprocess.run([SCRIPT, str(tmp_path / "out"), *args], cwd=ROOT, text=True,
                        capture_output=True, check=False,
                        env=dict(os.environ, DRY_RUN="1", **env))
  commands = {m.group(1): shlex.split(m.group(2)) for m in re.finditer(
      r"^== (\w+) \(\d+ s left\): (.*)$", proc.stdout, re.M)}
  return proc, commands


def _flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  return values[-1] if values else None


def test_every_command_names_what_exists(tmp_path):
  proc, commands = _dry_run(tmp_path)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert set(commands) == {f"{m}_{s}" for m in ("vit", "resnet")
                           for s in ("headline", "levers", "overhead", "e2e")}
  outs = set()
  for name, argv in commands.items():
    assert argv[:3] == ["python3", "-m", f"mrl_jax.tools.benchmark_"
                        + ("end_to_end" if name.endswith("e2e") else "train")], argv
    config = _flag(argv, "config")
    assert os.path.isfile(os.path.join(ROOT, config.split(":")[0])), config
    outs.add(_flag(argv, "out"))
    if name.endswith("e2e"):
      continue
    only = _flag(argv, "only").split(",")
    sweep = benchmark_train.load_sweep(_flag(argv, "sweep"), only)  # raises if a name is off
    assert [v["name"] for v in sweep["variants"]] == [n for n in (
        v["name"] for v in benchmark_train.load_sweep(_flag(argv, "sweep"))["variants"])
                                                      if n in only]
  assert len(outs) == len(commands)  # no run overwrites another's results
  e2e_flags = {a.split("=", 1)[0].lstrip("-") for a in commands["vit_e2e"][3:]}
  defined = set(benchmark_end_to_end.FLAG_NAMES) | {"config.input.batch_size"}
  assert e2e_flags <= defined, e2e_flags - defined


def test_the_budget_skips_what_does_not_fit_and_says_so(tmp_path):
  proc, commands = _dry_run(tmp_path, "headline,e2e", BUDGET_S="100")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "== skipped vit_headline: 100 s left of BUDGET_S=100" in proc.stdout
  assert set(commands) == {"vit_e2e", "resnet_e2e"}  # each fits in the 100 s


def test_unknown_stage_is_refused(tmp_path):
  proc, _ = _dry_run(tmp_path, "headline,lever")
  assert proc.returncode == 2
  assert "unknown stage 'lever'" in proc.stdout
