"""The demo: an MRL ResNet18 on scikit-learn's bundled handwritten digits.

Real images that ship with scikit-learn, so it runs anywhere with no download:
  python -m mrl_jax.main --config=configs/demo.py --workdir=/tmp/mrl_demo
A few minutes on 2 CPU cores. z is a linear neck on the pooled features, so
even z[:2] is a signed 2-d code and every nesting dim (2 … 512) ends far above
the 10% chance level (README "Where z is taken"). `:runlocal` is a seconds-long
smoke run; `:synthetic` swaps in generated images.
"""

from configs import common


def get_config(arg=None):
  variants = common.parse_variants(arg)
  c = common.get_base_config()
  c.num_classes = 10
  c.model.name, c.model.variant = "resnet", "18"
  c.mrl.mode = "mrl"
  c.model.neck_dim = 512
  c.mrl.nesting = (2, 4, 8, 16, 32, 64, 128, 256, 512)

  c.input.source = "digits"
  c.input.image_size = 32
  c.input.batch_size = 64
  c.input.eval_batch_size = 120
  c.num_epochs = 12.0

  c.optim.name = "adamw"
  c.optim.lr = 2e-3
  c.optim.weight_decay = 1e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 20

  c.log_every = 20
  c.eval_every = 100
  c.checkpoint.every_minutes = 1.0  # a run of a few minutes: a checkpoint every minute
  # The paper's evaluation suite at every dim, after training; plus the baselines:
  # the same kNN on SVD features and on randomly chosen coordinates.
  common.add_evals(c, ("classification", "linear_probe", "knn", "retrieval", "few_shot",
                       "adaptive_classification", "adaptive_retrieval"))
  # 1,438 rows are 2 mini-batches: 100 epochs give the probes 200 steps.
  c.evals.linear_probe.epochs = 100
  common.add_baseline_evals(c, ("knn",))
  # runlocal keeps the real digits (bundled with scikit-learn, on every machine).
  return common.apply_variants(c, variants, synthetic_sizes=(1_440, 360))
