"""Orbax checkpoints of the train state: async saves, keep-N, restore onto any mesh."""

import os

import orbax.checkpoint as ocp


class Checkpointer:
  """A CheckpointManager for `<workdir>/checkpoints`, saving the TrainState under "state".

  Orbax writes each step into a temporary directory and renames it when complete, so a crash
  at any moment leaves the last finished checkpoint usable.
  """

  def __init__(self, directory: str, keep: int = 0, use_async: bool = True):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep or None,
      enable_async_checkpointing=use_async,
      create=True,
    )
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state) -> None:
    """Starts saving `state` as `step` (in the background when async); the caller picks steps."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state))
    self.manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state):
    """Restores `step` into `abstract_state`'s shapes, dtypes and shardings (any mesh)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    return self.manager.restore(step, args=args)["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
