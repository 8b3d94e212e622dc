"""Decoder LM and dense attention: shapes, causality, document isolation, RoPE, GQA, remat, and an
independent float32 reference of the whole forward pass written from the equations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from sparsejax.attention import dense, get_attention, registered_kinds
from sparsejax.layers import apply_rope
from sparsejax.model import Transformer, count_params


def small_config(**model):
    config = common.base_config()
    common.llama_model(config, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
    common.update(config.model, vocab_size=64, **model)
    return config


def packed_row_inputs(rng, lengths, total, vocab=64):
    """One row with documents of `lengths` then padding: (ids, positions, segment_ids) [1, total]."""
    ids = rng.integers(0, vocab, size=total).astype(np.int32)
    pos, seg = np.zeros(total, np.int32), np.zeros(total, np.int32)
    start = 0
    for s, n in enumerate(lengths, start=1):
        pos[start:start + n] = np.arange(n)
        seg[start:start + n] = s
        start += n
    pos[start:] = np.arange(total - start)
    return ids[None], pos[None], seg[None]


def forward(model, ids, pos, seg):
    return nnx.jit(lambda m, a, b, c: m(a, b, c))(model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg))


# ------------------------------------------------------------------ reference written from the equations

def ref_rope(x, positions, theta):
    """Rotation of pairs (i, i + D/2) as a complex product, float64 numpy. x [T, N, D], positions [T]."""
    d = x.shape[-1]
    freqs = theta ** (-np.arange(d // 2) * 2.0 / d)
    rot = np.exp(1j * positions[:, None, None] * freqs)                    # [T, 1, D/2]
    z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * rot
    return np.concatenate([z.real, z.imag], axis=-1)


def ref_forward(params, config, ids, pos, seg):
    """Whole-model forward in float64 numpy for one row: ids/pos/seg [T] -> logits [T, V]."""
    m = config.model
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)

    def norm(x, scale):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + m.norm_eps) * scale

    t = len(ids)
    x = p["embed"]["embedding"][ids]
    allowed = (np.arange(t)[None, :] <= np.arange(t)[:, None]) & (seg[:, None] == seg[None, :])
    g = m.num_heads // m.num_kv_heads
    for i in range(m.num_layers):
        b = p["blocks"][i]
        a = b["attention"]
        h = norm(x, b["attention_norm"]["scale"])
        q = ref_rope(np.einsum("te,ehd->thd", h, a["qkv"]["query"]["kernel"]), pos, m.rope_theta)
        k = ref_rope(np.einsum("te,ekd->tkd", h, a["qkv"]["key"]["kernel"]), pos, m.rope_theta)
        v = np.einsum("te,ekd->tkd", h, a["qkv"]["value"]["kernel"])
        out = np.zeros_like(q)
        for head in range(m.num_heads):
            s = q[:, head] @ k[:, head // g].T / np.sqrt(m.head_dim)
            s = np.where(allowed, s, -np.inf)
            w = np.exp(s - s.max(axis=1, keepdims=True))
            out[:, head] = (w / w.sum(axis=1, keepdims=True)) @ v[:, head // g]
        x = x + np.einsum("thd,hde->te", out, a["out"]["proj"]["kernel"])
        h = norm(x, b["mlp_norm"]["scale"])
        gate = h @ b["mlp"]["gate"]["kernel"]
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ b["mlp"]["up"]["kernel"])) @ b["mlp"]["down"]["kernel"]
    x = norm(x, p["final_norm"]["scale"])
    head = p["embed"]["embedding"].T if m.tie_embeddings else p["lm_head"]
    return x @ head


def params_dict(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("tie", [True, False])
def test_forward_matches_float64_reference(tie):
    config = small_config(tie_embeddings=tie)
    model = Transformer(config, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    ids, pos, seg = packed_row_inputs(rng, [9, 13, 5], 32)
    logits, aux = forward(model, ids, pos, seg)
    assert logits.shape == (1, 32, 64) and logits.dtype == jnp.float32 and aux == {}
    expected = ref_forward(params_dict(model), config, ids[0], pos[0], seg[0])
    np.testing.assert_allclose(np.asarray(logits[0]), expected, rtol=2e-4, atol=2e-4)


def test_bfloat16_compute_returns_float32_logits_close_to_float32():
    config = small_config()
    ids, pos, seg = packed_row_inputs(np.random.default_rng(1), [20, 12], 32)
    ref = forward(Transformer(config, rngs=nnx.Rngs(2)), ids, pos, seg)[0]
    config.model.dtype = "bfloat16"
    model = Transformer(config, rngs=nnx.Rngs(2))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logits = forward(model, ids, pos, seg)[0]
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=0.05)


def test_causality_future_tokens_never_change_past_logits():
    model = Transformer(small_config(), rngs=nnx.Rngs(3))
    rng = np.random.default_rng(2)
    ids, pos, seg = packed_row_inputs(rng, [32], 32)
    base = forward(model, ids, pos, seg)[0]
    for cut in (1, 10, 31):
        changed = ids.copy()
        changed[0, cut:] = rng.integers(0, 64, size=32 - cut)
        out = forward(model, changed, pos, seg)[0]
        np.testing.assert_array_equal(np.asarray(out[0, :cut]), np.asarray(base[0, :cut]))
        assert not np.allclose(np.asarray(out[0, cut:]), np.asarray(base[0, cut:]))


def test_documents_are_isolated_in_a_packed_row():
    model = Transformer(small_config(), rngs=nnx.Rngs(4))
    rng = np.random.default_rng(3)
    ids, pos, seg = packed_row_inputs(rng, [11, 14], 32)    # doc 1: 0..10, doc 2: 11..24, padding 25..31
    base = np.asarray(forward(model, ids, pos, seg)[0])
    changed = ids.copy()
    changed[0, 11:25] = rng.integers(0, 64, size=14)         # rewrite document 2 only
    out = np.asarray(forward(model, changed, pos, seg)[0])
    np.testing.assert_array_equal(out[0, :11], base[0, :11])
    np.testing.assert_array_equal(out[0, 25:], base[0, 25:])  # padding sees only padding
    # Document 2 packed after document 1 gives the same logits as document 2 alone at the row start.
    alone = np.asarray(forward(model, ids[:, 11:25], pos[:, 11:25], np.ones((1, 14), np.int32))[0])
    np.testing.assert_allclose(base[0, 11:25], alone[0], rtol=1e-5, atol=1e-5)


def test_rope_matches_complex_rotation_and_is_relative():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 7, 3, 16)).astype(np.float32)
    positions = rng.integers(0, 1000, size=(1, 7)).astype(np.int32)
    out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), 10000.0))
    np.testing.assert_allclose(out[0], ref_rope(x[0].astype(np.float64), positions[0], 10000.0), atol=2e-4)
    q, k = rng.standard_normal((2, 1, 1, 1, 16)).astype(np.float32)

    def score(m, n):
        rq = apply_rope(jnp.asarray(q), jnp.full((1, 1), m, jnp.int32), 10000.0)
        rk = apply_rope(jnp.asarray(k), jnp.full((1, 1), n, jnp.int32), 10000.0)
        return float(jnp.sum(rq * rk))

    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
    assert score(0, 0) == pytest.approx(float(np.sum(q * k)), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa_config = small_config()
    gqa = Transformer(gqa_config, rngs=nnx.Rngs(5))
    mha_config = small_config(num_kv_heads=4)
    mha = Transformer(mha_config, rngs=nnx.Rngs(6))
    group = 2
    params = params_dict(gqa)
    for block in params["blocks"].values():
        qkv = block["attention"]["qkv"]
        for name in ("key", "value"):
            qkv[name]["kernel"] = jnp.repeat(qkv[name]["kernel"], group, axis=1)   # [E, K, D] -> [E, H, D]
    nnx.update(mha, params)
    ids, pos, seg = packed_row_inputs(np.random.default_rng(5), [18, 14], 32)
    np.testing.assert_allclose(np.asarray(forward(gqa, ids, pos, seg)[0]),
                               np.asarray(forward(mha, ids, pos, seg)[0]), rtol=1e-5, atol=1e-5)


def loss_and_grads(model, ids, pos, seg):
    def loss_fn(m):
        logits, _ = m(ids, pos, seg)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], axis=-1))
    return nnx.jit(lambda m: nnx.value_and_grad(loss_fn)(m))(model)


def test_remat_policies_give_the_same_loss_and_grads():
    ids, pos, seg = map(jnp.asarray, packed_row_inputs(np.random.default_rng(6), [20, 12], 32))
    results = {}
    for remat in ("none", "full", "dots", "dots_attention"):
        model = Transformer(small_config(remat=remat), rngs=nnx.Rngs(7))
        results[remat] = loss_and_grads(model, ids, pos, seg)
    loss0, grads0 = results["none"]
    for remat in ("full", "dots", "dots_attention"):
        loss, grads = results[remat]
        np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_packed_segments_offsets_and_lengths():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0],
                       [1, 1, 1, 1, 1, 1, 1, 1],
                       [1, 2, 3, 4, 5, 6, 7, 0]], jnp.int32)
    offsets, lengths, count = dense.packed_segments(seg, 4)
    np.testing.assert_array_equal(count, [4, 1, 8])
    np.testing.assert_array_equal(offsets, [[0, 3, 5, 6, -1], [0, -1, -1, -1, -1], [0, 1, 2, 3, -1]])
    np.testing.assert_array_equal(lengths, [[3, 2, 1, 2], [8, -1, -1, -1], [1, 1, 1, 1]])


def reference_attention(q, k, v, seg):
    """Causal + segment attention in float64 numpy: q [B, T, H, D], k/v [B, T, K, D], seg [B, T]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group, t, d = q.shape[2] // k.shape[2], q.shape[1], q.shape[3]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    seg = np.asarray(seg)
    allowed = (np.arange(t)[None, :] <= np.arange(t)[:, None])[None] & (seg[:, :, None] == seg[:, None, :])
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    s = np.where(allowed[:, None], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", w / w.sum(-1, keepdims=True), v)


def attention_inputs(seed, b=2, t=24, h=4, kh=2, d=16, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, d)).astype(dtype)
    k, v = rng.standard_normal((2, b, t, kh, d)).astype(dtype)
    return q, k, v


SEGMENTS = np.array([[1] * 10 + [2] * 10 + [0] * 4, [3] * 24], np.int32)


def test_xla_attention_matches_reference_with_gqa_and_segments():
    q, k, v = attention_inputs(8)
    out, aux = dense.attend(*map(jnp.asarray, (q, k, v, SEGMENTS)), implementation="xla", max_segments=4)
    assert aux == {}
    np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v, SEGMENTS), rtol=1e-5, atol=1e-5)


def test_flash_segments_matches_reference():
    """The overflow path's wiring (layout, head units, segment ids), run through the kernel library's
    XLA implementation on CPU; on GPU the same call runs pallas_gpu."""
    q, k, v = attention_inputs(9, t=150)
    seg = np.repeat(np.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]], np.int32), 30, axis=1)
    out = dense.flash_segments(*map(jnp.asarray, (q, k, v, seg)), implementation="xla")
    np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v, seg), rtol=1e-4, atol=1e-4)


def test_implementation_resolution():
    assert dense.resolve_implementation("auto", jnp.bfloat16, 128, backend="gpu") == "cudnn"
    assert dense.resolve_implementation("auto", jnp.float32, 128, backend="gpu") == "xla"
    assert dense.resolve_implementation("auto", jnp.bfloat16, 128, backend="cpu") == "xla"
    assert dense.resolve_implementation("auto", jnp.bfloat16, 12, backend="gpu") == "xla"
    assert dense.resolve_implementation("xla", jnp.bfloat16, 128, backend="gpu") == "xla"
    with pytest.raises(ValueError, match="needs a GPU, bfloat16/float16 inputs and head_dim"):
        dense.resolve_implementation("cudnn", jnp.float32, 128, backend="gpu")
    with pytest.raises(ValueError, match="head_dim 512"):
        dense.resolve_implementation("cudnn", jnp.bfloat16, 512, backend="gpu")
    with pytest.raises(ValueError, match="valid choices"):
        dense.resolve_implementation("flash", jnp.float32, 128)


def test_registry():
    assert "dense" in registered_kinds()
    assert get_attention("dense") is dense.DenseAttention
    with pytest.raises(ValueError, match="registered kinds: .*dense"):
        get_attention("nope")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("rows, max_segments, branch", [
    ([[1] * 256, [0] * 256], 8, "single"),                           # one run per row: plain causal
    ([[1] * 100 + [2] * 60 + [3] * 60 + [0] * 36, [5] * 256], 8, "packed"),
    ([[1] * 100 + [2] * 60 + [3] * 60 + [0] * 36, [5] * 256], 2, "overflow"),   # 4 runs > 2
])
def test_cudnn_matches_float32_reference_forward_and_grads(rows, max_segments, branch):
    b, t, h, kh, d = 2, 256, 8, 2, 64
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in attention_inputs(10, b, t, h, kh, d))
    seg = jnp.asarray(np.array(rows, np.int32))
    weights = jnp.cos(jnp.arange(d, dtype=jnp.float32))

    def run(impl, dtype):
        def f(q, k, v):
            out, aux = dense.attend(q, k, v, seg, implementation=impl, max_segments=max_segments)
            return jnp.sum(out.astype(jnp.float32) * weights), (out, aux)
        args = [x.astype(dtype) for x in (q, k, v)]
        (_, (out, aux)), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(*args)
        return np.asarray(out, np.float32), aux, [np.asarray(g, np.float32) for g in grads]

    out_ref, _, grads_ref = run("xla", jnp.float32)     # the same bf16 values, computed in float32
    out, aux, grads = run("cudnn", jnp.bfloat16)
    assert float(aux["stats/dense_segment_overflow"]) == float(branch == "overflow")
    for name, got, want in [("out", out, out_ref), ("dq", grads[0], grads_ref[0]), ("dk", grads[1], grads_ref[1]),
                            ("dv", grads[2], grads_ref[2])]:
        err, scale = np.max(np.abs(got - want)), np.max(np.abs(want))
        assert err <= 2e-2 * scale + 1e-3, f"{branch}: {name} max error {err} vs max |ref| {scale}"


def test_initialisers_follow_llama():
    config = small_config(tie_embeddings=False)
    common.update(config.model, num_layers=8, d_model=256, num_heads=4, head_dim=64, mlp_dim=512, vocab_size=512)
    params = params_dict(Transformer(config, rngs=nnx.Rngs(11)))
    block = params["blocks"][0]
    out_std = 0.02 / np.sqrt(2 * 8)
    for name, x, std in [("embedding", params["embed"]["embedding"], 0.02),
                         ("query", block["attention"]["qkv"]["query"]["kernel"], 0.02),
                         ("gate", block["mlp"]["gate"]["kernel"], 0.02),
                         ("attention out", block["attention"]["out"]["proj"]["kernel"], out_std),
                         ("mlp down", block["mlp"]["down"]["kernel"], out_std),
                         ("lm_head", params["lm_head"], 256 ** -0.5)]:
        x = np.asarray(x)
        assert abs(x.std() / std - 1) < 0.03, (name, x.std(), std)
        assert np.abs(x).max() <= 3 * std / 0.98658764 + 1e-7, name      # truncated at 3 sigma
    np.testing.assert_array_equal(np.asarray(block["mlp_norm"]["scale"]), 1.0)


def test_dense_1b_parameter_count():
    from configs import dense_1b
    n = count_params(dense_1b.get_config())
    print(f"dense_1b parameters: {n:,}")
    assert 0.95e9 < n < 1.1e9


def test_dots_attention_policy_saves_tagged_selection_only(capsys):
    """`dots_attention` keeps values tagged "nsa_selection" (NSA's top-n blocks) and no other names."""
    from jax.ad_checkpoint import checkpoint_name, print_saved_residuals
    from sparsejax.model import REMAT_POLICIES

    def f(x):
        selection = checkpoint_name(jnp.sin(x) * 2, "nsa_selection")
        other = checkpoint_name(jnp.sin(x) * 3, "something_else")
        return jnp.sum(jnp.cos(selection) * x + jnp.cos(other))

    for remat, expect in (("dots", False), ("dots_attention", True)):
        print_saved_residuals(jax.checkpoint(f, policy=REMAT_POLICIES[remat]), jnp.ones(4))
        saved = capsys.readouterr().out
        assert ("nsa_selection" in saved) == expect, (remat, saved)
        assert "something_else" not in saved


def test_dots_attention_policy_saves_the_mosaic_gpu_forward():
    """The Hopper kernels (`plgpu.kernel`) appear as custom_vmap_call: `dots_attention` saves the
    forward's named (out, lse), so the gradient of a scanned layer runs 3 kernels (forward, dQ, dK/dV)
    where `dots` recomputes the forward (4); and the forward's outputs reach only the optimisation
    barrier, never the scan's saved residuals directly (XLA would clone the kernel for that write).
    Traced only: no GPU needed."""
    from pallas_kernels import BlockLayout
    from pallas_kernels.block_sparse import mosaic_gpu_bwd
    from sparsejax.model import REMAT_POLICIES
    from test_scan_layers import _count

    t = 256
    layout = BlockLayout.causal(t, t, block_q=128, block_k=128, num_head_units=2)
    pos = jnp.arange(t, dtype=jnp.int32)[None]

    def layer(x, w):
        q = (x * w).astype(jnp.bfloat16)
        out, _ = mosaic_gpu_bwd.attention(q, q, q, layout, pos, pos, sm_scale=0.1, causal=True)
        return x + jnp.sin(out.astype(jnp.float32)), None

    def kernel_users(jaxpr):
        """Primitive names of the eqns that read a custom_vmap_call's outputs, over nested jaxprs."""
        users, outs = [], set()
        for eqn in jaxpr.eqns:
            users += [eqn.primitive.name for v in eqn.invars if isinstance(v, jax.extend.core.Var) and v in outs]
            if eqn.primitive.name == "custom_vmap_call":
                outs.update(eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                users += kernel_users(sub)
        return users + ["<output>" for v in jaxpr.outvars if isinstance(v, jax.extend.core.Var) and v in outs]

    x, ws = jnp.zeros((1, t, 2, 128), jnp.float32), jnp.ones((3, 1, t, 2, 128), jnp.float32)
    for remat, kernels in (("dots", 4), ("dots_attention", 3)):
        body = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=False)
        loss = lambda x, ws: jnp.sum(jax.lax.scan(body, x, ws)[0])
        jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, ws).jaxpr
        assert _count(jaxpr, "custom_vmap_call") == kernels, remat
        users = kernel_users(jaxpr)
        forward_users = [u for u in users if u == "optimization_barrier"]
        assert forward_users and "<output>" not in users, (remat, users)