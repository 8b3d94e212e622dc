"""`evaluate(config, workdir)`: what `eval.py` runs.

Loads the latest (or a given) checkpoint of `workdir`, then reports validation loss, perplexity and
bits per byte, the attention variant's statistics on validation data, and passkey / needle accuracy
over `config.eval`'s grid; writes `workdir/eval/report_<step>.json` and `workdir/eval/retrieval_<step>.png`.
Runs in one process (any number of local devices) under the config's mesh, as training does: with
`sequence` > 1 the model takes its sequence-parallel path (ring or all-gather), batches pass the
same balance permutation, and retrieval rows are padded to the balance granule and their logits put
back in token order.
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sparsejax import config as config_lib
from sparsejax.data import make_eval_iterator, make_tokenizer
from sparsejax.data.synthetic import haystack_for
from sparsejax.evaluation import language_modeling, plots, retrieval
from sparsejax.parallel import balance as balance_lib
from sparsejax.parallel import context
from sparsejax.parallel.mesh import batch_sharding, make_mesh, rules_from_config
from sparsejax.training.checkpoint import CheckpointError, Checkpointer, config_to_json_dict
from sparsejax.training.optimizer import make_optimizer
from sparsejax.training.state import StateFactory, merge_model
from sparsejax.training.step import make_global_batch


def load_model_state(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
    """(graphdef, params, rest, step) of checkpoint `step` (default: the latest) in `workdir`."""
    factory = StateFactory(config, make_mesh(config), make_optimizer(config.train))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
                                async_save=False, read_only=True)
    steps = checkpointer.all_steps()
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {checkpointer.directory}; train first "
                              f"(python train.py --config=... --workdir={workdir})")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"step={step} has no checkpoint in {checkpointer.directory}; valid steps: {steps}")
    checkpointer.check_compatible(step, config, resuming=False)
    state = checkpointer.restore_state(step, factory.abstract_with_shardings())
    checkpointer.close()
    return factory.graphdef, state.params, state.rest, step


def make_logits_fn(config: ml_collections.ConfigDict, mesh, graphdef, params, rest) -> retrieval.LogitsFn:
    """`logits_fn(inputs, positions, segment_ids) -> logits [N, L, V]` (numpy in, numpy out) that runs the
    model under `mesh`: rows padded to a multiple of the batch axes, the sequence permuted by the
    config's balance scheme (L must be a multiple of `context.sequence_multiple(config)`) and the
    logits returned in the original token order."""
    rules = rules_from_config(config)
    sharding = batch_sharding(mesh, rules)
    row_ways = math.prod(mesh.shape[axis] for axis in rules["batch"])
    cp = context.from_config(config)

    @jax.jit
    def forward(params, rest, inputs, positions, segment_ids):
        perm = None if cp is None or cp.balance == "none" else cp.permutation(inputs.shape[1])
        if perm is not None:
            inputs, positions, segment_ids = (jnp.take(x, perm, axis=1) for x in (inputs, positions, segment_ids))
        logits = merge_model(graphdef, params, rest)(inputs, positions, segment_ids)[0]
        return logits if perm is None else jnp.take(logits, balance_lib.inverse(perm), axis=1)

    def logits_fn(inputs, positions, segment_ids):
        n = inputs.shape[0]
        rows = [np.pad(np.asarray(x, np.int32), ((0, -n % row_ways), (0, 0)))
                for x in (inputs, positions, segment_ids)]                      # padding rows: segment 0
        with jax.set_mesh(mesh):
            logits = forward(params, rest, *(jax.device_put(x, sharding) for x in rows))
        return np.asarray(logits)[:n]
    return logits_fn


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
    """Evaluates checkpoint `step` (default: latest) of `workdir`; returns the report dict."""
    config_lib.validate(config, jax.device_count())
    graphdef, params, rest, step = load_model_state(config, workdir, step)
    mesh = make_mesh(config)
    sharding = batch_sharding(mesh, rules_from_config(config))
    boundary = context.data_boundary(config)
    tokenizer = make_tokenizer(config.data)

    @jax.jit
    def batch_sums(params, rest, batch):  # parameters are arguments, not constants baked into the program
        model_forward = lambda *inputs: merge_model(graphdef, params, rest)(*inputs)  # noqa: E731
        return language_modeling.make_sums_fn(model_forward, tokenizer.token_bytes)(boundary(batch))

    def sums(batch):  # token sums: the balance permutation does not change them
        with jax.set_mesh(mesh):
            return batch_sums(params, rest, make_global_batch(batch, sharding, batch["inputs"].shape[0]))

    batches = make_eval_iterator(config, "validation", num_batches=config.eval.validation_batches or None)
    lm, stats = language_modeling.evaluate(sums, batches)

    pad = math.lcm(retrieval.PAD_MULTIPLE, context.sequence_multiple(config))
    grid = retrieval.retrieval_grid(make_logits_fn(config, mesh, graphdef, params, rest), tokenizer, config.eval,
                                    pad_multiple=pad, haystack=haystack_for(config.data, "validation"))
    report = {"workdir": os.path.abspath(workdir), "step": step, "attention": config.attention.kind,
              "validation": lm, "attention_stats": stats, "retrieval": grid,
              "config": config_to_json_dict(config)}
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    report_path = os.path.join(out_dir, f"report_{step}.json")
    with open(report_path, "w") as f:
        json.dump(_finite_or_null(report), f, indent=1, allow_nan=False)   # strict JSON
    plots.retrieval_heatmap(grid, os.path.join(out_dir, f"retrieval_{step}.png"),
                            title=f"{config.attention.kind} @ step {step}")
    logging.info("evaluation of step %d: loss %.4f, bits/byte %.4f; retrieval %s; report %s", step, lm["loss"],
                 lm["bits_per_byte"], {t: float(np.mean(r["accuracy"])) for t, r in grid.items()}, report_path)
    return report


def _finite_or_null(x):
    """The report with NaN and ±inf floats (a diverged model's loss) as None: strict JSON has neither."""
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_null(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
