"""Block-sparse flash attention in Pallas with the Triton lowering (GPU).

Three kernels, all driven by a `BlockLayout` (docs/contracts.md §1):

* forward: one program per (row tile of a query unit, head unit, batch); it walks the query-major list
  `kv_indices` with an online softmax (base 2) and writes `out` and `lse`;
* dQ: the same grid and the same walk, recomputing the probabilities from `lse`;
* dK/dV: one program per (KV block, KV head, batch); it walks the KV-major CSR inverse
  (`q_indices` / `kv_offsets`) of every head unit of its KV group, so each dK/dV block is written by
  one program: deterministic, no atomics. When one block's list can be far longer than the mean
  (NSA selects block 0 for every token), the lists are cut into chunks instead: one program per
  chunk writes a float32 partial tile and a second kernel sums each block's partials in a fixed
  order (still deterministic; see `KernelConfig.list_chunk`).

Rows. The rows of a query unit are its `block_q` tokens times the `R = Hq / Hl` query heads of its head
unit (token-major, head-minor). They are gathered from the flattened view `q [B, Tq*Hq, D]`, so no
transpose is needed and NSA's one-token units with G heads stacked as rows cost nothing extra. Units
with more rows than one tile are split into several row tiles; units with fewer than 16 rows are
padded to the tensor-core minimum of 16 with masked rows. In the dK/dV kernel, units smaller than a
tile are packed several to a tile (NSA: four one-token units of 16 heads make a 64-row tile).

Head dims. Triton tiles must be powers of two, so a head dim is split into power-of-two chunks of at
least 16 (192 = 128 + 64): every dot is a sum of chunk dots and no FLOP is spent on padding.

Masking inside a block is computed from the loaded positions and segment ids: causal
(`kv_pos <= q_pos`), the sliding window's far edge (`q_pos - kv_pos < window`, only when a window is
given: it is static, so window=None compiles no extra work), equal segment ids, keys past `Tk`,
queries past `Tq` and padding rows. Rows that
see nothing give out 0 and lse -inf, and zero gradients.

Supported (checked by `check_supported`): float32, bfloat16 and float16 (q, k, v of one dtype); head
dims that are multiples of 16 up to 256; `block_k` a power of two in [16, 128] whose K/V block (plus
a 16-row tile) fits 200 KB of shared memory (all bf16 shapes; float32 with D=256/256 needs
block_k <= 64); any `block_q >= 1`; any head unit allowed by the layout. float32 dots use Triton's default (tf32) precision.

Hopper. On a GPU of compute capability 9.x the forward runs the Mosaic GPU kernel of `mosaic_gpu`
(wgmma, TMA; 568 against 334 TFLOP/s dense causal at 32k on an H200) wherever that kernel supports
the call (block_q 128, block_k 64 or 128, Dqk = Dv in {64, 128}, bf16/f16, ragged ends only when
causal, sliding windows), and the backward the dQ and dK/dV kernels of `mosaic_gpu_bwd` wherever
they do (the same; they split long KV-major lists too; forward + backward 458 against 303 TFLOP/s).
Where those do not serve a backward of one-token query units with a list per KV head (NSA's
selection: block_q 1, Hl = Hkv, G = Hq / Hkv in {8, 16, 32, 64}, block_k 64 or 128, Dqk = Dv in
{64, 128}, bf16/f16, no window), dQ runs here and dK/dV in `mosaic_gpu_token_dkv` (64 / G tokens
per 64-row tile, split lists). `KernelConfig.mosaic`. Either side's out and lse feed the other's
backward unchanged.

Launch parameters come from `default_configs` (tuned on an H200: benchmarks/notes_kernels.md);
`forward(config=...)` / `backward(configs=...)` override them. `plgpu.CompilerParams` is spelled the
same in jax 0.10.2 and 0.11.2.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sparse import mosaic_gpu, mosaic_gpu_bwd, mosaic_gpu_token_dkv, split

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_MIN_ROWS = 16  # smallest M of a tensor-core tile
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_BLOCK_K_CHOICES = (16, 32, 64, 128)
_MAX_HEAD_DIM = 256
# KernelConfig.stagger of units of several tokens: the Mosaic kernels' span, one number for both
STAGGER = mosaic_gpu.STAGGER
# dK/dV: fewer programs than this (KV blocks x KV heads x batch) split their lists (_list_chunk) into
# chunks of at least _DKV_MIN_CHUNK_STEPS steps, about _DKV_SPLIT_PROGRAMS programs in all.
_DKV_MIN_PROGRAMS = 1024
_DKV_SPLIT_PROGRAMS = 2048
_DKV_MIN_CHUNK_STEPS = 8
_SMEM_BUDGET = 200 * 1024  # bytes of shared memory a program may plan for (the H100/H200 allow 227 KB)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Launch parameters of one kernel.

  rows: rows per program tile (a power of two >= 16).
  num_warps, num_stages: Triton's warps per program and software-pipelining depth.
  skip_full_masks: compute the in-block mask only for blocks that need one (a block-level test on
    the loaded positions, causal and window; without segment ids); otherwise every block is masked
    element-wise.
  list_chunk: dK/dV only: CSR entries per program. None picks by shape (split only when one KV
    block's list can be much longer than the mean, e.g. NSA's always-selected block 0, which would
    otherwise serialise the whole backward on one program); 0 never splits. Split lists write
    float32 partial tiles that a second kernel sums in a fixed order (deterministic).
  split_at_run_time: dK/dV only: where `list_chunk` (None) splits only because one list *can* be
    far longer than the mean, compare the lists' real longest length with twice the chunk on the
    device and run whole lists unless it is longer (`lax.cond`, both paths compiled): random
    sparse layouts and sliding windows skip the partial tiles and their sum, NSA-like lists keep
    the split (as `mosaic_gpu_bwd.BwdConfig.split_at_run_time`).
  stagger: spread where the programs start walking their lists over the first `stagger` entries:
    each program starts at entry (program id mod min(stagger, list length)), wrapping around; 0:
    every program starts at entry 0. Programs that run together then read different K/V (or Q)
    blocks at each moment rather than all the same one. When every list is the same (a ring step
    visiting a shard that the queries see whole) the shared block is a hot spot: on an H200 at 64k
    the forward takes 61.1 ns per block unstaggered, 53.7 with starts spread over the whole list,
    like the causal layout's 53.3 (`benchmarks/kernels.py --sections lists`). A bounded spread keeps
    the blocks that the running programs read close together in the list, so that they share the L2
    cache also when one head's listed K/V is larger than it. The order of the online-softmax and
    gradient sums changes, the result only by rounding; still deterministic. `default_configs`
    staggers units of several tokens (STAGGER); NSA's one-token units measured 1.7% slower with it,
    so they start at entry 0.
  mosaic: on a Hopper GPU, run the Mosaic GPU kernels (with this `stagger`) where they support the
    call, else this module's: the forward `mosaic_gpu.forward`; the backward
    `mosaic_gpu_bwd.backward` (both of its kernels) when the "dq" and "dkv" configs both allow it,
    else, for one-token units, `mosaic_gpu_token_dkv.dkv` for dK/dV when the "dkv" config allows it.
    `default_configs` sets it; a config built by hand runs the Triton kernel it describes.
  """
  rows: int
  num_warps: int
  num_stages: int
  skip_full_masks: bool = False
  list_chunk: int | None = None
  split_at_run_time: bool = True
  stagger: int = 0
  mosaic: bool = False

  def __post_init__(self):
    if self.rows < _MIN_ROWS or self.rows & (self.rows - 1):
      raise ValueError(f"rows={self.rows} must be a power of two >= {_MIN_ROWS}")
    if self.stagger < 0:
      raise ValueError(f"stagger={self.stagger} must be >= 0 (0: no stagger)")


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _unit_rows(layout, hq: int) -> int:
  """Rows of one query unit: block_q tokens x (Hq / Hl) heads."""
  return layout.block_q * (hq // layout.kv_indices.shape[1])


def _stages(want: int, streamed_rows: int, resident_rows: int, d_total: int, itemsize: int) -> int:
  """Pipelining depth that keeps `want` stages of the streamed [rows, Dqk+Dv] tiles plus the
  resident ones inside the shared-memory budget (at least 1)."""
  per_stage = streamed_rows * d_total * itemsize
  room = _SMEM_BUDGET - resident_rows * d_total * itemsize
  return max(1, min(want, room // per_stage))


def default_configs(q, k, v, layout) -> dict[str, KernelConfig]:
  """Heuristic launch parameters for the three kernels ("fwd", "dq", "dkv")."""
  ru = _unit_rows(layout, q.shape[2])
  d_total = q.shape[-1] + v.shape[-1]
  size = jnp.dtype(q.dtype).itemsize
  bk = layout.block_k
  cap = 128 if d_total <= 256 else 64
  rows = min(cap, max(_MIN_ROWS, _next_pow2(ru)))
  warps = 2 if rows <= 16 else 4 if rows <= 64 else 8
  # Measured on the H200 (benchmarks/notes_kernels.md): 16-row tiles (NSA) run best with 2 warps
  # and 2 stages (3.83 vs 4.44 ms at T=16k), in dQ too (selection forward+backward at T=64k: 45.93
  # against 48.00 ms with 4 warps); 128-row tiles were measured with 8 warps, 3 stages.
  stages = 2 if rows <= 16 or d_total > 256 else 3
  stagger = STAGGER if layout.block_q > 1 else 0
  fwd = KernelConfig(rows=rows, num_warps=warps, num_stages=_stages(stages, bk, rows, d_total, size),
                     stagger=stagger, mosaic=True)
  dq_rows = min(rows, 64)
  dq = KernelConfig(rows=dq_rows, num_warps=2 if dq_rows <= 16 else 4,
                    num_stages=_stages(2, bk, dq_rows, d_total, size), stagger=stagger, mosaic=True)
  dkv_rows = 64 if bk >= 64 else 32
  dkv = KernelConfig(rows=dkv_rows, num_warps=4 if bk <= 64 else 8,
                     num_stages=_stages(2, dkv_rows, bk, d_total, size), stagger=stagger, mosaic=True)
  return {"fwd": fwd, "dq": dq, "dkv": dkv}


def check_supported(q, k, v, layout) -> None:
  """Raise ValueError if this implementation cannot tile the call (see the module docstring)."""
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if len(dtypes) != 1 or jnp.dtype(q.dtype) not in [jnp.dtype(d) for d in _SUPPORTED_DTYPES]:
    raise ValueError(
        f"pallas_gpu needs q, k, v of one dtype among float32, bfloat16, float16; got "
        f"q {q.dtype}, k {k.dtype}, v {v.dtype}")
  for name, d in (("Dqk", q.shape[-1]), ("Dv", v.shape[-1])):
    if d % 16 or not 16 <= d <= _MAX_HEAD_DIM:
      raise ValueError(
          f"pallas_gpu needs head dims that are multiples of 16 in [16, {_MAX_HEAD_DIM}]; got {name}={d}")
  if layout.block_k not in _BLOCK_K_CHOICES:
    raise ValueError(f"pallas_gpu needs block_k in {_BLOCK_K_CHOICES}; got block_k={layout.block_k}")
  tile = (layout.block_k + _MIN_ROWS) * (q.shape[-1] + v.shape[-1]) * jnp.dtype(q.dtype).itemsize
  if tile > _SMEM_BUDGET:
    raise ValueError(
        f"pallas_gpu cannot hold one K/V block in shared memory: block_k={layout.block_k} x "
        f"(Dqk={q.shape[-1]} + Dv={v.shape[-1]}) in {jnp.dtype(q.dtype).name} needs {tile} bytes "
        f"with the smallest row tile, over {_SMEM_BUDGET}; use a smaller block_k or bfloat16")
  if layout.block_q < 1:
    raise ValueError(f"pallas_gpu needs block_q >= 1; got block_q={layout.block_q}")


# ----------------------------------------------------------------------------------------------
# In-kernel helpers. Refs of activations are flattened 2-D views [tokens * heads, D]; rows and
# columns are gathered with integer index vectors (the Triton lowering turns them into pointer
# tensors, interpret mode into gathers).


def _chunks(d: int) -> tuple[tuple[int, int], ...]:
  """Split a head dim (a multiple of 16) into power-of-two (start, width) chunks, widest first."""
  out, start = [], 0
  while start < d:
    w = 1 << ((d - start).bit_length() - 1)
    out.append((start, w))
    start += w
  return tuple(out)


def _load_rows(ref, rows, valid, chunks):
  """Load rows [M] (flat indices) of a [N, D] ref as one [M, w] tile per chunk; invalid rows give 0."""
  return [plgpu.load(ref.at[rows[:, None], (c0 + jnp.arange(w))[None, :]],
                     mask=valid[:, None], other=0.0) for c0, w in chunks]


def _store_rows(ref, rows, valid, chunks, tiles):
  for (c0, w), t in zip(chunks, tiles):
    plgpu.store(ref.at[rows[:, None], (c0 + jnp.arange(w))[None, :]], t.astype(ref.dtype),
                mask=valid[:, None])


def _dot_chunks(a_tiles, b_tiles, *, trans_b=False):
  """sum_c a_c @ b_c (or a_c @ b_c^T): a contraction over the chunked head dim, float32."""
  acc = None
  for a, b in zip(a_tiles, b_tiles):
    t = plgpu.dot(a, b, trans_b=trans_b)
    acc = t if acc is None else acc + t
  return acc


def _load_vec(ref, idx, valid, other):
  return plgpu.load(ref.at[idx], mask=valid, other=other)


def _allowed(g, q_pos, kv_pos, q_seg, kv_seg, q_valid, k_valid):
  """Mask [M, bk] of the pairs a row may attend to."""
  m = q_valid[:, None] & k_valid[None, :]
  if g.causal:
    m = m & (kv_pos[None, :] <= q_pos[:, None])
  if g.window is not None:
    m = m & (q_pos[:, None] - kv_pos[None, :] < g.window)
  if q_seg is not None:
    m = m & (q_seg[:, None] == kv_seg[None, :])
  return m


def _q_bounds(g, q_pos, q_valid):
  """(min, max) of the valid rows' positions for `_masked`; only what the skip test uses is computed."""
  if not g.skip_full_masks:
    return None, None
  lo = jnp.min(jnp.where(q_valid, q_pos, jnp.iinfo(jnp.int32).max)) if g.causal else None
  hi = jnp.max(jnp.where(q_valid, q_pos, jnp.iinfo(jnp.int32).min)) if g.window is not None else None
  return lo, hi


def _masked(g, x, fill, ok_fn, block, kv_pos, q_bounds):
  """where(ok_fn(), x, fill). With `g.skip_full_masks`, blocks whose keys all lie inside Tk, before
  every valid row's position and (with a window) inside every valid row's window skip the
  element-wise mask (padding rows need none: their outputs are not stored and their lse loads as
  -inf, which zeroes their probabilities). q_bounds: `_q_bounds` of the tile's rows."""
  if not g.skip_full_masks:
    return jnp.where(ok_fn(), x, fill)
  q_min, q_max = q_bounds
  full = (block + 1) * g.block_k <= g.tk
  if g.causal:
    full = full & (jnp.max(kv_pos) <= q_min)
  if g.window is not None:
    full = full & (q_max - jnp.min(kv_pos) < g.window)
  return jax.lax.cond(full, lambda x: x, lambda x: jnp.where(ok_fn(), x, fill), x)


def _walk(g, seed, count):
  """Entry of a list of `count` entries visited at step n (a function of n): n itself, or with
  `g.stagger` the list rotated to start at entry (seed mod min(g.stagger, count))."""
  if not g.stagger:
    return lambda n: n
  start = seed % jnp.clip(count, 1, g.stagger)
  return lambda n: jnp.where(n + start >= count, n + start - count, n + start)


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Static sizes shared by the kernels."""
  tq: int
  tk: int
  hq: int
  hkv: int
  hl: int
  block_q: int
  block_k: int
  rows: int          # rows per program tile
  dqk_chunks: tuple
  dv_chunks: tuple
  causal: bool
  has_seg: bool
  scale_log2: float  # sm_scale * log2(e)
  skip_full_masks: bool = False
  window: int | None = None  # static: None compiles no window term
  stagger: int = 0          # KernelConfig.stagger

  @property
  def r(self):  # query heads per head unit
    return self.hq // self.hl

  @property
  def unit_rows(self):
    return self.block_q * self.r

  @property
  def tiles_per_unit(self):
    return -(-self.unit_rows // self.rows)


def _unit_rows_tile(g: _Geometry, unit, tile, head_unit):
  """Flat q rows, token indices, absolute head indices and validity of one row tile of a unit."""
  local = tile * g.rows + jnp.arange(g.rows)
  tok = unit * g.block_q + local // g.r
  head = head_unit * g.r + local % g.r
  valid = (local < g.unit_rows) & (tok < g.tq)
  return tok * g.hq + head, tok, head, valid


def _kv_block_rows(g: _Geometry, block, kv_head):
  tok = block * g.block_k + jnp.arange(g.block_k)
  valid = tok < g.tk
  return tok * g.hkv + kv_head, tok, valid


# ----------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(kv_idx_ref, kv_cnt_ref, q_pos_ref, kv_pos_ref, *refs, g: _Geometry):
  if g.has_seg:
    q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  prog, u = pl.program_id(0), pl.program_id(1)
  unit, tile = prog // g.tiles_per_unit, prog % g.tiles_per_unit
  kv_head = (u * g.r) // (g.hq // g.hkv)

  q_rows, tok, head, q_valid = _unit_rows_tile(g, unit, tile, u)
  q = _load_rows(q_ref, q_rows, q_valid, g.dqk_chunks)
  q_pos = _load_vec(q_pos_ref, tok, q_valid, 0)
  q_seg = _load_vec(q_seg_ref, tok, q_valid, 0) if g.has_seg else None
  q_bounds = _q_bounds(g, q_pos, q_valid)
  count = kv_cnt_ref[unit]
  entry = _walk(g, prog, count)

  def body(n, carry):
    acc, m_prev, l_prev = carry
    block = kv_idx_ref[unit, entry(n)]
    k_rows, k_tok, k_valid = _kv_block_rows(g, block, kv_head)
    k = _load_rows(k_ref, k_rows, k_valid, g.dqk_chunks)
    kv_pos = _load_vec(kv_pos_ref, k_tok, k_valid, 0)
    kv_seg = _load_vec(kv_seg_ref, k_tok, k_valid, 0) if g.has_seg else None
    s = _dot_chunks(q, k, trans_b=True) * g.scale_log2                     # [M, bk] base-2 logits
    s = _masked(g, s, -jnp.inf,
                lambda: _allowed(g, q_pos, kv_pos, q_seg, kv_seg, q_valid, k_valid),
                block, kv_pos, q_bounds)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)                      # all-masked rows so far
    p = jnp.exp2(s - m_safe[:, None])
    alpha = jnp.exp2(m_prev - m_safe)
    l_new = l_prev * alpha + jnp.sum(p, axis=1)
    v = _load_rows(v_ref, k_rows, k_valid, g.dv_chunks)
    p_lo = p.astype(v[0].dtype)
    acc = [a * alpha[:, None] + plgpu.dot(p_lo, vc) for a, vc in zip(acc, v)]
    return acc, m_new, l_new

  acc0 = [jnp.zeros((g.rows, w), jnp.float32) for _, w in g.dv_chunks]
  m0 = jnp.full((g.rows,), -jnp.inf, jnp.float32)
  l0 = jnp.zeros((g.rows,), jnp.float32)
  acc, m, l = jax.lax.fori_loop(0, count, body, (acc0, m0, l0))

  seen = l > 0.0
  inv_l = 1.0 / jnp.where(seen, l, 1.0)
  _store_rows(o_ref, q_rows, q_valid, g.dv_chunks, [a * inv_l[:, None] for a in acc])
  lse = jnp.where(seen, m * _LN2 + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
  plgpu.store(lse_ref.at[head, tok], lse, mask=q_valid)


# ----------------------------------------------------------------------------------------------
# dQ


def _dq_kernel(kv_idx_ref, kv_cnt_ref, q_pos_ref, kv_pos_ref, *refs, g: _Geometry):
  if g.has_seg:
    (q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref) = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
  prog, u = pl.program_id(0), pl.program_id(1)
  unit, tile = prog // g.tiles_per_unit, prog % g.tiles_per_unit
  kv_head = (u * g.r) // (g.hq // g.hkv)

  q_rows, tok, head, q_valid = _unit_rows_tile(g, unit, tile, u)
  q = _load_rows(q_ref, q_rows, q_valid, g.dqk_chunks)
  do = _load_rows(do_ref, q_rows, q_valid, g.dv_chunks)
  q_pos = _load_vec(q_pos_ref, tok, q_valid, 0)
  q_seg = _load_vec(q_seg_ref, tok, q_valid, 0) if g.has_seg else None
  lse2 = _lse_base2(plgpu.load(lse_ref.at[head, tok], mask=q_valid, other=-jnp.inf))
  delta = plgpu.load(delta_ref.at[head, tok], mask=q_valid, other=0.0)
  q_bounds = _q_bounds(g, q_pos, q_valid)
  count = kv_cnt_ref[unit]
  entry = _walk(g, prog, count)

  def body(n, dq):
    block = kv_idx_ref[unit, entry(n)]
    k_rows, k_tok, k_valid = _kv_block_rows(g, block, kv_head)
    k = _load_rows(k_ref, k_rows, k_valid, g.dqk_chunks)
    v = _load_rows(v_ref, k_rows, k_valid, g.dv_chunks)
    kv_pos = _load_vec(kv_pos_ref, k_tok, k_valid, 0)
    kv_seg = _load_vec(kv_seg_ref, k_tok, k_valid, 0) if g.has_seg else None
    s = _dot_chunks(q, k, trans_b=True) * g.scale_log2
    p = _masked(g, jnp.exp2(s - lse2[:, None]), 0.0,                       # [M, bk]
                lambda: _allowed(g, q_pos, kv_pos, q_seg, kv_seg, q_valid, k_valid),
                block, kv_pos, q_bounds)
    dp = _dot_chunks(do, v, trans_b=True)
    ds = (p * (dp - delta[:, None])).astype(k[0].dtype)
    return [a + plgpu.dot(ds, kc) for a, kc in zip(dq, k)]

  dq0 = [jnp.zeros((g.rows, w), jnp.float32) for _, w in g.dqk_chunks]
  dq = jax.lax.fori_loop(0, count, body, dq0)
  sm_scale = g.scale_log2 / _LOG2E
  _store_rows(dq_ref, q_rows, q_valid, g.dqk_chunks, [a * sm_scale for a in dq])


def _lse_base2(lse):
  """Natural-log lse to base 2; rows that saw nothing (-inf) become +inf so that exp2(s - lse) = 0."""
  return jnp.where(lse == -jnp.inf, jnp.inf, lse * _LOG2E)


# ----------------------------------------------------------------------------------------------
# dK / dV


def _per_step(g: _Geometry) -> int:
  """Query units per dK/dV step: several small units packed into one tile, else 1."""
  return max(1, g.rows // g.unit_rows)


def _split_act_refs(g: _Geometry, refs):
  """(q_seg, kv_seg, q, k, v, do, lse, delta, rest) from the refs that follow the positions."""
  if g.has_seg:
    return refs[:8] + (refs[8:],)
  return (None, None) + refs[:6] + (refs[6:],)


def _dkv_block(g: _Geometry, acts, block, kv_head, ranges, seed):
  """dK [bk, Dqk] (scaled) and dV [bk, Dv] chunk tiles of one KV block, accumulated over the CSR
  entry ranges that `ranges(visit, carry)` walks (it calls `visit(u, start, end, carry)`); `seed`
  (the program id) staggers where each range's walk starts (`_walk`)."""
  q_idx_ref, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, \
      delta_ref = acts
  k_rows, k_tok, k_valid = _kv_block_rows(g, block, kv_head)
  k = _load_rows(k_ref, k_rows, k_valid, g.dqk_chunks)
  v = _load_rows(v_ref, k_rows, k_valid, g.dv_chunks)
  kv_pos = _load_vec(kv_pos_ref, k_tok, k_valid, 0)
  kv_seg = _load_vec(kv_seg_ref, k_tok, k_valid, 0) if g.has_seg else None

  # A step covers `per_step` query units (several small units packed into one tile) or one row
  # tile of one unit (units larger than a tile).
  per_step = _per_step(g)
  tiles = g.tiles_per_unit if per_step == 1 else 1
  r_local = jnp.arange(g.rows)

  def step(u, n0, end, tile, carry):
    dk, dv = carry
    if per_step == 1:
      slot, local = jnp.zeros_like(r_local), tile * g.rows + r_local
      row_ok = local < g.unit_rows
    else:
      slot, local = r_local // g.unit_rows, r_local % g.unit_rows
      row_ok = slot < per_step
    entry_ok = row_ok & (n0 + slot < end)
    unit = plgpu.load(q_idx_ref.at[u, n0 + slot], mask=entry_ok, other=0)
    tok = unit * g.block_q + local // g.r
    head = u * g.r + local % g.r
    q_valid = entry_ok & (tok < g.tq)
    q_rows = tok * g.hq + head
    q = _load_rows(q_ref, q_rows, q_valid, g.dqk_chunks)
    do = _load_rows(do_ref, q_rows, q_valid, g.dv_chunks)
    q_pos = _load_vec(q_pos_ref, tok, q_valid, 0)
    q_seg = _load_vec(q_seg_ref, tok, q_valid, 0) if g.has_seg else None
    lse2 = _lse_base2(plgpu.load(lse_ref.at[head, tok], mask=q_valid, other=-jnp.inf))
    delta = plgpu.load(delta_ref.at[head, tok], mask=q_valid, other=0.0)
    s_t = _dot_chunks(k, q, trans_b=True) * g.scale_log2                      # [bk, M]
    p_t = _masked(g, jnp.exp2(s_t - lse2[None, :]), 0.0,
                  lambda: _allowed(g, q_pos, kv_pos, q_seg, kv_seg, q_valid, k_valid).T,
                  block, kv_pos, _q_bounds(g, q_pos, q_valid))
    dp_t = _dot_chunks(v, do, trans_b=True)
    ds_t = (p_t * (dp_t - delta[None, :])).astype(q[0].dtype)
    p_lo = p_t.astype(do[0].dtype)
    dv = [a + plgpu.dot(p_lo, dc) for a, dc in zip(dv, do)]
    dk = [a + plgpu.dot(ds_t, qc) for a, qc in zip(dk, q)]
    return dk, dv

  def visit(u, start, end, carry):
    steps = (end - start + per_step - 1) // per_step
    entry = _walk(g, seed, steps)

    def over_entries(s, carry):
      n0 = start + entry(s) * per_step
      if tiles == 1:
        return step(u, n0, end, 0, carry)
      return jax.lax.fori_loop(0, tiles, lambda t, c: step(u, n0, end, t, c), carry)
    return jax.lax.fori_loop(0, steps, over_entries, carry)

  dk0 = [jnp.zeros((g.block_k, w), jnp.float32) for _, w in g.dqk_chunks]
  dv0 = [jnp.zeros((g.block_k, w), jnp.float32) for _, w in g.dv_chunks]
  dk, dv = ranges(visit, (dk0, dv0))
  sm_scale = g.scale_log2 / _LOG2E
  return [a * sm_scale for a in dk], dv, k_rows, k_valid


def _dkv_kernel(q_idx_ref, kv_off_ref, q_pos_ref, kv_pos_ref, *refs, g: _Geometry):
  """One program per KV block: every CSR entry of every head unit of its KV group."""
  *acts, (dk_ref, dv_ref) = _split_act_refs(g, refs)
  block, kv_head = pl.program_id(0), pl.program_id(1)
  units_per_group = g.hl // g.hkv

  def ranges(visit, carry):
    def over_unit(i, carry):
      u = kv_head * units_per_group + i
      return visit(u, kv_off_ref[u, block], kv_off_ref[u, block + 1], carry)
    return jax.lax.fori_loop(0, units_per_group, over_unit, carry)

  dk, dv, k_rows, k_valid = _dkv_block(g, (q_idx_ref, q_pos_ref, kv_pos_ref, *acts), block, kv_head,
                                       ranges, seed=block)
  _store_rows(dk_ref, k_rows, k_valid, g.dqk_chunks, dk)
  _store_rows(dv_ref, k_rows, k_valid, g.dv_chunks, dv)


def _dkv_partial_kernel(table_ref, q_idx_ref, q_pos_ref, kv_pos_ref, *refs, g: _Geometry,
                        num_programs: int):
  """One program per chunk of one CSR list (table row: KV block, head unit, start, end); writes a
  partial dK/dV tile in float32 to row block (kv_head * num_programs + program)."""
  *acts, (dk_part_ref, dv_part_ref) = _split_act_refs(g, refs)
  prog, kv_head = pl.program_id(0), pl.program_id(1)
  block, u = table_ref[0, prog], table_ref[1, prog]
  start, end = table_ref[2, prog], table_ref[3, prog]
  dk, dv, _, _ = _dkv_block(g, (q_idx_ref, q_pos_ref, kv_pos_ref, *acts), block, kv_head,
                            lambda visit, carry: visit(u, start, end, carry), seed=prog)
  rows = (kv_head * num_programs + prog) * g.block_k + jnp.arange(g.block_k)
  every = jnp.ones((g.block_k,), jnp.bool_)
  _store_rows(dk_part_ref, rows, every, g.dqk_chunks, dk)
  _store_rows(dv_part_ref, rows, every, g.dv_chunks, dv)


def _dkv_reduce_kernel(first_ref, dk_part_ref, dv_part_ref, dk_ref, dv_ref, *, g: _Geometry,
                       num_programs: int):
  """dK/dV of one KV block: the sum, in program order, of its partial tiles (deterministic)."""
  block, kv_head = pl.program_id(0), pl.program_id(1)
  every = jnp.ones((g.block_k,), jnp.bool_)

  def add(p, carry):
    rows = (kv_head * num_programs + p) * g.block_k + jnp.arange(g.block_k)
    dk, dv = carry
    dk = [a + t for a, t in zip(dk, _load_rows(dk_part_ref, rows, every, g.dqk_chunks))]
    dv = [a + t for a, t in zip(dv, _load_rows(dv_part_ref, rows, every, g.dv_chunks))]
    return dk, dv

  dk0 = [jnp.zeros((g.block_k, w), jnp.float32) for _, w in g.dqk_chunks]
  dv0 = [jnp.zeros((g.block_k, w), jnp.float32) for _, w in g.dv_chunks]
  dk, dv = jax.lax.fori_loop(first_ref[block], first_ref[block + 1], add, (dk0, dv0))
  k_rows, _, k_valid = _kv_block_rows(g, block, kv_head)
  _store_rows(dk_ref, k_rows, k_valid, g.dqk_chunks, dk)
  _store_rows(dv_ref, k_rows, k_valid, g.dv_chunks, dv)


# ----------------------------------------------------------------------------------------------
# Wrappers: flattened views, block specs, launches


def _geometry(q, k, v, layout, cfg: KernelConfig, sm_scale, causal, has_seg, window=None) -> _Geometry:
  return _Geometry(
      tq=q.shape[1], tk=k.shape[1], hq=q.shape[2], hkv=k.shape[2], hl=layout.kv_indices.shape[1],
      block_q=layout.block_q, block_k=layout.block_k, rows=cfg.rows,
      dqk_chunks=_chunks(q.shape[-1]), dv_chunks=_chunks(v.shape[-1]), causal=bool(causal),
      has_seg=has_seg, scale_log2=float(sm_scale) * _LOG2E,
      skip_full_masks=cfg.skip_full_masks and not has_seg, window=window, stagger=cfg.stagger)


def _pick(n_lead: int, b):
  """Index of a batch-broadcast leading dim: 0 when it has size 1, else the batch index."""
  return b if n_lead > 1 else 0


def _whole(x, batch_axis_of_grid: int):
  """BlockSpec of the whole per-batch slice of x (leading dim squeezed, broadcast when it is 1)."""
  shape = (None,) + tuple(x.shape[1:])
  n = x.shape[0]
  zeros = (0,) * (x.ndim - 1)
  return pl.BlockSpec(shape, lambda *ids: (_pick(n, ids[batch_axis_of_grid]),) + zeros)


def _aux_inputs(q_pos, kv_pos, q_seg, kv_seg):
  aux = [q_pos.astype(jnp.int32), kv_pos.astype(jnp.int32)]
  if q_seg is not None:
    aux += [q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)]
  return aux


def _flat(x):
  """[B, T, H, D] -> [B, T*H, D] (a free reshape)."""
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])


def _compiler_params(cfg: KernelConfig):
  return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _query_major_specs(layout):
  kv_idx, kv_cnt = layout.kv_indices, layout.kv_counts
  n_idx, n_cnt = kv_idx.shape[0], kv_cnt.shape[0]
  return [
      pl.BlockSpec((None, None) + kv_idx.shape[2:], lambda p, u, b: (_pick(n_idx, b), u, 0, 0)),
      pl.BlockSpec((None, None) + kv_cnt.shape[2:], lambda p, u, b: (_pick(n_cnt, b), u, 0)),
  ]


def forward(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg, *, sm_scale, causal, interpret, window=None,
            config: KernelConfig | None = None):
  """out [B, Tq, Hq, Dv] (q's dtype), lse [B, Hq, Tq] float32 (natural log; -inf for empty rows)."""
  cfg = config or default_configs(q, k, v, layout)["fwd"]
  mosaic = _mosaic_config(q, k, v, layout, cfg, q_seg is not None, sm_scale, causal, interpret)
  if mosaic is not None:
    return mosaic_gpu.forward(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg, sm_scale=sm_scale,
                              causal=causal, window=window, config=mosaic)
  b, tq, hq, _ = q.shape
  g = _geometry(q, k, v, layout, cfg, sm_scale, causal, q_seg is not None, window)
  nq = layout.kv_indices.shape[2]
  grid = (nq * g.tiles_per_unit, g.hl, b)
  aux = _aux_inputs(q_pos, kv_pos, q_seg, kv_seg)
  ins = [layout.kv_indices, layout.kv_counts, *aux, _flat(q), _flat(k), _flat(v)]
  specs = _query_major_specs(layout) + [_whole(x, 2) for x in ins[2:]]
  out_shape = [jax.ShapeDtypeStruct((b, tq * hq, v.shape[-1]), q.dtype),
               jax.ShapeDtypeStruct((b, hq, tq), jnp.float32)]
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, g=g), grid=grid, in_specs=specs,
      out_specs=[_whole(o, 2) for o in out_shape], out_shape=out_shape,
      compiler_params=_compiler_params(cfg), interpret=interpret, name="block_sparse_fwd",
  )(*ins)
  return out.reshape(b, tq, hq, v.shape[-1]), lse


def on_hopper() -> bool:
  """Whether the default backend is a CUDA GPU of compute capability 9.x (H100, H200)."""
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def _mosaic_bwd_config(q, k, v, layout, cfgs, has_seg, sm_scale, causal, interpret):
  """The `mosaic_gpu_bwd.BwdConfig` to run this backward with, or None for the Triton kernels
  (both "dq" and "dkv" configs must allow Mosaic)."""
  if not (cfgs["dq"].mosaic and cfgs["dkv"].mosaic) or interpret:
    return None
  if not sm_scale > 0 or not on_hopper():
    return None
  bcfg = dataclasses.replace(mosaic_gpu_bwd.default_config(q, layout, k.shape[2]),
                             stagger=cfgs["dq"].stagger)
  try:
    mosaic_gpu_bwd.check_supported(q, k, v, layout, bcfg, has_seg, causal)
  except ValueError:
    return None
  return bcfg


def _token_dkv_config(q, k, v, layout, cfg, has_seg, sm_scale, causal, interpret, window):
  """The `mosaic_gpu_token_dkv.TokenDkvConfig` to run this backward's dK/dV with (one-token query
  units, NSA's selection), or None for the Triton kernel."""
  if not cfg.mosaic or interpret or not on_hopper():
    return None
  try:   # with its default config
    mosaic_gpu_token_dkv.check_supported(q, k, v, layout, None, has_seg, causal, window, sm_scale)
  except ValueError:
    return None
  return mosaic_gpu_token_dkv.default_config(q, k, layout)


def _mosaic_config(q, k, v, layout, cfg, has_seg, sm_scale, causal, interpret):
  """The `mosaic_gpu.MosaicConfig` to run this forward with, or None for the Triton kernel."""
  if not cfg.mosaic or interpret or not sm_scale > 0 or not on_hopper():
    return None
  mcfg = dataclasses.replace(mosaic_gpu.default_config(q, layout), stagger=cfg.stagger)
  try:
    mosaic_gpu.check_supported(q, k, v, layout, mcfg, has_seg, causal)
  except ValueError:
    return None
  return mcfg


def backward(q, k, v, out, lse, delta, d_out, layout, q_pos, kv_pos, q_seg, kv_seg, *, sm_scale,
             causal, interpret, window=None, configs: dict[str, KernelConfig] | None = None):
  """(dq, dk, dv) in the dtypes of (q, k, v). `delta [B, Hq, Tq]` = rowsum(dO * O) - dlse."""
  cfgs = dict(default_configs(q, k, v, layout), **(configs or {}))
  mosaic = _mosaic_bwd_config(q, k, v, layout, cfgs, q_seg is not None, sm_scale, causal, interpret)
  if mosaic is not None:
    return mosaic_gpu_bwd.backward(q, k, v, out, lse, delta, d_out, layout, q_pos, kv_pos, q_seg,
                                   kv_seg, sm_scale=sm_scale, causal=causal, window=window,
                                   config=mosaic)
  del out  # the probabilities are recomputed from lse; delta already carries rowsum(dO * O)
  b, tq, hq, dqk = q.shape
  has_seg = q_seg is not None
  aux = _aux_inputs(q_pos, kv_pos, q_seg, kv_seg)
  acts = [_flat(q), _flat(k), _flat(v), _flat(d_out.astype(q.dtype)),
          lse.astype(jnp.float32), delta.astype(jnp.float32)]

  g = _geometry(q, k, v, layout, cfgs["dq"], sm_scale, causal, has_seg, window)
  nq = layout.kv_indices.shape[2]
  ins = [layout.kv_indices, layout.kv_counts, *aux, *acts]
  dq_shape = jax.ShapeDtypeStruct((b, tq * hq, dqk), q.dtype)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, g=g), grid=(nq * g.tiles_per_unit, g.hl, b),
      in_specs=_query_major_specs(layout) + [_whole(x, 2) for x in ins[2:]],
      out_specs=_whole(dq_shape, 2), out_shape=dq_shape,
      compiler_params=_compiler_params(cfgs["dq"]), interpret=interpret, name="block_sparse_dq",
  )(*ins)

  token_dkv = _token_dkv_config(q, k, v, layout, cfgs["dkv"], has_seg, sm_scale, causal, interpret,
                                window)
  if token_dkv is not None:   # one-token units on Hopper: Triton dQ, Mosaic dK/dV
    dk, dv = mosaic_gpu_token_dkv.dkv(q, k, v, lse, delta, d_out, layout, q_pos, kv_pos, q_seg,
                                      kv_seg, sm_scale=sm_scale, causal=causal, config=token_dkv)
    return dq.reshape(q.shape), dk, dv

  g = _geometry(q, k, v, layout, cfgs["dkv"], sm_scale, causal, has_seg, window)
  chunk = _list_chunk(g, layout, cfgs["dkv"], b)
  args = (g, layout, aux, acts, b, cfgs["dkv"], interpret, chunk)
  if not chunk:
    dk, dv = _dkv_whole(*args)
  elif runs_split_test(g, layout, cfgs["dkv"], b):
    dk, dv = lax.cond(split.longest_list(layout) > 2 * chunk, lambda: _dkv_split(*args),
                      lambda: _dkv_whole(*args))
  else:
    dk, dv = _dkv_split(*args)
  return (dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape))


def _dkv_whole(g, layout, aux, acts, b, cfg, interpret, chunk):
  """dK/dV with one program per (KV block, KV head, batch)."""
  del chunk
  ins = [layout.q_indices, layout.kv_offsets, *aux, *acts]
  out_shape = _dkv_shapes(g, b, jnp.dtype(acts[1].dtype), jnp.dtype(acts[2].dtype))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, g=g), grid=(layout.num_kv_blocks, g.hkv, b),
      in_specs=[_whole(x, 2) for x in ins], out_specs=[_whole(o, 2) for o in out_shape],
      out_shape=out_shape, compiler_params=_compiler_params(cfg), interpret=interpret,
      name="block_sparse_dkv",
  )(*ins)


def _dkv_shapes(g, b, k_dtype, v_dtype, rows=None):
  rows = g.tk * g.hkv if rows is None else rows
  return [jax.ShapeDtypeStruct((b, rows, sum(w for _, w in g.dqk_chunks)), k_dtype),
          jax.ShapeDtypeStruct((b, rows, sum(w for _, w in g.dv_chunks)), v_dtype)]


def _list_chunk(g: _Geometry, layout, cfg: KernelConfig, batch: int) -> int:
  """CSR entries per dK/dV program (0: one program per KV block); see KernelConfig.list_chunk.

  Split when one KV block's list can be much longer than the mean (NSA's always-selected block 0),
  or when one program per (KV block, KV head, batch) is too few to fill the GPU (NSA's compression
  attention at 64k: 64 blocks x 4 heads; its backward 89.6 ms whole, 62.5 split, on an H200)."""
  if cfg.list_chunk is not None:
    return int(cfg.list_chunk)
  nq, cap = layout.kv_indices.shape[2:]
  chunk = _long_list_chunk(g, layout)
  if nq > 2 * chunk:
    return chunk
  if layout.num_kv_blocks * g.hkv * batch < _DKV_MIN_PROGRAMS:
    per = _per_step(g)
    entries = nq * cap * layout.kv_indices.shape[1] * batch  # bound on the list entries of all heads
    chunk = per * max(_DKV_MIN_CHUNK_STEPS, -(-entries // (_DKV_SPLIT_PROGRAMS * per)))
    return chunk if nq > chunk else 0
  return 0


def _long_list_chunk(g: _Geometry, layout) -> int:
  """The chunk of the long-list test: twice the mean list entries, in whole steps."""
  nq, cap = layout.kv_indices.shape[2:]
  per = _per_step(g)
  mean = -(-nq * cap // layout.num_kv_blocks)
  return per * -(-2 * mean // per)


def runs_split_test(g: _Geometry, layout, cfg: KernelConfig, batch: int) -> bool:
  """Whether `backward` picks between the split and the whole lists on the device: the config asks
  for it (`split_at_run_time`, `list_chunk` None), `_list_chunk` splits for the lists' possible
  length, and whole lists would give enough programs."""
  if not cfg.split_at_run_time or cfg.list_chunk is not None:
    return False
  return (layout.kv_indices.shape[2] > 2 * _long_list_chunk(g, layout)
          and layout.num_kv_blocks * g.hkv * batch >= _DKV_MIN_PROGRAMS)


def _dkv_split(g, layout, aux, acts, b, cfg, interpret, chunk):
  """dK/dV with long CSR lists split into chunks: partial tiles, then an ordered sum per block."""
  nk = layout.num_kv_blocks
  num_programs = split.num_programs(layout, g.hkv, chunk)
  table, first = split.chunk_table(layout, g.hkv, chunk, num_programs)
  n_t = table.shape[0]
  ins = [table, layout.q_indices, *aux, *acts]
  specs = [pl.BlockSpec((None, None, 4, num_programs), lambda p, h, b_: (_pick(n_t, b_), h, 0, 0))]
  specs += [_whole(x, 2) for x in ins[1:]]
  part_shape = _dkv_shapes(g, b, jnp.float32, jnp.float32, rows=g.hkv * num_programs * g.block_k)
  dk_part, dv_part = pl.pallas_call(
      functools.partial(_dkv_partial_kernel, g=g, num_programs=num_programs),
      grid=(num_programs, g.hkv, b), in_specs=specs, out_specs=[_whole(o, 2) for o in part_shape],
      out_shape=part_shape, compiler_params=_compiler_params(cfg), interpret=interpret,
      name="block_sparse_dkv_partial",
  )(*ins)
  out_shape = _dkv_shapes(g, b, jnp.dtype(acts[1].dtype), jnp.dtype(acts[2].dtype))
  return pl.pallas_call(
      functools.partial(_dkv_reduce_kernel, g=g, num_programs=num_programs),
      grid=(nk, g.hkv, b),
      in_specs=[pl.BlockSpec((None, None, nk + 1), lambda j, h, b_: (_pick(n_t, b_), h, 0)),
                _whole(dk_part, 2), _whole(dv_part, 2)],
      out_specs=[_whole(o, 2) for o in out_shape], out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
      name="block_sparse_dkv_reduce",
  )(first, dk_part, dv_part)
