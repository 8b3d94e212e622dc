"""Training: optimizer, jitted train step, loop, orbax checkpoints and metrics.

This module only holds the `config.train` section (defaults and validation) so that `configs/` can
import it cheaply; the loop lives in `sparsejax.training.loop` (`train(config, workdir)`).
"""
from __future__ import annotations

import math

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """Defaults of `config.train`."""
    c = ml_collections.ConfigDict()
    c.num_steps = 1000            # optimizer updates in the whole run
    c.learning_rate = 3e-4        # peak learning rate, reached at the end of the warm-up
    c.warmup_steps = 100          # linear warm-up from learning_rate / warmup_steps
    c.end_lr_ratio = 0.1          # cosine decay ends at learning_rate * end_lr_ratio at num_steps
    c.weight_decay = 0.1          # decoupled (AdamW); matrices only, not norm scales or biases
    c.b1 = 0.9
    c.b2 = 0.95
    c.eps = 1e-8
    c.grad_clip = 1.0             # global-norm clipping threshold; 0 disables clipping
    c.grad_accum_steps = 1        # micro-batches per update, accumulated inside one jitted step
    c.log_every = 10              # steps between log lines / metrics.jsonl entries
    c.eval_every = 200            # steps between validations; 0 disables periodic validation
    c.eval_batches = 8            # validation batches per validation
    c.checkpoint_every = 200      # steps between checkpoints; 0 = only at the end and on preemption
    c.keep_checkpoints = 3        # the last N checkpoints are kept
    c.async_checkpointing = True  # orbax writes in a background thread; training continues
    c.peak_flops_per_device = 0.0 # FLOP/s per device for MFU; 0 = look up the device in the table
    return c


_INT_RANGES = {
    # key: (minimum, description of the valid values)
    "num_steps": (1, "an integer >= 1"),
    "warmup_steps": (0, "an integer >= 0 and <= num_steps"),
    "grad_accum_steps": (1, "an integer >= 1 that divides data.global_batch_size"),
    "log_every": (1, "an integer >= 1"),
    "eval_every": (0, "an integer >= 0 (0 disables validation)"),
    "eval_batches": (1, "an integer >= 1"),
    "checkpoint_every": (0, "an integer >= 0 (0 = save only at the end and on preemption)"),
    "keep_checkpoints": (1, "an integer >= 1"),
}


def _check_float(train, key: str, ok, valid: str) -> None:
    value = train[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"config.train.{key}={value!r} is invalid; valid values: {valid}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks `config.train` (and its consistency with `config.data`); raises ValueError naming the
    key, the bad value and the valid values."""
    train = config.train
    expected = set(default_config().keys())
    unknown = sorted(set(train.keys()) - expected)
    if unknown:
        raise ValueError(f"unknown key(s) config.train.{', config.train.'.join(unknown)}; "
                         f"valid keys: {sorted(expected)}")
    missing = sorted(expected - set(train.keys()))
    if missing:
        raise ValueError(f"missing key(s) in config.train: {missing}")
    for key, (minimum, valid) in _INT_RANGES.items():
        value = train[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"config.train.{key}={value!r} is invalid; valid values: {valid}")
    if train.warmup_steps > train.num_steps:
        raise ValueError(f"config.train.warmup_steps={train.warmup_steps} exceeds "
                         f"config.train.num_steps={train.num_steps}; valid values: 0..num_steps")
    _check_float(train, "learning_rate", lambda v: v > 0, "a finite float > 0")
    _check_float(train, "end_lr_ratio", lambda v: 0 <= v <= 1, "a float in [0, 1]")
    _check_float(train, "weight_decay", lambda v: v >= 0, "a finite float >= 0")
    _check_float(train, "b1", lambda v: 0 <= v < 1, "a float in [0, 1)")
    _check_float(train, "b2", lambda v: 0 <= v < 1, "a float in [0, 1)")
    _check_float(train, "eps", lambda v: v > 0, "a finite float > 0")
    _check_float(train, "grad_clip", lambda v: v >= 0, "a finite float >= 0 (0 disables clipping)")
    _check_float(train, "peak_flops_per_device", lambda v: v >= 0,
                 "a finite float >= 0 (0 = look the device up in the peak table)")
    if not isinstance(train.async_checkpointing, bool):
        raise ValueError(f"config.train.async_checkpointing={train.async_checkpointing!r} is invalid; "
                         "valid values: True or False")
    data = config.get("data")
    if data is not None and "global_batch_size" in data:
        batch = data.global_batch_size
        if isinstance(batch, int) and batch > 0 and batch % train.grad_accum_steps:
            raise ValueError(f"config.train.grad_accum_steps={train.grad_accum_steps} does not divide "
                             f"config.data.global_batch_size={batch}; valid values: divisors of {batch}")
