"""Training quality with every ViT speed option on: the digits, trained by `mrl_jax.main`
with the plain path and with all the levers, end at the same per-dim accuracy.

The levers change the numerics (FP8 matmuls, tanh GELU, one stochastic-depth draw per
step), so the two runs are not equal; what must hold is that neither learns worse.
Measured on 2 CPU cores (seeds 0 and 1, 20 epochs): plain 0.92–0.94 at d ≥ 4,
levers 0.91–0.93; d=2 moves by ±0.06 between seeds of either."""

import json

import pytest

from tests import cli_runner

CONFIG = '''
import ml_collections
from configs import demo

LEVERS = dict(patch_embed="matmul", attention="xla", drop_path_draw="per_step",
              gelu="tanh", matmul="fp8")


def get_config(arg):
  c = demo.get_config()
  c.model.name, c.model.variant, c.model.neck_dim = "vit", "mu/4", 32
  c.mrl.nesting = (2, 4, 8, 16, 32)
  c.model.options = ml_collections.ConfigDict(dict(
      pool="gap", stochastic_depth=0.1, **(LEVERS if arg == "levers" else {})))
  c.evals = ml_collections.ConfigDict()  # the heads' val accuracy is the measure here
  c.num_epochs, c.eval_every = 20.0, 0
  return c
'''


@pytest.mark.e2e
@pytest.mark.slow
def test_all_levers_train_as_well_as_the_plain_vit(tmp_path):
  (tmp_path / "vit_digits.py").write_text(CONFIG)
  top1 = {}
  for arm in ("plain", "levers"):
    workdir = tmp_path / arm
    proc = cli_runner.run_module("mrl_jax.main", f"--config={tmp_path}/vit_digits.py:{arm}",
                                 f"--workdir={workdir}", devices=8, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["dims"] == [2, 4, 8, 16, 32]
    top1[arm] = summary["top1"]
  for plain, fast in zip(top1["plain"][1:], top1["levers"][1:]):
    assert plain > 0.85 and abs(fast - plain) < 0.05, top1
  assert min(top1["plain"][0], top1["levers"][0]) > 0.5, top1  # chance is 0.1
