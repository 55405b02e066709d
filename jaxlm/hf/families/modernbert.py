"""ModernBERT (base model and masked-LM, sequence-classification, token-classification and QA
heads): the parameter-name table and config mappings onto the one Transformer's encoder.

Fused tensors are split on import: Wqkv [3 H E, D] into q, k, v; the GeGLU's Wi [2 F, D] into
gate (its first half, the one through the activation) and up. The architecture picks the head.
"""

from jaxlm.hf.convert import Rule
from jaxlm.hf.families.family import (
  Family,
  activation_from_hf,
  activation_to_hf,
  check_writable,
  rope_by_layer_type,
  rope_to_hf,
)
from jaxlm.models.config import FULL, LAYER_TYPES, SLIDING, ModelConfig

_HEAD_SUFFIX = {"base": "Model", "mlm": "ForMaskedLM", "seq_cls": "ForSequenceClassification",
                "token_cls": "ForTokenClassification", "qa": "ForQuestionAnswering"}
_L, _B = "model.layers.{i}", "transformer/block_{i}"


def _norm(ours: str, theirs: str) -> tuple[Rule, ...]:
  return Rule(f"{ours}/scale", f"{theirs}.weight"), Rule(f"{ours}/bias", f"{theirs}.bias")


def _dense(ours: str, theirs: str, out: str) -> tuple[Rule, ...]:
  return (Rule(f"{ours}/kernel", f"{theirs}.weight", f"{out} d -> d {out}"),
          Rule(f"{ours}/bias", f"{theirs}.bias"))


def _rules() -> tuple[Rule, ...]:
  rules = [
    Rule("transformer/embed/embedding", "model.embeddings.tok_embeddings.weight"),
    *_norm("transformer/embed_norm", "model.embeddings.norm"),
    *_norm(f"{_B}/attn_norm", f"{_L}.attn_norm"),
    Rule(f"{_B}/attn/o/kernel", f"{_L}.attn.Wo.weight", "d (h e) -> h e d"),
    Rule(f"{_B}/attn/o/bias", f"{_L}.attn.Wo.bias"),
    *_norm(f"{_B}/mlp_norm", f"{_L}.mlp_norm"),
    Rule(f"{_B}/mlp/down/kernel", f"{_L}.mlp.Wo.weight", "d f -> f d"),
    Rule(f"{_B}/mlp/down/bias", f"{_L}.mlp.Wo.bias"),
    *_norm("transformer/final_norm", "model.final_norm"),
    # the MLM head: HF's `head` (dense + act + norm), then the tied decoder and its bias
    *_dense("mlm_head/transform", "head.dense", "a"), *_norm("mlm_head/norm", "head.norm"),
    Rule("mlm_head/bias", "decoder.bias"),
    # the task heads: the same `head`, then `classifier` (QA's has the two logits)
    *_dense("head/dense", "head.dense", "a"), *_norm("head/norm", "head.norm"),
    *_dense("classifier", "classifier", "c"), *_dense("qa_outputs", "classifier", "n"),
  ]
  for part, ours in enumerate("qkv"):
    rules += [Rule(f"{_B}/attn/{ours}/kernel", f"{_L}.attn.Wqkv.weight", "(3 h e) d -> 3 d h e",
                   part=part),
              Rule(f"{_B}/attn/{ours}/bias", f"{_L}.attn.Wqkv.bias", "(3 h e) -> 3 h e",
                   part=part)]
  for part, ours in enumerate(("gate", "up")):  # HF: act(first half) * second half
    rules += [Rule(f"{_B}/mlp/{ours}/kernel", f"{_L}.mlp.Wi.weight", "(2 f) d -> 2 d f",
                   part=part),
              Rule(f"{_B}/mlp/{ours}/bias", f"{_L}.mlp.Wi.bias", "(2 f) -> 2 f", part=part)]
  return tuple(rules)


RULES = _rules()


def dims(cfg) -> dict:
  return {"d": cfg.embed_dim, "a": cfg.embed_dim, "h": cfg.num_heads, "e": cfg.head_size,
          "f": cfg.hidden_dim, "v": cfg.vocab_size, "c": cfg.num_labels, "n": 2}


def _head_of(hf) -> str:
  for arch in getattr(hf, "architectures", None) or []:
    for head, suffix in _HEAD_SUFFIX.items():
      if arch == "ModernBert" + suffix:
        return head
  return "base"


def _refuse_unimplemented(hf, head: str):
  """Raises naming the first ModernBERT field whose setting jaxlm does not implement."""
  biases = {k: bool(getattr(hf, k)) for k in ("attention_bias", "mlp_bias", "norm_bias")}
  refusals = (
    (len(set(biases.values())) > 1,
     f"attention_bias, mlp_bias and norm_bias differ ({biases}): jaxlm has one use_bias"),
    (not hf.decoder_bias, "decoder_bias=False: jaxlm's MLM decoder always has a bias"),
    (not getattr(hf, "tie_word_embeddings", True),
     "tie_word_embeddings=False: jaxlm's MLM decoder is the token embedding"),
    (hf.classifier_activation != hf.hidden_activation,
     f"classifier_activation={hf.classifier_activation!r} differs from hidden_activation="
     f"{hf.hidden_activation!r}: jaxlm's heads use the model's one activation"),
    (head == "qa" and hf.num_labels != 2,
     f"num_labels={hf.num_labels} with a QA head: jaxlm's QA head has 2 logits (start, end)"),
  )
  for bad, why in refusals:
    if bad:
      raise ValueError(f"ModernBERT {why}; convert a checkpoint without it")


def _layers(hf) -> dict:
  types = list(hf.layer_types)
  bad = sorted({t for t in types if t not in LAYER_TYPES})
  if bad:
    raise ValueError(f"modernbert layer_types has {bad}, which jaxlm does not implement; it "
                     f"reads {list(LAYER_TYPES)}")
  if SLIDING not in types:
    return {"sliding_window": 0, "layer_types": ()}
  return {"sliding_window": int(hf.local_attention), "layer_types": tuple(types)}


def config_from_hf(hf) -> ModelConfig:
  """ModelConfig of a transformers ModernBertConfig; the head from architectures."""
  head = _head_of(hf)
  _refuse_unimplemented(hf, head)
  if hf.hidden_size % hf.num_attention_heads:
    raise ValueError(f"ModernBERT hidden_size={hf.hidden_size} is not a multiple of "
                     f"num_attention_heads={hf.num_attention_heads}")
  return ModelConfig(
    vocab_size=hf.vocab_size, num_layers=hf.num_hidden_layers, embed_dim=hf.hidden_size,
    num_heads=hf.num_attention_heads, mlp_dim=hf.intermediate_size,
    max_seq_len=hf.max_position_embeddings, norm="layernorm", norm_eps=float(hf.norm_eps),
    position="rope", activation=activation_from_hf(hf.hidden_activation,
                                                   "ModernBERT hidden_activation"),
    gated_mlp=True, use_bias=bool(hf.norm_bias), tie_embeddings=True, causal=False,
    norm_position="pre", embed_norm=True, first_attn_norm=False, prediction_head=True,
    head_bias=bool(hf.classifier_bias), classifier_pooling=hf.classifier_pooling,
    head=head, num_labels=hf.num_labels, **rope_by_layer_type(hf, "modernbert"), **_layers(hf),
  )


def config_to_hf(cfg: ModelConfig):
  """A transformers ModernBertConfig of `cfg`, refusing (by name) what ModernBERT cannot hold."""
  from transformers import ModernBertConfig

  check_writable(cfg, "ModernBERT", ("sliding_window", "layer_types", "rope_local_theta",
                                     "rope_type"))
  problems = [name for name, bad in (
    ("causal=False", cfg.causal), ("norm='layernorm'", cfg.norm != "layernorm"),
    ("position='rope'", cfg.position != "rope"), ("gated_mlp=True", not cfg.gated_mlp),
    ("embed_norm=True", not cfg.embed_norm), ("first_attn_norm=False", cfg.first_attn_norm),
    ("prediction_head=True", not cfg.prediction_head), ("pooler=False", cfg.pooler),
    ("type_vocab_size=0", cfg.type_vocab_size), ("position_offset=0", cfg.position_offset),
    ("qkv_bias=False", cfg.qkv_bias and not cfg.use_bias),
    ("num_kv_heads=num_heads", cfg.kv_heads != cfg.num_heads),
    ("head_dim=embed_dim/num_heads", cfg.head_size * cfg.num_heads != cfg.embed_dim),
    ("tie_embeddings=True", not cfg.tie_embeddings),
    ("an encoder head", cfg.head not in _HEAD_SUFFIX),
  ) if bad]
  if problems:
    raise ValueError(f"this model cannot be written as ModernBERT: it needs {', '.join(problems)}")
  if not cfg.rope_local_theta and cfg.rope_type != "default" and any(cfg.local_layers):
    raise ValueError("ModernBERT leaves its sliding layers' RoPE unscaled: set "
                     "model.rope_local_theta (ModernBERT uses 10000) to write this model")
  act = activation_to_hf(cfg.activation)
  local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
  return ModernBertConfig(
    vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.hidden_dim,
    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, hidden_activation=act,
    max_position_embeddings=cfg.max_seq_len, norm_eps=cfg.norm_eps, norm_bias=cfg.use_bias,
    attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias, classifier_bias=cfg.head_bias,
    classifier_activation=act, classifier_pooling=cfg.classifier_pooling, decoder_bias=True,
    layer_types=cfg.hf_layer_types(), local_attention=cfg.sliding_window or 128,
    rope_parameters={FULL: rope_to_hf(cfg), SLIDING: local}, tie_word_embeddings=True,
    num_labels=2 if cfg.head == "qa" else cfg.num_labels,
    # token ids come from the tokenizer (to_hf writes its own); the hub's defaults may not fit
    pad_token_id=None, bos_token_id=None, eos_token_id=None, cls_token_id=None, sep_token_id=None,
    architectures=["ModernBert" + _HEAD_SUFFIX[cfg.head]],
  )


MODERNBERT = Family(
  name="modernbert", architectures=tuple("ModernBert" + s for s in _HEAD_SUFFIX.values()),
  model_types=("modernbert",), rules=RULES, config_from_hf=config_from_hf,
  config_to_hf=config_to_hf, dims=dims, ignored=(r"rotary_emb\.",), tied=("decoder.weight",),
  optional_prefix="model.",
)
