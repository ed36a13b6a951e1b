"""Defaults every experiment starts from, and the `:variant` argument parser.

Every field here is reachable from the command line, e.g.
`--config.optim.lr=0.1 --config.mrl.nesting="(8,16,32)"`.
"""

import ml_collections

VARIANTS = ("runlocal", "synthetic")


def parse_variants(arg):
  """'runlocal,synthetic' → {'runlocal', 'synthetic'}, rejecting unknown words."""
  words = {w.strip() for w in (arg or "").split(",") if w.strip()}
  unknown = words - set(VARIANTS)
  if unknown:
    raise ValueError(f"Unknown config variant(s) {sorted(unknown)}; known: {VARIANTS}. "
                     "Use e.g. --config=configs/demo.py:runlocal or :runlocal,synthetic.")
  return words


def get_base_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_classes = 1000
  # Length of training: exactly one of total_steps / num_epochs is > 0.
  c.total_steps = 0
  c.num_epochs = 0.0

  c.model = ml_collections.ConfigDict(dict(
      name="resnet", variant="50", dtype="float32", param_dtype="float32", remat=False,
      # Backbone keyword options, e.g. ResNet stem="cifar", width=32,
      # representation="preact" (README "Where z is taken").
      options=ml_collections.ConfigDict(),
      neck_dim=0))            # > 0: z = a linear projection of the features to this width

  c.mrl = ml_collections.ConfigDict(dict(
      mode="mrl",             # mrl | mrl_e | ff | none
      nesting=(),             # () → the paper's default for the embedding width
      ff_dim=0,               # k of the FF-k baseline (mode "ff")
      weights=(),             # c_m per nesting dim; () → all 1
      loss="softmax",         # softmax | sigmoid (multi-label, JFT)
      label_smoothing=0.0,
      head_bias_init=0.0))

  c.input = ml_collections.ConfigDict(dict(
      source="synthetic",     # synthetic | digits | idx | tfds | arrayrecord | folder
      image_size=224,
      batch_size=256,         # global, over all processes
      eval_batch_size=256,
      flip=False,             # random horizontal flip in the default train spec
      # Preprocessing specs (mrl_jax/data/preprocess.py), e.g.
      # "decode|inception_crop(224)|flip_lr|normalize(imagenet)"; "" → the default,
      # "decode|resize(image_size)" (+ "|flip_lr" for train when flip is set).
      pp_train="",
      pp_eval="",
      workers=0,              # grain worker processes per host (0: in-process)
      multi_label=False,
      synthetic_sizes=ml_collections.ConfigDict(dict(train=10_000, val=1_000)),
      synthetic_seed=0,
      train_examples=0,       # > 0: train on a fixed random subset of this many examples
      data_dir="",
      tfds_name="",
      image_key="image",      # TFDS feature names (JFT-style data may differ);
      label_key="label",      # a Sequence(ClassLabel) label needs multi_label=True.
      id_key="",              # "" → `file_name` if the dataset has it, else the index
      splits=ml_collections.ConfigDict(dict(train="train", val="validation"))))

  c.optim = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, momentum=0.9, nesterov=False, b1=0.9, b2=0.999,
      weight_decay=0.0, no_decay=r"pos_embed|cls_token|probe",
      schedule="cosine", warmup_steps=0, end_lr_fraction=0.0, clip_norm=0.0))
  c.microbatches = 1        # gradient accumulation: slices of the global batch per step

  # data × fsdp × model: the devices of one slice (-1: the rest). dcn_data > 1: that
  # many slices (TPU slices, else processes: dcn_granule auto|slice|process) joined
  # over the data-centre network, data-parallel between them (docs/multihost.md).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1, dcn_data=1,
                                          dcn_granule="auto"))
  # (regex, spec) searched against train-state paths; see mrl_jax/sharding.py. The
  # classifier's class dim goes over 'model' (cheap when classes are many, a no-op at
  # model=1), everything else over 'fsdp' (replicated at fsdp=1).
  c.sharding_rules = ((r"(^|/)head/.*kernel$", (None, "model")),
                      (r"(^|/)head/.*bias$", ("model",)),
                      (r".*", "fsdp"))

  c.log_every = 50
  c.eval_every = 1000       # 0: only at the end
  c.eval_max_batches = 0    # 0: the whole val split

  # <workdir>/checkpoints; rerunning the same command resumes (mrl_jax/checkpointing.py).
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000,       # 0: only at the end (and on SIGTERM / preemption)
      every_minutes=10.0,     # ... and once this much wall time has passed since the last
                              # save, whichever comes first: a kill -9 loses at most this
                              # much work (0: no time trigger)
      keep=3,                 # the latest `keep` checkpoints are kept ...
      best_metric="",         # ... plus the `keep_best` best by this eval metric, e.g.
      best_mode="max",        # "val/top1_d2048" (max) or "val/loss_d2048" (min)
      keep_best=1,
      async_save=True,        # the loop only waits for the device→host copy
      verify_checksums=True,  # CRC32 of every file in <step>/manifest.json, checked before
                              # a restore (one more read of the step; False: sizes only)
      max_nonfinite_in_a_row=10,  # skipped NaN/inf steps in a row before stopping
      init_from="",           # fine-tuning: params from another run's workdir / step dir
      init_regex=""))         # ... only those whose path matches, e.g. "^backbone/"
  c.debug_poison_steps = ()   # tests: steps whose loss and gradients are made NaN

  # The evaluation suite (mrl_jax/evaluators; docs/evaluation.md): instance name →
  # {"type": registered evaluator, "every_steps": N (0: only at the end of training
  # and by `python -m mrl_jax.evaluate`), ...its options}, e.g.
  # c.evals.knn = ml_collections.ConfigDict({"type": "knn", "every_steps": 5000}).
  c.evals = ml_collections.ConfigDict()
  # Embeddings z (mrl_jax/restore.py, files: mrl_jax/embeddings.py), for
  # `python -m mrl_jax.embed` and the evaluators.
  c.embed = ml_collections.ConfigDict(dict(
      dtype="float32",        # float16 halves the disk (ImageNet train: 5 GB instead of 10)
      shard_size=0,           # rows per shard file per process; 0: one shard per process
      batch_size=0,           # global batch of the forward pass; 0: input.eval_batch_size
      # Extra eval splits (robustness sets) by name → overrides of `input`, e.g.
      # imagenet_a=dict(source="folder", data_dir=..., splits=dict(imagenet_a="imagenet-a")).
      splits=ml_collections.ConfigDict()))
  return c


def add_evals(c, kinds, **options):
  """config.evals entries named by their evaluator type (run at the end of training
  and by `python -m mrl_jax.evaluate`). Frozen-feature evaluators follow
  `mrl.nesting` (a reference), so an FF-k run is still evaluated at every dim."""
  frozen = ("linear_probe", "knn", "retrieval", "few_shot", "adaptive_retrieval")
  for kind in kinds:
    entry = ml_collections.ConfigDict({"type": kind, "every_steps": 0, **options})
    if kind in frozen:
      entry.dims = c.mrl.get_ref("nesting")
    c.evals[kind] = entry
  return c


def add_baseline_evals(c, kinds, methods=("svd", "random")):
  """`<kind>_<method>` copies of existing evaluators on the SVD / random-coordinate
  features of the same embeddings (mrl_jax/evaluators/baselines.py)."""
  for kind in kinds:
    for method in methods:
      entry = c.evals[kind].copy_and_resolve_references()
      entry.features = method
      entry.dims = c.mrl.get_ref("nesting")
      c.evals[f"{kind}_{method}"] = entry
  return c


def apply_variants(c, variants, *, runlocal_overrides=None, runlocal_image_size=32,
                   synthetic_sizes=None):
  """The `:synthetic` and `:runlocal` variants of every config, in one place.

  synthetic: generated images of the same shape and classes instead of the dataset
    (optionally `synthetic_sizes` = (train, val) examples), read in-process.
  runlocal: `runlocal_overrides` ({"model.variant": "18", ...}: a small model of the
    same family, and "input.source": "synthetic" where the data is not on every
    machine), then `runlocal()`: seconds on a CPU.
  """
  if "synthetic" in variants:
    c.input.source = "synthetic"
    c.input.workers = 0
    if synthetic_sizes:
      c.input.synthetic_sizes.train, c.input.synthetic_sizes.val = synthetic_sizes
  if "runlocal" in variants:
    c.update_from_flattened_dict(dict(runlocal_overrides or {}))
    c.input.workers = 0
    runlocal(c, image_size=runlocal_image_size)
  return c


def apply_overrides(c, overrides):
  """Sets {"mrl.nesting": (8, 16), "model.options.blurpool": True, ...} on `c`, adding
  keys only where a block is open-ended (model.options): a typo elsewhere fails."""
  size = c.input.image_size
  for key, value in overrides.items():
    *path, name = key.split(".")
    node = c
    for part in path:
      node = node[part]
    if name not in node and path != ["model", "options"]:
      raise KeyError(f"{key!r} is not a config field.")
    node[name] = tuple(value) if isinstance(value, list) else value
  if c.input.image_size != size and c.input.pp_eval.endswith(
      f"central_crop({size})|normalize(imagenet)"):  # The ImageNet protocol, at the new size.
    extra = c.input.pp_train.partition("normalize(imagenet)")[2]  # e.g. "|mixup_cutmix(...)"
    inception_specs(c)
    c.input.pp_train += extra
  return c


def runlocal(c, *, image_size=32, batch_size=16, total_steps=4):
  """Shrinks any experiment to seconds on a CPU, keeping its structure."""
  c.input.image_size = image_size
  c.input.batch_size = batch_size
  c.input.eval_batch_size = batch_size
  c.input.synthetic_sizes = ml_collections.ConfigDict(dict(train=256, val=64))
  c.total_steps = total_steps
  c.num_epochs = 0.0
  c.optim.warmup_steps = min(c.optim.warmup_steps, 1)
  c.log_every = 1
  c.eval_every = 0
  c.eval_max_batches = 2
  # The heads' own evaluator only; the full suite is tested on the demo model.
  c.evals = ml_collections.ConfigDict(
      {k: v for k, v in c.evals.items() if v.type == "classification"})
  return c


def inception_specs(c):
  """The ImageNet protocol at `c.input.image_size` S: inception crop + flip for
  training; resize the shorter side to S·8/7 (256 for 224) and centre-crop S for
  eval; ImageNet mean/std, applied on the device."""
  size = c.input.image_size
  c.input.pp_train = f"decode|inception_crop({size})|flip_lr|normalize(imagenet)"
  c.input.pp_eval = (f"decode|resize_small({size * 8 // 7})|central_crop({size})"
                     "|normalize(imagenet)")
  return c
