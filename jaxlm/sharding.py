"""Device mesh (data, fsdp, expert, sequence, tensor; data may span slices), the one table of
logical-axis rules, and the one function that turns each process's rows into a global batch.

Parameters and activations name logical axes (embed, mlp, heads, ...); LOGICAL_RULES maps them
to mesh axes, so going from one device to a pod is a change of `mesh` config, not of code.
The strategies, as `mesh` settings (docs/scaling.md):
  data      mesh.data=-1                      params replicated, batch split
  FSDP      mesh.fsdp=-1                      params, grads and optimizer state split over fsdp
  tensor    mesh.tensor=N                     heads and MLP columns split (attention and MLP
                                              in-projections by column, out-projections by row)
  sequence  mesh.sequence=N                   activations split along the length (long
                                              contexts); params split over it as over fsdp
  expert    mesh.expert=N                     a mixture of experts' experts split N ways; the
                                              batch is split over it too (as MaxText does), so
                                              a dense model uses it as more data parallelism
  slices    mesh.slices=N                     N slices joined by the data-centre network, each
                                              holding the rest of the mesh; the data axis
                                              spans them
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.data import batch as batch_lib

# tensor last: the innermost axis gets the nearest devices (the most traffic, every layer)
MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes a batch's rows are split over

# Order matters: a rule whose mesh axes an earlier logical axis of the same array already uses is
# skipped (the next rule for that name is tried), so activations sharded on batch over
# BATCH_AXES and length over sequence keep their embed dim whole, while parameters' embed dim
# is split over (fsdp, sequence): a sequence-parallel run keeps no replica of the weights.
LOGICAL_RULES = (
  ("batch", BATCH_AXES),
  ("length", "sequence"),
  ("expert", "expert"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("embed", ("fsdp", "sequence")),
  ("embed", "fsdp"),
  ("head_dim", None),
  ("pos", None),
  ("norm", None),
  ("layers", None),
  ("lora_rank", None),  # LoRA adapters: sharded like their kernels, the rank axis whole
)


def mesh_shape(mesh_cfg, num_devices: int) -> dict:
  """The mesh axis sizes `mesh_cfg` asks for on `num_devices` devices: {axis: size} over
  MESH_AXES; the data axis includes the slices. A size of -1 takes the devices left over in
  each slice. Missing fields count as 1 (older configs have no `sequence` or `slices`).

  Raises:
    ValueError: naming the mesh and the device count when they do not match.
  """
  slices = int(getattr(mesh_cfg, "slices", 1) or 1)
  shape = [int(getattr(mesh_cfg, name, 1)) for name in MESH_AXES]
  asked = dict(zip(MESH_AXES, shape), slices=slices)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh {asked}: at most one axis may be -1")
  if num_devices % slices:
    raise ValueError(f"mesh.slices={slices} does not divide the {num_devices} devices")
  per_slice = num_devices // slices
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if per_slice % known:
      raise ValueError(f"mesh {asked} does not divide {per_slice} devices per slice")
    shape[shape.index(-1)] = per_slice // known
  if math.prod(shape) != per_slice:
    raise ValueError(
      f"mesh {asked} needs {math.prod(shape) * slices} devices but {num_devices} are present; "
      "set one of mesh.data/fsdp/expert/sequence/tensor to -1 to fill the rest"
    )
  shape[0] *= slices
  return dict(zip(MESH_AXES, shape))


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Builds the (data, fsdp, expert, sequence, tensor) mesh `mesh_cfg` asks for (see mesh_shape).

  With mesh.slices=N > 1 the data axis spans N slices over the data-centre network, built by
  `mesh_utils.create_hybrid_device_mesh`: the slices are the devices' `slice_index` (multi-slice
  TPU), else the processes when there are N of them (GPU nodes), else N equal groups of devices
  in id order (a simulation, for CPU tests).

  Args:
    mesh_cfg: has integer fields `data`, `fsdp`, `tensor` (and optionally `expert`,
      `sequence`, `slices`).
    devices: defaults to all devices of all processes.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  slices = int(getattr(mesh_cfg, "slices", 1) or 1)
  if slices == 1:
    return Mesh(np.asarray(devices).reshape(tuple(shape.values())), MESH_AXES)
  ici = (shape["data"] // slices, *tuple(shape.values())[1:])
  dcn = (slices,) + (1,) * (len(MESH_AXES) - 1)
  if len({getattr(d, "slice_index", 0) for d in devices}) == slices:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  elif len({d.process_index for d in devices}) == slices:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True)
  else:  # one slice present: group the devices as `slices` simulated ones
    per = len(devices) // slices
    fakes = [_SimulatedSliceDevice(d, i // per) for i, d in enumerate(devices)]
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, fakes)
    grid = np.vectorize(lambda f: f.device, otypes=[object])(grid)
  return Mesh(grid, MESH_AXES)


class _SimulatedSliceDevice:
  """A device seen as belonging to slice `slice_index` (CPU devices have no slices)."""

  def __init__(self, device, slice_index: int):
    self.device, self.slice_index = device, slice_index

  def __getattr__(self, name):
    return getattr(self.device, name)


def _fit(spec: P, shape: tuple, axis_sizes) -> P:
  """Drops mesh axes from dims they do not divide (e.g. a vocab of 65 over 2 tensor shards); of a
  tuple of axes, keeps the longest leading run whose product divides the dim. Axes of size 1
  split nothing and are left out, so specs name only the axes in use."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(n for n in names if axis_sizes[n] > 1)
    while names and dim % math.prod(axis_sizes[n] for n in names):
      names = names[:-1]
    fitted.append(None if not names else names[0] if len(names) == 1 else names)
  return P(*fitted)


def partition_specs(boxed_tree, axis_sizes):
  """PartitionSpecs of a tree whose leaves may be boxed with logical axis names, on a mesh of
  `axis_sizes` ({axis: size}; a Mesh's `.shape` will do): no devices are needed."""
  specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), LOGICAL_RULES)
  return jax.tree.map(lambda spec, leaf: _fit(spec, leaf.shape, axis_sizes),
                      specs, strip_boxes(boxed_tree), is_leaf=lambda x: isinstance(x, P))


def shard_shape(shape: tuple, spec: P, axis_sizes) -> tuple:
  """The shape of one device's shard of an array of `shape` split as `spec`."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    out.append(dim // math.prod(axis_sizes[n] for n in names))
  return tuple(out)


def logical_sharding(abstract_tree, mesh: Mesh):
  """NamedShardings for a tree whose leaves may be boxed with logical axis names."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      partition_specs(abstract_tree, mesh.shape),
                      is_leaf=lambda x: isinstance(x, P))


def abstract_tree(init_fn, mesh: Mesh, *args):
  """(ShapeDtypeStructs with shardings, the shardings) of what `init_fn(rng, *args)` returns,
  its leaves boxed with logical axis names: nothing is allocated. The first is a restore target."""
  with mesh_rules(mesh):
    return shard_abstract(jax.eval_shape(init_fn, jax.random.PRNGKey(0), *args), mesh)


def shard_abstract(boxed, mesh: Mesh):
  """(ShapeDtypeStructs with shardings, the shardings) of abstract values boxed with logical
  axis names (what `jax.eval_shape` of an init returns)."""
  with mesh_rules(mesh):
    shardings = logical_sharding(boxed, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          strip_boxes(boxed), shardings)
  return abstract, shardings


def strip_boxes(tree):
  """The values of logically-partitioned boxes, with no sharding constraint applied."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def batch_sharding(mesh: Mesh, ndim: int = 2, stacked: bool = False) -> NamedSharding:
  """Batch arrays are split over BATCH_AXES on their leading axis; `stacked` batches (several
  steps' batches, [steps, rows, ...]) on their second."""
  lead = (None,) if stacked else ()
  return NamedSharding(mesh, P(*lead, BATCH_AXES, *([None] * (ndim - 1 - len(lead)))))


def global_batch(local: dict, mesh: Mesh, stacked: bool = False) -> batch_lib.Batch:
  """This process's rows (a dict of numpy arrays, Batch field names) assembled with every other
  process's into a Batch of global arrays, split over BATCH_AXES on the rows' axis (the
  leading one, or the second of a `stacked` batch: [steps, rows, ...])."""
  return batch_lib.from_dict({
    k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, stacked), v)
    for k, v in local.items()})


def batch_divisor(mesh: Mesh) -> int:
  """How many ways the batch is split: rows per step must be a multiple of it."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh):
  """Context in which jitted model code resolves logical axis constraints on `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield
