"""Dense causal attention with packed-document isolation: the baseline variant `dense`.

Projections (GQA + RoPE) come from `projection.py`; the attention itself is `attend`, one small
function that sequence parallelism can replace.

Implementations (`config.attention.dense.implementation`):
- `"xla"`: `jax.nn.dot_product_attention(implementation="xla")` with `is_causal=True` and a boolean
  segment mask [B, 1, T, T]. Works everywhere and in every dtype; materialises [B, H, T, T] logits.
- `"cudnn"`: cuDNN flash attention (GPU, bfloat16/float16 only: cuDNN has no float32 flash kernel).
  `jax.nn.dot_product_attention` has no segment-id argument in jax 0.10 / 0.11 (only a mask, which
  cuDNN turns into a [B, 1, T, T] additive bias that it reads for every head, and per-row
  `query_seq_lengths` for trailing padding). So the packed documents are passed as cuDNN's *packed
  (ragged) layout* through `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention` with
  `q_offsets`/`kv_offsets` [B, M+1] and `q_seqlen`/`kv_seqlen` [B, M] (M = `max_segments`, static),
  derived on device from the segment ids: no [T, T] array exists on this path, and cuDNN skips the
  blocks between documents. `lax.switch` picks, from the largest number of runs of segment ids in a
  row: one run everywhere -> plain causal cuDNN (fastest); up to M -> packed; more than M -> exact
  flash attention with segment ids from the block-sparse Pallas kernel (`flash_segments`), whose use
  the aux statistic `stats/dense_segment_overflow` reports (the fraction of layers that took it).
  The packed layout needs a Hopper or newer GPU (older GPUs use `flash_segments` for any batch with
  more than one segment per row). Every empty slot of the [B, M] table costs cuDNN a
  pass over a full-length grid, so M is small: measured on an H200 (jax 0.11.2, cuDNN 9.19, B=8,
  T=8192, 16 heads of 128, 8 KV heads, bf16, fwd+bwd): plain causal 15.0 ms; two documents per row,
  packed, 9.7 ms with M=16 and 14.2 ms with M=64. cuDNN's own masked path (`mask=` -> a [B, 1, T, T]
  bias) was 2x slower than plain causal at B=1 and ran the 1B model out of memory, so it is not used.
- `"auto"` (default): `"cudnn"` on GPU when the compute dtype is bfloat16 or float16, else `"xla"`.

Segment semantics (both paths): query i sees key j iff j <= i and segment_ids[i] == segment_ids[j].
Padding (segment 0) therefore attends among itself and never to a document; no row is empty.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pallas_kernels import BlockLayout, block_sparse_attention
from sparsejax.attention import register_attention
from sparsejax.attention.projection import OutputProjection, QKVProjection
from sparsejax.layers import dtype_from_name
from sparsejax.parallel import context
from sparsejax.parallel.mesh import constrain, rules_from_config

IMPLEMENTATIONS = ("auto", "cudnn", "xla")
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_FLASH_BLOCK = 64   # block_q = block_k of the overflow path's causal layout


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "implementation": "auto",   # "auto" | "cudnn" | "xla"
        "max_segments": 16,         # cuDNN packed layout: documents (runs of segment ids) per row
    })


def validate(config) -> None:
    c = config.attention.dense
    if c.implementation not in IMPLEMENTATIONS:
        raise ValueError(f"config.attention.dense.implementation = {c.implementation!r}; "
                         f"valid choices: {list(IMPLEMENTATIONS)}")
    if c.implementation == "cudnn" and jnp.dtype(dtype_from_name(config.model.dtype)) not in CUDNN_DTYPES:
        raise ValueError(f"config.attention.dense.implementation = 'cudnn' needs config.model.dtype in "
                         f"['bfloat16', 'float16'], got {config.model.dtype!r} (cuDNN has no float32 flash "
                         f"attention); use 'auto' or 'xla'")
    if not isinstance(c.max_segments, int) or c.max_segments < 1:
        raise ValueError(f"config.attention.dense.max_segments = {c.max_segments!r}: must be a positive int")


def resolve_implementation(requested: str, dtype, head_dim: int, backend: str | None = None) -> str:
    """"auto" -> "cudnn" on GPU for bfloat16/float16 and head_dim a multiple of 8 up to 256 (cuDNN's
    flash-attention limits), else "xla"; an explicit "cudnn" outside those limits raises."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"unknown dense attention implementation {requested!r}; valid choices: {list(IMPLEMENTATIONS)}")
    backend = backend or jax.default_backend()
    cudnn_ok = (backend == "gpu" and jnp.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 256)
    if requested == "cudnn" and not cudnn_ok:
        raise ValueError(f"implementation 'cudnn' needs a GPU, bfloat16/float16 inputs and head_dim a multiple of 8 "
                         f"up to 256; got backend {backend!r}, dtype {jnp.dtype(dtype).name}, head_dim {head_dim}; "
                         f"use 'auto' or 'xla'")
    if requested == "auto":
        return "cudnn" if cudnn_ok else "xla"
    return requested


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T] int32 -> [B, 1, T, T] bool: True where query and key are in the same segment."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def packed_segments(segment_ids: jax.Array, max_segments: int):
    """cuDNN packed-layout arguments from segment ids [B, T].

    A segment is a maximal run of equal ids (padding included). Returns offsets [B, M+1] int32 (start
    of each run, -1 past the last), lengths [B, M] int32 (-1 past the last) and the run count [B].
    Runs beyond M are dropped here; the caller checks the count.
    """
    b, t = segment_ids.shape
    m = max_segments
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    run = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1                          # [B, T]
    count = run[:, -1] + 1                                                         # [B]
    rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
    cols = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
    start_slot = jnp.where(starts & (run < m), run, m + 1)                         # m + 1: dropped
    offsets = jnp.full((b, m + 1), -1, jnp.int32).at[rows, start_slot].set(cols, mode="drop")
    lengths = jnp.zeros((b, m), jnp.int32).at[rows, run].add(1, mode="drop")
    lengths = jnp.where(jnp.arange(m)[None, :] < count[:, None], lengths, -1)
    return offsets, lengths, count


# jax < 0.11 scales the packed KV offsets by the *query* head count (jax 0.11 uses the KV head count),
# so there K/V must be repeated to the query heads on the packed path.
_PACKED_NEEDS_MHA = tuple(int(x) for x in jax.__version__.split(".")[:2]) < (0, 11)


def _packed_layout_supported() -> bool:
    """cuDNN's packed layout needs compute capability >= 9.0 (Hopper); older GPUs send every row
    with more than one segment to `flash_segments`."""
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    return tuple(int(x) for x in str(capability).split(".")[:2]) >= (9, 0)


def _cudnn_single(q, k, v, segment_ids, offsets, lengths):
    del segment_ids, offsets, lengths      # every row is one run of one id: plain causal attention
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def _cudnn_packed(q, k, v, segment_ids, offsets, lengths):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    del segment_ids
    group = q.shape[2] // k.shape[2]
    if _PACKED_NEEDS_MHA and group > 1:
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    return cudnn_attention(q, k, v, None, None, lengths, lengths, offsets, offsets,
                           scale=q.shape[-1] ** -0.5, mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


def flash_segments(q, k, v, segment_ids, *, implementation: str | None = None):
    """Exact causal + segment attention through `pallas_kernels.block_sparse_attention` with a causal
    layout (flash-style: no [T, T] array). q [B, T, H, D], k/v [B, T, K, D] -> [B, T, H, D].
    `implementation=None` is the kernel library's best for the backend (pallas_gpu on GPU)."""
    t, kv_heads = q.shape[1], k.shape[2]
    layout = BlockLayout.causal(t, t, block_q=_FLASH_BLOCK, block_k=_FLASH_BLOCK, num_head_units=kv_heads)
    return block_sparse_attention(q, k, v, layout, causal=True, return_lse=False, q_segment_ids=segment_ids,
                                  kv_segment_ids=segment_ids, implementation=implementation)


def _cudnn_overflow(q, k, v, segment_ids, offsets, lengths):
    del offsets, lengths
    return flash_segments(q, k, v, segment_ids)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, implementation: str,
           max_segments: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Causal, segment-isolated attention. q [B, T, H, D], k/v [B, T, K, D], segment_ids [B, T] int32
    -> (out [B, T, H, D] in q's dtype, aux). `implementation` is "xla" or "cudnn" (already resolved).

    cuDNN picks one of three exact paths at run time from the largest number of runs of segment ids
    in a row: 1 -> plain causal; 2..max_segments -> packed layout; more -> `flash_segments` (the
    block-sparse Pallas kernel; counted in `stats/dense_segment_overflow`)."""
    if implementation == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids), is_causal=True,
                                            implementation="xla"), {}
    if implementation == "cudnn":
        offsets, lengths, count = packed_segments(segment_ids, max_segments)
        most = jnp.max(count)
        if _packed_layout_supported():
            branches = (_cudnn_single, _cudnn_packed, _cudnn_overflow)
            branch = jnp.where(most == 1, 0, jnp.where(most <= max_segments, 1, 2))
        else:
            branches = (_cudnn_single, _cudnn_overflow)
            branch = jnp.where(most == 1, 0, 1)
        out = jax.lax.switch(branch, branches, q, k, v, segment_ids, offsets, lengths)
        overflow = branch == len(branches) - 1
        return out, {"stats/dense_segment_overflow": overflow.astype(jnp.float32)}
    raise ValueError(f"attend: implementation must be 'xla' or 'cudnn', got {implementation!r}")


@register_attention("dense")
class DenseAttention(nnx.Module):
    """Dense causal GQA attention: x [B, T, E], positions [B, T], segment_ids [B, T] -> ([B, T, E], aux)."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        dtype = dtype_from_name(config.model.dtype)
        self.implementation = resolve_implementation(config.attention.dense.implementation, dtype,
                                                     config.model.head_dim)
        self.max_segments = config.attention.dense.max_segments
        self.rules = tuple(rules_from_config(config).items())   # hashable: static graph data
        self.context = context.from_config(config)               # sequence parallelism (None: off)
        self.qkv = QKVProjection(config, rngs=rngs)
        self.out = OutputProjection(config, rngs=rngs)

    @staticmethod
    def attention_flops(config, seq_len: int) -> float:
        """Forward FLOPs of one layer's attention over one sequence of `seq_len` tokens: the causal
        half of the T x T work (read by `sparsejax.training.metrics` for tokens/s -> MFU)."""
        from sparsejax.training.metrics import dense_causal_attention_flops
        return dense_causal_attention_flops(config, seq_len)

    def __call__(self, x, positions, segment_ids):
        q, k, v = self.qkv(x, positions)
        if self.context is not None and self.context.active():   # sequence-sharded: ring / all-gather
            return self.out(self.context(q, k, v, positions, segment_ids)[0]), {}
        # The whole sequence is visible to every query: gather it if activations are sequence-sharded.
        q, k, v = (constrain(t, ("batch", None, h, "head_dim"), self.rules)
                   for t, h in ((q, "heads"), (k, "kv_heads"), (v, "kv_heads")))
        o, aux = attend(q, k, v, segment_ids, implementation=self.implementation, max_segments=self.max_segments)
        return self.out(o), aux
