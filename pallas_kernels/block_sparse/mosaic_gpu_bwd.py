"""Block-sparse flash attention backward in Pallas Mosaic GPU (Hopper: wgmma, TMA, mbarriers).

`backward(q, k, v, out, lse, delta, d_out, layout, q_pos, kv_pos, q_seg, kv_seg, sm_scale=...,
causal=...)` takes exactly what `pallas_gpu.backward` takes (lse from `mosaic_gpu.forward` or
`pallas_gpu.forward`, natural log, -inf for rows that see nothing; delta = rowsum(dO * O) - dlse,
0 on those rows) and returns (dq, dk, dv) in the dtypes of (q, k, v). Two kernels, no atomics
(deterministic: every output tile is written by exactly one program, sums in a fixed order):

* dQ (query-major, the forward's grid): one program per (query unit of 128 tokens, query head,
  batch). Two consumer warpgroups of 64 query rows keep Q, dO (shared memory), lse and delta
  (registers); a producer warpgroup walks the unit's list `kv_indices` and TMA-loads each listed
  K/V block (with key positions / segment ids), in sub-blocks of `dq_sub_k` keys, into a ring of
  `dq_stages` sub-block slots. Per sub-block: S = Q Kᵀ and dP = dO Vᵀ (wgmma, Kᵀ/Vᵀ transposed shared-memory
  views), P = exp2(S·scale·log2e - lse·log2e), dS = P (dP - delta), dQ += dS K (dS from
  registers). dQ is scaled by sm_scale at the end.
* dK/dV (KV-major): one program per (KV block, KV head, batch). Each consumer warpgroup keeps 64
  keys of the block (block_k 128: two consumers; block_k 64: one) with their K and V tiles in
  shared memory and dK, dV accumulators in registers. The producer walks, for each of the G query
  heads of the KV group, the inverse list `q_indices[kv_offsets[j] : kv_offsets[j+1]]` of the head
  unit that head belongs to (Hl = Hkv: one list shared by the G heads, walked once per head), and
  TMA-loads each listed query unit's Q, dO, lse, delta and positions / segment ids, in two halves
  of 64 query rows, into a ring of `dkv_stages` half-unit slots. Per half (the FA3 tile for D=128:
  Sᵀ, dPᵀ are [64, 64] float32, which leaves registers for the two [64, D] accumulators; 32 rows
  would not do: the wgmma K of dV += Pᵀ dO must be a multiple of 64 with 128-byte swizzles):
  Sᵀ = K Qᵀ, dPᵀ = V dOᵀ (transposed shared-memory B operands), Pᵀ, dV += Pᵀ dO, dSᵀ = Pᵀ (dPᵀ -
  delta), dK += dSᵀ Q (Pᵀ, dSᵀ from registers). dK is scaled by sm_scale at the end.

With `BwdConfig.pingpong` the two consumers of a kernel take turns on the tensor cores (a schedule
barrier, half a sub-step apart), as the forward does. With `BwdConfig.overlap` each consumer
software-pipelines its sub-steps instead: the second matmuls of one sub-step (dQ; dV, dK) are
issued after the first ones of the next (S, dP; Sᵀ, dPᵀ) and run while it computes that
sub-step's dS (Pᵀ, dSᵀ) (a wgmma wait that leaves those groups in flight). The price: a ring slot
is released one sub-step later and more registers stay live. Both rings hold sub-steps (64 keys;
64 query rows), 4 slots each at block_k = 128, D = 128, bf16.

Each kernel's grid runs the heaviest lists first under a causal layout (dQ: the last query units;
dK/dV: the first KV blocks) and varies the block/unit index fastest, so programs running together
share one head's streamed operands in L2.

Cost model. Without atomics dQ cannot share dS with the dK/dV kernel: S and dP are computed twice,
so the backward runs 7 matmuls of a block pair (dQ: S, dP, dQ; dK/dV: Sᵀ, dPᵀ, dV, dK) where
FlashAttention-3 runs 5 and the FLOP count credits 5 (2.5x the forward). Forward + backward thus
executes 4.5 forward-equivalents of tensor-core work for the 3.5 counted.

Masking is the forward's: key visible iff kv_pos <= q_pos (causal), q_pos - kv_pos < window (with
a window) and equal segment ids; tiles inside every row's past and window, and in one segment,
skip the element mask (`mosaic_gpu.tile_ranges`: per 64 query rows and per key tile, reduced by
XLA before the launch). Rows with lse = -inf give P = 0
(lse·log2e is replaced by +inf), so they contribute nothing and never NaN.

Split lists. One dK/dV program per KV block serialises the backward when one block's list is far
longer than the others (NSA's always-selected block 0) or when there are too few blocks to fill
the GPU (NSA's compression attention: 32 KV blocks x 4 heads at 64k, block 0 listing every query
unit). `list_chunk` then cuts every list into chunks (`split.chunk_table`, as `pallas_gpu` does):
one program per chunk walks it for each query head of its head unit and writes float32 partial
dK, dV tiles through a staging tile; `split.sum_partials` adds each block's partials one at a time in
program order (deterministic).

Supported (`check_supported`): bfloat16 or float16; Dqk = Dv in {64, 128}; block_q = 128; block_k
in {64, 128}; Tq a multiple of 128 and Tk of block_k, or any lengths with causal masking
(`backward` pads them as `mosaic_gpu.forward` does: padded keys after every query, padded query
rows with lse -inf); a sliding window with causal masking; sm_scale > 0. Launch parameters:
`BwdConfig`.

`attention(...)`: mosaic_gpu.forward + this backward under one custom_vjp (`with_vjp`, which
benchmarks also use; the library's dispatch lives in api.py).

Like mosaic_gpu.py it only uses API spelled the same in jax 0.10.2 and 0.11.2. Tests
(tests/pallas_kernels/test_mosaic_gpu_bwd.py) run both kernels on CPU in jax's Mosaic GPU
interpreter as extended in tests/pallas_kernels/test_mosaic_gpu.py, and lower them for CUDA.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse import mosaic_gpu, split
from pallas_kernels.block_sparse.mosaic_gpu import (
    _BLOCK_Q, _LOG2E, _SMEM_RESERVED, _WG_ROWS, SMEM_LIMIT, STAGGER, _check_call, _check_smem,
    _check_tiles, _load_vector, _needs_mask, _pad_ragged, _query_tile, _visible, _walk, tile_ranges)

_HALVES = _BLOCK_Q // _WG_ROWS  # dK/dV ring slots (of 64 query rows) per query unit
# dK/dV list split (`list_chunk`): below this many whole-list programs (two waves of an H200's 132
# SMs) the lists are cut into chunks of at least _MIN_CHUNK entries, about _SPLIT_PROGRAMS programs.
_SPLIT_BELOW_PROGRAMS = 264
_SPLIT_PROGRAMS = 2048
_MIN_CHUNK = 8


@dataclasses.dataclass(frozen=True)
class BwdConfig:
  """Launch parameters of the two kernels (`default_config` picks the ring depths that fit; the
  field defaults are the shallowest).

  dq_stages: K/V sub-blocks (`dq_sub_k` keys) in flight in the dQ kernel's ring (>= 2).
  dkv_stages: half query units (Q, dO, lse, delta of 64 rows) in flight in the dK/dV kernel's
    ring (>= 2).
  dq_sub_k: keys per dQ sub-step and ring slot (64, or None: the whole block). 64 keeps S, dP at
    [64, 64] float32 per warpgroup next to the [64, D] dQ accumulator.
  pingpong: the two consumer warpgroups of a kernel take turns on the tensor cores (a schedule
    barrier, as mosaic_gpu's forward does): one runs its elementwise part while the other's
    matmuls run. Not used by a dK/dV kernel of one consumer (block_k 64).
  overlap: software-pipeline each consumer's sub-steps: the second matmuls of sub-step t (dQ; dV,
    dK) are issued after the first ones (S, dP; Sᵀ, dPᵀ) of sub-step t+1 and run while the
    consumer computes dS (Pᵀ, dSᵀ) of t+1 (FA3's intra-warpgroup overlap; more registers live).
    Replaces pingpong.
  registers: per-thread registers of (consumer, producer) warpgroups (`plgpu.set_max_registers`;
    multiples of 8, 2 * consumer + producer <= 512). The dK/dV consumer holds two [64, D] float32
    accumulators and Sᵀ, dPᵀ: FA3's 240 / 24 split.
  stagger: list walks start at entry (program index mod min(stagger, count)), wrapping around
    (`mosaic_gpu.MosaicConfig.stagger`); 0: at entry 0.
  list_chunk: dK/dV list entries per program (`split`): None picks by shape (`list_chunk`), 0
    never splits.
  split_at_run_time: where `list_chunk` splits only because one list *can* be far longer than
    the mean (`runs_split_test`), look at the lists' real lengths on the device and run the whole
    lists (one program per KV block, the deeper ring of `default_config` without a split) unless
    one of them is longer than twice the chunk (`lax.cond`; both paths are compiled). Random
    sparse layouts and sliding windows then skip the split's float32 partials and sum; NSA-like
    lists (block 0 in every list) keep it. On by default since measured: a random 10% layout's
    forward+backward at 32k 4.70 -> 3.71 ms of GPU time (benchmarks/notes_kernels.md, 30).
  """
  dq_stages: int = 2
  dkv_stages: int = 2
  dq_sub_k: int | None = 64
  pingpong: bool = False
  overlap: bool = False
  registers: tuple[int, int] = (240, 24)
  stagger: int = STAGGER
  list_chunk: int | None = None
  split_at_run_time: bool = True

  def __post_init__(self):
    for name in ("dq_stages", "dkv_stages"):
      if getattr(self, name) < 2:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 2")
    if self.dq_sub_k not in (None, 64, 128):
      raise ValueError(f"dq_sub_k={self.dq_sub_k} must be 64, 128 or None")
    if self.stagger < 0:
      raise ValueError(f"stagger={self.stagger} must be >= 0 (0: no stagger)")
    check_list_chunk_and_registers(self.list_chunk, self.registers)


def check_list_chunk_and_registers(list_chunk, registers) -> None:
  """The checks of `list_chunk` and `registers` that BwdConfig and mosaic_gpu_token_dkv's config share."""
  if list_chunk is not None and list_chunk < 0:
    raise ValueError(f"list_chunk={list_chunk} must be None (by shape), 0 (never split) or > 0")
  cons, prod = registers
  if cons % 8 or prod % 8 or not 24 <= prod <= cons <= 256 or 2 * cons + prod > 512:
    raise ValueError(f"registers={registers} must be multiples of 8 with 24 <= producer <= "
                     "consumer <= 256 and 2 * consumer + producer <= 512")


def dq_smem_bytes(d, slot_k, stages, itemsize, has_seg):
  """Shared memory of a dQ program: Q, dO tiles, the K/V ring of `stages` slots of `slot_k` keys,
  lse/delta, positions/segments."""
  tiles = 2 * _BLOCK_Q * d * itemsize + stages * 2 * slot_k * d * itemsize
  ints = (1 + has_seg) * 4 * (_BLOCK_Q + stages * slot_k)
  return tiles + ints + 2 * 4 * _BLOCK_Q + _SMEM_RESERVED


def dkv_smem_bytes(d, block_k, stages, itemsize, has_seg, partials=False):
  """Shared memory of a dK/dV program: K, V tiles, the ring of half units (Q, dO, lse, delta,
  positions / segment ids of 64 rows); partials (split lists): plus a float32 staging tile per
  consumer."""
  tiles = 2 * block_k * d * itemsize + stages * 2 * _WG_ROWS * d * itemsize
  ints = (1 + has_seg) * 4 * (block_k + stages * _WG_ROWS) + stages * 2 * 4 * _WG_ROWS
  return tiles + ints + partials * block_k * d * 4 + _SMEM_RESERVED


def default_config(q, layout, num_kv_heads: int | None = None) -> BwdConfig:
  """The deepest rings (dQ: up to 6 sub-blocks of 64 keys, dK/dV: up to 6 half units) that fit
  shared memory, segment ids included (and the split's staging tiles when `list_chunk` splits the
  lists of this call: pass num_kv_heads, q's batch is the batch)."""
  d, size, bk = q.shape[-1], jnp.dtype(q.dtype).itemsize, layout.block_k
  splits = num_kv_heads is not None and list_chunk(layout, num_kv_heads, q.shape[0], BwdConfig()) > 0
  deepest = lambda fn, slot, *extra: max(  # noqa: E731
      s for s in range(2, 7) if s == 2 or fn(d, slot, s, size, True, *extra) <= SMEM_LIMIT)
  return BwdConfig(dq_stages=deepest(dq_smem_bytes, _WG_ROWS),
                   dkv_stages=deepest(dkv_smem_bytes, bk, splits))


def list_chunk(layout, num_kv_heads: int, batch: int, config: BwdConfig) -> int:
  """dK/dV list entries per program, 0 for one program per (KV block, KV head, batch).

  `config.list_chunk` if set. Otherwise split when one KV block's list can be much longer than the
  mean (nq > 4 * ceil(nq * K / nk), `pallas_gpu._list_chunk`'s test: e.g. NSA's always-selected
  block 0), into chunks of twice the mean; or when there are fewer whole-list programs than
  _SPLIT_BELOW_PROGRAMS (a causal layout over few KV blocks, e.g. NSA's compression attention:
  32 blocks x 4 KV heads at 64k, block 0 listing every query unit), into chunks of at least
  _MIN_CHUNK entries, about _SPLIT_PROGRAMS programs in all."""
  if config.list_chunk is not None:
    return config.list_chunk
  nq, cap = layout.kv_indices.shape[2:]
  mean = _mean_list(layout)
  if nq > 4 * mean:
    return max(_MIN_CHUNK, 2 * mean)
  if layout.num_kv_blocks * num_kv_heads * batch < _SPLIT_BELOW_PROGRAMS:
    entries = nq * cap * layout.kv_indices.shape[1] * batch  # bound on the entries of all lists
    chunk = max(_MIN_CHUNK, -(-entries // _SPLIT_PROGRAMS))
    return chunk if nq > chunk else 0
  return 0


def runs_split_test(layout, num_kv_heads: int, batch: int, config: BwdConfig) -> bool:
  """Whether `backward` picks between the split and the whole lists on the device: the config asks
  for it (`split_at_run_time`, `list_chunk` None) and `list_chunk` splits only for the lists' possible
  length, while whole lists would give enough programs."""
  if not config.split_at_run_time or config.list_chunk is not None:
    return False
  return (layout.kv_indices.shape[2] > 4 * _mean_list(layout)
          and layout.num_kv_blocks * num_kv_heads * batch >= _SPLIT_BELOW_PROGRAMS)


def _mean_list(layout) -> int:
  """A static bound on the mean KV-major list: the query-major entries' capacity over the KV blocks."""
  nq, cap = layout.kv_indices.shape[2:]
  return -(-nq * cap // layout.num_kv_blocks)


def check_supported(q, k, v, layout, config: BwdConfig | None = None, has_seg: bool = True,
                    causal: bool = False) -> None:
  """Raise ValueError naming the values this backward cannot run (the caller falls back to Triton).
  Ragged ends are served only with causal masking, which hides the padding `backward` adds."""
  _check_tiles("mosaic_gpu_bwd", q, k, v, layout, causal)
  hkv = k.shape[2]
  cfg = config or default_config(q, layout, hkv)
  if cfg.dq_sub_k is not None and cfg.dq_sub_k > layout.block_k:
    raise ValueError(f"mosaic_gpu_bwd: dq_sub_k={cfg.dq_sub_k} exceeds block_k={layout.block_k}")
  d, size = q.shape[-1], jnp.dtype(q.dtype).itemsize
  splits = list_chunk(layout, hkv, q.shape[0], cfg) > 0
  for name, fn, slot, stages, extra in (
      ("dq_stages", dq_smem_bytes, cfg.dq_sub_k or layout.block_k, cfg.dq_stages, ()),
      ("dkv_stages", dkv_smem_bytes, layout.block_k, cfg.dkv_stages, (splits,))):
    _check_smem("mosaic_gpu_bwd", f"{name}={stages}" + (" with split lists" if extra and splits else ""),
                layout.block_k, d, fn(d, slot, stages, size, has_seg, *extra))


@dataclasses.dataclass(frozen=True)
class _Geometry:
  nq: int
  nk: int
  hq: int
  hkv: int
  hl: int
  bl: int
  block_k: int
  d: int
  dtype: jnp.dtype
  causal: bool
  has_seg: bool
  scale_log2: float
  sm_scale: float
  cfg: BwdConfig
  split: bool = False   # the dK/dV kernel walks chunks of `split.chunk_table` (float32 partials)
  window: int | None = None  # sliding window (causal only), as mosaic_gpu's

  @property
  def mask_mode(self):  # as mosaic_gpu's
    return "skip" if self.causal or self.has_seg else "never"

  @property
  def group(self):      # query heads per KV head
    return self.hq // self.hkv

  @property
  def r(self):          # query heads per head unit
    return self.hq // self.hl

  @property
  def side_copies(self):  # positions (causal) and segment ids: TMA copies next to a tile
    return self.causal + self.has_seg

  @property
  def dkv_consumers(self):
    return self.block_k // _WG_ROWS

  @property
  def sub_k(self):
    return self.cfg.dq_sub_k or self.block_k


_SWIZZLED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
_SWIZZLED_F32 = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
_ROW = plgpu.Layout.WGMMA.reduce(1)
_COL = plgpu.Layout.WGMMA.reduce(0)


def _bcast(x, shape, dim):
  return lax.broadcast_in_dim(x, shape, [dim])


def _lse2(lse):
  """Natural-log lse to base 2; -inf rows become +inf so that exp2(s - lse2) = 0."""
  return jnp.where(lse == -jnp.inf, jnp.inf, lse * _LOG2E)


def _mask(g, x, q_pos, kv_pos, q_seg, kv_seg, q_dim):
  """where(visible, x, 0) for x [rows, cols]; q_dim: the dim of the query axis (0 or 1)."""
  shape = x.shape
  k_dim = 1 - q_dim
  ok = None
  if g.causal:
    ok = _visible(g, _bcast(kv_pos, shape, k_dim), _bcast(q_pos, shape, q_dim))
  if g.has_seg:
    same = _bcast(kv_seg, shape, k_dim) == _bcast(q_seg, shape, q_dim)
    ok = same if ok is None else ok & same
  return jnp.where(ok, x, 0.0)


def _apply_mask(g, x, masked, need):
  """masked(x) as `g.mask_mode` asks: only where `need` (skip: a traced bool), or never."""
  if g.mask_mode == "skip":
    return lax.cond(need, masked, lambda x: x, x)
  return x


def _copy_sides(g, srcs, dsts, index, at, bar):
  """TMA-copy the key or query positions (causal) and segment ids (with segments) of global rows
  `index` from srcs = (pos_ref, seg_ref) into entry `at` of dsts = (pos, seg) shared memory, on
  `bar` (next to the tiles of those rows)."""
  for on, src, dst in zip((g.causal, g.has_seg), srcs, dsts):
    if on:
      plgpu.copy_gmem_to_smem(src.at[index], dst.at[at], bar)


def _load_sides(g, pos, seg, at, layout):
  """(positions, segment ids) of entry `at` of the shared-memory refs `pos`, `seg` as vectors with
  `layout`; None for what the launch does not have."""
  return (_load_vector(pos.at[at], layout) if g.causal else None,
          _load_vector(seg.at[at], layout) if g.has_seg else None)


def _matmuls(*specs, issued=None):
  """Run wgmmas into fresh float32 accumulators, one run_scoped: specs are (shape, a, b, init)
  with init None (zeros) or an array to accumulate onto. Returns the accumulators' values.
  issued: called after the wgmmas are issued, before their results are awaited."""
  def body(*refs):
    for ref, (_, a, b, init) in zip(refs, specs):
      if init is not None:
        ref[...] = init
      plgpu.wgmma(ref, a, b)
    if issued is not None:
      issued()
    return tuple(ref[...] for ref in refs)
  accs = [plgpu.ACC(shape, jnp.float32) for shape, *_ in specs]
  return pl.run_scoped(body, *accs)


class _Turns:
  """The consumers' schedule barrier (`BwdConfig.pingpong`); no-ops when off. Per sub-step a
  consumer calls `issued()` after issuing its first matmuls, `release()` after its elementwise
  part and `acquire()` before its second matmuls; `start(wg)` / `finish(wg)` put the second
  consumer half a sub-step behind the first and balance the barrier's phases at the end."""

  def __init__(self, barrier):
    self.barrier = barrier

  def issued(self):
    if self.barrier is not None:
      plgpu.barrier_arrive(self.barrier)
      plgpu.barrier_wait(self.barrier)

  def release(self):
    if self.barrier is not None:
      plgpu.barrier_arrive(self.barrier)

  def acquire(self):
    if self.barrier is not None:
      plgpu.barrier_wait(self.barrier)

  def start(self, wg):
    if self.barrier is not None:
      pl.when(wg == 1)(self.issued)

  def finish(self, wg):
    if self.barrier is not None:
      pl.when(wg == 0)(self.issued)


def _ring_producer(g, stages, total, load, free):
  """Issue load(n, slot) for steps n < total into slot n mod stages, waiting for the slot's release
  (free[slot], both consumers) from step n - stages; then observe the last releases."""
  for n in range(stages):
    pl.when(n < total)(functools.partial(load, n, n))

  @pl.loop(stages, jnp.maximum(total, stages))
  def _refill(n):
    slot = lax.rem(n, stages)
    plgpu.barrier_wait(free.at[slot])
    load(n, slot)

  @pl.loop(jnp.maximum(total - stages, 0), total)
  def _drain(n):
    plgpu.barrier_wait(free.at[lax.rem(n, stages)])


def _specialize(g, consumers, scratch, barriers, consumer, producer):
  """Run consumer(smem, barriers, wg) on warpgroups wg < `consumers` and producer(smem, barriers)
  on the last one, with the register split of `g.cfg.registers`."""
  def body(s, b):
    wg = lax.axis_index("wg")

    @pl.when(wg < consumers)
    def _consume():
      plgpu.set_max_registers(g.cfg.registers[0], action="increase")
      consumer(s, b, wg)

    @pl.when(wg == consumers)
    def _produce():
      plgpu.set_max_registers(g.cfg.registers[1], action="decrease")
      producer(s, b)

  pl.run_scoped(body, scratch, barriers, collective_axes="wg")


# ----------------------------------------------------------------------------------------------
# dQ


def _dq_kernel(kv_idx_ref, kv_cnt_ref, q_range_ref, kv_range_ref, q_pos_ref, kv_pos_ref, *refs,
               g: _Geometry):
  if g.has_seg:
    q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
  else:
    q_seg_ref = kv_seg_ref = None
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
  stages, sub = g.cfg.dq_stages, g.sub_k
  parts = g.block_k // sub   # ring steps (sub-blocks) per listed block
  batch, head = lax.axis_index("batch"), lax.axis_index("heads")
  unit = g.nq - 1 - lax.axis_index("q")
  lb = batch if g.bl > 1 else 0
  hu = head // g.r
  kv_head = head // g.group
  count = kv_cnt_ref[lb, hu, unit]
  entry = _walk(g, lax.axis_index("q"), count)
  block_at = lambda n: kv_idx_ref[lb, hu, unit, entry(n)]  # noqa: E731
  ints = lambda *shape: plgpu.SMEM(shape, jnp.int32)  # noqa: E731
  scratch = dict(
      q=plgpu.SMEM((2, _WG_ROWS, g.d), g.dtype, transforms=_SWIZZLED),
      do=plgpu.SMEM((2, _WG_ROWS, g.d), g.dtype, transforms=_SWIZZLED),
      k=plgpu.SMEM((stages, sub, g.d), g.dtype, transforms=_SWIZZLED),
      v=plgpu.SMEM((stages, sub, g.d), g.dtype, transforms=_SWIZZLED),
      lse=plgpu.SMEM((2, _WG_ROWS), jnp.float32),
      delta=plgpu.SMEM((2, _WG_ROWS), jnp.float32),
      qpos=ints(2, _WG_ROWS) if g.causal else None,
      qseg=ints(2, _WG_ROWS) if g.has_seg else None,
      pos=ints(stages, sub) if g.causal else None,
      seg=ints(stages, sub) if g.has_seg else None)
  barriers = dict(
      q=plgpu.Barrier(num_arrivals=4 + g.side_copies, num_barriers=2),
      kv=plgpu.Barrier(num_arrivals=2 + g.side_copies, num_barriers=stages),
      free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      turn=plgpu.Barrier(num_arrivals=2) if g.cfg.pingpong and not g.cfg.overlap else None)

  def producer(s, b):
    def load(t, slot):
      rows = pl.ds(block_at(t // parts) * g.block_k + lax.rem(t, parts) * sub, sub)
      bar = b["kv"].at[slot]
      plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv_head], s["k"].at[slot], bar)
      plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], s["v"].at[slot], bar)
      _copy_sides(g, (kv_pos_ref, kv_seg_ref), (s["pos"], s["seg"]), (batch, rows), slot, bar)
    _ring_producer(g, stages, parts * count, load, b["free"])

  def consumer(s, b, wg):
    rows = pl.ds(unit * _BLOCK_Q + wg * _WG_ROWS, _WG_ROWS)
    q_tile, do_tile, bar = s["q"].at[wg], s["do"].at[wg], b["q"].at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_tile, bar)
    plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_tile, bar)
    plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], s["lse"].at[wg], bar)
    plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], s["delta"].at[wg], bar)
    _copy_sides(g, (q_pos_ref, q_seg_ref), (s["qpos"], s["qseg"]), (batch, rows), wg, bar)
    plgpu.barrier_wait(bar)
    lse2 = _lse2(_load_vector(s["lse"].at[wg], _ROW))
    delta = _load_vector(s["delta"].at[wg], _ROW)
    q_pos, q_seg = _load_sides(g, s["qpos"], s["qseg"], wg, _ROW)
    q_tile_ranges = _query_tile(g, q_range_ref, (batch, unit * 2 + wg))
    shape = (_WG_ROWS, sub)
    turns = _Turns(b["turn"])

    def needs_mask(n):
      """Whether step n's block needs the element mask (skip mode): scalar loads from global
      memory, issued a step ahead so that their latency hides behind the matmuls."""
      block = block_at(jnp.clip(n, 0, jnp.maximum(count - 1, 0)))
      return _needs_mask(g, kv_range_ref, (batch, block), q_tile_ranges)

    def needs(n, carried):
      """(step n's flag, taken from the carry, and step n+1's, to carry on) in skip mode."""
      return (carried[0], [needs_mask(n + 1)]) if g.mask_mode == "skip" else (None, [])

    def grad_logits(slot, sc, dp, need):
      """dS in the input dtype from S, dP of the sub-block in `slot`."""
      p = jnp.exp2(sc * g.scale_log2 - _bcast(lse2, shape, 0))

      def masked(p):
        kv_pos, kv_seg = _load_sides(g, s["pos"], s["seg"], slot, _COL)
        return _mask(g, p, q_pos, kv_pos, q_seg, kv_seg, q_dim=0)
      p = _apply_mask(g, p, masked, need)
      return (p * (dp - _bcast(delta, shape, 0))).astype(g.dtype)

    def step(n, carry):
      dq, *carried = carry
      need, nxt = needs(n, carried)
      for c in range(parts):
        slot = lax.rem(parts * n + c, stages)
        k_sub, v_sub = s["k"].at[slot], s["v"].at[slot]
        plgpu.barrier_wait(b["kv"].at[slot])
        sc, dp = _matmuls((shape, q_tile, k_sub.transpose((1, 0)), None),
                          (shape, do_tile, v_sub.transpose((1, 0)), None), issued=turns.issued)
        ds = grad_logits(slot, sc, dp, need)
        turns.release()
        turns.acquire()
        (dq,) = _matmuls(((_WG_ROWS, g.d), ds, k_sub, dq))
        plgpu.barrier_arrive(b["free"].at[slot])
      return (dq, *nxt)

    def step_overlapped(n, carry):
      """Ring step t issues S, dP of t, then dQ += dS K of t-1 (carried dS; zeros before the
      first, on t's loaded keys), waits for the first two only and computes dS of t while dQ's
      matmul runs; then releases t-1's slot."""
      dq, ds_prev, *carried = carry
      need, nxt = needs(n, carried)
      for c in range(parts):
        t = parts * n + c
        slot = lax.rem(t, stages)
        prev = jnp.where(t > 0, lax.rem(t + stages - 1, stages), slot)
        k_sub, v_sub, k_prev = s["k"].at[slot], s["v"].at[slot], s["k"].at[prev]
        plgpu.barrier_wait(b["kv"].at[slot])

        def body(s_ref, dp_ref, dq_ref, slot=slot, k_sub=k_sub, v_sub=v_sub, k_prev=k_prev):
          dq_ref[...] = dq
          plgpu.wgmma(s_ref, q_tile, k_sub.transpose((1, 0)))
          plgpu.wgmma(dp_ref, do_tile, v_sub.transpose((1, 0)))
          plgpu.wgmma(dq_ref, ds_prev, k_prev)
          sc = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
          dp = plgpu.wgmma_accumulator_load(dp_ref, wait_n=None)
          ds = grad_logits(slot, sc, dp, need)
          return dq_ref[...], ds
        dq, ds_prev = pl.run_scoped(
            body, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32),
            plgpu.ACC((_WG_ROWS, g.d), jnp.float32))
        pl.when(t > 0)(lambda prev=prev: plgpu.barrier_arrive(b["free"].at[prev]))
      return (dq, ds_prev, *nxt)

    dq = plgpu.layout_cast(jnp.zeros((_WG_ROWS, g.d), jnp.float32), plgpu.Layout.WGMMA)
    need0 = [needs_mask(0)] if g.mask_mode == "skip" else []
    if g.cfg.overlap:
      none = plgpu.layout_cast(jnp.zeros(shape, g.dtype), plgpu.Layout.WGMMA)
      dq, ds, *_ = lax.fori_loop(0, count, step_overlapped, (dq, none, *need0))

      @pl.when(count > 0)
      def _last():
        """dQ += dS K of the last ring step, then release its slot."""
        last = lax.rem(parts * count - 1, stages)
        (dq_,) = _matmuls(((_WG_ROWS, g.d), ds, s["k"].at[last], dq))
        plgpu.barrier_arrive(b["free"].at[last])
        q_tile[...] = (dq_ * g.sm_scale).astype(g.dtype)

      @pl.when(count == 0)
      def _none():
        q_tile[...] = (dq * g.sm_scale).astype(g.dtype)
    else:
      turns.start(wg)
      dq, *_ = lax.fori_loop(0, count, step, (dq, *need0))
      turns.finish(wg)
      q_tile[...] = (dq * g.sm_scale).astype(g.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[batch, rows, head])
    plgpu.wait_smem_to_gmem(0)

  _specialize(g, 2, scratch, barriers, consumer, producer)


# ----------------------------------------------------------------------------------------------
# dK / dV


def _dkv_kernel(list_ref, q_idx_ref, q_range_ref, kv_range_ref, q_pos_ref, kv_pos_ref, *refs,
                g: _Geometry):
  """list_ref: kv_offsets [Bl, Hl, nk+1] (one program per KV block) or, split, the chunk table
  [Bl, Hkv, 4, P] of `split.chunk_table` (one program per chunk; dk_ref, dv_ref are then float32
  partials [B, Hkv, P * block_k, D])."""
  if g.has_seg:
    q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
  else:
    q_seg_ref = kv_seg_ref = None
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
  stages, nc = g.cfg.dkv_stages, g.dkv_consumers
  batch, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
  lb = batch if g.bl > 1 else 0
  if g.split:
    # a chunk [start, end) of head unit u's list of one KV block, walked for each of u's r heads
    seed = lax.axis_index("k")
    block, u = list_ref[lb, kv_head, 0, seed], list_ref[lb, kv_head, 1, seed]
    start, end = list_ref[lb, kv_head, 2, seed], list_ref[lb, kv_head, 3, seed]
    walked_heads = g.r

    def head_list(i):
      """(query head, head unit, first CSR entry, entry count) of the chunk's i-th query head."""
      return u * g.r + i, u, start, end - start
  else:
    # every list of the KV block, one per query head of the group (a head unit's list per head)
    seed = block = lax.axis_index("k")
    walked_heads = g.group

    def head_list(i):
      """(query head, head unit, first CSR entry, entry count) of the group's i-th query head."""
      head = kv_head * g.group + i
      u = head // g.r
      lo = list_ref[lb, u, block]
      return head, u, lo, list_ref[lb, u, block + 1] - lo

  def total_steps():
    return lax.fori_loop(0, walked_heads, lambda i, t: t + head_list(i)[3], jnp.int32(0))

  def for_each_step(fn, carry):
    """fn(step, head, unit, carry) over the steps of the walk, in order (heads, then entries)."""
    def over_head(i, c):
      base, carry = c
      head, u, lo, count = head_list(i)
      entry = _walk(g, seed, count)

      def over_entry(n, carry):
        unit = q_idx_ref[lb, u, lo + entry(n)]
        return fn(base + n, head, unit, carry)
      return base + count, lax.fori_loop(0, count, over_entry, carry)
    return lax.fori_loop(0, walked_heads, over_head, (jnp.int32(0), carry))[1]

  ints = lambda *shape: plgpu.SMEM(shape, jnp.int32)  # noqa: E731
  f32 = lambda *shape: plgpu.SMEM(shape, jnp.float32)  # noqa: E731
  scratch = dict(
      k=plgpu.SMEM((nc, _WG_ROWS, g.d), g.dtype, transforms=_SWIZZLED),
      v=plgpu.SMEM((nc, _WG_ROWS, g.d), g.dtype, transforms=_SWIZZLED),
      q=plgpu.SMEM((stages, _WG_ROWS, g.d), g.dtype, transforms=_SWIZZLED),
      do=plgpu.SMEM((stages, _WG_ROWS, g.d), g.dtype, transforms=_SWIZZLED),
      lse=f32(stages, _WG_ROWS),
      delta=f32(stages, _WG_ROWS),
      kpos=ints(nc, _WG_ROWS) if g.causal else None,
      kseg=ints(nc, _WG_ROWS) if g.has_seg else None,
      pos=ints(stages, _WG_ROWS) if g.causal else None,
      seg=ints(stages, _WG_ROWS) if g.has_seg else None,
      part=plgpu.SMEM((nc, _WG_ROWS, g.d), jnp.float32, transforms=_SWIZZLED_F32) if g.split else None)
  barriers = dict(
      kv=plgpu.Barrier(num_arrivals=2 + g.side_copies, num_barriers=nc),
      q=plgpu.Barrier(num_arrivals=4 + g.side_copies, num_barriers=stages),
      free=plgpu.Barrier(num_arrivals=nc, num_barriers=stages),
      turn=(plgpu.Barrier(num_arrivals=2) if g.cfg.pingpong and not g.cfg.overlap and nc == 2
            else None))

  def producer(s, b):
    total = _HALVES * total_steps()   # ring steps: half units

    def load(t, slot, head, unit, half):
      rows = pl.ds(unit * _BLOCK_Q + half * _WG_ROWS, _WG_ROWS)
      bar = b["q"].at[slot]
      plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], s["q"].at[slot], bar)
      plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], s["do"].at[slot], bar)
      plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], s["lse"].at[slot], bar)
      plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], s["delta"].at[slot], bar)
      _copy_sides(g, (q_pos_ref, q_seg_ref), (s["pos"], s["seg"]), (batch, rows), slot, bar)

    def issue(n, head, unit, carry):
      for half in range(_HALVES):
        t = _HALVES * n + half
        slot = lax.rem(t, stages)
        pl.when(t >= stages)(lambda slot=slot: plgpu.barrier_wait(b["free"].at[slot]))
        load(t, slot, head, unit, half)
      return carry
    for_each_step(issue, jnp.int32(0))

    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _drain(n):
      plgpu.barrier_wait(b["free"].at[lax.rem(n, stages)])

  def store_outputs(s, keys, wg):
    """store(dk, dv): this consumer's rows of dK (scaled by sm_scale) and dV to global memory, in
    the input dtype, or as float32 partials of the program's chunk when split (through one staging
    tile: dK, then dV)."""
    def store(dk, dv):
      if g.split:
        rows = pl.ds(seed * g.block_k + wg * _WG_ROWS, _WG_ROWS)
        part = s["part"].at[wg]
        for x, ref, wait in ((dk * g.sm_scale, dk_ref, True), (dv, dv_ref, False)):
          part[...] = x
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(part, ref.at[batch, kv_head, rows])
          plgpu.wait_smem_to_gmem(0, wait_read_only=wait)
        return
      k_tile, v_tile = s["k"].at[wg], s["v"].at[wg]
      k_tile[...] = (dk * g.sm_scale).astype(g.dtype)
      v_tile[...] = dv.astype(g.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[batch, keys, kv_head])
      plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[batch, keys, kv_head])
      plgpu.wait_smem_to_gmem(0)
    return store

  def consumer(s, b, wg):
    keys = pl.ds(block * g.block_k + wg * _WG_ROWS, _WG_ROWS)
    k_tile, v_tile, bar = s["k"].at[wg], s["v"].at[wg], b["kv"].at[wg]
    plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], k_tile, bar)
    plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], v_tile, bar)
    _copy_sides(g, (kv_pos_ref, kv_seg_ref), (s["kpos"], s["kseg"]), (batch, keys), wg, bar)
    plgpu.barrier_wait(bar)
    kv_pos, kv_seg = _load_sides(g, s["kpos"], s["kseg"], wg, _ROW)
    key_tile = (batch, block * nc + wg)
    shape = (_WG_ROWS, _WG_ROWS)   # Sᵀ, dPᵀ of one half unit (the wgmma K of dV += Pᵀ dO: 64)
    turns = _Turns(b["turn"])
    store = store_outputs(s, keys, wg)

    def needs_masks(unit):
      if g.mask_mode != "skip":
        return [None] * _HALVES
      # scalar loads issued before the slot's wait, used after the matmuls
      return [_needs_mask(g, kv_range_ref, key_tile,
                          _query_tile(g, q_range_ref, (batch, unit * _HALVES + half)))
              for half in range(_HALVES)]

    def probs(slot, st, dpt, need):
      """(Pᵀ, dSᵀ) in the input dtype from Sᵀ, dPᵀ of the half unit in `slot`."""
      lse2 = _lse2(_load_vector(s["lse"].at[slot], _COL))
      pt = jnp.exp2(st * g.scale_log2 - _bcast(lse2, shape, 1))

      def masked(p):
        q_pos, q_seg = _load_sides(g, s["pos"], s["seg"], slot, _COL)
        return _mask(g, p, q_pos, kv_pos, q_seg, kv_seg, q_dim=1)
      pt = _apply_mask(g, pt, masked, need)
      delta = _load_vector(s["delta"].at[slot], _COL)
      return pt.astype(g.dtype), (pt * (dpt - _bcast(delta, shape, 1))).astype(g.dtype)

    def step(n, head, unit, carry):
      dk, dv = carry
      needs = needs_masks(unit)
      for half in range(_HALVES):
        slot = lax.rem(_HALVES * n + half, stages)
        q_sub, do_sub = s["q"].at[slot], s["do"].at[slot]
        plgpu.barrier_wait(b["q"].at[slot])
        st, dpt = _matmuls((shape, k_tile, q_sub.transpose((1, 0)), None),
                           (shape, v_tile, do_sub.transpose((1, 0)), None), issued=turns.issued)
        pt, dst = probs(slot, st, dpt, needs[half])
        turns.release()
        turns.acquire()
        dv, dk = _matmuls(((_WG_ROWS, g.d), pt, do_sub, dv), ((_WG_ROWS, g.d), dst, q_sub, dk))
        plgpu.barrier_arrive(b["free"].at[slot])
      return dk, dv

    def step_overlapped(n, head, unit, carry):
      """Ring step t issues Sᵀ, dPᵀ of t, then dV, dK of t-1 (carried Pᵀ, dSᵀ; zeros before the
      first, on t's loaded rows), waits for the first two only and computes Pᵀ, dSᵀ of t while
      the others run; then releases t-1's slot."""
      dk, dv, pt_prev, dst_prev = carry
      needs = needs_masks(unit)
      for half in range(_HALVES):
        t = _HALVES * n + half
        slot = lax.rem(t, stages)
        prev = jnp.where(t > 0, lax.rem(t + stages - 1, stages), slot)
        q_sub, do_sub = s["q"].at[slot], s["do"].at[slot]
        q_prev, do_prev = s["q"].at[prev], s["do"].at[prev]
        plgpu.barrier_wait(b["q"].at[slot])

        def body(st_ref, dpt_ref, dv_ref, dk_ref, slot=slot, q_sub=q_sub, do_sub=do_sub,
                 q_prev=q_prev, do_prev=do_prev, need=needs[half]):
          dv_ref[...] = dv
          dk_ref[...] = dk
          plgpu.wgmma(st_ref, k_tile, q_sub.transpose((1, 0)))
          plgpu.wgmma(dpt_ref, v_tile, do_sub.transpose((1, 0)))
          plgpu.wgmma(dv_ref, pt_prev, do_prev)
          plgpu.wgmma(dk_ref, dst_prev, q_prev)
          st = plgpu.wgmma_accumulator_load(st_ref, wait_n=2)
          dpt = plgpu.wgmma_accumulator_load(dpt_ref, wait_n=None)
          pt, dst = probs(slot, st, dpt, need)
          return dk_ref[...], dv_ref[...], pt, dst
        dk, dv, pt_prev, dst_prev = pl.run_scoped(
            body, *[plgpu.ACC(shp, jnp.float32) for shp in (shape, shape, (_WG_ROWS, g.d), (_WG_ROWS, g.d))])
        pl.when(t > 0)(lambda prev=prev: plgpu.barrier_arrive(b["free"].at[prev]))
      return dk, dv, pt_prev, dst_prev

    zeros = plgpu.layout_cast(jnp.zeros((_WG_ROWS, g.d), jnp.float32), plgpu.Layout.WGMMA)
    if g.cfg.overlap:
      none = plgpu.layout_cast(jnp.zeros(shape, g.dtype), plgpu.Layout.WGMMA)
      dk, dv, pt, dst = for_each_step(step_overlapped, (zeros, zeros, none, none))
      total = _HALVES * total_steps()

      @pl.when(total > 0)
      def _last():
        """dV, dK of the last ring step, then release its slot."""
        last = lax.rem(total - 1, stages)
        dv_, dk_ = _matmuls(((_WG_ROWS, g.d), pt, s["do"].at[last], dv),
                            ((_WG_ROWS, g.d), dst, s["q"].at[last], dk))
        plgpu.barrier_arrive(b["free"].at[last])
        store(dk_, dv_)

      @pl.when(total == 0)
      def _none():
        store(dk, dv)
    else:
      turns.start(wg)
      dk, dv = for_each_step(step, (zeros, zeros))
      turns.finish(wg)
      store(dk, dv)

  _specialize(g, nc, scratch, barriers, consumer, producer)


# ----------------------------------------------------------------------------------------------
# Wrappers


def _geometry(q, k, layout, sm_scale, causal, has_seg, cfg, split_lists=False, window=None) -> _Geometry:
  return _Geometry(nq=q.shape[1] // _BLOCK_Q, nk=k.shape[1] // layout.block_k, hq=q.shape[2],
                   hkv=k.shape[2], hl=layout.kv_indices.shape[1], bl=layout.kv_indices.shape[0],
                   block_k=layout.block_k, d=q.shape[-1], dtype=jnp.dtype(q.dtype),
                   causal=bool(causal), has_seg=has_seg, scale_log2=float(sm_scale) * _LOG2E,
                   sm_scale=float(sm_scale), cfg=cfg, split=split_lists, window=window)


def backward(q, k, v, out, lse, delta, d_out, layout, q_pos, kv_pos, q_seg, kv_seg, *, sm_scale,
             causal, interpret=False, window=None, config: BwdConfig | None = None,
             kernels=("dq", "dkv")):
  """(dq, dk, dv) in the dtypes of (q, k, v); see the module docstring. interpret: False, or the
  Mosaic GPU interpreter's parameters (`InterpretGPUParams`) passed to `plgpu.kernel`.
  kernels: which kernels to launch (benchmarks time them apart); a skipped one's outputs are None."""
  del out  # probabilities are recomputed from lse; delta carries rowsum(dO * O) - dlse
  _check_call("mosaic_gpu_bwd", interpret, window, sm_scale, causal)
  has_seg = q_seg is not None
  b, tq, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  cfg = config or default_config(q, layout, hkv)
  check_supported(q, k, v, layout, cfg, has_seg, causal)
  chunk = list_chunk(layout, hkv, b, cfg)
  # ragged ends (causal only) padded as the forward pads them; padded query rows see nothing
  pad_q = -tq % _BLOCK_Q
  q, k, v, q_pos, kv_pos, q_seg, kv_seg = _pad_ragged(q, k, v, q_pos, kv_pos, q_seg, kv_seg,
                                                      layout.block_k)
  d_out = jnp.pad(d_out.astype(q.dtype), ((0, 0), (0, pad_q), (0, 0), (0, 0)))
  lse = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, pad_q)), constant_values=-jnp.inf)
  delta = jnp.pad(delta.astype(jnp.float32), ((0, 0), (0, 0), (0, pad_q)))
  g = _geometry(q, k, layout, sm_scale, causal, has_seg, cfg, split_lists=chunk > 0, window=window)
  q_pos, kv_pos = q_pos.astype(jnp.int32), kv_pos.astype(jnp.int32)
  q_range = tile_ranges(q_pos, q_seg, _WG_ROWS, window, keys=False)          # [B, Tq/64, 4]
  kv_range_dq = tile_ranges(kv_pos, kv_seg, g.block_k, window, keys=True)    # [B, nk, 4]
  kv_range_dkv = tile_ranges(kv_pos, kv_seg, _WG_ROWS, window, keys=True)    # [B, Tk/64, 4]
  aux = [q_pos, kv_pos]
  if has_seg:
    aux += [q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)]
  acts = [q, k, v, d_out, lse, delta]
  params = dict(compiler_params=plgpu.CompilerParams(approx_math=True), thread_name="wg",
                interpret=interpret or None)

  dq = dk = dv = None
  if "dq" in kernels:
    dq = plgpu.kernel(
        functools.partial(_dq_kernel, g=g), out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(g.nq, hq, b), grid_names=("q", "heads", "batch"), num_threads=3,
        kernel_name="block_sparse_dq_mosaic", **params,
    )(layout.kv_indices.astype(jnp.int32), layout.kv_counts.astype(jnp.int32), q_range, kv_range_dq,
      *aux, *acts)[:, :tq]
  if "dkv" in kernels:
    ins = (layout.q_indices.astype(jnp.int32), q_range, kv_range_dkv, *aux, *acts)

    def dkv(geometry):
      return functools.partial(plgpu.kernel, functools.partial(_dkv_kernel, g=geometry),
                               grid_names=("k", "heads", "batch"),
                               num_threads=geometry.dkv_consumers + 1, **params)

    def split_lists():
      programs = split.num_programs(layout, hkv, chunk)
      table, first = split.chunk_table(layout, hkv, chunk, programs)
      part = jax.ShapeDtypeStruct((b, hkv, programs * g.block_k, d), jnp.float32)
      dk, dv = dkv(g)(out_type=(part, part), grid=(programs, hkv, b),
                      kernel_name="block_sparse_dkv_partial_mosaic")(table, *ins)
      return tuple(split.sum_partials(x, first, g.block_k, y.dtype, interpret=bool(interpret))
                   for x, y in ((dk, k), (dv, v)))

    def whole_lists(geometry):
      return dkv(geometry)(
          out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
          grid=(g.nk, hkv, b), kernel_name="block_sparse_dkv_mosaic",
      )(layout.kv_offsets.astype(jnp.int32), *ins)

    if not chunk:
      dk, dv = whole_lists(g)
    elif runs_split_test(layout, hkv, b, cfg):
      stages = max(cfg.dkv_stages, default_config(q, layout).dkv_stages)   # no staging tiles
      whole = dataclasses.replace(g, split=False, cfg=dataclasses.replace(cfg, dkv_stages=stages))
      dk, dv = lax.cond(split.longest_list(layout) > 2 * chunk, split_lists,
                        functools.partial(whole_lists, whole))
    else:
      dk, dv = split_lists()
    dk, dv = dk[:, :tk], dv[:, :tk]
  return dq, dk, dv


def with_vjp(fwd, bwd):
  """A differentiable (out, lse) = fwd(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg) whose backward
  is bwd(q, k, v, out, lse, delta, d_out, layout, q_pos, kv_pos, q_seg, kv_seg) -> (dq, dk, dv),
  delta = rowsum(dO * O) - dlse as api.py computes it (0 on rows with lse -inf)."""
  @jax.custom_vjp
  def attend(*args):
    return fwd(*args)

  def attend_fwd(*args):
    out, lse = fwd(*args)
    return (out, lse), (*args, out, lse)

  def attend_bwd(res, cot):
    q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    d_out, d_lse = cot
    row = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32),
                     precision=lax.Precision.HIGHEST)
    delta = jnp.where(jnp.isneginf(lse), 0.0, row - d_lse.astype(jnp.float32))
    grads = bwd(q, k, v, out, lse, delta, d_out.astype(q.dtype), layout, q_pos, kv_pos, q_seg, kv_seg)
    return (*grads, None, None, None, None, None)

  attend.defvjp(attend_fwd, attend_bwd)
  return attend


def attention(q, k, v, layout, q_pos, kv_pos, q_seg=None, kv_seg=None, *, sm_scale, causal,
              window=None, fwd_config=None, bwd_config: BwdConfig | None = None, interpret=False):
  """(out, lse) of `mosaic_gpu.forward`, differentiable in q, k, v through this backward."""
  fwd = functools.partial(mosaic_gpu.forward, sm_scale=sm_scale, causal=causal, interpret=interpret,
                          window=window, config=fwd_config)
  bwd = functools.partial(backward, sm_scale=sm_scale, causal=causal, interpret=interpret,
                          window=window, config=bwd_config)
  return with_vjp(fwd, bwd)(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg)
