"""Context (sequence) parallelism: the `config.parallel` section, scheme selection, and the one
function attention variants call when the mesh shards the sequence.

    cp = context.from_config(config)          # None when the mesh has sequence = 1 (single-device path)
    out, lse = cp(q, k, v, positions, segment_ids)                  # dense causal
    out, lse = cp(q, k, v, positions, segment_ids, kv_blocks=...)  # block-sparse (global block lists)

`config.parallel`:
- `context_scheme`: "ring" (K/V rotate, `ring.py`), "allgather" (K/V gathered, `allgather.py`) or
  "hierarchical_ring" (inner rings of `inner_ring_size` consecutive sequence shards, one host, joined
  by an outer ring across hosts).
- `balance`: "zigzag", "striped" or "none" (`balance.py`): the token permutation applied once at the
  data boundary (`permute_batch`); `stripe_size` tokens per stripe for "striped".
- `inner_ring_size`: shards per inner ring for "hierarchical_ring"; 0 = the devices of one process
  (`jax.local_device_count()`, capped to divide the sequence shards).
- `block_q`, `block_k`: kernel block sizes of the dense layout under sequence parallelism; the
  balance units (zigzag chunks, stripes) and the shards must be whole blocks.
- `implementation`: "auto" (the backend's default kernel) or a `block_sparse_attention` implementation.

The call runs `jax.shard_map` over the mesh set with `jax.set_mesh` (all axes manual): batch over the
mesh axes of the `batch` sharding rule, heads over those of `heads`, sequence over `sequence`. Masks
compare the explicit positions (contracts §3: restarting at 0 per document) together with segment
ids, which equals causal order inside a document, so the permuted shards need no extra bookkeeping.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels import block_sparse_attention
from sparsejax.parallel import balance as balance_lib
from sparsejax.parallel import mesh as mesh_lib
from sparsejax.parallel.allgather import allgather_attention
from sparsejax.parallel.ring import (block_ranges, make_spec, ring_attention, ring_block_counts, step_block_count,
                                    step_layout)

SCHEMES = ("ring", "allgather", "hierarchical_ring")
IMPLEMENTATIONS = ("auto", "xla", "pallas_gpu", "pallas_tpu", "reference")
SUPPORTED_KINDS = ("dense", "nsa")      # attention variants that route their attention through here


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "context_scheme": "ring",
        "balance": "zigzag",
        "stripe_size": 128,
        "inner_ring_size": 0,
        "block_q": 128,
        "block_k": 128,
        "implementation": "auto",
    })


def sequence_shards(config, num_devices: int | None = None) -> int:
    """Size of the `sequence` mesh axis of `config.mesh` (resolving -1 against the devices)."""
    if config.mesh.sequence != -1:
        return config.mesh.sequence
    return mesh_lib.mesh_shape(config.mesh, num_devices or jax.device_count())["sequence"]


def resolve_inner(requested: int, num_shards: int) -> int:
    """Shards per inner ring: `requested`, or for 0 the largest divisor of num_shards <= local devices."""
    if requested:
        if num_shards % requested:
            raise ValueError(f"config.parallel.inner_ring_size = {requested} must divide the {num_shards} sequence "
                             f"shards; valid: {[d for d in range(1, num_shards + 1) if num_shards % d == 0]}")
        return requested
    return math.gcd(num_shards, jax.local_device_count())


def alignment(config) -> int:
    """Tokens that every balance unit and shard must hold a whole number of: lcm of the block sizes."""
    p = config.parallel
    blocks = [p.block_q, p.block_k]
    if config.attention.kind == "nsa":       # the units NSA's branches cut the row into (nsa_context.py)
        c = config.attention.nsa
        blocks += [c.compress_stride, c.select_block, c.window_block, c.compress_kernel_block_q]
    return math.lcm(*blocks)


def sequence_multiple(config, num_devices: int | None = None) -> int:
    """Tokens that every sequence fed to the model under this config's mesh must hold a multiple of
    (the balance scheme's granule over the sequence shards); 1 when the sequence is not sharded."""
    n = sequence_shards(config, num_devices)
    if n == 1:
        return 1
    return balance_lib.granule(n, config.parallel.balance, stripe=config.parallel.stripe_size,
                               block=alignment(config))


def validate(config, num_devices: int | None = None) -> None:
    """Check `config.parallel` and its fit with the mesh, data and variant; raises ValueError."""
    p = config.parallel
    if p.context_scheme not in SCHEMES:
        raise ValueError(f"config.parallel.context_scheme = {p.context_scheme!r}; valid choices: {list(SCHEMES)}")
    if p.balance not in balance_lib.SCHEMES:
        raise ValueError(f"config.parallel.balance = {p.balance!r}; valid choices: {list(balance_lib.SCHEMES)}")
    if p.implementation not in IMPLEMENTATIONS:
        raise ValueError(f"config.parallel.implementation = {p.implementation!r}; valid choices: {list(IMPLEMENTATIONS)}")
    for key in ("stripe_size", "block_q", "block_k"):
        if not isinstance(p[key], int) or p[key] < 1:
            raise ValueError(f"config.parallel.{key} = {p[key]!r} must be a positive int")
    if not isinstance(p.inner_ring_size, int) or p.inner_ring_size < 0:
        raise ValueError(f"config.parallel.inner_ring_size = {p.inner_ring_size!r} must be an int >= 0 (0 = per host)")
    n = sequence_shards(config, num_devices)
    if n == 1:
        return
    if p.context_scheme != "allgather" and p.implementation == "reference":
        raise ValueError(f"config.parallel.implementation = 'reference' cannot serve context_scheme = "
                         f"{p.context_scheme!r} (the ring needs a flash-style backward); use 'auto', 'xla', "
                         f"'pallas_gpu' or 'pallas_tpu', or context_scheme = 'allgather'")
    if config.attention.kind not in SUPPORTED_KINDS:
        raise ValueError(f"config.attention.kind = {config.attention.kind!r} cannot run with config.mesh.sequence = "
                         f"{n} > 1; sequence parallelism serves {list(SUPPORTED_KINDS)}")
    if p.context_scheme == "hierarchical_ring":
        resolve_inner(p.inner_ring_size, n)
    unit = alignment(config)
    try:
        balance_lib.check(config.data.seq_len, n, p.balance, stripe=p.stripe_size, block=unit)
    except ValueError as e:
        raise ValueError(f"config.data.seq_len = {config.data.seq_len} with config.mesh.sequence = {n} and "
                         f"config.parallel.balance = {p.balance!r}: {e}") from None
    if config.attention.kind == "nsa":
        c = config.attention.nsa
        unit = balance_lib.unit_size(config.data.seq_len, n, p.balance, stripe=p.stripe_size)
        if unit < c.compress_block - c.compress_stride:
            raise ValueError(f"config.parallel.balance = {p.balance!r} cuts the sequence into runs of {unit} tokens, "
                             f"fewer than NSA's compress_block - compress_stride = "
                             f"{c.compress_block - c.compress_stride} (the compression halo)")
    rules = mesh_lib.rules_from_config(config)
    if "sequence" in rules["heads"] or "sequence" in rules["batch"]:
        raise ValueError("sharding_rules: the 'sequence' mesh axis must shard only the sequence under "
                         f"context parallelism, got batch={rules['batch']} heads={rules['heads']}")
    if tuple(rules["heads"]) != tuple(rules["kv_heads"]):
        raise ValueError(f"sharding_rules: context parallelism needs heads and kv_heads on the same mesh axes, got "
                         f"heads={rules['heads']} kv_heads={rules['kv_heads']}")
    if tuple(rules["sequence"]) != ("sequence",):
        raise ValueError(f"sharding_rules.sequence = {tuple(rules['sequence'])} with config.mesh.sequence = {n}: "
                         "context parallelism needs the sequence rule on the 'sequence' mesh axis, ('sequence',); "
                         "otherwise activations are not sharded over the sequence")


# ------------------------------------------------------------------------------------------ the call
@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """Sequence-parallel attention for one config (hashable: variants keep it as static module data)."""
    scheme: str
    balance: str
    stripe_size: int
    num_shards: int
    inner: int
    block_q: int
    block_k: int
    implementation: str | None
    batch_axes: tuple[str, ...]
    head_axes: tuple[str, ...]
    interpret: bool = False

    def active(self) -> bool:
        """True under a mesh (`jax.set_mesh`) whose sequence axis is this config's; variants called
        without one (e.g. evaluation on one device) take the single-device path."""
        mesh = jax.sharding.get_abstract_mesh()
        return not mesh.empty and mesh.shape.get("sequence", 1) == self.num_shards

    def permutation(self, seq_len: int) -> np.ndarray:
        """`perm [T]`: original index of each token of the permuted (sharded) sequence."""
        return balance_lib.permutation(seq_len, self.num_shards, self.balance, stripe=self.stripe_size)

    def permute_batch(self, batch):
        """The data boundary: permute a batch's `[B, T]` arrays (contracts §3), numpy or jax (inside
        `jit` the results keep the batch sharding: batch axes x `sequence`)."""
        out = balance_lib.permute_batch(batch, self.permutation(batch["inputs"].shape[1]))
        if isinstance(batch["inputs"], np.ndarray):
            return out
        if not self.active():   # the model would take its single-device path on permuted tokens
            raise ValueError(
                f"this config shards the sequence over mesh.sequence={self.num_shards} devices, but no mesh "
                f"with that sequence axis is set; call the train/eval step inside `with jax.set_mesh(mesh):` "
                f"(train.py and eval.py do), current mesh: {dict(jax.sharding.get_abstract_mesh().shape)}")
        spec = P(self.batch_axes or None, "sequence")
        return {k: jax.lax.with_sharding_constraint(v, spec) if k in balance_lib.BATCH_SEQUENCE_KEYS else v
                for k, v in out.items()}

    def block_order(self, seq_len: int, block: int) -> np.ndarray:
        """`sharded_block [T/block]`: the sharded (permuted) block index of each original block;
        maps layouts written in original block coordinates to the `kv_blocks` coordinates."""
        return balance_lib.inverse(balance_lib.block_permutation(self.permutation(seq_len), block))

    def _spec(self, head_dim, *, block_q, block_k, sm_scale, causal, window=None):
        return make_spec(axis="sequence", num_shards=self.num_shards,
                         inner=self.inner if self.scheme == "hierarchical_ring" else None,
                         block_q=block_q or self.block_q, block_k=block_k or self.block_k, head_dim=head_dim,
                         sm_scale=sm_scale, causal=causal, implementation=self.implementation,
                         interpret=self.interpret, for_ring=self.scheme != "allgather", window=window)

    def mesh(self):
        """The mesh set with `jax.set_mesh`, checked against this config."""
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or "sequence" not in mesh.axis_names:
            raise ValueError("sequence-parallel attention needs the mesh: call it under jax.set_mesh(make_mesh(config))")
        if mesh.shape["sequence"] != self.num_shards:
            raise ValueError(f"the mesh has sequence = {mesh.shape['sequence']}, the config {self.num_shards}")
        covered = set(self.batch_axes) | set(self.head_axes) | {"sequence"}
        idle = [a for a in mesh.axis_names if a not in covered and mesh.shape[a] > 1]
        if idle:
            raise ValueError(f"mesh axes {idle} shard neither the batch {self.batch_axes}, the heads {self.head_axes} "
                             f"nor the sequence; sequence-parallel attention needs every mesh axis of size > 1 used")
        return mesh

    def specs(self, kv_blocks=None):
        """PartitionSpecs (tokens [B, T, H, D], sequence [B, T], kv_blocks or None) inside `shard_map`."""
        b, h = self.batch_axes or None, self.head_axes or None
        tokens = P(b, "sequence", h, None)
        seq = P(b, "sequence")
        blocks = None
        if kv_blocks is not None:
            lb = b if kv_blocks[0].shape[0] != 1 else None
            blocks = (P(lb, h, "sequence", None), P(lb, h, "sequence"))
        return tokens, seq, blocks

    def __call__(self, q, k, v, positions, segment_ids, kv_blocks=None, *, kv_positions=None, causal=True,
                 window=None, sm_scale=None, block_q=None, block_k=None):
        """Attention of the sequence-sharded q over the whole sequence's k/v.

        q [B, T, Hq, Dqk], k [B, T, Hkv, Dqk], v [B, T, Hkv, Dv] (T in permuted order), positions and
        segment_ids [B, T] int32 (kv_positions [B, T]: the keys' positions when they differ from the
        queries'; the causal rule is kv_pos <= q_pos; `window` (static int) adds kv_pos > q_pos - window, the
        kernel's sliding window). kv_blocks: None (dense: every visible block) or
        (kv_indices [B or 1, Hl, T/block_q, K], kv_counts [B or 1, Hl, T/block_q]) in sharded block
        coordinates (`block_order`). Returns out [B, T, Hq, Dv] and lse [B, Hq, T] float32.
        """
        spec = self._spec(q.shape[-1], block_q=block_q, block_k=block_k, sm_scale=sm_scale, causal=causal,
                          window=window)
        fn = allgather_attention if self.scheme == "allgather" else ring_attention
        tokens, seq, blocks = self.specs(kv_blocks)
        b, h = self.batch_axes or None, self.head_axes or None

        def local(q, k, v, pos, kv_pos, seg, kv_blocks):
            return fn(q, k, v, pos, kv_pos, seg, seg, kv_blocks, spec=spec)

        kv_positions = positions if kv_positions is None else kv_positions
        return jax.shard_map(local, mesh=self.mesh(), in_specs=(tokens, tokens, tokens, seq, seq, seq, blocks),
                             out_specs=(tokens, P(b, h, "sequence")), check_vma=False)(
            q, k, v, positions, kv_positions, segment_ids, kv_blocks)

    def attend_gathered(self, q, k, v, positions, segment_ids, kv_positions, kv_segment_ids, *, block_q: int,
                        block_k: int, causal=True, sm_scale=None):
        """Attention of the sequence-sharded q over small K/V that every device holds whole (NSA's
        compressed tokens): no ring, one kernel call per device, dense layout from positions/segments.

        q [B, T, Hq, D], positions / segment_ids [B, T]; k, v [B, N, Hkv, D], kv_positions /
        kv_segment_ids [B, N] (any N; padded here to whole blocks with keys nobody sees).
        Returns out [B, T, Hq, Dv] and lse [B, Hq, T] float32.
        """
        spec = self._spec(q.shape[-1], block_q=block_q, block_k=block_k, sm_scale=sm_scale, causal=causal)
        pad = -k.shape[1] % block_k
        if pad:
            grow = lambda x, value: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
            k, v = grow(k, 0), grow(v, 0)
            kv_positions = grow(kv_positions, jnp.iinfo(jnp.int32).max)
            kv_segment_ids = grow(kv_segment_ids, -2)          # matches no query (documents >= 1, padding 0)
        tokens, seq, _ = self.specs()
        b, h = self.batch_axes or None, self.head_axes or None
        whole, whole_seq = P(b, None, h, None), P(b, None)

        def local(q, k, v, pos, seg, kv_pos, kv_seg):
            layout = step_layout(block_ranges(pos, seg, spec.block_q), kv_pos, kv_seg, None, 0, spec=spec,
                                 num_kv_heads=k.shape[2])
            return block_sparse_attention(q, k, v, layout, sm_scale=spec.sm_scale, causal=spec.causal,
                                          q_positions=pos, kv_positions=kv_pos, q_segment_ids=seg,
                                          kv_segment_ids=kv_seg, implementation=spec.implementation,
                                          interpret=spec.interpret)

        return jax.shard_map(local, mesh=self.mesh(), in_specs=(tokens, whole, whole, seq, seq, whole_seq, whole_seq),
                             out_specs=(tokens, P(b, h, "sequence")), check_vma=False)(
            q, k, v, positions, segment_ids, kv_positions, kv_segment_ids)

    def block_counts(self, positions, segment_ids, num_kv_heads: int, kv_blocks=None, *, causal=True,
                     block_q=None, block_k=None):
        """The balance report: int32 [sequence shards, ring steps], blocks (query unit × head unit × KV
        block) each device computes at each step, summed over the batch and the batch/head mesh axes.
        For "allgather" there is one step (the whole gathered sequence)."""
        spec = self._spec(1, block_q=block_q, block_k=block_k, sm_scale=1.0, causal=causal)
        if self.scheme == "allgather":
            spec = spec._replace(inner=1)
        _, seq, blocks = self.specs(kv_blocks)
        axes = tuple(a for a in self.batch_axes + self.head_axes)
        mesh = self.mesh()
        num_kv_heads //= math.prod(mesh.shape[a] for a in self.head_axes)

        def local(pos, seg, kv_blocks):
            if self.scheme == "allgather":
                gathered = [jax.lax.all_gather(x, "sequence", axis=1, tiled=True) for x in (pos, seg)]
                counts = step_block_count(block_ranges(pos, seg, spec.block_q), gathered[0], gathered[1],
                                          kv_blocks, 0, spec=spec, num_kv_heads=num_kv_heads)[None, None]
            else:
                counts = ring_block_counts(pos, pos, seg, seg, kv_blocks, spec=spec, num_kv_heads=num_kv_heads)
            return jax.lax.psum(counts, axes) if axes else counts

        return jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, blocks), out_specs=P("sequence"),
                             check_vma=False)(positions, segment_ids, kv_blocks)


def from_config(config, *, num_devices: int | None = None, interpret: bool = False) -> ContextParallel | None:
    """The `ContextParallel` of a validated config, or None when the mesh has sequence = 1 (or the
    config has no mesh section: a single-device model)."""
    if "mesh" not in config:
        return None
    n = sequence_shards(config, num_devices)
    if n == 1:
        return None
    p = config.parallel if "parallel" in config else default_config()
    rules = mesh_lib.rules_from_config(config)
    return ContextParallel(
        scheme=p.context_scheme, balance=p.balance, stripe_size=p.stripe_size, num_shards=n,
        inner=resolve_inner(p.inner_ring_size, n) if p.context_scheme == "hierarchical_ring" else n,
        block_q=p.block_q, block_k=p.block_k,
        implementation=None if p.implementation == "auto" else p.implementation,
        batch_axes=tuple(rules["batch"]), head_axes=tuple(rules["heads"]), interpret=interpret)


def data_boundary(config):
    """`batch -> batch`: the permutation that the train and eval steps apply to every batch when the
    mesh shards the sequence with a balance scheme (identity otherwise). Model calls under a mesh with
    sequence > 1 must see batches in this order (NSA reads row indices from it)."""
    cp = from_config(config)
    if cp is None or cp.balance == "none":
        return lambda batch: batch
    return cp.permute_batch

