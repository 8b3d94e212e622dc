"""NSA — Native Sparse Attention (DeepSeek, arXiv 2502.11089), registered as `nsa`.

    o_t = Σ_{c ∈ {cmp, slc, win}} g_t^c · Attn(q_t, K_t^c, V_t^c),   g_t = sigmoid(gate(x_t))  [per head]

Three branches with independent keys and values, each its own softmax, combined by per-head gates:
- cmp: attention over compressed tokens (an MLP φ over blocks of l keys/values, stride d), visible once
  their block is complete (`compressed.py`);
- slc: attention over the n blocks of l' tokens chosen per (token, KV group) from the compression
  probabilities (Eq. 9), the document's first block and the 2 blocks ending at the query's own block
  always among them;
- win: the last w tokens, t − w < j ≤ t.

Kernels. Every branch goes through `pallas_kernels.block_sparse_attention`; no [T, T] array exists.
- cmp: one call, queries in blocks of `compress_kernel_block_q` over compressed blocks of
  `compress_kernel_block_k` (128 and 128, so that on a Hopper GPU it runs the Mosaic GPU kernels
  with two consumer warpgroups each; benchmarks/RESULTS.md, NSA),
  block-causal through positions (query t at t, compressed token i at i·d + l − 1); its
  log-sum-exp feeds the importance pass (`compressed.select_blocks`: on GPU the Pallas kernel
  `pallas_kernels.nsa_importance`, which writes only the [T, K, S] block scores; `implementation`
  "xla", "reference" or "pallas_tpu" take its XLA form).
- slc: one call, a per-token (block_q = 1), per-KV-group (Hl = K) layout from the index lists.
- win: one call with block_q = block_k = b over `BlockLayout.sliding_window` (the w/b + 1 blocks that
  intersect query block b's windows when b | w) and the kernel's `window=w`, which masks the far
  edge t − w < j inside the first of them: exact.

Packed documents: every branch passes segment ids to the kernel (a key is seen only from its own
document). Compressed tokens that straddle a document boundary are invisible (see `compressed.py`);
the forced "initial" block is the first block of the query's document; selection blocks are on the
grid of the packed row, and keys of a selected block outside the query's document are masked.

Axis letters: B batch, T tokens, E model width, H query heads, K KV heads, G = H / K, D head dim.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import BlockLayout, block_sparse_attention
from sparsejax.attention import register_attention
from sparsejax.attention.compressed import (ACTIVATIONS, CompressionParams, compress, compressed_attention,
                                            compressed_positions, document_starts, importance_implementation,
                                            num_compressed, select_blocks)
from sparsejax.attention.projection import OutputProjection, QKVProjection
from sparsejax.layers import Linear, apply_rope, dtype_from_name, make_param
from sparsejax.parallel import context, nsa_context
from sparsejax.parallel.mesh import constrain, rules_from_config

IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas_gpu", "pallas_tpu")
BRANCHES = ("cmp", "slc", "win")


def default_config() -> ml_collections.ConfigDict:
    """`config.attention.nsa`: the paper's hyper-parameters (§4.1)."""
    return ml_collections.ConfigDict({
        "compress_block": 32,        # l: tokens per compressed token
        "compress_stride": 16,       # d: stride between compressed tokens (d | l)
        "select_block": 64,          # l': tokens per selection block (l <= l', d | l')
        "num_selected": 16,          # n: selected blocks per token, forced ones included
        "num_initial": 1,            # forced: the first block(s) of the query's document
        "num_local": 2,              # forced: the blocks ending at the query's own block
        "window": 512,               # w: sliding window, t - w < j <= t
        "window_block": 128,         # kernel block of the window branch (must divide w; 128: the
                                     # Mosaic GPU kernels on Hopper, benchmarks/RESULTS.md, NSA)
        "compress_hidden": 256,      # F: hidden width of the compression MLP φ
        "compress_activation": "silu",
        "gate_hidden": 0,            # 0: gate = sigmoid(Linear(x)); > 0: a hidden layer of this width
        "gate_activation": "silu",
        "gate_bias_init": (0.0, 0.0, 0.0),   # initial gate logits of (cmp, slc, win)
        "compress_kernel_block_q": 128,
        "compress_kernel_block_k": 128,
        "score_chunk_elements": 1 << 26,     # bound on the importance pass's per-chunk float32 scores
        "implementation": "auto",    # block_sparse_attention implementation; auto = best for the backend
        "fused_topn": True,          # GPU: importance scores, masking and top-n in one Pallas kernel
                                     # (n <= 32; compressed.select_blocks); False: scores, then XLA top-n
    })


@dataclasses.dataclass(frozen=True)
class NSASpec:
    """The static hyper-parameters of the NSA attention function (hashable; see `default_config`)."""
    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    num_selected: int = 16
    num_initial: int = 1
    num_local: int = 2
    window: int = 512
    window_block: int = 128
    compress_activation: str = "silu"
    compress_kernel_block_q: int = 128
    compress_kernel_block_k: int = 128
    score_chunk_elements: int = 1 << 26
    implementation: str = "auto"
    fused_topn: bool = True
    interpret: bool = False          # run a Pallas implementation in interpret mode (CPU tests); not a config key

    def __post_init__(self):
        check_hyperparameters(self)

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> "NSASpec":
        return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls) if f.name != "interpret"})

    @property
    def kernel_implementation(self) -> str | None:
        return None if self.implementation == "auto" else self.implementation


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.attention.nsa.{name} = {value!r}: must be a positive int")


def check_hyperparameters(c) -> None:
    """Raise ValueError naming the bad value and the valid choices (c: NSASpec or the config section)."""
    get = (lambda k: c[k]) if isinstance(c, ml_collections.ConfigDict) else (lambda k: getattr(c, k))
    for name in ("compress_block", "compress_stride", "select_block", "num_selected", "window", "window_block",
                 "compress_kernel_block_q", "compress_kernel_block_k", "score_chunk_elements"):
        _positive_int(name, get(name))
    l, d, ls = get("compress_block"), get("compress_stride"), get("select_block")
    if l % d:
        raise ValueError(f"config.attention.nsa: compress_stride d={d} must divide compress_block l={l}; "
                         f"valid d: {[x for x in range(1, l + 1) if l % x == 0]}")
    if ls % d:
        raise ValueError(f"config.attention.nsa: compress_stride d={d} must divide select_block l'={ls}")
    if l > ls:
        raise ValueError(f"config.attention.nsa: compress_block l={l} must be <= select_block l'={ls} (Eq. 9)")
    for name in ("num_initial", "num_local"):
        if not isinstance(get(name), int) or get(name) < 0:
            raise ValueError(f"config.attention.nsa.{name} = {get(name)!r}: must be an int >= 0")
    if get("num_local") < 1:
        raise ValueError(f"config.attention.nsa.num_local = {get('num_local')}: must be >= 1 (the query's own "
                         f"block must be selected, or early tokens would see nothing)")
    n, forced = get("num_selected"), get("num_initial") + get("num_local")
    if n < forced:
        raise ValueError(f"config.attention.nsa.num_selected = {n}: must be >= num_initial + num_local = {forced} "
                         f"(the forced blocks count inside n)")
    if get("window") % get("window_block"):
        raise ValueError(f"config.attention.nsa.window_block = {get('window_block')} must divide window = "
                         f"{get('window')}; valid: {[x for x in (16, 32, 64, 128) if get('window') % x == 0]}")
    if get("compress_activation") not in ACTIVATIONS:
        raise ValueError(f"config.attention.nsa.compress_activation = {get('compress_activation')!r}; "
                         f"valid choices: {sorted(ACTIVATIONS)}")
    if get("implementation") not in IMPLEMENTATIONS:
        raise ValueError(f"config.attention.nsa.implementation = {get('implementation')!r}; "
                         f"valid choices: {list(IMPLEMENTATIONS)}")
    if not isinstance(get("fused_topn"), bool):
        raise ValueError(f"config.attention.nsa.fused_topn = {get('fused_topn')!r}; valid choices: True, False")


def validate(config) -> None:
    """Check `config.attention.nsa` and its fit with `config.model`."""
    c = config.attention.nsa
    check_hyperparameters(c)
    for name in ("compress_hidden", "gate_hidden"):
        v = c[name]
        if not isinstance(v, int) or v < (1 if name == "compress_hidden" else 0):
            raise ValueError(f"config.attention.nsa.{name} = {v!r}: must be an int >= "
                             f"{1 if name == 'compress_hidden' else 0}")
    if c.gate_activation not in ACTIVATIONS:
        raise ValueError(f"config.attention.nsa.gate_activation = {c.gate_activation!r}; "
                         f"valid choices: {sorted(ACTIVATIONS)}")
    bias = tuple(c.gate_bias_init)
    if len(bias) != 3 or not all(isinstance(x, (int, float)) for x in bias):
        raise ValueError(f"config.attention.nsa.gate_bias_init = {bias!r}: must be three numbers (cmp, slc, win)")
    m = config.model
    if m.num_heads % m.num_kv_heads:
        raise ValueError(f"NSA needs num_heads = G * num_kv_heads; got num_heads={m.num_heads}, "
                         f"num_kv_heads={m.num_kv_heads}; valid num_kv_heads: "
                         f"{[x for x in range(1, m.num_heads + 1) if m.num_heads % x == 0]}")


# ------------------------------------------------------------------------------------------ branches
def window_attention(q, k, v, segment_ids, *, window: int, block: int, implementation=None, interpret=False):
    """Exact sliding-window attention, t − w < j ≤ t and equal segments (see the module docstring).

    q [B, T, H, D], k/v [B, T, K, D], segment_ids [B, T] -> out [B, T, H, D] in q's dtype.
    """
    t, kv_heads = q.shape[1], k.shape[2]
    layout = BlockLayout.sliding_window(t, t, window, block_q=block, block_k=block, num_head_units=kv_heads)
    return block_sparse_attention(q, k, v, layout, window=window, q_segment_ids=segment_ids,
                                  kv_segment_ids=segment_ids, implementation=implementation,
                                  interpret=interpret)[0]


def selected_attention(q, k, v, segment_ids, indices, counts, *, select_block: int, implementation=None,
                       interpret=False):
    """Attention over the selected blocks: per-token (block_q = 1), per-KV-group lists.

    q [B, T, H, D], k/v [B, T, K, D], indices [B, K, T, n], counts [B, K, T] -> out [B, T, H, D].
    """
    t = q.shape[1]
    layout = BlockLayout.from_indices(indices, counts, block_q=1, block_k=select_block,
                                      num_kv_blocks=-(-t // select_block))
    return block_sparse_attention(q, k, v, layout, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                  implementation=implementation, interpret=interpret)[0]


def nsa_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, compress_k: CompressionParams,
                  compress_v: CompressionParams, rope_positions, segment_ids, *, spec: NSASpec,
                  rope_theta: float):
    """The whole NSA attention for projected inputs.

    q [B, T, H, D] rotated; k_cmp, v_cmp [B, T, K, D] *not* rotated (compressed first, then the
    compressed keys are rotated at their block's last position); k_slc, k_win [B, T, K, D] rotated;
    v_slc, v_win [B, T, K, D]; gates [B, T, H, 3] in [0, 1] for (cmp, slc, win); rope_positions,
    segment_ids [B, T] int32.
    Returns out [B, T, H, D] in q's dtype and (indices [B, K, T, n], counts [B, K, T]) of the selection.
    """
    b, t, h, _ = q.shape
    kernel = dict(implementation=spec.kernel_implementation, interpret=spec.interpret)
    l, d = spec.compress_block, spec.compress_stride
    n = num_compressed(t, l, d)
    if n:
        kc = compress(k_cmp, compress_k, block=l, stride=d, activation=spec.compress_activation)
        vc = compress(v_cmp, compress_v, block=l, stride=d, activation=spec.compress_activation)
        kc = apply_rope(kc, rope_positions[:, compressed_positions(n, l, d)], rope_theta)
        o_cmp, lse_cmp = compressed_attention(q, kc, vc, segment_ids, block=l, stride=d,
                                              block_q=spec.compress_kernel_block_q,
                                              block_k=spec.compress_kernel_block_k, **kernel)
    else:
        kc, lse_cmp = jnp.zeros((b, 0) + k_cmp.shape[2:], q.dtype), None
        o_cmp = jnp.zeros(q.shape[:3] + v_cmp.shape[3:], q.dtype)
    indices, counts = select_blocks(q, kc, lse_cmp, segment_ids, block=l, stride=d, select_block=spec.select_block,
                                    num_selected=spec.num_selected, num_initial=spec.num_initial,
                                    num_local=spec.num_local, chunk_elements=spec.score_chunk_elements,
                                    implementation=importance_implementation(spec.kernel_implementation),
                                    interpret=spec.interpret, fused_topn=spec.fused_topn)
    # Under remat, a policy that saves this name spares the backward pass the importance pass.
    indices, counts = checkpoint_name((indices, counts), "nsa_selection")
    o_slc = selected_attention(q, k_slc, v_slc, segment_ids, indices, counts, select_block=spec.select_block,
                               **kernel)
    o_win = window_attention(q, k_win, v_win, segment_ids, window=spec.window, block=spec.window_block,
                             **kernel)
    g = gates.astype(jnp.float32)
    out = sum(g[..., c, None] * o.astype(jnp.float32) for c, o in enumerate((o_cmp, o_slc, o_win)))
    return out.astype(q.dtype), (indices, counts)


def attention_statistics(indices, counts, segment_ids, spec: NSASpec) -> dict[str, jax.Array]:
    """Mean over real tokens (segment > 0) of the keys each query attends to in each branch (a key
    seen by two branches counts twice) and of the selected blocks' density (selected / causal blocks
    of the document). indices [B, K, T, n], counts [B, K, T], segment_ids [B, T]."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    start = document_starts(segment_ids)
    l, d, ls = spec.compress_block, spec.compress_stride, spec.select_block
    n_cmp = jnp.maximum(jnp.floor_divide(idx - l + 1, d) - (start + d - 1) // d + 1, 0)     # [B, T]
    lo = jnp.maximum(indices * ls, start[:, None, :, None])
    hi = jnp.minimum(indices * ls + ls - 1, idx[None, None, :, None])
    used = jnp.arange(indices.shape[-1]) < counts[..., None]
    n_slc = jnp.where(used, jnp.maximum(hi - lo + 1, 0), 0).sum(-1).mean(1)                  # [B, T]
    n_win = jnp.minimum(spec.window, idx - start + 1)
    causal_blocks = idx // ls - start // ls + 1
    density = (counts / causal_blocks[:, None, :]).mean(1)
    real = (segment_ids > 0).astype(jnp.float32)
    mean = lambda x: (x * real).sum() / jnp.maximum(real.sum(), 1.0)
    keys = {"cmp": n_cmp, "slc": n_slc, "win": n_win}
    stats = {f"stats/nsa_keys_{name}": mean(v.astype(jnp.float32)) for name, v in keys.items()}
    stats["stats/nsa_keys_per_query"] = sum(stats[f"stats/nsa_keys_{name}"] for name in keys)
    stats["stats/nsa_selected_density"] = mean(density)
    return stats


# ------------------------------------------------------------------------------------------ module
class CompressionMLP(nnx.Module):
    """The parameters of one φ (see `compressed.py`): pe [l, D], w1 [l, D, F], b1 [F], w2 [F, D], b2 [D]."""

    def __init__(self, block: int, head_dim: int, hidden: int, *, param_dtype, rngs: nnx.Rngs):
        normal = lambda std: (lambda key, shape, dt: std * jax.random.normal(key, shape, dt))
        zeros = lambda key, shape, dt: jnp.zeros(shape, dt)
        self.pe = make_param(rngs, normal(0.02), (block, head_dim), (None, "head_dim"), param_dtype)
        self.w1 = make_param(rngs, normal((block * head_dim) ** -0.5), (block, head_dim, hidden),
                             (None, "head_dim", None), param_dtype)
        self.b1 = make_param(rngs, zeros, (hidden,), (None,), param_dtype)
        self.w2 = make_param(rngs, normal(hidden ** -0.5), (hidden, head_dim), (None, "head_dim"), param_dtype)
        self.b2 = make_param(rngs, zeros, (head_dim,), ("head_dim",), param_dtype)

    def params(self) -> CompressionParams:
        return CompressionParams(self.pe[...], self.w1[...], self.b1[...], self.w2[...], self.b2[...])


class Gate(nnx.Module):
    """g = sigmoid(MLP(x)): x [B, T, E] -> [B, T, H, 3] float32, one gate per head and branch."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        m, c = config.model, config.attention.nsa
        kw = dict(std=m.init_std, dtype=dtype_from_name(m.dtype), param_dtype=dtype_from_name(m.param_dtype),
                  rngs=rngs)
        self.activation = c.gate_activation
        self.hidden = Linear((m.d_model,), (c.gate_hidden,), names=("embed", None), **kw) if c.gate_hidden else None
        width = c.gate_hidden or m.d_model
        self.proj = Linear((width,), (m.num_heads, 3), names=(None if c.gate_hidden else "embed", "heads", None),
                           **kw)
        init = jnp.asarray(tuple(c.gate_bias_init), jnp.float32)
        self.bias = make_param(rngs, lambda key, shape, dt: jnp.broadcast_to(init, shape).astype(dt),
                               (m.num_heads, 3), ("heads", None), dtype_from_name(m.param_dtype))

    def __call__(self, x):
        if self.hidden is not None:
            x = ACTIVATIONS[self.activation](self.hidden(x))
        return jax.nn.sigmoid(self.proj(x).astype(jnp.float32) + self.bias[...].astype(jnp.float32))


@register_attention("nsa")
class NSAAttention(nnx.Module):
    """NSA attention layer: x [B, T, E], positions [B, T], segment_ids [B, T] -> ([B, T, E], aux).

    Parameters: the shared q projection and the selection branch's k/v (`QKVProjection`, so they load
    from a dense checkpoint), independent k/v for the compression and window branches, two
    compression MLPs (keys, values), the gate and the output projection.
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        validate(config)
        m, c = config.model, config.attention.nsa
        self.spec = NSASpec.from_config(c)
        self.rope_theta = m.rope_theta
        self.rules = tuple(rules_from_config(config).items())
        self.context = context.from_config(config)               # sequence parallelism (None: off)
        kw = dict(std=m.init_std, dtype=dtype_from_name(m.dtype), param_dtype=dtype_from_name(m.param_dtype),
                  rngs=rngs)
        self.qkv = QKVProjection(config, rngs=rngs)             # q and the selection branch's k, v
        names = ("embed", None, "kv_heads", "head_dim")
        self.kv_cmp = Linear((m.d_model,), (2, m.num_kv_heads, m.head_dim), names=names, **kw)
        self.kv_win = Linear((m.d_model,), (2, m.num_kv_heads, m.head_dim), names=names, **kw)
        pd = dtype_from_name(m.param_dtype)
        self.compress_k = CompressionMLP(c.compress_block, m.head_dim, c.compress_hidden, param_dtype=pd, rngs=rngs)
        self.compress_v = CompressionMLP(c.compress_block, m.head_dim, c.compress_hidden, param_dtype=pd, rngs=rngs)
        self.gate = Gate(config, rngs=rngs)
        self.out = OutputProjection(config, rngs=rngs)

    @staticmethod
    def document_alignment(config) -> int:
        """Where packed documents should start (`config.data.document_alignment` = 0 reads it): on the
        selection grid l' (the compression grid d divides it), so that a document's compression and
        selection blocks are the ones it would have alone (`compressed.py`, "Packed documents")."""
        return int(config.attention.nsa.select_block)

    @staticmethod
    def attention_flops(config, seq_len: int) -> float:
        """Forward FLOPs of one layer over one causal sequence of `seq_len` tokens (no packing), of
        everything NSA computes beyond the standard q/k/v/o projections (read by
        `sparsejax.training.metrics`): the window and compression K/V projections, the compression
        MLPs, the gate, the importance pass (q·k̃ᵀ again), and the three branches' attention (4·H·D per
        key: scores and values) over the keys each query sees — whole blocks for the selection."""
        m, c = config.model, config.attention.nsa
        e, h, k, d = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
        t = np.arange(seq_len)
        l, s, ls, f, gh = c.compress_block, c.compress_stride, c.select_block, c.compress_hidden, c.gate_hidden
        n_cmp = np.maximum((t - l + 1) // s + 1, 0).sum()
        n_slc = (np.minimum(c.num_selected, t // ls + 1) * ls).sum()
        n_win = np.minimum(c.window, t + 1).sum()
        projections = seq_len * 2 * e * 4 * k * d
        mlps = 2 * num_compressed(seq_len, l, s) * 2 * (l * d * f + f * d)
        gate = seq_len * 2 * (e * gh + gh * 3 * h if gh else e * 3 * h)
        attention = 4 * h * d * (n_cmp + n_slc + n_win) + 2 * h * d * n_cmp
        return float(projections + mlps + gate + attention)

    def __call__(self, x, positions, segment_ids):
        q, k_slc, v_slc = self.qkv(x, positions)
        kv_cmp, kv_win = self.kv_cmp(x), self.kv_win(x)
        k_win = apply_rope(kv_win[:, :, 0], positions, self.rope_theta)
        sharded = self.context is not None and self.context.active()   # sequence parallel: keep the shards
        full = lambda a, h: a if sharded else constrain(a, ("batch", None, h, "head_dim"), self.rules)
        q = full(q, "heads")
        k_cmp, v_cmp, k_slc, v_slc, k_win, v_win = (full(a, "kv_heads") for a in (
            kv_cmp[:, :, 0], kv_cmp[:, :, 1], k_slc, v_slc, k_win, kv_win[:, :, 1]))
        gates = self.gate(x)
        args = (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, self.compress_k.params(), self.compress_v.params(),
                positions, segment_ids)
        if sharded:                                                # balance-permuted rows
            o, (indices, counts) = nsa_context.nsa_attention(*args, spec=self.spec, rope_theta=self.rope_theta,
                                                             cp=self.context)
            indices, counts, seg = nsa_context.original_order(indices, counts, segment_ids, cp=self.context)
            aux = attention_statistics(indices, counts, seg, self.spec)
        else:
            o, (indices, counts) = nsa_attention(*args, spec=self.spec, rope_theta=self.rope_theta)
            aux = attention_statistics(indices, counts, segment_ids, self.spec)
        real = (segment_ids > 0).astype(jnp.float32)                # [B, T]: not padding or filler
        for i, name in enumerate(BRANCHES):
            per_token = gates[..., i].astype(jnp.float32).mean(-1)    # [B, T], mean over heads
            aux[f"stats/nsa_gate_{name}"] = (per_token * real).sum() / jnp.maximum(real.sum(), 1.0)
        return self.out(o), aux
