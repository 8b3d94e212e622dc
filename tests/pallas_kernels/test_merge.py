"""merge_attention: partial results over disjoint KV blocks merge into the full attention, forward
and backward (the lse cotangent carries the merge's gradient into each partial)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import random_case
from pallas_kernels import BlockLayout, block_sparse_attention, merge_attention


def split_case(seed, parts):
    case = random_case(seed, layout_kind="random", density=0.7, block_q=4, block_k=4, seq_len_q=15,
                       seq_len_k=22, group=2, head_unit="kv", segments=True)
    mask = np.asarray(case.layout.dense_block_mask())
    owner = np.random.default_rng(seed).integers(0, parts, mask.shape)
    layouts = [BlockLayout.from_block_mask(jnp.asarray(mask & (owner == i)), block_q=4, block_k=4)
               for i in range(parts)]
    return case, layouts


@pytest.mark.parametrize("parts", [1, 3])
def test_merge_of_disjoint_partials_equals_full(parts):
    case, layouts = split_case(parts, parts)

    def merged(q, k, v):
        partials = [block_sparse_attention(q, k, v, lay, implementation="xla", **case.kwargs) for lay in layouts]
        return merge_attention(partials)

    def full(q, k, v):
        return block_sparse_attention(q, k, v, case.layout, implementation="reference", **case.kwargs)

    @jax.jit
    def value_and_grads(q, k, v):
        (out, lse), merged_vjp = jax.vjp(merged, q, k, v)
        (want_out, want_lse), full_vjp = jax.vjp(full, q, k, v)
        cotangents = (case.d_out, case.d_lse)
        return (out, lse, want_out, want_lse), merged_vjp(cotangents), full_vjp(cotangents)

    (out, lse, want_out, want_lse), got_grads, want_grads = value_and_grads(case.q, case.k, case.v)
    assert np.isneginf(np.asarray(want_lse)).any(), "the case should contain rows that see nothing"
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.where(jnp.isneginf(lse), 0, lse), jnp.where(jnp.isneginf(want_lse), 0, want_lse),
                               rtol=1e-5, atol=1e-5)
    for got, want in zip(got_grads, want_grads):
        assert not np.isnan(np.asarray(got)).any()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_merge_formula_and_empty_rows():
    rng = np.random.default_rng(0)
    outs = [jnp.asarray(rng.normal(size=(1, 3, 2, 4)), jnp.bfloat16) for _ in range(2)]
    lses = [jnp.asarray(rng.normal(size=(1, 2, 3)), jnp.float32) for _ in range(2)]
    lses[0] = lses[0].at[0, 0, 1].set(-jnp.inf)                        # one partial empty on a row
    lses = [lse.at[0, 1, 2].set(-jnp.inf) for lse in lses]             # every partial empty on a row
    out, lse = merge_attention(list(zip(outs, lses)))
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    l0, l1 = np.asarray(lses[0], np.float64), np.asarray(lses[1], np.float64)
    want_lse = np.logaddexp(l0, l1)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6)
    finite = np.where(np.isfinite(want_lse), want_lse, 0)
    w0 = np.exp(l0 - finite).transpose(0, 2, 1)[..., None]
    w1 = np.exp(l1 - finite).transpose(0, 2, 1)[..., None]
    want_out = w0 * np.asarray(outs[0], np.float64) + w1 * np.asarray(outs[1], np.float64)
    np.testing.assert_allclose(np.asarray(out, np.float32), want_out, rtol=1e-2, atol=1e-2)
    assert np.all(np.asarray(out)[0, 2, 1] == 0)

    def loss(lses):
        out, lse = merge_attention([(o.astype(jnp.float32), l) for o, l in zip(outs, lses)])
        return out.sum() + jnp.where(jnp.isneginf(lse), 0, lse).sum()

    for grad in jax.grad(loss)(lses):
        assert not np.isnan(np.asarray(grad)).any()
        assert grad[0, 1, 2] == 0


def test_merge_ignores_the_out_of_an_empty_partial():
    """A partial with lse -inf on a row saw nothing there; its out on that row (here NaN and inf, as a
    caller's own 0/0 gives) must not reach the merged out or the gradients."""
    rng = np.random.default_rng(1)
    outs = [jnp.asarray(rng.normal(size=(1, 3, 2, 4)), jnp.float32) for _ in range(2)]
    lses = [jnp.asarray(rng.normal(size=(1, 2, 3)), jnp.float32) for _ in range(2)]
    lses[1] = lses[1].at[0, 0, 1].set(-jnp.inf).at[0, 1, 2].set(-jnp.inf)
    outs[1] = outs[1].at[0, 1, 0].set(jnp.nan).at[0, 2, 1].set(jnp.inf)
    lses[0] = lses[0].at[0, 1, 2].set(-jnp.inf)                        # row (h=1, t=2): both empty
    out, lse = merge_attention(list(zip(outs, lses)))
    np.testing.assert_allclose(out[0, 1, 0], outs[0][0, 1, 0], rtol=1e-6)   # only partial 0 saw keys
    np.testing.assert_allclose(lse[0, 0, 1], lses[0][0, 0, 1], rtol=1e-6)
    np.testing.assert_array_equal(out[0, 2, 1], 0.0)
    assert lse[0, 1, 2] == -np.inf

    def loss(outs, lses):
        out, lse = merge_attention(list(zip(outs, lses)))
        return out.sum() + jnp.where(jnp.isneginf(lse), 0, lse).sum()

    for grad in jax.tree.leaves(jax.grad(loss, argnums=(0, 1))(outs, lses)):
        assert np.isfinite(np.asarray(grad)).all()


def test_merge_errors():
    out, lse = jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="at least one"):
        merge_attention([])
    with pytest.raises(ValueError, match=r"partial 1 has out shape \(1, 3, 2, 5\)"):
        merge_attention([(out, lse), (jnp.zeros((1, 3, 2, 5)), lse)])
    with pytest.raises(ValueError, match=r"lse shape \(1, 3, 2\), expected \[B, H, T\] = \(1, 2, 3\)"):
        merge_attention([(out, lse.transpose(0, 2, 1))])
