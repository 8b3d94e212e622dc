"""NSA's selection importance (arXiv 2502.11089, Eq. 8-10) as one Pallas GPU kernel (Triton lowering).

    p_slc[b, k, t, j] = Σ_i W[i, j] · Σ_{h in group k} exp(q[t, h] · k̃[i, k] · scale − lse[h, t]) · vis(t, i)

The G query heads of KV group k share one score per (token t, selection block j): the compression
probabilities p_cmp = exp(s − lse) (lse: the compression branch's log-sum-exp, so no second reduction)
summed over the group, mapped to blocks of l' tokens by Eq. 9. W is Eq. 9's overlap matrix in 0-based
indices: block j holds compressed token i = r(j+1) − 1 − k with weight c_k = #{(m, n): m + n = k,
0 ≤ m < r, 0 ≤ n < s} = min(k+1, r, s, r+s−1−k) for k = 0 .. r+s−2, where r = l'/d and s = l/d
(`sparsejax.attention.compressed.block_importance` is the XLA form). Compressed token i (keys of
positions [i·d, i·d+l−1]) is visible to query t iff i·d + l − 1 ≤ pos(t), its segment id equals the
query's, and the query's lse is finite. The [T, N] probabilities never reach HBM: the kernel writes only
p_slc [B, K, T, S] float32 (S = ⌈T_row / l'⌉), which is G·(N/S) = 16·4 = 64 times fewer floats at the
paper's sizes.

Kernel. One program per (query tile, KV head, batch). Its rows are `tokens` consecutive queries times
the G heads of the group, stacked token-major (8 tokens × 16 heads = 128 rows), gathered from the
flattened view q [B, T·H, D] (the G heads of a group are adjacent: no transpose). It walks the
selection blocks in tiles of `nbt` blocks, only up to the block of the last compressed token its
latest query can see (causal: the upper half of the [T, N] square is never computed), and for each tile
    s  = q · k̃ᵀ                       [rows, bn]   one tensor-core dot over `bn` compressed tokens
    p  = exp2(s·scale·log2e − lse2)    masked       (causal, segments, k̃ index range, finite lse)
    x  = p · W                         [rows, nbt]  Eq. 9 as a dot with a constant band matrix
    y  = E · x                         [tokens, nbt] the sum over the G rows of each token, E 0/1
and stores y: every block's sum is complete inside one step, so each output element is written
exactly once (no accumulation in HBM, deterministic). Tiles after the last visible one get zeros.
Rows whose lse is −inf get lse2 = +inf, so exp2 gives 0 without a mask; a step whose tokens all exist,
precede every row's position and share the rows' one document skips the element-wise mask (most steps
of a long sequence). Programs run the latest query tiles first (the most steps), the K heads of a
tile side by side. A call may cover only rows [q_start, q_start + q_count) of q (q_start may be
traced), so that the caller's chunk loop bounds the output without copying q.

Tile edges. Block j needs the compressed tokens r·j − (s−1) .. r·j + r − 1: s − 1 tokens of look-back
into the previous block. A step over blocks [J, J + nbt) therefore loads the bn tokens starting at
r·J − (s − 1) and uses r·nbt + s − 1 of them (nbt = ⌊(bn − s + 1)/r⌋): consecutive steps overlap by
s − 1 tokens, which are recomputed (at the paper's r = 4, s = 2 and bn = 64: 15 blocks per step, 60
new tokens of 64). With this the band matrix W[u, c] = c_{r·c + r + s − 2 − u} is the same for every
step, and any r works (no power-of-two or alignment condition on l'/d).

Fused top-n (`importance_topn`, what `select_blocks` uses for n <= 32). The same tile walk, but each
step's block scores stay in registers: masked as `compressed.block_scores` does (+inf for the first
`num_initial` blocks of the token's document and the `num_local` blocks ending at its own block, −inf
outside [document's first block, own block]) and merged into a running top-n per token ([tokens, n]
scores and block indices, unsorted). Steps run in ascending block order, so every new block has a
higher index than the running ones and `top_blocks`' tie rule (equal scores: lower index) becomes
"enter only if strictly above the running n-th score". A merge round takes, in every row at once, the
row's best new block (lowest index among equals) and replaces its worst running entry (lowest score,
then highest index) while the new block beats it; the rounds stop as soon as no row has an entrant, so
a step costs the test (two row reductions) plus one round per entering block of its busiest token,
instead of a sort. Steps start at the block of the earliest document start among the tile's tokens and
end at the latest token's own block (the blocks past the last visible compressed token score 0 but can
be forced or fill a short document's n). At the end the n indices are sorted ascending (n rounds of
min) and written with the counts: [B, K, T, n] + [B, K, T] int32 instead of p_slc [B, K, T, S] float32.
`topn_of_scores` runs the same merge over block scores already in HBM, in the step-padded layout that
the Mosaic GPU scores kernel writes (`nsa_importance_mosaic`, what `select_blocks` uses on Hopper).

Precision. The logits dot runs in the inputs' dtype with float32 accumulation (tf32 for float32
inputs, as in `block_sparse.pallas_gpu`). The two small dots that map and sum the probabilities take
float32 operands against W and E, small integers exact in 16-bit floats. With `precise=True` (the
default) the float32 operand is split into bfloat16 high and low parts (x = hi + lo, both dots
summed): ≈ 2⁻¹⁶ relative error instead of bfloat16's 2⁻⁸, so the scores that `top_k` compares keep
float32-like resolution. `precise=False` takes one float16 dot instead (2⁻¹¹ relative; p ≤ 1 and the
sums fit float16's range): half the conversions, for the timing A/B in benchmarks/nsa.py.

Why a module of `pallas_kernels`: it is pure JAX + Pallas like the block-sparse kernels, shares their
row-gather helpers, and is tested and lowered for CUDA the same way; its semantics are NSA's, and
`sparsejax.attention.compressed.select_blocks(implementation="pallas_gpu")` is its caller.

Shapes: B batch, Tq query rows of this call, H = K·G query heads, K KV heads, D head dim, N
compressed tokens, S selection blocks of the row.
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

from pallas_kernels.block_sparse.pallas_gpu import _chunks, _dot_chunks, _flat, _load_rows, _whole

_LOG2E = math.log2(math.e)
_MIN_DOT = 16                     # smallest M, N, K of a tensor-core dot
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MAX_HEAD_DIM = 256
_SMEM_BUDGET = 200 * 1024         # bytes a program may plan for (H100/H200 allow 227 KB)
MAX_SELECTED = 32                 # largest n of the fused top-n (its running set is a [tokens, n] tile)


@dataclasses.dataclass(frozen=True)
class ImportanceConfig:
  """Launch parameters.

  rows: target rows per program (tokens × G heads), a power of two >= 16; a program takes
    max(1, rows // G) tokens.
  block_n: compressed tokens per step (a power of two >= 16); a step covers
    ⌊(block_n − s + 1) / r⌋ >= 1 selection blocks.
  num_warps, num_stages: Triton's warps per program and software-pipelining depth.
  precise: map and sum the probabilities with bfloat16 hi + lo dots (≈ 2⁻¹⁶); False: one float16 dot.
  """
  rows: int = 128
  block_n: int = 64
  num_warps: int = 4
  num_stages: int = 3
  precise: bool = True

  def __post_init__(self):
    for name in ("rows", "block_n"):
      v = getattr(self, name)
      if v < _MIN_DOT or v & (v - 1):
        raise ValueError(f"ImportanceConfig.{name}={v}: must be a power of two >= {_MIN_DOT}")


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Static sizes of one launch."""
  tq: int            # query rows of this call (the output's T)
  t_total: int       # rows of q / lse / positions (the call reads rows q_start .. q_start + tq)
  hq: int
  hkv: int
  n: int             # compressed tokens
  num_blocks: int    # S
  block: int         # l
  stride: int        # d
  r: int             # l' / d
  s: int             # l / d
  tokens: int        # queries per program
  rows: int          # tile rows: next_pow2(tokens * G), >= 16
  tok_rows: int      # rows of the per-token result: next_pow2(tokens), >= 16
  block_n: int       # bn
  nbt: int           # blocks per step
  cols: int          # next_pow2(nbt), >= 16
  d_chunks: tuple
  scale_log2: float
  precise: bool

  @property
  def small(self):  # dtype of the mapping dots' operands
    return jnp.bfloat16 if self.precise else jnp.float16

  @property
  def group(self):
    return self.hq // self.hkv

  @property
  def programs(self):  # query tiles
    return -(-self.tq // self.tokens)


def _geometry(q, k_cmp, tq, num_blocks, *, block, stride, select_block, sm_scale, cfg) -> _Geometry:
  hq, hkv = q.shape[2], k_cmp.shape[2]
  g = hq // hkv
  tokens = max(1, cfg.rows // g)
  r, s = select_block // stride, block // stride
  nbt = (cfg.block_n - s + 1) // r
  return _Geometry(
      tq=tq, t_total=q.shape[1], hq=hq, hkv=hkv, n=k_cmp.shape[1], num_blocks=num_blocks, block=block,
      stride=stride, r=r, s=s, tokens=tokens, rows=max(_MIN_DOT, _next_pow2(tokens * g)),
      tok_rows=max(_MIN_DOT, _next_pow2(tokens)), block_n=cfg.block_n, nbt=nbt,
      cols=max(_MIN_DOT, _next_pow2(nbt)), d_chunks=_chunks(q.shape[-1]),
      scale_log2=float(sm_scale) * _LOG2E, precise=cfg.precise)


def default_config(q, k_cmp, *, block: int, stride: int, select_block: int) -> ImportanceConfig:
  """128 rows (8 tokens × 16 heads at G = 16); 64 compressed tokens per step unless fewer than 7/8
  of them would be new blocks' tokens (large l'/d), then 128; 4 warps (measured on an H200 at
  T = 65,536, G = 16, D = 128, unfused kernel: 4 warps 17.5 ms, 8 warps 24.9 ms; benchmarks/RESULTS.md,
  NSA); pipelining depth inside shared memory."""
  r, s = select_block // stride, block // stride
  block_n = 64 if ((64 - s + 1) // r) * r >= 56 else 128
  rows = max(128, _next_pow2(q.shape[2] // k_cmp.shape[2]))
  size = jnp.dtype(q.dtype).itemsize
  d = q.shape[-1]
  room = _SMEM_BUDGET - rows * d * size
  stages = max(1, min(3, room // (block_n * d * size)))
  return ImportanceConfig(rows=rows, block_n=block_n, num_warps=4, num_stages=stages)


def check_supported(q, k_cmp, lse, q_positions, q_segment_ids, kv_segment_ids, *, block: int, stride: int,
                    select_block: int, num_blocks: int, config: ImportanceConfig | None = None) -> None:
  """Raise ValueError naming the bad value and the valid choices."""
  if q.ndim != 4 or k_cmp.ndim != 4:
    raise ValueError(f"nsa_importance needs q [B, T, H, D] and k_cmp [B, N, K, D]; got q {q.shape}, "
                     f"k_cmp {k_cmp.shape}")
  b, t, hq, d = q.shape
  hkv = k_cmp.shape[2]
  if k_cmp.shape[0] != b or k_cmp.shape[3] != d:
    raise ValueError(f"nsa_importance: k_cmp {k_cmp.shape} must have q's batch {b} and head dim {d}")
  if hkv < 1 or hq % hkv:
    raise ValueError(f"nsa_importance needs H = G · K query heads; got H={hq}, K={hkv}; valid K: "
                     f"{[x for x in range(1, hq + 1) if hq % x == 0]}")
  if jnp.dtype(q.dtype) != jnp.dtype(k_cmp.dtype) or jnp.dtype(q.dtype) not in [jnp.dtype(x) for x in
                                                                                 _SUPPORTED_DTYPES]:
    raise ValueError(f"nsa_importance needs q and k_cmp of one dtype among float32, bfloat16, float16; got "
                     f"q {q.dtype}, k_cmp {k_cmp.dtype}")
  if d % 16 or not 16 <= d <= _MAX_HEAD_DIM:
    raise ValueError(f"nsa_importance needs a head dim that is a multiple of 16 in [16, {_MAX_HEAD_DIM}]; "
                     f"got D={d}")
  for name, x, shape in (("lse", lse, (b, hq, t)), ("q_positions", q_positions, (b, t)),
                         ("q_segment_ids", q_segment_ids, (b, t)),
                         ("kv_segment_ids", kv_segment_ids, (b, k_cmp.shape[1]))):
    if tuple(x.shape) != shape:
      raise ValueError(f"nsa_importance: {name} has shape {tuple(x.shape)}; expected {shape}")
  if jnp.dtype(lse.dtype) != jnp.float32:
    raise ValueError(f"nsa_importance needs lse in float32; got {lse.dtype}")
  for name, x in (("q_positions", q_positions), ("q_segment_ids", q_segment_ids),
                  ("kv_segment_ids", kv_segment_ids)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"nsa_importance: {name} must be integers (int32); got {x.dtype}")
  for name, v in (("block", block), ("stride", stride), ("select_block", select_block),
                  ("num_blocks", num_blocks)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"nsa_importance: {name}={v!r} must be a positive int")
  if block % stride:
    raise ValueError(f"nsa_importance: stride d={stride} must divide block l={block}; valid d: "
                     f"{[x for x in range(1, block + 1) if block % x == 0]}")
  if select_block % stride:
    raise ValueError(f"nsa_importance: stride d={stride} must divide select_block l'={select_block}; valid d: "
                     f"{[x for x in range(1, block + 1) if block % x == 0 and select_block % x == 0]}")
  if block > select_block:
    raise ValueError(f"nsa_importance: block l={block} must be <= select_block l'={select_block} (Eq. 9)")
  cfg = config or default_config(q, k_cmp, block=block, stride=stride, select_block=select_block)
  r, s = select_block // stride, block // stride
  if (cfg.block_n - s + 1) // r < 1:
    raise ValueError(f"nsa_importance: block_n={cfg.block_n} compressed tokens per step cannot hold one "
                     f"selection block (l'/d + l/d − 1 = {r + s - 1} tokens); use block_n >= "
                     f"{_next_pow2(r + s - 1)}")


def check_selection(doc_starts, shape, *, num_selected: int, num_initial: int, num_local: int) -> None:
  """Raise ValueError for the fused top-n's own arguments (doc_starts [B, T] integers, n, forced counts)."""
  if tuple(doc_starts.shape) != tuple(shape) or not jnp.issubdtype(doc_starts.dtype, jnp.integer):
    raise ValueError(f"nsa_importance: doc_starts must be integers of shape {tuple(shape)}; got "
                     f"{doc_starts.dtype} {tuple(doc_starts.shape)}")
  if not 1 <= num_selected <= MAX_SELECTED:
    raise ValueError(f"nsa_importance: num_selected={num_selected}; the fused top-n takes 1 .. {MAX_SELECTED}")
  for name, v in (("num_initial", num_initial), ("num_local", num_local)):
    if v < 0:
      raise ValueError(f"nsa_importance: {name}={v} must be >= 0")


# ----------------------------------------------------------------------------------------------
# Kernel


def split_bfloat16(x):
  """float32 x as bfloat16 (hi, lo), x ≈ hi + lo to ≈ 2⁻¹⁶ relative: hi is x's upper 16 bits (a shift,
  where a rounding conversion costs a slow F2FP instruction per pair: the Mosaic scores kernel went from
  12.8 to 10.6 ms at T = 65,536 on an H200), lo the rounded rest x − hi (exact in float32, < 2⁻⁷·|x|)."""
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  hi = lax.bitcast_convert_type((bits >> 16).astype(jnp.uint16), jnp.bfloat16)
  rest = x - lax.bitcast_convert_type(bits & jnp.uint32(0xFFFF0000), jnp.float32)
  return hi, rest.astype(jnp.bfloat16)


def _small_dot(a, b, g: "_Geometry", *, float_left=True):
  """a @ b where one operand is float32 (a if float_left, else b) and the other a matrix of small
  integers in `g.small` (exact): precise: the float32 one split into bfloat16 hi + lo, both dots
  summed; else one float16 dot."""
  x = a if float_left else b
  parts = split_bfloat16(x) if g.precise else [x.astype(g.small)]
  out = None
  for part in parts:
    d = plgpu.dot(part, b) if float_left else plgpu.dot(a, part)
    out = d if out is None else out + d
  return out


def _eq9_band(g: _Geometry):
  """W [bn, cols] in g.small: weight of the step's u-th loaded token in its c-th block (0 for c >= nbt)."""
  u = jnp.arange(g.block_n)[:, None]
  c = jnp.arange(g.cols)[None, :]
  k = g.r * c + (g.r + g.s - 2) - u
  w = jnp.minimum(jnp.minimum(k + 1, g.s), jnp.minimum(g.r, g.r + g.s - 1 - k))
  ok = (k >= 0) & (k <= g.r + g.s - 2) & (c < g.nbt)
  return jnp.where(ok, w.astype(jnp.float32), 0.0).astype(g.small)   # via float32: no int -> 16-bit cast


def _group_sum(g: _Geometry):
  """E [tok_rows, rows] in g.small: E[a, ρ] = 1 iff row ρ belongs to the program's a-th token."""
  a = jnp.arange(g.tok_rows)[:, None]
  rho = jnp.arange(g.rows)[None, :]
  return jnp.where((rho // g.group == a) & (rho < g.tokens * g.group), 1.0, 0.0).astype(g.small)


def _tile(start_ref, q_pos_ref, q_seg_ref, kv_seg_ref, lse_ref, q_ref, k_ref, g: _Geometry):
  """The program's query tile: (prog, kv_head, steps, scores) where scores(j) is p_slc [tok_rows, cols]
  of blocks j·nbt + c for its tokens, and steps the number of steps holding a visible compressed token."""
  # Programs run latest query tile first (they have the most steps), the K heads of a tile together.
  kv_head = pl.program_id(0) % g.hkv
  prog = g.programs - 1 - pl.program_id(0) // g.hkv

  # rows: token-major, head-minor
  rho = jnp.arange(g.rows)
  local = prog * g.tokens + rho // g.group
  tok = start_ref[0] + local
  head = kv_head * g.group + rho % g.group
  row_valid = (rho < g.tokens * g.group) & (local < g.tq) & (tok < g.t_total)
  q = _load_rows(q_ref, tok * g.hq + head, row_valid, g.d_chunks)
  q_pos = plgpu.load(q_pos_ref.at[tok], mask=row_valid, other=0)
  q_seg = plgpu.load(q_seg_ref.at[tok], mask=row_valid, other=0)
  lse = plgpu.load(lse_ref.at[head, tok], mask=row_valid, other=-jnp.inf)
  row_ok = row_valid & (lse > -jnp.inf)
  lse2 = jnp.where(row_ok, lse * _LOG2E, jnp.inf)            # +inf: exp2(s - lse2) = 0 on its own

  # steps: blocks up to that of the last compressed token the latest query sees
  big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
  latest = jnp.max(jnp.where(row_ok, q_pos, -1))
  earliest = jnp.min(jnp.where(row_ok, q_pos, big))
  seg_lo = jnp.min(jnp.where(row_ok, q_seg, big))
  one_segment = seg_lo == jnp.max(jnp.where(row_ok, q_seg, small))
  seen = jnp.where(latest >= g.block - 1, jnp.minimum((latest - (g.block - 1)) // g.stride + 1, g.n), 0)
  last_block = (seen + g.s - 2) // g.r                        # last block that token seen-1 overlaps
  steps = jnp.where(seen > 0, last_block // g.nbt + 1, 0)

  band = _eq9_band(g)
  group_sum = _group_sum(g) if g.group > 1 else None

  def scores(j):
    first = j * (g.r * g.nbt) - (g.s - 1)                      # compressed tokens first .. first + bn - 1
    i = first + jnp.arange(g.block_n)
    k_valid = (i >= 0) & (i < g.n)
    i = jnp.where(k_valid, i, 0)
    k = _load_rows(k_ref, i * g.hkv + kv_head, k_valid, g.d_chunks)
    kv_seg = plgpu.load(kv_seg_ref.at[i], mask=k_valid, other=0)
    kv_pos = i * g.stride + (g.block - 1)
    s = _dot_chunks(q, k, trans_b=True) * g.scale_log2                     # [rows, bn]
    e = jnp.exp2(s - lse2[:, None])
    # A step whose tokens all exist, all precede every row and share the rows' one document needs no
    # element-wise mask (most steps of a long sequence).
    full = ((first >= 0) & (first + g.block_n <= g.n) & one_segment
            & ((first + g.block_n - 1) * g.stride + (g.block - 1) <= earliest)
            & (jnp.min(kv_seg) == seg_lo) & (jnp.max(kv_seg) == seg_lo))
    p = jax.lax.cond(full, lambda e: e, lambda e: jnp.where(
        k_valid[None, :] & (kv_pos[None, :] <= q_pos[:, None]) & (kv_seg[None, :] == q_seg[:, None]), e, 0.0), e)
    x = _small_dot(p, band, g)                                             # [rows, cols]
    return x if group_sum is None else _small_dot(group_sum, x, g, float_left=False)  # [tok_rows, cols]

  return prog, kv_head, steps, scores


def _out_rows(prog, kv_head, g: _Geometry):
  """The program's tokens as output rows: (local index [tok_rows], valid [tok_rows], row of [K·Tq])."""
  out_local = prog * g.tokens + jnp.arange(g.tok_rows)
  out_valid = (jnp.arange(g.tok_rows) < g.tokens) & (out_local < g.tq)
  return out_local, out_valid, kv_head * g.tq + out_local


def _kernel(start_ref, q_pos_ref, q_seg_ref, kv_seg_ref, lse_ref, q_ref, k_ref, o_ref, *, g: _Geometry):
  prog, kv_head, steps, scores = _tile(start_ref, q_pos_ref, q_seg_ref, kv_seg_ref, lse_ref, q_ref, k_ref, g)
  _, out_valid, out_rows = _out_rows(prog, kv_head, g)
  c = jnp.arange(g.cols)

  def store(j, y):
    blocks = j * g.nbt + c
    ok = out_valid[:, None] & ((c < g.nbt) & (blocks < g.num_blocks))[None, :]
    plgpu.store(o_ref.at[out_rows[:, None], blocks[None, :]], y, mask=ok)

  def step(j, carry):
    store(j, scores(j))
    return carry

  def zero(j, carry):
    store(j, jnp.zeros((g.tok_rows, g.cols), jnp.float32))
    return carry

  jax.lax.fori_loop(0, steps, step, 0)
  jax.lax.fori_loop(steps, -(-g.num_blocks // g.nbt), zero, 0)


@dataclasses.dataclass(frozen=True)
class _Selection:
  """Static parameters of the fused top-n."""
  n: int             # blocks kept per token: min(num_selected, S)
  width: int         # columns of the running set: next_pow2(n), >= 16 (columns >= n are never used)
  select_block: int  # l'
  num_initial: int
  num_local: int


def selection_scores(y, blocks, own, first, *, num_initial: int, num_local: int):
  """`compressed.block_scores` on a tile: y [R, C] p_slc of blocks [1, C] for tokens whose own block is
  own [R, 1] and whose document starts in block first [R, 1]: +inf for the first `num_initial` blocks of
  the document and the `num_local` blocks ending at the own block, −inf outside [first, own]."""
  valid = (blocks >= first) & (blocks <= own)
  forced = valid & ((blocks < first + num_initial) | (blocks > own - num_local))
  return jnp.where(forced, jnp.inf, jnp.where(valid, y, -jnp.inf))


def _insert(y, to_block, vals, idx, thr, sel: _Selection):
  """Merge one step's blocks into each row's running top-n, exactly as `top_blocks` orders them (score
  descending, ties to the lower block index).

  y [R, C] masked scores of blocks to_block(c) (increasing in c, every one above the running blocks'
  indices; to_block maps a column index [R, 1] to its block index); vals, idx
  [R, width] the running set, unsorted (empty slots: −inf with index S + slot; columns >= n: +inf, never
  the worst); thr [R] its worst score. While some row's best new block beats its worst entry (strictly:
  on a tie the running block has the lower index, and a new block tied with one taken before it from
  the same step has a higher index), that block replaces the worst entry (lowest score, then highest
  index). Each round takes one block per row, so a step costs one round per entering block of its
  busiest row (none once a row's n-th score is high), plus the test. Returns (vals, idx, thr)."""
  c = jnp.arange(y.shape[1])[None, :]
  best = jnp.max(y, axis=1)

  def go(state):
    return jnp.max((state[4] > state[3]).astype(jnp.int32)) > 0

  def round_(state):
    y, vals, idx, thr, best = state
    enter = (best > thr)[:, None]
    worst = jnp.max(jnp.where(vals == thr[:, None], idx, -1), axis=1)
    pick = jnp.min(jnp.where(y == best[:, None], c, y.shape[1]), axis=1)[:, None]
    slot = enter & (idx == worst[:, None])
    vals = jnp.where(slot, best[:, None], vals)
    idx = jnp.where(slot, to_block(pick), idx)
    y = jnp.where(enter & (c == pick), -jnp.inf, y)
    return y, vals, idx, jnp.min(vals, axis=1), jnp.max(y, axis=1)

  _, vals, idx, thr, _ = jax.lax.while_loop(go, round_, (y, vals, idx, thr, best))
  return vals, idx, thr


def _topn_start(tok_rows: int, num_blocks: int, sel: _Selection):
  """The empty running set of `_insert`: (vals, idx, thr) for tok_rows rows."""
  slot = jnp.arange(sel.width)[None, :]
  vals = jnp.broadcast_to(jnp.where(slot < sel.n, -jnp.inf, jnp.inf), (tok_rows, sel.width))
  idx = jnp.broadcast_to(jnp.where(slot < sel.n, num_blocks + slot, -1), (tok_rows, sel.width))
  return vals, idx, jnp.full((tok_rows,), -jnp.inf, jnp.float32)


def _topn_store(vals, idx, out_rows, out_valid, idx_ref, cnt_ref, num_blocks: int, sel: _Selection):
  """Write the running set: its taken blocks ascending (distinct indices: n rounds of min), S past the
  count, to idx_ref rows out_rows [:, n]; the counts to cnt_ref."""
  slot = jnp.arange(sel.width)[None, :]
  taken = (slot < sel.n) & (vals > -jnp.inf)
  keys = jnp.where(taken, idx, num_blocks)
  out = jnp.full(vals.shape, num_blocks, jnp.int32)
  for r in range(sel.n):
    low = jnp.min(keys, axis=1)
    out = jnp.where(slot == r, low[:, None], out)
    keys = jnp.where(keys == low[:, None], num_blocks, keys)
  plgpu.store(idx_ref.at[out_rows[:, None], slot], out, mask=out_valid[:, None] & (slot < sel.n))
  plgpu.store(cnt_ref.at[out_rows], jnp.sum(taken.astype(jnp.int32), axis=1), mask=out_valid)


def _topn_kernel(start_ref, q_pos_ref, q_seg_ref, kv_seg_ref, lse_ref, q_ref, k_ref, doc_ref, idx_ref, cnt_ref, *,
                 g: _Geometry, sel: _Selection):
  prog, kv_head, steps, scores = _tile(start_ref, q_pos_ref, q_seg_ref, kv_seg_ref, lse_ref, q_ref, k_ref, g)
  out_local, out_valid, out_rows = _out_rows(prog, kv_head, g)
  tok = start_ref[0] + out_local
  pos = plgpu.load(q_pos_ref.at[tok], mask=out_valid, other=0)
  doc = plgpu.load(doc_ref.at[tok], mask=out_valid, other=0)
  own = jnp.where(out_valid, pos // sel.select_block, -1)                 # [tok_rows]
  first = jnp.where(out_valid, doc // sel.select_block, g.num_blocks)
  first_step = jnp.min(first) // g.nbt                                   # blocks before every document: none
  end_step = jnp.max(own) // g.nbt + 1                                   # through the latest own block

  c = jnp.arange(g.cols)

  def merge(j, y, carry):
    blocks = j * g.nbt + c
    y = selection_scores(y, blocks[None, :], own[:, None], first[:, None], num_initial=sel.num_initial,
                         num_local=sel.num_local)
    y = jnp.where((c < g.nbt)[None, :], y, -jnp.inf)                     # columns past the step's blocks
    return _insert(y, lambda pick: j * g.nbt + pick, *carry, sel)

  # steps with visible compressed tokens, then the valid blocks that none reaches (score 0)
  carry = jax.lax.fori_loop(first_step, steps, lambda j, carry: merge(j, scores(j), carry),
                            _topn_start(g.tok_rows, g.num_blocks, sel))
  zeros = jnp.zeros((g.tok_rows, g.cols), jnp.float32)
  vals, idx, _ = jax.lax.fori_loop(jnp.maximum(first_step, steps), end_step,
                                   lambda j, carry: merge(j, zeros, carry), carry)
  _topn_store(vals, idx, out_rows, out_valid, idx_ref, cnt_ref, g.num_blocks, sel)


@dataclasses.dataclass(frozen=True)
class _ScoresGeometry:
  """Static sizes of `topn_of_scores`: scores [B, K·T, steps·width], steps of nbt blocks."""
  t: int
  hkv: int
  tokens: int        # rows (tokens) per program, a power of two
  nbt: int           # blocks per step
  width: int         # columns of a step's slot (>= nbt; columns >= nbt are not read)
  steps: int
  span: int          # steps merged per round of `_insert`
  num_blocks: int    # S

  @property
  def programs(self):
    return -(-self.t // self.tokens)


def _topn_scores_kernel(pos_ref, doc_ref, s_ref, idx_ref, cnt_ref, *, g: _ScoresGeometry, sel: _Selection):
  kv_head = pl.program_id(0) % g.hkv
  prog = g.programs - 1 - pl.program_id(0) // g.hkv                    # latest tokens first: most steps
  local = prog * g.tokens + jnp.arange(g.tokens)
  valid = local < g.t
  rows = kv_head * g.t + local
  pos = plgpu.load(pos_ref.at[local], mask=valid, other=0)
  doc = plgpu.load(doc_ref.at[local], mask=valid, other=0)
  own = jnp.where(valid, pos // sel.select_block, -1)
  first = jnp.where(valid, doc // sel.select_block, g.num_blocks)
  first_step = jnp.min(first) // g.nbt
  end_step = jnp.max(own) // g.nbt + 1
  c = jnp.arange(g.span * g.width)
  step_of, col = c // g.width, c % g.width

  def merge(i, carry):
    j0 = first_step + i * g.span
    ok = (col < g.nbt) & (j0 + step_of < g.steps)
    y = plgpu.load(s_ref.at[rows[:, None], (j0 * g.width + c)[None, :]], mask=valid[:, None] & ok[None, :],
                   other=-jnp.inf)
    blocks = (j0 + step_of) * g.nbt + col
    y = selection_scores(y, blocks[None, :], own[:, None], first[:, None], num_initial=sel.num_initial,
                         num_local=sel.num_local)
    y = jnp.where(ok[None, :], y, -jnp.inf)
    return _insert(y, lambda pick: (j0 + pick // g.width) * g.nbt + pick % g.width, *carry, sel)

  rounds = (jnp.maximum(end_step - first_step, 0) + g.span - 1) // g.span
  vals, idx, _ = jax.lax.fori_loop(0, rounds, merge, _topn_start(g.tokens, g.num_blocks, sel))
  _topn_store(vals, idx, rows, valid, idx_ref, cnt_ref, g.num_blocks, sel)


# ----------------------------------------------------------------------------------------------
# Wrapper


def importance_scores(q, k_cmp, lse, q_positions, q_segment_ids, kv_segment_ids, *, block: int, stride: int,
                      select_block: int, num_blocks: int, sm_scale: float | None = None, q_start=0,
                      q_count: int | None = None, interpret: bool = False,
                      config: ImportanceConfig | None = None) -> jax.Array:
  """Eq. 9 block importance of query rows [q_start, q_start + q_count) of q.

  q [B, T, H, D] (rotated), k_cmp [B, N, K, D] (rotated, same dtype; N may be 0), lse [B, H, T] float32
  (the compression branch's natural-log lse; −inf: the row sees nothing), q_positions [B, T] int32 (index
  of each query in the packed row: compressed token i is visible iff i·d + l − 1 <= position),
  q_segment_ids [B, T], kv_segment_ids [B, N] int32 (`compressed_segments`: −1 for blocks across
  documents). block l, stride d, select_block l' (d | l, d | l', l <= l'); num_blocks S = ⌈T_row / l'⌉.
  q_start: a Python int or an int32 scalar (may be traced: `lax.map` over chunks reads no copies);
  q_count: static, default T − q_start (q_start then must be a Python int); rows past T give 0.
  Returns p_slc [B, K, q_count, S] float32: summed over the G heads of each KV group; 0 for blocks
  that no visible compressed token overlaps.
  """
  check_supported(q, k_cmp, lse, q_positions, q_segment_ids, kv_segment_ids, block=block, stride=stride,
                  select_block=select_block, num_blocks=num_blocks, config=config)
  b, t, hq, d = q.shape
  hkv = k_cmp.shape[2]
  if q_count is None:
    if not isinstance(q_start, int):
      raise ValueError("nsa_importance: a traced q_start needs a static q_count")
    q_count = t - q_start
  if k_cmp.shape[1] == 0 or q_count == 0:
    return jnp.zeros((b, hkv, q_count, num_blocks), jnp.float32)
  cfg = config or default_config(q, k_cmp, block=block, stride=stride, select_block=select_block)
  scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  g = _geometry(q, k_cmp, q_count, num_blocks, block=block, stride=stride, select_block=select_block,
                sm_scale=scale, cfg=cfg)
  start = jnp.reshape(jnp.asarray(q_start, jnp.int32), (1,))
  ins = [q_positions.astype(jnp.int32), q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32),
         lse, _flat(q), _flat(k_cmp)]
  out_shape = jax.ShapeDtypeStruct((b, hkv * q_count, num_blocks), jnp.float32)
  out = pl.pallas_call(
      functools.partial(_kernel, g=g), grid=(g.programs * hkv, b),
      in_specs=[pl.BlockSpec((1,), lambda p, b_: (0,))] + [_whole(x, 1) for x in ins],
      out_specs=_whole(out_shape, 1), out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret, name="nsa_importance",
  )(start, *ins)
  return out.reshape(b, hkv, q_count, num_blocks)


def importance_topn(q, k_cmp, lse, q_positions, q_segment_ids, kv_segment_ids, doc_starts, *, block: int,
                    stride: int, select_block: int, num_blocks: int, num_selected: int, num_initial: int,
                    num_local: int, sm_scale: float | None = None, interpret: bool = False,
                    config: ImportanceConfig | None = None) -> tuple[jax.Array, jax.Array]:
  """NSA's selected blocks in one kernel: `importance_scores`, `compressed.block_scores` and
  `compressed.top_blocks` fused, so the scores [B, K, T, S] never reach HBM.

  Arguments as `importance_scores` (all T query rows; lse may be None when N = 0), plus doc_starts [B, T]
  int32 (row index of each query's document start, `compressed.document_starts` in row coordinates) and
  num_selected n (1 .. MAX_SELECTED), num_initial, num_local (forced blocks, counted inside n). Each
  program keeps the running top-n of its tokens across its steps (`_insert`), walking the blocks from
  the first block of its earliest document through its latest query's own block.
  Returns indices [B, K, T, n'] int32 (ascending, valid first, S past the count) and counts [B, K, T]
  int32, n' = min(n, S): what `top_blocks(block_scores(importance_scores(...)))` returns.
  """
  b, t, hq, d = q.shape
  n_cmp = k_cmp.shape[1]
  if lse is None:
    if n_cmp:
      raise ValueError(f"nsa_importance: lse is None but there are N={n_cmp} compressed tokens")
    lse = jnp.full((b, hq, t), -jnp.inf, jnp.float32)
  check_supported(q, k_cmp, lse, q_positions, q_segment_ids, kv_segment_ids, block=block, stride=stride,
                  select_block=select_block, num_blocks=num_blocks, config=config)
  check_selection(doc_starts, (b, t), num_selected=num_selected, num_initial=num_initial, num_local=num_local)
  hkv = k_cmp.shape[2]
  if n_cmp == 0:              # T < l: only the masking runs (no step reads a key); one dummy token to pass
    k_cmp = jnp.zeros((b, 1, hkv, d), q.dtype)
    kv_segment_ids = jnp.full((b, 1), -1, jnp.int32)
  cfg = config or default_config(q, k_cmp, block=block, stride=stride, select_block=select_block)
  scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  g = _geometry(q, k_cmp, t, num_blocks, block=block, stride=stride, select_block=select_block, sm_scale=scale,
                cfg=cfg)
  g = dataclasses.replace(g, n=n_cmp)
  keep = min(num_selected, num_blocks)
  sel = _Selection(n=keep, width=max(_MIN_DOT, _next_pow2(keep)), select_block=select_block,
                   num_initial=num_initial, num_local=num_local)
  ins = [q_positions.astype(jnp.int32), q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32),
         lse, _flat(q), _flat(k_cmp), doc_starts.astype(jnp.int32)]
  out_shape = (jax.ShapeDtypeStruct((b, hkv * t, keep), jnp.int32), jax.ShapeDtypeStruct((b, hkv * t), jnp.int32))
  idx, cnt = pl.pallas_call(
      functools.partial(_topn_kernel, g=g, sel=sel), grid=(g.programs * hkv, b),
      in_specs=[pl.BlockSpec((1,), lambda p, b_: (0,))] + [_whole(x, 1) for x in ins],
      out_specs=[_whole(x, 1) for x in out_shape], out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret, name="nsa_importance_topn",
  )(jnp.zeros((1,), jnp.int32), *ins)
  return idx.reshape(b, hkv, t, keep), cnt.reshape(b, hkv, t)


def topn_of_scores(scores, q_positions, doc_starts, *, nbt: int, select_block: int, num_blocks: int,
                   num_selected: int, num_initial: int, num_local: int, tokens: int = 16, span: int = 2,
                   num_warps: int = 4, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """`compressed.top_blocks(compressed.block_scores(p_slc, ...))` of block scores already in HBM, in
  the step-padded layout that `nsa_importance_mosaic.block_scores_padded` writes.

  scores [B, K, T, steps, W] float32: slot (j, c) holds the score of block j·nbt + c for c < nbt
  (columns nbt .. W−1 are not read; steps = ⌈S / nbt⌉); q_positions [B, T] int32 (each query's index in
  its packed row: its own block is position // l'); doc_starts [B, T] int32 (row index of its document's
  start). One program per (`tokens` queries, KV head, batch) walks the steps from its earliest
  document's first block through its latest own block, `span` steps per `_insert` round (the fused
  kernel's running top-n, fed from HBM instead of from its own dots).
  Returns indices [B, K, T, n'] int32 (ascending, S past the count) and counts [B, K, T] int32,
  n' = min(num_selected, S).
  """
  if scores.ndim != 5 or jnp.dtype(scores.dtype) != jnp.float32:
    raise ValueError(f"topn_of_scores needs scores [B, K, T, steps, W] float32; got {scores.dtype} "
                     f"{tuple(scores.shape)}")
  b, hkv, t, steps, width = scores.shape
  if not 1 <= nbt <= width or steps != -(-num_blocks // nbt):
    raise ValueError(f"topn_of_scores: scores {tuple(scores.shape)} do not hold S={num_blocks} blocks in steps "
                     f"of nbt={nbt} (need 1 <= nbt <= W and steps = ⌈S / nbt⌉ = {-(-num_blocks // nbt)})")
  if width & (width - 1) or tokens & (tokens - 1) or span & (span - 1):
    raise ValueError(f"topn_of_scores: W={width}, tokens={tokens} and span={span} must be powers of two")
  check_selection(doc_starts, (b, t), num_selected=num_selected, num_initial=num_initial, num_local=num_local)
  if tuple(q_positions.shape) != (b, t):
    raise ValueError(f"topn_of_scores: q_positions has shape {tuple(q_positions.shape)}; expected {(b, t)}")
  keep = min(num_selected, num_blocks)
  sel = _Selection(n=keep, width=max(_MIN_DOT, _next_pow2(keep)), select_block=select_block,
                   num_initial=num_initial, num_local=num_local)
  g = _ScoresGeometry(t=t, hkv=hkv, tokens=tokens, nbt=nbt, width=width, steps=steps, span=span,
                      num_blocks=num_blocks)
  ins = [q_positions.astype(jnp.int32), doc_starts.astype(jnp.int32), scores.reshape(b, hkv * t, steps * width)]
  out_shape = (jax.ShapeDtypeStruct((b, hkv * t, keep), jnp.int32), jax.ShapeDtypeStruct((b, hkv * t), jnp.int32))
  idx, cnt = pl.pallas_call(
      functools.partial(_topn_scores_kernel, g=g, sel=sel), grid=(g.programs * hkv, b),
      in_specs=[_whole(x, 1) for x in ins], out_specs=[_whole(x, 1) for x in out_shape], out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="nsa_topn_of_scores",
  )(*ins)
  return idx.reshape(b, hkv, t, keep), cnt.reshape(b, hkv, t)
