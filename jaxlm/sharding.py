"""Device mesh (data, fsdp, tensor), the one table of logical-axis rules, and the one function
that turns each process's rows into a global batch on the mesh.

Parameters and activations name logical axes (embed, mlp, heads, ...); LOGICAL_RULES maps them
to mesh axes, so going from one device to a pod is a change of `mesh` config, not of code.
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.data import batch as batch_lib

MESH_AXES = ("data", "fsdp", "tensor")

# Order matters: an axis already used by an earlier logical axis of the same array is skipped,
# so activations sharded on batch over (data, fsdp) keep their embed dim whole.
LOGICAL_RULES = (
  ("batch", ("data", "fsdp")),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("embed", "fsdp"),
  ("length", None),
  ("head_dim", None),
  ("pos", None),
  ("norm", None),
  ("layers", None),
  ("lora_rank", None),  # LoRA adapters: sharded like their kernels, the rank axis whole
)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh; a size of -1 takes the devices left over.

  Args:
    mesh_cfg: has integer fields `data`, `fsdp`, `tensor`.
    devices: defaults to all devices of all processes.
  """
  devices = jax.devices() if devices is None else devices
  shape = [int(getattr(mesh_cfg, name)) for name in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but "
      f"{len(devices)} are present; set one of mesh.data/fsdp/tensor to -1 to fill the rest"
    )
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _fit(spec: P, shape: tuple, mesh: Mesh) -> P:
  """Drops mesh axes from dims they do not divide (e.g. a vocab of 65 over 2 tensor shards)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[n] for n in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def logical_sharding(abstract_tree, mesh: Mesh):
  """NamedShardings for a tree whose leaves may be boxed with logical axis names."""
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_tree), LOGICAL_RULES)
  return jax.tree.map(
    lambda spec, leaf: NamedSharding(mesh, _fit(spec, leaf.shape, mesh)),
    specs, strip_boxes(abstract_tree), is_leaf=lambda x: isinstance(x, P),
  )


def abstract_tree(init_fn, mesh: Mesh, *args):
  """(ShapeDtypeStructs with shardings, the shardings) of what `init_fn(rng, *args)` returns,
  its leaves boxed with logical axis names: nothing is allocated. The first is a restore target."""
  with mesh_rules(mesh):
    boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0), *args)
    shardings = logical_sharding(boxed, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          strip_boxes(boxed), shardings)
  return abstract, shardings


def strip_boxes(tree):
  """The values of logically-partitioned boxes, with no sharding constraint applied."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch arrays are split over (data, fsdp) on their leading axis."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def global_batch(local: dict, mesh: Mesh) -> batch_lib.Batch:
  """This process's rows (a dict of numpy arrays, Batch field names) assembled with every other
  process's into a Batch of global arrays, split over (data, fsdp) on the leading axis."""
  return batch_lib.from_dict({
    k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    for k, v in local.items()})


def batch_divisor(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


@contextlib.contextmanager
def mesh_rules(mesh: Mesh):
  """Context in which jitted model code resolves logical axis constraints on `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield
