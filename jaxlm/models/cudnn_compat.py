"""The one module of jaxlm that imports JAX's private modules (`jax._src`): cuDNN's packed ("THD")
flash attention, which jax.nn.dot_product_attention does not expose, and the cuDNN version JAX
loaded, which no public JAX API reports. Read against jax 0.10.x (WRITTEN_FOR); outside that
range the packed call refuses with the fix and the version comes from the cuDNN wheel instead.
"""

import importlib.metadata
import re

import jax

# [low, high): the jax versions whose jax/_src/cudnn/fused_attention_stablehlo.py and
# jax/_src/lib/__init__.py this module was written against (read at jax 0.10.2)
WRITTEN_FOR = ((0, 10, 0), (0, 11, 0))


def _version_tuple(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def in_range(version: str | None = None) -> bool:
  """Whether jax `version` (default: the installed one) is one this module was written for."""
  low, high = WRITTEN_FOR
  return low <= _version_tuple(version or jax.__version__) < high


def _range_text() -> str:
  (a, b, _), (c, d, _) = WRITTEN_FOR
  return f"jax>={a}.{b},<{c}.{d}"


def cudnn_version() -> int | None:
  """cuDNN's version in JAX's encoding (9.6.0 -> 90600, 8.9.4 -> 8904); None without cuDNN.

  Inside WRITTEN_FOR: JAX's own reading (what its attention checks compare against). Outside: the
  version of the installed nvidia-cudnn wheel, which is what a pip-installed jax[cuda] loads.
  """
  if in_range():
    try:
      from jax._src.lib import cuda_versions  # private: no public API reports cuDNN's version
    except ImportError:
      cuda_versions = None
    if cuda_versions is not None:
      try:
        return int(cuda_versions.cudnn_get_version())
      except Exception:  # noqa: BLE001  (a plugin without cuDNN: report "not found")
        return None
  for wheel in ("nvidia-cudnn-cu13", "nvidia-cudnn-cu12"):
    try:
      major, minor, patch = (_version_tuple(importlib.metadata.version(wheel)) + (0, 0))[:3]
    except importlib.metadata.PackageNotFoundError:
      continue
    return major * 10000 + minor * 100 + patch if major >= 9 else major * 1000 + minor * 100 + patch
  return None


def packed_attention(q_BTHE, k_BSHE, v_BSHE, lengths_BM, starts_BM1, *, scale: float):
  """cuDNN flash attention over packed segments, causal within each: [B, T, H, E].

  `lengths_BM` and `starts_BM1` are the segments' lengths and first positions per row, -1 after
  the last (kernels.segment_offsets). q, k and v must have the same number of heads: JAX 0.10
  scales the kv offsets by the query's head count.

  Raises:
    ValueError: outside WRITTEN_FOR, naming the fix.
  """
  if not in_range():
    raise ValueError(
      f"model.attention='cudnn' on packed documents calls a private JAX API that jaxlm checked "
      f"against {_range_text()}, found jax {jax.__version__}; use model.attention='triton' (or "
      f"'auto') or pin {_range_text()}"
    )
  from jax._src.cudnn.fused_attention_stablehlo import MaskType
  from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_dpa

  return cudnn_dpa(
    q_BTHE,
    k_BSHE,
    v_BSHE,
    None,
    None,
    lengths_BM,
    lengths_BM,
    starts_BM1,
    starts_BM1,
    scale=scale,
    mask_type=MaskType.PADDING_CAUSAL,
    qkv_layout="BTNH",
  )
