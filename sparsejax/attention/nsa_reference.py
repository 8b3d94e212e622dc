"""Float32 reference of the whole NSA attention, written from the paper's equations with dense
token-level masks (O(T²) memory: tests and small sizes only). It shares no code with the fast path
(`nsa.py`, `compressed.py`) except RoPE; in particular the compression gathers every block explicitly,
Eq. 9 is applied literally in the paper's 1-based indices through an overlap matrix, the selection is
a stable argsort, and each branch is a masked softmax over all T keys.

Axis letters: B batch, T tokens, H query heads, K KV heads, G = H / K, D head dim, N compressed
tokens, S = ⌈T / l'⌉ selection blocks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.layers import apply_rope

_HIGHEST = jax.lax.Precision.HIGHEST
_ACT = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}


def reference_compress(x, params, *, block: int, stride: int, activation: str):
    """φ(x_{i·d : i·d+l}) for 0 ≤ i ≤ ⌊(T − l)/d⌋: x [B, T, K, D] -> [B, N, K, D] float32."""
    b, t, k, d = x.shape
    n = 0 if t < block else (t - block) // stride + 1
    pos = np.arange(n)[:, None] * stride + np.arange(block)[None, :]                  # [N, l]
    blocks = x.astype(jnp.float32)[:, pos] + params.pe.astype(jnp.float32)[None, None, :, None, :]  # [B,N,l,K,D]
    flat = blocks.transpose(0, 1, 3, 2, 4).reshape(b, n, k, block * d)
    w1 = params.w1.astype(jnp.float32).reshape(block * d, -1)
    hidden = _ACT[activation](jnp.matmul(flat, w1, precision=_HIGHEST) + params.b1.astype(jnp.float32))
    return jnp.matmul(hidden, params.w2.astype(jnp.float32), precision=_HIGHEST) + params.b2.astype(jnp.float32)


def eq9_matrix(num_compressed: int, num_blocks: int, *, select_block: int, block: int, stride: int) -> np.ndarray:
    """M [N, S] with p_slc = p_cmp · M, from Eq. 9 read with 1-based j and i:
    p_slc[j] = Σ_{m<l'/d} Σ_{n<l/d} p_cmp[(l'/d)·j − m − n]."""
    m_ = np.zeros((num_compressed, num_blocks), np.float32)
    for j1 in range(1, num_blocks + 1):
        for m in range(select_block // stride):
            for n in range(block // stride):
                i1 = (select_block // stride) * j1 - m - n
                if 1 <= i1 <= num_compressed:
                    m_[i1 - 1, j1 - 1] += 1.0
    return m_


def _softmax_attention(q, k, v, mask, scale):
    """q [B, T, H, D], k/v [B, Tk, H, D], mask [B, H, T, Tk] -> (out [B, T, H, D], p [B, H, T, Tk])."""
    logits = jnp.einsum("bthd,bshd->bhts", q, k, precision=_HIGHEST) * scale
    logits = jnp.where(mask, logits, -jnp.inf)
    peak = jnp.max(logits, -1, keepdims=True)
    e = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(peak), jax.lax.stop_gradient(peak), 0.0)), 0.0)
    total = e.sum(-1, keepdims=True)
    p = e / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhts,bshd->bthd", p, v, precision=_HIGHEST), p


def nsa_reference(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, compress_k, compress_v,
                  rope_positions, segment_ids, *, spec, rope_theta: float):
    """Same arguments as `nsa.nsa_attention`. Returns out [B, T, H, D] float32 and the selection as a
    bool mask [B, K, T, S] (block j selected for query t of KV group k)."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win = map(f32, (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win))
    b, t, h, d = q.shape
    kv = k_slc.shape[2]
    g = h // kv
    l, s, ls, w = spec.compress_block, spec.compress_stride, spec.select_block, spec.window
    scale = d ** -0.5
    expand = lambda a: jnp.repeat(a, g, axis=2)                                       # K heads -> H heads
    tq = jnp.arange(t)[:, None]
    tk = jnp.arange(t)[None, :]
    seg = segment_ids
    same_doc = seg[:, None, :, None] == seg[:, None, None, :]                         # [B, 1, T, T]

    # compression branch
    n = 0 if t < l else (t - l) // s + 1
    kc = reference_compress(k_cmp, compress_k, block=l, stride=s, activation=spec.compress_activation)
    vc = reference_compress(v_cmp, compress_v, block=l, stride=s, activation=spec.compress_activation)
    ends = np.arange(n) * s + l - 1
    kc = apply_rope(kc, rope_positions[:, ends], rope_theta).astype(jnp.float32)
    complete = ends[None, :] <= np.arange(t)[:, None]                                 # [T, N]
    block_seg = seg[:, np.arange(n)[:, None] * s + np.arange(l)[None, :]]              # [B, N, l]
    cmp_doc = jnp.all(seg[:, :, None, None] == block_seg[:, None], axis=-1)           # [B, T, N]
    cmp_mask = jnp.broadcast_to((complete[None] & cmp_doc)[:, None], (b, h, t, n))
    if n:
        o_cmp, p_cmp = _softmax_attention(q, expand(kc), expand(vc), cmp_mask, scale)
    else:
        o_cmp, p_cmp = jnp.zeros_like(q), jnp.zeros((b, h, t, 0), jnp.float32)

    # selection scores: Eq. 9, sum over the G heads of each group, forced and impossible blocks
    num_blocks = -(-t // ls)
    p_slc = jnp.einsum("bhtn,ns->bhts", p_cmp, eq9_matrix(n, num_blocks, select_block=ls, block=l, stride=s),
                       precision=_HIGHEST).reshape(b, kv, g, t, num_blocks).sum(2)
    boundary = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)   # [B, T]
    start = jnp.max(jnp.where(boundary[:, None, :] & (tk <= tq)[None], tk[None], 0), axis=-1)  # [B, T]
    blocks = np.arange(num_blocks)[None, None, :]
    first, own = (start // ls)[:, :, None], (np.arange(t) // ls)[None, :, None]
    valid = (blocks >= first) & (blocks <= own)                                       # [B, T, S]
    forced = valid & ((blocks < first + spec.num_initial) | (blocks >= own - spec.num_local + 1))
    score = jnp.where(forced[:, None], jnp.inf, jnp.where(valid[:, None], p_slc, -jnp.inf))
    order = jnp.argsort(-score, axis=-1, stable=True)[..., : spec.num_selected]        # [B, K, T, n]
    taken = jnp.take_along_axis(score, order, axis=-1) > -jnp.inf
    selected = (jax.nn.one_hot(order, num_blocks, dtype=jnp.int32) * taken[..., None]).sum(-2) > 0

    # selection branch: keys of the selected blocks, causal, same document
    key_selected = jnp.repeat(selected, ls, axis=-1)[..., :t]                         # [B, K, T, T]
    slc_mask = jnp.repeat(key_selected, g, axis=1) & (tk <= tq) & same_doc
    o_slc, _ = _softmax_attention(q, expand(k_slc), expand(v_slc), slc_mask, scale)

    # sliding window branch
    win_mask = jnp.broadcast_to((tk <= tq) & (tk > tq - w) & same_doc, (b, h, t, t))
    o_win, _ = _softmax_attention(q, expand(k_win), expand(v_win), win_mask, scale)

    gates = f32(gates)
    out = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win
    return out, selected
