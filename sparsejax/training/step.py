"""The jitted train and eval steps.

Loss: mean token cross-entropy over `loss_mask` (float32) plus the attention variants' `loss/...`
auxiliaries. Gradient accumulation runs `grad_accum_steps` micro-batches through a `lax.scan` inside
the one jitted step: the batch `[B, T]` is viewed as `[B/A, A, T]` and micro-batch `a` takes rows
`a, A + a, 2A + a, ...`, so every device keeps its own rows (no data moves). Cross-entropy is
normalised by the token count of the whole batch, so the accumulated loss and gradient equal those of
one big batch (up to float summation order).

Batch dicts (docs/contracts.md §3): inputs, targets, positions, segment_ids [B, T] int32;
loss_mask [B, T] float32.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparsejax.parallel.context import data_boundary
from sparsejax.training.optimizer import learning_rate_schedule
from sparsejax.training.state import TrainState, merge_model, split_model

Batch = dict[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and token count, float32.

    logits [B, T, V] float32, targets [B, T] int32, mask [B, T] float32 -> (sum over the masked
    tokens of `logsumexp(logits) - logits[target]`, sum of the mask). The target logit is taken as
    a one-hot contraction, which stays local when the vocabulary axis is sharded.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32), axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum((log_z - target_logit) * mask), jnp.sum(mask)


def _model_loss(graphdef, params, rest, batch: Batch, token_count, aux_scale: float):
    """Objective of one (micro-)batch: CE summed / token_count of the whole batch + scaled aux losses."""
    model = merge_model(graphdef, params, rest)
    logits, aux = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    ce_sum, _ = cross_entropy_sum(logits, batch["targets"], batch["loss_mask"])
    ce = ce_sum / token_count
    aux = {k: jnp.asarray(v, jnp.float32) * aux_scale for k, v in aux.items()}
    objective = ce + sum((v for k, v in aux.items() if k.startswith("loss/")), jnp.zeros((), jnp.float32))
    _, _, new_rest = split_model(model)
    return objective, (ce, aux, new_rest)


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    optimizer: optax.GradientTransformation, mesh: Mesh, state_shardings: TrainState,
                    batch_sharding: NamedSharding) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)`, jitted with explicit shardings; `state` is donated.

    metrics (replicated float32 scalars): loss (cross-entropy), total_loss (the optimised objective),
    the variant auxiliaries (`loss/...`, `stats/...`), grad_norm (before clipping), param_norm (after
    the update; may overflow to inf for huge but finite parameters), params_finite (1.0 when every
    updated parameter is finite), learning_rate (of this update), loss_tokens (tokens in the loss).
    """
    accum = int(config.train.grad_accum_steps)
    schedule = learning_rate_schedule(config.train)
    micro_spec = PartitionSpec(None, *batch_sharding.spec)

    boundary = data_boundary(config)   # sequence parallelism: the balance permutation (else identity)

    def step(state: TrainState, batch: Batch):
        batch = boundary(batch)
        token_count = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        grad_fn = jax.value_and_grad(
            lambda p, r, b: _model_loss(graphdef, p, r, b, token_count, 1.0 / accum), has_aux=True)
        if accum == 1:
            (objective, (ce, aux, rest)), grads = grad_fn(state.params, state.rest, batch)
        else:
            def to_micro(x):  # [B, ...] -> [A, B/A, ...], micro-batch a = rows a, A + a, ...
                x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, micro_spec))
            micro = {k: to_micro(batch[k]) for k in BATCH_KEYS}

            def body(carry, micro_batch):
                grads_acc, objective_acc, ce_acc, aux_acc, rest = carry
                (objective, (ce, aux, rest)), grads = grad_fn(state.params, rest, micro_batch)
                add = lambda a, b: jax.tree.map(jnp.add, a, b)
                return (add(grads_acc, grads), objective_acc + objective, ce_acc + ce, add(aux_acc, aux), rest), None

            first = jax.tree.map(lambda x: x[0], micro)
            _, (_, aux_shape, _) = jax.eval_shape(lambda: grad_fn(state.params, state.rest, first))[0]
            zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)
            init = (zeros(state.params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                    zeros(aux_shape), state.rest)
            (grads, objective, ce, aux, rest), _ = jax.lax.scan(body, init, micro)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": ce, "total_loss": objective, **aux,
            "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
            "learning_rate": schedule(state.step), "loss_tokens": token_count,
            "params_finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])),
        }
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rest=rest)
        return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, state_shardings: TrainState,
                   batch_sharding: NamedSharding, config: ml_collections.ConfigDict | None = None
                   ) -> Callable[[Any, Any, Batch], tuple[jax.Array, jax.Array]]:
    """`eval_step(params, rest, batch) -> (cross-entropy sum, token count)`, float32 replicated scalars.
    With `config`, batches pass the sequence-parallel data boundary as in the train step."""
    boundary = (lambda batch: batch) if config is None else data_boundary(config)

    def step(params, rest, batch: Batch):
        batch = boundary(batch)
        model = merge_model(graphdef, params, rest)
        logits, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"])
        return cross_entropy_sum(logits, batch["targets"], batch["loss_mask"])

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
    return jax.jit(step, in_shardings=(state_shardings.params, state_shardings.rest, batch_shardings),
                   out_shardings=(replicated, replicated))


def make_global_batch(local_batch: dict[str, Any], sharding: NamedSharding, global_batch_size: int) -> Batch:
    """Per-process numpy batch (this process's rows of the global batch) -> global jax Arrays.

    local arrays [B / process_count, T]; result [B, T] sharded by `sharding`. Only the keys of
    docs/contracts.md §3 are kept; a missing key or a wrong row count raises naming it.
    """
    process_count = jax.process_count()
    out = {}
    for key in BATCH_KEYS:
        if key not in local_batch:
            raise KeyError(f"the data pipeline's batch lacks {key!r}; it has {sorted(local_batch)}")
        x = local_batch[key]
        if x.shape[0] * process_count != global_batch_size:
            raise ValueError(f"batch[{key!r}] has {x.shape[0]} rows on each of {process_count} processes; "
                             f"the global batch size is {global_batch_size}")
        out[key] = jax.make_array_from_process_local_data(sharding, x, (global_batch_size, *x.shape[1:]))
    return out
