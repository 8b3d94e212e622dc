"""Block-sparse dK/dV for one-token query units in Pallas Mosaic GPU (Hopper: wgmma, TMA, mbarriers).

NSA's selection branch: a layout with block_q = 1 and one list per KV head (Hl = Hkv), so query unit
u is token u and its rows are the G = Hq / Hkv query heads of the KV group. `mosaic_gpu_bwd`'s dK/dV
kernel needs units of 128 tokens; this one packs one-token units instead.

`dkv(q, k, v, lse, delta, d_out, layout, q_pos, kv_pos, q_seg, kv_seg, sm_scale=..., causal=...)`
takes what `pallas_gpu.backward` takes (q, d_out [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D]; lse [B, Hq, Tq]
natural log, -inf for rows that see nothing; delta [B, Hq, Tq] = rowsum(dO * O) - dlse, 0 on those
rows; positions [B, T] int32, segment ids [B, T] int32 or None) and returns (dk, dv) in the dtypes of
(k, v). dQ comes from another kernel (`pallas_gpu` runs its Triton dQ next to this).

Design. KV-major, no atomics (deterministic): one program per (KV block, KV head, batch), or per
chunk of a block's list when lists are split (`split.chunk_table`: NSA's block 0 is selected by
every token, its list is T long); a split program writes float32 partial tiles that
`split.sum_partials` adds per block in program order. Two consumer warpgroups, each with dK, dV
[64, D] float32 accumulators in registers. block_k 128: one per 64 keys, each with its own K, V
tiles in shared memory, both taking every ring step. block_k 64: both share the block's K, V tiles
(consumer 0 loads them) and split the ring: consumer wg takes steps t = wg, wg + 2, ... (its own
q barriers per slot, q[(t mod 2)·stages + slot], since a waiter must see every phase of a barrier it
waits on; one consumer frees a slot). Each writes its own float32 partial, so block_k 64 always
takes the split path (lists not split: every list one chunk, one program per KV block): program p's
consumer wg writes 64-row tile 2p + wg and `sum_partials` adds tiles 2·first[j] .. 2·first[j+1]-1.
A producer warpgroup walks the block's inverse list q_indices[start:end] (tokens) and packs
E = 64 / G consecutive entries into one 64-row ring slot: per entry one TMA copy of a [G, D] box
(the token's G heads, contiguous in q [B, Tq, Hq, D]) for Q and for dO to rows e·G of the slot's
swizzled tile (G a multiple of 8: whole 8-row swizzle tiles);
per slot one copy of 64 lse and one of 64 delta values. Those come from `_per_entry`: the wrapper
gathers lse and delta [B, Hq, Tq] per CSR entry into [B, Hkv, (nq·K + E)·G] (an entry's G values
next to the next entry's), because a TMA copy of a warpgroup must move a multiple of 128 bytes and
one entry's G values are 32 or 64 bytes for G = 8, 16 (cost: 2·4·G bytes written per list entry,
0.5 GB at NSA's 64k shape, against 4·G·D bytes of Q and dO read per entry). Per slot, as
`mosaic_gpu_bwd`'s half-unit step: Sᵀ = K Qᵀ, dPᵀ = V dOᵀ (wgmma, transposed shared-memory B
operands), Pᵀ = exp2(Sᵀ·scale·log2e - lse·log2e) masked (causal kv_pos <= q_pos, equal segment
ids), dV += Pᵀ dO, dSᵀ = Pᵀ (dPᵀ - delta), dK += dSᵀ Q (Pᵀ, dSᵀ from registers); dK is scaled by
sm_scale at the end.

Positions and segment ids of the queries are one per token: each consumer loads the slot's E
tokens' values as scalars from global memory (one of its own steps ahead: the loop carries them)
and, where the element mask is needed, builds the 64-row vectors in registers (row r belongs to
entry r // G: selects on a row iota).

Partly filled slots. The last slot of a walk may hold fewer than E entries. Its missing entries
still get their Q, dO copies (the barrier counts a fixed number), of the last listed token (finite
data); their rows get lse +inf in base 2 (a select on the row iota against the entries left), so
Pᵀ = 0 there and they contribute nothing.

Mask skip. A slot skips the element mask when every entry's token position is >= the largest key
position of the consumer's 64 keys and (with segment ids) every entry's id equals the keys' one id
(`mosaic_gpu.tile_ranges` of the keys against the scalars above). Selection lists need the mask
only for the token's own block.

Supported (`check_supported`): bfloat16 or float16; Dqk = Dv in {64, 128}; block_q = 1; Hl = Hkv;
G in {8, 16, 32, 64}; block_k in {64, 128}; Tk a multiple of block_k, or any Tk with causal masking
(keys padded after every query); no sliding window; sm_scale > 0; the ring in shared memory.
Launch parameters: `TokenDkvConfig` (`default_config`: the deepest ring that fits).

Shared memory (`smem_bytes`): K, V tiles of block_k keys, the ring (per slot Q, dO [64, D] and 64
lse, delta values) and, split (always at block_k 64), two float32 [64, D] staging tiles: at NSA's
shape (D = 128, bfloat16, segments) a 3-slot ring at block_k 64 (202,752 bytes), 2 at 128.

Like mosaic_gpu.py it only uses API spelled the same in jax 0.10.2 and 0.11.2. Tests
(tests/pallas_kernels/test_mosaic_gpu_token_dkv.py) run the kernel on CPU in jax's Mosaic GPU
interpreter as extended in tests/pallas_kernels/test_mosaic_gpu.py, and lower it for CUDA.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse import split
from pallas_kernels.block_sparse.mosaic_gpu import (
    _BLOCK_K_CHOICES, _LOG2E, _SMEM_RESERVED, _WG_ROWS, SMEM_LIMIT, _check_smem, _load_vector,
    check_dtypes_and_head_dims, tile_ranges)
from pallas_kernels.block_sparse.mosaic_gpu_bwd import (
    _COL, _ROW, _SWIZZLED, _SWIZZLED_F32, BwdConfig, _apply_mask, _bcast, _load_sides, _lse2, _mask,
    _matmuls, _ring_producer, _specialize, check_list_chunk_and_registers)
from pallas_kernels.block_sparse.mosaic_gpu_bwd import list_chunk as _unit_list_chunk

_KERNEL = "mosaic_gpu_token_dkv"
_GROUPS = (8, 16, 32, 64)   # query heads per KV head: whole 8-row swizzle tiles, dividing 64


@dataclasses.dataclass(frozen=True)
class TokenDkvConfig:
  """Launch parameters.

  stages: ring slots of 64 rows (64 / G list entries) in flight, >= 2.
  registers: per-thread registers of (consumer, producer) warpgroups, as `mosaic_gpu_bwd.BwdConfig`.
  list_chunk: list entries per program: None picks by shape (`list_chunk`), 0 never splits.
  """
  stages: int = 2
  registers: tuple[int, int] = (240, 24)
  list_chunk: int | None = None

  def __post_init__(self):
    if self.stages < 2:
      raise ValueError(f"stages={self.stages} must be >= 2")
    check_list_chunk_and_registers(self.list_chunk, self.registers)


def list_chunk(layout, num_kv_heads: int, batch: int, config: TokenDkvConfig, group: int) -> int:
  """List entries per program (0: one program per (KV block, KV head, batch)): `config.list_chunk`
  if set, else `mosaic_gpu_bwd.list_chunk`'s choice by shape rounded up to whole slots of 64 / group
  entries (so only a list's last slot is partly filled)."""
  if config.list_chunk is not None:
    return config.list_chunk
  per = max(1, _WG_ROWS // group)
  chunk = _unit_list_chunk(layout, num_kv_heads, batch, BwdConfig())
  return per * -(-chunk // per)


def smem_bytes(d, block_k, stages, itemsize, has_seg, partials=False):
  """Shared memory of one program: K, V tiles and key positions (segment ids) of block_k keys, the
  ring (per slot: Q, dO tiles of 64 rows, their 64 lse and delta values) and, split (always at
  block_k 64), a float32 [64, D] staging tile per consumer (two)."""
  tiles = 2 * block_k * d * itemsize + stages * 2 * _WG_ROWS * d * itemsize
  vectors = (1 + has_seg) * 4 * block_k + stages * 2 * 4 * _WG_ROWS
  staging = (partials or block_k == _WG_ROWS) * 2 * _WG_ROWS * d * 4
  return tiles + vectors + staging + _SMEM_RESERVED


def default_config(q, k, layout) -> TokenDkvConfig:
  """The deepest ring (2 to 6 slots) that fits shared memory with segment ids (and the split's
  staging tiles when `list_chunk` splits this call's lists)."""
  d, size, hkv = q.shape[-1], jnp.dtype(q.dtype).itemsize, k.shape[2]
  splits = list_chunk(layout, hkv, q.shape[0], TokenDkvConfig(), max(1, q.shape[2] // hkv)) > 0
  stages = max(s for s in range(2, 7)
               if s == 2 or smem_bytes(d, layout.block_k, s, size, True, splits) <= SMEM_LIMIT)
  return TokenDkvConfig(stages=stages)


def check_supported(q, k, v, layout, config: TokenDkvConfig | None = None, has_seg: bool = True,
                    causal: bool = True, window=None, sm_scale: float = 1.0) -> None:
  """Raise ValueError naming the values this kernel cannot serve (the caller keeps Triton)."""
  check_dtypes_and_head_dims(_KERNEL, q, k, v)
  dqk = q.shape[-1]
  if layout.block_q != 1:
    raise ValueError(f"{_KERNEL} needs block_q=1 (one-token query units); got block_q={layout.block_q}")
  hq, hkv, hl = q.shape[2], k.shape[2], layout.kv_indices.shape[1]
  if hl != hkv:
    raise ValueError(f"{_KERNEL} needs one list per KV head (Hl = Hkv); got Hl={hl}, Hkv={hkv}")
  if hq % hkv or hq // hkv not in _GROUPS:
    raise ValueError(f"{_KERNEL} needs G = Hq / Hkv in {_GROUPS} (a multiple of 8 dividing 64); "
                     f"got Hq={hq}, Hkv={hkv}")
  if layout.block_k not in _BLOCK_K_CHOICES:
    raise ValueError(f"{_KERNEL} needs block_k in {_BLOCK_K_CHOICES}; got block_k={layout.block_k}")
  if k.shape[1] % layout.block_k and not causal:
    raise ValueError(f"{_KERNEL} needs Tk a multiple of block_k={layout.block_k} unless causal; got "
                     f"Tk={k.shape[1]}, causal={causal}")
  if window is not None:
    raise ValueError(f"{_KERNEL} has no sliding window; got window={window!r}")
  if not float(sm_scale) > 0:
    raise ValueError(f"{_KERNEL} needs sm_scale > 0; got sm_scale={sm_scale}")
  cfg = config or default_config(q, k, layout)
  splits = list_chunk(layout, hkv, q.shape[0], cfg, hq // hkv) > 0
  _check_smem(_KERNEL, f"stages={cfg.stages}" + (" with split lists" if splits else ""),
              layout.block_k, dqk,
              smem_bytes(dqk, layout.block_k, cfg.stages, jnp.dtype(q.dtype).itemsize, has_seg,
                         splits))


@dataclasses.dataclass(frozen=True)
class _Geometry:
  hkv: int
  group: int     # G: query heads per KV head, the rows of one list entry
  bl: int        # batch of the layout (1: broadcast)
  block_k: int
  d: int
  dtype: jnp.dtype
  causal: bool
  has_seg: bool
  scale_log2: float
  sm_scale: float
  cfg: TokenDkvConfig
  split: bool
  window = None  # no sliding window (mosaic_gpu._visible reads it)

  @property
  def mask_mode(self):  # as mosaic_gpu's
    return "skip" if self.causal or self.has_seg else "never"

  @property
  def per_slot(self):   # list entries per 64-row ring slot
    return _WG_ROWS // self.group

  @property
  def pair(self):       # block_k 64: two consumers share the 64 keys and take alternate ring steps
    return self.block_k == _WG_ROWS

  @property
  def consumers(self):  # consumer warpgroups: always two
    return 2

  @property
  def key_tiles(self):  # 64-key K, V tiles in shared memory (one per consumer at block_k 128)
    return self.block_k // _WG_ROWS

  @property
  def lanes(self):      # q barriers per ring slot: one per consumer that waits on it
    return 2 if self.pair else 1

  @property
  def side_copies(self):  # positions (causal) and segment ids
    return self.causal + self.has_seg


def _kernel(list_ref, q_idx_ref, kv_range_ref, q_pos_ref, kv_pos_ref, *refs, g: _Geometry):
  """list_ref: kv_offsets [Bl, Hkv, nk+1] (one program per KV block) or, split, the chunk table
  [Bl, Hkv, 4, P] (one program per chunk; dk_ref, dv_ref are then float32 partials
  [B, Hkv, 2 * P * 64, D], consumer wg of program p writing 64-row tile 2p + wg). lse_ref,
  delta_ref: [B, Hkv, (nq*K + 64/G) * G], the G values of every CSR entry (`_per_entry`)."""
  if g.has_seg:
    q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
  else:
    q_seg_ref = kv_seg_ref = None
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
  stages, nc, per = g.cfg.stages, g.consumers, g.per_slot
  batch, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
  lb = batch if g.bl > 1 else 0
  seed = lax.axis_index("k")
  if g.split:
    block = list_ref[lb, kv_head, 0, seed]
    start, end = list_ref[lb, kv_head, 2, seed], list_ref[lb, kv_head, 3, seed]
  else:
    block = seed
    start, end = list_ref[lb, kv_head, block], list_ref[lb, kv_head, block + 1]
  steps = (end - start + per - 1) // per
  heads = pl.ds(kv_head * g.group, g.group)

  def token(t, e):
    """Token of entry e of ring step t; past the list's end the last listed one (finite rows)."""
    return q_idx_ref[lb, kv_head, jnp.maximum(jnp.minimum(start + t * per + e, end - 1), 0)]

  ints = lambda *shape: plgpu.SMEM(shape, jnp.int32)  # noqa: E731
  f32 = lambda *shape: plgpu.SMEM(shape, jnp.float32)  # noqa: E731
  scratch = dict(
      k=plgpu.SMEM((g.key_tiles, _WG_ROWS, g.d), g.dtype, transforms=_SWIZZLED),
      v=plgpu.SMEM((g.key_tiles, _WG_ROWS, g.d), g.dtype, transforms=_SWIZZLED),
      q=plgpu.SMEM((stages, _WG_ROWS, g.d), g.dtype, transforms=_SWIZZLED),
      do=plgpu.SMEM((stages, _WG_ROWS, g.d), g.dtype, transforms=_SWIZZLED),
      lse=f32(stages, _WG_ROWS),
      delta=f32(stages, _WG_ROWS),
      kpos=ints(g.key_tiles, _WG_ROWS) if g.causal else None,
      kseg=ints(g.key_tiles, _WG_ROWS) if g.has_seg else None,
      part=plgpu.SMEM((nc, _WG_ROWS, g.d), jnp.float32, transforms=_SWIZZLED_F32) if g.split else None)
  barriers = dict(
      kv=plgpu.Barrier(num_arrivals=2 + g.side_copies, num_barriers=g.key_tiles),
      # pair: step t signals q[(t mod 2) * stages + slot], so each consumer waits on every phase of
      # the barriers it waits on (a waiter tracks phases itself); one consumer frees a slot
      q=plgpu.Barrier(num_arrivals=2 * per + 2, num_barriers=g.lanes * stages),
      free=plgpu.Barrier(num_arrivals=1 if g.pair else nc, num_barriers=stages))

  def q_barrier(b, t, slot):
    return b["q"].at[lax.rem(t, 2) * stages + slot if g.pair else slot]

  def producer(s, b):
    def load(t, slot):
      bar = q_barrier(b, t, slot)
      for e in range(per):
        tok, rows = token(t, e), pl.ds(e * g.group, g.group)
        plgpu.copy_gmem_to_smem(q_ref.at[batch, tok, heads], s["q"].at[slot].at[rows], bar)
        plgpu.copy_gmem_to_smem(do_ref.at[batch, tok, heads], s["do"].at[slot].at[rows], bar)
      rows = pl.ds((start + t * per) * g.group, _WG_ROWS)   # the slot's entries, 64 rows
      plgpu.copy_gmem_to_smem(lse_ref.at[batch, kv_head, rows], s["lse"].at[slot], bar)
      plgpu.copy_gmem_to_smem(delta_ref.at[batch, kv_head, rows], s["delta"].at[slot], bar)
    _ring_producer(g, stages, steps, load, b["free"])

  def consumer(s, b, wg):
    kt = 0 if g.pair else wg   # this consumer's 64 keys (pair: both share tile 0)
    # pair: consumer wg takes ring steps t = wg, wg + 2, ...; block_k 128: every step
    first_step, stride = (wg, 2) if g.pair else (0, 1)
    keys = pl.ds(block * g.block_k + kt * _WG_ROWS, _WG_ROWS)
    k_tile, v_tile, bar = s["k"].at[kt], s["v"].at[kt], b["kv"].at[kt]

    def load_keys():
      plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], k_tile, bar)
      plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], v_tile, bar)
      for on, src, dst in ((g.causal, kv_pos_ref, s["kpos"]), (g.has_seg, kv_seg_ref, s["kseg"])):
        if on:
          plgpu.copy_gmem_to_smem(src.at[batch, keys], dst.at[kt], bar)
    if g.pair:
      pl.when(wg == 0)(load_keys)
    else:
      load_keys()
    plgpu.barrier_wait(bar)
    kv_pos, kv_seg = _load_sides(g, s["kpos"], s["kseg"], kt, _ROW)
    key_tile = (batch, block * g.key_tiles + kt)
    shape = (_WG_ROWS, _WG_ROWS)   # Sᵀ, dPᵀ of one slot
    row = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, (_WG_ROWS,), 0), _COL)  # slot row

    def entries(t):
      """Positions (causal), then segment ids (with segments) of step t's entries: a flat list of
      scalars, loaded from global memory a step of this consumer ahead (the loop carries them)."""
      if g.mask_mode != "skip":
        return []
      toks = [token(t, e) for e in range(per)]
      return ([q_pos_ref[batch, tok] for tok in toks] if g.causal else []) + (
          [q_seg_ref[batch, tok] for tok in toks] if g.has_seg else [])

    def split_entries(ents):
      """(positions, segment ids) of `entries`, None where not used."""
      return (ents[:per] if g.causal else None), (ents[per * g.causal:] if g.has_seg else None)

    def by_row(values):
      """[64] vector (slot rows) of per-entry scalars: entry e's value on rows e·G .. e·G+G-1."""
      vec = row * 0 + values[0]
      for e in range(1, per):
        vec = jnp.where(row >= e * g.group, values[e], vec)
      return vec

    def needs_mask(positions, segments):
      """Whether a slot needs the element mask (a traced bool): some listed token before some
      key (causal) or not all in the keys' one segment. Entries past the list's end repeat the
      last listed token, so they change nothing."""
      if g.mask_mode != "skip":
        return None
      k_hi, k_seg_lo, k_seg_hi = (kv_range_ref[(*key_tile, c)] for c in (0, 2, 3))
      need = None
      for e in range(per):
        tests = []
        if g.causal:
          tests.append(k_hi > positions[e])
        if g.has_seg:
          tests.append(jnp.logical_not((k_seg_lo == k_seg_hi) & (k_seg_lo == segments[e])))
        for test in tests:
          need = test if need is None else need | test
      return need

    def probs(t, slot, st, dpt, positions, segments, need):
      """(Pᵀ, dSᵀ) in the input dtype from Sᵀ, dPᵀ of the slot; rows past the list's end (a
      partly filled last slot) get lse +inf in base 2, so Pᵀ = 0 there."""
      listed = row < (end - start - t * per) * g.group
      lse2 = jnp.where(listed, _lse2(_load_vector(s["lse"].at[slot], _COL)), jnp.inf)
      pt = jnp.exp2(st * g.scale_log2 - _bcast(lse2, shape, 1))

      def masked(p):
        q_pos = by_row(positions) if g.causal else None
        q_seg = by_row(segments) if g.has_seg else None
        return _mask(g, p, q_pos, kv_pos, q_seg, kv_seg, q_dim=1)
      pt = _apply_mask(g, pt, masked, need)
      delta = _load_vector(s["delta"].at[slot], _COL)
      return pt.astype(g.dtype), (pt * (dpt - _bcast(delta, shape, 1))).astype(g.dtype)

    def step(i, carry):
      dk, dv, *ents = carry
      t = first_step + i * stride
      slot = lax.rem(t, stages)
      positions, segments = split_entries(ents)
      need = needs_mask(positions, segments)
      nxt = entries(t + stride)   # this consumer's next step's scalar loads, in flight meanwhile
      q_sub, do_sub = s["q"].at[slot], s["do"].at[slot]
      plgpu.barrier_wait(q_barrier(b, t, slot))
      st, dpt = _matmuls((shape, k_tile, q_sub.transpose((1, 0)), None),
                         (shape, v_tile, do_sub.transpose((1, 0)), None))
      pt, dst = probs(t, slot, st, dpt, positions, segments, need)
      dv, dk = _matmuls(((_WG_ROWS, g.d), pt, do_sub, dv), ((_WG_ROWS, g.d), dst, q_sub, dk))
      plgpu.barrier_arrive(b["free"].at[slot])
      return (dk, dv, *nxt)

    zeros = plgpu.layout_cast(jnp.zeros((_WG_ROWS, g.d), jnp.float32), plgpu.Layout.WGMMA)
    own_steps = (steps - first_step + stride - 1) // stride
    dk, dv, *_ = lax.fori_loop(0, own_steps, step, (zeros, zeros, *entries(first_step)))
    if g.split:   # float32 partials of this chunk, through one staging tile: dK, then dV
      rows = pl.ds((seed * 2 + wg) * _WG_ROWS, _WG_ROWS)
      part = s["part"].at[wg]
      for x, ref, wait in ((dk * g.sm_scale, dk_ref, True), (dv, dv_ref, False)):
        part[...] = x
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(part, ref.at[batch, kv_head, rows])
        plgpu.wait_smem_to_gmem(0, wait_read_only=wait)
      return
    k_tile[...] = (dk * g.sm_scale).astype(g.dtype)
    v_tile[...] = dv.astype(g.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[batch, keys, kv_head])
    plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[batch, keys, kv_head])
    plgpu.wait_smem_to_gmem(0)

  _specialize(g, nc, scratch, barriers, consumer, producer)


def _per_entry(x, layout, hkv: int, per: int):
  """[B, Hq, Tq] float32 -> [B, Hkv, (N + per) * G]: for every CSR entry n < N = nq*K of KV head
  h's inverse list, the G values of its token (q_indices[.., h, n]) for h's query heads; `per`
  entries of zeros after the last, so that a slot's copy of 64 rows never leaves the array."""
  b, hq, tq = x.shape
  group = hq // hkv
  qi = jnp.broadcast_to(layout.q_indices.astype(jnp.int32), (b,) + layout.q_indices.shape[1:])
  x = x.astype(jnp.float32).reshape(b, hkv, group, tq)
  x = jnp.take_along_axis(x, qi[:, :, None, :], axis=3).transpose(0, 1, 3, 2)   # [B, Hkv, N, G]
  return jnp.pad(x, ((0, 0), (0, 0), (0, per), (0, 0))).reshape(b, hkv, -1)


def dkv(q, k, v, lse, delta, d_out, layout, q_pos, kv_pos, q_seg, kv_seg, *, sm_scale, causal,
        interpret=False, config: TokenDkvConfig | None = None, window=None):
  """(dk, dv) in the dtypes of (k, v); see the module docstring. interpret: False, or the Mosaic
  GPU interpreter's parameters (`InterpretGPUParams`) passed to `plgpu.kernel` (True is refused, as
  by `mosaic_gpu`: jax's own interpreter lacks the wgmma forms used here)."""
  if interpret is True:
    raise ValueError(f"{_KERNEL} cannot run with interpret=True; pass False or InterpretGPUParams "
                     "(tests/pallas_kernels/test_mosaic_gpu.py extends jax's interpreter)")
  has_seg = q_seg is not None
  cfg = config or default_config(q, k, layout)
  check_supported(q, k, v, layout, cfg, has_seg, causal, window, sm_scale)
  b, tq, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  chunk = list_chunk(layout, hkv, b, cfg, group)
  pad_k = -tk % layout.block_k   # causal only: padded keys at the largest position see no query
  if pad_k:
    pad = lambda x, value=0: jnp.pad(x, [(0, 0), (0, pad_k)] + [(0, 0)] * (x.ndim - 2),  # noqa: E731
                                     constant_values=value)
    k, v, kv_pos = pad(k), pad(v), pad(kv_pos.astype(jnp.int32), jnp.iinfo(jnp.int32).max)
    kv_seg = None if kv_seg is None else pad(kv_seg)

  programs = split.num_programs(layout, hkv, chunk) if chunk else layout.num_kv_blocks
  if not chunk and layout.block_k == _WG_ROWS:   # the pair writes partials: whole lists as chunks
    chunk = layout.kv_indices.shape[2] * layout.kv_indices.shape[3]   # >= any list's length
  g = _Geometry(hkv=hkv, group=group, bl=layout.kv_indices.shape[0], block_k=layout.block_k, d=d,
                dtype=jnp.dtype(q.dtype), causal=bool(causal), has_seg=has_seg,
                scale_log2=float(sm_scale) * _LOG2E, sm_scale=float(sm_scale), cfg=cfg,
                split=chunk > 0)
  kv_pos = kv_pos.astype(jnp.int32)
  kv_range = tile_ranges(kv_pos, kv_seg, _WG_ROWS, None, keys=True)   # [B, Tk/64, 4]
  aux = [q_pos.astype(jnp.int32), kv_pos]
  if has_seg:
    aux += [q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)]
  acts = [q, k, v, d_out.astype(q.dtype), *(_per_entry(x, layout, hkv, g.per_slot) for x in (lse, delta))]
  launch = functools.partial(
      plgpu.kernel, functools.partial(_kernel, g=g), grid_names=("k", "heads", "batch"),
      num_threads=g.consumers + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret or None)
  ins = (layout.q_indices.astype(jnp.int32), kv_range, *aux, *acts)
  if chunk:   # programs: one per chunk (whole lists: one per KV block, at most one chunk each)
    table, first = split.chunk_table(layout, hkv, chunk, programs)
    part = jax.ShapeDtypeStruct((b, hkv, programs * 2 * _WG_ROWS, d), jnp.float32)
    dk, dv = launch(out_type=(part, part), grid=(programs, hkv, b),
                    kernel_name="block_sparse_token_dkv_partial_mosaic")(table, *ins)
    # block_k 128: a program's two 64-row tiles are one [128, D] tile; 64: two tiles of 64 keys
    first, tile = (first * 2, _WG_ROWS) if g.pair else (first, g.block_k)
    dk, dv = (split.sum_partials(x, first, tile, y.dtype, interpret=bool(interpret))
              for x, y in ((dk, k), (dv, v)))
  else:
    dk, dv = launch(out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                              jax.ShapeDtypeStruct(v.shape, v.dtype)),
                    grid=(layout.num_kv_blocks, hkv, b), kernel_name="block_sparse_token_dkv_mosaic",
                    )(layout.kv_offsets.astype(jnp.int32), *ins)
  return dk[:, :tk], dv[:, :tk]
