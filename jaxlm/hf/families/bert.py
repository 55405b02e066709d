"""BERT and RoBERTa encoders (base model and masked-LM, sequence-classification,
token-classification and QA heads): parameter-name tables and config mappings.

The architecture picks the head (BertForMaskedLM -> model.head="mlm", ...). RoBERTa's
sequence-classification head (classifier.dense + classifier.out_proj) stores our pooler under
another name, so it is a family of its own.
"""

from jaxlm.hf.convert import Rule
from jaxlm.hf.families.family import Family, activation_from_hf, activation_to_hf
from jaxlm.models.config import ENCODER_HEADS, ModelConfig

_HEAD_SUFFIX = {"base": "Model", "mlm": "ForMaskedLM", "seq_cls": "ForSequenceClassification",
                "token_cls": "ForTokenClassification", "qa": "ForQuestionAnswering"}


def _backbone_rules(p: str) -> tuple[Rule, ...]:
  """Embeddings and layers, under the HF prefix `p` ("bert." or "roberta.")."""
  L = f"{p}encoder.layer.{{i}}"
  B = "transformer/block_{i}"
  rules = [
    Rule("transformer/embed/embedding", f"{p}embeddings.word_embeddings.weight"),
    Rule("transformer/pos_embed/embedding", f"{p}embeddings.position_embeddings.weight"),
    Rule("transformer/type_embed/embedding", f"{p}embeddings.token_type_embeddings.weight"),
    Rule("transformer/embed_norm/scale", f"{p}embeddings.LayerNorm.weight"),
    Rule("transformer/embed_norm/bias", f"{p}embeddings.LayerNorm.bias"),
    Rule(f"{B}/attn/o/kernel", f"{L}.attention.output.dense.weight", "d (h e) -> h e d"),
    Rule(f"{B}/attn/o/bias", f"{L}.attention.output.dense.bias"),
    Rule(f"{B}/attn_norm/scale", f"{L}.attention.output.LayerNorm.weight"),
    Rule(f"{B}/attn_norm/bias", f"{L}.attention.output.LayerNorm.bias"),
    Rule(f"{B}/mlp/up/kernel", f"{L}.intermediate.dense.weight", "f d -> d f"),
    Rule(f"{B}/mlp/up/bias", f"{L}.intermediate.dense.bias"),
    Rule(f"{B}/mlp/down/kernel", f"{L}.output.dense.weight", "d f -> f d"),
    Rule(f"{B}/mlp/down/bias", f"{L}.output.dense.bias"),
    Rule(f"{B}/mlp_norm/scale", f"{L}.output.LayerNorm.weight"),
    Rule(f"{B}/mlp_norm/bias", f"{L}.output.LayerNorm.bias"),
  ]
  for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
    rules += [Rule(f"{B}/attn/{ours}/kernel", f"{L}.attention.self.{theirs}.weight",
                   "(h e) d -> d h e"),
              Rule(f"{B}/attn/{ours}/bias", f"{L}.attention.self.{theirs}.bias", "(h e) -> h e")]
  return tuple(rules)


def _dense(ours: str, theirs: str, out: str = "c") -> tuple[Rule, ...]:
  return (Rule(f"{ours}/kernel", f"{theirs}.weight", f"{out} d -> d {out}"),
          Rule(f"{ours}/bias", f"{theirs}.bias"))


def _mlm_rules(head: str, norm: str) -> tuple[Rule, ...]:
  return (*_dense("mlm_head/transform", f"{head}.dense" if head == "lm_head" else
                  f"{head}.transform.dense", "a"),
          Rule("mlm_head/norm/scale", f"{head}.{norm}.weight"),
          Rule("mlm_head/norm/bias", f"{head}.{norm}.bias"),
          Rule("mlm_head/bias", f"{head}.bias"))


BERT_RULES = (*_backbone_rules("bert."), *_dense("pooler/dense", "bert.pooler.dense", "a"),
              *_mlm_rules("cls.predictions", "transform.LayerNorm"),
              *_dense("classifier", "classifier"), *_dense("qa_outputs", "qa_outputs", "n"))
_ROBERTA_HEADS = (*_mlm_rules("lm_head", "layer_norm"), *_dense("qa_outputs", "qa_outputs", "n"))
ROBERTA_RULES = (*_backbone_rules("roberta."),
                 *_dense("pooler/dense", "roberta.pooler.dense", "a"),
                 *_dense("classifier", "classifier"), *_ROBERTA_HEADS)
ROBERTA_CLS_RULES = (*_backbone_rules("roberta."),
                     *_dense("pooler/dense", "classifier.dense", "a"),
                     *_dense("classifier", "classifier.out_proj"), *_ROBERTA_HEADS)


def dims(cfg) -> dict:
  return {"d": cfg.embed_dim, "a": cfg.embed_dim, "h": cfg.num_heads, "e": cfg.head_size,
          "f": cfg.hidden_dim, "v": cfg.vocab_size, "c": cfg.num_labels, "n": 2}


def _head_of(hf, kind: str) -> str:
  for arch in getattr(hf, "architectures", None) or []:
    for head, suffix in _HEAD_SUFFIX.items():
      if arch == kind + suffix:
        return head
  return "base"


def config_from_hf(hf) -> ModelConfig:
  """ModelConfig of a transformers BertConfig or RobertaConfig; the head from architectures."""
  kind = "Roberta" if hf.model_type == "roberta" else "Bert"
  if getattr(hf, "position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"{kind} position_embedding_type={hf.position_embedding_type!r} is not "
                     "supported; only 'absolute'")
  activation = activation_from_hf(hf.hidden_act, f"{kind} hidden_act")
  head = _head_of(hf, kind)
  return ModelConfig(
    vocab_size=hf.vocab_size, num_layers=hf.num_hidden_layers, embed_dim=hf.hidden_size,
    num_heads=hf.num_attention_heads, mlp_dim=hf.intermediate_size,
    max_seq_len=hf.max_position_embeddings, norm="layernorm", norm_eps=hf.layer_norm_eps,
    position="learned", activation=activation, use_bias=True,
    tie_embeddings=True, causal=False, norm_position="post", embed_norm=True,
    type_vocab_size=hf.type_vocab_size,
    position_offset=hf.pad_token_id + 1 if kind == "Roberta" else 0,
    pooler=head == "base", head=head, num_labels=hf.num_labels,
  )


def _config_to_hf(cfg: ModelConfig, kind: str):
  import transformers

  problems = [name for name, bad in (
    ("causal=False", cfg.causal), ("norm_position='post'", cfg.norm_position != "post"),
    ("embed_norm=True", not cfg.embed_norm), ("norm='layernorm'", cfg.norm != "layernorm"),
    ("position='learned'", cfg.position != "learned"), ("use_bias=True", not cfg.use_bias),
    ("gated_mlp=False", cfg.gated_mlp), ("num_kv_heads=num_heads", cfg.kv_heads != cfg.num_heads),
    ("head_dim=embed_dim/num_heads", cfg.head_size * cfg.num_heads != cfg.embed_dim),
    ("an encoder head", cfg.head not in _HEAD_SUFFIX),
  ) if bad]
  if problems:
    raise ValueError(f"this model cannot be written as {kind}: it needs {', '.join(problems)}")
  extra = {"pad_token_id": cfg.position_offset - 1} if kind == "Roberta" else {}
  return getattr(transformers, f"{kind}Config")(
    vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads, intermediate_size=cfg.hidden_dim,
    hidden_act=activation_to_hf(cfg.activation), max_position_embeddings=cfg.max_seq_len,
    type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
    num_labels=2 if cfg.head == "qa" else cfg.num_labels,
    architectures=[kind + _HEAD_SUFFIX[cfg.head]], **extra,
  )


def _family(name, kind, rules, heads):
  return Family(
    name=name, architectures=tuple(kind + _HEAD_SUFFIX[h] for h in heads),
    model_types=(kind.lower(),) if "base" in heads else (), rules=rules,
    config_from_hf=config_from_hf, config_to_hf=lambda cfg: _config_to_hf(cfg, kind),
    dims=dims,
    # buffers; the NSP head of pre-training checkpoints; a pooler the chosen head does not use
    ignored=(r"position_ids$", r"token_type_ids$", r"^cls\.seq_relationship\.",
             r"pooler\.dense\."),
    tied=(f"{'cls.predictions' if kind == 'Bert' else 'lm_head'}.decoder.weight",
          f"{'cls.predictions' if kind == 'Bert' else 'lm_head'}.decoder.bias"),
    optional_prefix=f"{kind.lower()}.",
  )


BERT = _family("bert", "Bert", BERT_RULES, ENCODER_HEADS)
ROBERTA = _family("roberta", "Roberta", ROBERTA_RULES,
                  tuple(h for h in ENCODER_HEADS if h != "seq_cls"))
ROBERTA_CLS = _family("roberta_cls", "Roberta", ROBERTA_CLS_RULES, ("seq_cls",))
