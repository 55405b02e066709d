"""Model families known to the Hugging Face import/export: one declarative table each.

A `Family` is data: the HF architectures it reads, its parameter-name table (`Rule`s), and the
two config mappings. The machinery in jaxlm.hf.convert/io does the rest for every family.
To add one, write a module with a `Family` and list it in `FAMILIES`.
"""

from jaxlm.hf.families.family import (  # noqa: F401 (the family API)
  HF_ACTIVATIONS,
  Family,
  activation_from_hf,
  activation_to_hf,
  decoder_dims,
)


def families() -> list[Family]:
  """All known families (imported here, not at package import, to keep `import jaxlm` light)."""
  from jaxlm.hf.families import bert, gemma, gpt2, llama, modernbert, moe, olmo2

  return [gpt2.GPT2, llama.LLAMA, llama.MISTRAL, llama.QWEN2, llama.QWEN3, gemma.GEMMA2,
          gemma.GEMMA3, olmo2.OLMO2, moe.MIXTRAL, moe.QWEN3_MOE, bert.BERT, bert.ROBERTA,
          bert.ROBERTA_CLS, modernbert.MODERNBERT]


# HF config fields that mean a part jaxlm does not implement, whatever the family: a config that
# sets one is refused by name before any family reads it.
UNIMPLEMENTED = {
  "vision_config": "a vision tower",
  "audio_config": "an audio tower",
  "kv_lora_rank": "multi-head latent attention (DeepSeek's MLA)",
  "attention_chunk_size": "chunked attention (Llama 4)",
  "n_routed_experts": "DeepSeek's mixture of shared and routed experts",
}


def refuse_unimplemented(hf_config):
  """Raises naming the first field of UNIMPLEMENTED that `hf_config` sets."""
  for field, part in UNIMPLEMENTED.items():
    if getattr(hf_config, field, None):
      name = (getattr(hf_config, "architectures", None) or [hf_config.model_type])[0]
      raise ValueError(f"{name} sets {field}: {part}, which jaxlm does not implement; convert "
                       "a text-only, dense checkpoint")


def family_for_hf_config(hf_config) -> Family:
  """The family that reads `hf_config`, by its architectures or else its model_type.

  Raises:
    ValueError: naming a field of a part jaxlm does not implement, or else the supported
      architectures.
  """
  refuse_unimplemented(hf_config)
  archs = list(getattr(hf_config, "architectures", None) or [])
  model_type = getattr(hf_config, "model_type", None)
  known = families()
  for fam in known:
    if any(a in fam.architectures for a in archs):
      return fam
  if not archs:
    for fam in known:
      if model_type in fam.model_types:
        return fam
  supported = sorted(a for fam in known for a in fam.architectures)
  raise ValueError(
    f"unsupported Hugging Face architecture {archs or model_type!r}; jaxlm converts "
    f"{', '.join(supported)}"
  )


def family_named(name: str) -> Family:
  for fam in families():
    if name in (fam.name, *fam.architectures):
      return fam
  raise ValueError(f"unknown family {name!r}; choose one of {[f.name for f in families()]}")


def family_for(cfg, name: str | None = None) -> Family:
  """The family `name`, or the one `cfg` is written as when `name` is None."""
  return family_named(name) if name else family_for_model(cfg)


def family_for_model(cfg) -> Family:
  """The HF family a jaxlm decoder config is written as: GPT-2 for learned positions; Gemma 3
  or 2 for sandwich norms (with or without qk-norm), OLMo 2 for res_post norms, Qwen3 for
  per-head qk-norm, Qwen2 for q/k/v-only biases, Mistral when every layer slides, Qwen2 when
  some do, Llama otherwise; with experts Qwen3-MoE (per-head qk-norm) or Mixtral; encoders as
  ModernBERT with RoPE, else BERT, or RoBERTa when positions are offset."""
  if not getattr(cfg, "causal", True):
    if cfg.position == "rope":
      return family_named("modernbert")
    if not cfg.position_offset:
      return family_named("bert")
    return family_named("roberta_cls" if cfg.head == "seq_cls" else "roberta")
  if cfg.position == "learned":
    return family_named("gpt2")
  if getattr(cfg, "num_experts", 0):
    return family_named("qwen3_moe" if cfg.qk_norm != "none" else "mixtral")
  if cfg.norm_position == "sandwich":
    return family_named("gemma3" if cfg.qk_norm != "none" else "gemma2")
  if cfg.norm_position == "res_post":
    return family_named("olmo2")
  if cfg.qk_norm != "none":
    return family_named("qwen3")
  if (cfg.qkv_bias and not cfg.use_bias) or cfg.mixed_layers:
    return family_named("qwen2")
  return family_named("mistral" if any(cfg.local_layers) else "llama")
