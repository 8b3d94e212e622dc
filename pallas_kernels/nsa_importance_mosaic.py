"""NSA's selection importance (Eq. 8-10) in Pallas Mosaic GPU (Hopper: wgmma, TMA, mbarriers).

The same computation and contract as `pallas_kernels.nsa_importance.importance_scores` (its module
docstring defines the semantics: the Eq. 9 band of overlap weights, block-causal visibility
i·d + l − 1 <= position, segment ids, rows of lse −inf, the step walk of nbt selection blocks over
bn compressed tokens starting at r·J − (s − 1), the sum over the G query heads of each KV head):

    p_slc[b, k, t, j] = Σ_i W[i, j] · Σ_{h in group k} exp(q[t, h] · k̃[i, k] · scale − lse[h, t]) · vis(t, i)

Kernel. One program (CTA) per (query tile, KV head, batch), three warpgroups:

* two consumer warpgroups of 64 rows each. A warpgroup's rows are tw = 64/G consecutive tokens × the
  G heads of the group, token-major (rows t·G + h; at G = 16: 4 tokens × 16 heads), TMA-loaded from
  q [B, T, H, D] one token at a time ([G, D] boxes: the group's heads are adjacent in q). Per step
  j it computes, all in float32 accumulators,
      s = Q·K̃ᵀ                          [64, bn]  wgmma, Q and the key tile in shared memory
      p = exp2(s·scale·log2e − lse₂)    masked    (visibility, segments; lse₂ = +inf for lse −inf rows)
      x = p·W                           [64, Wd]  Eq. 9's band W [bn, Wd] (shared memory), p the
                                                  register operand as bfloat16 hi + lo (2 wgmma)
      y = E·x                           [64, Wd]  E [64, 64] 0/1: row a sums the G rows of token a;
                                                  x staged to shared memory as bfloat16 hi + lo
  and TMA-stores y's first tw rows as out[b, k, tokens, j, :] (two staging buffers, so that a store
  overlaps the next step). W and E are small integers, exact in bfloat16, and the hi + lo splits keep
  ≈ 2⁻¹⁶ relative resolution (what `nsa_importance._small_dot` does), so the scores that a top-n
  compares keep float32-like resolution. A step whose keys all exist, all precede every row of the
  warpgroup and share its rows' one document skips the element mask (scalars XLA reduces before the
  launch: `_query_ranges`, `_keys`);
* one producer warpgroup that TMA-loads the step's bn compressed keys (`block_n`: 64 or 128), their
  positions and segment ids into a ring of `_STAGES[bn]` shared-memory slots; per slot one barrier
  says "loaded", one "consumed by both consumers".

Steps. Step j covers selection blocks j·nbt + c (c < nbt, nbt = `step_blocks`: at most ⌊(bn − s + 1)/r⌋ with
r·nbt a multiple of 8; at r = l'/d = 4, s = l/d = 2: 14 for bn = 64, 30 for bn = 128) and reads the bn
compressed tokens from r·nbt·j − (s − 1) on; the wrapper pads k̃ with s − 1 rows in front (and rows past N at
the end) so that every TMA box lies inside the array; padded keys get the largest position (never visible). A
program walks the steps up to the one holding the last compressed token its latest query can see (causal: the
upper half of [T, N] is never computed), then stores zeros for the remaining steps (_ZERO_CHUNK steps per TMA
store). Programs run the latest query tiles first, the K heads and batch rows of a tile side by side.

Output. `block_scores_padded` returns [B, K, T, steps, Wd] float32, steps = ⌈S / nbt⌉ and Wd = next_pow2(nbt)
>= 16 (`slot_layout`; at r = 4, s = 2: 16 for bn = 64, 32 for bn = 128): step j's slot holds blocks j·nbt + c
in columns c < nbt; columns >= nbt are 0; columns of blocks >= S (the last step's tail) are 0 for S = ⌈T/l'⌉
and are dropped by `importance_scores`, which returns p_slc [B, K, T, S] (a reshape and a slice).

Cost. Measured on an H200 (T = 65,536, H = 64, K = 4, G = 16, D = 128, bf16; benchmarks/RESULTS.md,
NSA runs L and N, notes_kernels item 16): 15.5 ms with 64-key steps, 12.8 ms with 128-key steps,
10.6 ms with the hi + lo split by bit shifts (`nsa_importance.split_bfloat16`), against 17.4 ms for
the Triton kernel's scores. Variants timed with parts removed (item 16) put the 128-key kernel's
12.8 ms at: Q·K̃ᵀ alone ~5.0, exp2 ~1.3, the band and group-sum stages ~6.3, of which the lo parts
~4.5 and the rounding conversions of the split ~2. The estimate written before it was built: Q·K̃ᵀ
over the causal half is 2.2 TFLOP of wgmma at M = 64, N = 64: ≈ 3.3 ms at ~660 TFLOP/s; the band
and group-sum wgmmas add 2 × 2 × 64 × 64 × 16 per 64 × 64 × 128 of Q·K̃ᵀ, i.e. +50% flops but at
N = 16 (lower efficiency), ≈ 1.5 ms more, overlapped with the other consumer's
exp2 (8.6·10⁹ exp2 on the MUFU at ~4·10¹² /s: ≈ 2 ms, in parallel with the tensor cores across the
two consumers); the output p_slc is 4.3 GB of float32 (+7% padding at Wd = 32 vs nbt = 30): ≈ 1 ms of
HBM writes, overlapped by the TMA stores; ≈ 5-6 ms in all.

Supported (`check_supported`): q, k̃ both bfloat16 or both float16; D in {64, 128}; G = H/K in {8, 16, 32, 64}
(a token's G rows start on an 8-row tile of the swizzled Q buffer); l/d + l'/d − 1 <= bn (one selection block
fits a step) and some nbt with r·nbt a multiple of 8; any T (the wrapper pads the per-row arrays; rows past T
are masked); N >= 0 (N = 0: zeros, no launch). Rows use lse from the compression branch (−inf: the row sees
nothing).

It uses only API spelled the same in jax 0.10.2 (CPU) and 0.11.2 (the GPU), as
`block_sparse.mosaic_gpu` does. Tests (tests/pallas_kernels/test_nsa_importance_mosaic.py) run it on
CPU in jax's Mosaic GPU interpreter, extended by tests/pallas_kernels/test_mosaic_gpu.py with the
wgmma forms it lacks, and lower it for CUDA.

Shapes: B batch, T query tokens, H = K·G query heads, K KV heads, D head dim, N compressed tokens,
S selection blocks.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse.mosaic_gpu_bwd import _ring_producer
from pallas_kernels.nsa_importance import split_bfloat16

_LOG2E = math.log2(math.e)
_WG_ROWS = 64             # rows of one consumer warpgroup (the wgmma M)
_CONSUMERS = 2
_BLOCK_NS = (64, 128)     # compressed tokens per step (bn); `default_block_n` picks
_STAGES = {64: 4, 128: 2} # key tiles in flight per bn (shared memory: 2 x 32 KB tiles at bn = 128)
_ZERO_CHUNK = 8           # steps per zero store
_HEAD_DIMS = (64, 128)
_GROUPS = (8, 16, 32, 64)
_DTYPES = (jnp.bfloat16, jnp.float16)
_SMALL = jnp.bfloat16     # dtype of the band / group-sum operands (hi + lo parts)
_BIG = jnp.iinfo(jnp.int32).max
_SMALLEST = jnp.iinfo(jnp.int32).min


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Static sizes of one launch."""
  t: int             # query tokens
  tp: int            # tokens padded to whole programs
  hkv: int
  group: int         # G
  d: int
  n: int             # compressed tokens
  block: int         # l
  stride: int        # d
  r: int             # l' / d
  s: int             # l / d
  bn: int            # compressed tokens per step
  nbt: int           # selection blocks per step
  width: int         # Wd: next_pow2(nbt) >= 16
  steps: int         # ⌈S / nbt⌉
  dtype: jnp.dtype
  scale_log2: float

  @property
  def tw(self):        # tokens per consumer warpgroup
    return _WG_ROWS // self.group

  @property
  def programs(self):  # query tiles
    return self.tp // (_CONSUMERS * self.tw)

  @property
  def stages(self):    # key tiles in flight
    return _STAGES[self.bn]

  @property
  def np_keys(self):   # rows of the padded key arrays: every step's box inside, a multiple of 8
    need = (self.steps - 1) * self.r * self.nbt + self.bn
    return -(-need // 8) * 8


def _geometry(q, k_cmp, num_blocks, *, block, stride, select_block, sm_scale, block_n) -> _Geometry:
  _, t, hq, d = q.shape
  hkv = k_cmp.shape[2]
  group = hq // hkv
  r, s = select_block // stride, block // stride
  block_n = block_n or default_block_n(block=block, stride=stride, select_block=select_block)
  nbt, steps, width = slot_layout(block=block, stride=stride, select_block=select_block, num_blocks=num_blocks,
                                  block_n=block_n)
  tile = _CONSUMERS * (_WG_ROWS // group)
  return _Geometry(
      t=t, tp=-(-t // tile) * tile, hkv=hkv, group=group, d=d, n=k_cmp.shape[1], block=block,
      stride=stride, r=r, s=s, bn=block_n, nbt=nbt, width=width, steps=steps,
      dtype=jnp.dtype(q.dtype), scale_log2=float(sm_scale) * _LOG2E)


def check_supported(q, k_cmp, lse, q_positions, q_segment_ids, kv_segment_ids, *, block: int, stride: int,
                    select_block: int, num_blocks: int, block_n: int | None = None) -> None:
  """Raise ValueError naming the value this kernel cannot run and the valid choices."""
  if q.ndim != 4 or k_cmp.ndim != 4:
    raise ValueError(f"nsa_importance_mosaic needs q [B, T, H, D] and k_cmp [B, N, K, D]; got q {q.shape}, "
                     f"k_cmp {k_cmp.shape}")
  b, t, hq, d = q.shape
  hkv = k_cmp.shape[2]
  if k_cmp.shape[0] != b or k_cmp.shape[3] != d:
    raise ValueError(f"nsa_importance_mosaic: k_cmp {k_cmp.shape} must have q's batch {b} and head dim {d}")
  if jnp.dtype(q.dtype) != jnp.dtype(k_cmp.dtype) or jnp.dtype(q.dtype) not in [jnp.dtype(x) for x in _DTYPES]:
    raise ValueError(f"nsa_importance_mosaic needs q and k_cmp both bfloat16 or both float16; got q {q.dtype}, "
                     f"k_cmp {k_cmp.dtype}")
  if d not in _HEAD_DIMS:
    raise ValueError(f"nsa_importance_mosaic needs head dim D in {_HEAD_DIMS}; got D={d}")
  if hkv < 1 or hq % hkv or hq // hkv not in _GROUPS:
    raise ValueError(f"nsa_importance_mosaic needs G = H/K query heads per KV head in {_GROUPS}; got H={hq}, "
                     f"K={hkv}")
  for name, x, shape in (("lse", lse, (b, hq, t)), ("q_positions", q_positions, (b, t)),
                         ("q_segment_ids", q_segment_ids, (b, t)),
                         ("kv_segment_ids", kv_segment_ids, (b, k_cmp.shape[1]))):
    if tuple(x.shape) != shape:
      raise ValueError(f"nsa_importance_mosaic: {name} has shape {tuple(x.shape)}; expected {shape}")
  if jnp.dtype(lse.dtype) != jnp.float32:
    raise ValueError(f"nsa_importance_mosaic needs lse in float32; got {lse.dtype}")
  for name, x in (("q_positions", q_positions), ("q_segment_ids", q_segment_ids),
                  ("kv_segment_ids", kv_segment_ids)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"nsa_importance_mosaic: {name} must be integers (int32); got {x.dtype}")
  for name, v in (("block", block), ("stride", stride), ("select_block", select_block),
                  ("num_blocks", num_blocks)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"nsa_importance_mosaic: {name}={v!r} must be a positive int")
  if block % stride or select_block % stride:
    raise ValueError(f"nsa_importance_mosaic: stride d={stride} must divide block l={block} and select_block "
                     f"l'={select_block}; valid d: "
                     f"{[x for x in range(1, block + 1) if block % x == 0 and select_block % x == 0]}")
  if block > select_block:
    raise ValueError(f"nsa_importance_mosaic: block l={block} must be <= select_block l'={select_block} (Eq. 9)")
  block_n = block_n or default_block_n(block=block, stride=stride, select_block=select_block)
  if block_n not in _BLOCK_NS:
    raise ValueError(f"nsa_importance_mosaic: block_n={block_n!r} compressed tokens per step; valid: {_BLOCK_NS}")
  r, s = select_block // stride, block // stride
  kw = dict(block=block, stride=stride, select_block=select_block, block_n=block_n)
  if r + s - 1 <= block_n and not step_blocks(**kw):
    raise ValueError(f"nsa_importance_mosaic: no step of n <= {(block_n - s + 1) // r} selection blocks has "
                     f"l'/d · n = {r}·n a multiple of 8 (its key tiles must start on an 8-row tile); "
                     f"use l'/d = {r} with a larger even part")
  if r + s - 1 > block_n:
    raise ValueError(f"nsa_importance_mosaic: a selection block spans l'/d + l/d − 1 = {r + s - 1} compressed "
                     f"tokens, over the {block_n} of a step; use l'/d + l/d <= {block_n + 1}")


# ----------------------------------------------------------------------------------------------
# Constants and per-tile scalars (XLA, before the launch)


def _eq9_band(g: _Geometry):
  """W [bn, Wd] bfloat16: weight of the step's u-th loaded token in its c-th block (0 for c >= nbt)."""
  u = jnp.arange(g.bn)[:, None]
  c = jnp.arange(g.width)[None, :]
  k = g.r * c + (g.r + g.s - 2) - u
  w = jnp.minimum(jnp.minimum(k + 1, g.s), jnp.minimum(g.r, g.r + g.s - 1 - k))
  ok = (k >= 0) & (k <= g.r + g.s - 2) & (c < g.nbt)
  return jnp.where(ok, w, 0).astype(jnp.float32).astype(_SMALL)


def _group_sum(g: _Geometry):
  """E [64, 64] bfloat16: E[a, ρ] = 1 iff row ρ belongs to the warpgroup's a-th token (a < tw)."""
  a = jnp.arange(_WG_ROWS)[:, None]
  rho = jnp.arange(_WG_ROWS)[None, :]
  return jnp.where(rho // g.group == a, 1.0, 0.0).astype(_SMALL)


def _rows(g: _Geometry, q, lse, q_positions, q_segment_ids):
  """Per-row arrays in the kernel's row order (row t·G + h of KV head k): lse₂ [B, K, Tp·G] float32
  (lse·log2 e; +inf for lse −inf and padded tokens), positions and segment ids [B, Tp·G] int32, and
  the valid-row mask [B, K, Tp·G]."""
  b = q.shape[0]
  pad = g.tp - g.t
  lse = jnp.pad(lse.reshape(b, g.hkv, g.group, g.t), [(0, 0), (0, 0), (0, 0), (0, pad)],
                constant_values=-jnp.inf)
  lse = jnp.swapaxes(lse, 2, 3).reshape(b, g.hkv, g.tp * g.group)
  ok = lse > -jnp.inf
  lse2 = jnp.where(ok, lse * _LOG2E, jnp.inf)
  per_row = lambda x: jnp.repeat(jnp.pad(x.astype(jnp.int32), [(0, 0), (0, pad)]), g.group, axis=1)
  return lse2, per_row(q_positions), per_row(q_segment_ids), ok


def _query_ranges(g: _Geometry, pos, seg, ok):
  """Per consumer tile (64 rows) over its valid rows: int32 [B, K, Tp·G/64, 3] of (smallest position,
  smallest segment id, largest segment id); and per program the steps holding a compressed token its
  latest valid row sees, int32 [B, K, programs]."""
  b = pos.shape[0]
  pos = jnp.broadcast_to(pos[:, None], ok.shape).reshape(b, g.hkv, -1, _WG_ROWS)
  seg = jnp.broadcast_to(seg[:, None], ok.shape).reshape(b, g.hkv, -1, _WG_ROWS)
  ok = ok.reshape(pos.shape)
  ranges = jnp.stack([jnp.where(ok, pos, _BIG).min(-1), jnp.where(ok, seg, _BIG).min(-1),
                      jnp.where(ok, seg, _SMALLEST).max(-1)], axis=-1)
  latest = jnp.where(ok, pos, -1).max(-1).reshape(b, g.hkv, g.programs, _CONSUMERS).max(-1)
  seen = jnp.clip((latest - (g.block - 1)) // g.stride + 1, 0, g.n)
  last_block = (seen + g.s - 2) // g.r                   # the last block that token seen − 1 overlaps
  steps = jnp.where(seen > 0, jnp.minimum(last_block // g.nbt + 1, g.steps), 0)
  return ranges.astype(jnp.int32), steps.astype(jnp.int32)


def _keys(g: _Geometry, k_cmp, kv_segment_ids):
  """k̃ padded to [B, Np, K, D] (s − 1 zero rows in front: step j's box starts at row j·r·nbt), key
  positions [Np] int32 (i·d + l − 1; the largest int32 for padding: never visible), segment ids
  [B, Np] int32 (−1 for padding), and per step int32 [B, steps, 3] of (largest position, smallest and
  largest segment id) over the step's box."""
  np_ = g.np_keys
  front, back = g.s - 1, max(0, np_ - (g.s - 1) - g.n)
  k = jnp.pad(k_cmp, [(0, 0), (front, back), (0, 0), (0, 0)])[:, :np_]
  i = jnp.arange(np_, dtype=jnp.int32) - front
  valid = (i >= 0) & (i < g.n)
  pos = jnp.where(valid, i * g.stride + (g.block - 1), _BIG).astype(jnp.int32)
  seg = jnp.pad(kv_segment_ids.astype(jnp.int32), [(0, 0), (front, back)], constant_values=-1)[:, :np_]
  box = jnp.arange(g.steps)[:, None] * (g.r * g.nbt) + jnp.arange(g.bn)[None, :]    # [steps, bn]
  seg_box = seg[:, box]
  ranges = jnp.stack([jnp.broadcast_to(pos[box].max(-1), seg_box.shape[:2]), seg_box.min(-1),
                      seg_box.max(-1)], axis=-1)
  return k, pos, seg, ranges.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Kernel


def _row_bcast(x, shape):
  return lax.broadcast_in_dim(x, shape, [0])


def _col_bcast(x, shape):
  return lax.broadcast_in_dim(x, shape, [1])


def _load_vector(ref, layout):
  """A 1-D shared-memory ref as an array with `layout` (`block_sparse.mosaic_gpu._load_vector`)."""
  return plgpu.layout_cast(ref[...], layout)


def _producer(g: _Geometry, batch, kv, steps, refs, bufs, bars):
  """TMA-load step n's key tile, positions and segment ids into slot n mod stages once both
  consumers have released it."""
  k_ref, kpos_ref, kseg_ref = refs
  k_smem, kpos_smem, kseg_smem = bufs
  k_bar, k_free = bars

  def load(n, slot):
    rows = pl.ds(n * (g.r * g.nbt), g.bn)
    plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv], k_smem.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(kpos_ref.at[rows], kpos_smem.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(kseg_ref.at[batch, rows], kseg_smem.at[slot], k_bar.at[slot])

  # a ring no deeper than the steps: its first loads are traced for slots 0 .. depth − 1, whose static
  # key boxes must lie inside the padded keys (same slots as the consumers' n mod stages, no wrap)
  _ring_producer(g, min(g.stages, g.steps), steps, load, k_free)


def _consumer(g: _Geometry, batch, kv, prog, steps, wg, refs, bufs, bars):
  """Scores of the warpgroup's tw tokens for every step: computed for steps < `steps`, zeros after."""
  (q_ref, lse_ref, pos_ref, seg_ref, band_ref, esum_ref, q_range_ref, k_range_ref, o_ref) = refs
  (q_smem, lse_smem, pos_smem, seg_smem, band_smem, esum_smem, x_smem, y_smem, zero_smem,
   zero_one_smem, k_smem, kpos_smem, kseg_smem) = bufs
  q_bar, k_bar, k_free = bars
  tile = prog * _CONSUMERS + wg                        # the warpgroup's 64 rows in the row arrays
  rows = pl.ds(tile * _WG_ROWS, _WG_ROWS)
  tok0 = tile * g.tw
  q_tile = q_smem.at[wg]

  for i in range(g.tw):                                # token i's G heads: rows i·G .. i·G + G − 1
    tok = jnp.minimum(tok0 + i, g.t - 1)               # padded tokens read the last one (masked)
    plgpu.copy_gmem_to_smem(q_ref.at[batch, tok, pl.ds(kv * g.group, g.group)],
                            q_tile.at[pl.ds(i * g.group, g.group)], q_bar.at[wg])
  plgpu.copy_gmem_to_smem(lse_ref.at[batch, kv, rows], lse_smem.at[wg], q_bar.at[wg])
  plgpu.copy_gmem_to_smem(pos_ref.at[batch, rows], pos_smem.at[wg], q_bar.at[wg])
  plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], seg_smem.at[wg], q_bar.at[wg])
  plgpu.copy_gmem_to_smem(band_ref, band_smem.at[wg], q_bar.at[wg])
  plgpu.copy_gmem_to_smem(esum_ref, esum_smem.at[wg], q_bar.at[wg])
  zeros, zero_one = zero_smem.at[wg], zero_one_smem.at[wg]
  zeros[...] = jnp.zeros(zeros.shape, jnp.float32)
  zero_one[...] = jnp.zeros(zero_one.shape, jnp.float32)
  plgpu.commit_smem()
  plgpu.barrier_wait(q_bar.at[wg])

  row_layout = plgpu.Layout.WGMMA.reduce(1)
  col_layout = plgpu.Layout.WGMMA.reduce(0)
  shape = (_WG_ROWS, g.bn)
  lse2 = _load_vector(lse_smem.at[wg], row_layout)
  q_pos = _load_vector(pos_smem.at[wg], row_layout)
  q_seg = _load_vector(seg_smem.at[wg], row_layout)
  q_lo, seg_lo, seg_hi = (q_range_ref[batch, kv, tile, c] for c in range(3))
  one_segment = seg_lo == seg_hi

  def needs_mask(n):
    """Some key of step n is padding, after some row or outside the rows' one document."""
    full = ((k_range_ref[batch, n, 0] <= q_lo) & one_segment
            & (k_range_ref[batch, n, 1] == seg_lo) & (k_range_ref[batch, n, 2] == seg_lo))
    return jnp.logical_not(full)

  def mask(p, slot):
    kv_pos = _col_bcast(_load_vector(kpos_smem.at[slot], col_layout), shape)
    kv_seg = _col_bcast(_load_vector(kseg_smem.at[slot], col_layout), shape)
    ok = (kv_pos <= _row_bcast(q_pos, shape)) & (kv_seg == _row_bcast(q_seg, shape))
    return jnp.where(ok, p, 0.0)

  def probabilities(n, slot):
    """p = exp2(Q·K̃ᵀ·scale·log2 e − lse₂) [64, bn], masked as step n needs; releases the slot."""
    def qk(acc_ref):
      plgpu.wgmma(acc_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
      return acc_ref[...]
    s = pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32))
    p = jnp.exp2(s * g.scale_log2 - _row_bcast(lse2, shape))
    p = lax.cond(needs_mask(n), lambda p: mask(p, slot), lambda p: p, p)
    plgpu.barrier_arrive(k_free.at[slot])
    return p

  def step(n, carry):
    slot = lax.rem(n, g.stages)
    plgpu.barrier_wait(k_bar.at[slot])
    p_hi, p_lo = split_bfloat16(probabilities(n, slot))

    def band(acc_ref):                                  # x = p·W (p from registers)
      plgpu.wgmma(acc_ref, p_hi, band_smem.at[wg])
      plgpu.wgmma(acc_ref, p_lo, band_smem.at[wg])
      return acc_ref[...]
    x_hi, x_lo = split_bfloat16(pl.run_scoped(band, plgpu.ACC((_WG_ROWS, g.width), jnp.float32)))
    x_smem.at[wg, 0][...] = x_hi
    x_smem.at[wg, 1][...] = x_lo
    plgpu.commit_smem()

    def group(acc_ref):                                 # y = E·x: per-token sums of the G rows
      plgpu.wgmma(acc_ref, esum_smem.at[wg], x_smem.at[wg, 0])
      plgpu.wgmma(acc_ref, esum_smem.at[wg], x_smem.at[wg, 1])
      return acc_ref[...]
    y = pl.run_scoped(group, plgpu.ACC((_WG_ROWS, g.width), jnp.float32))
    buf = y_smem.at[wg, lax.rem(n, 2)]
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)     # the store from this buffer two steps ago
    buf[...] = y
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(buf.at[pl.ds(0, g.tw)], o_ref.at[batch, kv, pl.ds(tok0, g.tw), n])
    return carry

  lax.fori_loop(0, steps, step, 0)

  # steps no row of the program reaches: zeros, _ZERO_CHUNK steps per store, then one at a time
  chunks = (g.steps - steps) // _ZERO_CHUNK

  @pl.loop(0, chunks)
  def _zero_chunk(c):
    at = pl.ds(steps + c * _ZERO_CHUNK, _ZERO_CHUNK)
    plgpu.copy_smem_to_gmem(zeros, o_ref.at[batch, kv, pl.ds(tok0, g.tw), at])

  @pl.loop(steps + chunks * _ZERO_CHUNK, g.steps)
  def _zero_step(n):
    plgpu.copy_smem_to_gmem(zero_one.at[pl.ds(0, g.tw)], o_ref.at[batch, kv, pl.ds(tok0, g.tw), n])

  plgpu.wait_smem_to_gmem(0)


def _kernel(q_range_ref, k_range_ref, steps_ref, q_ref, lse_ref, pos_ref, seg_ref, band_ref, esum_ref, k_ref,
            kpos_ref, kseg_ref, o_ref, *, g: _Geometry):
  kv = lax.axis_index("kv")
  batch = lax.axis_index("batch")
  prog = g.programs - 1 - lax.axis_index("q")          # latest query tiles first
  steps = steps_ref[batch, kv, prog]

  def swizzled(rows, cols, dtype, *lead, minor=None):
    """Shared memory for wgmma: swizzled rows of `minor` (default cols) elements, up to 128 bytes."""
    swizzle = min(128, (minor or cols) * jnp.dtype(dtype).itemsize)
    transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
                  plgpu.SwizzleTransform(swizzle))
    return plgpu.SMEM((*lead, rows, cols), dtype, transforms=transforms)

  wg_vec = lambda dtype: plgpu.SMEM((_CONSUMERS, _WG_ROWS), dtype)
  scratch = dict(
      q=swizzled(_WG_ROWS, g.d, g.dtype, _CONSUMERS),
      lse=wg_vec(jnp.float32), pos=wg_vec(jnp.int32), seg=wg_vec(jnp.int32),
      band=swizzled(g.bn, g.width, _SMALL, _CONSUMERS),
      esum=swizzled(_WG_ROWS, _WG_ROWS, _SMALL, _CONSUMERS, minor=g.width),   # x's swizzle (wgmma: equal)
      x=swizzled(_WG_ROWS, g.width, _SMALL, _CONSUMERS, 2),
      y=plgpu.SMEM((_CONSUMERS, 2, _WG_ROWS, g.width), jnp.float32),
      zero=plgpu.SMEM((_CONSUMERS, g.tw, _ZERO_CHUNK, g.width), jnp.float32),
      zero_one=plgpu.SMEM((_CONSUMERS, _WG_ROWS, g.width), jnp.float32),   # (stores of >= 128 values)
      k=swizzled(g.bn, g.d, g.dtype, g.stages),
      kpos=plgpu.SMEM((g.stages, g.bn), jnp.int32),
      kseg=plgpu.SMEM((g.stages, g.bn), jnp.int32))
  barriers = dict(
      q=plgpu.Barrier(num_arrivals=g.tw + 5, num_barriers=_CONSUMERS),
      k=plgpu.Barrier(num_arrivals=3, num_barriers=g.stages),
      k_free=plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=g.stages))

  def body(s, b):
    wg = lax.axis_index("wg")

    @pl.when(wg < _CONSUMERS)
    def _consume():
      plgpu.set_max_registers(232, action="increase")
      _consumer(g, batch, kv, prog, steps, wg,
                (q_ref, lse_ref, pos_ref, seg_ref, band_ref, esum_ref, q_range_ref, k_range_ref, o_ref),
                (s["q"], s["lse"], s["pos"], s["seg"], s["band"], s["esum"], s["x"], s["y"], s["zero"],
                 s["zero_one"], s["k"], s["kpos"], s["kseg"]),
                (b["q"], b["k"], b["k_free"]))

    @pl.when(wg == _CONSUMERS)
    def _produce():
      plgpu.set_max_registers(40, action="decrease")
      _producer(g, batch, kv, steps, (k_ref, kpos_ref, kseg_ref), (s["k"], s["kpos"], s["kseg"]),
                (b["k"], b["k_free"]))

  pl.run_scoped(body, scratch, barriers, collective_axes="wg")


# ----------------------------------------------------------------------------------------------
# Wrapper


def default_block_n(*, block: int, stride: int, select_block: int) -> int:
  """bn: 128 compressed tokens per step where a step's slot stays within 32 columns (the shared memory
  of 128-key tiles fits then: ~212 KB at D = 128), else 64. 128 measured 12.80 against 15.52 ms at
  T = 65,536, H = 64, K = 4, D = 128 on an H200 (benchmarks/RESULTS.md, NSA run N)."""
  nbt = step_blocks(block=block, stride=stride, select_block=select_block, block_n=128)
  return 128 if nbt and _next_pow2(nbt) <= 32 else 64


def step_blocks(*, block: int, stride: int, select_block: int, block_n: int | None = None) -> int:
  """nbt: selection blocks per step of bn = block_n compressed tokens (None: `default_block_n`): the
  most that fit ⌊(bn − l/d + 1) / (l'/d)⌋ with r·nbt a multiple of 8, so that every step's TMA box of
  keys starts on a row of the (8, ·)-tiled shared-memory layout (jax 0.11's Mosaic GPU refuses a box
  whose start row it cannot prove a multiple of the tile's 8 rows); at l = 32, d = 16, l' = 64 (r = 4)
  14 for bn = 64 and 30 for bn = 128. 0 when no such nbt fits (check_supported refuses those)."""
  block_n = block_n or default_block_n(block=block, stride=stride, select_block=select_block)
  r, s = select_block // stride, block // stride
  return next((n for n in range((block_n - s + 1) // r, 0, -1) if (r * n) % 8 == 0), 0)


def slot_layout(*, block: int, stride: int, select_block: int, num_blocks: int,
                block_n: int | None = None) -> tuple[int, int, int]:
  """(nbt, steps, Wd) of `block_scores_padded`'s output [B, K, T, steps, Wd]: nbt = `step_blocks`
  selection blocks per step, steps = ⌈S / nbt⌉ for S = num_blocks, Wd = next_pow2(nbt) >= 16."""
  nbt = step_blocks(block=block, stride=stride, select_block=select_block, block_n=block_n)
  return nbt, -(-num_blocks // nbt), max(16, _next_pow2(nbt))


def block_scores_padded(q, k_cmp, lse, q_positions, q_segment_ids, kv_segment_ids, *, block: int, stride: int,
                        select_block: int, num_blocks: int, sm_scale: float | None = None,
                        block_n: int | None = None, interpret=None) -> jax.Array:
  """Eq. 9 block importance per step: [B, K, T, steps, Wd] float32.

  q [B, T, H, D] (rotated), k_cmp [B, N, K, D] (rotated, q's dtype; N may be 0), lse [B, H, T]
  float32 (the compression branch's natural-log lse; −inf: the row sees nothing), q_positions [B, T]
  int32 (compressed token i is visible iff i·d + l − 1 <= position), q_segment_ids [B, T],
  kv_segment_ids [B, N] int32 (`compressed_segments`: −1 for blocks across documents); block l,
  stride d, select_block l' (d | l, d | l', l <= l'); num_blocks S = ⌈T_row / l'⌉; sm_scale default
  1/√D; block_n: compressed tokens per step, 64 or 128 (None: `default_block_n`). interpret: None (compile for
  the GPU) or the Mosaic GPU interpreter's parameters (`InterpretGPUParams`; its wgmma forms need
  tests/pallas_kernels/test_mosaic_gpu.py's extension).

  Slot [b, k, t, j, c] is p_slc of block j·nbt + c for c < nbt (`step_blocks`), steps = ⌈S / nbt⌉;
  Wd = next_pow2(nbt) >= 16 and columns >= nbt are 0. Every slot is written (0 for blocks that no
  visible compressed token overlaps).
  """
  check_supported(q, k_cmp, lse, q_positions, q_segment_ids, kv_segment_ids, block=block, stride=stride,
                  select_block=select_block, num_blocks=num_blocks, block_n=block_n)
  if interpret is True:
    raise ValueError("nsa_importance_mosaic cannot run with interpret=True: jax's Mosaic GPU interpreter "
                     "does not run wgmma with a register or transposed operand; pass None or "
                     "InterpretGPUParams for an interpreter that does (tests/pallas_kernels/test_mosaic_gpu.py "
                     "extends jax's)")
  d = q.shape[-1]
  scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  g = _geometry(q, k_cmp, num_blocks, block=block, stride=stride, select_block=select_block, sm_scale=scale,
                block_n=block_n)
  b = q.shape[0]
  out_type = jax.ShapeDtypeStruct((b, g.hkv, g.tp, g.steps, g.width), jnp.float32)
  if g.n == 0:
    return jnp.zeros((b, g.hkv, g.t, g.steps, g.width), jnp.float32)
  lse2, pos, seg, ok = _rows(g, q, lse, q_positions, q_segment_ids)
  q_range, steps = _query_ranges(g, pos, seg, ok)
  k, kpos, kseg, k_range = _keys(g, k_cmp, kv_segment_ids)
  out = plgpu.kernel(
      functools.partial(_kernel, g=g), out_type=out_type, grid=(g.hkv, b, g.programs),
      grid_names=("kv", "batch", "q"), num_threads=_CONSUMERS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      kernel_name="nsa_importance_mosaic", interpret=interpret or None,
  )(q_range, k_range, steps, q, lse2, pos, seg, _eq9_band(g), _group_sum(g), k, kpos, kseg)
  return out[:, :, :g.t]


def importance_scores(q, k_cmp, lse, q_positions, q_segment_ids, kv_segment_ids, *, block: int, stride: int,
                      select_block: int, num_blocks: int, sm_scale: float | None = None,
                      block_n: int | None = None, interpret=None) -> jax.Array:
  """p_slc [B, K, T, S] float32: `nsa_importance.importance_scores`'s contract (all T rows), from
  `block_scores_padded` (same arguments) with each step's columns >= nbt and the blocks >= S dropped."""
  out = block_scores_padded(q, k_cmp, lse, q_positions, q_segment_ids, kv_segment_ids, block=block,
                            stride=stride, select_block=select_block, num_blocks=num_blocks, sm_scale=sm_scale,
                            block_n=block_n, interpret=interpret)
  b, hkv, t, steps, _ = out.shape
  nbt = step_blocks(block=block, stride=stride, select_block=select_block, block_n=block_n)
  return out[..., :nbt].reshape(b, hkv, t, steps * nbt)[..., :num_blocks]
