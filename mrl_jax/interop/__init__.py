"""Weights in and out of mrl_jax: flat names, other libraries' layouts, weight files.

Every converter works on one plain representation of a model's variables: a
flat dict {"params/<path>": array, "model_state/<path>": array}, where <path>
is the nnx path of the leaf ("params/backbone/stem_conv/kernel",
"model_state/backbone/stem_bn/mean"), as `flat.py` defines it. An exported
`model.safetensors` holds exactly that dict; an importer produces it from a
PyTorch state dict, and `flat.into_state` puts it back into a model's
variables, refusing missing, unexpected or wrong-shaped names with the lists.
"""
