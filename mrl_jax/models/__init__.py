"""Backbone registry: a name ("resnet", "vit") plus a variant string ("50", "B/16").

Every backbone maps images [B, H, W, C] (float, already normalised) to the
d-dim representation [B, d] that the Matryoshka head slices; heads live in
`mrl_jax.mrl`, never inside a backbone. Backbones expose `embed_dim` (= d).
"""

from flax import nnx

from mrl_jax.registry import Registry

MODELS = Registry("model")


def build_backbone(name: str, variant: str, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
  """Builds backbone `name` at `variant`; kwargs are the backbone's own options."""
  return backbone_class(name)(variant, rngs=rngs, **kwargs)


def backbone_class(name: str):
  """The registered backbone class, e.g. to inspect its constructor options."""
  _import_all()
  return MODELS.get(name)


def _import_all():
  # Imported lazily so that `MODELS` exists before the modules register into it.
  from mrl_jax.models import resnet, vit  # noqa: F401
