"""`BlockLayout`: which KV blocks each query unit visits, query-major and KV-major.

Axes used in the shapes below:
  B   batch of the layout (1 = broadcast over the batch of the attention call)
  Hl  head units (one list per unit; see "Head unit" in docs/contracts.md)
  nq  query units (ceil(Tq / block_q))
  nk  KV blocks (ceil(Tk / block_k))
  K   capacity of one list (maximum number of KV blocks a query unit may visit)

All builders are jit-compatible and use O(B·Hl·nq·K) memory (plus their input), never a token-level
[Tq, Tk] mask. Checks that need values (indices in range, counts within capacity) run only when the
values are concrete; shape checks always run.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _concrete(*arrays):
    """The arrays as numpy arrays, or None when any of them is traced (values unknown)."""
    try:
        return [np.asarray(a) for a in arrays]
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_block_sizes(block_q, block_k) -> None:
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class BlockLayout:
    """Block-sparse attention layout (a pytree; the int fields are static metadata).

    kv_indices: int32 [B, Hl, nq, K] per query unit, the KV blocks to visit, ascending, no
      duplicates; entries past the count repeat the last valid index (0 when the count is 0).
    kv_counts:  int32 [B, Hl, nq] number of valid entries of each list.
    q_indices:  int32 [B, Hl, nq*K] KV-major inverse (CSR): query units grouped by KV block in
      ascending block order, ascending inside a block; entries past the total repeat the last valid one.
    kv_offsets: int32 [B, Hl, nk+1] CSR offsets: the query units that visit KV block j are
      q_indices[..., kv_offsets[j]:kv_offsets[j+1]].
    block_q, block_k: tokens per query unit / per KV block.  num_kv_blocks: nk.

    Build it with a class method (`from_block_mask`, `from_indices`, `causal`, `sliding_window`,
    `top_k`); they fill the inverse on device by a sort.
    """

    kv_indices: jax.Array
    kv_counts: jax.Array
    q_indices: jax.Array
    kv_offsets: jax.Array
    block_q: int
    block_k: int
    num_kv_blocks: int

    def __repr__(self):
        b, hl, nq, cap = self.kv_indices.shape
        return (f"BlockLayout(B={b}, Hl={hl}, nq={nq}, K={cap}, nk={self.num_kv_blocks}, "
                f"block_q={self.block_q}, block_k={self.block_k})")

    # ------------------------------------------------------------------ shape accessors
    @property
    def batch(self) -> int:
        return self.kv_indices.shape[0]

    @property
    def num_head_units(self) -> int:
        return self.kv_indices.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_indices.shape[2]

    @property
    def max_kv_blocks(self) -> int:
        """K, the capacity of each query unit's list."""
        return self.kv_indices.shape[3]

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_indices(cls, indices, counts, *, block_q: int, block_k: int, num_kv_blocks: int) -> "BlockLayout":
        """Layout from explicit per-unit lists (the fast path for variants).

        indices: int [B, Hl, nq, K] KV block indices; only the first `counts` entries of each list are
          read; they may be unsorted and may repeat (duplicates are dropped).
        counts:  int [B, Hl, nq] number of valid entries, 0 <= count <= K.
        Indices outside [0, num_kv_blocks) among the valid entries are an error when the values are
        concrete; under tracing they cannot be checked and are dropped from the list.
        """
        _check_block_sizes(block_q, block_k)
        if not isinstance(num_kv_blocks, (int, np.integer)) or num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be a positive int, got {num_kv_blocks!r}")
        indices = jnp.asarray(indices)
        counts = jnp.asarray(counts)
        if indices.ndim != 4:
            raise ValueError(f"indices must be [B, Hl, nq, K], got shape {indices.shape}")
        if counts.shape != indices.shape[:3]:
            raise ValueError(f"counts must be [B, Hl, nq] = {indices.shape[:3]}, got shape {counts.shape}")
        if not jnp.issubdtype(indices.dtype, jnp.integer) or not jnp.issubdtype(counts.dtype, jnp.integer):
            raise ValueError(f"indices and counts must be integers, got {indices.dtype} and {counts.dtype}")
        cap = indices.shape[3]
        if cap < 1:
            raise ValueError(f"indices must have a list capacity K >= 1, got shape {indices.shape}")
        values = _concrete(indices, counts)
        if values is not None:
            idx, c = values
            if c.size and (c.min() < 0 or c.max() > cap):
                raise ValueError(f"counts must lie in [0, K={cap}], got values in [{c.min()}, {c.max()}]")
            used = np.arange(cap) < c[..., None]
            bad = used & ((idx < 0) | (idx >= num_kv_blocks))
            if bad.any():
                where = tuple(int(x) for x in np.argwhere(bad)[0])
                raise ValueError(
                    f"KV block index {int(idx[where])} at [b, unit, q_block, slot] = {list(where)} is out "
                    f"of range [0, num_kv_blocks={num_kv_blocks})")
        keys, counts = _normalize_lists(indices, counts, int(num_kv_blocks))
        return cls._from_sorted(keys, counts, block_q, block_k, num_kv_blocks)

    @classmethod
    def from_block_mask(cls, mask, *, block_q: int, block_k: int, max_kv_blocks: int | None = None) -> "BlockLayout":
        """Layout from a boolean block mask [B, Hl, nq, nk] (True = visit the block).

        max_kv_blocks: list capacity K (default nk). A row with more True blocks than K is an error
          when the mask is concrete; under tracing it keeps its K lowest blocks.
        """
        _check_block_sizes(block_q, block_k)
        mask = jnp.asarray(mask)
        if mask.ndim != 4:
            raise ValueError(f"block mask must be [B, Hl, nq, nk], got shape {mask.shape}")
        if mask.dtype != jnp.bool_:
            raise ValueError(f"block mask must be bool, got {mask.dtype}")
        nk = mask.shape[3]
        if max_kv_blocks is not None and (isinstance(max_kv_blocks, bool)
                                          or not isinstance(max_kv_blocks, numbers.Integral)):
            raise ValueError(f"max_kv_blocks must be None or an int in [1, nk={nk}], got {max_kv_blocks!r}")
        cap = nk if max_kv_blocks is None else int(max_kv_blocks)
        if not 1 <= cap <= nk:
            raise ValueError(f"max_kv_blocks must lie in [1, nk={nk}], got {max_kv_blocks!r}")
        values = _concrete(mask) if cap < nk else None
        if values is not None:
            most = int(values[0].sum(-1).max(initial=0))
            if most > cap:
                raise ValueError(f"a query unit visits {most} KV blocks, more than max_kv_blocks={cap}")
        keys, counts = _mask_to_lists(mask, cap)
        return cls._from_sorted(keys, counts, block_q, block_k, nk)

    @classmethod
    def top_k(cls, scores, k: int, *, block_q: int, block_k: int) -> "BlockLayout":
        """Layout that visits, per query unit, the k highest-scoring KV blocks.

        scores: float [B, Hl, nq, nk]; blocks scored -inf are never selected (so a row with fewer
          than k finite scores visits fewer blocks); +inf forces a block in (e.g. the diagonal).
          Ties go to the lower block index.
        """
        _check_block_sizes(block_q, block_k)
        scores = jnp.asarray(scores)
        if scores.ndim != 4:
            raise ValueError(f"scores must be [B, Hl, nq, nk], got shape {scores.shape}")
        if not jnp.issubdtype(scores.dtype, jnp.floating):
            raise ValueError(f"scores must be floating point, got {scores.dtype}")
        nk = scores.shape[3]
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= nk:
            raise ValueError(f"k must be an int in [1, nk={nk}], got {k!r}")
        keys, counts = _top_k_lists(scores, int(k))
        return cls._from_sorted(keys, counts, block_q, block_k, nk)

    @classmethod
    def causal(cls, seq_len_q: int, seq_len_k: int, *, block_q: int, block_k: int,
               num_head_units: int = 1, batch: int = 1) -> "BlockLayout":
        """Every KV block that holds a key at or before some query of the unit (bottom-right aligned:
        query i sits at position seq_len_k - seq_len_q + i). Same lists for every batch row and head unit."""
        return cls.sliding_window(seq_len_q, seq_len_k, None, block_q=block_q, block_k=block_k,
                                  num_head_units=num_head_units, batch=batch)

    @classmethod
    def sliding_window(cls, seq_len_q: int, seq_len_k: int, window: int | None, *, block_q: int,
                       block_k: int, num_head_units: int = 1, batch: int = 1) -> "BlockLayout":
        """Every KV block that holds a key with q_pos - window < k_pos <= q_pos for some query of the
        unit (window counts the query's own position; None = unbounded, i.e. `causal`).

        The layout only selects blocks: on its own it admits keys up to one block left of the window.
        Exactness comes from the kernel: pass the same `window=` to `block_sparse_attention` (with
        causal=True), which masks the window's far edge inside the first block. Positions are the
        default bottom-right aligned ones (query i at seq_len_k - seq_len_q + i). K is the longest
        list (w/block_k + 1 when block_q = block_k divides w).
        """
        _check_block_sizes(block_q, block_k)
        for name, value in (("seq_len_q", seq_len_q), ("seq_len_k", seq_len_k),
                            ("num_head_units", num_head_units), ("batch", batch)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        # Everything here is static, so the lists are computed in numpy.
        nq, nk = _cdiv(seq_len_q, block_q), _cdiv(seq_len_k, block_k)
        first_pos = seq_len_k - seq_len_q + np.arange(nq) * block_q           # first query's position
        last_pos = np.minimum(first_pos + block_q, seq_len_k) - 1              # last query's position
        hi = np.minimum(last_pos // block_k, nk - 1)                           # last block (may be < 0)
        if window is None:
            lo = np.zeros_like(hi)
        else:
            lo = np.maximum(first_pos - window + 1, 0) // block_k
        counts = np.maximum(hi - lo + 1, 0)                                    # [nq], each <= nk
        cap = nk if window is None else max(1, int(counts.max()))
        slot = np.arange(cap)[None, :]
        keys = np.where(slot < counts[:, None], lo[:, None] + slot, nk)
        shape = (batch, num_head_units, nq, cap)
        return cls._from_sorted(jnp.asarray(np.broadcast_to(keys, shape), jnp.int32),
                                jnp.asarray(np.broadcast_to(counts, shape[:3]), jnp.int32), block_q, block_k, nk)

    @classmethod
    def _from_sorted(cls, keys, counts, block_q, block_k, num_kv_blocks) -> "BlockLayout":
        """keys: int32 [B, Hl, nq, K] ascending valid indices followed by `num_kv_blocks` sentinels."""
        kv_indices, q_indices, kv_offsets = _finish(keys, counts, int(num_kv_blocks))
        return cls(kv_indices, jnp.asarray(counts, jnp.int32), q_indices, kv_offsets,
                   int(block_q), int(block_k), int(num_kv_blocks))

    # ------------------------------------------------------------------ checks and debugging
    def check_shapes(self, seq_len_q: int, seq_len_k: int, num_q_heads: int, num_kv_heads: int,
                     batch: int) -> None:
        """Raise ValueError unless this layout fits an attention call with these sizes."""
        b, hl, nq, cap = self.kv_indices.shape
        nk = self.num_kv_blocks
        expected = {"kv_counts": (b, hl, nq), "q_indices": (b, hl, nq * cap), "kv_offsets": (b, hl, nk + 1)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"layout.{name} has shape {getattr(self, name).shape}, expected {shape} "
                                 f"from kv_indices {self.kv_indices.shape} and num_kv_blocks={nk}")
        if b not in (1, batch):
            raise ValueError(f"layout batch {b} must be 1 or the batch size {batch}")
        if nq != _cdiv(seq_len_q, self.block_q):
            raise ValueError(f"layout has nq={nq} query units but ceil(Tq={seq_len_q} / block_q="
                             f"{self.block_q}) = {_cdiv(seq_len_q, self.block_q)}")
        if nk != _cdiv(seq_len_k, self.block_k):
            raise ValueError(f"layout has num_kv_blocks={nk} but ceil(Tk={seq_len_k} / block_k="
                             f"{self.block_k}) = {_cdiv(seq_len_k, self.block_k)}")
        if num_q_heads % hl or hl % num_kv_heads:
            raise ValueError(f"layout head units Hl={hl} must divide Hq={num_q_heads} and be a multiple "
                             f"of Hkv={num_kv_heads}; valid: Hl in "
                             f"{[d for d in range(num_kv_heads, num_q_heads + 1, num_kv_heads) if num_q_heads % d == 0]}")
        for name in ("kv_indices", "kv_counts", "q_indices", "kv_offsets"):
            if getattr(self, name).dtype != jnp.int32:
                raise ValueError(f"layout.{name} must be int32, got {getattr(self, name).dtype}")

    def check_values(self) -> None:
        """Check the invariants of docs/contracts.md on concrete values (no-op under tracing)."""
        arrays = (self.kv_indices, self.kv_counts, self.q_indices, self.kv_offsets)
        values = _concrete(*arrays)
        if values is None:
            return
        idx, cnt, qi, off = values
        cap, nk = idx.shape[3], self.num_kv_blocks
        if cnt.size and (cnt.min() < 0 or cnt.max() > cap):
            raise ValueError(f"layout.kv_counts must lie in [0, K={cap}], got [{cnt.min()}, {cnt.max()}]")
        if idx.size and (idx.min() < 0 or idx.max() >= nk):
            raise ValueError(f"layout.kv_indices must lie in [0, nk={nk}), got [{idx.min()}, {idx.max()}]")
        used = np.arange(cap) < cnt[..., None]
        ascending = np.diff(idx, axis=-1) > 0
        if np.any(used[..., 1:] & ~ascending):
            raise ValueError("layout.kv_indices must be strictly ascending within each count")
        if not np.array_equal(off[..., -1], cnt.sum(-1)) or np.any(np.diff(off, axis=-1) < 0):
            raise ValueError("layout.kv_offsets must be non-decreasing and end at the total count")
        if qi.size and (qi.min() < 0 or qi.max() >= idx.shape[2]):
            raise ValueError(f"layout.q_indices must lie in [0, nq={idx.shape[2]})")
        _check_inverse(idx, cnt, qi, off, nk)

    def dense_block_mask(self) -> jax.Array:
        """bool [B, Hl, nq, nk]: the visited blocks as a mask. O(nq·nk) memory: for tests and debugging."""
        cap, nk = self.max_kv_blocks, self.num_kv_blocks
        used = jnp.arange(cap) < self.kv_counts[..., None]
        onehot = (self.kv_indices[..., None] == jnp.arange(nk)) & used[..., None]
        return onehot.any(axis=-2)

    def density(self) -> jax.Array:
        """float32 [B, Hl]: fraction of the nq·nk blocks visited."""
        return self.kv_counts.sum(-1).astype(jnp.float32) / (self.num_q_blocks * self.num_kv_blocks)


jax.tree_util.register_dataclass(
    BlockLayout,
    data_fields=["kv_indices", "kv_counts", "q_indices", "kv_offsets"],
    meta_fields=["block_q", "block_k", "num_kv_blocks"],
)


def _check_inverse(idx, cnt, qi, off, nk) -> None:
    """The KV-major inverse (q_indices, kv_offsets) must list exactly the query-major lists' entries
    (the Pallas backwards read dK/dV's work from it alone). numpy values, shapes as in the contract."""
    nq, cap = idx.shape[2:]
    used = np.arange(cap) < cnt[..., None]
    units = np.broadcast_to(np.arange(nq)[:, None], (nq, cap))
    for b, h in np.ndindex(*idx.shape[:2]):
        blocks, q = idx[b, h][used[b, h]], units[used[b, h]]
        order = np.lexsort((q, blocks))                          # by block, then query unit
        want_off = np.concatenate([[0], np.cumsum(np.bincount(blocks, minlength=nk))])
        if not np.array_equal(off[b, h], want_off) or not np.array_equal(qi[b, h, :len(q)], q[order]):
            raise ValueError(
                f"layout.q_indices / kv_offsets (batch {b}, head unit {h}) are not the inverse of "
                "kv_indices / kv_counts; build layouts with the BlockLayout constructors")


@functools.partial(jax.jit, static_argnums=1)
def _mask_to_lists(mask, cap):
    """bool [B, Hl, nq, nk] -> (keys [B, Hl, nq, cap] ascending then nk sentinels, counts)."""
    nk = mask.shape[-1]
    keys = jnp.sort(jnp.where(mask, jnp.arange(nk, dtype=jnp.int32), nk), axis=-1)[..., :cap]
    return keys, (keys < nk).sum(-1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnums=1)
def _top_k_lists(scores, k):
    """float [B, Hl, nq, nk] -> the k best finite blocks as (keys ascending then nk sentinels, counts)."""
    nk = scores.shape[-1]
    values, picked = jax.lax.top_k(scores, k)
    keys = jnp.sort(jnp.where(values > -jnp.inf, picked.astype(jnp.int32), nk), axis=-1)
    return keys, (keys < nk).sum(-1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnums=2)
def _normalize_lists(indices, counts, num_kv_blocks):
    """Sort each list's first `counts` entries, drop duplicates and out-of-range entries.
    -> (keys int32 [B, Hl, nq, K] ascending then `num_kv_blocks` sentinels, counts int32 [B, Hl, nq])."""
    cap = indices.shape[-1]
    indices = indices.astype(jnp.int32)
    counts = jnp.clip(counts.astype(jnp.int32), 0, cap)
    used = jnp.arange(cap, dtype=jnp.int32) < counts[..., None]
    in_range = (indices >= 0) & (indices < num_kv_blocks)
    keys = jnp.sort(jnp.where(used & in_range, indices, num_kv_blocks), axis=-1)
    previous = jnp.concatenate([jnp.full_like(keys[..., :1], -1), keys[..., :-1]], axis=-1)
    keep = (keys != previous) & (keys < num_kv_blocks)
    keys = jnp.sort(jnp.where(keep, keys, num_kv_blocks), axis=-1)
    return keys, keep.sum(-1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnums=2)
def _finish(keys, counts, num_kv_blocks):
    """-> kv_indices (padded with the last valid index), q_indices, kv_offsets."""
    keys, counts = keys.astype(jnp.int32), counts.astype(jnp.int32)
    q_indices, kv_offsets = _inverse(keys, counts, num_kv_blocks)
    return _pad_with_last(keys, counts), q_indices, kv_offsets


def _pad_with_last(keys, counts):
    """Replace the sentinels past each count by the last valid index (0 when the count is 0)."""
    cap = keys.shape[-1]
    last = jnp.take_along_axis(keys, jnp.clip(counts - 1, 0, cap - 1)[..., None], axis=-1)
    last = jnp.where(counts[..., None] > 0, last, 0)
    return jnp.where(jnp.arange(cap) < counts[..., None], keys, last).astype(jnp.int32)


def _inverse(keys, counts, num_kv_blocks):
    """KV-major CSR of the lists: (q_indices [B, Hl, nq*K], kv_offsets [B, Hl, nk+1])."""
    b, hl, nq, cap = keys.shape
    used = jnp.arange(cap) < counts[..., None]
    flat = jnp.where(used, keys, num_kv_blocks).reshape(b, hl, nq * cap)
    order = jnp.argsort(flat, axis=-1, stable=True)               # by KV block, then query unit
    q_units = (order // cap).astype(jnp.int32)
    total = counts.sum(-1, dtype=jnp.int32)                        # [B, Hl]
    last = jnp.take_along_axis(q_units, jnp.clip(total - 1, 0, nq * cap - 1)[..., None], axis=-1)
    last = jnp.where(total[..., None] > 0, last, 0)
    q_indices = jnp.where(jnp.arange(nq * cap) < total[..., None], q_units, last)
    # Entries per KV block by an integer scatter-add (exact in any order), then a prefix sum.
    rows = jnp.arange(b * hl)[:, None]
    per_block = jnp.zeros((b * hl, num_kv_blocks + 1), jnp.int32).at[rows, flat.reshape(b * hl, -1)].add(1)
    kv_offsets = jnp.cumsum(per_block[:, :num_kv_blocks], axis=-1, dtype=jnp.int32)
    kv_offsets = jnp.concatenate([jnp.zeros((b * hl, 1), jnp.int32), kv_offsets], axis=-1)
    return q_indices.astype(jnp.int32), kv_offsets.reshape(b, hl, num_kv_blocks + 1)


__all__ = ["BlockLayout"]
