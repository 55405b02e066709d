"""GPT-2 (GPT2LMHeadModel): its parameter-name table and config mapping.

HF GPT-2 uses Conv1D layers, whose weights are stored [in, out] (our kernel layout already), and
one fused c_attn projection that the table splits into q, k and v with `part`. A bias-free model
(nanogpt-char) is written with zero biases.
"""

from jaxlm.hf.convert import Rule
from jaxlm.hf.families.family import Family, activation_from_hf, activation_to_hf
from jaxlm.models.config import ModelConfig

_B = "transformer.h.{i}"
RULES = (
  Rule("embed/embedding", "transformer.wte.weight"),
  Rule("pos_embed/embedding", "transformer.wpe.weight"),
  Rule("block_{i}/attn_norm/scale", f"{_B}.ln_1.weight"),
  Rule("block_{i}/attn_norm/bias", f"{_B}.ln_1.bias"),
  Rule("block_{i}/attn/q/kernel", f"{_B}.attn.c_attn.weight", "d (3 h e) -> 3 d h e", part=0),
  Rule("block_{i}/attn/k/kernel", f"{_B}.attn.c_attn.weight", "d (3 h e) -> 3 d h e", part=1),
  Rule("block_{i}/attn/v/kernel", f"{_B}.attn.c_attn.weight", "d (3 h e) -> 3 d h e", part=2),
  Rule("block_{i}/attn/q/bias", f"{_B}.attn.c_attn.bias", "(3 h e) -> 3 h e", part=0),
  Rule("block_{i}/attn/k/bias", f"{_B}.attn.c_attn.bias", "(3 h e) -> 3 h e", part=1),
  Rule("block_{i}/attn/v/bias", f"{_B}.attn.c_attn.bias", "(3 h e) -> 3 h e", part=2),
  Rule("block_{i}/attn/o/kernel", f"{_B}.attn.c_proj.weight", "(h e) d -> h e d"),
  Rule("block_{i}/attn/o/bias", f"{_B}.attn.c_proj.bias"),
  Rule("block_{i}/mlp_norm/scale", f"{_B}.ln_2.weight"),
  Rule("block_{i}/mlp_norm/bias", f"{_B}.ln_2.bias"),
  Rule("block_{i}/mlp/up/kernel", f"{_B}.mlp.c_fc.weight"),
  Rule("block_{i}/mlp/up/bias", f"{_B}.mlp.c_fc.bias"),
  Rule("block_{i}/mlp/down/kernel", f"{_B}.mlp.c_proj.weight"),
  Rule("block_{i}/mlp/down/bias", f"{_B}.mlp.c_proj.bias"),
  Rule("final_norm/scale", "transformer.ln_f.weight"),
  Rule("final_norm/bias", "transformer.ln_f.bias"),
  Rule("lm_head/kernel", "lm_head.weight", "v d -> d v"),
)


def config_from_hf(hf) -> ModelConfig:
  """ModelConfig of a transformers GPT2Config."""
  if getattr(hf, "scale_attn_by_inverse_layer_idx", False) or not getattr(
      hf, "scale_attn_weights", True):
    raise ValueError("GPT-2 configs with scale_attn_by_inverse_layer_idx=True or "
                     "scale_attn_weights=False are not supported")
  activation = activation_from_hf(hf.activation_function, "GPT-2 activation")
  return ModelConfig(
    vocab_size=hf.vocab_size, num_layers=hf.n_layer, embed_dim=hf.n_embd, num_heads=hf.n_head,
    mlp_dim=hf.n_inner or 4 * hf.n_embd, max_seq_len=hf.n_positions, norm="layernorm",
    norm_eps=hf.layer_norm_epsilon, position="learned",
    activation=activation, gated_mlp=False, use_bias=True,
    tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
  )


def config_to_hf(cfg: ModelConfig):
  """transformers GPT2Config of a GPT-2-shaped ModelConfig."""
  from transformers import GPT2Config

  problems = [name for name, bad in (
    ("norm='layernorm'", cfg.norm != "layernorm"),
    ("position='learned'", cfg.position != "learned"),
    ("gated_mlp=False", cfg.gated_mlp),
    ("num_kv_heads=num_heads", cfg.kv_heads != cfg.num_heads),
    ("head_dim=embed_dim/num_heads", cfg.head_size * cfg.num_heads != cfg.embed_dim),
  ) if bad]
  if problems:
    raise ValueError(f"this model cannot be written as GPT-2: it needs {', '.join(problems)}")
  return GPT2Config(
    vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.embed_dim,
    n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.hidden_dim,
    activation_function=activation_to_hf(cfg.activation), layer_norm_epsilon=cfg.norm_eps,
    tie_word_embeddings=cfg.tie_embeddings, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    architectures=["GPT2LMHeadModel"],
  )


GPT2 = Family(
  name="gpt2", architectures=("GPT2LMHeadModel",), model_types=("gpt2",), rules=RULES,
  config_from_hf=config_from_hf, config_to_hf=config_to_hf,
  ignored=(r"\.attn\.bias$", r"\.attn\.masked_bias$"), tied=("lm_head.weight",),
  optional_prefix="transformer.", export_config=lambda cfg: cfg.replace(use_bias=True),
)
