"""Building blocks of the decoder LM: parameters with logical sharding names, Linear, Embed, RMSNorm,
RoPE and the SwiGLU MLP.

Every parameter is an `nnx.Param` in float32 (`config.model.param_dtype`) whose `out_sharding`
metadata holds *logical* axis names (`"embed"`, `"heads"`, `"mlp"`, ...). The names are mapped onto
mesh axes by the rules of `sparsejax.parallel.mesh`, never here; parameters are created unsharded
(`eager_sharding=False`) and placed by the caller (a jitted initialiser with `out_shardings`).
Computation casts parameters to the compute dtype (`config.model.dtype`).

Axis letters in shapes: B batch, T sequence, E model width (d_model), H query heads, K KV heads,
D head dim, F MLP width, V vocabulary.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

LogicalNames = tuple[str | None, ...]


def dtype_from_name(name: str) -> jnp.dtype:
    """`"bfloat16"` -> `jnp.bfloat16`; raises naming the valid choices."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid choices: {sorted(DTYPES)}")
    return jnp.dtype(DTYPES[name])


def truncated_normal(std: float):
    """Normal(0, std) truncated at ±3 std (rescaled so the std is exactly `std`), as Llama."""
    # jax's truncated_normal(lower=-3, upper=3) has std ~0.9866; divide it out.
    correction = 0.98658764
    def init(key, shape, dtype=jnp.float32):
        return (std / correction) * jax.random.truncated_normal(key, -3.0, 3.0, shape, dtype)
    return init


def make_param(rngs: nnx.Rngs, init, shape: Sequence[int], names: LogicalNames, dtype) -> nnx.Param:
    """An `nnx.Param` of `shape` from `init(key, shape, dtype)` with logical axis names `names`."""
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match the parameter shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False)


class Linear(nnx.Module):
    """y = x · W over the trailing `len(in_shape)` axes of x; W has shape `in_shape + out_shape`.

    Multi-axis shapes keep heads as their own axis so they can be sharded: the query projection is
    `Linear((E,), (H, D), names=("embed", "heads", "head_dim"))`: x [B, T, E] -> [B, T, H, D].
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *, names: LogicalNames,
                 std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.in_ndim = len(in_shape)
        self.dtype = dtype
        self.kernel = make_param(rngs, truncated_normal(std), (*in_shape, *out_shape), names, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.kernel[...].astype(self.dtype)
        n = self.in_ndim
        return jax.lax.dot_general(x.astype(self.dtype), w,
                                   ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))


class Embed(nnx.Module):
    """Token embedding table [V, E] ("vocab", "embed"); `attend` gives tied-output logits."""

    def __init__(self, vocab_size: int, d_model: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = make_param(rngs, truncated_normal(std), (vocab_size, d_model),
                                    ("vocab", "embed"), param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [B, T] int32 -> [B, T, E] in the compute dtype."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [B, T, E] -> logits [B, T, V] float32 (float32 accumulation)."""
        table = self.embedding[...].astype(self.dtype)
        return jnp.einsum("bte,ve->btv", x.astype(self.dtype), table, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x²) + eps) * scale, computed in float32, returned in the compute dtype."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = make_param(rngs, lambda key, shape, dt: jnp.ones(shape, dt), (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (the half-split "rotate_half" form used by Llama in HF/JAX ports).

    x [B, T, N, D] (N any number of heads, D even), positions [B, T] int32 -> [B, T, N, D] in x's dtype.
    Pair (x[..., i], x[..., i + D/2]) is rotated by the angle positions * theta^(-2i/D), in float32.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")
    inv_freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)            # [D/2]
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq                  # [B, T, 1, D/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class SwiGLU(nnx.Module):
    """out = W_down (silu(x W_gate) * (x W_up)): [B, T, E] -> [B, T, E], hidden [B, T, F] ("mlp")."""

    def __init__(self, d_model: int, mlp_dim: int, *, std: float, out_std: float, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = Linear((d_model,), (mlp_dim,), names=("embed", "mlp"), std=std, **kw)
        self.up = Linear((d_model,), (mlp_dim,), names=("embed", "mlp"), std=std, **kw)
        self.down = Linear((mlp_dim,), (d_model,), names=("mlp", "embed"), std=out_std, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def output_std(init_std: float, num_layers: int) -> float:
    """Std of the projections that write into the residual stream: init_std / sqrt(2 * num_layers)."""
    return init_std / math.sqrt(2 * num_layers)
