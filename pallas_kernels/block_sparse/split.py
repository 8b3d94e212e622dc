"""Split KV-major lists for the dK/dV kernels (`pallas_gpu` and `mosaic_gpu_bwd`).

One dK/dV program per (KV block, KV head) is deterministic but serialises a block whose inverse list
is far longer than the others (NSA selects block 0 for every token; a causal layout over few KV
blocks, e.g. NSA's compression attention, gives block 0 every query unit). The split cuts every
list into chunks of `chunk` entries: one program per chunk writes a float32 partial dK/dV tile, and
each block's partials are summed in program order afterwards (a fixed order: still deterministic).

`chunk_table` lists those programs; both kernel families walk it the same way. `sum_partials` adds
the Mosaic GPU kernels' partial tiles (the Triton dK/dV has its own reduction kernel in `pallas_gpu`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def longest_list(layout) -> jax.Array:
  """The longest KV-major list of the layout (int32 scalar; on the device, from the CSR offsets).
  The kernels' `split_at_run_time` options split only when it exceeds twice the chunk."""
  return jnp.max(layout.kv_offsets[..., 1:] - layout.kv_offsets[..., :-1])


def num_programs(layout, hkv: int, chunk: int) -> int:
  """A static bound on the split programs of one (layout batch, KV head): every (KV block, head unit)
  pair may end in a partial chunk, plus the chunks of all entries (nq · K per head unit)."""
  nq, cap = layout.kv_indices.shape[2:]
  upg = layout.kv_indices.shape[1] // hkv
  return layout.num_kv_blocks * upg + -(-upg * nq * cap // chunk)


def chunk_table(layout, hkv: int, chunk: int, programs: int):
  """Programs of the split dK/dV pass, per (layout batch, KV head).

  Returns table int32 [Bl, Hkv, 4, P] (KV block, head unit, first entry, end entry of each
  program; unused programs get an empty range) and first int32 [Bl, Hkv, nk+1] (the programs of
  KV block j are first[j] .. first[j+1]-1: ordered by block, then head unit, then chunk)."""
  off = layout.kv_offsets                                        # [Bl, Hl, nk+1]
  bl, hl, nk = off.shape[0], off.shape[1], off.shape[2] - 1
  upg = hl // hkv
  n_chunks = (off[..., 1:] - off[..., :-1] + chunk - 1) // chunk  # [Bl, Hl, nk]
  n_chunks = n_chunks.reshape(bl, hkv, upg, nk).transpose(0, 1, 3, 2).reshape(bl, hkv, nk * upg)
  ends = jnp.cumsum(n_chunks, axis=-1)
  prog = jnp.arange(programs, dtype=jnp.int32)
  owner = jax.vmap(jax.vmap(lambda e: jnp.searchsorted(e, prog, side="right")))(ends)
  live = owner < nk * upg
  owner = jnp.minimum(owner, nk * upg - 1)
  nth = prog - jnp.take_along_axis(ends - n_chunks, owner, axis=-1)
  block = owner // upg
  unit = jnp.arange(hkv, dtype=jnp.int32)[None, :, None] * upg + owner % upg
  flat_off = off.reshape(bl, 1, hl * (nk + 1))
  lo = jnp.take_along_axis(flat_off, unit * (nk + 1) + block, axis=-1)
  hi = jnp.take_along_axis(flat_off, unit * (nk + 1) + block + 1, axis=-1)
  start = jnp.where(live, lo + nth * chunk, 0)
  end = jnp.where(live, jnp.minimum(lo + (nth + 1) * chunk, hi), 0)
  table = jnp.stack([block, unit, start, end], axis=2).astype(jnp.int32)
  first = jnp.concatenate([jnp.zeros((bl, hkv, 1), ends.dtype), ends[..., upg - 1::upg]], axis=-1)
  return table, first.astype(jnp.int32)


def sum_partials(part, first, block_k: int, dtype, *, interpret: bool = False):
  """dK (or dV) [B, nk * block_k, Hkv, D] in `dtype` from float32 partial tiles part [B, Hkv, P * block_k, D]:
  block j of (batch b, KV head h) is the sum of tiles first[j] .. first[j+1]-1 (first [Bl, Hkv, nk+1],
  Bl = 1 broadcast over the batch) added one at a time in program order (deterministic); a block without
  tiles gets zeros. One Pallas program (Triton lowering; `interpret` on CPU) per (block, KV head, batch)
  reads only its own tiles: an XLA loop over the longest block's tile count would rewrite every block's
  accumulator per tile (NSA's selection: 32 passes over 1,024 blocks at T = 65,536)."""
  b, hkv, rows, d = part.shape
  nk = first.shape[-1] - 1
  n_first = first.shape[0]

  def kernel(first_ref, part_ref, out_ref):
    j = pl.program_id(0)

    def add(p, acc):
      return acc + part_ref[pl.ds(p * block_k, block_k), :]
    acc = lax.fori_loop(first_ref[j], first_ref[j + 1], add, jnp.zeros((block_k, d), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)

  out = pl.pallas_call(
      kernel, grid=(nk, hkv, b),
      in_specs=[pl.BlockSpec((None, None, nk + 1), lambda j, h, i: (i if n_first > 1 else 0, h, 0)),
                pl.BlockSpec((None, None, rows, d), lambda j, h, i: (i, h, 0, 0))],
      out_specs=pl.BlockSpec((None, None, block_k, d), lambda j, h, i: (i, h, j, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, nk * block_k, d), dtype),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
      name="block_sparse_dkv_sum",
  )(first.astype(jnp.int32), part)
  return out.transpose(0, 2, 1, 3)
