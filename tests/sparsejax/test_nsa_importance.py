"""NSA's selection importance on the Pallas GPU kernel (`pallas_kernels.nsa_importance`, interpret mode on
CPU) against an independent float64 computation written from the paper: a dense softmax over the
visible compressed tokens, summed over the G query heads of each KV group, mapped to selection blocks by
Eq. 9 in its 1-based form. Then the fused kernel (scores, forced/impossible blocks and top-n in one pass)
through `select_blocks(implementation="pallas_gpu")` and `nsa_attention` against the XLA path and, exactly,
against top_blocks(block_scores(.)) of the unfused kernel's scores; the errors, and the lowering for CUDA
(Triton IR, no GPU)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pallas_kernels import nsa_importance
from pallas_kernels.nsa_importance import ImportanceConfig, check_supported, importance_scores, importance_topn
from sparsejax.attention.compressed import (block_scores, compressed_attention, compressed_segments, document_starts,
                                            select_blocks, top_blocks)
from sparsejax.attention.nsa import nsa_attention
from sparsejax.parallel import context, nsa_context
from sparsejax.parallel import mesh as mesh_lib
from test_nsa import SPEC, THETA, make_inputs, packed_segments

SMALL = ImportanceConfig(rows=16, block_n=16, num_warps=2, num_stages=1)   # many steps and query tiles


# ------------------------------------------------------------------------------------------ reference
def eq9_paper(p_cmp: np.ndarray, num_blocks: int, *, select_block: int, block: int, stride: int) -> np.ndarray:
    """Eq. 9 as printed, 1-based j and i: p_slc[j] = Σ_{m<l'/d} Σ_{n<l/d} p_cmp[(l'/d)·j − m − n]."""
    out = np.zeros(p_cmp.shape[:-1] + (num_blocks,))
    for j in range(1, num_blocks + 1):
        for m in range(select_block // stride):
            for n in range(block // stride):
                i = (select_block // stride) * j - m - n
                if 1 <= i <= p_cmp.shape[-1]:
                    out[..., j - 1] += p_cmp[..., i - 1]
    return out


def reference(q, kc, positions, q_seg, row_seg, *, block, stride, select_block, num_blocks):
    """float64 (p_slc [B, K, T, S], lse [B, H, T]) from a dense masked softmax over compressed tokens.

    Query t sits at row index positions[b, t] in document q_seg[b, t]; row_seg [B, T_row] are the
    documents of the row. Compressed token i (keys i·d .. i·d + l − 1 of the row) is visible once
    complete (i·d + l − 1 <= position) and only if all its keys lie in the query's document."""
    q, kc = np.asarray(q, np.float64), np.asarray(kc, np.float64)
    q_seg, row_seg = np.asarray(q_seg), np.asarray(row_seg)
    b, t, h, d = q.shape
    n, kv = kc.shape[1], kc.shape[2]
    g = h // kv
    logits = np.einsum("bthd,bnhd->bhtn", q, np.repeat(kc, g, axis=2)) / np.sqrt(d)
    keys = np.arange(n)[:, None] * stride + np.arange(block)[None, :]            # [N, l] keys of each token
    cmp_seg = np.array([[r[k][0] if (r[k] == r[k][0]).all() else -1 for k in keys] for r in row_seg],
                       dtype=np.int64).reshape(b, n)
    visible = ((np.arange(n) * stride + block - 1)[None, None, :] <= np.asarray(positions)[:, :, None]) & (
        cmp_seg[:, None, :] == q_seg[:, :, None])                                # [B, T, N]
    visible = np.broadcast_to(visible[:, None], logits.shape)
    masked = np.where(visible, logits, -np.inf)
    peak = masked.max(-1, keepdims=True, initial=-np.inf)
    e = np.where(visible, np.exp(masked - np.where(np.isfinite(peak), peak, 0.0)), 0.0)
    total = e.sum(-1)
    lse = np.where(total > 0, np.log(np.where(total > 0, total, 1.0)) + peak[..., 0], -np.inf)
    p = e / np.where(total > 0, total, 1.0)[..., None]
    p_group = p.reshape(b, kv, g, t, n).sum(2)
    return eq9_paper(p_group, num_blocks, select_block=select_block, block=block, stride=stride), lse


def random_case(seed, *, b=2, t=83, kv=2, g=4, d=32, block=8, stride=4, select_block=16, dtype=jnp.float32,
                segments=True, permuted=False):
    """Kernel arguments (q, k_cmp, lse, positions, q_segment_ids, kv_segment_ids) and the reference p_slc.
    Row 1 holds three documents and padding; `permuted`: queries at row indices in a random order."""
    rng = np.random.default_rng(seed)
    n = 0 if t < block else (t - block) // stride + 1
    q = jnp.asarray(rng.standard_normal((b, t, kv * g, d)), dtype)
    kc = jnp.asarray(rng.standard_normal((b, n, kv, d)), dtype)
    seg = np.ones((b, t), np.int32)
    if segments:
        cuts = np.sort(rng.choice(np.arange(5, t - 5), 3, replace=False))
        seg[1, cuts[0]:] = 2
        seg[1, cuts[1]:] = 3
        seg[1, cuts[2]:] = 0
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    if permuted:
        positions = np.stack([rng.permutation(t) for _ in range(b)]).astype(np.int32)
    q_seg = np.take_along_axis(seg, positions, axis=1)
    want, lse = reference(q, kc, positions, q_seg, seg, block=block, stride=stride, select_block=select_block,
                          num_blocks=-(-t // select_block))
    first, last = seg[:, : n * stride: stride], seg[:, block - 1: block - 1 + n * stride: stride]
    kv_seg = np.where(first == last, last, -1).astype(np.int32)
    args = (q, kc, jnp.asarray(lse, jnp.float32), jnp.asarray(positions), jnp.asarray(q_seg), jnp.asarray(kv_seg))
    return args, want


def run(args, *, block=8, stride=4, select_block=16, config=None, **kw):
    t = args[0].shape[1]
    fn = jax.jit(functools.partial(importance_scores, block=block, stride=stride, select_block=select_block,
                                   num_blocks=-(-t // select_block), interpret=True, config=config, **kw))
    return np.asarray(fn(*args))


def assert_close(got, want, tol=1e-4):
    assert got.shape == want.shape
    assert not np.isnan(got).any()
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err < tol, f"relative error {err:.2e} >= {tol}"


# ------------------------------------------------------------------------------------------ kernel
@pytest.mark.parametrize("g", [1, 2, 4, 16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference_gqa_and_dtypes(g, dtype):
    """T = 83: a multiple of neither the query tile, the step (15 blocks) nor l' = 16; packed documents
    and padding in row 1; early queries see no compressed token (lse = −inf)."""
    args, want = random_case(g, g=g, d=16 if g == 16 else 32, dtype=dtype)
    for config in (None, SMALL):
        assert_close(run(args, config=config), want)


def test_float16_mapping():
    """precise=False: one float16 dot maps and sums the probabilities (2^-11 relative)."""
    args, want = random_case(8, g=4)
    got = run(args, config=dataclasses.replace(SMALL, precise=False))
    assert_close(got, want, tol=3e-3)
    assert np.abs(got - want).max() > 0                 # the float16 rounding is there


@pytest.mark.parametrize("block, stride, select_block", [(8, 4, 16), (16, 16, 16), (16, 8, 16), (12, 4, 36),
                                                         (8, 8, 32), (32, 16, 64)])
def test_eq9_tile_edges_for_every_overlap(block, stride, select_block):
    """r = l'/d of 1, 2, 4 and 9 (not a power of two) and s = l/d of 1, 2, 3: look-back of s − 1 tokens
    across every step edge; steps of one block (r = 9, block_n = 16) and of many."""
    args, want = random_case(7, t=203, g=2, block=block, stride=stride, select_block=select_block)
    kw = dict(block=block, stride=stride, select_block=select_block)
    for config in (None, SMALL):
        if (16 - block // stride + 1) // (select_block // stride) < 1 and config is SMALL:
            config = dataclasses.replace(SMALL, block_n=32)
        assert_close(run(args, config=config, **kw), want)


def test_queries_in_any_row_order():
    """Sharded rows: the positions of a tile's queries are a permutation of the row; the causal bound is
    the tile's latest query, the mask per query."""
    args, want = random_case(3, t=96, g=4, permuted=True)
    for config in (None, SMALL):
        assert_close(run(args, config=config), want)


def test_chunk_of_rows_with_a_traced_start():
    """q_start (traced) / q_count: the rows of one chunk, rows past T give 0."""
    args, want = random_case(4, t=90, g=4)
    t, s = 90, -(-90 // 16)

    @jax.jit
    def chunk(start, *args):
        return importance_scores(*args, block=8, stride=4, select_block=16, num_blocks=s, q_start=start, q_count=32,
                                 interpret=True, config=SMALL)

    for start in (0, 32, 64):
        got = np.asarray(chunk(jnp.int32(start), *args))
        rows = want[:, :, start:start + 32]
        assert_close(got[:, :, :rows.shape[2]], rows)
        assert (got[:, :, rows.shape[2]:] == 0).all()


def test_no_compressed_token():
    """T < l: N = 0, every score 0."""
    args, want = random_case(5, t=6, g=2, segments=False)
    assert args[1].shape[1] == 0
    got = run(args)
    assert got.shape == (2, 2, 6, 1) and (got == 0).all() and (want == 0).all()


def test_a_band_without_look_back_fails(monkeypatch):
    """The comparison can fail: a kernel whose Eq. 9 band forgets the s − 1 look-back tokens (the
    compressed tokens that straddle a block's start) disagrees with the reference."""
    args, want = random_case(6, t=83, g=2)
    band = nsa_importance._eq9_band
    monkeypatch.setattr(nsa_importance, "_eq9_band", lambda g: band(dataclasses.replace(g, s=1)))
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(run(args, config=SMALL), want)


@pytest.mark.parametrize("change, message", [
    (dict(block=12, stride=8), "must divide block"),
    (dict(select_block=18), "must divide select_block"),
    (dict(block=32, select_block=16), "must be <= select_block"),
    (dict(k_dtype=jnp.float32), "one dtype"),
    (dict(d=40), "multiple of 16"),
    (dict(lse_dtype=jnp.bfloat16), "lse in float32"),
    (dict(kv=3), "H = G · K"),
    (dict(select_block=64, config=ImportanceConfig(block_n=16)), "cannot hold one"),
    (dict(lse_len=5), "lse has shape"),
])
def test_clear_errors(change, message):
    c = dict(block=8, stride=4, select_block=16, k_dtype=jnp.bfloat16, d=32, lse_dtype=jnp.float32, kv=2,
             config=None, lse_len=40)
    c.update(change)
    b, t, h = 1, 40, 4
    n = (t - c["block"]) // c["stride"] + 1 if c["stride"] <= c["block"] else 1
    q = jax.ShapeDtypeStruct((b, t, h, c["d"]), jnp.bfloat16)
    kc = jax.ShapeDtypeStruct((b, n, c["kv"], c["d"]), c["k_dtype"])
    lse = jax.ShapeDtypeStruct((b, h, c["lse_len"]), c["lse_dtype"])
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    with pytest.raises(ValueError, match=message):
        check_supported(q, kc, lse, ints(b, t), ints(b, t), ints(b, n), block=c["block"], stride=c["stride"],
                        select_block=c["select_block"], num_blocks=3, config=c["config"])


# ------------------------------------------------------------------------------------------ selection
def _selection_case(seed, g, t=150, dtype=jnp.float32, segments=True):
    kw = dict(block=8, stride=4, select_block=16)
    args, _ = random_case(seed, t=t, g=g, d=16, dtype=dtype, segments=segments)
    q, kc, _, _, seg, kv_seg = args
    if kc.shape[1] == 0:                                 # T < l: no compression branch, no lse
        return q, kc, None, seg, kw
    vc = jnp.asarray(np.random.default_rng(seed + 100).standard_normal(kc.shape), jnp.float32)
    _, lse = compressed_attention(q, kc, vc.astype(kc.dtype), seg, block_q=16, block_k=16, implementation="xla",
                                  **{k: kw[k] for k in ("block", "stride")})
    return q, kc, lse, seg, kw


def _clear_rows(q, kc, seg, sel):
    """[B, K, T] True where the float64 masked scores of the n-th and (n+1)-th block are not within 1e-3
    (both infinite counts as clear), so that float rounding cannot reorder the cut."""
    kw = {k: sel[k] for k in ("block", "stride", "select_block")}
    t = q.shape[1]
    p_slc, _ = reference(q, kc, np.broadcast_to(np.arange(t), q.shape[:2]), seg, seg,
                         num_blocks=-(-t // sel["select_block"]), **kw)
    scores = -np.sort(-_masked_scores(p_slc, np.asarray(seg), sel), axis=-1)
    n = sel["num_selected"]
    if n >= scores.shape[-1]:
        return np.ones(scores.shape[:-1], bool)
    with np.errstate(invalid="ignore"):                  # inf - inf (both forced) is nan: clear too
        return ~(scores[..., n - 1] - scores[..., n] < 1e-3)


def _both_selections(q, kc, lse, seg, sel, fused=True):
    run_impl = lambda impl: jax.jit(functools.partial(
        select_blocks, implementation=impl, interpret=impl == "pallas_gpu", fused_topn=fused and impl == "pallas_gpu",
        **sel))(q, kc, lse, seg)
    return [tuple(np.asarray(x) for x in run_impl(impl)) for impl in ("pallas_gpu", "xla")]


def assert_same_selection(q, kc, lse, seg, sel, min_clear=0.8, fused=True):
    """select_blocks on the Pallas kernel (fused with the top-n, or not) gives the XLA path's counts
    everywhere and its indices on every row without a near tie at the cut."""
    (idx_p, cnt_p), (idx_x, cnt_x) = _both_selections(q, kc, lse, seg, sel, fused=fused)
    assert idx_p.shape == idx_x.shape
    np.testing.assert_array_equal(cnt_p, cnt_x)
    clear = _clear_rows(q, kc, seg, sel)
    assert clear.mean() > min_clear
    np.testing.assert_array_equal(idx_p[clear], idx_x[clear])
    return cnt_x


SELECTIONS = (dict(num_selected=4, num_initial=1, num_local=2), dict(num_selected=8, num_initial=2, num_local=1))


@pytest.mark.parametrize("g", [1, 4, 16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_topn_gives_the_xla_selection(g, dtype):
    """select_blocks(implementation="pallas_gpu") (one kernel: scores, forced/impossible blocks, running
    top-n) against select_blocks(implementation="xla"): T = 150 (S = 10, not a multiple of l' = 16 nor of
    the 15-block step), packed documents and padding in row 1, n = 4 and n = 8 (documents with fewer
    valid blocks than n, so counts below n)."""
    q, kc, lse, seg, kw = _selection_case(20 + g, g, dtype=dtype)
    counts = [assert_same_selection(q, kc, lse, seg, dict(**sel, **kw)) for sel in SELECTIONS]
    assert (counts[1] < 8).any() and (counts[1] == 8).any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unfused_kernel_gives_the_xla_selection(dtype):
    """The unfused GPU path (fused_topn=False): the kernel's block scores per chunk of queries, then XLA's
    block_scores and top-n, select what the XLA path selects (G = 4, the fused test's case)."""
    q, kc, lse, seg, kw = _selection_case(24, 4, dtype=dtype)
    for sel in SELECTIONS:
        assert_same_selection(q, kc, lse, seg, dict(**sel, chunk_elements=2 * 2 * 48 * 10, **kw), fused=False)


def test_fused_topn_is_top_blocks_of_the_kernel_scores():
    """Exact, ties included: the fused kernel keeps what `top_blocks(block_scores(.))` keeps of the
    unfused kernel's p_slc (the same floats), for queries in a random row order (the sharded rows: a tile's
    first and last blocks come from its tokens, not from its place), two launch configurations."""
    args, _ = random_case(11, t=150, g=4, d=16, permuted=True)
    q, kc, lse, positions, q_seg, kv_seg = args
    row_seg = np.ones((2, 150), np.int32)
    np.put_along_axis(row_seg, np.asarray(positions), np.asarray(q_seg), axis=1)    # the rows' documents
    doc = jnp.take_along_axis(document_starts(jnp.asarray(row_seg)), positions, axis=1)
    kw = dict(block=8, stride=4, select_block=16, num_blocks=10)
    for sel in SELECTIONS:
        for config in (None, SMALL):
            p_slc = jax.jit(functools.partial(importance_scores, interpret=True, config=config, **kw))(*args)
            scores = jnp.concatenate([block_scores(p_slc[i:i + 1], positions[i], doc[i:i + 1], select_block=16,
                                                   num_initial=sel["num_initial"], num_local=sel["num_local"])
                                      for i in range(2)])
            want = top_blocks(scores, sel["num_selected"])
            got = jax.jit(functools.partial(importance_topn, interpret=True, config=config, **kw, **sel))(*args, doc)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])


def _padded(p_slc, nbt, width, junk):
    """p_slc [B, K, T, S] in the step layout [B, K, T, ⌈S/nbt⌉, width]; `junk` in every slot past a
    step's nbt blocks and past S (what `topn_of_scores` must not read)."""
    b, k, t, num_blocks = p_slc.shape
    steps = -(-num_blocks // nbt)
    x = jnp.pad(p_slc, ((0, 0),) * 3 + ((0, steps * nbt - num_blocks),), constant_values=junk)
    x = x.reshape(b, k, t, steps, nbt)
    return jnp.pad(x, ((0, 0),) * 4 + ((0, width - nbt),), constant_values=junk)


@pytest.mark.parametrize("nbt, width, tokens, span", [(3, 4, 16, 1), (3, 4, 16, 2), (15, 16, 32, 2)])
def test_topn_of_scores_is_top_blocks_of_block_scores(nbt, width, tokens, span):
    """Exact, ties included: `topn_of_scores` on step-padded scores keeps what
    `top_blocks(block_scores(.))` keeps: random scores with ties (two decimals) and zeros, packed
    documents, queries in a random row order, junk (+inf) in the slots it must skip; S = 37 (T = 300,
    l' = 8) so the last step is partial."""
    rng = np.random.default_rng(nbt + span)
    b, k, t, lp = 2, 3, 300, 8
    num_blocks = -(-t // lp)
    p_slc = np.round(rng.uniform(0, 1, (b, k, t, num_blocks)), 2) * (rng.uniform(size=(b, k, t, num_blocks)) > 0.2)
    p_slc = jnp.asarray(p_slc, jnp.float32)
    row_seg = np.repeat(np.array([[1] * 170 + [2] * 130, [1] * 40 + [2] * 200 + [3] * 60]), 1, axis=0)
    positions = jnp.asarray(np.stack([rng.permutation(t), np.arange(t)]), jnp.int32)
    doc = jnp.take_along_axis(document_starts(jnp.asarray(row_seg, jnp.int32)), positions, axis=1)
    for sel in SELECTIONS:
        scores = jnp.concatenate([block_scores(p_slc[i:i + 1], positions[i], doc[i:i + 1], select_block=lp,
                                               num_initial=sel["num_initial"], num_local=sel["num_local"])
                                  for i in range(b)])
        want = top_blocks(scores, sel["num_selected"])
        got = jax.jit(functools.partial(
            nsa_importance.topn_of_scores, nbt=nbt, select_block=lp, num_blocks=num_blocks, tokens=tokens,
            span=span, interpret=True, **sel))(_padded(p_slc, nbt, width, jnp.inf), positions, doc)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("change, message", [
    (dict(nbt=5), r"do not hold S=10 blocks in steps of nbt=5"),
    (dict(width=6, nbt=3), "must be powers of two"),
    (dict(num_selected=40), "takes 1 .. 32"),
])
def test_topn_of_scores_clear_errors(change, message):
    kw = dict(nbt=3, width=4, num_selected=4)
    kw.update(change)
    scores = jnp.zeros((1, 1, 20, 4, kw.pop("width")), jnp.float32)
    ints = jnp.zeros((1, 20), jnp.int32)
    with pytest.raises(ValueError, match=message):
        nsa_importance.topn_of_scores(scores, ints, ints, select_block=2, num_blocks=10, num_initial=1,
                                      num_local=1, **kw)


@pytest.mark.parametrize("t", [6, 12])
def test_fused_topn_before_any_compressed_token(t):
    """T < l' (one block): T = 6 < l has N = 0 (no key to read, lse None), T = 12 has compressed tokens
    that only the last queries see; both select the one block, as the XLA path does."""
    q, kc, lse, seg, kw = _selection_case(30, 4, t=t, segments=False)
    assert (kc.shape[1] == 0) == (t < kw["block"])
    for sel in SELECTIONS:
        counts = assert_same_selection(q, kc, lse, seg, dict(**sel, **kw), min_clear=0.99)
        assert (counts == 1).all()


def test_fused_topn_needs_the_forced_blocks(monkeypatch):
    """The comparison can fail: a kernel that forgets the forced blocks (scores as they come) selects
    other blocks than the XLA path."""
    q, kc, lse, seg, kw = _selection_case(21, 4)
    monkeypatch.setattr(nsa_importance, "selection_scores", functools.partial(
        lambda y, blocks, own, first, **_: jnp.where((blocks >= first) & (blocks <= own), y, -jnp.inf)))
    with pytest.raises(AssertionError):
        assert_same_selection(q, kc, lse, seg, dict(**SELECTIONS[0], **kw))


def test_large_n_takes_the_unfused_kernel():
    """n > MAX_SELECTED: the unfused kernel per chunk and XLA's top-n (every valid block at S = 10)."""
    q, kc, lse, seg, kw = _selection_case(22, 2)
    sel = dict(num_selected=nsa_importance.MAX_SELECTED + 1, num_initial=1, num_local=2, **kw)
    (idx_p, cnt_p), (idx_x, cnt_x) = _both_selections(q, kc, lse, seg, sel)
    np.testing.assert_array_equal(cnt_p, cnt_x)
    np.testing.assert_array_equal(idx_p, idx_x)


@pytest.mark.parametrize("change, message", [
    (dict(num_selected=0), "takes 1 .. 32"),
    (dict(num_selected=33), "takes 1 .. 32"),
    (dict(num_local=-1), "num_local=-1"),
    (dict(doc_shape=(1, 5)), "doc_starts must be integers of shape"),
])
def test_fused_topn_clear_errors(change, message):
    c = dict(num_selected=16, num_initial=1, num_local=2, doc_shape=(1, 40))
    c.update(change)
    doc = jax.ShapeDtypeStruct(c.pop("doc_shape"), jnp.int32)
    with pytest.raises(ValueError, match=message):
        nsa_importance.check_selection(doc, (1, 40), **c)


def _masked_scores(p_slc, seg, sel):
    """block_scores written out: +inf forced, −inf before the document or after the query's block."""
    t, ls = seg.shape[1], sel["select_block"]
    start = np.stack([[max(i for i in range(u + 1) if i == 0 or row[i] != row[i - 1]) for u in range(t)]
                      for row in seg])
    blocks = np.arange(p_slc.shape[-1])[None, None, :]
    own, first = (np.arange(t) // ls)[None, :, None], (start // ls)[:, :, None]
    valid = (blocks >= first) & (blocks <= own)
    forced = valid & ((blocks < first + sel["num_initial"]) | (blocks > own - sel["num_local"]))
    return np.where(forced[:, None], np.inf, np.where(valid[:, None], p_slc, -np.inf))


@pytest.mark.parametrize("fused", [False, True])
def test_nsa_attention_wires_the_kernel(fused):
    """nsa_attention with implementation="pallas_gpu" (every kernel interpreted; the importance kernel
    fused with the top-n or not) selects what the XLA implementation selects and gives the same output."""
    inputs = make_inputs(2, segment_ids=packed_segments())
    spec = dataclasses.replace(SPEC, implementation="pallas_gpu", interpret=True, fused_topn=fused)
    run_spec = lambda s: jax.jit(lambda x: nsa_attention(**x, spec=s, rope_theta=THETA))(inputs)
    (out_p, (idx_p, cnt_p)), (out_x, (idx_x, cnt_x)) = run_spec(spec), run_spec(SPEC)
    np.testing.assert_array_equal(cnt_p, cnt_x)
    np.testing.assert_array_equal(idx_p, idx_x)
    np.testing.assert_allclose(out_p, out_x, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_select_sharded_takes_the_kernel_with_the_compression_lse(fused):
    """Context parallelism (zigzag over 4 sequence shards × 2 batch shards): select_sharded on the kernel
    with the compression branch's lse selects what the unsharded XLA select_blocks selects."""
    b, t, h, kv, d = 2, 256, 4, 2, 16
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    kc = jnp.asarray(rng.standard_normal((b, (t - 8) // 4 + 1, kv, d)), jnp.float32)
    seg = np.ones((b, t), np.int32)
    seg[1, 90:], seg[1, 171:] = 2, 3
    seg = jnp.asarray(seg)
    kw = dict(block=8, stride=4, select_block=16)
    sel = dict(num_selected=4, num_initial=1, num_local=2, **kw)
    _, lse = compressed_attention(q, kc, kc, seg, block=8, stride=4, block_q=16, block_k=16, implementation="xla")
    want = jax.jit(functools.partial(select_blocks, implementation="xla", **sel))(q, kc, lse, seg)

    config = ml_collections.ConfigDict(dict(
        mesh=dict(data=2, fsdp=1, sequence=4, tensor=1), parallel=context.default_config(), data=dict(seq_len=t),
        attention=dict(kind="dense")))
    config.parallel.update(block_q=16, block_k=16)
    cp = dataclasses.replace(context.from_config(config), implementation="pallas_gpu", interpret=True)
    spec = dataclasses.replace(SPEC, compress_block=8, compress_stride=4, select_block=16, num_selected=4,
                               score_chunk_elements=2 * 2 * 24 * 16, fused_topn=fused)
    perm = cp.permutation(t)
    take = lambda x, axis=1: jnp.take(x, jnp.asarray(perm), axis=axis)
    kv_seg = compressed_segments(seg, kc.shape[1], 8, 4)
    with jax.set_mesh(mesh_lib.make_mesh(config)):
        idx, cnt = jax.jit(lambda *a: nsa_context.select_sharded(*a, spec=spec, cp=cp, lse=take(lse, 2)))(
            take(q), kc, kv_seg, take(seg), jnp.asarray(perm), take(document_starts(seg)))
    inverse = np.argsort(perm)
    idx, cnt = np.asarray(idx)[:, :, inverse], np.asarray(cnt)[:, :, inverse]
    np.testing.assert_array_equal(cnt, want[1])
    p_slc, _ = reference(q, kc, np.broadcast_to(np.arange(t), (b, t)), seg, seg, num_blocks=16, **kw)
    sorted_scores = -np.sort(-_masked_scores(p_slc, np.asarray(seg), sel), axis=-1)
    with np.errstate(invalid="ignore"):
        clear = ~(sorted_scores[..., 3] - sorted_scores[..., 4] < 1e-3)
    assert clear.mean() > 0.8
    np.testing.assert_array_equal(idx[clear], np.asarray(want[0])[clear])


def test_split_bfloat16_is_exact_hi_plus_rounded_rest():
    """split_bfloat16 (the importance kernels' hi + lo operands): hi is x's upper 16 bits exactly, lo the
    rest rounded to bfloat16, and hi + lo within 2^-16 of |x| (fresh random floats over 60 binades, both
    signs, zeros)."""
    rng = np.random.default_rng()
    x = (rng.uniform(1, 2, 4096) * 2.0 ** rng.integers(-40, 20, 4096) * rng.choice([-1, 1], 4096))
    x = np.concatenate([x, [0.0, -0.0, 1.0, 2.0 ** -20]]).astype(np.float32)
    hi, lo = jax.jit(nsa_importance.split_bfloat16)(jnp.asarray(x))
    assert hi.dtype == lo.dtype == jnp.bfloat16
    bits = x.view(np.uint32)
    np.testing.assert_array_equal(np.asarray(hi.astype(jnp.float32)).view(np.uint32), bits & 0xFFFF0000)
    rest = x - (bits & 0xFFFF0000).view(np.float32)
    np.testing.assert_array_equal(np.asarray(lo), rest.astype(jnp.bfloat16))
    err = np.abs(np.asarray(hi, np.float32).astype(np.float64) + np.asarray(lo, np.float32) - x)
    assert np.all(err <= 2.0 ** -16 * np.abs(x)), float(np.max(err / np.maximum(np.abs(x), 1e-30)))


def test_select_blocks_rejects_unknown_implementation():
    q, kc, lse, _, seg, _ = random_case(1, t=40, g=2)[0]
    with pytest.raises(ValueError, match="valid choices"):
        select_blocks(q, kc, lse, seg, block=8, stride=4, select_block=16, num_selected=4, num_initial=1,
                      num_local=2, implementation="pallas_tpu")


# ------------------------------------------------------------------------------------------ lowering
@pytest.mark.parametrize("config", [ImportanceConfig(128, 64, 4, 3), ImportanceConfig(256, 64, 8, 2),
                                    ImportanceConfig(128, 128, 8, 2, precise=False)])
def test_benchmark_configs_lower_for_cuda(config):
    """Launch configurations that benchmarks/nsa.py sweeps lower too (paper shapes, bf16), unfused and fused."""
    b, t, hq, hkv, d = 1, 2048, 64, 4, 128
    n = (t - 32) // 16 + 1
    shapes = [((b, t, hq, d), jnp.bfloat16), ((b, n, hkv, d), jnp.bfloat16), ((b, hq, t), jnp.float32),
              ((b, t), jnp.int32), ((b, t), jnp.int32), ((b, n), jnp.int32)]
    kw = dict(block=32, stride=16, select_block=64, num_blocks=t // 64, config=config)
    for fn, extra in ((functools.partial(importance_scores, **kw), []),
                      (functools.partial(importance_topn, num_selected=16, num_initial=1, num_local=2, **kw),
                       [((b, t), jnp.int32)])):
        lowered = jax.jit(fn).trace(*(jax.ShapeDtypeStruct(*x) for x in shapes + extra)).lower(
            lowering_platforms=("cuda",))
        assert lowered.as_text().count("xla.gpu.triton") == 1


@pytest.mark.parametrize("hq, hkv, d, dtype, n, fused", [(64, 4, 128, jnp.bfloat16, 16, True),
                                                         (64, 4, 128, jnp.bfloat16, 16, False),
                                                         (8, 8, 192, jnp.float32, 32, True),
                                                         (16, 4, 64, jnp.bfloat16, 48, True)])
def test_lowers_for_cuda_without_gpu(hq, hkv, d, dtype, n, fused):
    """select_blocks' kernel lowers to one Triton custom call for CUDA (Triton IR only: the PTX compile
    happens on the device, exercised by benchmarks/nsa.py --breakdown): the fused top-n at the paper's
    heads (G = 16, D = 128, bf16, n = 16) and at G = 1 (no group sum) with a chunked head dim in float32
    and n = 32; the unfused kernel in its chunk loop at the paper's heads (the default) and for n = 48
    (more than the fused kernel keeps)."""
    b, t = 1, 4096
    num_cmp = (t - 32) // 16 + 1
    q = jax.ShapeDtypeStruct((b, t, hq, d), dtype)
    kc = jax.ShapeDtypeStruct((b, num_cmp, hkv, d), dtype)
    lse = jax.ShapeDtypeStruct((b, hq, t), jnp.float32)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
    fn = functools.partial(select_blocks, block=32, stride=16, select_block=64, num_selected=n, num_initial=1,
                           num_local=2, implementation="pallas_gpu", chunk_elements=1 << 18, fused_topn=fused)
    lowered = jax.jit(fn).trace(q, kc, lse, seg).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 1


@pytest.mark.parametrize("t, chunks", [(4096, 1), (4000, 3)])
def test_takes_the_mosaic_scores_on_hopper(monkeypatch, t, chunks):
    """On a (faked) Hopper GPU the fused path runs the Mosaic GPU scores kernel and `topn_of_scores`,
    per chunk of queries (T = 4000 with a chunk budget of 1,500 queries' scores: 3 chunks of 1,408
    queries, the kernel's 128-query tiles, the last one overlapping), each traced once inside one
    `lax.map` loop however many chunks there are; G = 4 (not served by the Mosaic kernel) keeps the
    fused Triton kernel. Lowered for CUDA, no GPU."""
    from pallas_kernels import nsa_importance_mosaic
    from pallas_kernels.block_sparse import pallas_gpu
    monkeypatch.setattr(pallas_gpu, "on_hopper", lambda: True)
    b, d = 1, 128

    def lower(hq, hkv):
        num_cmp = (t - 32) // 16 + 1
        shapes = [((b, t, hq, d), jnp.bfloat16), ((b, num_cmp, hkv, d), jnp.bfloat16), ((b, hq, t), jnp.float32),
                  ((b, t), jnp.int32)]
        nbt = nsa_importance_mosaic.step_blocks(block=32, stride=16, select_block=64)
        slot = hkv * -(-(-(-t // 64)) // nbt) * max(16, 1 << (nbt - 1).bit_length())   # floats per query
        fn = functools.partial(select_blocks, block=32, stride=16, select_block=64, num_selected=16, num_initial=1,
                               num_local=2, implementation="pallas_gpu", fused_topn=True,
                               chunk_elements=(1500 if chunks > 1 else t) * slot)
        return jax.jit(fn).trace(*(jax.ShapeDtypeStruct(*x) for x in shapes)).lower(
            lowering_platforms=("cuda",)).as_text()

    calls = lambda text, target: text.count(f"stablehlo.custom_call @{target}(")   # noqa: E731
    text = lower(64, 4)
    assert calls(text, "mosaic_gpu_v2") == 1 and calls(text, "__gpu$xla.gpu.triton") == 1
    assert ("stablehlo.while" in text) == (chunks > 1)
    assert "nsa_topn_of_scores" in text and "nsa_importance_topn" not in text
    text = lower(16, 4)
    assert calls(text, "mosaic_gpu_v2") == 0 and calls(text, "__gpu$xla.gpu.triton") == 1
    assert "nsa_importance_topn" in text
