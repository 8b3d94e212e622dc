"""NSA: the fast path (`nsa.py`, `compressed.py`, through `block_sparse_attention`) against the float32
reference written from the equations (`nsa_reference.py`), and the properties the paper requires."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sparsejax.attention import get_attention
from sparsejax.attention import nsa as nsa_lib
from sparsejax.attention.compressed import (CompressionParams, block_importance, compress, compressed_attention,
                                            overlap_weights, select_blocks)
from sparsejax.attention.nsa import NSASpec, nsa_attention, window_attention
from sparsejax.attention.nsa_reference import eq9_matrix, nsa_reference, reference_compress

# Small but with every branch distinct: T=100 is not a multiple of l'=16; the window (32) has far
# edges; n=4 blocks out of 7 per token; G=2 query heads per KV group.
SPEC = NSASpec(compress_block=8, compress_stride=4, select_block=16, num_selected=4, num_initial=1, num_local=2,
               window=32, window_block=16, compress_kernel_block_q=16, compress_kernel_block_k=16)
THETA = 10000.0
B, T, H, KV, D, F = 2, 100, 4, 2, 16, 32


def make_inputs(seed, t=T, segment_ids=None, scale=1.0):
    ks = jax.random.split(jax.random.key(seed), 20)
    r = lambda i, shape, s=1.0: s * jax.random.normal(ks[i], shape, jnp.float32)
    l = SPEC.compress_block
    cp = lambda o: CompressionParams(r(o, (l, D), 0.1), r(o + 1, (l, D, F), (l * D) ** -0.5), r(o + 2, (F,), 0.1),
                                     r(o + 3, (F, D), F ** -0.5), r(o + 4, (D,), 0.1))
    if segment_ids is None:
        segment_ids = jnp.ones((B, t), jnp.int32)
    return dict(q=r(0, (B, t, H, D), scale), k_cmp=r(1, (B, t, KV, D), scale), v_cmp=r(2, (B, t, KV, D)),
                k_slc=r(3, (B, t, KV, D), scale), v_slc=r(4, (B, t, KV, D)), k_win=r(5, (B, t, KV, D), scale),
                v_win=r(6, (B, t, KV, D)), gates=jax.nn.sigmoid(r(7, (B, t, H, 3))), compress_k=cp(8),
                compress_v=cp(13), rope_positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t)),
                segment_ids=jnp.asarray(segment_ids, jnp.int32))


def packed_segments(t=T):
    """Row 0: one document. Row 1: documents of 37 and 53 tokens, then 10 padding tokens."""
    seg = np.ones((B, t), np.int32)
    seg[1, 37:] = 2
    seg[1, 90:] = 0
    return seg


@functools.partial(jax.jit, static_argnames="spec")
def fast(inputs, spec=SPEC):
    return nsa_attention(**inputs, spec=spec, rope_theta=THETA)


@functools.partial(jax.jit, static_argnames="spec")
def reference(inputs, spec=SPEC):
    return nsa_reference(**inputs, spec=spec, rope_theta=THETA)


def selection_mask(indices, counts, num_blocks):
    used = jnp.arange(indices.shape[-1]) < counts[..., None]
    return (jax.nn.one_hot(indices, num_blocks, dtype=jnp.int32) * used[..., None]).sum(-2) > 0


INTEGER_INPUTS = ("rope_positions", "segment_ids")


def grads(attention, inputs, cotangent):
    """Gradients of sum(out * cotangent) with respect to every float input."""
    ints = {k: inputs[k] for k in INTEGER_INPUTS}
    floats = {k: v for k, v in inputs.items() if k not in INTEGER_INPUTS}
    return jax.grad(lambda f: (attention({**f, **ints})[0].astype(jnp.float32) * cotangent).sum())(floats)


fast_grads = jax.jit(functools.partial(grads, fast))


# ------------------------------------------------------------------------------------------ pieces
@pytest.mark.parametrize("l,d,ls", [(8, 4, 16), (32, 16, 64), (16, 16, 16), (16, 8, 16), (12, 4, 36)])
def test_eq9_mapping_matches_the_paper_indexing(l, d, ls):
    n, s = 41, 9
    p = jax.random.uniform(jax.random.key(1), (3, n))
    fast_map = block_importance(p, s, select_block=ls, block=l, stride=d)
    np.testing.assert_allclose(fast_map, p @ eq9_matrix(n, s, select_block=ls, block=l, stride=d), rtol=1e-6)
    assert sum(overlap_weights(ls, l, d)) == (ls // d) * (l // d)


def test_eq9_weights_are_overlaps():
    """With l=32, d=16, l'=64, block j gets compressed tokens 4j-1 (half inside, weight 1), 4j..4j+2
    (inside, weight 2) and 4j+3 (half, weight 1): the overlap in units of d."""
    m = eq9_matrix(20, 4, select_block=64, block=32, stride=16)
    np.testing.assert_array_equal(m[:, 2], [0] * 7 + [1, 2, 2, 2, 1] + [0] * 8)
    np.testing.assert_array_equal(m[:, 0], [2, 2, 2, 1] + [0] * 16)
    # l = l' = d: the identity (p_slc = p_cmp).
    np.testing.assert_array_equal(eq9_matrix(5, 5, select_block=16, block=16, stride=16), np.eye(5))


def test_compression_matches_explicit_blocks():
    t = 37                                                 # T - l not a multiple of d
    inputs = make_inputs(3, t=t)
    got = jax.jit(functools.partial(compress, block=8, stride=4))(inputs["k_cmp"], inputs["compress_k"])
    want = jax.jit(functools.partial(reference_compress, block=8, stride=4, activation="silu"))(
        inputs["k_cmp"], inputs["compress_k"])
    assert got.shape == (B, (t - 8) // 4 + 1, KV, D)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_importance_pass_chunking_does_not_change_the_selection():
    inputs = make_inputs(4, segment_ids=packed_segments())
    l, d = SPEC.compress_block, SPEC.compress_stride
    kc = compress(inputs["k_cmp"], inputs["compress_k"], block=l, stride=d)
    vc = compress(inputs["v_cmp"], inputs["compress_v"], block=l, stride=d)
    _, lse = compressed_attention(inputs["q"], kc, vc, inputs["segment_ids"], block=l, stride=d, block_q=16,
                                  block_k=16)
    kw = dict(block=l, stride=d, select_block=16, num_selected=4, num_initial=1, num_local=2)
    run = lambda chunk: jax.jit(functools.partial(select_blocks, chunk_elements=chunk, **kw))(
        inputs["q"], kc, lse, inputs["segment_ids"])
    whole, chunked = run(1 << 30), run(B * H * 23 * 7)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)


def test_window_is_exact_at_its_far_edge():
    """t - w < j <= t exactly, for every offset of t inside a block (one call with the kernel's window=)."""
    t, w = 70, 32
    ks = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(ks[0], (1, t, 2, 16))
    k = jax.random.normal(ks[1], (1, t, 1, 16))
    v = jax.random.normal(ks[2], (1, t, 1, 16))
    seg = jnp.ones((1, t), jnp.int32)
    got = jax.jit(functools.partial(window_attention, window=w, block=16))(q, k, v, seg)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    logits = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, 2, 2)) / 4.0
    p = jax.nn.softmax(jnp.where((j <= i) & (j > i - w), logits, -jnp.inf), axis=-1)
    want = jnp.einsum("bhts,bshd->bthd", p, jnp.repeat(v, 2, 2))
    np.testing.assert_allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------------------------------ fast vs reference
def test_matches_reference_outputs_selection_and_gradients():
    inputs = make_inputs(0, segment_ids=packed_segments())
    out, (indices, counts) = fast(inputs)
    want, selected = reference(inputs)
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(selection_mask(indices, counts, selected.shape[-1]), selected)

    cot = jax.random.normal(jax.random.key(9), out.shape)
    g_fast = fast_grads(inputs, cot)
    g_ref = grads(reference, inputs, cot)
    for path, a in jax.tree_util.tree_leaves_with_path(g_fast):
        if jnp.issubdtype(a.dtype, jnp.floating):
            b = jax.tree_util.tree_leaves(g_ref)[[p for p, _ in jax.tree_util.tree_leaves_with_path(g_ref)].index(path)]
            assert bool(jnp.isfinite(a).all()), path
            np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-4, err_msg=jax.tree_util.keystr(path))
    assert float(jnp.abs(g_fast["compress_k"].w1).max()) > 0     # gradients reach the compression MLP


def test_sequence_shorter_than_a_compression_block():
    """T < l: no compressed token at all; the one selection block is forced; never NaN."""
    inputs = make_inputs(1, t=6)
    out, (indices, counts) = fast(inputs)
    want, selected = reference(inputs)
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(counts, 1)
    np.testing.assert_array_equal(selection_mask(indices, counts, 1), selected)


# ------------------------------------------------------------------------------------------ properties
def test_causal_through_selection():
    """Changing every input at positions >= t0 leaves outputs and selections before t0 unchanged."""
    t0 = 61
    a = make_inputs(2)
    b = make_inputs(12)
    mixed = dict(a)
    for name in ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"):
        mixed[name] = a[name].at[:, t0:].set(b[name][:, t0:] * 3.0)
    out_a, (idx_a, cnt_a) = fast(a)
    out_m, (idx_m, cnt_m) = fast(mixed)
    np.testing.assert_array_equal(out_a[:, :t0], out_m[:, :t0])
    np.testing.assert_array_equal(idx_a[:, :, :t0], idx_m[:, :, :t0])
    assert not np.allclose(out_a[:, t0:], out_m[:, t0:])


def test_forced_blocks_always_selected_and_never_a_future_block():
    seg = packed_segments()
    inputs = make_inputs(6, segment_ids=seg)
    _, (indices, counts) = fast(inputs)
    sel = np.asarray(selection_mask(indices, counts, -(-T // 16)))                  # [B, K, T, S]
    starts = np.array([[max(s for s in range(t + 1) if s == 0 or seg[b, s] != seg[b, s - 1]) for t in range(T)]
                       for b in range(B)])
    for b in range(B):
        for t in range(T):
            own, first = t // 16, starts[b, t] // 16
            blocks = set(np.flatnonzero(sel[b, 0, t]))
            assert all(first <= j <= own for j in blocks), (b, t, blocks)
            assert {first, own} | ({own - 1} if own - 1 >= first else set()) <= blocks, (b, t, blocks)
            assert len(blocks) == min(SPEC.num_selected, own - first + 1)
    np.testing.assert_array_equal(counts, sel.sum(-1))


def test_gqa_group_shares_one_selection_from_summed_probabilities():
    """The selection is per KV group ([B, K, T, n]) and equals top-n of the group-summed probabilities
    (the reference sums per-head probabilities explicitly); a head-0-only change moves the group's choice."""
    inputs = make_inputs(7)
    _, (indices, counts) = fast(inputs)
    assert indices.shape[:3] == (B, KV, T)
    _, selected = reference(inputs)
    np.testing.assert_array_equal(selection_mask(indices, counts, selected.shape[-1]), selected)
    changed = dict(inputs, q=inputs["q"].at[:, :, 0].multiply(8.0))               # head 0 of group 0 only
    _, (idx2, cnt2) = fast(changed)
    assert not np.array_equal(np.asarray(idx2[:, 0]), np.asarray(indices[:, 0]))
    np.testing.assert_array_equal(idx2[:, 1], indices[:, 1])


def test_packed_documents_do_not_see_each_other():
    seg = packed_segments()
    a = make_inputs(8, segment_ids=seg)
    b = make_inputs(18, segment_ids=seg)
    first_doc = slice(0, 37)
    second_doc = slice(37, 90)
    # Replace document 1 of row 1 entirely: document 2's outputs must not move, and vice versa.
    for changed, kept in ((first_doc, second_doc), (second_doc, first_doc)):
        mixed = dict(a)
        for name in ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"):
            mixed[name] = a[name].at[1, changed].set(b[name][1, changed])
        out_a, _ = fast(a)
        out_m, _ = fast(mixed)
        np.testing.assert_allclose(out_a[1, kept], out_m[1, kept], atol=1e-6)
        np.testing.assert_array_equal(out_a[0], out_m[0])


@pytest.mark.parametrize("attention", [fast, reference])
def test_a_document_on_the_selection_grid_gives_the_outputs_it_has_alone(attention):
    """A packed document that starts at a multiple of l' (after another document and segment-0 filler,
    as the packer aligns them) gets the outputs it gets alone at offset 0: the same compressed tokens,
    selection blocks and window. Started off the grid (offset 41), it does not."""
    doc, ls = 40, SPEC.select_block
    alone = make_inputs(21, segment_ids=np.where(np.arange(T) < doc, 1, 0)[None].repeat(B, 0))
    alone["rope_positions"] = jnp.where(jnp.arange(T) < doc, jnp.arange(T), 0)[None].repeat(B, 0).astype(jnp.int32)
    want = attention(alone)[0][0, :doc]
    for start, aligned in ((3 * ls, True), (41, False)):
        seg = np.zeros((B, T), np.int32)
        seg[:, :37], seg[:, start:start + doc] = 1, 2                # filler (segment 0) in between
        packed = dict(make_inputs(22, segment_ids=seg), compress_k=alone["compress_k"],
                      compress_v=alone["compress_v"])
        for name in ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"):
            packed[name] = packed[name].at[:, start:start + doc].set(alone[name][:, :doc])
        packed["rope_positions"] = packed["rope_positions"].at[:, start:start + doc].set(jnp.arange(doc))
        got = attention(packed)[0][0, start:start + doc]
        if aligned:
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
        else:
            assert float(jnp.abs(got - want).max()) > 1e-2


def test_compressed_segments_need_every_token_of_the_block():
    """Ids need not be monotonic (filler 0 between documents): a block is in a document only if all
    its tokens are; first and last alone would put block [0, 2, 2, 0] in segment 0."""
    from sparsejax.attention.compressed import compressed_segments
    seg = jnp.asarray([[1, 1, 1, 1, 0, 2, 2, 0, 0, 0, 0, 0]], jnp.int32)
    np.testing.assert_array_equal(compressed_segments(seg, 5, 4, 2), [[1, -1, -1, -1, 0]])


def test_never_nan_with_padding_rows_and_extreme_logits():
    seg = packed_segments()
    seg[0] = 0                                                                     # a row of padding only
    inputs = make_inputs(11, segment_ids=seg, scale=30.0)
    out, _ = fast(inputs)
    assert bool(jnp.isfinite(out).all())
    g = fast_grads(inputs, jnp.ones(out.shape))
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(g))


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs,match", [
    (dict(compress_block=24, compress_stride=16), "must divide compress_block"),
    (dict(select_block=40), "must divide select_block"),
    (dict(compress_block=128), "must be <= select_block"),
    (dict(num_selected=2), "num_initial \\+ num_local = 3"),
    (dict(window=500), "window_block = 128 must divide window = 500"),
    (dict(num_local=0), "num_local = 0"),
    (dict(window=0), "window = 0"),
    (dict(implementation="cuda"), "valid choices"),
])
def test_bad_hyperparameters_give_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NSASpec(**kwargs)


def tiny_config(**nsa):
    from configs import common
    config = common.base_config()
    common.llama_model(config, d_model=64, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=128, dtype="float32")
    config.attention.kind = "nsa"
    common.update(config.attention.nsa, compress_block=8, compress_stride=4, select_block=16, num_selected=4,
                  window=32, window_block=16, compress_hidden=32, compress_kernel_block_q=16,
                  compress_kernel_block_k=16, gate_hidden=16)
    common.update(config.attention.nsa, **nsa)
    return config


def test_validate_names_bad_values():
    config = tiny_config()
    nsa_lib.validate(config)
    config.model.num_kv_heads = 3
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        nsa_lib.validate(config)
    with pytest.raises(ValueError, match="gate_bias_init"):
        nsa_lib.validate(tiny_config(gate_bias_init=(0.0, 1.0)))
    with pytest.raises(ValueError, match="compress_activation"):
        nsa_lib.validate(tiny_config(compress_activation="tanh"))


# ------------------------------------------------------------------------------------------ module
def test_registered_module_forward_backward_and_statistics():
    config = tiny_config()
    cls = get_attention("nsa")
    assert cls is nsa_lib.NSAAttention
    layer = cls(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 40, 64))
    positions = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (2, 40))
    seg = jnp.ones((2, 40), jnp.int32)

    @nnx.jit
    def run(layer, x):
        def loss(layer):
            out, aux = layer(x, positions, seg)
            return (out ** 2).mean(), (out, aux)
        return nnx.value_and_grad(loss, has_aux=True)(layer)

    (_, (out, aux)), grads = run(layer, x)
    assert out.shape == x.shape and bool(jnp.isfinite(out).all())
    leaves = jax.tree_util.tree_leaves(nnx.state(grads, nnx.Param))
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert all(float(jnp.abs(g).max()) > 0 for g in leaves)
    # keys per query: window min(32, t+1), compressed floor((t-7)/4)+1, selected <= 4 blocks of 16.
    t = np.arange(40)
    np.testing.assert_allclose(aux["stats/nsa_keys_win"], np.minimum(32, t + 1).mean(), rtol=1e-6)
    np.testing.assert_allclose(aux["stats/nsa_keys_cmp"], np.maximum((t - 7) // 4 + 1, 0).mean(), rtol=1e-6)
    np.testing.assert_allclose(aux["stats/nsa_keys_slc"], (t + 1).mean(), rtol=1e-6)   # 3 blocks <= n: all
    np.testing.assert_allclose(aux["stats/nsa_selected_density"], 1.0, rtol=1e-6)


def test_gate_statistics_are_means_over_real_tokens():
    """Padding (and the packer's filler) is segment 0: the gate means skip it, as the key counts do."""
    layer = get_attention("nsa")(tiny_config(), rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (2, 40, 64))
    x = x.at[1, 25:].multiply(100.0)                # padding far from the real tokens' gate values
    positions = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (2, 40))
    seg = jnp.ones((2, 40), jnp.int32).at[1, 25:].set(0)
    _, aux = layer(x, positions, seg)
    gates = np.asarray(layer.gate(x), np.float32).mean(-1)          # [B, T, 3], mean over heads
    real = np.asarray(seg) > 0
    for i, name in enumerate(nsa_lib.BRANCHES):
        np.testing.assert_allclose(aux[f"stats/nsa_gate_{name}"], gates[..., i][real].mean(), atol=5e-4)
        assert abs(float(aux[f"stats/nsa_gate_{name}"]) - gates[..., i].mean()) > 2e-3   # padding differs


def test_attention_flops_fall_below_dense_at_long_context():
    from configs import common
    config = common.base_config()
    common.llama_model(config, d_model=2048, num_layers=1, num_heads=16, num_kv_heads=1, mlp_dim=4096)
    config.attention.kind = "nsa"
    for t, at_most in ((8192, 0.6), (65536, 0.2)):
        dense = 2.0 * t * t * 16 * 128                     # causal half of scores + values
        ratio = nsa_lib.NSAAttention.attention_flops(config, t) / dense
        assert 0.0 < ratio < at_most, (t, ratio)
