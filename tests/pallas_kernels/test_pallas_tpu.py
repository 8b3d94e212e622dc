"""`pallas_tpu` (Pallas, Mosaic TPU lowering) against the float32 `reference`.

Numerics run in interpret mode on CPU: every case compares out, lse and the gradients dq, dk, dv
(through `block_sparse_attention`'s custom_vjp, with random cotangents on both out and lse) on fresh
random inputs and layouts from `kernel_cases`. Sizes are tiny: each shape compiles three kernels.
A lowering test checks that the forward and backward lower for the TPU platform to Mosaic custom
calls without TPU hardware (this runs the Pallas-to-Mosaic lowering and its tiling checks; the
final Mosaic compilation needs libtpu and a chip).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_cases import cases, random_case
from pallas_kernels import BlockLayout, block_sparse_attention
from pallas_kernels.block_sparse import pallas_tpu

def _outputs(impl, case):
    """(out, lse, dq, dk, dv) of `case` under one jit (interpret mode for Pallas): compiling the whole
    call once is several times faster on CPU than running it op by op."""
    def run(q, k, v, layout, d_out, d_lse):
        attend = lambda q, k, v: block_sparse_attention(q, k, v, layout, implementation=impl,
                                                        interpret=impl != "reference", **case.kwargs)
        (out, lse), vjp = jax.vjp(attend, q, k, v)
        return (out, lse) + tuple(vjp((d_out, d_lse)))

    return jax.jit(run)(case.q, case.k, case.v, case.layout, case.d_out, case.d_lse)


def assert_matches_reference(case):
    """out, lse (its -inf rows exactly), dq, dk, dv of pallas_tpu against reference, errors relative
    to max(1, max|reference|); no NaN anywhere."""
    tol = 2e-5 if case.q.dtype == jnp.float32 else 2e-2
    got, want = _outputs("pallas_tpu", case), _outputs("reference", case)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert g.shape == w.shape, f"{name}: shape {g.shape} != {w.shape} in {case}"
        assert not np.isnan(g).any(), f"{name} has NaN in {case}"
        if name == "lse":
            assert np.array_equal(np.isneginf(g), np.isneginf(w)), f"rows that see nothing differ in {case}"
            g, w = np.where(np.isneginf(w), 0, g), np.where(np.isneginf(w), 0, w)
        scale = max(1.0, float(np.abs(w).max(initial=0)))
        err = float(np.abs(g - w).max(initial=0)) / scale
        assert err <= tol, f"{name}: max error {err:.3g} (relative to {scale:.3g}) > {tol:.3g} in {case}"


CASES = {
    # per-query-head lists (Hl = Hq, two units merged per KV head in dK/dV), ragged ends, Tq < Tk
    "per_head_gqa2_ragged": dict(batch=2, seq_len_q=40, seq_len_k=300, num_kv_heads=2, group=2,
                                 head_unit="query", block_q=16, block_k=128, dqk=64, dv=32),
    # NSA: one-token query units with the 8 heads of a group stacked as rows, Dqk != Dv, bf16,
    # packed documents, one layout broadcast over the batch; NSA's 64-key blocks (two per KV tile)
    "nsa_token_units_bf16": dict(batch=2, seq_len_q=5, seq_len_k=260, num_kv_heads=1, group=8,
                                 head_unit="kv", block_q=1, block_k=64, dqk=192, dv=128,
                                 dtype="bfloat16", layout_batch=1, segments=True),
    # permuted positions (ring / zigzag shards), explicit index lists with duplicates, GQA 4,
    # 32-key blocks (four per KV tile, several units merged per tile in dK/dV)
    "permuted_positions_indices": dict(seq_len_q=24, seq_len_k=200, num_kv_heads=1, group=4,
                                       head_unit="query", block_q=8, block_k=32, dqk=32, dv=32,
                                       layout_kind="indices", positions="permuted"),
    # not causal, segments, shared group lists, top-k layout, block_k of two lane tiles
    "noncausal_topk_wide_blocks": dict(seq_len_q=64, seq_len_k=600, num_kv_heads=2, group=2,
                                       head_unit="kv", block_q=32, block_k=256, dqk=16, dv=48,
                                       layout_kind="top_k", causal=False, segments=True),
}


@pytest.mark.parametrize("seed, name", list(enumerate(sorted(CASES))))
def test_matches_reference(seed, name):
    assert_matches_reference(random_case(seed, **CASES[name]))


WINDOW_CASES = {
    # kernel window smaller than a block; permuted positions, segments; four blocks per KV tile
    "window_sub_block_permuted": dict(seq_len_q=24, seq_len_k=200, num_kv_heads=1, group=4, head_unit="query",
                                      block_q=8, block_k=32, dqk=32, dv=32, layout_kind="random",
                                      positions="permuted", segments=True, window=13),
    # one-token units over the window layout, window of a block and a half, bf16
    "window_token_units_bf16": dict(seq_len_q=5, seq_len_k=260, num_kv_heads=1, group=8, head_unit="kv",
                                    block_q=1, block_k=64, dqk=64, dv=32, layout_kind="window",
                                    dtype="bfloat16", window=100),
}


@pytest.mark.parametrize("name", sorted(WINDOW_CASES))
def test_window_matches_reference(name):
    assert_matches_reference(random_case(17, **WINDOW_CASES[name]))


@settings(max_examples=3, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases(block_k=st.sampled_from([64, 128]), block_q=st.sampled_from([1, 8, 16]), dqk=32, dv=32,
             group=st.sampled_from([1, 4]), seq_len_k=st.integers(129, 300),
             layout_kind=st.sampled_from(["random", "causal", "diagonal", "full", "empty", "window"])))
def test_random_layouts(case):
    assert_matches_reference(case)


def test_empty_layout_gives_zero_output_and_gradients():
    case = random_case(7, seq_len_q=16, seq_len_k=200, num_kv_heads=1, group=2, head_unit="kv",
                       block_q=8, block_k=128, dqk=16, dv=16, layout_kind="empty")
    out, lse, *grads = _outputs("pallas_tpu", case)
    assert bool(jnp.all(out == 0)) and bool(jnp.all(jnp.isneginf(lse)))
    for grad in grads:
        assert bool(jnp.all(grad == 0))


def _lower_for_tpu(case):
    def loss(q, k, v):
        out, lse = block_sparse_attention(q, k, v, case.layout, implementation="pallas_tpu", **case.kwargs)
        return out.astype(jnp.float32).sum() + jnp.where(jnp.isneginf(lse), 0.0, lse).sum()

    grad = jax.grad(loss, argnums=(0, 1, 2))
    return jax.jit(grad).trace(case.q, case.k, case.v).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("name", ["per_head_gqa2_ragged", "nsa_token_units_bf16", "window_token_units_bf16"])
def test_lowers_to_mosaic_for_tpu(name):
    text = _lower_for_tpu(random_case(0, **(CASES | WINDOW_CASES)[name]))
    assert text.count("tpu_custom_call") == 3, "expected the forward, dQ and dK/dV Mosaic kernels"
    for kernel in ("block_sparse_tpu_fwd", "block_sparse_tpu_dq", "block_sparse_tpu_dkv"):
        assert kernel in text


def test_rejects_what_it_cannot_tile():
    q = jnp.zeros((1, 16, 2, 32), jnp.float32)
    kv = jnp.zeros((1, 128, 2, 32), jnp.float32)
    odd = BlockLayout.causal(16, 128, block_q=16, block_k=96, num_head_units=2)
    with pytest.raises(ValueError, match=r"block_k.*multiple of 128.*divisor of 128.*block_k=96"):
        pallas_tpu.check_supported(q, kv, kv, odd)
    with pytest.raises(ValueError, match=r"block_k=96"):
        block_sparse_attention(q, kv, kv, odd, implementation="pallas_tpu", interpret=True)
    wide = BlockLayout.causal(16, 128, block_q=16, block_k=128, num_head_units=2)
    half = lambda x: x.astype(jnp.float16)
    with pytest.raises(ValueError, match=r"float32 and bfloat16.*float16"):
        pallas_tpu.check_supported(half(q), half(kv), half(kv), wide)


def test_dkv_schedule_groups_every_entry_by_kv_tile():
    """The dK/dV grid's entries: exactly the (head unit, query unit, KV block) triples of the
    query-major lists, each KV group's entries in ascending KV-tile order (so a tile's dK/dV block is
    one run of consecutive steps), padding repeating the last entry."""
    case = random_case(3, batch=2, seq_len_q=40, seq_len_k=300, num_kv_heads=2, group=3,
                       head_unit="query", block_q=8, block_k=32, dqk=16, dv=16, layout_batch=2)
    layout = case.layout
    g = pallas_tpu._geometry(case.q, case.k, case.v, layout)
    kv, row, totals, visited = (np.asarray(x) for x in pallas_tpu._dkv_schedule(layout, g))
    idx, cnt = np.asarray(layout.kv_indices), np.asarray(layout.kv_counts)
    lb, hl, nq, cap = idx.shape
    ug = hl // g.hkv
    for b in range(lb):
        for h in range(g.hkv):
            want = {(u, i, int(idx[b, h * ug + u, i, s])) for u in range(ug) for i in range(nq)
                    for s in range(cnt[b, h * ug + u, i])}
            n = int(totals[b, h])
            got = [(int(r) // nq, int(r) % nq, int(j)) for r, j in zip(row[b, h, :n], kv[b, h, :n])]
            assert len(got) == len(want) and set(got) == want
            tiles = kv[b, h, :n] // g.sub
            assert np.all(np.diff(tiles) >= 0)
            if n:
                assert np.all(kv[b, h, n:] == kv[b, h, n - 1]) and np.all(row[b, h, n:] == row[b, h, n - 1])
            assert set(np.flatnonzero(visited[b, h])) == {j // g.sub for _, _, j in want}


def test_layouts_beyond_the_smem_budget_split_into_several_calls(monkeypatch):
    """With a budget that fits two head units' lists and one KV group's inverse, the forward and dQ
    run as two calls of two units and dK/dV as two calls of one KV head; results are unchanged."""
    case = random_case(11, **CASES["per_head_gqa2_ragged"])
    lb, hl, nq, cap = case.layout.kv_indices.shape
    per_unit = pallas_tpu._query_major_smem(lb, nq, cap)
    per_group = pallas_tpu._dkv_smem(lb, hl // case.k.shape[2], nq, cap)
    budget = max(per_group, 2 * per_unit)
    assert budget < min(2 * per_group, hl * per_unit)
    monkeypatch.setattr(pallas_tpu, "SMEM_BUDGET_BYTES", budget)
    assert _lower_for_tpu(case).count("tpu_custom_call") == 6
    assert_matches_reference(case)
    monkeypatch.setattr(pallas_tpu, "SMEM_BUDGET_BYTES", per_group - 1)
    with pytest.raises(ValueError, match=rf"SMEM, limit {per_group - 1} bytes"):
        pallas_tpu.check_supported(case.q, case.k, case.v, case.layout)
