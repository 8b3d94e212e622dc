"""`reference`: dense masked attention in float32, the oracle every other implementation is tested against.

It expands the layout to a token-level mask [B, Hq, Tq, Tk] (O(Tq·Tk) memory: for tests and small
sizes only), combines it with the causal, window, segment and ragged-end masks, and applies the softmax
definition directly. Its backward is `jax.vjp` of the same dense float32 function.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.layout import BlockLayout

_HIGHEST = jax.lax.Precision.HIGHEST


def check_supported(q, k, v, layout: BlockLayout) -> None:
    """The reference serves every call that passes the API's validation."""
    del q, k, v, layout


def token_mask(layout: BlockLayout, q_pos, kv_pos, q_seg, kv_seg, *, num_q_heads: int, causal: bool,
               window: int | None = None):
    """bool [B, Hq, Tq, Tk]: query i of head h may see key j.

    q_pos [B, Tq], kv_pos [B, Tk] int32; q_seg/kv_seg [B, Tq]/[B, Tk] int32 or None; window (only with
    causal): also q_pos[i] - kv_pos[j] < window.
    """
    batch, tq = q_pos.shape
    tk = kv_pos.shape[1]
    blocks = layout.dense_block_mask()                                   # [Bl, Hl, nq, nk]
    heads_per_unit = num_q_heads // layout.num_head_units
    mask = jnp.repeat(blocks, heads_per_unit, axis=1)
    mask = jnp.repeat(jnp.repeat(mask, layout.block_q, axis=2), layout.block_k, axis=3)[:, :, :tq, :tk]
    mask = jnp.broadcast_to(mask, (batch, num_q_heads, tq, tk))
    if causal:
        mask = mask & (kv_pos[:, None, None, :] <= q_pos[:, None, :, None])
    if window is not None:
        mask = mask & (q_pos[:, None, :, None] - kv_pos[:, None, None, :] < window)
    if q_seg is not None:
        mask = mask & (kv_seg[:, None, None, :] == q_seg[:, None, :, None])
    return mask


def _dense(q, k, v, mask, sm_scale):
    """Masked softmax attention in float32. q [B,Tq,Hq,Dqk] k [B,Tk,Hkv,Dqk] v [B,Tk,Hkv,Dv],
    mask [B,Hq,Tq,Tk] -> out [B,Tq,Hq,Dv] float32, lse [B,Hq,Tq] float32."""
    group = q.shape[2] // k.shape[2]
    k = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    v = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k, precision=_HIGHEST) * sm_scale
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = logits.max(-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(mask, jnp.exp(logits - jax.lax.stop_gradient(row_max)), 0.0)
    total = p.sum(-1)                                                    # [B, Hq, Tq]
    seen = total > 0
    safe_total = jnp.where(seen, total, 1.0)
    lse = jnp.where(seen, jnp.log(safe_total) + jax.lax.stop_gradient(row_max[..., 0]), -jnp.inf)
    out = jnp.einsum("bhqk,bkhd->bqhd", p / safe_total[..., None], v, precision=_HIGHEST)
    return out, lse


def forward(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg, *, sm_scale, causal, interpret, window=None):
    del interpret
    mask = token_mask(layout, q_pos, kv_pos, q_seg, kv_seg, num_q_heads=q.shape[2], causal=causal,
                      window=window)
    out, lse = _dense(q, k, v, mask, sm_scale)
    return out.astype(q.dtype), lse


def backward(q, k, v, out, lse, delta, d_out, layout, q_pos, kv_pos, q_seg, kv_seg, *, sm_scale, causal,
             interpret, window=None):
    """Gradients by `jax.vjp` of the dense function. The lse cotangent is recovered from
    delta = rowsum(dO·O) - dlse exactly as api.py formed it (rows with lse = -inf have no gradient)."""
    del lse, interpret
    mask = token_mask(layout, q_pos, kv_pos, q_seg, kv_seg, num_q_heads=q.shape[2], causal=causal,
                      window=window)
    row_dot = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32),
                         precision=_HIGHEST)
    d_lse = row_dot - delta
    _, vjp = jax.vjp(lambda q_, k_, v_: _dense(q_, k_, v_, mask, sm_scale), q, k, v)
    dq, dk, dv = vjp((d_out.astype(jnp.float32), d_lse))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
