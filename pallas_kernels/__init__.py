"""pallas_kernels: one block-sparse flash-attention contract with reference, XLA and Pallas (GPU, TPU) implementations."""
