"""pallas_kernels: one block-sparse flash-attention contract with reference, XLA and Pallas (GPU, TPU)
implementations. Pure JAX + Pallas; no Flax.

    from pallas_kernels import BlockLayout, block_sparse_attention, merge_attention
"""
from pallas_kernels.block_sparse.api import block_sparse_attention
from pallas_kernels.layout import BlockLayout
from pallas_kernels.merge import merge_attention

__all__ = ["BlockLayout", "block_sparse_attention", "merge_attention"]
