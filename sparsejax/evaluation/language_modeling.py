"""Validation loss and bits per byte."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

ForwardFn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[jax.Array, dict]]
"""`forward(inputs [B, T], positions [B, T], segment_ids [B, T]) -> (logits [B, T, V], aux)`, as the model."""


def make_sums_fn(forward: ForwardFn, token_bytes: np.ndarray):
    """`sums(batch) -> (nll_sum, token_count, byte_count, stats)` for one batch (contracts §3): float32
    scalars, and `stats` the model's "stats/<name>" auxiliaries keyed by <name>, from the same pass.

    token_bytes: int [V], the bytes of text each token stands for (tokenizer.token_bytes)."""
    token_bytes = jnp.asarray(token_bytes, jnp.float32)

    def sums(batch):
        logits, aux = forward(batch["inputs"], batch["positions"], batch["segment_ids"])
        logits = logits.astype(jnp.float32)
        mask = jnp.asarray(batch["loss_mask"], jnp.float32)
        targets = batch["targets"]
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        stats = {k[len("stats/"):]: v for k, v in aux.items() if k.startswith("stats/")}
        return jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(token_bytes[targets] * mask), stats

    return sums


def evaluate(sums_fn, batches: Iterable[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, stats) over `batches`: mean token loss (nats), perplexity and bits per byte, and the
    attention statistics averaged over the batches.

    Bits per byte = total nats / ln 2 / total bytes of the predicted tokens: comparable across
    tokenizers, unlike the per-token loss."""
    nll = tokens = nbytes = 0.0
    stats: dict[str, float] = {}
    count = 0
    for batch in batches:
        a, b, c, batch_stats = sums_fn(batch)
        nll, tokens, nbytes = nll + float(a), tokens + float(b), nbytes + float(c)
        for key, value in batch_stats.items():
            stats[key] = stats.get(key, 0.0) + float(value)
        count += 1
    if tokens == 0:
        raise ValueError("the validation batches hold no predicted tokens (every loss_mask is 0)")
    loss = nll / tokens
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
               "bits_per_byte": nll / math.log(2) / max(nbytes, 1.0), "tokens": tokens, "bytes": nbytes}
    return metrics, {key: value / count for key, value in stats.items()}
