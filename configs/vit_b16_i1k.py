"""ViT-B/16 MRL on ImageNet-1K from scratch (DeiT-style recipe).

AdamW lr 1e-3 at batch 1024, weight decay 0.05, 300 epochs, 5 warm-up epochs
then cosine, label smoothing 0.1, stochastic depth 0.1, grad clip 1.0, cls
pooling, mixup 0.8 / cutmix 1.0 (switching per batch). Not here: RandAugment,
random erasing, repeated augmentation. Nesting 12 … 768.
Variants: `:runlocal`, `:synthetic`.
"""

from configs import common

IMAGENET_TRAIN = 1_281_167


def get_config(arg=None):
  variants = common.parse_variants(arg)
  c = common.get_base_config()
  c.num_classes = 1000
  c.model.name, c.model.variant = "vit", "B/16"
  c.model.dtype = "bfloat16"
  c.model.options.pool = "cls"
  c.model.options.stochastic_depth = 0.1
  c.mrl.mode = "mrl"
  c.mrl.nesting = (12, 24, 48, 96, 192, 384, 768)
  c.mrl.label_smoothing = 0.1

  c.input.source = "tfds"
  c.input.tfds_name = "imagenet2012"
  c.input.image_size = 224
  c.input.batch_size = 1024
  c.input.eval_batch_size = 1000
  c.input.workers = 8
  c.num_epochs = 300.0

  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.05
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 5 * IMAGENET_TRAIN // 1024
  c.optim.clip_norm = 1.0

  c.log_every = 100
  c.eval_every = 5 * IMAGENET_TRAIN // 1024
  common.add_evals(c, ("classification", "knn", "retrieval", "adaptive_classification",
                       "adaptive_retrieval"))
  common.apply_variants(c, variants, runlocal_overrides={
      "model.variant": "mu/4", "model.dtype": "float32",
      "model.options.stochastic_depth": 0.0, "mrl.nesting": (4, 8, 16, 32),
      "input.source": "synthetic", "num_classes": 10})
  common.inception_specs(c)
  c.input.pp_train += "|mixup_cutmix(0.8, 1.0, 0.5)"  # DeiT's mixup/cutmix, per batch
  return c
