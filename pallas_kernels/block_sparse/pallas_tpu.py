"""Block-sparse flash attention in Pallas with the Mosaic TPU lowering.

Three kernels, all driven by a `BlockLayout` (docs/contracts.md §1), in the manner of splash attention:
the block lists travel as scalar-prefetch operands (SMEM, flattened to 1-d) and the BlockSpec index
maps read them, so the pipeline fetches only listed KV blocks.

* forward: grid (batch, head unit, query unit, list slot). Slot `s` loads KV block `kv_indices[s]`;
  slots past the unit's count are skipped with `pl.when` and, because the layout pads each list with
  its last index, they cause no new DMA. Online softmax state (max, sum, accumulator) lives in float32
  VMEM scratch; `out` and `lse` are written at the last slot.
* dQ: the same grid and walk, recomputing the probabilities from `lse`.
* dK/dV: grid (batch, KV head, entry) over the *flattened* KV-major inverse of the KV group. The
  entries of the group's head units are merged so that all entries of one KV tile (below) are
  consecutive; the dK/dV output block index follows the entry's tile, so the block stays resident in
  VMEM while its entries accumulate into float32 scratch, and is written once at the tile's last
  entry. Every dK/dV block is thus produced by one run of consecutive grid steps: deterministic, no
  atomics. The grid has as many steps as the forward's (Hl·nq·K per batch row), padding included.
  With one head unit per KV head the merged list is the layout's CSR (`q_indices`, `kv_offsets`)
  as is; with several it is a stable sort of their entries by KV block (on device, O(Hl·nq·K)).
  KV tiles that no entry visits are zeroed afterwards in XLA.

Rows. The rows of a program are the `block_q` tokens x `R = Hq / Hl` query heads of one query unit
(token-major, head-minor). The wrapper lays q (and dO) out as `[B, Hl, nq * rows, D]`; the row count
of a unit is padded to the sublane tile (8 rows for float32, 16 for bfloat16) with zero rows, which
are masked in-kernel and dropped afterwards: correct, at the cost of computing the padded rows (NSA's
one-token units with 4 heads compute 8 or 16 rows).

KV tiles. K and V are laid out `[B, Hkv, Tk', D]` in tiles of `tile_k = max(block_k, 128)` keys, the
ragged end zero-padded and masked. A `block_k` below the 128-lane width (NSA's 64) is served from
the 128-key tile that holds it, with the tile's other keys masked: exact, and no new DMA between the
blocks of one tile, but 128/block_k times the score FLOPs. Head dims that are not multiples of 128
are zero-padded to the next multiple: zero columns leave q·k unchanged and produce output columns that
are dropped, so this is exact (it costs bandwidth for head dim 64).

Per-row vectors (query positions and segment ids, lse, delta) are stored broadcast over the 128 lanes
(`[.., rows, 128]`) where the kernel needs them as a column and over 8 sublanes (`[.., 8, rows]`)
where it needs them as a row (the dK/dV kernel computes the transposed scores `k·qᵀ`, as splash
attention does); per-key vectors likewise. A column vector costs 512 bytes per row in HBM.

Masking inside a tile, from loaded vectors and iotas: causal (`kv_pos <= q_pos`), the sliding window's
far edge (`q_pos - kv_pos < window`; `window` is static and None compiles no such term), equal segment ids,
keys at index >= Tk or outside the visited block (sub-tile blocks), and padding or ragged query rows.
Rows that see nothing give out 0 and lse -inf, and zero gradients.

Supported (checked by `check_supported`): float32 and bfloat16 (q, k, v of one dtype); `block_k` a
multiple or a divisor of 128 (the score tile is [rows, tile_k]); any `block_q >= 1`; any head dims;
any head unit the layout allows. The block lists live in SMEM (1 MiB per TensorCore from TPU v4 on):
a call holds at most `SMEM_BUDGET_BYTES` of them, so larger layouts run as several calls over
disjoint head units (forward, dQ) or KV heads (dK/dV); one head unit's lists (layout batch x nq x K)
or one KV group's merged inverse beyond the budget is rejected (use larger blocks or a smaller K).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
SUBLANES = 8
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite "minus infinity" for running maxima
# Scalar-prefetch bytes one pallas_call may hold in SMEM: half of the 1 MiB per TensorCore of TPU v4
# and later (v2/v3 have 16 KiB and are not served). Larger layouts are split over head units (forward,
# dQ) or KV heads (dK/dV) into several calls.
SMEM_BUDGET_BYTES = 512 * 1024


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def _query_major_smem(lbatch: int, nq: int, cap: int) -> int:
    """SMEM bytes of the forward / dQ lists of one head unit (kv_indices and kv_counts, int32)."""
    return 4 * lbatch * nq * (cap + 1)


def _dkv_smem(lbatch: int, units_per_group: int, nq: int, cap: int) -> int:
    """SMEM bytes of the dK/dV entries of one KV head (two int32 per entry, plus the total)."""
    return 4 * lbatch * (2 * units_per_group * nq * cap + 1)


def _chunks(count: int, item_bytes: int):
    """Split range(count) into equal (start, size) chunks of at most SMEM_BUDGET_BYTES each (equal
    sizes: one compilation). check_supported guarantees that one item fits."""
    size = max((d for d in range(1, count + 1) if count % d == 0 and d * item_bytes <= SMEM_BUDGET_BYTES),
               default=1)
    return [(start, size) for start in range(0, count, size)]


def _concat(parts, axis: int):
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


# ---------------------------------------------------------------------------------------- support
def check_supported(q, k, v, layout) -> None:
    """Raise ValueError if this implementation cannot tile the call (api.py has checked the shapes)."""
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"pallas_tpu supports dtypes float32 and bfloat16, got {q.dtype}")
    if layout.block_k % LANES and LANES % layout.block_k:
        raise ValueError(
            f"pallas_tpu needs block_k to be a multiple of {LANES} (the TPU lane width; the score tile "
            f"is [rows, block_k]) or a divisor of {LANES} (computed on a {LANES}-key tile), got "
            f"block_k={layout.block_k}; valid: 1, 2, 4, 8, 16, 32, 64, 128, 256, 384, ...")
    lbatch, hl, nq, cap = layout.kv_indices.shape
    per_unit = _query_major_smem(lbatch, nq, cap)
    per_group = _dkv_smem(lbatch, hl // k.shape[2], nq, cap)
    if max(per_unit, per_group) > SMEM_BUDGET_BYTES:
        raise ValueError(
            f"pallas_tpu keeps the block lists of one head unit ({per_unit} bytes: layout batch {lbatch} x "
            f"nq={nq} x K={cap}) and the merged inverse of one KV group ({per_group} bytes) in SMEM, "
            f"limit {SMEM_BUDGET_BYTES} bytes per call; use larger block_q/block_k or a smaller list "
            f"capacity K, or call per batch row")


# ---------------------------------------------------------------------------------------- geometry
@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static sizes of one call. Axes as in the module docstring."""
    batch: int
    layout_batch: int
    tq: int
    tk: int
    hq: int
    hkv: int
    hl: int
    block_q: int
    block_k: int
    nq: int
    nk: int
    cap: int        # K, list capacity
    rows: int       # padded rows of one query unit
    dqk: int
    dv: int
    dqk_p: int      # head dims padded to the lane width
    dv_p: int

    @property
    def heads_per_unit(self) -> int:          # R
        return self.hq // self.hl

    @property
    def units_per_group(self) -> int:         # head units sharing one KV head
        return self.hl // self.hkv

    @property
    def real_rows(self) -> int:               # block_q * R
        return self.block_q * self.heads_per_unit

    @property
    def tile_k(self) -> int:                  # keys per KV tile: block_k, or 128 for smaller blocks
        return max(self.block_k, LANES)

    @property
    def sub(self) -> int:                     # KV blocks per tile
        return self.tile_k // self.block_k

    @property
    def tk_p(self) -> int:                    # keys after padding to whole tiles
        return _cdiv(self.nk, self.sub) * self.tile_k

    def tile(self, kv_block):
        """Tile holding layout KV block `kv_block` (traced int)."""
        return kv_block if self.sub == 1 else lax.div(kv_block, self.sub)

    @property
    def q_padded(self) -> bool:               # some rows of some unit are padding
        return self.rows != self.real_rows or self.tq % self.block_q != 0

    @property
    def k_padded(self) -> bool:
        return self.tk % self.block_k != 0

    def lb(self, b):
        """Layout batch index for call batch index b (layouts of batch 1 broadcast)."""
        return b if self.layout_batch > 1 else 0


def _geometry(q, k, v, layout) -> _Geometry:
    batch, tq, hq, dqk = q.shape
    _, tk, hkv, dv = v.shape
    lbatch, hl, nq, cap = layout.kv_indices.shape
    sublanes = SUBLANES * (4 // jnp.dtype(q.dtype).itemsize)
    rows = _round_up(layout.block_q * (hq // hl), sublanes)
    return _Geometry(batch, lbatch, tq, tk, hq, hkv, hl, layout.block_q, layout.block_k, nq,
                     layout.num_kv_blocks, cap, rows, dqk, dv, _round_up(dqk, LANES), _round_up(dv, LANES))


# ---------------------------------------------------------------------------------------- relayouts
def _pad_axis(x, axis: int, size: int):
    """Zero-pad axis `axis` of x up to `size`."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _to_rows(x, g: _Geometry, units: int, depth: int):
    """[B, Tq, units*R, D] -> [B, units, nq, rows, depth]: the rows of each query unit, token-major.
    Padding (ragged last unit, sublane padding, head dim) is zero."""
    b, _, _, d = x.shape
    r = g.heads_per_unit
    x = _pad_axis(x, 1, g.nq * g.block_q)
    x = x.reshape(b, g.nq, g.block_q, units, r, d).transpose(0, 3, 1, 2, 4, 5)
    x = x.reshape(b, units, g.nq, g.real_rows, d)
    return _pad_axis(_pad_axis(x, 3, g.rows), 4, depth)


def _from_rows(x, g: _Geometry, depth: int):
    """Inverse of `_to_rows` for all head units: [B, Hl, nq, rows, D'] -> [B, Tq, Hq, depth]."""
    b = x.shape[0]
    r = g.heads_per_unit
    x = x[:, :, :, :g.real_rows, :depth].reshape(b, g.hl, g.nq, g.block_q, r, depth)
    x = x.transpose(0, 2, 3, 1, 4, 5).reshape(b, g.nq * g.block_q, g.hq, depth)
    return x[:, :g.tq]


def _head_vector_to_rows(x, g: _Geometry):
    """Per-head row statistics [B, Hq, Tq] -> [B, Hl, nq, rows]."""
    return _to_rows(x.transpose(0, 2, 1)[..., None], g, g.hl, 1)[..., 0]


def _token_vector_to_rows(x, g: _Geometry):
    """Per-token query vector [B, Tq] -> [B, nq, rows] (each token repeated over its R heads)."""
    x = jnp.broadcast_to(x[:, :, None, None], (*x.shape, g.heads_per_unit, 1))
    return _to_rows(x, g, 1, 1)[:, 0, ..., 0]


def _as_column(x):
    """[..., n] -> [..., n, 128]: a per-row vector broadcast over the lanes."""
    return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def _as_row(x):
    """[..., n] -> [..., 8, n]: a per-column vector broadcast over the sublanes."""
    return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], SUBLANES, x.shape[-1]))


def _kv_layout(x, g: _Geometry, depth: int):
    """[B, Tk, Hkv, D] -> [B, Hkv, Tk', depth] (Tk' = whole KV tiles), zero-padded."""
    x = _pad_axis(_pad_axis(x, 1, g.tk_p), 3, depth)
    return x.transpose(0, 2, 1, 3)


def _kv_layout_back(x, g: _Geometry, depth: int):
    """[B, Hkv, Tk', D'] -> [B, Tk, Hkv, depth]."""
    return x[:, :, :g.tk, :depth].transpose(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------- masking
def _block_mask(g: _Geometry, shape, row_axis: int, unit, kv_block, q_pos, kv_pos, q_seg, kv_seg,
                causal: bool, window: int | None):
    """bool mask of one score tile, or None when nothing is masked.

    shape: the tile shape; row_axis: the axis of query rows (1 for the transposed dK/dV tile).
    q_pos/q_seg: loaded query vectors broadcastable along the key axis; kv_pos/kv_seg likewise.
    """
    key_axis = 1 - row_axis
    mask = None

    def both(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if g.k_padded or g.sub > 1:
        key = g.tile(kv_block) * g.tile_k + lax.broadcasted_iota(jnp.int32, shape, key_axis)
        if g.sub > 1:   # the tile holds other blocks too: keep only this block's keys
            first_key = kv_block * g.block_k
            mask = both(mask, jnp.logical_and(key >= first_key, key < first_key + g.block_k))
        if g.k_padded:
            mask = both(mask, key < g.tk)
    if g.q_padded:
        row = lax.broadcasted_iota(jnp.int32, shape, row_axis)
        mask = both(mask, row < g.real_rows)
        if g.tq % g.block_q:
            mask = both(mask, unit * g.real_rows + row < g.tq * g.heads_per_unit)
    if causal:
        mask = both(mask, kv_pos <= q_pos)
    if window is not None:   # only with causal: the positions are loaded
        mask = both(mask, q_pos - kv_pos < window)
    if q_seg is not None:
        mask = both(mask, kv_seg == q_seg)
    return mask


def _dot(a, b, contract_a: int, contract_b: int):
    """a·b contracting one axis of each 2-d operand, float32 accumulation."""
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _split_vector_refs(refs, causal: bool, segmented: bool):
    """(q_pos, kv_pos, q_seg, kv_seg) refs (None where absent) and the remaining refs."""
    q_pos = kv_pos = q_seg = kv_seg = None
    if causal:
        (q_pos, kv_pos), refs = refs[:2], refs[2:]
    if segmented:
        (q_seg, kv_seg), refs = refs[:2], refs[2:]
    return (q_pos, kv_pos, q_seg, kv_seg), refs


def _load_column(ref):
    return None if ref is None else ref[:, 0:1]


def _load_row(ref):
    return None if ref is None else ref[0:1, :]


# ---------------------------------------------------------------------------------------- specs
def _query_major_specs(g: _Geometry, causal: bool, segmented: bool, u0: int, nu: int):
    """Index maps of a query-major call over head units [u0, u0 + nu) (grid (b, u, i, s); prefetch
    idx, cnt holding those units' lists): the map of per-unit input blocks, of per-unit output blocks
    (the call's own outputs), of KV blocks, and the BlockSpecs of the position / segment vectors.
    Traced integer arithmetic uses lax.div / lax.rem (non-negative operands), which lower to Mosaic
    without the sign computation of Python's floor division."""
    def kv_block(b, u, i, s, idx):
        return idx[((g.lb(b) * nu + u) * g.nq + i) * g.cap + s]

    def unit_map(b, u, i, s, idx, cnt):
        return (b, u0 + u, i, 0)

    def out_map(b, u, i, s, idx, cnt):
        return (b, u, i, 0)

    def kv_map(b, u, i, s, idx, cnt):
        return (b, lax.div(u0 + u, g.units_per_group), g.tile(kv_block(b, u, i, s, idx)), 0)

    def pair():
        return [pl.BlockSpec((None, g.rows, LANES), lambda b, u, i, s, idx, cnt: (b, i, 0)),
                pl.BlockSpec((None, SUBLANES, g.tile_k),
                             lambda b, u, i, s, idx, cnt: (b, 0, g.tile(kv_block(b, u, i, s, idx))))]

    specs = (pair() if causal else []) + (pair() if segmented else [])
    return unit_map, out_map, kv_map, specs


def _query_major_vectors(g: _Geometry, q_pos, kv_pos, q_seg, kv_seg, causal: bool):
    """The position / segment operands of the query-major kernels, in `_query_major_specs` order."""
    out = []
    pairs = ([(q_pos, kv_pos)] if causal else []) + ([(q_seg, kv_seg)] if q_seg is not None else [])
    for qv, kvv in pairs:
        qv = _token_vector_to_rows(qv.astype(jnp.int32), g).reshape(g.batch, g.nq * g.rows)
        kvv = _pad_axis(kvv.astype(jnp.int32), 1, g.tk_p)
        out += [_as_column(qv), _as_row(kvv)]
    return out


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


# ---------------------------------------------------------------------------------------- forward
def _forward_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, *refs, g: _Geometry, nu: int,
                    sm_scale: float, causal: bool, window: int | None, segmented: bool):
    (q_pos, kv_pos, q_seg, kv_seg), (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _split_vector_refs(
        refs, causal, segmented)
    b, u, i, s = (pl.program_id(a) for a in range(4))
    head = (g.lb(b) * nu + u) * g.nq + i
    count = cnt_ref[head]

    @pl.when(s == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, _MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(s < count)
    def _step():
        kv_block = idx_ref[head * g.cap + s]
        scores = _dot(q_ref[...], k_ref[...], 1, 1) * sm_scale                 # [rows, tile_k]
        mask = _block_mask(g, scores.shape, 0, i, kv_block, _load_column(q_pos), _load_row(kv_pos),
                           _load_column(q_seg), _load_row(kv_seg), causal, window)
        if mask is not None:
            scores = jnp.where(mask, scores, _MASK_VALUE)
        m_prev = m_scr[:, 0:1]
        m_next = jnp.maximum(m_prev, scores.max(axis=1, keepdims=True))
        p = jnp.exp(scores - m_next)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_next = alpha * l_scr[:, 0:1] + p.sum(axis=1, keepdims=True)
        v = v_ref[...]
        acc_scr[...] = alpha * acc_scr[...] + _dot(p.astype(v.dtype), v, 1, 0)
        m_scr[...] = jnp.broadcast_to(m_next, m_scr.shape)
        l_scr[...] = jnp.broadcast_to(l_next, l_scr.shape)

    @pl.when(s == g.cap - 1)
    def _finish():
        total = l_scr[:, 0:1]
        seen = total > 0.0
        safe = jnp.where(seen, total, 1.0)
        o_ref[...] = jnp.where(seen, acc_scr[...] / safe, 0.0).astype(o_ref.dtype)
        lse = jnp.where(seen, m_scr[:, 0:1] + jnp.log(safe), -jnp.inf)
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _query_major_lists(layout, u0: int, nu: int):
    """The scalar-prefetch operands (kv_indices, kv_counts) of head units [u0, u0 + nu), flattened."""
    return (layout.kv_indices[:, u0:u0 + nu].reshape(-1), layout.kv_counts[:, u0:u0 + nu].reshape(-1))


def _forward_call(g: _Geometry, layout, u0: int, nu: int, q_rows, k_l, v_l, vectors, *, sm_scale,
                  causal, window, segmented, interpret, dtype):
    """out rows [B, nu, nq*rows, Dv'] and lse rows [B, nu, nq*rows, 128] of head units [u0, u0+nu)."""
    unit_map, out_map, kv_map, vector_specs = _query_major_specs(g, causal, segmented, u0, nu)
    in_specs = [pl.BlockSpec((None, None, g.rows, g.dqk_p), unit_map),
                pl.BlockSpec((None, None, g.tile_k, g.dqk_p), kv_map),
                pl.BlockSpec((None, None, g.tile_k, g.dv_p), kv_map)] + vector_specs
    out_specs = [pl.BlockSpec((None, None, g.rows, g.dv_p), out_map),
                 pl.BlockSpec((None, None, g.rows, LANES), out_map)]
    rows_total = g.nq * g.rows
    out_shape = [jax.ShapeDtypeStruct((g.batch, nu, rows_total, g.dv_p), dtype),
                 jax.ShapeDtypeStruct((g.batch, nu, rows_total, LANES), jnp.float32)]
    scratch = [pltpu.VMEM((g.rows, LANES), jnp.float32), pltpu.VMEM((g.rows, LANES), jnp.float32),
               pltpu.VMEM((g.rows, g.dv_p), jnp.float32)]
    kernel = functools.partial(_forward_kernel, g=g, nu=nu, sm_scale=float(sm_scale), causal=causal,
                               window=window, segmented=segmented)
    call = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(g.batch, nu, g.nq, g.cap), in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(g, g.batch * nu * g.nq * g.cap, dtype, matmuls=2, exps=1),
        interpret=interpret,
        name="block_sparse_tpu_fwd")
    return call(*_query_major_lists(layout, u0, nu), q_rows, k_l, v_l, *vectors)


def forward(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg, *, sm_scale, causal, interpret, window=None):
    """out [B, Tq, Hq, Dv] in q's dtype, lse [B, Hq, Tq] float32."""
    g = _geometry(q, k, v, layout)
    rows_total = g.nq * g.rows
    q_rows = _to_rows(q, g, g.hl, g.dqk_p).reshape(g.batch, g.hl, rows_total, g.dqk_p)
    k_l, v_l = _kv_layout(k, g, g.dqk_p), _kv_layout(v, g, g.dv_p)
    vectors = _query_major_vectors(g, q_pos, kv_pos, q_seg, kv_seg, causal)
    parts = [_forward_call(g, layout, u0, nu, q_rows, k_l, v_l, vectors, sm_scale=sm_scale,
                           causal=causal, window=window, segmented=q_seg is not None, interpret=interpret,
                           dtype=q.dtype)
             for u0, nu in _chunks(g.hl, _query_major_smem(g.layout_batch, g.nq, g.cap))]
    out, lse = _concat([p[0] for p in parts], 1), _concat([p[1] for p in parts], 1)
    out = _from_rows(out.reshape(g.batch, g.hl, g.nq, g.rows, g.dv_p), g, g.dv)
    lse = _from_rows(lse[..., :1].reshape(g.batch, g.hl, g.nq, g.rows, 1), g, 1)[..., 0]
    return out, lse.transpose(0, 2, 1)


def _cost(g: _Geometry, steps: int, dtype, *, matmuls: int, exps: int):
    """Upper-bound cost (every list slot full) for XLA's scheduler."""
    tile = g.rows * g.tile_k
    flops = steps * tile * (g.dqk_p + g.dv_p) * matmuls
    size = jnp.dtype(dtype).itemsize
    bytes_accessed = steps * g.tile_k * (g.dqk_p + g.dv_p) * size + g.batch * g.hq * g.tq * (g.dqk + g.dv) * size
    return pl.CostEstimate(flops=int(flops), transcendentals=int(steps * tile * exps),
                           bytes_accessed=int(bytes_accessed))


# ---------------------------------------------------------------------------------------- dQ
def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, g: _Geometry,
               nu: int, sm_scale: float, causal: bool, window: int | None, segmented: bool):
    (q_pos, kv_pos, q_seg, kv_seg), (dq_ref, acc_scr) = _split_vector_refs(refs, causal, segmented)
    b, u, i, s = (pl.program_id(a) for a in range(4))
    head = (g.lb(b) * nu + u) * g.nq + i
    count = cnt_ref[head]

    @pl.when(s == 0)
    def _init():
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(s < count)
    def _step():
        kv_block = idx_ref[head * g.cap + s]
        q, k, v, d_out = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        scores = _dot(q, k, 1, 1) * sm_scale                                   # [rows, tile_k]
        mask = _block_mask(g, scores.shape, 0, i, kv_block, _load_column(q_pos), _load_row(kv_pos),
                           _load_column(q_seg), _load_row(kv_seg), causal, window)
        lse = lse_ref[:, 0:1]
        seen = lse > -jnp.inf
        p = jnp.exp(scores - jnp.where(seen, lse, 0.0))
        keep = seen if mask is None else jnp.logical_and(mask, seen)
        p = jnp.where(keep, p, 0.0)
        dp = _dot(d_out, v, 1, 1)                                              # [rows, tile_k]
        ds = p * (dp - delta_ref[:, 0:1])
        acc_scr[...] += _dot(ds.astype(k.dtype), k, 1, 0)

    @pl.when(s == g.cap - 1)
    def _finish():
        dq_ref[...] = (acc_scr[...] * sm_scale).astype(dq_ref.dtype)


def _dq_call(g: _Geometry, layout, u0: int, nu: int, q_rows, k_l, v_l, do_rows, lse_col, delta_col,
             vectors, *, sm_scale, causal, window, segmented, interpret, dtype):
    """dq rows [B, nu, nq*rows, Dqk'] of head units [u0, u0 + nu)."""
    unit_map, out_map, kv_map, vector_specs = _query_major_specs(g, causal, segmented, u0, nu)
    in_specs = [pl.BlockSpec((None, None, g.rows, g.dqk_p), unit_map),
                pl.BlockSpec((None, None, g.tile_k, g.dqk_p), kv_map),
                pl.BlockSpec((None, None, g.tile_k, g.dv_p), kv_map),
                pl.BlockSpec((None, None, g.rows, g.dv_p), unit_map),
                pl.BlockSpec((None, None, g.rows, LANES), unit_map),
                pl.BlockSpec((None, None, g.rows, LANES), unit_map)] + vector_specs
    kernel = functools.partial(_dq_kernel, g=g, nu=nu, sm_scale=float(sm_scale), causal=causal,
                               window=window, segmented=segmented)
    call = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(g.batch, nu, g.nq, g.cap), in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, g.rows, g.dqk_p), out_map),
            scratch_shapes=[pltpu.VMEM((g.rows, g.dqk_p), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((g.batch, nu, g.nq * g.rows, g.dqk_p), dtype),
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(g, g.batch * nu * g.nq * g.cap, dtype, matmuls=3, exps=1),
        interpret=interpret,
        name="block_sparse_tpu_dq")
    return call(*_query_major_lists(layout, u0, nu), q_rows, k_l, v_l, do_rows, lse_col, delta_col,
                *vectors)


# ---------------------------------------------------------------------------------------- dK/dV
def _dkv_schedule(layout, g: _Geometry):
    """The merged KV-major entries of each KV group, for the dK/dV grid.

    Returns (entry_kv, entry_row, totals, visited):
      entry_kv  int32 [Lb, Hkv, E]: KV block of entry e (E = Hl/Hkv * nq * K), grouped by block in
                ascending order; entries past the total repeat the last valid one (0 if none);
      entry_row int32 [Lb, Hkv, E]: (head unit within the group) * nq + query unit;
      totals    int32 [Lb, Hkv]: number of valid entries;
      visited   bool [Lb, Hkv, nk_tiles]: KV tiles with at least one entry.
    """
    lb, ug, e1 = g.layout_batch, g.units_per_group, g.nq * g.cap
    offsets = layout.kv_offsets                                            # [Lb, Hl, nk+1]
    entries = jnp.arange(e1, dtype=jnp.int32)
    find = lambda o: jnp.searchsorted(o[1:], entries, side="right")
    kv = jax.vmap(jax.vmap(find))(offsets).astype(jnp.int32)              # [Lb, Hl, E1]
    valid = entries < offsets[..., -1:]
    unit = jnp.arange(g.hl, dtype=jnp.int32) % ug
    row = unit[None, :, None] * g.nq + layout.q_indices
    kv, row, valid = (x.reshape(lb, g.hkv, ug * e1) for x in (kv, row, valid))
    if ug > 1:
        order = jnp.argsort(jnp.where(valid, kv, g.nk), axis=-1, stable=True)
        kv, row, valid = (jnp.take_along_axis(x, order, axis=-1) for x in (kv, row, valid))
    totals = valid.sum(-1, dtype=jnp.int32)
    last = jnp.clip(totals - 1, 0, ug * e1 - 1)[..., None]

    def pad(x):
        tail = jnp.where(totals[..., None] > 0, jnp.take_along_axis(x, last, axis=-1), 0)
        return jnp.where(valid, x, tail).astype(jnp.int32)

    per_block = _pad_axis(offsets[..., 1:] - offsets[..., :-1], 2, g.tk_p // g.block_k)
    visited = per_block.reshape(lb, g.hkv, ug, g.tk_p // g.tile_k, g.sub).sum((2, 4)) > 0
    return pad(kv), pad(row), totals, visited


def _dkv_kernel(kv_ref, row_ref, tot_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                g: _Geometry, nh: int, sm_scale: float, causal: bool, window: int | None, segmented: bool,
                num_entries: int):
    (q_pos, kv_pos, q_seg, kv_seg), (dk_ref, dv_ref, dk_scr, dv_scr) = _split_vector_refs(
        refs, causal, segmented)
    b, h, e = (pl.program_id(a) for a in range(3))
    base = (g.lb(b) * nh + h) * num_entries
    total = tot_ref[g.lb(b) * nh + h]
    kv_block = kv_ref[base + e]
    tile = g.tile(kv_block)    # entries of one tile are consecutive: its dK/dV block stays resident
    first = jnp.logical_or(e == 0, g.tile(kv_ref[base + jnp.maximum(e - 1, 0)]) != tile)
    last = jnp.logical_or(e == total - 1,
                          g.tile(kv_ref[base + jnp.minimum(e + 1, num_entries - 1)]) != tile)

    @pl.when(jnp.logical_and(e < total, first))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(e < total)
    def _step():
        unit = lax.rem(row_ref[base + e], g.nq)
        q, k, v, d_out = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        scores = _dot(k, q, 1, 1) * sm_scale                                   # [tile_k, rows]
        mask = _block_mask(g, scores.shape, 1, unit, kv_block, _load_row(q_pos), _load_column(kv_pos),
                           _load_row(q_seg), _load_column(kv_seg), causal, window)
        lse = lse_ref[0:1, :]
        seen = lse > -jnp.inf
        p = jnp.exp(scores - jnp.where(seen, lse, 0.0))
        keep = seen if mask is None else jnp.logical_and(mask, seen)
        p = jnp.where(keep, p, 0.0)
        dv_scr[...] += _dot(p.astype(d_out.dtype), d_out, 1, 0)                 # [tile_k, Dv]
        dp = _dot(v, d_out, 1, 1)                                              # [tile_k, rows]
        ds = p * (dp - delta_ref[0:1, :])
        dk_scr[...] += _dot(ds.astype(q.dtype), q, 1, 0)                       # [tile_k, Dqk]

    @pl.when(jnp.logical_and(e < total, last))
    def _finish():
        dk_ref[...] = (dk_scr[...] * sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dkv_call(g: _Geometry, schedule, h0: int, nh: int, q_rows, k_l, v_l, do_rows, lse_row, delta_row,
              vectors, *, sm_scale, causal, window, segmented, interpret, k_dtype, v_dtype):
    """dk [B, nh, Tk', Dqk'] and dv [B, nh, Tk', Dv'] of KV heads [h0, h0 + nh) (tiles that no entry
    visits hold garbage; the caller zeroes them)."""
    entry_kv, entry_row, totals = (x[:, h0:h0 + nh] for x in schedule)
    num_entries = entry_kv.shape[-1]

    def flat(b, h, e):
        return (g.lb(b) * nh + h) * num_entries + e

    def unit_map(b, h, e, kv_ref, row_ref, tot_ref):
        row = row_ref[flat(b, h, e)]
        return (b, (h0 + h) * g.units_per_group + lax.div(row, g.nq), lax.rem(row, g.nq), 0, 0)

    def kv_map(b, h, e, kv_ref, row_ref, tot_ref):
        return (b, h0 + h, g.tile(kv_ref[flat(b, h, e)]), 0)

    def out_map(b, h, e, kv_ref, row_ref, tot_ref):
        return (b, h, g.tile(kv_ref[flat(b, h, e)]), 0)

    def q_vec_map(b, h, e, kv_ref, row_ref, tot_ref):
        return (b, lax.rem(row_ref[flat(b, h, e)], g.nq), 0, 0)

    def kv_vec_map(b, h, e, kv_ref, row_ref, tot_ref):
        return (b, g.tile(kv_ref[flat(b, h, e)]), 0)

    in_specs = [pl.BlockSpec((None, None, None, g.rows, g.dqk_p), unit_map),
                pl.BlockSpec((None, None, g.tile_k, g.dqk_p), kv_map),
                pl.BlockSpec((None, None, g.tile_k, g.dv_p), kv_map),
                pl.BlockSpec((None, None, None, g.rows, g.dv_p), unit_map),
                pl.BlockSpec((None, None, None, SUBLANES, g.rows), unit_map),
                pl.BlockSpec((None, None, None, SUBLANES, g.rows), unit_map)]
    in_specs += [pl.BlockSpec((None, None, SUBLANES, g.rows), q_vec_map),
                 pl.BlockSpec((None, g.tile_k, LANES), kv_vec_map)] * (len(vectors) // 2)
    kernel = functools.partial(_dkv_kernel, g=g, nh=nh, sm_scale=float(sm_scale), causal=causal,
                               window=window, segmented=segmented, num_entries=num_entries)
    call = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(g.batch, nh, num_entries), in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, None, g.tile_k, g.dqk_p), out_map),
                       pl.BlockSpec((None, None, g.tile_k, g.dv_p), out_map)],
            scratch_shapes=[pltpu.VMEM((g.tile_k, g.dqk_p), jnp.float32),
                            pltpu.VMEM((g.tile_k, g.dv_p), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((g.batch, nh, g.tk_p, g.dqk_p), k_dtype),
                   jax.ShapeDtypeStruct((g.batch, nh, g.tk_p, g.dv_p), v_dtype)],
        compiler_params=_params(("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(g, g.batch * nh * num_entries, k_dtype, matmuls=4, exps=1),
        interpret=interpret,
        name="block_sparse_tpu_dkv")
    return call(entry_kv.reshape(-1), entry_row.reshape(-1), totals.reshape(-1), q_rows, k_l, v_l,
                do_rows, lse_row, delta_row, *vectors)


def _dkv_vectors(g: _Geometry, q_pos, kv_pos, q_seg, kv_seg, causal: bool):
    """The position / segment operands of the dK/dV kernel: query rows as rows, keys as columns."""
    out = []
    pairs = ([(q_pos, kv_pos)] if causal else []) + ([(q_seg, kv_seg)] if q_seg is not None else [])
    for qv, kvv in pairs:
        out += [_as_row(_token_vector_to_rows(qv.astype(jnp.int32), g)),
                _as_column(_pad_axis(kvv.astype(jnp.int32), 1, g.tk_p))]
    return out


# ---------------------------------------------------------------------------------------- backward
def backward(q, k, v, out, lse, delta, d_out, layout, q_pos, kv_pos, q_seg, kv_seg, *, sm_scale, causal,
             interpret, window=None):
    """(dq, dk, dv) in the dtypes of q, k, v. lse, delta [B, Hq, Tq] float32 (delta = rowsum(dO·O) - dlse)."""
    del out
    g = _geometry(q, k, v, layout)
    q_rows = _to_rows(q, g, g.hl, g.dqk_p)                                 # [B, Hl, nq, rows, Dqk']
    do_rows = _to_rows(d_out.astype(q.dtype), g, g.hl, g.dv_p)
    lse_rows = _head_vector_to_rows(lse.astype(jnp.float32), g)            # [B, Hl, nq, rows]
    delta_rows = _head_vector_to_rows(delta.astype(jnp.float32), g)
    k_l, v_l = _kv_layout(k, g, g.dqk_p), _kv_layout(v, g, g.dv_p)
    static = dict(sm_scale=sm_scale, causal=causal, window=window, segmented=q_seg is not None,
                  interpret=interpret)

    rows_total = g.nq * g.rows
    flat = lambda x: x.reshape(g.batch, g.hl, rows_total, *x.shape[4:])
    dq_inputs = (flat(q_rows), k_l, v_l, flat(do_rows), _as_column(flat(lse_rows)),
                 _as_column(flat(delta_rows)), _query_major_vectors(g, q_pos, kv_pos, q_seg, kv_seg, causal))
    dq = _concat([_dq_call(g, layout, u0, nu, *dq_inputs, dtype=q.dtype, **static)
                  for u0, nu in _chunks(g.hl, _query_major_smem(g.layout_batch, g.nq, g.cap))], 1)
    dq = _from_rows(dq.reshape(g.batch, g.hl, g.nq, g.rows, g.dqk_p), g, g.dqk)

    *schedule, visited = _dkv_schedule(layout, g)
    dkv_inputs = (q_rows, k_l, v_l, do_rows, _as_row(lse_rows), _as_row(delta_rows),
                  _dkv_vectors(g, q_pos, kv_pos, q_seg, kv_seg, causal))
    item = _dkv_smem(g.layout_batch, g.units_per_group, g.nq, g.cap)
    parts = [_dkv_call(g, schedule, h0, nh, *dkv_inputs, k_dtype=k.dtype, v_dtype=v.dtype, **static)
             for h0, nh in _chunks(g.hkv, item)]
    dk, dv = _concat([p[0] for p in parts], 1), _concat([p[1] for p in parts], 1)
    keep = jnp.repeat(jnp.broadcast_to(visited, (g.batch, *visited.shape[1:])), g.tile_k, axis=2)
    keep = keep[..., None]                                                 # [B, Hkv, Tk', 1]
    dk, dv = jnp.where(keep, dk, 0).astype(k.dtype), jnp.where(keep, dv, 0).astype(v.dtype)
    return dq, _kv_layout_back(dk, g, g.dqk), _kv_layout_back(dv, g, g.dv)
