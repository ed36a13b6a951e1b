"""FP8 matmuls for the ViT's dense layers (Hopper and later): e4m3 operands forward,
e5m2 gradients backward, each tensor scaled by its own amax in the same step.

The program is quantize → dequantize → dot. XLA's GPU GEMM rewriter turns
`dot(convert(f8) * scale, convert(f8) * scale)` into one cuBLASLt FP8 GEMM with the
scales folded in (benchmark_train lists it among the custom calls as
`__cublas$lt$matmul$f8`). Elsewhere (CPU, TPU, older GPUs) the same program runs in
the wide dtype on FP8-rounded operands: the same numbers, so a CPU tests them.

"Current" scaling (amax of the tensor itself, not a history of past amaxes as in
Transformer Engine's delayed scaling) needs no state to carry, checkpoint or shard.
It costs one max-reduction per operand, and no value can overflow the format.
"""

import jax
import jax.numpy as jnp
from jax import lax

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


def quantize_dequantize(x: jax.Array, fp8_dtype) -> jax.Array:
  """x rounded to `fp8_dtype` after scaling its amax to the format's largest finite
  value, then scaled back, in x's dtype."""
  x32 = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x32))
  scale = jnp.where(amax > 0, amax / float(jnp.finfo(fp8_dtype).max), 1.0)
  q = (x32 / scale).astype(fp8_dtype)
  return q.astype(x.dtype) * scale.astype(x.dtype)


@jax.custom_vjp
def fp8_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., k] @ w [k, n] with e4m3 operands; its gradients use the e5m2 output
  gradient against the same e4m3 operands."""
  return _matmul(quantize_dequantize(x, E4M3), quantize_dequantize(w, E4M3))


def _matmul(x, w):
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _forward(x, w):
  xq, wq = quantize_dequantize(x, E4M3), quantize_dequantize(w, E4M3)
  return _matmul(xq, wq), (xq, wq)


def _backward(residuals, g):
  xq, wq = residuals
  gq = quantize_dequantize(g, E5M2)
  dx = lax.dot_general(gq, wq, (((g.ndim - 1,), (1,)), ((), ())))
  batch_dims = tuple(range(g.ndim - 1))
  dw = lax.dot_general(xq, gq, ((batch_dims, batch_dims), ((), ())))
  return dx.astype(xq.dtype), dw.astype(wq.dtype)


fp8_matmul.defvjp(_forward, _backward)


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None,
                    preferred_element_type=None, out_sharding=None):
  """A `dot_general` for nnx.Linear (`dot_general=fp8_dot_general`): only the dense
  layer's contraction, inputs [..., k] with a [k, n] kernel, is supported."""
  del precision, out_sharding  # FP8 has one precision; shardings come from the inputs.
  if rhs.ndim != 2 or dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())):
    raise ValueError(f"fp8_dot_general computes inputs [..., k] @ kernel [k, n] only, "
                     f"got {lhs.shape} @ {rhs.shape} with {dimension_numbers}.")
  y = fp8_matmul(lhs, rhs)
  return y.astype(preferred_element_type) if preferred_element_type is not None else y
