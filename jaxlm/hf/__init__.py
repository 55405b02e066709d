"""Hugging Face import and export: shared machinery plus one declarative name table per family.

`from_hf` / `to_hf` live in jaxlm.hf.api (also reached as `jaxlm.from_hf` / `jaxlm.to_hf`);
families (tables and config maps) in jaxlm.hf.families.
"""
