"""AdamW with linear warm-up and cosine decay, and global-norm gradient clipping (optax).

Gradient accumulation is not done here but inside the jitted train step (`step.py`), so one call is
one optimizer update and the optimizer state is the same whatever `grad_accum_steps` is.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Learning rate of update `count` (0-based).

    Warm-up: `lr * (count + 1) / warmup_steps` for `count < warmup_steps`, so the first update already
    moves. Then a half cosine from `lr` at `count = warmup_steps` to `lr * end_lr_ratio` at
    `count = num_steps`, constant after that.
    """
    peak = float(train.learning_rate)
    end = peak * float(train.end_lr_ratio)
    warmup = int(train.warmup_steps)
    decay = max(int(train.num_steps) - warmup, 1)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = peak * (count + 1.0) / max(warmup, 1)
        progress = jnp.clip((count - warmup) / decay, 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(count < warmup, warm, cosine)

    return schedule


_NOT_DECAYED = ("scale", "bias", "b1", "b2")     # norm scales and biases, whatever their rank


def decay_mask(params):
    """Weight decay applies to matrices (embeddings, projections, the NSA compression MLPs' weights
    and position encodings), not to norm scales or biases. A parameter's own rank decides, so that
    scanned layers (params["layers"], stacked on a leading layer axis) decay exactly what the list
    layout (params["blocks"][i]) decays; biases of rank 2 (NSA's gate bias [H, 3]) are not decayed."""
    def decays(path, p):
        names = [getattr(k, "key", None) for k in path]
        own_ndim = p.ndim - (names[0] == "layers")
        return own_ndim >= 2 and names[-1] not in _NOT_DECAYED
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping (if `grad_clip > 0`) followed by AdamW with the schedule above."""
    adamw = optax.adamw(
        learning_rate=learning_rate_schedule(train), b1=float(train.b1), b2=float(train.b2),
        eps=float(train.eps), weight_decay=float(train.weight_decay), mask=decay_mask)
    if train.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(float(train.grad_clip)), adamw)
    return adamw
