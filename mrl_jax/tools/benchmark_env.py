"""What a benchmark's result says about where it ran: the devices and the library versions."""

import importlib.metadata

import jax


def versions() -> dict:
  out = {}
  for name in ("jax", "jaxlib", "flax", "optax", "torch"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "n/a"
  return out


def devices() -> str:
  """e.g. '8 x NVIDIA H100 80GB HBM3': the device count and the first device's kind."""
  return f"{jax.device_count()} x {jax.devices()[0].device_kind}"
