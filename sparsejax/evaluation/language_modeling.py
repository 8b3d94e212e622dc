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
    """`sums(batch) -> (nll_sum, token_count, byte_count, stats, real_count)` for one batch (contracts
    §3): float32 scalars; `stats` the model's "stats/<name>" auxiliaries keyed by <name>, from the same
    pass (each a mean over the batch's real tokens, segment > 0), and `real_count` those tokens.

    token_bytes: int [V], the bytes of text each token stands for (tokenizer.token_bytes)."""
    token_bytes = jnp.asarray(token_bytes, jnp.float32)

    def sums(batch):
        logits, aux = forward(batch["inputs"], batch["positions"], batch["segment_ids"])
        logits = logits.astype(jnp.float32)
        mask = jnp.asarray(batch["loss_mask"], jnp.float32)
        targets = batch["targets"]
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        stats = {k[len("stats/"):]: v for k, v in aux.items() if k.startswith("stats/")}
        real = jnp.sum(jnp.asarray(batch["segment_ids"]) > 0, dtype=jnp.float32)
        return jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(token_bytes[targets] * mask), stats, real

    return sums


def evaluate(sums_fn, batches: Iterable[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, stats) over `batches`: mean token loss (nats), perplexity and bits per byte, and the
    attention statistics as means over the real tokens of all batches (each batch's mean weighted by
    its real tokens: padding rows and batches count for nothing).

    Bits per byte = total nats / ln 2 / total bytes of the predicted tokens: comparable across
    tokenizers, unlike the per-token loss. A batch's bytes are its `target_bytes` (document rows of
    `make_eval_iterator`: the bytes of text each target stands for, from the tokenizer's alignment to
    the document, exact for any SentencePiece normalisation) where it has them, else `sums_fn`'s
    count from the vocabulary (`token_bytes`: exact for bytes; for SentencePiece only for models
    trained with identity normalisation, no dummy prefix and byte fallback)."""
    nll = tokens = nbytes = real = 0.0
    stats: dict[str, float] = {}
    for batch in batches:
        a, b, c, batch_stats, n_real = sums_fn(batch)
        if "target_bytes" in batch:
            c = np.sum(np.asarray(batch["target_bytes"], np.float64) * np.asarray(batch["loss_mask"], np.float64))
        nll, tokens, nbytes, real = nll + float(a), tokens + float(b), nbytes + float(c), real + float(n_real)
        for key, value in batch_stats.items():
            stats[key] = stats.get(key, 0.0) + float(value) * float(n_real)
    if tokens == 0:
        raise ValueError("the validation batches hold no predicted tokens (every loss_mask is 0)")
    loss = nll / tokens
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
               "bits_per_byte": nll / math.log(2) / max(nbytes, 1.0), "tokens": tokens, "bytes": nbytes}
    return metrics, {key: value / max(real, 1.0) for key, value in stats.items()}
