"""Projections shared by every attention variant: q/k/v with grouped-query heads and RoPE, and the
output projection. Variants own these as submodules so that all of them have the same parameter
names, shapes, initialisers and sharding names, and a checkpoint of one variant's projections loads
into another.

Shapes: x [B, T, E]; q [B, T, H, D]; k, v [B, T, K, D] with H = G * K (GQA).
"""
from __future__ import annotations

import jax
from flax import nnx

from sparsejax.layers import Linear, apply_rope, dtype_from_name, output_std


class QKVProjection(nnx.Module):
    """x [B, T, E], positions [B, T] -> q [B, T, H, D], k [B, T, K, D] (both rotated), v [B, T, K, D]."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        m = config.model
        kw = dict(std=m.init_std, dtype=dtype_from_name(m.dtype), param_dtype=dtype_from_name(m.param_dtype),
                  rngs=rngs)
        self.rope_theta = m.rope_theta
        self.query = Linear((m.d_model,), (m.num_heads, m.head_dim), names=("embed", "heads", "head_dim"), **kw)
        self.key = Linear((m.d_model,), (m.num_kv_heads, m.head_dim), names=("embed", "kv_heads", "head_dim"), **kw)
        self.value = Linear((m.d_model,), (m.num_kv_heads, m.head_dim), names=("embed", "kv_heads", "head_dim"), **kw)

    def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        q = apply_rope(self.query(x), positions, self.rope_theta)
        k = apply_rope(self.key(x), positions, self.rope_theta)
        return q, k, self.value(x)


class OutputProjection(nnx.Module):
    """o [B, T, H, D] -> [B, T, E]; initialised with the residual-branch std init_std / sqrt(2 L)."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        m = config.model
        self.proj = Linear((m.num_heads, m.head_dim), (m.d_model,), names=("heads", "head_dim", "embed"),
                           std=output_std(m.init_std, m.num_layers), dtype=dtype_from_name(m.dtype),
                           param_dtype=dtype_from_name(m.param_dtype), rngs=rngs)

    def __call__(self, o: jax.Array) -> jax.Array:
        return self.proj(o)
