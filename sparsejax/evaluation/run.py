"""`evaluate(config, workdir)`: what `eval.py` runs.

Loads the latest (or a given) checkpoint of `workdir`, then reports validation loss, perplexity and
bits per byte, the attention variant's statistics on validation data, and passkey / needle accuracy
over `config.eval`'s grid; writes `workdir/eval/report_<step>.json` and `workdir/eval/retrieval_<step>.png`.
Runs in one process (any number of local devices).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sparsejax import config as config_lib
from sparsejax.data import make_eval_iterator, make_tokenizer
from sparsejax.evaluation import language_modeling, plots, retrieval
from sparsejax.parallel.mesh import make_mesh
from sparsejax.training.checkpoint import CheckpointError, Checkpointer, config_to_json_dict
from sparsejax.training.optimizer import make_optimizer
from sparsejax.training.state import StateFactory, merge_model


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
    checkpointer.check_compatible(step, config)
    state = checkpointer.restore_state(step, factory.abstract_with_shardings())
    checkpointer.close()
    return factory.graphdef, state.params, state.rest, step


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
    """Evaluates checkpoint `step` (default: latest) of `workdir`; returns the report dict."""
    config_lib.validate(config, jax.device_count())
    graphdef, params, rest, step = load_model_state(config, workdir, step)

    @jax.jit
    def forward(params, rest, inputs, positions, segment_ids):
        return merge_model(graphdef, params, rest)(inputs, positions, segment_ids)

    def logits_fn(inputs, positions, segment_ids):
        return forward(params, rest, jnp.asarray(inputs), jnp.asarray(positions), jnp.asarray(segment_ids))[0]

    tokenizer = make_tokenizer(config.data)

    @jax.jit
    def batch_sums(params, rest, batch):  # parameters are arguments, not constants baked into the program
        model_forward = lambda *inputs: merge_model(graphdef, params, rest)(*inputs)  # noqa: E731
        return language_modeling.make_sums_fn(model_forward, tokenizer.token_bytes)(batch)

    batches = make_eval_iterator(config, "validation", num_batches=config.eval.validation_batches)
    lm, stats = language_modeling.evaluate(lambda batch: batch_sums(params, rest, batch), batches)

    grid = retrieval.retrieval_grid(logits_fn, tokenizer, config.eval)
    report = {"workdir": os.path.abspath(workdir), "step": step, "attention": config.attention.kind,
              "validation": lm, "attention_stats": stats, "retrieval": grid,
              "config": config_to_json_dict(config)}
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    report_path = os.path.join(out_dir, f"report_{step}.json")
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1)
    plots.retrieval_heatmap(grid, os.path.join(out_dir, f"retrieval_{step}.png"),
                            title=f"{config.attention.kind} @ step {step}")
    logging.info("evaluation of step %d: loss %.4f, bits/byte %.4f; retrieval %s; report %s", step, lm["loss"],
                 lm["bits_per_byte"], {t: float(np.mean(r["accuracy"])) for t, r in grid.items()}, report_path)
    return report
