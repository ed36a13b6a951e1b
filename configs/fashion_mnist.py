"""MRL on Fashion-MNIST: 60,000 real 28×28 training images, 10 classes, 10,000 test images.

Harder than the digits demo, and small enough for CPUs. Reads Debian's IDX files
(`apt-get install dataset-fashion-mnist`; another folder with
--config.input.data_dir):
  python -m mrl_jax.main --config=configs/fashion_mnist.py --workdir=workdirs/fmnist
The backbone is a narrow ResNet18 (width 8: 64 pooled features) and z is a
linear neck on its pooled features: measured with `mrl_jax.tools.compare_mrl
--study=representations`, the neck lifts the 2-dim head from 30% to 74% top-1
and removes all-zero prefixes, while the ImageNet stem trains 4.5× faster than
a CIFAR stem at 28 px and was as accurate in that budget (README "Where z is taken").
`:runlocal` is a seconds-long smoke run; `:synthetic` swaps in generated images.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  variants = common.parse_variants(arg)
  c = common.get_base_config()
  c.num_classes = 10
  c.model.name, c.model.variant = "resnet", "18"
  c.model.options = ml_collections.ConfigDict(dict(
      stem="imagenet", width=8, representation="relu"))
  c.model.neck_dim = 64
  c.mrl.mode = "mrl"
  c.mrl.nesting = (2, 4, 8, 16, 32, 64)

  c.input.source = "idx"
  c.input.data_dir = ""           # "" → /usr/share/datasets/fashion-mnist
  c.input.splits.val = "t10k"     # the 10,000 test images
  c.input.image_size = 28
  c.input.batch_size = 128
  c.input.eval_batch_size = 500
  c.input.flip = True
  c.num_epochs = 3.0

  c.optim.name = "adamw"
  c.optim.lr = 3e-3
  c.optim.weight_decay = 1e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 100

  c.log_every = 100
  c.eval_every = 0
  c.checkpoint.every_steps = 500
  c.checkpoint.every_minutes = 2.0  # minutes-long CPU run: lose at most 2 minutes to a kill
  # The paper's suite at every dim after training, with the SVD and random-coordinate
  # baselines of the same features.
  common.add_evals(c, ("classification", "linear_probe", "knn", "retrieval",
                       "adaptive_classification"))
  c.evals.knn.ks = (1, 10)
  c.evals.linear_probe.epochs = 5
  common.add_baseline_evals(c, ("knn", "linear_probe"))
  # runlocal keeps the real images where Debian's dataset-fashion-mnist is installed.
  return common.apply_variants(c, variants, runlocal_image_size=28,
                               synthetic_sizes=(2_000, 500))
