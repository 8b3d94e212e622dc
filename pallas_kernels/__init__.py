"""pallas_kernels: one block-sparse flash-attention contract with reference, XLA and Pallas (GPU, TPU)
implementations. Pure JAX + Pallas; no Flax. The contract is docs/contracts.md §1.

    from pallas_kernels import BlockLayout, block_sparse_attention, merge_attention

    # q [B, Tq, Hq, Dqk], k [B, Tk, Hkv, Dqk], v [B, Tk, Hkv, Dv]
    layout = BlockLayout.causal(Tq, Tk, block_q=64, block_k=64, num_head_units=Hkv)
    # or .from_block_mask(mask [B, Hl, nq, nk]), .from_indices(indices, counts, ...),
    #    .sliding_window(...), .top_k(scores [B, Hl, nq, nk], k, ...)
    out, lse = block_sparse_attention(q, k, v, layout)       # out [B, Tq, Hq, Dv], lse [B, Hq, Tq] f32
    # exact sliding window t - w < j <= t: the layout picks the blocks, window= masks the far edge
    win = BlockLayout.sliding_window(Tq, Tk, w, block_q=64, block_k=64, num_head_units=Hkv)
    out, lse = block_sparse_attention(q, k, v, win, window=w)
    out, lse = merge_attention([(out_a, lse_a), (out_b, lse_b)])   # partials over disjoint keys

`implementation=None` runs pallas_gpu on GPU, pallas_tpu on TPU and xla elsewhere; "reference" is the
dense float32 oracle.
"""
from pallas_kernels.block_sparse.api import block_sparse_attention
from pallas_kernels.layout import BlockLayout
from pallas_kernels.merge import merge_attention

__all__ = ["BlockLayout", "block_sparse_attention", "merge_attention"]
