"""Hugging Face import and export: shared machinery plus one declarative name table per family.

`from_hf` / `to_hf` live in jaxlm.hf.api; families (tables and config maps) in jaxlm.hf.families.
"""


def from_hf(*args, **kwargs):
  """See jaxlm.hf.api.from_hf."""
  from jaxlm.hf import api

  return api.from_hf(*args, **kwargs)


def to_hf(*args, **kwargs):
  """See jaxlm.hf.api.to_hf."""
  from jaxlm.hf import api

  return api.to_hf(*args, **kwargs)
