"""Tokenize a config's data ahead of training, into the cache that `jaxlm train` then reuses.

  python tools/prepare_data.py --config configs/gpt2_124m.py \
    --config.data.tokenizer=../shared/data/tokenizers/gpt2 [--config.data.cache_dir=DIR]

Shows a progress bar per source and prints each source's documents, tokens and cache entry.
Run it once per machine (or on a shared cache directory) before a multi-host run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)")


def main(argv):
  del argv
  from jaxlm.data import cache, sources, tokenize, tokenizers

  if _CONFIG.value is None:
    sys.exit("tools/prepare_data.py: error: needs --config=configs/NAME.py")
  cfg, sft = _CONFIG.value.data, _CONFIG.value.kind == "sft"
  if cfg.tokenizer == "char":
    sys.exit("tools/prepare_data.py: error: the char tokenizer is built at train time from the "
             "text; nothing to prepare")
  try:
    tokenizer = tokenizers.load_tokenizer(cfg.tokenizer)
    for source in sources.sources_from_config(cfg):
      docs, hit = tokenize.tokenize_source(source, cfg, tokenizer, progress=True, sft=sft)
      entry = cache.key(sources.open_source(source, cfg).fingerprint,
                        tokenize.tokenizer_fingerprint(tokenizer), tokenize.settings(cfg, sft))
      print(f"{source.describe()}: {len(docs):,} documents, {len(docs.tokens):,} tokens "
            f"({'already cached' if hit else 'tokenized'}) in "
            f"{cache.entry_dir(cfg.cache_dir, entry)}")
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"tools/prepare_data.py: error: {e}")


if __name__ == "__main__":
  app.run(main)
