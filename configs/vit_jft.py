"""ViT-B/16 MRL on JFT-300M: the paper's recipe (MRL.md).

8x8 TPU pod, batch 128, 300K steps, Adafactor, lr 1e-3 with linear decay
(10K warm-up steps, as big_vision's JFT runs), 18,291 classes with the sigmoid
loss (multi-label), head bias starting at -10. Nesting 12 … 768.

JFT is not public: prepare it as a TFDS dataset and point
--config.input.data_dir at it. `:synthetic` trains on generated multi-label
images of the same shape; `:runlocal` is a seconds-long CPU smoke run.
"""

from configs import common


def get_config(arg=None):
  variants = common.parse_variants(arg)
  c = common.get_base_config()
  c.num_classes = 18_291
  c.model.name, c.model.variant = "vit", "B/16"
  c.model.dtype = "bfloat16"
  c.model.options.pool = "cls"
  c.mrl.mode = "mrl"
  c.mrl.nesting = (12, 24, 48, 96, 192, 384, 768)
  c.mrl.loss = "sigmoid"
  c.mrl.head_bias_init = -10.0

  c.input.source = "tfds"
  c.input.tfds_name = "jft300m"
  c.input.multi_label = True
  c.input.image_size = 224
  c.input.batch_size = 128
  c.input.eval_batch_size = 512
  c.input.workers = 8
  c.total_steps = 300_000

  c.optim.name = "adafactor"
  c.optim.lr = 1e-3
  c.optim.schedule = "linear"
  c.optim.warmup_steps = 10_000
  c.optim.clip_norm = 1.0

  c.log_every = 100
  c.eval_every = 10_000
  common.add_evals(c, ("classification", "knn"))
  common.apply_variants(c, variants, runlocal_overrides={
      "model.variant": "mu/4", "model.dtype": "float32", "mrl.nesting": (4, 8, 16, 32),
      "input.source": "synthetic", "num_classes": 100})
  return common.inception_specs(c)
