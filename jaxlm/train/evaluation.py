"""`jaxlm eval`: a saved run's newest checkpoint scored by its kind's evaluator, the run read and
never written."""

import jax

from jaxlm import rundir, sharding
from jaxlm.train import modes


def evaluate_run(workdir, split: str = "dev") -> dict:
  """Scores the newest checkpoint of the run in `workdir` with its kind's evaluator: the task's
  metrics on `split` for finetune runs, the eval loss for language models (`jaxlm eval`)."""
  config = rundir.read_config(workdir)
  mesh = sharding.make_mesh(config.mesh)
  saved, params = rundir.load_run(workdir, mesh=mesh)
  shardings = jax.tree.map(lambda x: x.sharding, params)
  mode = modes.build(config, saved.tokenizer, saved.model, mesh, shardings,
                     eval_split=split if config.kind == "finetune" else None, train=False)
  with sharding.mesh_rules(mesh):
    return mode.evaluate(params)
