"""Validation loss and bits per byte."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[np.ndarray, np.ndarray, np.ndarray], jax.Array]


def make_sums_fn(logits_fn: LogitsFn, token_bytes: np.ndarray):
    """`sums(batch) -> (nll_sum, token_count, byte_count)` float32 scalars for one batch (contracts §3).

    token_bytes: int [V], the bytes of text each token stands for (tokenizer.token_bytes)."""
    token_bytes = jnp.asarray(token_bytes, jnp.float32)

    def sums(batch):
        logits = logits_fn(batch["inputs"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
        mask = jnp.asarray(batch["loss_mask"], jnp.float32)
        targets = batch["targets"]
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return (jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(token_bytes[targets] * mask))

    return sums


def evaluate(sums_fn, batches: Iterable[dict]) -> dict[str, float]:
    """Mean token loss (nats), perplexity and bits per byte over `batches`.

    Bits per byte = total nats / ln 2 / total bytes of the predicted tokens: comparable across
    tokenizers, unlike the per-token loss."""
    nll = tokens = nbytes = 0.0
    for batch in batches:
        a, b, c = sums_fn(batch)
        nll, tokens, nbytes = nll + float(a), tokens + float(b), nbytes + float(c)
    if tokens == 0:
        raise ValueError("the validation batches hold no predicted tokens (every loss_mask is 0)")
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": nll / math.log(2) / max(nbytes, 1.0),
            "tokens": tokens, "bytes": nbytes}
