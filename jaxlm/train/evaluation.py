"""`jaxlm eval`: a saved run's newest checkpoint scored by its kind's evaluator, the run read and
never written."""

import jax

from jaxlm import config as config_lib
from jaxlm import rundir, sharding
from jaxlm.train import modes


def evaluate_run(workdir, split: str = "dev") -> dict:
  """Scores the newest checkpoint of the run in `workdir` with its kind's evaluator: the task's
  metrics on `split` for finetune runs, the eval loss on the held-out tail of the data for the
  others (`jaxlm eval`; of dpo runs, SimPO's: the DPO and IPO losses need the reference model,
  which this params-only restore lacks, and say so).

  Raises:
    ValueError: for a split the run's kind does not have (check_split).
  """
  config = rundir.read_config(workdir)
  kind = config_lib.data_kind(config)  # a distill run scores as its student's head's kind
  check_split(kind, split)
  mesh = sharding.make_mesh(config.mesh)
  saved, params = rundir.load_run(workdir, mesh=mesh)
  shardings = jax.tree.map(lambda x: x.sharding, params)
  mode = modes.build(config, saved.tokenizer, saved.model, mesh, shardings,
                     eval_split=split if kind == "finetune" else None, train=False)
  with sharding.mesh_rules(mesh):
    return mode.evaluate(params)


def check_split(kind: str, split: str) -> None:
  """A finetune run scores any split its task has (the task refuses others); lm, sft, mlm and
  dpo runs have one held-out split, "dev": the data.val_fraction tail their training left out.
  Another split is refused rather than the tail scored under its name."""
  if kind != "finetune" and split != "dev":
    raise ValueError(f"--split={split!r}: a kind={kind!r} run has one held-out split, 'dev' (the "
                     "data.val_fraction tail of its data); use --split=dev")
