"""`xla` against `reference`: random cases (hypothesis) and the shapes the variants rely on."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from kernel_cases import assert_matches_reference, cases, random_case, run_case
from pallas_kernels import BlockLayout, block_sparse_attention
from pallas_kernels.block_sparse import xla


# Drawing a case builds its layout (a jit compilation), which can exceed the generation time limit.
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_xla_matches_reference_random(case):
    assert_matches_reference("xla", case)


@pytest.mark.parametrize("params", [
    # NSA selection: one token per query unit, the 16 heads of a group stacked as rows, Dqk != Dv.
    dict(block_q=1, group=16, num_kv_heads=1, head_unit="kv", block_k=8, seq_len_q=12, seq_len_k=40,
         dqk=24, dv=16, dtype="bfloat16", layout_kind="top_k"),
    # SeerAttention-like: 128-token query blocks, one list per query head, ragged ends, Tq < Tk.
    dict(block_q=128, group=1, num_kv_heads=2, head_unit="query", block_k=32, seq_len_q=130, seq_len_k=150,
         layout_kind="causal"),
    # Packed documents with permuted (ring / zigzag) positions, batch-specific layouts, float16.
    dict(block_q=4, group=4, head_unit="query", block_k=8, seq_len_q=24, seq_len_k=24, batch=2,
         layout_kind="random", positions="permuted", segments=True, dtype="float16"),
], ids=["nsa", "seer", "packed"])
def test_xla_variant_shapes(params):
    assert_matches_reference("xla", random_case(7, **params))


@pytest.mark.parametrize("params", [
    # A window smaller than a block, permuted positions and packed documents, GQA rows stacked.
    dict(block_q=8, block_k=8, group=4, head_unit="kv", seq_len_q=21, seq_len_k=29, layout_kind="random",
         positions="permuted", segments=True, batch=2, window=5),
    # The window layout (its own, random, width) with a kernel window of one and a half blocks, bf16.
    dict(block_q=16, block_k=8, group=2, head_unit="query", seq_len_q=40, seq_len_k=47, layout_kind="window",
         dtype="bfloat16", window=12),
    # window = 1: each query sees only its own position (-inf rows where the layout misses it).
    dict(block_q=1, block_k=4, group=2, head_unit="kv", seq_len_q=9, seq_len_k=13, layout_kind="top_k",
         window=1),
], ids=["sub_block", "window_layout", "self_only"])
def test_xla_window(params):
    assert_matches_reference("xla", random_case(11, **params))


def test_xla_chunked_scan(monkeypatch):
    """A tiny chunk budget forces many chunks (and a padded last one); results must not change."""
    case = random_case(3, block_q=2, block_k=4, seq_len_q=23, seq_len_k=30, group=2, layout_kind="random",
                       segments=True)
    monkeypatch.setattr(xla, "_CHUNK_ELEMENTS", 1)
    positions = jnp.zeros((1, 23), jnp.int32), jnp.zeros((1, 30), jnp.int32)
    assert xla._Plan(case.q, case.k, case.v, case.layout, *positions, None, None).num_chunks == 12
    assert_matches_reference("xla", case)


def test_xla_empty_layout_gives_zeros():
    case = random_case(1, layout_kind="empty", seq_len_q=10, seq_len_k=17, block_q=4, block_k=8)
    out, lse, dq, dk, dv = run_case("xla", case, False)
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
    for grad in (dq, dk, dv):
        assert np.all(np.asarray(grad) == 0)


def test_xla_deterministic_and_jit_compatible():
    case = random_case(5, block_q=16, block_k=8, seq_len_q=40, seq_len_k=48, group=4, head_unit="kv",
                       layout_kind="causal")
    first, second = run_case("xla", case, False), run_case("xla", case, False)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The layout is built inside the jitted function from traced scores.
    scores = jax.random.normal(jax.random.key(0), (1, 2, 3, 6))

    @jax.jit
    def attend(q, k, v, scores):
        layout = BlockLayout.top_k(scores, 2, block_q=16, block_k=8)
        return block_sparse_attention(q, k, v, layout, implementation="xla", return_lse=False)

    q, k, v = case.q, case.k, case.v
    eager = block_sparse_attention(q, k, v, BlockLayout.top_k(scores, 2, block_q=16, block_k=8),
                                   implementation="reference", return_lse=False)
    np.testing.assert_allclose(attend(q, k, v, scores), eager, rtol=2e-5, atol=2e-5)


def test_xla_memory_grows_linearly_with_length():
    """With a fixed number of blocks per query unit the compiled forward+backward's temporary memory
    grows linearly in T (the reference's grows quadratically)."""
    def temp_bytes(t):
        q = jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32)
        k = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)
        layout = BlockLayout.sliding_window(t, t, 64, block_q=32, block_k=32, num_head_units=2)
        loss = lambda q, k, v: block_sparse_attention(q, k, v, layout, implementation="xla", return_lse=False).sum()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(512), temp_bytes(2048)
    assert large <= 4.4 * small, (small, large)


@pytest.mark.parametrize("params", [
    # one-token units with a group's heads as rows (NSA): many units of a chunk list the same blocks
    dict(block_q=1, group=4, num_kv_heads=2, head_unit="kv", block_k=8, seq_len_q=20, seq_len_k=40,
         layout_kind="random", density=0.7),
    # one list per query head (Hl = Hq): the G head units of a KV group add to the same blocks
    dict(block_q=8, group=4, num_kv_heads=2, head_unit="query", block_k=8, seq_len_q=30, seq_len_k=37,
         layout_kind="random", density=0.8, batch=2, segments=True),
], ids=["token_units", "per_head_lists"])
def test_dkv_added_in_order_matches_reference(monkeypatch, params):
    """The dK/dV accumulation XLA gets off CPU (one scatter per head unit and query unit, in order, no
    colliding destinations; on CPU the single scatter) gives the reference gradients when forced here."""
    monkeypatch.setattr(xla, "_accumulate",
                        lambda accs, parts, rows, valid, hkv: xla._add_in_order(accs, parts, rows, valid, hkv=hkv))
    assert_matches_reference("xla", random_case(3, **params))


def test_dkv_accumulation_is_chosen_per_platform():
    """Lowered for CUDA the backward carries the in-order loop (fori_loop: a while); for CPU not."""
    case = random_case(5, block_q=1, group=2, num_kv_heads=1, head_unit="kv", block_k=8, seq_len_q=8,
                       seq_len_k=16)

    def loss(q, k, v):
        out, lse = block_sparse_attention(q, k, v, case.layout, implementation="xla", **case.kwargs)
        return out.astype(jnp.float32).sum()

    lowered = {p: jax.jit(jax.grad(loss, argnums=(1, 2))).trace(case.q, case.k, case.v).lower(
        lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda")}
    assert lowered["cuda"].count("stablehlo.while") == lowered["cpu"].count("stablehlo.while") + 1
