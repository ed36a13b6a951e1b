"""Pure, jit-compiled train and eval steps with explicit shardings.

The train state is a plain dict of pytrees, {"step", "params", "model_state",
"opt_state"}: `params` are the model's nnx.Param leaves, `model_state` the rest
(BatchNorm statistics, dropout rng counters). The model's structure (its
nnx GraphDef) is static and closed over, so each step is
`nnx.merge(graphdef, params, model_state)` → forward → loss, differentiated with
`jax.value_and_grad` over `params` only (cheaper than `nnx.grad`, flax #5116).
Builders return the jitted function; the shardings they were compiled with
are the ones passed in, so the caller owns them explicitly.
"""

from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from mrl_jax import mrl

TrainState = Dict[str, Any]
Batch = Dict[str, jax.Array]


def normalize_images(images: jax.Array, normalization) -> jax.Array:
  """uint8 → float32 (x - mean) / std, on the device: batches travel as uint8 (4× less
  host→device traffic) and the preprocessing spec's `normalize(...)` lands here.

  `normalization` is (mean, std) per channel in 0..255 units, as
  `mrl_jax.data.normalization(config.input, ...)` returns it (the presets live in
  `mrl_jax.data.preprocess.NORMALIZATIONS`)."""
  mean, std = (jnp.asarray(v, jnp.float32) for v in normalization)
  return (images.astype(jnp.float32) - mean) / std


def split_model(model: nnx.Module) -> Tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, params, model_state): the one split the steps rely on."""
  return nnx.split(model, nnx.Param, ...)


def abstract_train_state(build_model: Callable[[], nnx.Module],
                         tx: optax.GradientTransformation) -> Tuple[nnx.GraphDef, TrainState]:
  """The graphdef and the train state's shapes/dtypes, without allocating it."""
  graphdef, _, _ = split_model(nnx.eval_shape(build_model))
  return graphdef, jax.eval_shape(lambda: _fresh_state(build_model, tx))


def init_train_state(build_model: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                     shardings: Any) -> TrainState:
  """Initialises the train state directly into its shardings (never whole on one device).

  On CPU the init is compiled without LLVM's optimisations: it runs once, and for a
  ResNet18 that cuts its compile from ~8 s to ~2 s. The values agree with an optimised
  init to float rounding (the random bits are integer arithmetic; only the float
  transforms of them may round differently)."""
  options = ({"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu"
             else None)
  return jax.jit(lambda: _fresh_state(build_model, tx), out_shardings=shardings,
                 compiler_options=options)()


def _fresh_state(build_model, tx) -> TrainState:
  _, params, model_state = split_model(build_model())
  return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
          "opt_state": tx.init(params)}


def _loss_and_grads(graphdef, params, model_state, batch, loss_kwargs, normalization):
  def loss_fn(params, model_state):
    # copy=True gives Variables owned by this trace, so BatchNorm may update them.
    model = nnx.merge(graphdef, params, model_state, copy=True)
    _, logits = model(normalize_images(batch["image"], normalization), train=True)
    loss, metrics = mrl.nested_loss(logits, batch["label"], **loss_kwargs)
    return loss, (metrics, split_model(model)[2])
  (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, model_state)  # Gradients w.r.t. params (argnum 0) only.
  return loss, metrics, model_state, grads


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: Callable, state_shardings: Any, batch_sharding: NamedSharding,
                    *, loss_kwargs: Dict[str, Any], microbatches: int = 1,
                    normalization, poison_steps: Tuple[int, ...] = ()
                    ) -> Callable:
  """(state, batch) → (state, metrics); the state is donated.

  With `microbatches` = k > 1 the global batch is split into k slices whose
  gradients are summed in a scan, so memory follows the slice size while the
  update equals one step on the full batch (BatchNorm sees each slice).
  A step whose loss or gradient norm is not finite changes nothing but the step
  counter and reports `nonfinite` = 1: params, optimizer and model state stay
  as they were (so the optimizer's own count, which drives the LR schedule,
  counts applied updates only); the counter advances so that it keeps naming the
  data position and the checkpoint step. `poison_steps` (a debug knob for testing that
  guard) makes the loss and gradients NaN at those step numbers (1-based).
  """

  def step(state: TrainState, batch: Batch):
    params, model_state = state["params"], state["model_state"]
    if microbatches == 1:
      loss, metrics, model_state, grads = _loss_and_grads(
          graphdef, params, model_state, batch, loss_kwargs, normalization)
    else:
      def slices(x):
        # Strided slices [k, B/k, ...]: example j of slice i is example j·k + i,
        # so every slice stays spread over all data-parallel devices.
        return x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:]).swapaxes(0, 1)

      def body(carry, micro):
        model_state, acc = carry
        loss, metrics, model_state, grads = _loss_and_grads(
            graphdef, params, model_state, micro, loss_kwargs, normalization)
        acc = jax.tree.map(jnp.add, acc, (loss, metrics, grads))
        return (model_state, acc), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: _loss_and_grads(graphdef, params, model_state,
                                  jax.tree.map(lambda x: slices(x)[0], batch), loss_kwargs,
                                  normalization)))
      acc0 = (zeros[0], zeros[1], zeros[3])
      (model_state, acc), _ = jax.lax.scan(body, (model_state, acc0),
                                           jax.tree.map(slices, batch))
      loss, metrics, grads = jax.tree.map(lambda x: x / microbatches, acc)
    if poison_steps:
      scale = jnp.where(jnp.isin(state["step"] + 1, jnp.asarray(poison_steps)), jnp.nan, 1.0)
      loss, grads = loss * scale, jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # The norm goes to the optimizer too (optim.clip_by_global_norm clips with it), so
    # the gradients are reduced once; transformations that take no extra args ignore it.
    extra = ({"grad_norm": grad_norm}
             if isinstance(tx, optax.GradientTransformationExtraArgs) else {})
    updates, opt_state = tx.update(grads, state["opt_state"], params, **extra)
    new, old = ((optax.apply_updates(params, updates), opt_state, model_state),
                (params, state["opt_state"], state["model_state"]))
    params, opt_state, model_state = jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {"step": state["step"] + 1, "params": params,
                 "model_state": model_state, "opt_state": opt_state}
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state["step"]),
                   nonfinite=(~finite).astype(jnp.int32))
    return new_state, metrics

  replicated = NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_eval_step(graphdef: nnx.GraphDef, state_shardings: Any,
                   batch_sharding: NamedSharding, *, loss_kwargs: Dict[str, Any],
                   normalization) -> Callable:
  """(state, batch) → per-dim sums {"top1", "top5", "loss"} [M] and "count".

  `batch["mask"]` (1 for real examples, 0 for padding) makes the last, padded
  batch of a split count exactly once.
  """

  def step(state: TrainState, batch: Batch):
    model = nnx.merge(graphdef, state["params"], state["model_state"], copy=True)
    _, logits = model(normalize_images(batch["image"], normalization), train=False)
    logits = logits.astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    top1, top5 = mrl.topk_hits(logits, labels, k=5)  # [M, B] each
    per_example_loss = mrl.per_example_loss(
        logits, labels, loss_kwargs["loss_type"], loss_kwargs["label_smoothing"])  # [M, B]
    return {"top1": (top1 * mask).sum(-1), "top5": (top5 * mask).sum(-1),
            "loss": (per_example_loss * mask).sum(-1), "count": mask.sum()}

  replicated = NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=replicated)

