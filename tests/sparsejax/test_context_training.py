"""Context parallelism end to end on 8 fake CPU devices: NSA's attention under a sequence-sharded,
permuted sequence equals the single-device `nsa_attention` (outputs, selections and the gradients of
every input and compression parameter)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sparsejax.attention import nsa
from sparsejax.attention.compressed import CompressionParams
from sparsejax.parallel import balance, context, nsa_context
from sparsejax.parallel import mesh as mesh_lib

SPEC = nsa.NSASpec(compress_block=16, compress_stride=8, select_block=32, num_selected=4, num_initial=1, num_local=2,
                   window=64, window_block=32, compress_kernel_block_q=32, compress_kernel_block_k=32,
                   implementation="xla")


def packed(b, t):
    seg = np.ones((b, t), np.int32)
    seg[1, 200:] = 2
    seg[1, 333:] = 3
    pos = np.zeros((b, t), np.int32)
    for row in range(b):
        for s in np.unique(seg[row]):
            where = np.flatnonzero(seg[row] == s)
            pos[row, where] = np.arange(len(where))
    return jnp.asarray(pos), jnp.asarray(seg)


def test_nsa_ring_zigzag_matches_single_device():
    b, t, h, kvh, d, f = 2, 512, 4, 2, 16, 32
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    q = normal(b, t, h, d)
    kvs = tuple(normal(b, t, kvh, d) for _ in range(6))
    gates = jax.nn.sigmoid(normal(b, t, h, 3))
    params = tuple(CompressionParams(0.1 * normal(16, d), 0.1 * normal(16, d, f), 0.1 * normal(f), 0.1 * normal(f, d),
                                     0.1 * normal(d)) for _ in range(2))
    pos, seg = packed(b, t)
    config = ml_collections.ConfigDict(dict(
        mesh=dict(data=2, fsdp=1, sequence=4, tensor=1), parallel=context.default_config(), data=dict(seq_len=t),
        attention=dict(kind="dense")))
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
