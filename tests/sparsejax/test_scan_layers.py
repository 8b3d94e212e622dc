"""Scanned layers (`config.model.scan_layers`): the stacked model equals the unrolled model given its
unstacked parameters (logits, aux, loss and gradients, dense and NSA, every remat policy), the
stacked parameters are sharded like the unstacked ones plus a replicated leading axis, remat names
survive the scan body, and unsupported layers are refused."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import common
from sparsejax.model import REMAT_POLICIES, Transformer
from sparsejax.parallel import mesh as mesh_lib

LAYERS = 3


def small_config(kind="dense", **model):
    config = common.base_config()
    common.llama_model(config, d_model=32, num_layers=LAYERS, num_heads=4, num_kv_heads=2, mlp_dim=64)
    common.update(config.model, vocab_size=64, **model)
    config.attention.kind = kind
    if kind == "nsa":   # nsa_tiny's branch sizes, so the three branches differ at T = 64
        common.update(config.attention.nsa, compress_block=16, compress_stride=8, select_block=16, num_selected=3,
                      num_initial=1, num_local=1, window=16, window_block=16, compress_hidden=16,
                      compress_kernel_block_q=16, compress_kernel_block_k=16)
    return config


def unstack_layers(params: dict) -> dict:
    """Pure params of a scanned model (params["layers"] leaves [L, ...]) -> those of the unrolled model
    (params["blocks"][i] leaves [...])."""
    out = {k: v for k, v in params.items() if k != "layers"}
    num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    out["blocks"] = {i: jax.tree.map(lambda x: x[i], params["layers"]) for i in range(num_layers)}
    return out


def inputs(t=64):
    """One packed row of two documents and padding: ids, positions, segment_ids [1, t] int32."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 64, size=(1, t)).astype(np.int32)
    seg = np.where(np.arange(t) < 40, 1, np.where(np.arange(t) < t - 4, 2, 0))[None].astype(np.int32)
    pos = np.where(np.arange(t) < 40, np.arange(t), np.arange(t) - 40)[None].astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)


def loss_logits_aux_grads(graphdef, params, ids, pos, seg):
    def loss_fn(params):
        logits, aux = nnx.merge(graphdef, params)(ids, pos, seg)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], axis=-1)
        return jnp.mean(nll) + sum(v for k, v in aux.items() if k.startswith("loss/")), (logits, aux)
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


def split(model):
    graphdef, params = nnx.split(model)
    return graphdef, nnx.to_pure_dict(params)


@pytest.mark.parametrize("remat", list(REMAT_POLICIES))
@pytest.mark.parametrize("kind", ["dense", "nsa"])
def test_scanned_equals_unrolled_with_unstacked_params(kind, remat):
    scanned = Transformer(small_config(kind, remat=remat, scan_layers=True), rngs=nnx.Rngs(5))
    graphdef_s, params_s = split(scanned)
    assert set(params_s) >= {"layers"} and "blocks" not in params_s
    assert all(x.shape[0] == LAYERS for x in jax.tree.leaves(params_s["layers"]))
    graphdef_u, _ = split(nnx.eval_shape(lambda: Transformer(small_config(kind, remat=remat), rngs=nnx.Rngs(0))))
    params_u = unstack_layers(params_s)

    (loss_s, (logits_s, aux_s)), grads_s = loss_logits_aux_grads(graphdef_s, params_s, *inputs())
    (loss_u, (logits_u, aux_u)), grads_u = loss_logits_aux_grads(graphdef_u, params_u, *inputs())
    np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits_u), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss_s), float(loss_u), rtol=1e-6)
    assert set(aux_s) == set(aux_u) and (kind == "dense") == (not aux_s)
    for key in aux_s:
        np.testing.assert_allclose(float(aux_s[key]), float(aux_u[key]), rtol=1e-5, err_msg=key)
    grads_s = unstack_layers(grads_s)
    assert jax.tree.structure(grads_s) == jax.tree.structure(grads_u)
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(grads_s), jax.tree.leaves(grads_s),
                          jax.tree.leaves(grads_u)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=str(path[0]))


def _count(jaxpr, name: str) -> int:
    """Occurrences of primitive `name` in a closed jaxpr, nested jaxprs (scan, remat, ...) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count(sub, name)
    return n


@pytest.mark.parametrize("remat, top_k", [("dots", 2), ("dots_attention", 1)])
def test_remat_names_work_inside_the_scan_body(remat, top_k):
    """`dots_attention` saves NSA's tagged block selection in the scan body: the backward pass of the
    scanned model runs no second top-n (`dots` recomputes it)."""
    graphdef, params = split(Transformer(small_config("nsa", remat=remat, scan_layers=True), rngs=nnx.Rngs(0)))
    loss = lambda p: nnx.merge(graphdef, p)(*inputs())[0].sum()
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params)
    assert _count(jaxpr.jaxpr, "top_k") == top_k


def test_stacked_params_are_sharded_like_unstacked_with_a_replicated_layer_axis():
    config = small_config(num_kv_heads=4)
    common.update(config.mesh, data=1, fsdp=2, sequence=1, tensor=4)
    mesh = mesh_lib.make_mesh(config)
    rules = mesh_lib.rules_from_config(config)

    def shardings(scan_layers):
        config.model.scan_layers = scan_layers
        abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
        return nnx.to_pure_dict(mesh_lib.model_shardings(nnx.state(abstract), mesh, rules))

    stacked, unrolled = shardings(True), shardings(False)
    assert stacked["layers"]["attention"]["qkv"]["query"]["kernel"].spec == P(None, "fsdp", "tensor", None)
    for s, u in zip(jax.tree.leaves(stacked["layers"]), jax.tree.leaves(unrolled["blocks"][0])):
        assert s.spec == P(None, *u.spec)
    assert jax.tree.leaves(stacked["embed"]) == jax.tree.leaves(unrolled["embed"])


def test_layers_with_non_parameter_state_are_refused(monkeypatch):
    from sparsejax import attention
    from sparsejax.attention.dense import DenseAttention

    class Counting(DenseAttention):
        def __init__(self, config, *, rngs):
            super().__init__(config, rngs=rngs)
            self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

    monkeypatch.setitem(attention._REGISTRY, "counting", Counting)
    config = small_config(scan_layers=True)
    config.attention.kind = "counting"
    with pytest.raises(ValueError, match=r"scan_layers = True needs layers that hold only nnx.Param state.*"
                                         r"'counting'.*scan_layers = False"):
        Transformer(config, rngs=nnx.Rngs(0))



def test_the_layer_axis_cannot_be_sharded():
    from sparsejax import config as config_lib
    config = small_config(scan_layers=True)
    config.sharding_rules.layers = ("fsdp",)
    with pytest.raises(ValueError, match=r"sharding_rules.layers = \('fsdp',\): .* it must be \(\)"):
        config_lib.validate(config)
