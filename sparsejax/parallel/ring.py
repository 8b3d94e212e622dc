"""Ring attention over the `sequence` mesh axis (flat or hierarchical), block-sparse at every step.

Call `ring_attention` inside `jax.shard_map` (see `sparsejax.parallel.context`, which does that). Each
device holds one shard of the (possibly load-balance-permuted, see `balance.py`) sequence: its queries
and its K/V with their positions and segment ids. K/V rotate around the ring with `lax.ppermute`; at
every step the same `block_sparse_attention` implementation runs on exactly the blocks of the visiting
shard that the layout selects, translated from global block indices to the shard's local ones; steps
with no block to compute skip the kernel (`lax.cond`; on GPU, where XLA reads a conditional's
predicate back to the host and so stalls the stream, the kernel runs instead with all counts 0,
which launches programs that exit at once). Blocks the layout does not list are never computed.
Partial results merge in float32 log space (the `merge_attention` algebra); each step's partial
arrives in q's dtype (the kernel contract), the running output and lse stay float32, and so do the
dK/dV accumulators that travel in the backward.

Ring schedule. The `n` shards form `n_outer` groups of `n_inner` consecutive shards (flat ring:
`n_outer = 1`). At outer step `o` and inner step `j`, device `r = (ro, ri)` holds the K/V of shard
`((ro - o) mod n_outer, (ri - j) mod n_inner)`. The inner ring rotates K/V inside a group (one host,
fast links) every step; the outer ring moves the group's home K/V to the next group once per outer
step, issued at the start of the outer step so that it overlaps the whole inner ring. Inside a step the
next step's `ppermute` is issued before the current step's compute, so XLA can overlap them.

Backward (`custom_vjp`): the same schedule again. dK/dV accumulators (float32) travel with their K/V
and, after a full turn of each ring, arrive back on their owners. Each step calls the kernel
implementation's backward with the *final* `out`, `lse` and `delta = rowsum(dO·O) - dlse`: flash-style
backwards rebuild the probabilities as `exp(s - lse)`, so with the global lse the per-step gradients
are exactly the pieces of the full gradient (no per-step partials are stored or recomputed). This needs
an implementation whose backward reads `lse` that way (`xla`, `pallas_gpu`, `pallas_tpu`); the
`reference` implementation recomputes its own normalisation and is refused.

Block coordinates. `kv_blocks = (kv_indices [B, Hl, nq_local, K], kv_counts [B, Hl, nq_local])`
lists, for each local query unit, KV blocks in *global* coordinates of the sharded sequence
(block `g` lives on shard `g // nk_local` at local block `g % nk_local`). `kv_blocks=None` means
"every block that can hold a visible key", derived per step from the blocks' position and segment-id
ranges (dense attention; under a causal mask with zigzag/striped balance this is what balances).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.layout import BlockLayout
from pallas_kernels.block_sparse import api as kernel_api
from pallas_kernels.merge import merge_attention

RING_IMPLEMENTATIONS = ("xla", "pallas_gpu", "pallas_tpu")
# Ring steps are unrolled (up to this many per loop iteration) so that XLA's scheduler can overlap one
# step's transfers with its neighbours' compute across iterations.
_UNROLL = 8


class RingSpec(NamedTuple):
    """Static description of the ring: mesh axis, group structure and kernel configuration."""
    axis: str                # the mesh axis the sequence is sharded over
    num_shards: int          # n = size of `axis`
    inner: int               # shards per inner ring (n for a flat ring); must divide n
    block_q: int
    block_k: int
    sm_scale: float
    causal: bool
    implementation: str
    interpret: bool
    skip_empty_steps: bool   # lax.cond around the kernel when a step has no block (see the module docstring)
    window: int | None = None  # the kernel's static sliding window (kv_pos > q_pos - window), causal only

    @property
    def outer(self) -> int:
        return self.num_shards // self.inner


def make_spec(*, axis: str, num_shards: int, inner: int | None, block_q: int, block_k: int, head_dim: int,
              sm_scale: float | None = None, causal: bool = True, implementation: str | None = None,
              interpret: bool = False, for_ring: bool = True, skip_empty_steps: bool | None = None,
              window: int | None = None) -> RingSpec:
    """Validated `RingSpec`; `inner=None` is a flat ring, `implementation=None` the backend default.
    `for_ring=False` (all-gather) accepts every kernel implementation."""
    inner = num_shards if inner is None else int(inner)
    if inner < 1 or num_shards % inner:
        raise ValueError(f"inner ring size {inner} must be a positive divisor of the {num_shards} sequence shards")
    name = kernel_api.default_implementation() if implementation is None else implementation
    if name not in kernel_api.IMPLEMENTATIONS:
        raise ValueError(f"unknown kernel implementation {name!r}; valid: {list(kernel_api.IMPLEMENTATIONS)} or None")
    if for_ring and name not in RING_IMPLEMENTATIONS:
        raise ValueError(f"ring attention needs a flash-style kernel backward; implementation {name!r} is not "
                         f"one of {RING_IMPLEMENTATIONS}")
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    if skip_empty_steps is None:
        skip_empty_steps = jax.default_backend() != "gpu"
    if window is not None and (not isinstance(window, int) or window < 1 or not causal):
        raise ValueError(f"window={window!r} must be None or an int >= 1 with causal=True")
    return RingSpec(axis, int(num_shards), inner, int(block_q), int(block_k), scale, bool(causal), name,
                    bool(interpret), bool(skip_empty_steps), window)


# ------------------------------------------------------------------------------------ per-step layouts
def block_ranges(pos, seg, block):
    """Per block of `block` tokens: (min pos, max pos, min seg, max seg), each [B, n_blocks]."""
    b, t = pos.shape
    pos = pos.reshape(b, t // block, block)
    seg = jnp.zeros_like(pos) if seg is None else seg.reshape(b, t // block, block)
    return pos.min(-1), pos.max(-1), seg.min(-1), seg.max(-1)


def _step_selection(q_ranges, kv_pos, kv_seg, kv_blocks, shard, *, spec: RingSpec, num_kv_heads: int):
    """What `step_layout` builds from: ("mask", bool [B, Hkv, nq, nk]) or ("lists", (keys, counts))."""
    nk = kv_pos.shape[1] // spec.block_k
    if kv_blocks is None:
        q_lo, q_hi, qs_lo, qs_hi = q_ranges
        k_lo, _, ks_lo, ks_hi = block_ranges(kv_pos, kv_seg, spec.block_k)
        mask = (ks_lo[:, None, :] <= qs_hi[:, :, None]) & (qs_lo[:, :, None] <= ks_hi[:, None, :])
        if spec.causal:
            mask &= k_lo[:, None, :] <= q_hi[:, :, None]
        return "mask", jnp.broadcast_to(mask[:, None], (mask.shape[0], num_kv_heads) + mask.shape[1:])
    indices, counts = kv_blocks
    cap = indices.shape[-1]
    local = indices - shard * nk
    keep = (jnp.arange(cap) < counts[..., None]) & (local >= 0) & (local < nk)
    keys = jnp.sort(jnp.where(keep, local, nk), axis=-1)[..., :min(cap, nk)]
    return "lists", (keys, keep.sum(-1, dtype=jnp.int32))


def step_layout(q_ranges, kv_pos, kv_seg, kv_blocks, shard, *, spec: RingSpec, num_kv_heads: int) -> BlockLayout:
    """The layout of local queries against the K/V of global shard `shard` (traced int32).

    q_ranges: `block_ranges` of the local queries; kv_pos / kv_seg [B, Tk_local] of the visiting shard.
    kv_blocks: None (dense: every block whose position / segment ranges can hold a visible key) or
    (kv_indices [B, Hl, nq, K], kv_counts [B, Hl, nq]) in global block coordinates.
    """
    kind, sel = _step_selection(q_ranges, kv_pos, kv_seg, kv_blocks, shard, spec=spec, num_kv_heads=num_kv_heads)
    if kind == "mask":
        return BlockLayout.from_block_mask(sel, block_q=spec.block_q, block_k=spec.block_k)
    return BlockLayout.from_indices(*sel, block_q=spec.block_q, block_k=spec.block_k,
                                    num_kv_blocks=kv_pos.shape[1] // spec.block_k)


def step_block_count(q_ranges, kv_pos, kv_seg, kv_blocks, shard, *, spec: RingSpec, num_kv_heads: int):
    """Number of (query unit, head unit, KV block) triples `step_layout` lists (int32 scalar)."""
    kind, sel = _step_selection(q_ranges, kv_pos, kv_seg, kv_blocks, shard, spec=spec, num_kv_heads=num_kv_heads)
    return (sel.sum() if kind == "mask" else sel[1].sum()).astype(jnp.int32)


def _schedule(spec: RingSpec):
    """(device's outer index, inner index, function (o, j) -> global shard visiting at that step)."""
    r = jax.lax.axis_index(spec.axis)
    ro, ri = r // spec.inner, r % spec.inner

    def visiting(o, j):
        return ((ro - o) % spec.outer) * spec.inner + (ri - j) % spec.inner
    return visiting


def _inner_shift(x, spec: RingSpec):
    """Rotate inside each group of `inner` consecutive shards: shard i sends to its group's i+1."""
    if spec.inner == 1:
        return x
    perm = [(i, (i // spec.inner) * spec.inner + (i + 1) % spec.inner) for i in range(spec.num_shards)]
    return jax.tree.map(lambda a: jax.lax.ppermute(a, spec.axis, perm), x)


def _outer_shift(x, spec: RingSpec):
    """Move every shard's data to the same inner slot of the next group."""
    if spec.outer == 1:
        return x
    perm = [(i, (i + spec.inner) % spec.num_shards) for i in range(spec.num_shards)]
    return jax.tree.map(lambda a: jax.lax.ppermute(a, spec.axis, perm), x)


# ------------------------------------------------------------------------------------ forward / backward
def _maybe_skip(spec: RingSpec, layout: BlockLayout, compute, skip):
    if spec.skip_empty_steps:
        return jax.lax.cond(layout.kv_counts.sum() > 0, compute, skip, None)
    return compute(None)


def _forward(spec: RingSpec, q, k, v, q_pos, kv_pos, q_seg, kv_seg, kv_blocks):
    impl = kernel_api.get_implementation(spec.implementation)
    b, tq, hq, _ = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    q_ranges = block_ranges(q_pos, q_seg, spec.block_q)
    visiting = _schedule(spec)
    static = dict(sm_scale=spec.sm_scale, causal=spec.causal, interpret=spec.interpret, window=spec.window)

    def inner_step(carry, j, o):
        acc, kv = carry
        kv_next = _inner_shift(kv, spec)                 # issued before this step's compute
        k_, v_, kp, ks = kv
        layout = step_layout(q_ranges, kp, ks, kv_blocks, visiting(o, j), spec=spec, num_kv_heads=hkv)

        def compute(_):
            impl.check_supported(q, k_, v_, layout)
            out, lse = impl.forward(q, k_, v_, layout, q_pos, kp, q_seg, ks, **static)
            return out.astype(jnp.float32), lse

        def skip(_):
            return jnp.zeros((b, tq, hq, dv), jnp.float32), jnp.full((b, hq, tq), -jnp.inf, jnp.float32)

        part = _maybe_skip(spec, layout, compute, skip)
        return (merge_attention([acc, part]), kv_next), None

    def outer_step(carry, o):
        acc, kv = carry
        kv_outer_next = _outer_shift(kv, spec)           # overlaps the whole inner ring
        (acc, _), _ = jax.lax.scan(functools.partial(inner_step, o=o), (acc, kv), jnp.arange(spec.inner),
                                   unroll=_UNROLL)
        return (acc, kv_outer_next), None

    acc0 = (jnp.zeros((b, tq, hq, dv), jnp.float32), jnp.full((b, hq, tq), -jnp.inf, jnp.float32))
    (acc, _), _ = jax.lax.scan(outer_step, (acc0, (k, v, kv_pos, kv_seg)), jnp.arange(spec.outer))
    out, lse = acc
    return out.astype(q.dtype), lse


def _backward(spec: RingSpec, residuals, cotangents):
    q, k, v, out, lse, q_pos, kv_pos, q_seg, kv_seg, kv_blocks = residuals
    d_out, d_lse = cotangents
    impl = kernel_api.get_implementation(spec.implementation)
    hkv = k.shape[2]
    q_ranges = block_ranges(q_pos, q_seg, spec.block_q)
    visiting = _schedule(spec)
    static = dict(sm_scale=spec.sm_scale, causal=spec.causal, interpret=spec.interpret, window=spec.window)
    row_dot = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
    delta = jnp.where(jnp.isneginf(lse), 0.0, row_dot - d_lse.astype(jnp.float32))
    d_out = d_out.astype(q.dtype)

    def step_grads(kv, o, j):
        k_, v_, kp, ks = kv
        layout = step_layout(q_ranges, kp, ks, kv_blocks, visiting(o, j), spec=spec, num_kv_heads=hkv)

        def compute(_):
            return impl.backward(q, k_, v_, out, lse, delta, d_out, layout, q_pos, kp, q_seg, ks, **static)

        def skip(_):
            return jnp.zeros_like(q), jnp.zeros_like(k_), jnp.zeros_like(v_)

        dq_i, dk_i, dv_i = _maybe_skip(spec, layout, compute, skip)
        return dq_i.astype(jnp.float32), (dk_i.astype(jnp.float32), dv_i.astype(jnp.float32))

    add = lambda a, b: jax.tree.map(jnp.add, a, b)

    def inner_step(carry, j, o):
        # `dkv` is the finished accumulator of the K/V that visited at step j - 1; its shift to the
        # device that holds that K/V now is issued before this step's compute, like the K/V's own.
        dq, kv, dkv = carry
        kv_next = _inner_shift(kv, spec)
        dkv_here = _inner_shift(dkv, spec)
        dq_i, dkv_i = step_grads(kv, o, j)
        return (dq + dq_i, kv_next, add(dkv_here, dkv_i)), None

    def outer_step(carry, o):
        dq, kv, dkv = carry
        kv_outer_next = _outer_shift(kv, spec)
        dq_0, dkv_0 = step_grads(kv, o, 0)               # step 0: the K/V (and accumulator) held at the start
        carry = (dq + dq_0, _inner_shift(kv, spec), add(dkv, dkv_0))
        (dq, _, dkv), _ = jax.lax.scan(functools.partial(inner_step, o=o), carry, jnp.arange(1, spec.inner),
                                       unroll=_UNROLL)
        return (dq, kv_outer_next, _outer_shift(_inner_shift(dkv, spec), spec)), None

    dkv0 = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    carry0 = (jnp.zeros(q.shape, jnp.float32), (k, v, kv_pos, kv_seg), dkv0)
    (dq, _, (dk, dv)), _ = jax.lax.scan(outer_step, carry0, jnp.arange(spec.outer))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.lru_cache(maxsize=None)
def _ring_fn(spec: RingSpec):
    @jax.custom_vjp
    def ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg, kv_blocks):
        return _forward(spec, q, k, v, q_pos, kv_pos, q_seg, kv_seg, kv_blocks)

    def ring_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, kv_blocks):
        out, lse = _forward(spec, q, k, v, q_pos, kv_pos, q_seg, kv_seg, kv_blocks)
        return (out, lse), (q, k, v, out, lse, q_pos, kv_pos, q_seg, kv_seg, kv_blocks)

    def ring_bwd(residuals, cotangents):
        dq, dk, dv = _backward(spec, residuals, cotangents)
        q_pos, kv_pos, q_seg, kv_seg, kv_blocks = residuals[5:]
        none = lambda tree: jax.tree.map(lambda _: None, tree)
        return (dq, dk, dv, none(q_pos), none(kv_pos), none(q_seg), none(kv_seg), none(kv_blocks))

    ring.defvjp(ring_fwd, ring_bwd)
    return ring


def ring_attention(q, k, v, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                   kv_blocks=None, *, spec: RingSpec):
    """Attention of the local queries over the whole ring's K/V. Call inside `shard_map` over `spec.axis`.

    q [B, Tl, Hq, Dqk], k [B, Tl, Hkv, Dqk], v [B, Tl, Hkv, Dv]: this device's shard (Tl a multiple of
    block_q and block_k). q_positions / kv_positions [B, Tl] int32: positions that the causal mask
    compares (kv_pos <= q_pos); q/kv_segment_ids [B, Tl] int32 or None (equal ids see each other).
    kv_blocks: None (dense) or (kv_indices [B, Hl, Tl/block_q, K], kv_counts [B, Hl, Tl/block_q]) in
    global block coordinates (see the module docstring).

    Returns out [B, Tl, Hq, Dv] in q's dtype and lse [B, Hq, Tl] float32, differentiable in q, k, v.
    """
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must both be given or both be None")
    check_local_shapes(q, k, spec)
    return _ring_fn(spec)(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, kv_blocks)


def check_local_shapes(q, k, spec: RingSpec) -> None:
    for name, t, blk in (("queries", q.shape[1], spec.block_q), ("keys", k.shape[1], spec.block_k)):
        if t % blk:
            raise ValueError(f"each sequence shard holds {t} {name}, not a multiple of the block size {blk}")


def ring_block_counts(q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None, kv_blocks=None, *,
                      spec: RingSpec, num_kv_heads: int):
    """int32 [1, n]: blocks (query unit × head unit × KV block) this device computes at each ring step.

    Call inside `shard_map` (out_specs `P(spec.axis)` gives the [devices, steps] balance report); uses
    the same per-step layouts as `ring_attention` (positions are gathered, not rotated: a report only)."""
    q_ranges = block_ranges(q_positions, q_segment_ids, spec.block_q)
    all_pos = jax.lax.all_gather(kv_positions, spec.axis, axis=0)          # [n, B, Tl]
    all_seg = None if kv_segment_ids is None else jax.lax.all_gather(kv_segment_ids, spec.axis, axis=0)
    visiting = _schedule(spec)
    counts = []
    for o in range(spec.outer):
        for j in range(spec.inner):
            s = visiting(o, j)
            seg = None if all_seg is None else all_seg[s]
            counts.append(step_block_count(q_ranges, all_pos[s], seg, kv_blocks, s, spec=spec,
                                           num_kv_heads=num_kv_heads))
    return jnp.stack(counts)[None].astype(jnp.int32)
