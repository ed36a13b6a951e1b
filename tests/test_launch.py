"""The TPU launchers as a user runs them: bash, with `--dry_run` or a fake `gcloud` on PATH.

The fake records every call and plays a queued resource whose slice is preempted, saves on
SIGTERM, fails or finishes, one behaviour per attempt, so the restart loop of
launch/tpu_queued.sh runs for real. No JAX, no network; shellcheck checks every script.
"""

import os
import shlex
import shutil
import signal
import stat
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
QUEUED = os.path.join(LAUNCH, "tpu_queued.sh")
POD = os.path.join(LAUNCH, "tpu_pod.sh")
OVERRIDES = ["--config.total_steps=10", "--config.mrl.nesting=(8,16)", "it's $HOME"]

# A queued resource in a directory: `state` holds its state, `attempts` counts the creates,
# `summary` is summary.json. $FAKE_SCENARIO gives the training command's behaviour per
# attempt (the last one repeats): ok, preempt, saved (exit 0 on SIGTERM), error.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
D=$FAKE_GCLOUD_DIR
# One write per call: the workers of a multi-host slice call gcloud at the same time.
line=$(printf '%q ' "$@"); printf '%s\n' "$line" >>"$D/calls"
case "$*" in
  "compute tpus queued-resources create "*)
    if [[ -n "$FAKE_NAME_TAKEN" ]]; then echo "ALREADY_EXISTS" >&2; exit 1; fi
    echo $(( $(cat "$D/attempts" 2>/dev/null || echo 0) + 1 )) >"$D/attempts"
    echo "${FAKE_CREATED_STATE:-ACTIVE}" >"$D/state" ;;
  "compute tpus queued-resources describe "*)
    cat "$D/state" 2>/dev/null || { echo "NOT_FOUND" >&2; exit 1; } ;;
  "compute tpus queued-resources delete "*) rm -f "$D/state" ;;
  "compute tpus tpu-vm describe "*) printf '10.0.0.1\n10.0.0.2\n' ;;
  "compute tpus tpu-vm scp "*)
    if [[ "$5" == *:* ]]; then echo "log of $5 $*" >"$6"; fi ;;
  "compute tpus tpu-vm ssh "*mrl_jax.main*)
    read -ra plan <<<"$FAKE_SCENARIO"
    n=$(cat "$D/attempts"); i=$(( n <= ${#plan[@]} ? n - 1 : ${#plan[@]} - 1 ))
    echo "training, attempt $n: ${plan[$i]}"
    case "${plan[$i]}" in
      ok) touch "$D/summary" ;;
      preempt) echo SUSPENDED >"$D/state"; exit 255 ;;
      saved) ;;
      error) exit 1 ;;
    esac ;;
  "compute tpus tpu-vm ssh "*) ;;
  "storage objects describe "*) if [[ -f "$D/summary" ]]; then echo 1700000000; else exit 1; fi ;;
  *) echo "fake gcloud: unexpected call: $*" >&2; exit 97 ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
  """(env, calls()): an environment with the fake gcloud first on PATH; calls() lists its
  invocations so far, each as its argument list."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  env = {k: v for k, v in os.environ.items()
         if k not in ("TPU_NAME", "ZONE", "PROJECT", "CONFIG", "WORKDIR", "LOG_DIR", "INSTALL")}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", HOME=str(tmp_path), TMPDIR=str(tmp_path),
             FAKE_GCLOUD_DIR=str(tmp_path), FAKE_SCENARIO="ok", MRL_LAUNCH_POLL_S="0")

  def calls():
    path = tmp_path / "calls"
    return [shlex.split(line) for line in path.read_text().splitlines()] if path.exists() else []

  return env, calls


def launch(script, *args, env):
  return subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=60, check=False)


def common(name, tmp_path, *extra):
  return (f"--name={name}", "--zone=us-central2-b", "--workdir=gs://bkt/runs/a",
          f"--log_dir={tmp_path / 'logs'}", *extra)


def kind(argv):
  """'create', 'describe', 'delete' (queued resource), 'vm-describe', 'scp', 'install',
  'train' or 'summary' for one gcloud argument list (without the leading 'gcloud')."""
  if argv[:3] == ["compute", "tpus", "queued-resources"]:
    return argv[3]
  if argv[:2] == ["storage", "objects"]:
    return "summary"
  verb = argv[3]
  if verb == "ssh":
    return "train" if "mrl_jax.main" in flag(argv, "--command") else "install"
  return {"describe": "vm-describe"}.get(verb, verb)


def flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def main_args(train_argv):
  """The arguments the workers pass to mrl_jax.main, as their shell parses --command."""
  words = shlex.split(flag(train_argv, "--command"))
  return words[words.index("mrl_jax.main") + 1:words.index("2>&1")]


def dry_run(script, *args, env):
  proc = launch(script, *args, "--dry_run", "--", *OVERRIDES, env=env)
  assert proc.returncode == 0, proc.stderr
  lines = [shlex.split(line) for line in proc.stdout.splitlines()]
  assert lines and all(line[0] == "gcloud" for line in lines), proc.stdout
  return [line[1:] for line in lines]


def test_dry_run_single_slice(fake, tmp_path):
  env, calls = fake
  cmds = dry_run(QUEUED, *common("mrl-a", tmp_path, "--project=proj", "--accelerator_type=v4-32",
                                 "--spot", "--config=configs/demo.py"), env=env)
  assert not calls(), "a dry run runs no gcloud"
  assert [kind(c) for c in cmds] == ["summary", "create", "describe", "scp", "install", "train",
                                     "summary", "vm-describe"] + ["scp"] * 4 + ["delete"]
  create = cmds[1]
  assert create[:4] == ["compute", "tpus", "queued-resources", "create"] and create[4] == "mrl-a"
  assert {"--node-id=mrl-a", "--spot", "--accelerator-type=v4-32", "--zone=us-central2-b",
          "--project=proj", "--runtime-version=tpu-ubuntu2204-base"} <= set(create)
  assert not [a for a in create if a.startswith("--node-count") or a == "--reserved"]
  assert cmds[3][5] == "mrl-a:/tmp/mrl_jax_src.tgz" and cmds[4][4] == cmds[5][4] == "mrl-a"
  assert all("--worker=all" in c for c in cmds[3:6])
  assert main_args(cmds[5]) == ["--distributed=on", "--config=configs/demo.py",
                                "--workdir=gs://bkt/runs/a", *OVERRIDES]
  assert "jax[tpu]==" in flag(cmds[4], "--command")
  # One log per worker of the v4-32's 4 hosts, then the queued resource goes.
  assert [flag(c, "--worker") for c in cmds[8:12]] == ["0", "1", "2", "3"]
  assert cmds[-1] == ["compute", "tpus", "queued-resources", "delete", "mrl-a",
                      "--zone=us-central2-b", "--project=proj", "--force", "--quiet"]


def test_dry_run_two_slices(fake, tmp_path):
  env, _ = fake
  cmds = dry_run(QUEUED, *common("mrl-b", tmp_path, "--accelerator_type=v5litepod-16",
                                 "--node_count=2", "--spot"), env=env)
  create = next(c for c in cmds if kind(c) == "create")
  assert {"--node-count=2", "--node-prefix=mrl-b", "--spot",
          "--accelerator-type=v5litepod-16"} <= set(create)
  assert not [a for a in create if a.startswith("--node-id")]
  for step in ("install", "train"):
    runs = [c for c in cmds if kind(c) == step]
    assert [c[4] for c in runs] == ["mrl-b-0", "mrl-b-1"] and all("--worker=all" in c for c in runs)
  uploads = [c for c in cmds if kind(c) == "scp" and "--worker=all" in c]
  assert [c[5].split(":")[0] for c in uploads] == ["mrl-b-0", "mrl-b-1"]
  trains = [c for c in cmds if kind(c) == "train"]
  assert main_args(trains[0]) == main_args(trains[1])  # the same program everywhere
  assert main_args(trains[0]) == ["--distributed=on", "--config=configs/demo.py",
                                  "--workdir=gs://bkt/runs/a", "--config.mesh.dcn_data=2",
                                  *OVERRIDES]  # data parallel across the two slices
  assert [c[4] for c in cmds if kind(c) == "delete"] == ["mrl-b"]


def test_local_workdir_and_stray_arguments_refused(fake, tmp_path):
  env, calls = fake
  for extra in (["--accelerator_type=v4-32"], ["--accelerator_type=v4-8", "--node_count=2"]):
    proc = launch(QUEUED, "--name=x", "--zone=z", "--workdir=/tmp/run", *extra, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "not a gs:// bucket" in proc.stderr and "share no disk" in proc.stderr
  proc = launch(QUEUED, "--name=x", "--zone=z", "--workdir=gs://b/r", "--config.total_steps=5",
                env=env)
  assert proc.returncode == 2 and "overrides go after --" in proc.stderr
  proc = launch(QUEUED, "--name=x", "--zone=z", "--workdir=gs://b/r", "--spot", "--reserved",
                env=env)
  assert proc.returncode == 2 and "exclude each other" in proc.stderr
  assert not calls()
  # An existing VM with 2 workers (the fake's) refuses a local workdir too.
  proc = launch(POD, "--name=vm", "--zone=z", "--workdir=/tmp/run", env=env)
  assert proc.returncode == 2 and "2 workers of vm share no disk" in proc.stderr
  assert [kind(c) for c in calls()] == ["vm-describe"]


@pytest.mark.parametrize("first", ["preempt", "saved"])
def test_restarts_after_preemption_and_resumes(fake, tmp_path, first):
  env, calls = fake
  env["FAKE_SCENARIO"] = f"{first} ok"
  proc = launch(QUEUED, *common("mrl-p", tmp_path, "--spot"), "--", *OVERRIDES, env=env)
  assert proc.returncode == 0, proc.stderr
  kinds = [kind(c) for c in calls()]
  attempt = ["create", "describe", "scp", "install", "train"]
  after_first = (["describe"] if first == "preempt"  # the slice is gone: no logs to fetch
                 else ["summary", "describe", "vm-describe", "scp", "scp"])
  finish = ["summary", "vm-describe", "scp", "scp", "delete"]
  assert kinds == ["summary", *attempt, *after_first, "delete", *attempt, *finish]
  trains = [c for c in calls() if kind(c) == "train"]
  assert main_args(trains[0]) == main_args(trains[1])  # the same command resumes
  assert "preempted; requesting the slice again" in proc.stderr
  logs = tmp_path / "logs"
  assert f"attempt 1: {first}" in (logs / "attempt-0" / "mrl-p.log").read_text()
  assert sorted(os.listdir(logs / "attempt-1")) == ["mrl-p-w0.log", "mrl-p-w1.log", "mrl-p.log"]


def test_gives_up_after_max_restarts(fake, tmp_path):
  env, calls = fake
  env["FAKE_SCENARIO"] = "preempt"
  proc = launch(QUEUED, *common("mrl-g", tmp_path, "--max_restarts=2"), env=env)
  assert proc.returncode == 1 and "giving up (--max_restarts=2)" in proc.stderr
  kinds = [kind(c) for c in calls()]
  assert kinds.count("create") == 3 and kinds.count("delete") == 3 and kinds[-1] == "delete"


def test_failure_on_an_active_slice_is_not_restarted(fake, tmp_path):
  env, calls = fake
  env["FAKE_SCENARIO"] = "error"
  proc = launch(QUEUED, *common("mrl-e", tmp_path, "--node_count=2", "--accelerator_type=v4-8"),
                env=env)
  assert proc.returncode == 1 and "not restarting" in proc.stderr
  kinds = [kind(c) for c in calls()]
  assert kinds.count("create") == 1 and kinds[-1] == "delete" and kinds.count("delete") == 1
  assert kinds.count("vm-describe") == 2  # the logs of both slices are fetched


def test_a_queued_resource_it_did_not_create_is_left_alone(fake, tmp_path):
  env, calls = fake
  env["FAKE_NAME_TAKEN"] = "1"
  proc = launch(QUEUED, *common("taken", tmp_path), env=env)
  assert proc.returncode == 1 and "could not request" in proc.stderr
  assert [kind(c) for c in calls()] == ["summary", "create"]


def test_interrupt_deletes_the_queued_resource(fake, tmp_path):
  env, calls = fake
  env.update(FAKE_CREATED_STATE="WAITING_FOR_RESOURCES", MRL_LAUNCH_POLL_S="0.05")
  proc = subprocess.Popen(["bash", QUEUED, *common("mrl-i", tmp_path)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 20
  while "describe" not in [kind(c) for c in calls()] and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=20)
  assert proc.returncode == 130, stderr
  assert kind(calls()[-1]) == "delete"


def test_tpu_pod_on_an_existing_vm(fake, tmp_path):
  env, calls = fake
  cmds = dry_run(POD, "--name=vm", "--zone=z", "--workdir=gs://b/r", env=env)
  assert [kind(c) for c in cmds] == ["vm-describe", "scp", "install", "train", "vm-describe",
                                     "scp"]
  assert main_args(cmds[3]) == ["--distributed=on", "--config=configs/demo.py",
                                "--workdir=gs://b/r", *OVERRIDES]
  proc = launch(POD, "--name=vm", "--zone=z", "--workdir=gs://b/r", "--no_install",
                f"--log_dir={tmp_path / 'logs'}", env=env)
  assert proc.returncode == 0, proc.stderr
  assert [kind(c) for c in calls()] == ["vm-describe", "train", "vm-describe", "scp", "scp"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
  scripts = sorted(os.path.join(LAUNCH, f) for f in os.listdir(LAUNCH) if not f.endswith(".md"))
  proc = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
