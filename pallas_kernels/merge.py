"""`merge_attention`: exact log-space merge of partial attention results.

If partial i attended to key set S_i (disjoint sets) and returned out_i (softmax-weighted values over
S_i) with lse_i = log Σ_{j∈S_i} exp(s_j), the attention over the union is
  lse = log Σ_i exp(lse_i),    out = Σ_i exp(lse_i - lse) · out_i.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def merge_attention(partials: Sequence[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
    """Merge [(out_i [B, T, H, Dv], lse_i [B, H, T]), ...] into (out [B, T, H, Dv], lse [B, H, T]).

    Arithmetic in float32; out takes the dtype of the first partial, lse is float32. A partial whose
    lse_i is -inf on a row saw no keys there: its out_i on that row is ignored, whatever it holds (0,
    or NaN from a caller's own 0/0). Rows where every lse_i is -inf give out 0 and lse -inf, with zero
    (not NaN) gradients.
    """
    partials = list(partials)
    if not partials:
        raise ValueError("merge_attention needs at least one (out, lse) pair, got none")
    for i, pair in enumerate(partials):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"partial {i} must be an (out, lse) pair, got {type(pair).__name__}")
    out0, lse0 = partials[0]
    if out0.ndim != 4:
        raise ValueError(f"out must be [B, T, H, Dv], got shape {out0.shape} in partial 0")
    b, t, h, _ = out0.shape
    for i, (out, lse) in enumerate(partials):
        if out.shape != out0.shape:
            raise ValueError(f"partial {i} has out shape {out.shape}, partial 0 has {out0.shape}")
        if lse.shape != (b, h, t):
            raise ValueError(f"partial {i} has lse shape {lse.shape}, expected [B, H, T] = {(b, h, t)}")
    lses = jnp.stack([jnp.asarray(lse, jnp.float32) for _, lse in partials])          # [n, B, H, T]
    peak = jax.lax.stop_gradient(lses.max(0))
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    total = jnp.exp(lses - peak).sum(0)
    seen = total > 0
    lse = jnp.where(seen, peak + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    weights = jnp.exp(lses - jnp.where(seen, lse, 0.0))                                 # 0 for -inf parts
    def seen_part(o, l):                # out zeroed where the partial saw nothing (before any product)
        return jnp.where(jnp.moveaxis(l, 1, 2)[..., None] == -jnp.inf, 0.0, o.astype(jnp.float32))

    out = sum(jnp.einsum("bht,bthd->bthd", w, seen_part(o, l))
              for w, l, (o, _) in zip(weights, lses, partials))
    return out.astype(out0.dtype), lse
