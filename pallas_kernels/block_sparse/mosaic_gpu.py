"""Block-sparse flash attention forward in Pallas Mosaic GPU (Hopper: wgmma, TMA, mbarriers).

The same contract as `pallas_gpu.forward` (docs/contracts.md §1) for the tiles Hopper runs fastest:
`forward(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg, sm_scale=..., causal=...)` returns
out [B, Tq, Hq, Dv] in q's dtype and lse [B, Hq, Tq] float32 (natural log, -inf for rows that see
nothing), so `pallas_gpu.backward` consumes it unchanged.

One program (CTA) per (query unit of 128 tokens, query head, batch), three warpgroups:

* two consumer warpgroups of 64 query rows each. Each keeps its Q tile in shared memory, computes
  S = Q Kᵀ and O += P V with wgmma, and an online softmax in float32 in base 2 (sm_scale·log2 e
  folded into one multiply-add per logit). A schedule barrier makes the two warpgroups take turns
  on the tensor cores (one runs its softmax while the other multiplies);
* one producer warpgroup that walks the unit's list (`kv_indices`, read with scalar loads) and
  TMA-loads the listed K/V blocks, with their key positions (and segment ids), into a ring of
  `num_stages` shared-memory slots; per slot one barrier says "K loaded", one "V loaded", and two
  say "K (V) consumed by both consumers".

With a list per KV head (Hl = Hkv) each query head of the group still runs its own program over the
group's list. Every program walks its list starting at entry (program index along the query axis
mod min(stagger, count)), wrapping around, as `pallas_gpu` does (`KernelConfig.stagger`). Query
units run last first (the last units of a causal layout have the longest lists) and vary fastest
in the grid, so the programs running together read one head's K/V (L2 reuse).

Masking. Keys are visible iff kv_pos <= q_pos (causal), q_pos - kv_pos < window (a sliding window,
causal calls only) and the segment ids are equal. A block whose largest key position is <= the
smallest query position of a consumer's 64 rows, whose smallest key position is > their largest
position - window (with a window), and whose keys and queries all share one segment id (with
segment ids) skips the element mask: a block-level test on scalars, the per-block key ranges and
per-tile query ranges of positions and segment ids that XLA reduces before the launch
(`tile_ranges`). Rows that see nothing give out 0 and lse -inf.

Supported (`check_supported`): bfloat16 or float16; Dqk = Dv in {64, 128}; layout.block_q = 128;
layout.block_k in {64, 128}; Tq a multiple of 128 and Tk of block_k, or any lengths with causal
masking (`forward` pads them: padded keys after every query, padded queries before every key); a
sliding window with causal masking; sm_scale > 0. Launch parameters: `MosaicConfig`.

It uses only API spelled the same in jax 0.10.2 (CPU) and 0.11.2 (the GPU): `ref.transpose` rather
than `plgpu.transpose_ref`, and loads followed by `plgpu.layout_cast` rather than `plgpu.load`.
Tests (tests/pallas_kernels/test_mosaic_gpu.py) run the kernel on CPU in jax's Mosaic GPU
interpreter, extended there with the wgmma forms it lacks, and lower it for CUDA.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse.api import KERNEL_OUTPUT_NAME

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_BLOCK_Q = 128            # query tokens per program: two consumer warpgroups x 64 rows
_WG_ROWS = 64             # rows of one consumer warpgroup (the wgmma M)
_CONSUMERS = 2
_BLOCK_K_CHOICES = (64, 128)
_HEAD_DIMS = (64, 128)
_DTYPES = (jnp.bfloat16, jnp.float16)
SMEM_LIMIT = 227 * 1024  # bytes of shared memory a Hopper CTA may use
_SMEM_RESERVED = 4 * 1024  # barriers, reduction scratch and alignment
# List walks start within the first 64 entries (`MosaicConfig.stagger`, `pallas_gpu.KernelConfig.
# stagger`): 64 128x128 K/V blocks of one head are 4 MiB in bf16, well inside an H200's L2.
STAGGER = 64


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Launch parameters.

  num_stages: K/V blocks in flight (slots of the shared-memory ring), >= 2.
  stagger: starts spread over the first `stagger` list entries (`pallas_gpu.KernelConfig.stagger`);
    0: every program starts at entry 0.
  pingpong: the two consumer warpgroups alternate on the tensor cores (a schedule barrier);
    False lets them run freely.
  softmax_fence: finish the softmax step (running max and sum, rescaled accumulator, P in the
    input dtype) behind an optimization barrier before handing the tensor cores over, so that the
    compiler cannot move any of it past the hand-over (jax's Mosaic GPU attention example found
    this order faster for head dims <= 128).
  programs: 0 launches one program per (query unit, head, batch). n > 0 launches a persistent grid
    of n programs (e.g. one per SM); program p takes the items p, p + n, p + 2n, ... of that grid's
    order, and its K/V ring runs on from one item to the next, so that the producer loads the next
    item's first blocks while the consumers finish the current one (its output store, the next
    query tile's load), which short lists otherwise pay once per program.
  """
  num_stages: int = 2
  stagger: int = STAGGER
  pingpong: bool = True
  softmax_fence: bool = False
  programs: int = 0

  def __post_init__(self):
    if self.num_stages < 2:
      raise ValueError(f"num_stages={self.num_stages} must be >= 2")
    if self.stagger < 0:
      raise ValueError(f"stagger={self.stagger} must be >= 0 (0: no stagger)")
    if self.programs < 0:
      raise ValueError(f"programs={self.programs} must be >= 0 (0: one program per query unit and head)")


def smem_bytes(d: int, block_k: int, num_stages: int, itemsize: int, has_seg: bool) -> int:
  """Shared memory of one program: Q/O tiles, the K/V ring, positions (and segment ids), lse."""
  tiles = _BLOCK_Q * d * itemsize + num_stages * 2 * block_k * d * itemsize
  ints = (1 + has_seg) * 4 * (_BLOCK_Q + num_stages * block_k)
  return tiles + ints + 4 * _BLOCK_Q + _SMEM_RESERVED


def default_config(q, layout) -> MosaicConfig:
  """The deepest ring (up to 4 stages) that fits shared memory, segment ids included."""
  d, size = q.shape[-1], jnp.dtype(q.dtype).itemsize
  stages = max(s for s in (2, 3, 4)
               if s == 2 or smem_bytes(d, layout.block_k, s, size, True) <= SMEM_LIMIT)
  return MosaicConfig(num_stages=stages)


def check_supported(q, k, v, layout, config: MosaicConfig | None = None, has_seg: bool = True,
                    causal: bool = False) -> None:
  """Raise ValueError naming the values this kernel cannot run (the caller falls back to Triton).
  Ragged ends (Tq not a multiple of 128, Tk not one of block_k) are served only with causal masking,
  which hides the padding `forward` adds."""
  _check_tiles("mosaic_gpu", q, k, v, layout, causal)
  cfg = config or default_config(q, layout)
  d = q.shape[-1]
  _check_smem("mosaic_gpu", f"num_stages={cfg.num_stages}", layout.block_k, d,
              smem_bytes(d, layout.block_k, cfg.num_stages, jnp.dtype(q.dtype).itemsize, has_seg))


def check_dtypes_and_head_dims(kernel: str, q, k, v) -> None:
  """q, k, v all bfloat16 or all float16, Dqk = Dv in _HEAD_DIMS (every Mosaic GPU attention kernel's
  precondition; `kernel` names the module in the messages)."""
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if len(dtypes) != 1 or jnp.dtype(q.dtype) not in [jnp.dtype(d) for d in _DTYPES]:
    raise ValueError(f"{kernel} needs q, k, v all bfloat16 or all float16; got q {q.dtype}, "
                     f"k {k.dtype}, v {v.dtype}")
  dqk, dv = q.shape[-1], v.shape[-1]
  if dqk != dv or dqk not in _HEAD_DIMS:
    raise ValueError(f"{kernel} needs Dqk = Dv in {_HEAD_DIMS}; got Dqk={dqk}, Dv={dv}")


def _check_tiles(kernel: str, q, k, v, layout, causal: bool | None) -> None:
  """The checks of dtypes, head dims, tiles and lengths that this forward and mosaic_gpu_bwd share
  (`kernel` names the module in the messages). Ragged ends pass only when `causal` is True; None:
  the kernel never takes them."""
  check_dtypes_and_head_dims(kernel, q, k, v)
  if layout.block_q != _BLOCK_Q:
    raise ValueError(f"{kernel} needs block_q={_BLOCK_Q}; got block_q={layout.block_q}")
  if layout.block_k not in _BLOCK_K_CHOICES:
    raise ValueError(f"{kernel} needs block_k in {_BLOCK_K_CHOICES}; got block_k={layout.block_k}")
  tq, tk = q.shape[1], k.shape[1]
  if (tq % _BLOCK_Q or tk % layout.block_k) and not causal:
    unless, got = ("", "") if causal is None else (" unless causal", f", causal={causal}")
    raise ValueError(f"{kernel} needs Tq a multiple of {_BLOCK_Q} and Tk of block_k="
                     f"{layout.block_k} (no ragged ends){unless}; got Tq={tq}, Tk={tk}{got}")


def _check_call(kernel: str, interpret, window, sm_scale, causal) -> None:
  """Refuse interpret=True, a sliding window that is not a positive int of a causal call, and
  sm_scale <= 0 (the call's arguments that this forward and mosaic_gpu_bwd check alike)."""
  if interpret is True:
    raise ValueError(f"{kernel} cannot run with interpret=True: jax's Mosaic GPU interpreter does not "
                     "run wgmma with a register or transposed operand; pass interpret=False or "
                     "InterpretGPUParams for an interpreter that does (tests/pallas_kernels/"
                     "test_mosaic_gpu.py extends jax's)")
  if window is not None and not (isinstance(window, int) and not isinstance(window, bool)
                                 and window >= 1 and causal):
    raise ValueError(f"{kernel} takes window=None or a positive int with causal=True; got "
                     f"window={window!r}, causal={causal}")
  if not float(sm_scale) > 0:
    raise ValueError(f"{kernel} needs sm_scale > 0; got sm_scale={sm_scale}")


def _check_smem(kernel: str, stages: str, block_k: int, d: int, need: int) -> None:
  """Refuse a ring (`stages`: "name=value") whose program needs more than SMEM_LIMIT bytes."""
  if need > SMEM_LIMIT:
    raise ValueError(f"{kernel}: {stages} with block_k={block_k}, D={d} needs {need} bytes of "
                     f"shared memory, over {SMEM_LIMIT}; use fewer stages")


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Static sizes of one launch."""
  nq: int            # query units (programs along the first grid axis)
  hq: int
  hkv: int
  hl: int            # head units of the layout
  bl: int            # batch of the layout (1: broadcast)
  block_k: int
  d: int
  dtype: jnp.dtype
  causal: bool
  has_seg: bool
  scale_log2: float  # sm_scale * log2(e)
  cfg: MosaicConfig
  window: int | None = None  # sliding window (causal only): also q_pos - kv_pos < window
  batch: int = 1     # batch of q
  programs: int = 0  # persistent programs (min(cfg.programs, items)); 0: one per item

  @property
  def stages(self):
    return self.cfg.num_stages

  @property
  def items(self):
    """(query unit, head, batch) triples: the programs of the non-persistent grid."""
    return self.nq * self.hq * self.batch

  @property
  def mask_mode(self):
    """"skip" (causal or segment ids: blocks inside every row's past, inside its window and in its
    one segment skip the element mask) or "never" (neither: every listed key is visible)."""
    return "skip" if self.causal or self.has_seg else "never"

  @property
  def key_copies(self):
    """TMA copies that land on one "K loaded" barrier: K, its positions (causal) and segment ids."""
    return 1 + self.causal + self.has_seg

  @property
  def query_copies(self):
    return 1 + self.causal + self.has_seg


def _load_vector(ref, layout):
  """A 1-D shared-memory ref as an array with `layout` (a load followed by a layout cast lowers as
  `plgpu.load(ref, layout=...)`, whose index argument changed between jax 0.10 and 0.11)."""
  return plgpu.layout_cast(ref[...], layout)


def _walk(g, seed, count):
  """Entry of the list visited at step n (a function of n), rotated to start at entry
  (seed mod min(stagger, count)) when `g.cfg.stagger` (g: this module's or mosaic_gpu_bwd's
  geometry)."""
  if not g.cfg.stagger:
    return lambda n: n
  start = lax.rem(seed, jnp.clip(count, 1, g.cfg.stagger))
  return lambda n: jnp.where(n + start >= count, n + start - count, n + start)


def _visible(g, kv_pos, q_pos):
  """The causal test kv_pos <= q_pos (arrays of one shape) and, with a window, kv_pos > q_pos -
  window (no overflow for padded keys at the largest int32; padded queries at the smallest see
  nothing through the causal test)."""
  ok = kv_pos <= q_pos
  if g.window:
    ok = ok & (kv_pos > q_pos - g.window)
  return ok


def _query_tile(g, q_range_ref, at):
  """The scalars of a query tile (`tile_ranges` row `at`) that `_needs_mask` compares, loaded once
  per tile: (smallest position, largest position - window, smallest and largest segment id), None
  where the launch has no such test."""
  cols = (g.causal, bool(g.window), g.has_seg, g.has_seg)
  return tuple(q_range_ref[(*at, c)] if on else None for c, on in enumerate(cols))


def _needs_mask(g, kv_range_ref, at, q_tile):
  """Whether the keys of `kv_range_ref[at]` (a `tile_ranges` row of keys) need the element mask for
  the query tile `q_tile` (`_query_tile`): some key after some query (causal), some key at or past
  the window's far edge of some query, or the tiles not all in one segment. A traced bool."""
  q_lo, q_far, q_seg_lo, q_seg_hi = q_tile
  tests = []
  if g.causal:
    tests.append(kv_range_ref[(*at, 0)] > q_lo)
  if g.window:
    tests.append(kv_range_ref[(*at, 1)] <= q_far)
  if g.has_seg:
    k_seg_lo, k_seg_hi = kv_range_ref[(*at, 2)], kv_range_ref[(*at, 3)]
    one = (q_seg_lo == q_seg_hi) & (k_seg_lo == k_seg_hi) & (q_seg_lo == k_seg_lo)
    tests.append(jnp.logical_not(one))
  need = tests[0]
  for t in tests[1:]:
    need = need | t
  return need


def tile_ranges(pos, seg, rows: int, window: int | None, *, keys: bool):
  """Per tile of `rows` positions (pos [B, T], T a multiple of rows; seg [B, T] or None): int32
  [B, T/rows, 4] of, for queries, (smallest position, largest position - window (clamped above
  the smallest int32; unused without a window), smallest segment id, largest segment id) and, for
  keys, (largest position, smallest position, smallest segment id, largest segment id): what
  `_needs_mask` compares. Segment columns are 0 without segment ids."""
  b = pos.shape[0]
  tiles = pos.astype(jnp.int32).reshape(b, -1, rows)
  lo, hi = tiles.min(-1), tiles.max(-1)
  if seg is None:
    seg_lo = seg_hi = jnp.zeros_like(lo)
  else:
    seg_tiles = seg.astype(jnp.int32).reshape(b, -1, rows)
    seg_lo, seg_hi = seg_tiles.min(-1), seg_tiles.max(-1)
  if keys:
    return jnp.stack([hi, lo, seg_lo, seg_hi], axis=-1)
  small = jnp.iinfo(jnp.int32).min + 1
  far = jnp.maximum(hi, small + (window or 0)) - (window or 0)
  return jnp.stack([lo, far, seg_lo, seg_hi], axis=-1)


def _row_bcast(x, shape):
  return lax.broadcast_in_dim(x, shape, [0])


def _col_bcast(x, shape):
  return lax.broadcast_in_dim(x, shape, [1])


# ----------------------------------------------------------------------------------------------
# Kernel


@dataclasses.dataclass(frozen=True)
class _Program:
  """Grid position of one program and the views of its list."""
  batch: object     # batch index
  head: object      # query head
  unit: object      # query unit (heaviest first)
  count: object     # entries of the unit's list
  entry: object     # step -> list entry
  kv_head: object
  list_at: object   # step -> KV block index


def _program(g: _Geometry, kv_idx_ref, kv_cnt_ref, item=None) -> _Program:
  """The grid position's item (item None) or, in a persistent grid, item `item` of the same order:
  query units fastest (heaviest first), then heads, then batch."""
  if item is None:
    qi, head, batch = lax.axis_index("q"), lax.axis_index("heads"), lax.axis_index("batch")
  else:
    qi, rest = lax.rem(item, g.nq), item // g.nq
    head, batch = lax.rem(rest, g.hq), rest // g.hq
  unit = g.nq - 1 - qi
  lb = batch if g.bl > 1 else 0
  hu = head // (g.hq // g.hl)
  count = kv_cnt_ref[lb, hu, unit]
  entry = _walk(g, qi, count)
  return _Program(batch=batch, head=head, unit=unit, count=count, entry=entry,
                  kv_head=head // (g.hq // g.hkv),
                  list_at=lambda n: kv_idx_ref[lb, hu, unit, entry(n)])


@dataclasses.dataclass(frozen=True)
class _Work:
  """The items of one program: `count` of them, `at(i)` the i-th as a `_Program`."""
  count: object
  at: object


def _work(g: _Geometry, kv_idx_ref, kv_cnt_ref) -> _Work:
  if not g.programs:
    return _Work(count=1, at=lambda i: _program(g, kv_idx_ref, kv_cnt_ref))
  pid = lax.axis_index("prog")
  return _Work(count=(g.items - pid + g.programs - 1) // g.programs,
               at=lambda i: _program(g, kv_idx_ref, kv_cnt_ref, pid + i * g.programs))


def _producer(g: _Geometry, work: _Work, refs, bufs, bars):
  """Walk the lists of the program's items and TMA-load each K/V block (and its key positions /
  segment ids) into ring slot (step mod stages), steps counted over all the program's items, once
  both consumers have released the slot."""
  k_ref, v_ref, kv_pos_ref, kv_seg_ref = refs
  k_smem, v_smem, pos_smem, seg_smem = bufs
  k_bar, v_bar, k_free, v_free = bars

  def wait_free(slot):
    plgpu.barrier_wait(k_free.at[slot])
    plgpu.barrier_wait(v_free.at[slot])

  def load(p, n, slot, reuse):
    """Load step n into `slot`; `reuse` (a bool, static or traced): the slot held an earlier step,
    so wait for its release first. K is refilled as soon as both consumers have used the old K
    (after their Q K^T), before they release the old V (after P V): the next K load starts about
    half a step earlier than a whole-slot release would allow."""
    block = p.list_at(n)
    rows = pl.ds(block * g.block_k, g.block_k)
    pl.when(reuse)(lambda: plgpu.barrier_wait(k_free.at[slot]))
    plgpu.copy_gmem_to_smem(k_ref.at[p.batch, rows, p.kv_head], k_smem.at[slot], k_bar.at[slot])
    if g.causal:
      plgpu.copy_gmem_to_smem(kv_pos_ref.at[p.batch, rows], pos_smem.at[slot], k_bar.at[slot])
    if g.has_seg:
      plgpu.copy_gmem_to_smem(kv_seg_ref.at[p.batch, rows], seg_smem.at[slot], k_bar.at[slot])
    pl.when(reuse)(lambda: plgpu.barrier_wait(v_free.at[slot]))
    plgpu.copy_gmem_to_smem(v_ref.at[p.batch, rows, p.kv_head], v_smem.at[slot], v_bar.at[slot])

  if g.programs:
    def item(i, base):
      p = work.at(i)

      @pl.loop(0, p.count)
      def _step(n):
        load(p, n, lax.rem(base + n, g.stages), base + n >= g.stages)
      return base + p.count
    total = lax.fori_loop(0, work.count, item, jnp.int32(0))
  else:
    p = work.at(0)
    total = p.count
    for n in range(g.stages):
      pl.when(n < p.count)(functools.partial(load, p, n, n, False))

    @pl.loop(g.stages, jnp.maximum(p.count, g.stages))
    def _refill(n):
      load(p, n, lax.rem(n, g.stages), True)

  @pl.loop(jnp.maximum(total - g.stages, 0), total)
  def _drain(n):
    """Observe the consumers' last releases: no barrier phase is left unobserved at exit."""
    wait_free(lax.rem(n, g.stages))


def _consumer(g: _Geometry, work: _Work, wg, refs, bufs, bars, q_range_ref, kv_range_ref):
  """Each item of the program in turn (`_consume_item`), its ring steps following the last item's."""
  if not g.programs:
    _consume_item(g, work.at(0), 0, wg, refs, bufs, bars, q_range_ref, kv_range_ref)
    return

  def item(i, base):
    p = work.at(i)
    _consume_item(g, p, base, wg, refs, bufs, bars, q_range_ref, kv_range_ref)
    return base + p.count
  lax.fori_loop(0, work.count, item, jnp.int32(0))


def _consume_item(g: _Geometry, p: _Program, base, wg, refs, bufs, bars, q_range_ref, kv_range_ref):
  """Attention of 64 query rows over the listed blocks; writes their out rows and lse. Step n of the
  list is ring step base + n (base: the ring steps of the program's earlier items; 0 without a
  persistent grid)."""
  q_ref, q_pos_ref, q_seg_ref, o_ref, lse_ref = refs
  q_smem, qpos_smem, qseg_smem, lse_smem, k_smem, v_smem, pos_smem, seg_smem = bufs
  q_bar, k_bar, v_bar, k_free, v_free, turn = bars
  rows = pl.ds(p.unit * _BLOCK_Q + wg * _WG_ROWS, _WG_ROWS)
  q_tile = q_smem.at[wg]

  plgpu.copy_gmem_to_smem(q_ref.at[p.batch, rows, p.head], q_tile, q_bar.at[wg])
  if g.causal:
    plgpu.copy_gmem_to_smem(q_pos_ref.at[p.batch, rows], qpos_smem.at[wg], q_bar.at[wg])
  if g.has_seg:
    plgpu.copy_gmem_to_smem(q_seg_ref.at[p.batch, rows], qseg_smem.at[wg], q_bar.at[wg])
  plgpu.barrier_wait(q_bar.at[wg])

  row_layout = plgpu.Layout.WGMMA.reduce(1)
  col_layout = plgpu.Layout.WGMMA.reduce(0)
  shape = (_WG_ROWS, g.block_k)
  q_pos = _load_vector(qpos_smem.at[wg], row_layout) if g.causal else None
  q_seg = _load_vector(qseg_smem.at[wg], row_layout) if g.has_seg else None
  q_tile_ranges = _query_tile(g, q_range_ref, (p.batch, p.unit * _CONSUMERS + wg))

  def take_turn():
    if g.cfg.pingpong:
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

  def needs_mask(block):
    """Whether a block needs the element mask (`_needs_mask`): a traced bool."""
    return _needs_mask(g, kv_range_ref, (p.batch, block), q_tile_ranges)

  def mask(s, slot):
    ok = None
    if g.causal:
      kv_pos = _load_vector(pos_smem.at[slot], col_layout)
      ok = _visible(g, _col_bcast(kv_pos, shape), _row_bcast(q_pos, shape))
    if g.has_seg:
      same = _col_bcast(_load_vector(seg_smem.at[slot], col_layout), shape) == _row_bcast(q_seg, shape)
      ok = same if ok is None else ok & same
    return jnp.where(ok, s, -jnp.inf)

  def logits(n, slot, need):
    """S = Q K^T of step n [64, bk] (raw), masked as the block needs."""
    def qk(acc_ref):
      plgpu.wgmma(acc_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
      take_turn()
      return acc_ref[...]
    s = pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32))
    if g.mask_mode == "skip":
      s = lax.cond(need, lambda s: mask(s, slot), lambda s: s, s)
    plgpu.barrier_arrive(k_free.at[slot])
    return s

  def step(n, carry):
    acc, m_prev, l_prev, *need = carry
    slot = lax.rem(base + n, g.stages)
    if g.mask_mode == "skip":   # look the next block up while this one computes
      need, nxt = need[0], [needs_mask(p.list_at(jnp.minimum(n + 1, p.count - 1)))]
    else:
      need, nxt = None, []
    s = logits(n, slot, need)

    m_new = jnp.maximum(m_prev, s.max(axis=1) * g.scale_log2)              # base-2 running max
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)                     # rows that saw nothing yet
    alpha = jnp.exp2(m_prev - m_safe)
    prob = jnp.exp2(s * g.scale_log2 - _row_bcast(m_safe, shape))
    l_new = l_prev * alpha + prob.sum(axis=1)
    acc = acc * _row_bcast(alpha, acc.shape)
    prob = prob.astype(g.dtype)
    if g.cfg.softmax_fence:
      acc, m_new, l_new, prob = lax.optimization_barrier((acc, m_new, l_new, prob))
    if g.cfg.pingpong:
      plgpu.barrier_arrive(turn)
    plgpu.barrier_wait(v_bar.at[slot])
    if g.cfg.pingpong:
      plgpu.barrier_wait(turn)

    def pv(acc_ref):
      acc_ref[...] = acc
      plgpu.wgmma(acc_ref, prob, v_smem.at[slot])
      nxt_slot = lax.rem(base + n + 1, g.stages)
      pl.when(n + 1 < p.count)(lambda: plgpu.barrier_wait(k_bar.at[nxt_slot]))
      return acc_ref[...]
    acc = pl.run_scoped(pv, plgpu.ACC(acc.shape, jnp.float32))
    plgpu.barrier_arrive(v_free.at[slot])
    return (acc, m_new, l_new, *nxt)

  acc = plgpu.layout_cast(jnp.zeros((_WG_ROWS, g.d), jnp.float32), plgpu.Layout.WGMMA)
  m = plgpu.layout_cast(jnp.full((_WG_ROWS,), -jnp.inf, jnp.float32), row_layout)
  l = plgpu.layout_cast(jnp.zeros((_WG_ROWS,), jnp.float32), row_layout)
  need0 = [needs_mask(p.list_at(0))] if g.mask_mode == "skip" else []
  first = 0 if isinstance(base, int) else lax.rem(base, g.stages)
  pl.when(p.count > 0)(lambda: plgpu.barrier_wait(k_bar.at[first]))
  pl.when(wg == 1)(take_turn)   # the second warpgroup starts half a step behind the first
  acc, m, l, *_ = lax.fori_loop(0, p.count, step, (acc, m, l, *need0))
  pl.when(wg == 0)(take_turn)

  seen = l > 0.0
  l_safe = jnp.where(seen, l, 1.0)
  q_tile[...] = (acc * _row_bcast(1.0 / l_safe, acc.shape)).astype(g.dtype)
  lse_smem.at[wg][...] = jnp.where(seen, (m + jnp.log2(l_safe)) * _LN2, -jnp.inf)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_tile, o_ref.at[p.batch, rows, p.head])
  plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[p.batch, p.head, rows])
  plgpu.wait_smem_to_gmem(0)


def _kernel(kv_idx_ref, kv_cnt_ref, q_range_ref, kv_range_ref, q_pos_ref, kv_pos_ref, *refs,
            g: _Geometry):
  if g.has_seg:
    q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  else:
    q_seg_ref = kv_seg_ref = None
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  work = _work(g, kv_idx_ref, kv_cnt_ref)
  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  ints = lambda *shape: plgpu.SMEM(shape, jnp.int32)
  scratch = dict(
      q=plgpu.SMEM((_CONSUMERS, _WG_ROWS, g.d), g.dtype, transforms=swizzled),
      k=plgpu.SMEM((g.stages, g.block_k, g.d), g.dtype, transforms=swizzled),
      v=plgpu.SMEM((g.stages, g.block_k, g.d), g.dtype, transforms=swizzled),
      qpos=ints(_CONSUMERS, _WG_ROWS) if g.causal else None,
      qseg=ints(_CONSUMERS, _WG_ROWS) if g.has_seg else None,
      pos=ints(g.stages, g.block_k) if g.causal else None,
      seg=ints(g.stages, g.block_k) if g.has_seg else None,
      lse=plgpu.SMEM((_CONSUMERS, _WG_ROWS), jnp.float32))
  barriers = dict(
      q=plgpu.Barrier(num_arrivals=g.query_copies, num_barriers=_CONSUMERS),
      k=plgpu.Barrier(num_arrivals=g.key_copies, num_barriers=g.stages),
      v=plgpu.Barrier(num_barriers=g.stages),
      k_free=plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=g.stages),
      v_free=plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=g.stages),
      turn=plgpu.Barrier(num_arrivals=_CONSUMERS))

  def body(s, b):
    wg = lax.axis_index("wg")

    @pl.when(wg < _CONSUMERS)
    def _consume():
      plgpu.set_max_registers(232, action="increase")
      _consumer(g, work, wg, (q_ref, q_pos_ref, q_seg_ref, o_ref, lse_ref),
                (s["q"], s["qpos"], s["qseg"], s["lse"], s["k"], s["v"], s["pos"], s["seg"]),
                (b["q"], b["k"], b["v"], b["k_free"], b["v_free"], b["turn"]),
                q_range_ref, kv_range_ref)

    @pl.when(wg == _CONSUMERS)
    def _produce():
      plgpu.set_max_registers(40, action="decrease")
      _producer(g, work, (k_ref, v_ref, kv_pos_ref, kv_seg_ref), (s["k"], s["v"], s["pos"], s["seg"]),
                (b["k"], b["v"], b["k_free"], b["v_free"]))

  pl.run_scoped(body, scratch, barriers, collective_axes="wg")


# ----------------------------------------------------------------------------------------------
# Wrapper


def forward(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg, *, sm_scale, causal, interpret=False,
            window=None, config: MosaicConfig | None = None):
  """out [B, Tq, Hq, Dv] (q's dtype), lse [B, Hq, Tq] float32 (natural log; -inf for empty rows).

  q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D]; layout: `BlockLayout` with block_q = 128; q_pos [B, Tq],
  kv_pos [B, Tk] int32; q_seg/kv_seg [B, Tq]/[B, Tk] int32 or None. interpret: False, or the
  Mosaic GPU interpreter's parameters (`InterpretGPUParams`), passed to `plgpu.kernel`; True is
  refused: jax's own interpreter (0.10, 0.11) cannot run a wgmma with a register or transposed
  operand (tests/pallas_kernels/test_mosaic_gpu.py extends it)."""
  _check_call("mosaic_gpu", interpret, window, sm_scale, causal)
  has_seg = q_seg is not None
  cfg = config or default_config(q, layout)
  check_supported(q, k, v, layout, cfg, has_seg, bool(causal))
  tq = q.shape[1]
  q, k, v, q_pos, kv_pos, q_seg, kv_seg = _pad_ragged(q, k, v, q_pos, kv_pos, q_seg, kv_seg,
                                                      layout.block_k)
  b, tq_padded, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  nq = tq_padded // _BLOCK_Q
  g = _Geometry(nq=nq, hq=hq, hkv=hkv, hl=layout.kv_indices.shape[1],
                bl=layout.kv_indices.shape[0], block_k=layout.block_k, d=d,
                dtype=jnp.dtype(q.dtype), causal=bool(causal), has_seg=has_seg,
                scale_log2=float(sm_scale) * _LOG2E, cfg=cfg, window=window, batch=b,
                programs=min(cfg.programs, nq * hq * b))
  q_pos, kv_pos = q_pos.astype(jnp.int32), kv_pos.astype(jnp.int32)
  q_range = tile_ranges(q_pos, q_seg, _WG_ROWS, window, keys=False)          # [B, Tq/64, 4]
  kv_range = tile_ranges(kv_pos, kv_seg, layout.block_k, window, keys=True)  # [B, nk, 4]
  ins = [layout.kv_indices.astype(jnp.int32), layout.kv_counts.astype(jnp.int32), q_range, kv_range,
         q_pos, kv_pos]
  if has_seg:
    ins += [q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)]
  out_type = (jax.ShapeDtypeStruct((b, tq_padded, hq, d), q.dtype),
              jax.ShapeDtypeStruct((b, hq, tq_padded), jnp.float32))
  grid, names = ((g.programs,), ("prog",)) if g.programs else ((nq, hq, b), ("q", "heads", "batch"))
  out, lse = plgpu.kernel(
      functools.partial(_kernel, g=g), out_type=out_type, grid=grid,
      grid_names=names, num_threads=_CONSUMERS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      kernel_name="block_sparse_fwd_mosaic", interpret=interpret or None,
  )(*ins, q, k, v)
  # A scanned layer whose remat policy saves (out, lse) writes them into a slice of a loop-carried
  # buffer; XLA's dynamic-slice fusion then clones the custom call for that write and the compiled
  # step runs the kernel twice (nsa_1b on an H200: 4 forward launches per layer where the jaxpr holds
  # 2). The barrier stands between the kernel and every user, and policies save its named outputs.
  out, lse = lax.optimization_barrier((out, lse))
  return checkpoint_name(out[:, :tq], KERNEL_OUTPUT_NAME), checkpoint_name(lse[..., :tq], KERNEL_OUTPUT_NAME)


def _pad_ragged(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_k):
  """Pad Tq to a multiple of 128 and Tk to one of block_k (causal calls only): padded queries at
  the smallest int32 position and padded keys at the largest, so that under the causal mask
  (kv_pos <= q_pos) no padded key is visible to a real query and padded rows see nothing."""
  pad_q, pad_k = -q.shape[1] % _BLOCK_Q, -k.shape[1] % block_k
  if not pad_q and not pad_k:
    return q, k, v, q_pos, kv_pos, q_seg, kv_seg
  lim = jnp.iinfo(jnp.int32)

  def pad(x, n, value=0):
    return jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2), constant_values=value)

  q, q_pos = pad(q, pad_q), pad(q_pos.astype(jnp.int32), pad_q, lim.min)
  k, v, kv_pos = pad(k, pad_k), pad(v, pad_k), pad(kv_pos.astype(jnp.int32), pad_k, lim.max)
  if q_seg is not None:
    q_seg, kv_seg = pad(q_seg, pad_q), pad(kv_seg, pad_k)
  return q, k, v, q_pos, kv_pos, q_seg, kv_seg
