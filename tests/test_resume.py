"""Real training processes killed, preempted and resumed: the losses never notice."""

import json
import os
import random
import signal
import subprocess
import time

import pytest

from tests import cli_runner

pytestmark = pytest.mark.e2e
STEPS = 8
ARGS = ("--config=configs/vit_b16_i1k.py:runlocal", f"--config.total_steps={STEPS}",
        "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=2",
        "--config.model.options.stochastic_depth=0.1")  # rng state must resume too
# One device: compiles fastest (tests/test_checkpointing.py covers meshes). The runs share
# the session's compilation cache (tests/cpu_env.py): same programs, less waiting.
DEVICES = 1


def _args(workdir, *overrides):
  return (f"--workdir={workdir}", *ARGS, *overrides)


def _run(workdir, *overrides):
  return cli_runner.run_module("mrl_jax.main", *_args(workdir, *overrides),
                               devices=DEVICES)


def _run_until(workdir, marker, signum):
  """Starts a run, sends `signum` when a stderr line contains `marker`; (rc, stderr, secs)."""
  proc = cli_runner.popen_module("mrl_jax.main", *_args(workdir), stderr=subprocess.PIPE,
                                 text=True, devices=DEVICES)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if marker in line:
      proc.send_signal(signum)
      break
  sent = time.time()
  rest = proc.stderr.read()
  proc.wait(timeout=120)
  return proc.returncode, "".join(lines) + rest, time.time() - sent


def _losses(workdir):
  """{step: [every train/loss written for it]} (a resumed step is written twice)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if "train/loss" in record:
        out.setdefault(record["step"], []).append(record["train/loss"])
  return out


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


@pytest.mark.slow
def test_killed_and_preempted_run_resumes_to_identical_losses(tmp_path):
  reference = _run(tmp_path / "reference")
  assert reference.returncode == 0, reference.stderr[-3000:]
  expected = _losses(tmp_path / "reference")
  assert sorted(expected) == list(range(1, STEPS + 1))

  workdir = tmp_path / "interrupted"
  kill_at = random.randint(3, 5)
  # SIGKILL as the save of step `kill_at` starts: mid-write, or just after it.
  rc, err, _ = _run_until(workdir, f"Saving checkpoint step {kill_at} ", signal.SIGKILL)
  assert rc == -signal.SIGKILL, err[-3000:]
  resumable = max(_steps(workdir))
  # Saves run back to back here: the previous one may still have been in flight too.
  assert kill_at - 2 <= resumable <= kill_at, (kill_at, _steps(workdir))
  unfinished = [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n]

  # Preempted: SIGTERM two steps after resuming → that step is saved, exit 0.
  preempt_at = resumable + 2
  rc, err, secs = _run_until(workdir, f"step {preempt_at}/{STEPS}", signal.SIGTERM)
  assert rc == 0, err[-3000:]
  assert f"Resumed from {workdir / 'checkpoints' / str(resumable)} " in err
  assert all(f"{name}, a save that never completed" in err for name in unfinished), err
  stopped = max(_steps(workdir))
  assert stopped >= preempt_at and f"Stopped by SIGTERM after step {stopped}" in err
  assert secs < 60 and "Traceback" not in err

  final = _run(workdir)
  assert final.returncode == 0, final.stderr[-3000:]
  assert f"Resumed from {workdir / 'checkpoints' / str(stopped)} " in final.stderr
  got = _losses(workdir)
  assert sorted(got) == sorted(expected), (kill_at, got)
  for step, values in got.items():  # bit-identical, however often a step was replayed
    assert values == [expected[step][0]] * len(values), (kill_at, step, values)
  assert json.loads((workdir / "summary.json").read_text())["steps"] == STEPS


@pytest.mark.slow
def test_non_finite_steps_are_skipped_counted_and_stop_the_run_when_repeated(tmp_path):
  proc = _run(tmp_path, "--config.debug_poison_steps=(2,5,6,7)",
              "--config.checkpoint.max_nonfinite_in_a_row=3")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "error: Steps 5..7: 3 steps in a row had a non-finite loss" in proc.stderr
  assert "Traceback" not in proc.stderr
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  loss = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
  count = {r["step"]: r["train/nonfinite_steps"] for r in records if "train/loss" in r}
  assert [s for s in loss if loss[s] != loss[s]] == [2, 5, 6, 7]  # NaN exactly there
  # Each step's flag is read one step later (the loop never waits for it).
  assert [count[s] for s in range(1, 8)] == [0, 0, 1, 1, 1, 2, 3]
  # The run stopped before saving step 8; the checkpoints are readable.
  assert _steps(tmp_path) == [6, 7]
  assert f"The last checkpoint, {tmp_path}/checkpoints/7, is intact." in proc.stderr


def test_unwritable_workdir_fails_before_compiling(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  proc = _run(blocker / "workdir")
  assert proc.returncode == 1
  assert f"error: Cannot write checkpoints under --workdir={blocker / 'workdir'}" in proc.stderr
  assert "Traceback" not in proc.stderr and "Compiling" not in proc.stderr
