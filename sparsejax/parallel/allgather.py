"""All-gather context parallelism: queries stay sharded over `sequence`, K/V are gathered.

Each device gathers the whole (load-balance-permuted) K/V with their positions and segment ids and
runs one `block_sparse_attention` call of its local queries over them. The backward of the gather is a
reduce-scatter, so dK/dV end on their owners without further code. Simpler than the ring and the
choice when K/V are small next to Q (many query heads per KV head, short shards); its memory is the
whole sequence's K/V on every device. Block coordinates and the dense (`kv_blocks=None`) layout are
those of `ring.py`: the gathered sequence is shard 0 of a one-shard "ring".
"""
from __future__ import annotations

import jax

from pallas_kernels import block_sparse_attention
from sparsejax.parallel.ring import RingSpec, block_ranges, check_local_shapes, step_layout


def allgather_attention(q, k, v, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                        kv_blocks=None, *, spec: RingSpec):
    """Local queries over the gathered K/V. Call inside `shard_map` over `spec.axis`.

    Shapes and meaning as `ring.ring_attention`: q [B, Tl, Hq, Dqk], k/v [B, Tl, Hkv, D], positions and
    segment ids [B, Tl]; kv_blocks None or (kv_indices [B, Hl, Tl/block_q, K], kv_counts) in global
    block coordinates. Returns out [B, Tl, Hq, Dv] and lse [B, Hq, Tl] float32.
    """
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must both be given or both be None")
    check_local_shapes(q, k, spec)
    gather = lambda x: None if x is None else jax.lax.all_gather(x, spec.axis, axis=1, tiled=True)
    k_all, v_all, kv_pos, kv_seg = gather(k), gather(v), gather(kv_positions), gather(kv_segment_ids)
    layout = step_layout(block_ranges(q_positions, q_segment_ids, spec.block_q), kv_pos, kv_seg, kv_blocks, 0,
                         spec=spec, num_kv_heads=k.shape[2])
    return block_sparse_attention(
        q, k_all, v_all, layout, sm_scale=spec.sm_scale, causal=spec.causal, window=spec.window, q_positions=q_positions,
        kv_positions=kv_pos, q_segment_ids=q_segment_ids, kv_segment_ids=kv_seg,
        implementation=spec.implementation, interpret=spec.interpret)
