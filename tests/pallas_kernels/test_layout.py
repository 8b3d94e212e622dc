"""BlockLayout builders and invariants against brute-force numpy constructions."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels import BlockLayout

SETTINGS = settings(max_examples=30, deadline=None)


def brute_lists(mask):
    """mask [B, Hl, nq, nk] -> python lists of visited blocks per (b, u, q)."""
    return [[[list(np.flatnonzero(row)) for row in unit] for unit in b] for b in mask]


def assert_layout_matches(layout, mask):
    """The layout's lists, padding and inverse CSR are exactly those of the block mask."""
    mask = np.asarray(mask, bool)
    layout.check_values()
    idx, cnt = np.asarray(layout.kv_indices), np.asarray(layout.kv_counts)
    qi, off = np.asarray(layout.q_indices), np.asarray(layout.kv_offsets)
    b, hl, nq, nk = mask.shape
    assert layout.num_kv_blocks == nk and idx.shape[:3] == (b, hl, nq)
    for bi in range(b):
        for u in range(hl):
            inverse = []
            for j in range(nk):
                inverse += [i for i in range(nq) if mask[bi, u, i, j]]
                got = list(qi[bi, u, off[bi, u, j]:off[bi, u, j + 1]])
                assert got == [i for i in range(nq) if mask[bi, u, i, j]], (bi, u, j)
            total = len(inverse)
            assert off[bi, u, -1] == total
            pad = inverse[-1] if inverse else 0
            assert list(qi[bi, u]) == inverse + [pad] * (qi.shape[-1] - total)
            for i in range(nq):
                want = list(np.flatnonzero(mask[bi, u, i]))
                assert cnt[bi, u, i] == len(want)
                pad = want[-1] if want else 0
                assert list(idx[bi, u, i]) == want + [pad] * (idx.shape[-1] - len(want))
    np.testing.assert_array_equal(np.asarray(layout.dense_block_mask()), mask)


# A few fixed shapes keep the number of compilations (the cost of these tests) small; values vary.
MASK_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 2, 6, 3)]


@st.composite
def block_masks(draw):
    shape = draw(st.sampled_from(MASK_SHAPES))
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return np.random.default_rng(seed).random(shape) < density


@SETTINGS
@given(block_masks())
def test_from_block_mask(mask):
    assert_layout_matches(BlockLayout.from_block_mask(jnp.asarray(mask), block_q=4, block_k=8), mask)


@functools.partial(jax.jit, static_argnums=2)
def from_indices_jit(indices, counts, nk):
    return BlockLayout.from_indices(indices, counts, block_q=1, block_k=2, num_kv_blocks=nk)


@functools.partial(jax.jit, static_argnums=1)
def top_k_jit(scores, k):
    return BlockLayout.top_k(scores, k, block_q=2, block_k=2)


@SETTINGS
@given(block_masks(), st.integers(0, 2**31 - 1))
def test_from_indices_sorts_and_drops_duplicates(mask, seed):
    rng = np.random.default_rng(seed)
    b, hl, nq, nk = mask.shape
    cap = 2 * nk
    indices = np.zeros((b, hl, nq, cap), np.int32)
    counts = np.zeros((b, hl, nq), np.int32)
    for pos in np.ndindex(b, hl, nq):
        chosen = np.flatnonzero(mask[pos])
        listed = rng.permutation(np.concatenate([chosen, rng.choice(chosen, len(chosen))]) if len(chosen) else chosen)
        counts[pos] = len(listed)
        indices[pos][:len(listed)] = listed
        indices[pos][len(listed):] = rng.integers(-5, 50, cap - len(listed))   # garbage past the count
    layout = BlockLayout.from_indices(jnp.asarray(indices), jnp.asarray(counts), block_q=1, block_k=2,
                                      num_kv_blocks=nk)
    assert_layout_matches(layout, mask)
    assert_layout_matches(from_indices_jit(indices, counts, nk), mask)


def test_from_indices_errors():
    with pytest.raises(ValueError, match=r"KV block index 4 .* out of range \[0, num_kv_blocks=4\)"):
        BlockLayout.from_indices(jnp.array([[[[0, 4]]]]), jnp.array([[[2]]]), block_q=1, block_k=1, num_kv_blocks=4)
    with pytest.raises(ValueError, match=r"counts must lie in \[0, K=2\]"):
        BlockLayout.from_indices(jnp.array([[[[0, 1]]]]), jnp.array([[[3]]]), block_q=1, block_k=1, num_kv_blocks=4)
    with pytest.raises(ValueError, match=r"counts must be \[B, Hl, nq\]"):
        BlockLayout.from_indices(jnp.zeros((1, 1, 2, 2), int), jnp.zeros((1, 1, 3), int), block_q=1, block_k=1,
                                 num_kv_blocks=4)
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        BlockLayout.from_indices(jnp.zeros((1, 1, 2, 2), int), jnp.zeros((1, 1, 2), int), block_q=0, block_k=1,
                                 num_kv_blocks=4)
    # Under jit the values cannot be checked: out-of-range entries are dropped.
    layout = from_indices_jit(jnp.array([[[[3, 9, -1, 1]]]]), jnp.array([[[4]]]), 4)
    assert_layout_matches(layout, np.array([[[[False, True, False, True]]]]))


def test_from_block_mask_capacity():
    mask = np.array([[[[True, False, True], [False, False, False]]]])
    layout = BlockLayout.from_block_mask(jnp.asarray(mask), block_q=2, block_k=2, max_kv_blocks=2)
    assert layout.max_kv_blocks == 2
    assert_layout_matches(layout, mask)
    with pytest.raises(ValueError, match="visits 2 KV blocks, more than max_kv_blocks=1"):
        BlockLayout.from_block_mask(jnp.asarray(mask), block_q=2, block_k=2, max_kv_blocks=1)
    # Under jit the count cannot be checked: the row keeps its lowest max_kv_blocks blocks.
    traced = jax.jit(lambda m: BlockLayout.from_block_mask(m, block_q=2, block_k=2, max_kv_blocks=1))(mask)
    assert_layout_matches(traced, np.array([[[[True, False, False], [False, False, False]]]]))
    with pytest.raises(ValueError, match="must be bool"):
        BlockLayout.from_block_mask(jnp.asarray(mask, jnp.int32), block_q=2, block_k=2)


def window_mask(tq, tk, bq, bk, window):
    """Brute force over tokens: block (i, j) visited iff some query of unit i may see a key of block j."""
    nq, nk = -(-tq // bq), -(-tk // bk)
    qpos = tk - tq + np.arange(tq)
    kpos = np.arange(tk)
    see = kpos[None, :] <= qpos[:, None]
    if window is not None:
        see &= kpos[None, :] > qpos[:, None] - window
    mask = np.zeros((nq, nk), bool)
    for i, j in zip(*np.nonzero(see)):
        mask[i // bq, j // bk] = True
    return mask


@SETTINGS
@given(st.sampled_from([(1, 1, 1, 1), (7, 40, 3, 4), (40, 7, 16, 1), (33, 33, 8, 8), (20, 37, 1, 8)]),
       st.one_of(st.none(), st.integers(1, 50)))
def test_causal_and_sliding_window(sizes, window):
    tq, tk, bq, bk = sizes
    layout = BlockLayout.sliding_window(tq, tk, window, block_q=bq, block_k=bk, num_head_units=2, batch=1)
    want = np.broadcast_to(window_mask(tq, tk, bq, bk, window), (1, 2) + window_mask(tq, tk, bq, bk, window).shape)
    assert_layout_matches(layout, want)
    if window is None:
        causal = BlockLayout.causal(tq, tk, block_q=bq, block_k=bk, num_head_units=2)
        np.testing.assert_array_equal(causal.kv_indices, layout.kv_indices)
    else:
        assert layout.max_kv_blocks <= -(-(bq + window - 1) // bk) + 1


@SETTINGS
@given(block_masks(), st.sampled_from([1, 3]), st.integers(0, 2**31 - 1))
def test_top_k(finite, k, seed):
    nk = finite.shape[-1]
    k = min(k, nk)
    scores = np.random.default_rng(seed).permutation(finite.size).reshape(finite.shape).astype(np.float32)
    scores = np.where(finite, scores, -np.inf)
    want = np.zeros_like(finite)
    for pos in np.ndindex(finite.shape[:3]):
        order = [j for j in np.argsort(-scores[pos], kind="stable")[:k] if np.isfinite(scores[pos][j])]
        want[pos][order] = True
    layout = top_k_jit(jnp.asarray(scores), k)
    assert layout.max_kv_blocks == k
    assert_layout_matches(layout, want)


def test_pytree_and_jit():
    layout = BlockLayout.causal(10, 12, block_q=4, block_k=4, num_head_units=2)
    leaves, treedef = jax.tree_util.tree_flatten(layout)
    assert len(leaves) == 4 and all(leaf.dtype == jnp.int32 for leaf in leaves)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (rebuilt.block_q, rebuilt.block_k, rebuilt.num_kv_blocks) == (4, 4, 3)
    doubled = jax.jit(lambda lay: lay.kv_counts * 2)(layout)
    np.testing.assert_array_equal(doubled, 2 * np.asarray(layout.kv_counts))
    np.testing.assert_allclose(layout.density(), np.full((1, 2), 8 / 9))


def test_check_shapes_errors():
    layout = BlockLayout.causal(10, 12, block_q=4, block_k=4, num_head_units=2)
    layout.check_shapes(10, 12, num_q_heads=4, num_kv_heads=2, batch=3)
    with pytest.raises(ValueError, match=r"nq=3 query units but ceil\(Tq=13 / block_q=4\) = 4"):
        layout.check_shapes(13, 12, num_q_heads=4, num_kv_heads=2, batch=1)
    with pytest.raises(ValueError, match=r"num_kv_blocks=3 but ceil\(Tk=5 / block_k=4\) = 2"):
        layout.check_shapes(10, 5, num_q_heads=4, num_kv_heads=2, batch=1)
    with pytest.raises(ValueError, match=r"Hl=2 must divide Hq=3"):
        layout.check_shapes(10, 12, num_q_heads=3, num_kv_heads=1, batch=1)
    with pytest.raises(ValueError, match=r"Hl=2 must divide Hq=8 and be a multiple of Hkv=4; valid: Hl in \[4, 8\]"):
        layout.check_shapes(10, 12, num_q_heads=8, num_kv_heads=4, batch=1)
    with pytest.raises(ValueError, match="layout batch 2 must be 1 or the batch size 3"):
        BlockLayout.causal(10, 12, block_q=4, block_k=4, batch=2).check_shapes(10, 12, 1, 1, batch=3)


def test_check_values_rejects_hand_built_layout():
    good = BlockLayout.causal(8, 8, block_q=4, block_k=4)
    bad = BlockLayout(good.kv_indices[..., ::-1], good.kv_counts, good.q_indices, good.kv_offsets, 4, 4, 2)
    with pytest.raises(ValueError, match="strictly ascending"):
        bad.check_values()


def test_check_values_rejects_an_inverse_that_disagrees():
    """The Pallas backwards take dK/dV's work from the inverse alone: a hand-built layout whose
    q_indices / kv_offsets are not the inverse of its lists is refused, not silently wrong."""
    mask = jnp.zeros((1, 2, 3, 3), bool).at[0, :, 0, 0].set(True).at[0, :, 2, :].set(True)
    good = BlockLayout.from_block_mask(mask, block_q=4, block_k=4)
    good.check_values()
    swapped = BlockLayout.from_block_mask(mask[:, :, ::-1], block_q=4, block_k=4)   # units 0 and 2 swapped
    for q_indices, kv_offsets in ((swapped.q_indices, good.kv_offsets),          # same offsets
                                  (good.q_indices, good.kv_offsets.at[0, 1, 1].add(1))):
        bad = BlockLayout(good.kv_indices, good.kv_counts, q_indices, kv_offsets, 4, 4, 3)
        with pytest.raises(ValueError, match=r"head unit \d\) are not the inverse of kv_indices / kv_counts"):
            bad.check_values()


def test_max_kv_blocks_must_be_an_int():
    mask = jnp.ones((1, 1, 2, 2), bool)
    for bad in (1.7, "2", True):
        with pytest.raises(ValueError, match=r"max_kv_blocks must be None or an int in \[1, nk=2\], got"):
            BlockLayout.from_block_mask(mask, block_q=4, block_k=4, max_kv_blocks=bad)
