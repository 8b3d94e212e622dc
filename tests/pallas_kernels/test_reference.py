"""`reference` against a per-row float64 numpy loop written from the softmax definition."""
import numpy as np
import pytest

from kernel_cases import random_case, run_case


def naive(case):
    """out, lse, dq, dk, dv by looping over (batch, head, query row) in float64.

    Row i of head h sees key j iff j's block is listed for (unit of i, head unit of h), and (if causal)
    kv_pos[j] <= q_pos[i], and (if a window w) q_pos[i] - kv_pos[j] < w, and (if segments) the ids agree. With s_j = scale·q_i·k_j,
    p = softmax(s), out_i = Σ p_j v_j, lse_i = log Σ exp s_j, and for the loss
    <dO_i, out_i> + dlse_i·lse_i: dv_j += p_j dO_i, ds_j = p_j (dO_i·v_j - Σ_l p_l dO_i·v_l) + dlse_i p_j,
    dq_i = scale Σ ds_j k_j, dk_j += scale ds_j q_i.
    """
    f64 = lambda x: np.asarray(x, np.float64)
    q, k, v, d_out, d_lse = map(f64, (case.q, case.k, case.v, case.d_out, case.d_lse))
    lay, kw = case.layout, case.kwargs
    b_, tq, hq, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group, per_unit = hq // hkv, hq // lay.num_head_units
    q_pos = np.asarray(kw.get("q_positions", np.broadcast_to(tk - tq + np.arange(tq), (b_, tq))))
    kv_pos = np.asarray(kw.get("kv_positions", np.broadcast_to(np.arange(tk), (b_, tk))))
    idx, cnt = np.asarray(lay.kv_indices), np.asarray(lay.kv_counts)
    out = np.zeros(q.shape[:3] + (v.shape[3],))
    lse = np.full((b_, hq, tq), -np.inf)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    scale = kw["sm_scale"]
    window = kw.get("window")
    for b in range(b_):
        lb = b if idx.shape[0] > 1 else 0
        for h in range(hq):
            g = h // group
            for i in range(tq):
                unit, u = i // lay.block_q, h // per_unit
                listed = set(idx[lb, u, unit, :cnt[lb, u, unit]].tolist())
                keys = [j for j in range(tk) if j // lay.block_k in listed
                        and (not kw["causal"] or kv_pos[b, j] <= q_pos[b, i])
                        and (window is None or q_pos[b, i] - kv_pos[b, j] < window)
                        and ("q_segment_ids" not in kw
                             or kw["q_segment_ids"][b, i] == kw["kv_segment_ids"][b, j])]
                if not keys:
                    continue
                kk, vv = k[b, keys, g], v[b, keys, g]
                s = scale * kk @ q[b, i, h]
                e = np.exp(s - s.max())
                p = e / e.sum()
                out[b, i, h] = p @ vv
                lse[b, h, i] = s.max() + np.log(e.sum())
                dp = vv @ d_out[b, i, h]
                ds = p * (dp - p @ dp) + d_lse[b, h, i] * p
                dv[b, keys, g] += p[:, None] * d_out[b, i, h]
                dq[b, i, h] = scale * ds @ kk
                dk[b, keys, g] += scale * ds[:, None] * q[b, i, h]
    return out, lse, dq, dk, dv


CASES = [
    dict(layout_kind="random", head_unit="query", group=2, block_q=8, block_k=8, seq_len_q=21, seq_len_k=30),
    dict(layout_kind="causal", head_unit="kv", group=4, block_q=1, block_k=4, seq_len_q=9, seq_len_k=23, dv=8),
    dict(layout_kind="top_k", head_unit="query", group=1, block_q=4, block_k=8, seq_len_q=13, seq_len_k=13,
         positions="permuted", segments=True, batch=2, layout_batch=1, causal=False),
    dict(layout_kind="window", head_unit="kv", group=2, block_q=16, block_k=4, seq_len_q=20, seq_len_k=9,
         segments=True, batch=2),
    dict(layout_kind="full", head_unit="kv", group=8, block_q=2, block_k=16, seq_len_q=5, seq_len_k=33,
         num_kv_heads=1, dqk=8, dv=24, dtype="bfloat16"),
    # Kernel windows: smaller than a block, with permuted positions and segments, wider than Tk.
    dict(layout_kind="window", head_unit="query", group=2, block_q=8, block_k=8, seq_len_q=19, seq_len_k=27,
         window=3),
    dict(layout_kind="random", head_unit="kv", group=2, block_q=4, block_k=4, seq_len_q=14, seq_len_k=14,
         positions="permuted", segments=True, batch=2, window=6),
    dict(layout_kind="full", head_unit="query", group=1, block_q=16, block_k=8, seq_len_q=10, seq_len_k=12,
         window=40),
]


@pytest.mark.parametrize("seed,params", list(enumerate(CASES)))
def test_reference_matches_naive_loop(seed, params):
    case = random_case(seed, **params)
    got = run_case("reference", case, False)
    want = naive(case)
    tol = 1e-5 if params.get("dtype", "float32") == "float32" else 1e-2
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        g = np.asarray(g, np.float64)
        if name == "lse":
            np.testing.assert_array_equal(np.isneginf(g), np.isneginf(w))
            g, w = np.where(np.isneginf(w), 0, g), np.where(np.isneginf(w), 0, w)
        scale = max(1.0, np.abs(w).max())
        assert np.abs(g - w).max() / scale <= tol, (name, np.abs(g - w).max(), scale)
