"""block_sparse_attention: validation errors, dispatch, defaults and the generic custom_vjp."""
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import random_case
from pallas_kernels import BlockLayout, block_sparse_attention
from pallas_kernels.block_sparse import api, reference


def inputs(b=1, tq=12, tk=16, hq=4, hkv=2, dqk=8, dv=8, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(keys[0], (b, tq, hq, dqk), dtype), jax.random.normal(keys[1], (b, tk, hkv, dqk), dtype),
            jax.random.normal(keys[2], (b, tk, hkv, dv), dtype))


def causal_layout(tq=12, tk=16, units=4, bq=4, bk=4):
    return BlockLayout.causal(tq, tk, block_q=bq, block_k=bk, num_head_units=units)


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v, lay: (q[0], k, v, lay), r"q must be 4-d \[B, T, H, D\], got shape \(12, 4, 8\)"),
    (lambda q, k, v, lay: (q.astype(jnp.int32), k, v, lay), "q has unsupported dtype int32; valid: bfloat16"),
    (lambda q, k, v, lay: (q, k.astype(jnp.bfloat16), v, lay), "must share one dtype"),
    (lambda q, k, v, lay: (q, k, v[:, :15], lay), r"must agree in \[B, Tk, Hkv\]"),
    (lambda q, k, v, lay: (q, k[..., :4], v, lay), "head dims differ: Dqk 8 vs 4"),
    (lambda q, k, v, lay: (jnp.concatenate([q, q]), k, v, lay), "batch sizes differ: q 2, k 1, v 1"),
    (lambda q, k, v, lay: (q[:, :, :3], k, v, lay), "Hq=3 must be a multiple of KV heads Hkv=2"),
    (lambda q, k, v, lay: (q, k, v, causal_layout(units=1)), r"Hl=1 must divide Hq=4 and be a multiple of Hkv=2"),
    (lambda q, k, v, lay: (q, k, v, causal_layout(tq=16)), r"nq=4 query units but ceil\(Tq=12 / block_q=4\) = 3"),
    (lambda q, k, v, lay: (q, k, v, causal_layout(tk=24)), r"num_kv_blocks=6 but ceil\(Tk=16 / block_k=4\) = 4"),
    (lambda q, k, v, lay: (q, k, v, lay.kv_indices), "layout must be a BlockLayout"),
])
def test_validation_errors(change, message):
    q, k, v, lay = change(*inputs(), causal_layout())
    with pytest.raises((ValueError, TypeError), match=message):
        block_sparse_attention(q, k, v, lay, implementation="reference")


def test_argument_errors():
    q, k, v = inputs()
    lay = causal_layout()
    with pytest.raises(ValueError, match=r"unknown implementation 'cuda'; valid choices: \['reference', 'xla'"):
        block_sparse_attention(q, k, v, lay, implementation="cuda")
    with pytest.raises(ValueError, match="both be given or both be None"):
        block_sparse_attention(q, k, v, lay, q_segment_ids=jnp.ones((1, 12), jnp.int32))
    with pytest.raises(ValueError, match=r"kv_positions must have shape \[B, T\] = \(1, 16\), got \(1, 12\)"):
        block_sparse_attention(q, k, v, lay, kv_positions=jnp.zeros((1, 12), jnp.int32))
    with pytest.raises(ValueError, match="q_positions must be an integer array, got float32"):
        block_sparse_attention(q, k, v, lay, q_positions=jnp.zeros((1, 12)))
    with pytest.raises(ValueError, match="kv_indices must lie in"):
        bad = BlockLayout(lay.kv_indices + 9, lay.kv_counts, lay.q_indices, lay.kv_offsets, 4, 4, 4)
        block_sparse_attention(q, k, v, bad)
    with pytest.raises(ValueError, match=r"sm_scale must be a Python number \(static\), got a traced"):
        jax.jit(lambda s: block_sparse_attention(q, k, v, lay, sm_scale=s))(1.0)
    for bad_scale in (float("nan"), float("inf"), "a", True, [1.0]):
        with pytest.raises(ValueError, match=r"sm_scale must be None or a finite real number, got"):
            block_sparse_attention(q, k, v, lay, sm_scale=bad_scale)
    for bad_causal in ("False", 0, None):
        with pytest.raises(ValueError, match=r"causal must be a bool \(True or False\), got"):
            block_sparse_attention(q, k, v, lay, causal=bad_causal)
    out, lse = block_sparse_attention(q, k, v, lay, causal=np.bool_(True), sm_scale=np.float32(0.5))
    assert out.shape == (1, 12, 4, 8) and lse.shape == (1, 4, 12)
    with pytest.raises(ValueError, match=r"Hkv must be >= 1, got Hkv=0"):
        block_sparse_attention(q, k[:, :, :0], v[:, :, :0], lay)
    with pytest.raises(ValueError, match=r"Dqk must be >= 1, got Dqk=0"):
        block_sparse_attention(q[..., :0], k[..., :0], v, lay)
    for bad_window in (0, -3, 2.5, True, jnp.int32(4)):
        with pytest.raises(ValueError, match=r"window must be None or a Python int >= 1 \(static\), got"):
            block_sparse_attention(q, k, v, lay, window=bad_window)
    with pytest.raises(ValueError, match="window=4 needs causal=True"):
        block_sparse_attention(q, k, v, lay, window=4, causal=False)


def test_unavailable_and_unsupported_implementations(monkeypatch):
    q, k, v = inputs()
    lay = causal_layout()
    monkeypatch.setattr(api, "IMPLEMENTATIONS", api.IMPLEMENTATIONS + ("missing_impl", "picky"))
    with pytest.raises(ValueError, match="implementation 'missing_impl' is not available"):
        block_sparse_attention(q, k, v, lay, implementation="missing_impl")

    picky = types.ModuleType("pallas_kernels.block_sparse.picky")

    def check_supported(q, k, v, layout):
        raise ValueError(f"picky cannot tile block_q={layout.block_q}; valid: 16, 32, 64")

    def forward(*args, **kwargs):
        raise AssertionError("forward must not run after check_supported failed")

    picky.check_supported, picky.forward, picky.backward = check_supported, forward, forward
    monkeypatch.setitem(sys.modules, "pallas_kernels.block_sparse.picky", picky)
    with pytest.raises(ValueError, match="picky cannot tile block_q=4; valid: 16, 32, 64$"):
        block_sparse_attention(q, k, v, lay, implementation="picky")
    monkeypatch.setattr(api, "default_implementation", lambda: "picky")
    with pytest.raises(ValueError, match=r"valid: 16, 32, 64 \(implementation=None chose 'picky' .* "
                                         r"implementation='xla' serves every valid call"):
        block_sparse_attention(q, k, v, lay)


def test_dispatch():
    assert api.default_implementation("cpu") == "xla"
    assert api.default_implementation("gpu") == "pallas_gpu"
    assert api.default_implementation("cuda") == "pallas_gpu"
    assert api.default_implementation("tpu") == "pallas_tpu"
    assert api.default_implementation() == "xla"    # tests run on CPU
    q, k, v = inputs()
    lay = causal_layout()
    out_default, lse_default = block_sparse_attention(q, k, v, lay)
    out_xla, lse_xla = block_sparse_attention(q, k, v, lay, implementation="xla")
    np.testing.assert_array_equal(out_default, out_xla)
    np.testing.assert_array_equal(lse_default, lse_xla)


def test_defaults_and_return_lse():
    q, k, v = inputs(tq=12, tk=16)
    lay = causal_layout()
    out, lse = block_sparse_attention(q, k, v, lay, implementation="reference")
    assert out.shape == (1, 12, 4, 8) and out.dtype == q.dtype and lse.shape == (1, 4, 12) and lse.dtype == jnp.float32
    explicit = block_sparse_attention(
        q, k, v, lay, implementation="reference", return_lse=False, sm_scale=1 / np.sqrt(8),
        q_positions=4 + jnp.arange(12, dtype=jnp.int32)[None], kv_positions=jnp.arange(16, dtype=jnp.int32)[None])
    assert isinstance(explicit, jax.Array)
    np.testing.assert_array_equal(out, explicit)


def test_custom_vjp_matches_autodiff_of_dense_reference():
    """The generic backward (delta = rowsum(dO·O) - dlse) must equal plain autodiff of the dense
    float32 definition, cotangents on both out and lse, including rows that see nothing."""
    case = random_case(11, layout_kind="random", block_q=4, block_k=4, seq_len_q=14, seq_len_k=19, group=2,
                       segments=True)
    kw = case.kwargs
    b, tq = case.q.shape[:2]
    tk = case.k.shape[1]
    mask = reference.token_mask(case.layout, jnp.broadcast_to(tk - tq + jnp.arange(tq), (b, tq)),
                                jnp.broadcast_to(jnp.arange(tk), (b, tk)), kw["q_segment_ids"],
                                kw["kv_segment_ids"], num_q_heads=case.q.shape[2], causal=kw["causal"])
    assert not np.asarray(mask).any(-1).all(), "the case should contain empty rows"

    def loss(fn):
        def f(q, k, v):
            out, lse = fn(q, k, v)
            return (out * case.d_out).sum() + jnp.where(jnp.isneginf(lse), 0.0, lse * case.d_lse).sum()
        return f

    plain = loss(lambda q, k, v: reference._dense(q, k, v, mask, kw["sm_scale"]))
    custom = loss(lambda q, k, v: block_sparse_attention(q, k, v, case.layout, implementation="reference", **kw))
    want = jax.jit(jax.grad(plain, argnums=(0, 1, 2)))(case.q, case.k, case.v)
    got = jax.jit(jax.grad(custom, argnums=(0, 1, 2)))(case.q, case.k, case.v)
    for g, w in zip(got, want):
        assert not np.isnan(np.asarray(g)).any()
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_layout_and_positions_get_no_cotangent():
    q, k, v = inputs()
    lay = causal_layout()

    @jax.jit
    def loss(q, k, v, lay, q_pos):
        return block_sparse_attention(q, k, v, lay, q_positions=q_pos, return_lse=False).sum()

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, lay, 4 + jnp.arange(12, dtype=jnp.int32)[None])
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    layout_grad = jax.grad(loss, argnums=3, allow_int=True)(q, k, v, lay, 4 + jnp.arange(12, dtype=jnp.int32)[None])
    assert all(leaf.dtype == jax.dtypes.float0 for leaf in jax.tree_util.tree_leaves(layout_grad))
