"""Decoder-only transformer LM (Llama-style) whose attention is a registered variant.

    inputs [B, T] -> Embed -> L x Block -> RMSNorm -> logits [B, T, V] float32
    Block: x + Attention(RMSNorm(x), positions, segment_ids); then x + SwiGLU(RMSNorm(x))

The attention class of every block is `get_attention(config.attention.kind)`. Two layouts of the L
blocks (`config.model.scan_layers`):

- False: a Python list, params["blocks"][i] per layer; every layer is traced (compile time grows
  with L; a variant may keep per-layer non-parameter state).
- True: one Block whose parameters are stacked on a leading axis, params["layers"] leaves
  [L, ...] with the logical name "layers" first (never sharded: `sparsejax.parallel.mesh`). Created
  by `nnx.vmap` over L split parameter keys; the forward is one `jax.lax.scan` over the layer axis,
  so one layer body is traced and compiled whatever L. Only `nnx.Param` state is allowed per layer.
  The remat policy wraps the scan body, so checkpoint names and policies act as in the list layout.

Remat (`config.model.remat`): "none"; "full" (recompute the whole block in the backward pass);
"dots" (save the outputs of matmuls without batch dimensions, i.e. the projections and the MLP,
recompute the rest, `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`); "dots_attention"
(as "dots", and also the outputs and softmax statistics of the attention kernels, cuDNN's and the
Pallas block-sparse ones (Triton, TPU and Mosaic GPU), plus NSA's block selection, so the backward pass does not run the attention
forward again; costs about [B, T, H, D] per layer).

Initialisation (Llama / torchtitan conventions): truncated normal (±3 std) with `init_std` for the
embedding and the input projections, `init_std / sqrt(2 L)` for the projections that write into the
residual stream (attention output, MLP down), `d_model ** -0.5` for an untied output head, ones for
the RMSNorm scales.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.block_sparse.api import KERNEL_OUTPUT_NAME
from sparsejax.attention import get_attention
from sparsejax.layers import Embed, RMSNorm, SwiGLU, dtype_from_name, make_param, output_std, truncated_normal
from sparsejax.parallel.mesh import constrain, rules_from_config

# Primitives whose outputs are attention results with their softmax statistics (the residuals of the
# kernel's backward): saving them spares the backward pass a second attention forward.
ATTENTION_PRIMITIVES = frozenset({
    "dot_product_attention_fwd_wrapper",   # cuDNN flash attention (jax)
    "pallas_call",                         # pallas_kernels' block-sparse forward (out, lse) on GPU / TPU
})
# Values tagged with `jax.ad_checkpoint.checkpoint_name` as worth keeping: small results of expensive,
# non-differentiable passes (NSA's top-n block selection: int32 [B, Hkv, T, n]) and the (out, lse) of
# the Mosaic GPU (Hopper) block-sparse forward, which is not a pallas_call (`KERNEL_OUTPUT_NAME`).
SAVED_NAMES = frozenset({"nsa_selection", KERNEL_OUTPUT_NAME})


def _dots_and_attention_saveable(prim, *args, **params) -> bool:
    return (prim.name in ATTENTION_PRIMITIVES
            or (prim.name == "name" and params.get("name") in SAVED_NAMES)
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_attention": _dots_and_attention_saveable,
}


class Block(nnx.Module):
    """Pre-norm transformer block: x [B, T, E] -> ([B, T, E], attention aux)."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        m = config.model
        kw = dict(dtype=dtype_from_name(m.dtype), param_dtype=dtype_from_name(m.param_dtype), rngs=rngs)
        self.rules = tuple(rules_from_config(config).items())
        self.attention_norm = RMSNorm(m.d_model, eps=m.norm_eps, **kw)
        self.attention = get_attention(config.attention.kind)(config, rngs=rngs)
        self.mlp_norm = RMSNorm(m.d_model, eps=m.norm_eps, **kw)
        self.mlp = SwiGLU(m.d_model, m.mlp_dim, std=m.init_std, out_std=output_std(m.init_std, m.num_layers), **kw)

    def __call__(self, x, positions, segment_ids):
        a, aux = self.attention(self.attention_norm(x), positions, segment_ids)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "sequence", None), self.rules), aux


def _apply_block(block: Block, x, positions, segment_ids):
    return block(x, positions, segment_ids)


def stacked_blocks(config, rngs: nnx.Rngs) -> Block:
    """One Block whose parameters are stacked [L, ...] over config.model.num_layers layers, each layer
    from its own split of `rngs`; the logical names of every parameter gain "layers" in front."""
    @nnx.split_rngs(splits=config.model.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(layer_rngs):
        return Block(config, rngs=layer_rngs)

    blocks = create(rngs)
    other = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(blocks, nnx.Not(nnx.Param))))
    if jax.tree.leaves(other, is_leaf=lambda x: isinstance(x, tuple)):
        raise ValueError(f"config.model.scan_layers = True needs layers that hold only nnx.Param state; the "
                         f"{config.attention.kind!r} layer also holds {other} (shapes); "
                         f"set config.model.scan_layers = False")
    return blocks


def scan_blocks(blocks: Block, remat: str, x, positions, segment_ids):
    """Applies stacked `blocks` (params [L, ...]) in order as one `lax.scan`, the remat policy around
    the scan body. x [B, T, E] -> (x [B, T, E], aux: name -> float32 [L] per-layer values)."""
    graphdef, state = nnx.split(blocks)

    def body(x, layer_params):
        x, aux = nnx.merge(graphdef, layer_params)(x, positions, segment_ids)
        return x, {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}

    if remat != "none":   # inside a scan CSE cannot merge the recomputation away: no need to prevent it
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(body, x, nnx.to_pure_dict(state))


class Transformer(nnx.Module):
    """`model(inputs, positions, segment_ids) -> (logits, aux)`.

    inputs [B, T] int32 token ids; positions [B, T] int32 (restart at 0 in each packed document; RoPE
    uses them); segment_ids [B, T] int32 (1, 2, ... per document, 0 = padding; attention never crosses
    segments). logits [B, T, V] float32. aux: the attention variants' auxiliaries over layers,
    "loss/..." entries summed, "stats/..." entries averaged.
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        m = config.model
        self.dtype = dtype_from_name(m.dtype)
        self.rules = tuple(rules_from_config(config).items())
        self.remat = m.remat
        if m.remat not in REMAT_POLICIES:
            raise ValueError(f"config.model.remat = {m.remat!r}; valid choices: {list(REMAT_POLICIES)}")
        self.embed = Embed(m.vocab_size, m.d_model, std=m.init_std, dtype=self.dtype,
                           param_dtype=dtype_from_name(m.param_dtype), rngs=rngs)
        self.num_layers = m.num_layers
        self.scan_layers = m.scan_layers
        if m.scan_layers:
            self.layers = stacked_blocks(config, rngs)
        else:
            self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(m.num_layers)])
        self.final_norm = RMSNorm(m.d_model, eps=m.norm_eps, dtype=self.dtype,
                                  param_dtype=dtype_from_name(m.param_dtype), rngs=rngs)
        self.tie_embeddings = m.tie_embeddings
        if not m.tie_embeddings:
            self.lm_head = make_param(rngs, truncated_normal(m.d_model ** -0.5), (m.d_model, m.vocab_size),
                                      ("embed", "vocab"), dtype_from_name(m.param_dtype))

    def __call__(self, inputs, positions, segment_ids):
        rules = self.rules
        x = constrain(self.embed(inputs), ("batch", "sequence", None), rules)
        if self.scan_layers:
            x, per_layer = scan_blocks(self.layers, self.remat, x, positions, segment_ids)
            totals = {k: jnp.sum(v, axis=0) for k, v in per_layer.items()}
        else:
            apply = _apply_block
            if self.remat != "none":
                apply = nnx.remat(_apply_block, policy=REMAT_POLICIES[self.remat], prevent_cse=True)
            totals: dict[str, jax.Array] = {}
            for block in self.blocks:
                x, aux = apply(block, x, positions, segment_ids)
                for key, value in aux.items():
                    totals[key] = totals.get(key, 0.0) + value.astype(jnp.float32)
        aux = {k: (v if k.startswith("loss/") else v / self.num_layers) for k, v in totals.items()}

        x = self.final_norm(x)
        if self.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = jnp.einsum("bte,ev->btv", x, self.lm_head[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "sequence", "vocab"), rules), aux


def count_params(config) -> int:
    """Number of parameters of `Transformer(config)`, from shapes only (no allocation)."""
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
