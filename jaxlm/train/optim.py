"""Optimizer from config: AdamW (or Adafactor/Lion/SGD) with warmup + cosine decay and clipping."""

import jax
import optax

OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
_NO_DECAY = ("bias", "scale")


def lr_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `cfg.lr`, then cosine (or, with optim.schedule="linear", linear)
  decay to `cfg.min_lr` at `decay_steps`."""
  decay_steps = cfg.decay_steps or total_steps
  if cfg.warmup_steps >= decay_steps:
    raise ValueError(
      f"optim.warmup_steps={cfg.warmup_steps} must be below the decay horizon {decay_steps} "
      "(optim.decay_steps, or train.steps when it is 0)"
    )
  if cfg.get("schedule", "cosine") == "linear":  # BERT fine-tuning: linear decay to min_lr
    return optax.join_schedules([
      optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
      optax.linear_schedule(cfg.lr, cfg.min_lr, decay_steps - cfg.warmup_steps),
    ], [cfg.warmup_steps])
  if cfg.get("schedule", "cosine") != "cosine":
    raise ValueError(f"optim.schedule={cfg.schedule!r} is not one of ('cosine', 'linear')")
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.lr,
    warmup_steps=cfg.warmup_steps,
    decay_steps=decay_steps,
    end_value=cfg.min_lr,
  )


def decay_mask(params):
  """True for weights that get weight decay: kernels and embeddings, not biases or norm scales."""

  def wants_decay(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return names[-1] not in _NO_DECAY

  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, learning-rate schedule) for the `optim` config section."""
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f"optim.name={cfg.name!r} is not one of {OPTIMIZERS}")
  schedule = lr_schedule(cfg, total_steps)
  if cfg.name == "adamw":
    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  elif cfg.name == "lion":
    opt = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                     mask=decay_mask)
  elif cfg.name == "adafactor":
    opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None,
                          weight_decay_mask=decay_mask)
  else:
    opt = optax.sgd(schedule, momentum=cfg.b1 or None)
  if cfg.clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip), opt)
  return opt, schedule
