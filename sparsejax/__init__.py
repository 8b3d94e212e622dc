"""sparsejax: sparse-attention variants, a decoder LM and a sharded training loop on pallas_kernels."""
