"""Sequence-parallel attention on 8 fake CPU devices: every context scheme (ring, all-gather,
hierarchical ring) with every balance equals the single-device float32 reference
(`block_sparse_attention(implementation="reference")` on the unpermuted sequence) in outputs, lse and
gradients, for dense and block-sparse layouts, with and without GQA, with packed documents; and NSA's
attention under a sharded, permuted sequence equals the single-device `nsa_attention` (outputs,
selections, gradients of every input and compression parameter)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pallas_kernels import BlockLayout, block_sparse_attention
from sparsejax.attention import nsa
from sparsejax.attention.compressed import CompressionParams
from sparsejax.parallel import balance, context, nsa_context
from sparsejax.parallel import mesh as mesh_lib
from sparsejax.parallel.ring import make_spec

T, D, BLOCK = 256, 16, 16


def make_config(scheme, bal, *, sequence=4, data=2, tensor=1, inner=0):
    return ml_collections.ConfigDict(dict(
        mesh=dict(data=data, fsdp=1, sequence=sequence, tensor=tensor),
        parallel=dict(context_scheme=scheme, balance=bal, stripe_size=BLOCK, inner_ring_size=inner,
                      block_q=BLOCK, block_k=BLOCK, implementation="auto"),
        data=dict(seq_len=T), attention=dict(kind="dense")))


def packed(rng, b, t, packed_docs):
    """positions (restarting per document) and segment ids [B, T]; with packed_docs, rows hold 1-4 documents."""
    seg = np.ones((b, t), np.int32)
    if packed_docs:
        for row in range(b):
            cuts = np.sort(rng.choice(np.arange(1, t), size=row % 4, replace=False))
            for c in cuts:
                seg[row, c:] += 1
    pos = np.zeros((b, t), np.int32)
    for row in range(b):
        for s in np.unique(seg[row]):
            where = np.flatnonzero(seg[row] == s)
            pos[row, where] = np.arange(len(where))
    return pos, seg


def random_blocks(rng, b, hl, nq, nk, cap):
    """Random causal block lists (original coordinates): [B, Hl, nq, cap], counts [B, Hl, nq]."""
    idx = np.zeros((b, hl, nq, cap), np.int32)
    cnt = np.zeros((b, hl, nq), np.int32)
    for i in np.ndindex(b, hl, nq):
        choice = np.sort(rng.choice(i[2] + 1, size=min(cap, rng.integers(0, i[2] + 2)), replace=False))
        cnt[i] = len(choice)
        idx[i][:len(choice)] = choice
    return idx, cnt


def run_case(config, *, hq, hkv, packed_docs, sparse, seed=0):
    rng = np.random.default_rng(seed)
    b = 2
    q, k, v = (jnp.asarray(rng.normal(size=(b, T, h, D)), jnp.float32) for h in (hq, hkv, hkv))
    pos, seg = packed(rng, b, T, packed_docs)
    w_out = jnp.asarray(rng.normal(size=(b, T, hq, D)), jnp.float32)
    w_lse = jnp.asarray(rng.normal(size=(b, hq, T)), jnp.float32)
    nb = T // BLOCK
    if sparse:
        idx, cnt = random_blocks(rng, b, hkv, nb, nb, 5)
        layout = BlockLayout.from_indices(idx, cnt, block_q=BLOCK, block_k=BLOCK, num_kv_blocks=nb)
    else:
        layout = BlockLayout.causal(T, T, block_q=BLOCK, block_k=BLOCK, num_head_units=hkv)

    def loss(out, lse):
        return (out * w_out).sum() + jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0).sum()

    def single(q, k, v):
        out, lse = block_sparse_attention(q, k, v, layout, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                                          kv_segment_ids=seg, implementation="reference")
        return loss(out, lse), (out, lse)

    context.validate(config)
    cp = context.from_config(config)
    perm = cp.permutation(T)
    bperm = balance.block_permutation(perm, BLOCK)
    kv_blocks = None
    if sparse:       # query units follow the permutation; KV block ids go to sharded coordinates
        order = cp.block_order(T, BLOCK)
        kv_blocks = (jnp.asarray(order[idx[:, :, bperm]]), jnp.asarray(cnt[:, :, bperm]))

    def sharded(q, k, v):
        args = [balance.permute(x, perm) for x in (q, k, v, jnp.asarray(pos), jnp.asarray(seg))]
        out, lse = cp(*args, kv_blocks=kv_blocks)
        out, lse = balance.unpermute(out, perm), balance.unpermute(lse, perm, axis=2)
        return loss(out, lse), (out, lse)

    (l0, (o0, s0)), g0 = jax.value_and_grad(single, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    with jax.set_mesh(mesh_lib.make_mesh(config)):
        (l1, (o1, s1)), g1 = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(o1, o0, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.isneginf(s1), np.isneginf(s0))
    np.testing.assert_allclose(np.where(np.isfinite(s0), s1, 0), np.where(np.isfinite(s0), s0, 0), atol=2e-5)
    for a, r in zip(g1, g0):
        np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme,bal,hq,hkv,packed_docs,sparse", [
    ("ring", "zigzag", 4, 2, True, False),
    ("ring", "striped", 2, 2, False, True),
    ("ring", "none", 4, 1, True, True),
    ("allgather", "zigzag", 4, 2, True, True),
    ("allgather", "striped", 2, 2, False, False),
])
def test_scheme_matches_single_device(scheme, bal, hq, hkv, packed_docs, sparse):
    run_case(make_config(scheme, bal), hq=hq, hkv=hkv, packed_docs=packed_docs, sparse=sparse)


@pytest.mark.parametrize("sparse", [False, True])
def test_hierarchical_ring_2x4(sparse):
    """sequence = 8 shards as 2 outer groups (hosts) x 4 inner shards."""
    config = make_config("hierarchical_ring", "zigzag" if sparse else "striped", sequence=8, data=1, inner=4)
    run_case(config, hq=4, hkv=2, packed_docs=True, sparse=sparse)


def test_heads_over_tensor_axis():
    run_case(make_config("ring", "zigzag", sequence=4, data=1, tensor=2), hq=4, hkv=2, packed_docs=True, sparse=False)


def test_sequence_one_is_single_device_path():
    for scheme in context.SCHEMES:
        config = make_config(scheme, "zigzag", sequence=1, data=8)
        context.validate(config)
        assert context.from_config(config) is None


def test_validation_errors():
    with pytest.raises(ValueError, match=r"context_scheme = 'ulysses'; valid choices: \['ring', 'allgather', 'hierarchical_ring'\]"):
        context.validate(make_config("ulysses", "zigzag"))
    with pytest.raises(ValueError, match=r"balance = 'random'; valid choices"):
        context.validate(make_config("ring", "random"))
    bad = make_config("ring", "zigzag")
    bad.data.seq_len = 3 * 64
    with pytest.raises(ValueError, match=r"seq_len = 192 .* divisible by 2 \* sequence shards \* block = 2\*4\*16 = 128"):
        context.validate(bad)
    bad = make_config("ring", "striped")
    bad.parallel.stripe_size = 24
    with pytest.raises(ValueError, match=r"stripe a positive multiple of the block size 16; got stripe=24"):
        context.validate(bad)
    with pytest.raises(ValueError, match=r"inner_ring_size = 3 must divide the 4 sequence shards; valid: \[1, 2, 4\]"):
        context.validate(make_config("hierarchical_ring", "zigzag", inner=3))
    bad = make_config("ring", "zigzag")
    bad.attention.kind = "seer"
    with pytest.raises(ValueError, match=r"kind = 'seer' cannot run with config.mesh.sequence = 4"):
        context.validate(bad)
    bad = make_config("ring", "zigzag")
    bad.parallel.implementation = "reference"
    with pytest.raises(ValueError, match=r"'reference' cannot serve context_scheme = 'ring'"):
        context.validate(bad)
    with pytest.raises(ValueError, match=r"implementation 'reference' is not one of"):
        make_spec(axis="sequence", num_shards=4, inner=None, block_q=16, block_k=16, head_dim=16,
                  implementation="reference")


def test_ring_without_step_skipping_matches():
    """The GPU path (no lax.cond: empty steps run the kernel with all counts 0) on contiguous shards,
    where most steps are empty under the causal mask."""
    from jax.sharding import PartitionSpec as P
    from sparsejax.parallel.ring import ring_attention

    rng = np.random.default_rng(3)
    b, hq, hkv = 1, 4, 2
    q, k, v = (jnp.asarray(rng.normal(size=(b, T, h, D)), jnp.float32) for h in (hq, hkv, hkv))
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T))
    layout = BlockLayout.causal(T, T, block_q=BLOCK, block_k=BLOCK, num_head_units=hkv)
    spec = make_spec(axis="sequence", num_shards=4, inner=None, block_q=BLOCK, block_k=BLOCK, head_dim=D,
                     skip_empty_steps=False)
    mesh = jax.make_mesh((4,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    ring = jax.shard_map(lambda q, k, v, p: ring_attention(q, k, v, p, p, spec=spec), mesh=mesh,
                         in_specs=(P(None, "sequence"),) * 4, out_specs=(P(None, "sequence"), P(None, None, "sequence")),
                         check_vma=False)
    loss = lambda fn: (lambda q, k, v: (fn(q, k, v)[0] ** 2).sum())
    single = lambda q, k, v: block_sparse_attention(q, k, v, layout, implementation="reference")
    g0 = jax.grad(loss(single), argnums=(0, 1, 2))(q, k, v)
    g1 = jax.jit(jax.grad(loss(lambda q, k, v: ring(q, k, v, pos)), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(jax.jit(ring)(q, k, v, pos)[0], single(q, k, v)[0], atol=2e-5)
    for a, r in zip(g1, g0):
        np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ NSA
SPEC = nsa.NSASpec(compress_block=16, compress_stride=8, select_block=32, num_selected=4, num_initial=1, num_local=2,
                   window=64, window_block=32, compress_kernel_block_q=32, compress_kernel_block_k=32,
                   implementation="xla")


def packed_rows(b, t):
    seg = np.ones((b, t), np.int32)
    seg[1, 200:] = 2
    seg[1, 333:] = 3
    pos = np.zeros((b, t), np.int32)
    for row in range(b):
        for s in np.unique(seg[row]):
            where = np.flatnonzero(seg[row] == s)
            pos[row, where] = np.arange(len(where))
    return jnp.asarray(pos), jnp.asarray(seg)


@pytest.mark.parametrize("data, tensor", [(2, 1), (1, 2)])   # (1, 2): KV heads split over tensor
def test_nsa_ring_zigzag_matches_single_device(data, tensor):
    b, t, h, kvh, d, f = 2, 512, 4, 2, 16, 32
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    q = normal(b, t, h, d)
    kvs = tuple(normal(b, t, kvh, d) for _ in range(6))
    gates = jax.nn.sigmoid(normal(b, t, h, 3))
    params = tuple(CompressionParams(0.1 * normal(16, d), 0.1 * normal(16, d, f), 0.1 * normal(f), 0.1 * normal(f, d),
                                     0.1 * normal(d)) for _ in range(2))
    pos, seg = packed_rows(b, t)
    config = ml_collections.ConfigDict(dict(
        mesh=dict(data=data, fsdp=1, sequence=4, tensor=tensor), parallel=context.default_config(),
        data=dict(seq_len=t), attention=dict(kind="dense")))
    config.parallel.update(block_q=32, block_k=32)
    context.validate(config)
    cp = context.from_config(config)
    perm = cp.permutation(t)

    def single(q, kvs, gates, params):
        return nsa.nsa_attention(q, *kvs, gates, *params, pos, seg, spec=SPEC, rope_theta=1e4)

    def sharded(q, kvs, gates, params):
        p = lambda x: balance.permute(x, perm)
        out, (idx, cnt) = nsa_context.nsa_attention(p(q), *map(p, kvs), p(gates), *params, p(pos), p(seg), spec=SPEC,
                                                    rope_theta=1e4, cp=cp)
        return balance.unpermute(out, perm), (balance.unpermute(idx, perm, axis=2), balance.unpermute(cnt, perm, axis=2))

    weight = normal(b, t, h, d)
    loss = lambda fn: (lambda *a: ((fn(*a)[0] * weight).sum(), fn(*a)[1]))
    (l0, (i0, c0)), g0 = jax.value_and_grad(loss(single), argnums=(0, 1, 2, 3), has_aux=True)(q, kvs, gates, params)
    with jax.set_mesh(mesh_lib.make_mesh(config)):
        (l1, (i1, c1)), g1 = jax.jit(jax.value_and_grad(loss(sharded), argnums=(0, 1, 2, 3), has_aux=True))(
            q, kvs, gates, params)
    np.testing.assert_array_equal(c1, c0)
    used = np.arange(i0.shape[-1]) < np.asarray(c0)[..., None]
    np.testing.assert_array_equal(np.where(used, i1, 0), np.where(used, i0, 0))
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, r in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, r, atol=2e-5, rtol=1e-4)
