"""The multi-host test: two real `jax.distributed` processes on this machine.

Each process is `python -m mrl_jax.main` with explicit coordinator flags and its
own fake CPU devices, so the step's all-reduces cross a process boundary (gloo
TCP collectives, jax's CPU default) exactly as they cross hosts on a pod.
"""

import json
import os
import re
import subprocess
import time

import portpicker
import pytest

from tests import cli_runner

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
_NUM_PROCESSES = 2
_LOCAL_DEVICES = 2
_TIMEOUT_S = 240
_DEVICES_RE = re.compile(r"process (\d+)/(\d+), (\d+) local / (\d+) global devices")
_STEP_RE = re.compile(r"step (\d+)/\d+ \| loss ([\d.]+)")
_EVAL_RE = re.compile(r"eval @ step \d+ \((\d+) examples")


def _launch(tmp_path):
  """Starts every process; returns [(Popen, log path, workdir)]."""
  port = portpicker.pick_unused_port()
  procs = []
  workdir = tmp_path / "workdir"  # Shared, as checkpoints need (a shared file system).
  for i in range(_NUM_PROCESSES):
    log = tmp_path / f"process{i}.log"
    with open(log, "wb") as f:  # A file, not a pipe: a full pipe would block the child.
      proc = cli_runner.popen_module(
          "mrl_jax.main", "--config=configs/demo.py:runlocal", f"--workdir={workdir}",
          f"--coordinator_address=localhost:{port}", f"--num_processes={_NUM_PROCESSES}",
          f"--process_id={i}", devices=_LOCAL_DEVICES, stdout=f, stderr=subprocess.STDOUT)
      procs.append((proc, log, workdir))
  return procs


def _wait(procs):
  """Waits for all; once one fails or time runs out, the rest would hang on it."""
  deadline, codes = time.time() + _TIMEOUT_S, []
  while time.time() < deadline:
    codes = [p.poll() for p, _, _ in procs]
    if all(c is not None for c in codes) or any(c for c in codes):
      break
    time.sleep(0.5)
  if any(c for c in codes if c is not None):
    time.sleep(5)  # Let the others report the failure too.
  for p, _, _ in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  return [p.returncode for p, _, _ in procs]


def _logs(procs):
  return [log.read_text(errors="replace") for _, log, _ in procs]


def test_two_process_cpu_run(tmp_path):
  procs = _launch(tmp_path)
  codes = _wait(procs)
  logs = _logs(procs)
  dump = "\n".join(f"===== process {i} (exit {c}) =====\n{text[-6000:]}"
                   for i, (c, text) in enumerate(zip(codes, logs)))
  assert codes == [0] * _NUM_PROCESSES, dump

  # One global system: every process sees the sum of all processes' devices.
  for i, text in enumerate(logs):
    match = _DEVICES_RE.search(text)
    assert match, dump
    assert [int(g) for g in match.groups()] == [
        i, _NUM_PROCESSES, _LOCAL_DEVICES, _NUM_PROCESSES * _LOCAL_DEVICES], dump
    assert f"over {_NUM_PROCESSES * _LOCAL_DEVICES} devices ({_NUM_PROCESSES} processes)" \
        in text, dump

  # One global step, not independent runs: every process logs the same losses.
  losses = [_STEP_RE.findall(text) for text in logs]
  assert losses[0] and all(l == losses[0] for l in losses), dump
  # runlocal evaluates 2 global batches of 16; each process holds only half.
  assert all(_EVAL_RE.findall(text) == ["32"] for text in logs), dump

  # Process 0 writes the logs and results; each process saves its own data state.
  workdir0 = procs[0][2]
  for name in ("config.json", "summary.json", "results.json", "metrics.jsonl"):
    assert (workdir0 / name).is_file(), (name, sorted(os.listdir(workdir0)))
  data_states = sorted(p.name for p in (workdir0 / "checkpoints" / "4" / "data").iterdir()
                       if p.name.startswith("process_"))
  assert data_states == [f"process_{i}-of-{_NUM_PROCESSES}.json"
                         for i in range(_NUM_PROCESSES)], data_states

  summary = json.loads((workdir0 / "summary.json").read_text())
  assert summary["steps"] == 4 and len(summary["top1"]) == len(summary["dims"])
  records = [json.loads(line) for line in (workdir0 / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == [1, 2, 3, 4], records  # Each once: written by one process only.
  assert any("val/top1_d8" in r for r in records), records
