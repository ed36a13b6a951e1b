"""ResNet50 MRL on ImageNet-1K: the paper's recipe (MRL.md).

SGD momentum 0.9, weight decay 1e-4 (none on BN and biases), 40 epochs, label
smoothing 0.1, 2 warm-up epochs then linear to 0, batch 512. The learning rate
is the FFCV ResNet50 recipe the reference code trains with (1.7 at batch 1024),
scaled linearly to batch 512. Nesting 8 … 2048.

Input: inception crop 224 + flip; eval resizes to 256 and centre-crops 224
(`common.inception_specs`). Not here: FFCV's progressive resizing 160→192.
Variants: `:runlocal`, `:synthetic`.
"""

from configs import common

IMAGENET_TRAIN = 1_281_167


def get_config(arg=None):
  variants = common.parse_variants(arg)
  c = common.get_base_config()
  c.num_classes = 1000
  c.model.name, c.model.variant = "resnet", "50"
  c.model.dtype = "bfloat16"
  c.mrl.mode = "mrl"
  c.mrl.nesting = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
  c.mrl.label_smoothing = 0.1

  c.input.source = "tfds"
  c.input.tfds_name = "imagenet2012"
  c.input.image_size = 224
  c.input.batch_size = 512
  c.input.eval_batch_size = 512
  c.input.workers = 8
  c.num_epochs = 40.0

  c.optim.name = "sgd"
  c.optim.lr = 0.85
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.schedule = "linear"
  c.optim.warmup_steps = 2 * IMAGENET_TRAIN // 512

  c.log_every = 100
  c.eval_every = 2 * IMAGENET_TRAIN // 512
  common.add_evals(c, ("classification", "knn", "retrieval", "adaptive_classification",
                       "adaptive_retrieval"))
  common.apply_variants(c, variants, runlocal_overrides={
      "model.variant": "18", "model.dtype": "float32",
      "mrl.nesting": (8, 16, 32, 64, 128, 256, 512), "input.source": "synthetic",
      "num_classes": 10})
  return common.inception_specs(c)
