"""NSA's compression branch and the block selection it drives (arXiv 2502.11089, §3.3.1–3.3.2).

Axis letters: B batch, T tokens, H query heads, K KV heads, G = H / K query heads per KV group,
D head dim, N compressed tokens, S selection blocks, F hidden width of the compression MLP, n the
number of selected blocks per (token, KV group).

Compression. Compressed token i summarises the keys (or values) of positions [i·d, i·d+l−1]
(length l, stride d, d | l) through a learnable MLP φ with an intra-block position encoding:
    φ(x_i) = W2 · act(W1 · flat(x_i + pe) + b1) + b2,   x_i = [l, D],  pe = [l, D],  W1 = [l·D, F].
Only complete blocks exist: N = ⌊(T − l)/d⌋ + 1 (0 when T < l). Because W1 is linear, the position
encoding enters as the constant bias flat(pe)·W1, and flat(x_i)·W1 = Σ_s chunk_{i+s} · W1[s] over
the l/d stride-length chunks of the block: `compress` computes one product per chunk (no block is
ever copied) and sums shifted views.

Visibility. Compressed token i is visible to query t only once its block is complete, t ≥ i·d+l−1:
the attention call gives key i the kernel position i·d+l−1 and query t the position t (indices in
the packed row), and the kernel's causal rule `kv_pos <= q_pos` does the rest.

Packed documents (our decision; the paper trains on unpacked sequences). Compression blocks lie on
the grid of the packed row, not of each document. A block inside one document carries that
document's segment id; a block that straddles a document boundary carries segment −1, which no query
has (documents are ≥ 1, padding 0), so it is never visible: nothing of one document leaks into
another. A document that starts on the selection grid (a multiple of l', which d divides) therefore
gets exactly the compressed tokens and selection blocks it would have alone, and the same outputs;
one that starts elsewhere loses up to l/d − 1 compressed tokens at its start and gets a partial
initial block, so its outputs depend on its offset in the row. The data pipeline aligns document
starts for NSA (`config.data.document_alignment`, `NSAAttention.document_alignment`).

Selection importance (Eq. 8–10). p_cmp = softmax of the compression logits per query head; summed
over the G heads of a KV group (probabilities, not logits); mapped to selection blocks of length l'
by Eq. 9. The paper writes Eq. 9 with 1-based indices,
    p_slc[j] = Σ_{m=0}^{l'/d−1} Σ_{n=0}^{l/d−1} p_cmp[(l'/d)·j − m − n];
in 0-based indices (block j = positions [j·l', (j+1)·l'−1], token i = [i·d, i·d+l−1]) this is
    p_slc[j] = Σ_{k=0}^{l'/d+l/d−2} c_k · p_cmp[(l'/d)(j+1) − 1 − k],  c_k = #{(m, n): m + n = k},
i.e. every compressed token overlapping block j, weighted by its overlap in units of d. Top-n blocks
per (token, KV group), with the first `num_initial` blocks of the query's document and the
`num_local` blocks ending at the query's own block always selected (+inf) and counted inside n;
blocks after the query's block or before its document are −inf and never selected.

The importance pass never materialises [T, N] in memory: `select_blocks` walks query chunks with
`lax.map`, recomputes the logits, turns them into probabilities with the compression branch's own
log-sum-exp (p = exp(s − lse): no second reduction), maps to blocks and keeps only the top-n
indices [B, K, T, n]. It is not differentiable (indices); it reads its inputs through stop_gradient.
Two implementations: "xla" (the chunk's [B, K, G, C, N] float32 logits go through HBM, then
`block_scores` and `top_blocks`) and "pallas_gpu" (`pallas_kernels.nsa_importance.importance_scores`
writes the Eq. 9 block scores [B, K, C, S] per chunk of queries, XLA takes the top-n). With
`fused_topn=True` (n <= 32) "pallas_gpu" runs `nsa_importance.importance_topn` instead: one kernel
computes the scores, applies the forced/impossible blocks and keeps a running top-n per (token, KV
group), writing only the indices and counts: on an H200 at 64k, 21.4 ms against 43.1 ms for the
unfused kernel + XLA top-n, with the same selection as "xla" on 99.98% of rows (near ties differ;
benchmarks/RESULTS.md, NSA). NSA's config defaults to it (`fused_topn=True`); this function's
`fused_topn` argument defaults to False. The default (implementation=None) is pallas_gpu on GPU
and xla elsewhere.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import BlockLayout, block_sparse_attention
from pallas_kernels.block_sparse.api import default_implementation

ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}
IMPORTANCE_IMPLEMENTATIONS = ("xla", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class CompressionParams:
    """Weights of one compression MLP φ (one for keys, one for values), shared by the KV heads.

    pe [l, D] intra-block position encoding; w1 [l, D, F]; b1 [F]; w2 [F, D]; b2 [D].
    """
    pe: jax.Array
    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array


jax.tree_util.register_dataclass(CompressionParams, data_fields=["pe", "w1", "b1", "w2", "b2"], meta_fields=[])


def num_compressed(seq_len: int, block: int, stride: int) -> int:
    """N = ⌊(T − l)/d⌋ + 1 complete compression blocks, 0 when T < l."""
    return 0 if seq_len < block else (seq_len - block) // stride + 1


def compress(x: jax.Array, params: CompressionParams, *, block: int, stride: int,
             activation: str = "silu") -> jax.Array:
    """φ over every complete block: x [B, T, K, D] -> [B, N, K, D] in x's dtype (N may be 0)."""
    b, t, k, d = x.shape
    n = num_compressed(t, block, stride)
    if n == 0:
        return jnp.zeros((b, 0, k, d), x.dtype)
    shifts = block // stride
    dt = x.dtype
    w1 = params.w1.astype(dt).reshape(shifts, stride, d, -1)                      # [s, d, D, F]
    chunks = x[:, : (n + shifts - 1) * stride].reshape(b, n + shifts - 1, stride, k, d)
    per_chunk = jnp.einsum("bcjkd,sjdf->bcskf", chunks, w1, preferred_element_type=jnp.float32)
    hidden = sum(per_chunk[:, s: s + n, s] for s in range(shifts))              # [B, N, K, F]
    bias = params.b1.astype(jnp.float32) + jnp.einsum(
        "ld,ldf->f", params.pe.astype(jnp.float32), params.w1.astype(jnp.float32))
    hidden = ACTIVATIONS[activation](hidden + bias).astype(dt)
    out = jnp.einsum("bnkf,fd->bnkd", hidden, params.w2.astype(dt), preferred_element_type=jnp.float32)
    return (out + params.b2.astype(jnp.float32)).astype(dt)


def compressed_segments(segment_ids: jax.Array, n: int, block: int, stride: int) -> jax.Array:
    """Segment of each compressed token: [B, T] -> [B, N]; −1 for a block whose tokens are not all of
    one segment (ids need not be monotonic: filler between aligned documents is segment 0)."""
    b, shifts = segment_ids.shape[0], block // stride
    chunks = segment_ids[:, : (n + shifts - 1) * stride].reshape(b, n + shifts - 1, stride)
    lo, hi = chunks.min(-1), chunks.max(-1)                                    # per stride chunk
    lo = functools.reduce(jnp.minimum, [lo[:, i: i + n] for i in range(shifts)])
    hi = functools.reduce(jnp.maximum, [hi[:, i: i + n] for i in range(shifts)])
    return jnp.where(lo == hi, hi, -1).astype(jnp.int32)


def compressed_positions(n: int, block: int, stride: int) -> jax.Array:
    """Kernel position of compressed token i: its block's last index i·d + l − 1. int32 [N]."""
    return (jnp.arange(n, dtype=jnp.int32) * stride + block - 1).astype(jnp.int32)


def compressed_layout(seq_len: int, n: int, *, block: int, stride: int, num_kv_heads: int,
                      block_q: int, block_k: int) -> BlockLayout:
    """Block-causal layout of queries [T] over compressed tokens [N]: query block b visits every
    compressed block holding a token complete before b's last query. Shared by batch and heads."""
    nq, nk = -(-seq_len // block_q), -(-n // block_k)
    last = jnp.minimum((jnp.arange(nq) + 1) * block_q, seq_len) - 1
    counts = jnp.clip(jnp.floor_divide(last - block + 1, block_k * stride) + 1, 0, nk).astype(jnp.int32)
    indices = jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32), (1, num_kv_heads, nq, nk))
    return BlockLayout.from_indices(indices, jnp.broadcast_to(counts, (1, num_kv_heads, nq)),
                                    block_q=block_q, block_k=block_k, num_kv_blocks=nk)


def compressed_attention(q, k_cmp, v_cmp, q_segment_ids, *, block: int, stride: int, block_q: int,
                         block_k: int, implementation=None, interpret=False):
    """Branch output over the compressed tokens.

    q [B, T, H, D]; k_cmp, v_cmp [B, N, K, D] (N ≥ 1); q_segment_ids [B, T] int32.
    Returns out [B, T, H, D] in q's dtype (rows that see no compressed token: 0) and lse [B, H, T]
    float32 (−inf for those rows), which the importance pass reuses.
    """
    b, t, _, _ = q.shape
    n, kv_heads = k_cmp.shape[1], k_cmp.shape[2]
    layout = compressed_layout(t, n, block=block, stride=stride, num_kv_heads=kv_heads,
                               block_q=min(block_q, t), block_k=block_k)
    q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kv_pos = jnp.broadcast_to(compressed_positions(n, block, stride), (b, n))
    kv_seg = compressed_segments(q_segment_ids, n, block, stride)
    return block_sparse_attention(q, k_cmp, v_cmp, layout, q_positions=q_pos, kv_positions=kv_pos,
                                  q_segment_ids=q_segment_ids, kv_segment_ids=kv_seg, implementation=implementation,
                                  interpret=interpret)


def overlap_weights(select_block: int, block: int, stride: int) -> tuple[int, ...]:
    """c_k = #{(m, n): m + n = k, 0 ≤ m < l'/d, 0 ≤ n < l/d} for k = 0 .. l'/d + l/d − 2 (Eq. 9)."""
    r, s = select_block // stride, block // stride
    return tuple(sum(1 for m in range(r) if 0 <= k - m < s) for k in range(r + s - 1))


def block_importance(p_cmp: jax.Array, num_blocks: int, *, select_block: int, block: int,
                     stride: int) -> jax.Array:
    """Eq. 9 in 0-based indices: p_cmp [..., N] -> p_slc [..., S] (S = num_blocks)."""
    r = select_block // stride
    weights = overlap_weights(select_block, block, stride)
    front = len(weights) - 1
    back = max(0, r * num_blocks - p_cmp.shape[-1])
    padded = jnp.pad(p_cmp, [(0, 0)] * (p_cmp.ndim - 1) + [(front, back)])
    out = 0.0
    for k, c in enumerate(weights):
        start = r - 1 - k + front                        # padded index of p_cmp[r(j+1) − 1 − k] at j = 0
        out = out + c * padded[..., start: start + r * num_blocks: r]
    return out


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """Index of the first token of each token's run of equal segment ids: [B, T] -> [B, T] int32."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return jax.lax.cummax(jnp.where(new, idx, 0), axis=1)


def block_scores(p_slc: jax.Array, t_idx: jax.Array, doc_start: jax.Array, *, select_block: int,
                 num_initial: int, num_local: int) -> jax.Array:
    """Selection scores with forced and impossible blocks: p_slc [B, K, C, S] float32 for queries at
    indices t_idx [C] with document starts doc_start [B, C] -> [B, K, C, S] (+inf forced, −inf never)."""
    blocks = jnp.arange(p_slc.shape[-1], dtype=jnp.int32)
    own = (t_idx // select_block)[None, None, :, None]
    first = (doc_start // select_block)[:, None, :, None]
    valid = (blocks >= first) & (blocks <= own)
    forced = valid & ((blocks < first + num_initial) | (blocks > own - num_local))
    return jnp.where(forced, jnp.inf, jnp.where(valid, p_slc, -jnp.inf))


def top_blocks(scores: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Top-n blocks by score (ties: lower index), −inf never taken.

    scores [..., S] -> (indices [..., min(n, S)] int32 ascending, valid ones first; counts [...] int32).
    """
    num_blocks = scores.shape[-1]
    values, picked = jax.lax.top_k(scores, min(n, num_blocks))
    keys = jnp.sort(jnp.where(values > -jnp.inf, picked, num_blocks), axis=-1).astype(jnp.int32)
    return keys, (keys < num_blocks).sum(-1, dtype=jnp.int32)


def importance_implementation(kernel_implementation: str | None) -> str | None:
    """The importance pass that goes with a `block_sparse_attention` implementation choice: None (auto)
    stays None (pallas_gpu on GPU, xla elsewhere), "pallas_gpu" is "pallas_gpu", and every other kernel
    ("xla", "reference", "pallas_tpu") takes the XLA pass."""
    if kernel_implementation is None or kernel_implementation == "pallas_gpu":
        return kernel_implementation
    return "xla"


def resolve_importance(implementation: str | None) -> str:
    """"xla" or "pallas_gpu" for a `select_blocks` implementation argument (None: pallas_gpu on GPU)."""
    if implementation is None:
        return "pallas_gpu" if default_implementation() == "pallas_gpu" else "xla"
    if implementation not in IMPORTANCE_IMPLEMENTATIONS:
        raise ValueError(f"select_blocks: implementation={implementation!r}; valid choices: "
                         f"{list(IMPORTANCE_IMPLEMENTATIONS)} or None (pallas_gpu on GPU, xla elsewhere)")
    return implementation


def select_blocks(q, k_cmp, lse, segment_ids, *, block: int, stride: int, select_block: int, num_selected: int,
                  num_initial: int, num_local: int, chunk_elements: int = 1 << 26, causal_parts: int = 8,
                  sm_scale: float | None = None, implementation: str | None = None,
                  interpret: bool = False, fused_topn: bool = False) -> tuple[jax.Array, jax.Array]:
    """Per (token, KV group) selected blocks from the compression probabilities.

    q [B, T, H, D] (rotated), k_cmp [B, N, K, D] (rotated; N may be 0), lse [B, H, T] float32 of the
    compression branch (`compressed_attention`; None when N = 0), segment_ids [B, T] int32. The
    probabilities are recomputed as p = exp(q·k̃ᵀ·scale − lse) per chunk, one pass over the logits.
    Returns indices [B, K, T, n'] int32 (ascending; entries past the count hold S) and counts
    [B, K, T] int32, n' = min(n, S), S = ⌈T / l'⌉.

    implementation: None (pallas_gpu on GPU, xla elsewhere), "xla" or "pallas_gpu" (`interpret=True`
    runs the kernel in interpret mode, for CPU tests). Query chunks of C tokens keep the largest
    intermediate under `chunk_elements` float32s: [B, H, C, max(N, S)] for xla, [B, K, C, S] for
    pallas_gpu (with `fused_topn` and n <= 32: one fused kernel, no chunks). xla only: the chunks are split
    into `causal_parts` consecutive parts, each reading only the compressed tokens its last query can
    see (static slices), so about half of the T·N logits are never computed; the kernel skips them per
    query tile by itself.
    """
    implementation = resolve_importance(implementation)
    q, k_cmp, lse = jax.lax.stop_gradient((q, k_cmp, lse))
    b, t, h, d = q.shape
    n = k_cmp.shape[1]
    num_blocks = -(-t // select_block)
    doc_start = document_starts(segment_ids)
    if implementation == "pallas_gpu":
        return select_blocks_pallas(
            q, k_cmp, lse, segment_ids, compressed_segments(segment_ids, n, block, stride),
            jnp.arange(t, dtype=jnp.int32), doc_start, block=block, stride=stride, select_block=select_block,
            num_blocks=num_blocks, num_selected=num_selected, num_initial=num_initial, num_local=num_local,
            chunk_elements=chunk_elements, sm_scale=sm_scale, interpret=interpret, fused_topn=fused_topn)
    kv_heads = k_cmp.shape[2]
    g = h // kv_heads
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    chunk = max(1, min(t, chunk_elements // max(1, b * h * max(n, num_blocks))))
    num_chunks = -(-t // chunk)
    pad = num_chunks * chunk - t
    t_all = jnp.arange(num_chunks * chunk, dtype=jnp.int32).reshape(num_chunks, chunk)
    q_c = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, num_chunks, chunk, kv_heads, g, d).swapaxes(0, 1)
    seg_c = jnp.pad(segment_ids, ((0, 0), (0, pad))).reshape(b, num_chunks, chunk).swapaxes(0, 1)
    start_c = jnp.pad(doc_start, ((0, 0), (0, pad))).reshape(b, num_chunks, chunk).swapaxes(0, 1)
    if n:
        kv_pos = compressed_positions(n, block, stride)
        kv_seg = compressed_segments(segment_ids, n, block, stride)
        lse = jnp.pad(lse, ((0, 0), (0, 0), (0, pad)), constant_values=-jnp.inf)
        lse_c = lse.reshape(b, kv_heads, g, num_chunks, chunk).transpose(3, 0, 1, 2, 4)   # [nc, B, K, G, C]
    else:
        lse_c = jnp.zeros((num_chunks,), jnp.float32)

    def part(first: int, last: int):
        """Chunks [first, last): only the compressed tokens complete by the last query of the part."""
        m = min(n, num_compressed(last * chunk, block, stride))

        def one_chunk(args):
            qc, lc, segc, startc, tc = args            # [B, C, K, G, D], [B, K, G, C], [B, C], [B, C], [C]
            if m:
                logits = jnp.einsum("bckgd,bnkd->bkgcn", qc, k_cmp[:, :m], preferred_element_type=jnp.float32)
                seen = (kv_pos[None, None, None, None, :m] <= tc[None, None, None, :, None]) & (
                    kv_seg[:, None, None, None, :m] == segc[:, None, None, :, None]) & jnp.isfinite(lc)[..., None]
                p = jnp.where(seen, jnp.exp(logits * scale - jnp.where(seen, lc[..., None], 0.0)), 0.0).sum(2)
                p_slc = block_importance(p, num_blocks, select_block=select_block, block=block, stride=stride)
            else:
                p_slc = jnp.zeros((b, kv_heads, chunk, num_blocks), jnp.float32)
            scores = block_scores(p_slc, tc, startc, select_block=select_block, num_initial=num_initial,
                                  num_local=num_local)
            return top_blocks(scores, num_selected)

        xs = (q_c[first:last], lse_c[first:last], seg_c[first:last], start_c[first:last], t_all[first:last])
        return jax.lax.map(one_chunk, xs)              # [c, B, K, C, n'], [c, B, K, C]

    bounds = sorted({round(i * num_chunks / max(1, causal_parts)) for i in range(causal_parts + 1)} | {num_chunks})
    parts = [part(a, z) for a, z in zip(bounds[:-1], bounds[1:]) if z > a]
    idx = jnp.concatenate([p[0] for p in parts], axis=0)
    cnt = jnp.concatenate([p[1] for p in parts], axis=0)
    idx = idx.transpose(1, 2, 0, 3, 4).reshape(b, kv_heads, num_chunks * chunk, -1)[:, :, :t]
    cnt = cnt.transpose(1, 2, 0, 3).reshape(b, kv_heads, num_chunks * chunk)[:, :, :t]
    return idx, cnt


def select_blocks_pallas(q, k_cmp, lse, segment_ids, kv_segments, row_index, doc_start, *, block: int, stride: int,
                         select_block: int, num_blocks: int, num_selected: int, num_initial: int, num_local: int,
                         chunk_elements: int = 1 << 26, sm_scale: float | None = None,
                         interpret: bool = False, fused_topn: bool = False) -> tuple[jax.Array, jax.Array]:
    """`select_blocks` through the Pallas GPU kernel, for queries at any row indices (the sharded,
    permuted sequence of `sparsejax.parallel.nsa_context` too).

    q [B, T, H, D], k_cmp [B, N, K, D] (N may be 0), lse [B, H, T] float32 (ignored when N = 0),
    segment_ids [B, T], kv_segments [B, N] (`compressed_segments` of the row), row_index [T] int32 (each
    query's index in the packed row), doc_start [B, T] (row index of each query's document start);
    num_blocks S = ⌈T_row / l'⌉. With `fused_topn` and n <= `nsa_importance.MAX_SELECTED` one kernel over
    all T scores, masks and keeps the top n (`importance_topn`: no [B, K, T, S] scores in HBM). Otherwise
    per chunk of C queries (B·K·C·S <= chunk_elements) the kernel's p_slc [B, K, C, S], then `block_scores` and
    `top_blocks`. Returns indices [B, K, T, n'] (past the count: S) and counts [B, K, T] int32.
    """
    from pallas_kernels import nsa_importance        # lazily: only the GPU path needs the kernel module

    b, t = q.shape[:2]
    kv_heads = k_cmp.shape[2]
    row_index = row_index.astype(jnp.int32)
    positions = jnp.broadcast_to(row_index, (b, t))
    if fused_topn and num_selected <= nsa_importance.MAX_SELECTED:
        if k_cmp.shape[1] and not interpret and mosaic_importance_supported(
                q, k_cmp, lse, positions, segment_ids, kv_segments, block=block, stride=stride,
                select_block=select_block, num_blocks=num_blocks):
            return select_blocks_mosaic(q, k_cmp, lse, segment_ids, kv_segments, positions, doc_start,
                                        block=block, stride=stride, select_block=select_block,
                                        num_blocks=num_blocks, num_selected=num_selected, num_initial=num_initial,
                                        num_local=num_local, chunk_elements=chunk_elements, sm_scale=sm_scale)
        return nsa_importance.importance_topn(
            q, k_cmp, lse if k_cmp.shape[1] else None, positions, segment_ids, kv_segments, doc_start, block=block,
            stride=stride, select_block=select_block, num_blocks=num_blocks, num_selected=num_selected,
            num_initial=num_initial, num_local=num_local, sm_scale=sm_scale, interpret=interpret)
    chunk = max(1, min(t, chunk_elements // max(1, b * kv_heads * num_blocks)))
    num_chunks = -(-t // chunk)
    pad = num_chunks * chunk - t
    t_pad = jnp.pad(row_index, (0, pad))
    start_pad = jnp.pad(doc_start, ((0, 0), (0, pad)))

    def one_chunk(c):
        first = c * chunk
        if k_cmp.shape[1]:
            p_slc = nsa_importance.importance_scores(
                q, k_cmp, lse, positions, segment_ids, kv_segments, block=block, stride=stride,
                select_block=select_block, num_blocks=num_blocks, sm_scale=sm_scale, q_start=first, q_count=chunk,
                interpret=interpret)
        else:
            p_slc = jnp.zeros((b, kv_heads, chunk, num_blocks), jnp.float32)
        tc = jax.lax.dynamic_slice_in_dim(t_pad, first, chunk)
        startc = jax.lax.dynamic_slice_in_dim(start_pad, first, chunk, axis=1)
        scores = block_scores(p_slc, tc, startc, select_block=select_block, num_initial=num_initial,
                              num_local=num_local)
        return top_blocks(scores, num_selected)                   # [B, K, C, n'], [B, K, C]

    idx, cnt = jax.lax.map(one_chunk, jnp.arange(num_chunks, dtype=jnp.int32))
    idx = idx.transpose(1, 2, 0, 3, 4).reshape(b, kv_heads, num_chunks * chunk, -1)[:, :, :t]
    cnt = cnt.transpose(1, 2, 0, 3).reshape(b, kv_heads, num_chunks * chunk)[:, :, :t]
    return idx, cnt


def mosaic_importance_supported(q, k_cmp, lse, positions, segment_ids, kv_segments, *, block: int, stride: int,
                                select_block: int, num_blocks: int) -> bool:
    """Whether `select_blocks_mosaic` serves these shapes here: a Hopper GPU and
    `nsa_importance_mosaic.check_supported`."""
    from pallas_kernels import nsa_importance_mosaic
    from pallas_kernels.block_sparse import pallas_gpu

    if not pallas_gpu.on_hopper():
        return False
    try:
        nsa_importance_mosaic.check_supported(q, k_cmp, lse, positions, segment_ids, kv_segments, block=block,
                                              stride=stride, select_block=select_block, num_blocks=num_blocks)
    except ValueError:
        return False
    return True


def select_blocks_mosaic(q, k_cmp, lse, segment_ids, kv_segments, positions, doc_start, *, block: int, stride: int,
                         select_block: int, num_blocks: int, num_selected: int, num_initial: int, num_local: int,
                         chunk_elements: int = 1 << 26, sm_scale: float | None = None,
                         interpret=None) -> tuple[jax.Array, jax.Array]:
    """The selection on a Hopper GPU: the Mosaic GPU (wgmma) kernel writes the block scores of a chunk of
    queries to HBM in its step-padded layout, then `nsa_importance.topn_of_scores` keeps the top n of
    each query's scores. Chunks of C queries keep the scores under `chunk_elements` float32s
    (B·K·C·steps·W; C a multiple of 128, the kernel's query tile). Arguments as `select_blocks_pallas`,
    positions [B, T] int32 (each query's index in its row). Returns indices [B, K, T, n'] and counts
    [B, K, T] int32. interpret: None (the GPU) or the Mosaic GPU interpreter's parameters (tests).

    The chunks run in one `lax.map`, so the kernels are traced and compiled once whatever their number
    (it grows as T²: at 1M tokens per row, 512k queries per device, about 140 chunks, whose Python loop
    kept a 2-GPU step compiling for minutes). The chunks are equal, ⌈T / chunks⌉ rounded up to 128 queries;
    the last one ends at T and overlaps its predecessor by fewer than 128·chunks rows, which it drops."""
    from pallas_kernels import nsa_importance, nsa_importance_mosaic

    b, t = q.shape[:2]
    nbt, steps, width = nsa_importance_mosaic.slot_layout(block=block, stride=stride, select_block=select_block,
                                                          num_blocks=num_blocks)
    per_query = b * k_cmp.shape[2] * steps * width
    largest = t if per_query * t <= chunk_elements else max(128, chunk_elements // per_query // 128 * 128)
    num_chunks = -(-t // largest)
    chunk = min(t, -(-t // (num_chunks * 128)) * 128)        # equal chunks, <= largest: little overlap
    kw = dict(block=block, stride=stride, select_block=select_block, num_blocks=num_blocks)

    def one_chunk(first):
        rows = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, first, chunk, axis=axis)  # noqa: E731
        scores = nsa_importance_mosaic.block_scores_padded(
            rows(q, 1), k_cmp, rows(lse, 2), rows(positions, 1), rows(segment_ids, 1), kv_segments,
            sm_scale=sm_scale, interpret=interpret, **kw)
        return nsa_importance.topn_of_scores(
            scores, rows(positions, 1), rows(doc_start, 1), nbt=nbt, select_block=select_block,
            num_blocks=num_blocks, num_selected=num_selected, num_initial=num_initial, num_local=num_local,
            interpret=interpret is not None)

    if num_chunks == 1:
        return one_chunk(0)
    firsts = jnp.minimum(jnp.arange(num_chunks, dtype=jnp.int32) * chunk, t - chunk)
    idx, cnt = jax.lax.map(one_chunk, firsts)                  # [c, B, K, C, n'], [c, B, K, C]
    overlap = num_chunks * chunk - t                            # rows of the last chunk computed before
    idx = jnp.concatenate([idx[:-1].transpose(1, 2, 0, 3, 4).reshape(b, idx.shape[2], -1, idx.shape[-1]),
                           idx[-1][:, :, overlap:]], axis=2)
    cnt = jnp.concatenate([cnt[:-1].transpose(1, 2, 0, 3).reshape(b, cnt.shape[2], -1),
                           cnt[-1][:, :, overlap:]], axis=2)
    return idx, cnt
