"""Split KV-major lists for the dK/dV kernels (`pallas_gpu` and `mosaic_gpu_bwd`).

One dK/dV program per (KV block, KV head) is deterministic but serialises a block whose inverse list
is far longer than the others (NSA selects block 0 for every token; a causal layout over few KV
blocks, e.g. NSA's compression attention, gives block 0 every query unit). The split cuts every
list into chunks of `chunk` entries: one program per chunk writes a float32 partial dK/dV tile, and
each block's partials are summed in program order afterwards (a fixed order: still deterministic).

`chunk_table` lists those programs; both kernel families walk it the same way.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
