"""jaxlm: pretrain and fine-tune Transformer LMs in JAX/Flax; `from_hf`/`to_hf` load lazily.

`import jaxlm` stays light: nothing heavy (and never torch) is imported until it is used.
"""


def __getattr__(name):
  if name in ("from_hf", "to_hf"):
    from jaxlm.hf import api

    return getattr(api, name)
  raise AttributeError(f"module 'jaxlm' has no attribute {name!r}")
