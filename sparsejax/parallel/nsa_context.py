"""NSA attention under context parallelism: the same function as `sparsejax.attention.nsa.nsa_attention`
for a sequence sharded over the `sequence` mesh axis (tokens in the balance permutation's order).

NSA reads the *row index* of every token (compression blocks, selection blocks and the window lie on
the grid of the packed row). Under a permutation the row index of permuted token i is `perm[i]`,
a static array, so every branch passes it as the kernel position and maps block indices with the
static block permutation. Branches:
- cmp: each device compresses the runs of original tokens it holds (zigzag chunks / stripes / shards:
  whole multiples of the stride), with a halo of the first l − d tokens of the next original run
  gathered from its owner (all-gathered: l − d tokens per run); the compressed K/V (T/d tokens: small)
  are then gathered to every device in original order, and the local queries attend to all of them
  (`ContextParallel.attend_gathered`).
- selection: scores of the local queries over the gathered compressed keys (Eq. 9, forced blocks,
  top-n: `compressed.py`'s pieces, with the queries' row indices and document starts passed
  explicitly; on GPU the Pallas importance kernel (fused with the top-n under `fused_topn`) through
  `compressed.select_blocks_pallas`, which reuses the compression branch's lse), then the selected
  blocks through the ring (or all-gather) scheme, block_q = 1; the row's first block (forced for every
  query of the first document) from a copy on every device.
- window: `nsa.window_attention`'s blocks of `BlockLayout.sliding_window` through the scheme, with the
  kernel's sliding window masking the far edge.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from pallas_kernels import merge_attention
from sparsejax.attention.compressed import (block_importance, block_scores, compress, compressed_positions,
                                            compressed_segments, document_starts, importance_implementation,
                                            num_compressed, resolve_importance, select_blocks_pallas, top_blocks)
from sparsejax.layers import apply_rope
from sparsejax.parallel import balance as balance_lib
from sparsejax.parallel.context import ContextParallel


def _unit_tables(perm: np.ndarray, unit: int, num_shards: int):
    """Static tables of the runs of `unit` original tokens (units) in permuted order.

    Returns (next_unit [n, m]: permuted unit index holding the original successor of each local unit,
    has_next [n, m] bool, inverse_units [T/unit]: permuted index of each original unit)."""
    units = balance_lib.block_permutation(perm, unit)                # original unit of each permuted unit
    inverse_units = balance_lib.inverse(units)
    successor = units + 1
    has_next = successor < len(units)
    next_unit = np.where(has_next, inverse_units[np.minimum(successor, len(units) - 1)], 0)
    return next_unit.reshape(num_shards, -1), has_next.reshape(num_shards, -1), inverse_units


def compress_sharded(k, v, params_k, params_v, *, spec, cp: ContextParallel):
    """φ over every complete compression block of the sharded sequence.

    k, v [B, T, K, D] (permuted order, sequence-sharded) -> kc, vc [B, N, K, D] in original order (N =
    ⌊(T − l)/d⌋ + 1), gathered (every device holds all of them)."""
    b, t, kv_heads, d_head = k.shape
    l, d = spec.compress_block, spec.compress_stride
    perm = cp.permutation(t)
    unit = balance_lib.unit_size(t, cp.num_shards, cp.balance, stripe=cp.stripe_size)
    if unit % d or unit < l - d:
        raise ValueError(f"NSA under context parallelism needs balance units of {unit} tokens to be a multiple of "
                         f"compress_stride = {d} and at least compress_block - compress_stride = {l - d}")
    next_unit, has_next, inverse_units = _unit_tables(perm, unit, cp.num_shards)
    halo = l - d
    tokens, _, _ = cp.specs()

    def local(k, v, pk, pv):
        r = jax.lax.axis_index("sequence")
        m = k.shape[1] // unit

        def one(x, params):
            local_heads = x.shape[2]                  # kv_heads / tensor: heads are sharded over tensor
            units = x.reshape(x.shape[0], m, unit, local_heads, d_head)
            if halo:
                heads = jax.lax.all_gather(units[:, :, :halo], "sequence", axis=1, tiled=True)   # [B, n·m, halo, K, D]
                nxt = jnp.take(heads, jnp.asarray(next_unit)[r], axis=1)
                nxt = jnp.where(jnp.asarray(has_next)[r][None, :, None, None, None], nxt, 0)
                units = jnp.concatenate([units, nxt.astype(units.dtype)], axis=2)
            out = compress(units.reshape((-1,) + units.shape[2:]), params, block=l, stride=d,
                           activation=spec.compress_activation)                              # [B·m, unit/d, K, D]
            return out.reshape(x.shape[0], m * unit // d, local_heads, d_head)

        return one(k, pk), one(v, pv)

    kc, vc = jax.shard_map(local, mesh=cp.mesh(), in_specs=(tokens, tokens, P(), P()), out_specs=(tokens, tokens),
                           check_vma=False)(k, v, params_k, params_v)
    n = num_compressed(t, l, d)
    per_unit = unit // d
    token = np.arange(n)
    order = inverse_units[token * d // unit] * per_unit + (token * d % unit) // d      # permuted slot of token i
    return jnp.take(kc, jnp.asarray(order), axis=1), jnp.take(vc, jnp.asarray(order), axis=1)


def select_sharded(q, kc, kv_segments, segment_ids, row_index, doc_start, *, spec, cp: ContextParallel, lse=None):
    """Selected blocks of the sharded queries (original block coordinates), as `compressed.select_blocks`.

    q [B, T, H, D] rotated (permuted order), kc [B, N, K, D] gathered, kv_segments [B, N], segment_ids and
    doc_start [B, T] (permuted order), row_index [T] (= perm); lse [B, H, T] float32 (permuted order): the
    compression branch's, or None. With lse, where `cp.implementation` picks pallas_gpu (auto on GPU), the
    scores come from the Pallas importance kernel (p = exp(s − lse)); otherwise from XLA, which
    normalises the probabilities itself. Returns indices [B, K, T, n'] (past the count: S) and counts
    [B, K, T]."""
    q, kc, lse = jax.lax.stop_gradient((q, kc, lse))
    t = q.shape[1]
    l, d, ls = spec.compress_block, spec.compress_stride, spec.select_block
    n = kc.shape[1]
    num_blocks = -(-t // ls)
    scale = 1.0 / math.sqrt(q.shape[-1])
    tokens, seq, _ = cp.specs()
    b, h = cp.batch_axes or None, cp.head_axes or None
    if lse is not None and n and resolve_importance(importance_implementation(cp.implementation)) == "pallas_gpu":
        def local_pallas(q, kc, lse, kv_seg, seg, tidx, start):
            return select_blocks_pallas(q, kc, lse, seg, kv_seg, tidx, start, block=l, stride=d, select_block=ls,
                                        num_blocks=num_blocks, num_selected=spec.num_selected,
                                        num_initial=spec.num_initial, num_local=spec.num_local,
                                        chunk_elements=spec.score_chunk_elements, interpret=cp.interpret,
                                        fused_topn=spec.fused_topn)

        return jax.shard_map(local_pallas, mesh=cp.mesh(),
                             in_specs=(tokens, P(b, None, h, None), P(b, h, "sequence"), P(b, None), seq,
                                       P("sequence"), seq),
                             out_specs=(P(b, h, "sequence", None), P(b, h, "sequence")), check_vma=False)(
            q, kc, lse, kv_segments, segment_ids, row_index, doc_start)

    def local(q, kc, kv_seg, seg, tidx, start):
        bl, tl, hq, dh = q.shape
        kv_heads = kc.shape[2]
        g = hq // kv_heads
        chunk = max(1, min(tl, spec.score_chunk_elements // max(1, bl * hq * max(n, num_blocks))))
        while tl % chunk:
            chunk -= 1
        nc = tl // chunk
        kv_pos = compressed_positions(n, l, d)
        xs = (q.reshape(bl, nc, chunk, kv_heads, g, dh).swapaxes(0, 1), seg.reshape(bl, nc, chunk).swapaxes(0, 1),
              start.reshape(bl, nc, chunk).swapaxes(0, 1), tidx.reshape(nc, chunk))

        def one_chunk(args):
            qc, segc, startc, tc = args
            if n:
                logits = jnp.einsum("bckgd,bnkd->bkgcn", qc, kc, preferred_element_type=jnp.float32) * scale
                seen = (kv_pos[None, None, None, None, :] <= tc[None, None, None, :, None]) & (
                    kv_seg[:, None, None, None, :] == segc[:, None, None, :, None])
                logits = jnp.where(seen, logits, -jnp.inf)
                peak = logits.max(-1, keepdims=True)
                e = jnp.where(seen, jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
                total = e.sum(-1, keepdims=True)
                p = (e / jnp.where(total > 0, total, 1.0)).sum(2)                       # [B, K, C, N]
                p_slc = block_importance(p, num_blocks, select_block=ls, block=l, stride=d)
            else:
                p_slc = jnp.zeros((bl, kv_heads, chunk, num_blocks), jnp.float32)
            scores = block_scores(p_slc, tc, startc, select_block=ls, num_initial=spec.num_initial,
                                  num_local=spec.num_local)
            return top_blocks(scores, spec.num_selected)

        idx, cnt = jax.lax.map(one_chunk, xs)                # [nc, B, K, C, n'], [nc, B, K, C]
        idx = idx.transpose(1, 2, 0, 3, 4).reshape(bl, kv_heads, tl, -1)
        cnt = cnt.transpose(1, 2, 0, 3).reshape(bl, kv_heads, tl)
        return idx, cnt

    return jax.shard_map(local, mesh=cp.mesh(),
                         in_specs=(tokens, P(b, None, h, None), P(b, None), seq, P("sequence"), seq),
                         out_specs=(P(b, h, "sequence", None), P(b, h, "sequence")), check_vma=False)(
        q, kc, kv_segments, segment_ids, row_index, doc_start)


def window_sharded(q, k, v, segment_ids, row_index, *, window: int, block: int, cp: ContextParallel):
    """Exact sliding window t − w < j ≤ t of `nsa.window_attention` on the sharded sequence: the
    w/b + 1 blocks of `BlockLayout.sliding_window` per query block (mapped to sharded block
    coordinates) through the scheme, with the kernel's `window=w` masking the far edge.

    q [B, T, H, D], k/v [B, T, K, D], segment_ids [B, T] (permuted order); row_index [B, T] (= perm)."""
    t, kv_heads = q.shape[1], k.shape[2]
    nq = t // block
    own = cp.permutation(t)[::block] // block                          # original block of each local query block
    cap = min(nq, -(-(block + window - 1) // block) + 1)
    lo = np.maximum(own * block - window + 1, 0) // block
    count = np.minimum(own - lo + 1, cap)
    order = cp.block_order(t, block)
    indices = order[np.minimum(lo[:, None] + np.arange(cap), nq - 1)]
    heads = lambda x: jnp.asarray(np.broadcast_to(x, (1, kv_heads) + x.shape).astype(np.int32))
    return cp(q, k, v, row_index, segment_ids, kv_blocks=(heads(indices), heads(count)), window=window,
              block_q=block, block_k=block)[0]


def ring_selection(indices, counts, t: int, *, spec, cp: ContextParallel):
    """The selection lists that ride the ring, in sharded block coordinates.

    indices [B, K, T, n'] (original block coordinates, ascending, valid ones first), counts [B, K, T].
    With `num_initial` >= 1 the row's first block is left out (`selected_sharded` serves it from a copy
    on every device): every query whose document reaches into block 0 has it forced, and every other
    query is masked from it by segment ids, so this is exact. It keeps the ring balanced per step:
    otherwise all queries visit block 0 on shard 0 and one device per step does that extra work."""
    if spec.num_initial >= 1:
        first = (indices[..., 0] == 0) & (counts > 0)
        indices = jnp.where(first[..., None], jnp.roll(indices, -1, axis=-1), indices)
        counts = counts - first.astype(counts.dtype)
    order = jnp.asarray(cp.block_order(t, spec.select_block))
    return jnp.take(order, jnp.minimum(indices, order.shape[0] - 1)), counts


def selected_sharded(q, k, v, segment_ids, segments_original, rows, indices, counts, *, spec, cp: ContextParallel):
    """Selection branch of the sharded sequence: the ring over the selected blocks, and (num_initial >= 1)
    the row's first block from a gathered copy, merged in log space. q [B, T, H, D], k/v [B, T, K, D],
    segment_ids and rows [B, T] (permuted order), segments_original [B, T] (row order)."""
    t, ls = q.shape[1], spec.select_block
    out, lse = cp(q, k, v, rows, segment_ids, kv_blocks=ring_selection(indices, counts, t, spec=spec, cp=cp),
                  block_q=1, block_k=ls)
    if spec.num_initial < 1:
        return out
    first = jnp.asarray(balance_lib.inverse(cp.permutation(t))[:ls])           # where row block 0 lives
    k0, v0 = jnp.take(k, first, axis=1), jnp.take(v, first, axis=1)
    pos0 = jnp.broadcast_to(jnp.arange(ls, dtype=jnp.int32), (q.shape[0], ls))
    out0, lse0 = cp.attend_gathered(q, k0, v0, rows, segment_ids, pos0, segments_original[:, :ls],
                                    block_q=spec.select_block, block_k=ls)
    return merge_attention([(out, lse), (out0, lse0)])[0]


def nsa_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, compress_k, compress_v, rope_positions,
                  segment_ids, *, spec, rope_theta: float, cp: ContextParallel):
    """`nsa.nsa_attention` for a sequence-sharded, balance-permuted sequence (same arguments, plus `cp`).

    All [B, T, ...] inputs are in permuted order. Returns out [B, T, H, D] (permuted order) and the
    selection (indices [B, K, T, n'] in original block coordinates, counts [B, K, T]), permuted order."""
    b, t, _, _ = q.shape
    l, d, ls = spec.compress_block, spec.compress_stride, spec.select_block
    perm = cp.permutation(t)
    inverse = jnp.asarray(balance_lib.inverse(perm))
    row_index = jnp.asarray(perm)
    rows = jnp.broadcast_to(row_index, (b, t))
    segments_original = jnp.take(segment_ids, inverse, axis=1)
    doc_start = jnp.take(document_starts(segments_original), row_index, axis=1)
    n = num_compressed(t, l, d)
    if n:
        kc, vc = compress_sharded(k_cmp, v_cmp, compress_k, compress_v, spec=spec, cp=cp)
        ends = compressed_positions(n, l, d)
        kc = apply_rope(kc, jnp.take(rope_positions, inverse[ends], axis=1), rope_theta)
        kv_seg = compressed_segments(segments_original, n, l, d)
        kv_pos = jnp.broadcast_to(ends, (b, n))
        o_cmp, lse_cmp = cp.attend_gathered(q, kc, vc, rows, segment_ids, kv_pos, kv_seg,
                                            block_q=spec.compress_kernel_block_q,
                                            block_k=spec.compress_kernel_block_k)
    else:
        kc, lse_cmp = jnp.zeros((b, 0) + k_cmp.shape[2:], q.dtype), None
        kv_seg = jnp.zeros((b, 0), jnp.int32)
        o_cmp = jnp.zeros(q.shape[:3] + v_cmp.shape[3:], q.dtype)
    indices, counts = select_sharded(q, kc, kv_seg, segment_ids, row_index, doc_start, spec=spec, cp=cp,
                                     lse=lse_cmp)
    # as in `nsa.nsa_attention`: a remat policy that saves this name spares the backward the importance pass
    indices, counts = checkpoint_name((indices, counts), "nsa_selection")
    o_slc = selected_sharded(q, k_slc, v_slc, segment_ids, segments_original, rows, indices, counts, spec=spec,
                             cp=cp)
    o_win = window_sharded(q, k_win, v_win, segment_ids, rows, window=spec.window, block=spec.window_block, cp=cp)
    g = gates.astype(jnp.float32)
    out = sum(g[..., c, None] * o.astype(jnp.float32) for c, o in enumerate((o_cmp, o_slc, o_win)))
    return out.astype(q.dtype), (indices, counts)


def original_order(indices, counts, segment_ids, *, cp: ContextParallel):
    """The selection and segment ids back in row order (for `nsa.attention_statistics`):
    indices [B, K, T, n'], counts [B, K, T], segment_ids [B, T] in permuted order -> same, row order."""
    inverse = jnp.asarray(balance_lib.inverse(cp.permutation(segment_ids.shape[1])))
    return (jnp.take(indices, inverse, axis=2), jnp.take(counts, inverse, axis=2),
            jnp.take(segment_ids, inverse, axis=1))
