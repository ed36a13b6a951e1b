"""The multi-host tests: real `jax.distributed` processes on this machine.

Each process is `python -m mrl_jax.<cli>` with explicit coordinator flags and its
own fake CPU devices, so collectives cross a process boundary (gloo TCP, jax's
CPU default) exactly as they cross hosts on a pod. The runs set
`mesh.dcn_data=2`: each process is one slice of the 'data' axis, as each slice
of a multi-slice TPU job is.

One two-process training run (the `reference` fixture) serves every test: the
first checks it against one process, the preemption test's resumed run must
match its losses bit for bit, the hung-process and evaluation tests read its
checkpoint.
"""

import json
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import portpicker
import pytest

from configs import vit_b16_i1k
from mrl_jax import config_checks, data, experiment, sharding
from mrl_jax.data import pipeline
from mrl_jax.embeddings import read_embeddings
from tests import cli_runner

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
_PROCESSES = 2
_LOCAL_DEVICES = 2
_TIMEOUT_S = 240
# The smallest model (ViT mu/4 on synthetic images) compiles fastest. No time-triggered
# saves: the checkpoints are the same however slow the machine.
_CONFIG = "--config=configs/vit_b16_i1k.py:runlocal"
_TRAIN = (_CONFIG, "--config.mesh.dcn_data=2", "--config.checkpoint.every_minutes=0")
_STEPS = 4  # runlocal's total_steps
_VAL = 64  # runlocal's synthetic val split
_HEARTBEAT_S = 10  # --heartbeat_timeout_seconds of the run whose peer is killed
_DEVICES_RE = re.compile(r"process (\d+)/(\d+), (\d+) local / (\d+) global devices")
_STEP_RE = re.compile(r"step (\d+)/\d+ \| loss ([\d.]+)")
_EVAL_RE = re.compile(r"eval @ step \d+ \((\d+) examples")
_STOPPED_RE = re.compile(r"Stopped by .* after step (\d+); its checkpoint")
_STARTED = []  # Every process the tests started, killed at the end of each test if alive.


@pytest.fixture(autouse=True)
def _kill_leftovers():
  yield
  for proc in _STARTED:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


class _Launch:
  """One command started as every process of a run (one process: no distributed
  flags). Output goes to a file per process: a full pipe would block the child.

  Compiling dominates these runs (a ViT mu/4, four steps), so they compile as the
  pytest process does (`fast_compile`). The processes of a run compile without the
  session's compilation cache: JAX writes it from process 0 only and, on CPU, the
  other processes' keys differ, so a warm cache would speed up process 0 alone, which
  would then wait at the first collective for the others, past gloo's 30 s
  rendezvous timeout on a busy machine. The run takes as long either way.
  """

  def __init__(self, tmp_path, name, module, *args, processes=_PROCESSES,
               devices=_LOCAL_DEVICES):
    port = portpicker.pick_unused_port()
    distributed = ((f"--coordinator_address=localhost:{port}", f"--num_processes={processes}")
                   if processes > 1 else ())
    env = {"JAX_ENABLE_COMPILATION_CACHE": "false"} if processes > 1 else {}
    self.logs = [tmp_path / f"{name}.process{i}.log" for i in range(processes)]
    self.procs = []
    for i, log in enumerate(self.logs):
      with open(log, "wb") as f:
        self.procs.append(cli_runner.popen_module(
            module, *args, *distributed, *([f"--process_id={i}"] if distributed else []),
            devices=devices, fast_compile=True, env_extra=env, stdout=f,
            stderr=subprocess.STDOUT))
    _STARTED.extend(self.procs)

  def texts(self):
    return [log.read_text(errors="replace") for log in self.logs]

  def dump(self):
    return "\n".join(f"===== process {i} (exit {p.poll()}) =====\n{text[-6000:]}"
                     for i, (p, text) in enumerate(zip(self.procs, self.texts())))

  def wait_for(self, process, marker):
    """Until `marker` is in that process's output (False: it exited first)."""
    deadline = time.time() + _TIMEOUT_S
    while time.time() < deadline:
      if marker in self.logs[process].read_text(errors="replace"):
        return True
      if self.procs[process].poll() is not None:
        return False
      time.sleep(0.2)
    return False

  def exit_code(self, process, timeout):
    """That process's exit code; None if it ran `timeout` seconds more (it is killed)."""
    try:
      return self.procs[process].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.procs[process].kill()
      self.procs[process].wait()
      return None

  def wait(self, timeout=_TIMEOUT_S):
    """Exit codes; once one fails or time runs out, the rest would hang on it: killed."""
    deadline, codes = time.time() + timeout, []
    while time.time() < deadline:
      codes = [p.poll() for p in self.procs]
      if all(c is not None for c in codes) or any(c for c in codes):
        break
      time.sleep(0.2)
    if any(c for c in codes if c is not None):
      time.sleep(5)  # Let the others report the failure too.
    for p in self.procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    return [p.returncode for p in self.procs]


def _train_losses(workdir):
  """{step: [every train/loss written for it]} (a resumed step is written twice)."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "train/loss" in record:
      out.setdefault(record["step"], []).append(record["train/loss"])
  return out


def _checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted two-process run: (launch, exit codes, workdir)."""
  tmp = tmp_path_factory.mktemp("reference")
  workdir = tmp / "workdir"  # Shared, as checkpoints need (a shared file system).
  run = _Launch(tmp, "train", "mrl_jax.main", *_TRAIN, f"--workdir={workdir}")
  return run, run.wait(), workdir


def _one_process_losses(steps):
  """train/loss of the same run in this process over its 8 devices (mesh.dcn_data=1),
  each global batch the two processes' data shards side by side, as they build it."""
  config = vit_b16_i1k.get_config("runlocal")
  mesh = sharding.make_mesh(config.mesh)
  source = data.build_source(config.input, "train", num_classes=config.num_classes)
  exp = experiment.build_experiment(config, mesh, config_checks.total_steps(config, len(source)))
  preprocess = data.build_preprocess(config.input, "train", num_classes=config.num_classes)
  shards = [pipeline.train_iterator(source, preprocess, global_batch=config.input.batch_size,
                                    seed=config.seed, num_classes=config.num_classes,
                                    shard=(i, _PROCESSES)) for i in range(_PROCESSES)]
  state, losses = exp.state, []
  for _ in range(steps):
    parts = [next(shard) for shard in shards]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, metrics = exp.train_step(state, pipeline.to_global(batch, exp.batch_sharding))
    losses.append(float(metrics["loss"]))
  return losses


def test_two_process_run_is_one_global_system(reference):
  run, codes, workdir = reference
  dump = run.dump()
  assert codes == [0] * _PROCESSES, dump
  logs = run.texts()

  # One global system: every process sees the sum of all processes' devices, and
  # the 'data' axis spans both slices.
  global_devices = _PROCESSES * _LOCAL_DEVICES
  for i, text in enumerate(logs):
    match = _DEVICES_RE.search(text)
    assert match, dump
    assert [int(g) for g in match.groups()] == [i, _PROCESSES, _LOCAL_DEVICES,
                                                global_devices], dump
    assert (f"Mesh {{'data': {global_devices}, 'fsdp': 1, 'model': 1}} over "
            f"{global_devices} devices ({_PROCESSES} processes)") in text, dump

  # One global step, not independent runs: every process logs the same losses.
  losses = [_STEP_RE.findall(text) for text in logs]
  assert losses[0] and all(l == losses[0] for l in losses), dump
  # runlocal evaluates 2 global batches of 16; each process holds only half.
  assert all(_EVAL_RE.findall(text) == ["32"] for text in logs), dump

  # Process 0 writes the logs and results; each process saves its own data state.
  for name in ("config.json", "summary.json", "results.json", "metrics.jsonl"):
    assert (workdir / name).is_file(), (name, sorted(p.name for p in workdir.iterdir()))
  data_states = sorted(p.name for p in (workdir / "checkpoints" / str(_STEPS) / "data")
                       .iterdir() if p.name.startswith("process_"))
  assert data_states == [f"process_{i}-of-{_PROCESSES}.json" for i in range(_PROCESSES)]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == _STEPS and len(summary["top1"]) == len(summary["dims"])
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == list(range(1, _STEPS + 1)), records  # Each once: one writer.
  assert any("val/top1_d8" in r for r in records), records

  # The two-slice mesh computes what one process's plain 8-device mesh does.
  # Steps 1-3: the loss before any update, after a zero-lr (warmup) one and after a real one.
  got = [v[0] for _, v in sorted(_train_losses(workdir).items())][:3]
  np.testing.assert_allclose(got, _one_process_losses(3), rtol=1e-4)


def test_sigterm_stops_all_at_one_step_and_a_killed_peer_stops_the_rest(reference, tmp_path):
  _, codes, ref_workdir = reference
  assert codes == [0] * _PROCESSES
  expected = _train_losses(ref_workdir)
  workdir = tmp_path / "workdir"
  args = (*_TRAIN, f"--workdir={workdir}", f"--heartbeat_timeout_seconds={_HEARTBEAT_S}")

  # SIGTERM to process 1 only: JAX's preemption service agrees on one step, every
  # process saves that step and exits 0.
  run = _Launch(tmp_path, "preempted", "mrl_jax.main", *args)
  assert run.wait_for(1, "Compiling the train step"), run.dump()
  run.procs[1].send_signal(signal.SIGTERM)
  assert run.wait() == [0] * _PROCESSES, run.dump()
  stopped = [_STOPPED_RE.findall(text) for text in run.texts()]
  assert stopped[0] and stopped[0] == stopped[1], run.dump()
  step = int(stopped[0][0])
  assert step < _STEPS and _checkpoint_steps(workdir) == [step], run.dump()

  # The rerun resumes there with the reference's losses, bit for bit. Then process 1
  # is killed: process 0 must not wait on it forever.
  run = _Launch(tmp_path, "resumed", "mrl_jax.main", *args)
  assert run.wait_for(0, f"step {_STEPS}/{_STEPS}"), run.dump()
  run.procs[1].send_signal(signal.SIGKILL)
  killed = time.time()
  code = run.exit_code(0, timeout=_HEARTBEAT_S + 60)
  waited = time.time() - killed
  assert run.exit_code(1, timeout=10) == -signal.SIGKILL
  survivor = run.texts()[0]
  assert code not in (0, None) and waited < _HEARTBEAT_S + 30, (code, waited, run.dump())
  # A collective that fails with the peer (gloo raises) is reported by mrl_jax.cli; one
  # that would hang is ended by JAX's heartbeat check (the next test).
  assert ("another process that died" in survivor
          or "This most likely indicates that another task died" in survivor), run.dump()
  assert f"Resumed from {workdir / 'checkpoints' / str(step)} " in survivor, run.dump()
  got = _train_losses(workdir)
  assert sorted(got) == list(range(1, _STEPS + 1)), got
  for s, values in got.items():
    assert values == [expected[s][0]] * len(values), (s, values, expected[s])


def test_a_hung_process_is_declared_dead_after_the_heartbeat_timeout(reference, tmp_path):
  """SIGSTOP: the peer's sockets stay open, so the survivor's collective just waits, as
  NCCL's and ICI's do for a dead host; JAX's coordination service must end it."""
  _, codes, ref_workdir = reference
  assert codes == [0] * _PROCESSES
  heartbeat = 5
  run = _Launch(tmp_path, "embed", "mrl_jax.embed", *_TRAIN, f"--workdir={ref_workdir}",
                f"--out={tmp_path / 'embeddings'}", f"--heartbeat_timeout_seconds={heartbeat}")
  assert run.wait_for(1, f"process 1/{_PROCESSES},"), run.dump()  # jax.distributed is up
  run.procs[1].send_signal(signal.SIGSTOP)
  stopped = time.time()
  code = run.exit_code(0, timeout=heartbeat + 60)
  waited = time.time() - stopped
  run.procs[1].kill()
  assert code not in (0, None) and waited < heartbeat + 30, (code, waited, run.dump())
  survivor = run.texts()[0]
  assert "stopped sending heartbeats" in survivor, run.dump()
  assert "This most likely indicates that another task died" in survivor, run.dump()


def test_evaluate_on_two_processes_equals_one_process(reference, tmp_path):
  _, codes, ref_workdir = reference
  assert codes == [0] * _PROCESSES
  one, two = tmp_path / "one", tmp_path / "two"
  for workdir in (one, two):  # Each its own outputs; the reference stays as it was.
    shutil.copytree(ref_workdir / "checkpoints", workdir / "checkpoints")
  # Side by side: one process on as many devices, and two processes. Each embeds val
  # (restore.embed_split, as `python -m mrl_jax.embed` does), keeps the files and
  # evaluates.
  single = _Launch(tmp_path, "one", "mrl_jax.evaluate", _CONFIG, f"--workdir={one}",
                   processes=1, devices=_PROCESSES * _LOCAL_DEVICES)
  double = _Launch(tmp_path, "two", "mrl_jax.evaluate", *_TRAIN, f"--workdir={two}")
  assert double.wait() == [0] * _PROCESSES, double.dump()
  assert single.wait() == [0], single.dump()

  # The same rows, whichever process wrote them (each writes its own shard files).
  a, b = (read_embeddings(str(w / "embeddings" / f"step_{_STEPS}" / "val")) for w in (one, two))
  assert len(a.ids) == _VAL and sorted(a.ids) == sorted(b.ids), (len(a.ids), len(b.ids))
  a_order, b_order = np.argsort(a.ids), np.argsort(b.ids)
  np.testing.assert_array_equal(a.labels[a_order], b.labels[b_order])
  np.testing.assert_allclose(a.z[a_order], b.z[b_order], rtol=1e-5, atol=1e-6)

  def results(text):  # The JSON line process 0 prints at the end.
    return json.loads([l for l in text.splitlines() if l.startswith('{"step"')][-1])

  r1, r2 = results(single.texts()[0]), results(double.texts()[0])
  assert r1["step"] == r2["step"] == _STEPS and r1["results"], (r1, r2)
  assert r1["results"].keys() == r2["results"].keys(), (r1, r2)
  for name, metrics in r1["results"].items():
    assert metrics.keys() == r2["results"][name].keys(), (r1, r2)
    for key, value in metrics.items():
      np.testing.assert_allclose(r2["results"][name][key], value, rtol=1e-5, err_msg=key)
