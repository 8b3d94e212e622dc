"""`xla`: block-sparse attention in plain XLA that gathers only the listed KV blocks.

Rows of a query unit: the `block_q` tokens × `Hq/Hl` heads of head unit u, token-major
(row = t·R + r with R = Hq/Hl). Head unit u reads KV head u // (Hl/Hkv).

Per chunk of query units the listed K/V blocks are gathered ([B, Hl, c, K, block_k, D]) and a one-shot
float32 softmax runs over the c·K·block_k gathered keys; a `lax.scan` walks the chunks so the
working set is bounded by `_CHUNK_ELEMENTS` whatever the sequence length (memory O(T·K·block_k)).

Backward: dQ is computed query-major from the same gathered blocks. dK/dV are the gathered
contributions scatter-added into float32 [B, Hkv·nk, block_k, D] accumulators carried through the scan.
We chose the scatter-add over a KV-major pass through the inverse CSR because the CSR's per-block
lists are ragged (up to nq entries for a block every query visits), which XLA can only express by
padding every KV block to nq entries: O(nq·nk) work, dense cost on a sparse layout. The scatter-add
does O(entries) work. Deterministic everywhere (`_accumulate`): on CPU (where this implementation is
the default) XLA's scatter is a sequential loop, so one scatter per chunk is; elsewhere XLA may lower a
scatter whose destinations collide to atomics (measured on an H200: dK/dV of one-token units differed
between two calls), so there the chunk's query units (and the head units of one KV group) are added in
order, one scatter each, whose destinations never collide: a unit's list has no duplicates and its
unused slots are dropped.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.layout import BlockLayout

_CHUNK_ELEMENTS = 1 << 24   # float32 elements of the largest per-chunk intermediates


def _einsum(spec, a, b):
    """float32 contraction at full precision (no TF32 / bf16 passes on GPU and TPU)."""
    return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)


def check_supported(q, k, v, layout: BlockLayout) -> None:
    """Every block size, head ratio, head dim and supported dtype works here."""
    del q, k, v, layout


# ---------------------------------------------------------------------------------------- layout of rows
def _to_units(x, nq, block_q, hl):
    """[B, T, H, D] -> [B, Hl, nq, block_q·R, D] (zero-padded past T)."""
    b, t, h, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, nq * block_q - t), (0, 0), (0, 0)))
    x = x.reshape(b, nq, block_q, hl, h // hl, d).transpose(0, 3, 1, 2, 4, 5)
    return x.reshape(b, hl, nq, block_q * (h // hl), d)


def _from_units(x, t, h):
    """[B, Hl, nq, block_q·R, D] -> [B, T, H, D]."""
    b, hl, nq, rows, d = x.shape
    r = h // hl
    x = x.reshape(b, hl, nq, rows // r, r, d).transpose(0, 2, 3, 1, 4, 5)
    return x.reshape(b, nq * (rows // r), h, d)[:, :t]


def _stats_to_units(x, nq, block_q, hl):
    """[B, Hq, T] -> [B, Hl, nq, block_q·R]."""
    b, h, t = x.shape
    x = jnp.pad(x, ((0, 0), (0, 0), (0, nq * block_q - t)))
    x = x.reshape(b, hl, h // hl, nq, block_q).transpose(0, 1, 3, 4, 2)
    return x.reshape(b, hl, nq, block_q * (h // hl))


def _stats_from_units(x, t, h):
    """[B, Hl, nq, block_q·R] -> [B, Hq, T]."""
    b, hl, nq, rows = x.shape
    r = h // hl
    x = x.reshape(b, hl, nq, rows // r, r).transpose(0, 1, 4, 2, 3)
    return x.reshape(b, h, nq * (rows // r))[..., :t]


def _kv_blocks(x, nk, block_k):
    """[B, T, Hkv, D] -> [B, Hkv·nk, block_k, D]: block j of KV head g at row g·nk + j."""
    b, t, h, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, nk * block_k - t), (0, 0), (0, 0)))
    return x.reshape(b, nk, block_k, h, d).transpose(0, 3, 1, 2, 4).reshape(b, h * nk, block_k, d)


def _kv_from_blocks(x, t, h):
    """[B, Hkv·nk, block_k, D] -> [B, T, Hkv, D]."""
    b, hn, bk, d = x.shape
    x = x.reshape(b, h, hn // h, bk, d).transpose(0, 2, 3, 1, 4)
    return x.reshape(b, (hn // h) * bk, h, d)[:, :t]


# ---------------------------------------------------------------------------------------- shared setup
class _Plan:
    """Everything both passes need: unit-major operands split into chunks for `lax.scan`."""

    def __init__(self, q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg):
        b, tq, hq, dqk = q.shape
        _, tk, hkv, dv = v.shape
        hl, nq, cap = layout.num_head_units, layout.num_q_blocks, layout.max_kv_blocks
        bq, bk, nk = layout.block_q, layout.block_k, layout.num_kv_blocks
        rows = bq * (hq // hl)
        per_unit = b * hl * cap * bk * (dqk + dv + 4 * rows)
        self.chunk = max(1, min(nq, _CHUNK_ELEMENTS // per_unit))
        self.num_chunks = -(-nq // self.chunk)
        self.shape = dict(b=b, tq=tq, hq=hq, tk=tk, hkv=hkv, hl=hl, nq=nq, bq=bq, bk=bk, nk=nk, rows=rows)

        layout_shape = (b, hl, nq)
        kv_indices = jnp.broadcast_to(layout.kv_indices, layout_shape + (cap,))
        kv_counts = jnp.broadcast_to(layout.kv_counts, layout_shape)
        # Global block row in _kv_blocks order: KV head of the unit times nk plus the block index.
        kv_head = jnp.arange(hl, dtype=jnp.int32) // (hl // hkv)
        self.block_rows = self._chunked(kv_indices + (kv_head * nk)[None, :, None, None], axis=2)
        self.block_ids = self._chunked(kv_indices, axis=2)
        self.slot_valid = self._chunked(jnp.arange(cap) < kv_counts[..., None], axis=2)

        def row_tokens(x):  # [B, Tq] -> [B, 1, nq, rows]
            x = jnp.pad(x, ((0, 0), (0, nq * bq - tq))).reshape(b, nq, bq)
            return jnp.repeat(x, hq // hl, axis=-1)[:, None]

        self.q_pos = self._chunked(row_tokens(q_pos), axis=2)
        self.q_valid = self._chunked(row_tokens(jnp.ones((b, tq), jnp.bool_)), axis=2)  # False past Tq
        self.q_seg = None if q_seg is None else self._chunked(row_tokens(q_seg), axis=2)
        pad_k = ((0, 0), (0, nk * bk - tk))
        self.kv_pos = jnp.pad(kv_pos, pad_k).reshape(b, nk, bk)
        self.kv_seg = None if kv_seg is None else jnp.pad(kv_seg, pad_k).reshape(b, nk, bk)

    def _chunked(self, x, axis):
        """Pad the unit axis to num_chunks·chunk and move the chunk index to the front."""
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, self.num_chunks * self.chunk - x.shape[axis])
        x = jnp.pad(x, pad)
        x = x.reshape(x.shape[:axis] + (self.num_chunks, self.chunk) + x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    def units(self, x):
        """[B, T, H, D] -> chunks [n, B, Hl, c, rows, D]."""
        s = self.shape
        return self._chunked(_to_units(x, s["nq"], s["bq"], s["hl"]), axis=2)

    def stats(self, x):
        """[B, Hq, T] -> chunks [n, B, Hl, c, rows]."""
        s = self.shape
        return self._chunked(_stats_to_units(x, s["nq"], s["bq"], s["hl"]), axis=2)

    def unchunk(self, x):
        """chunks [n, B, Hl, c, ...] -> [B, Hl, nq, ...]."""
        x = jnp.moveaxis(x, 0, 2)
        x = x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])
        return x[:, :, :self.shape["nq"]]


def _gather(blocks, block_rows):
    """blocks [B, N, bk, D], block_rows [B, Hl, c, K] -> [B, Hl, c, K, bk, D] in float32."""
    batch = jnp.arange(blocks.shape[0])[:, None, None, None]
    return blocks[batch, block_rows].astype(jnp.float32)


def _chunk_mask(plan, xs, causal, window):
    """bool [B, Hl, c, rows, K, bk]: which (row, gathered key) pairs are attended."""
    bk, tk = plan.shape["bk"], plan.shape["tk"]
    ids = xs["block_ids"]                                                  # [B, Hl, c, K]
    batch = jnp.arange(ids.shape[0])[:, None, None, None]
    key_index = ids[..., None] * bk + jnp.arange(bk)                       # [B, Hl, c, K, bk]
    key_ok = (key_index < tk) & xs["slot_valid"][..., None]
    mask = key_ok[:, :, :, None] & xs["q_valid"][..., None, None]
    if causal:
        kv_pos = plan.kv_pos[batch, ids][:, :, :, None]                     # [B, Hl, c, 1, K, bk]
        q_pos = xs["q_pos"][..., None, None]                                # [B, Hl, c, rows, 1, 1]
        mask = mask & (kv_pos <= q_pos)
        if window is not None:
            mask = mask & (q_pos - kv_pos < window)
    if plan.kv_seg is not None:
        kv_seg = plan.kv_seg[batch, ids]
        mask = mask & (kv_seg[:, :, :, None] == xs["q_seg"][..., None, None])
    return mask


def _chunk_inputs(plan):
    xs = dict(block_rows=plan.block_rows, block_ids=plan.block_ids, slot_valid=plan.slot_valid,
              q_pos=plan.q_pos, q_valid=plan.q_valid)
    if plan.q_seg is not None:
        xs["q_seg"] = plan.q_seg
    return xs


def _accumulate(accs, parts, rows, valid, hkv):
    """accs: float32 [B, Hkv·nk, bk, D] each; parts: float32 [B, Hl, c, K, bk, D] each, added at
    `rows` [B, Hl, c, K] (bool `valid` [B, Hl, c, K]: the slots within each list's count; the others
    hold zeros). Bitwise deterministic on every platform (module docstring)."""
    return jax.lax.platform_dependent(accs, parts, rows, valid, cpu=_add_at_once,
                                      default=lambda *args: _add_in_order(*args, hkv=hkv))


def _add_at_once(accs, parts, rows, valid):
    """One scatter-add per accumulator (deterministic where XLA's scatter is a sequential loop)."""
    del valid
    batch = jnp.arange(rows.shape[0])[:, None, None, None]
    return tuple(acc.at[batch, rows].add(part) for acc, part in zip(accs, parts))


def _add_in_order(accs, parts, rows, valid, *, hkv):
    """One scatter-add per (head unit of a KV group, query unit), in order: no two destinations of
    one scatter collide (a list has no duplicates; unused slots are dropped), so atomics cannot
    reorder the sums."""
    b, hl, c = rows.shape[:3]
    group = hl // hkv

    def rounds(x):  # [B, Hl, c, ...] -> [G'·c, B, Hkv, ...]; round r = (head unit g of each KV group, unit i)
        x = x.reshape((b, hkv, group, c) + x.shape[3:])
        return jnp.moveaxis(x, (2, 3), (0, 1)).reshape((group * c, b, hkv) + x.shape[4:])

    dropped = accs[0].shape[1]                                             # out of range: not added
    rows = rounds(jnp.where(valid, rows, dropped))
    parts = tuple(rounds(part) for part in parts)
    batch = jnp.arange(b)[:, None, None]

    def add_round(r, accs):
        return tuple(acc.at[batch, rows[r]].add(part[r], mode="drop") for acc, part in zip(accs, parts))

    return jax.lax.fori_loop(0, group * c, add_round, accs)


# ---------------------------------------------------------------------------------------- forward
def forward(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg, *, sm_scale, causal, interpret, window=None):
    """-> out [B, Tq, Hq, Dv] in q's dtype, lse [B, Hq, Tq] float32."""
    del interpret
    plan = _Plan(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg)
    s = plan.shape
    k_blocks, v_blocks = _kv_blocks(k, s["nk"], s["bk"]), _kv_blocks(v, s["nk"], s["bk"])

    def step(_, xs):
        k_g, v_g = _gather(k_blocks, xs["block_rows"]), _gather(v_blocks, xs["block_rows"])
        mask = _chunk_mask(plan, xs, causal, window)
        logits = _einsum("bucrd,buckjd->bucrkj", xs["q"].astype(jnp.float32), k_g) * sm_scale
        logits = jnp.where(mask, logits, -jnp.inf)
        peak = logits.max(axis=(-2, -1))
        peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
        p = jnp.where(mask, jnp.exp(logits - peak[..., None, None]), 0.0)
        total = p.sum(axis=(-2, -1))
        seen = total > 0
        safe_total = jnp.where(seen, total, 1.0)
        out = _einsum("bucrkj,buckjd->bucrd", p, v_g) / safe_total[..., None]
        lse = jnp.where(seen, peak + jnp.log(safe_total), -jnp.inf)
        return None, (out.astype(q.dtype), lse)

    xs = _chunk_inputs(plan) | dict(q=plan.units(q))
    _, (out, lse) = jax.lax.scan(step, None, xs)
    out = _from_units(plan.unchunk(out), s["tq"], s["hq"])
    lse = _stats_from_units(plan.unchunk(lse), s["tq"], s["hq"])
    return out, lse


# ---------------------------------------------------------------------------------------- backward
def backward(q, k, v, out, lse, delta, d_out, layout, q_pos, kv_pos, q_seg, kv_seg, *, sm_scale, causal,
             interpret, window=None):
    """-> dq, dk, dv in the dtypes of q, k, v. delta [B, Hq, Tq] = rowsum(dO·O) - dlse (0 on empty rows)."""
    del out, interpret
    plan = _Plan(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg)
    s = plan.shape
    k_blocks, v_blocks = _kv_blocks(k, s["nk"], s["bk"]), _kv_blocks(v, s["nk"], s["bk"])

    def step(acc, xs):
        dk_acc, dv_acc = acc
        k_g, v_g = _gather(k_blocks, xs["block_rows"]), _gather(v_blocks, xs["block_rows"])
        q_c, do_c = xs["q"].astype(jnp.float32), xs["d_out"].astype(jnp.float32)
        lse_c = xs["lse"]
        mask = _chunk_mask(plan, xs, causal, window) & jnp.isfinite(lse_c)[..., None, None]
        logits = _einsum("bucrd,buckjd->bucrkj", q_c, k_g) * sm_scale
        safe_lse = jnp.where(jnp.isfinite(lse_c), lse_c, 0.0)
        p = jnp.where(mask, jnp.exp(logits - safe_lse[..., None, None]), 0.0)
        dp = _einsum("bucrd,buckjd->bucrkj", do_c, v_g)
        ds = p * (dp - xs["delta"][..., None, None])
        dq = _einsum("bucrkj,buckjd->bucrd", ds, k_g) * sm_scale
        dk_g = _einsum("bucrkj,bucrd->buckjd", ds, q_c) * sm_scale
        dv_g = _einsum("bucrkj,bucrd->buckjd", p, do_c)
        dk_acc, dv_acc = _accumulate((dk_acc, dv_acc), (dk_g, dv_g), xs["block_rows"], xs["slot_valid"], s["hkv"])
        return (dk_acc, dv_acc), dq.astype(q.dtype)

    xs = _chunk_inputs(plan) | dict(q=plan.units(q), d_out=plan.units(d_out), lse=plan.stats(lse),
                                    delta=plan.stats(delta))
    acc = (jnp.zeros(k_blocks.shape, jnp.float32), jnp.zeros(v_blocks.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(step, acc, xs)
    dq = _from_units(plan.unchunk(dq), s["tq"], s["hq"])
    dk = _kv_from_blocks(dk, s["tk"], s["hkv"]).astype(k.dtype)
    dv = _kv_from_blocks(dv, s["tk"], s["hkv"]).astype(v.dtype)
    return dq, dk, dv
