"""Mesh construction, logical-axis rules and sharded execution on 8 fake CPU devices: the sharded
forward pass and gradients equal the single-device ones, and parameters land where the rules say."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from configs import common
from sparsejax.model import Transformer
from sparsejax.parallel import mesh as mesh_lib


def small_config(num_kv_heads=2, scan_layers=False, **mesh):
    config = common.base_config()
    common.llama_model(config, d_model=32, num_layers=2 if scan_layers else 1, num_heads=4,
                       num_kv_heads=num_kv_heads, mlp_dim=64)
    common.update(config.model, vocab_size=64, tie_embeddings=False, scan_layers=scan_layers)
    common.update(config.mesh, **{"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1, **mesh})
    common.update(config.parallel, block_q=8, block_k=8)   # sequence > 1: ring blocks that fit T=32 (zigzag 2x2x8)
    return config


def batch(rng, b=8, t=32):
    ids = rng.integers(0, 64, size=(b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[:, 12:] = 2
    seg[::2, 28:] = 0
    pos = np.zeros((b, t), np.int32)
    for row in range(b):
        for s in np.unique(seg[row]):
            where = np.flatnonzero(seg[row] == s)
            pos[row, where] = np.arange(len(where))
    return ids, pos, seg


def test_make_mesh_axes_and_types():
    mesh = mesh_lib.make_mesh(small_config(data=2, fsdp=-1, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "sequence", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    one = mesh_lib.make_mesh(small_config(), devices=jax.devices()[:1])
    assert one.devices.size == 1


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="multiply to 4 but there are 8 devices"):
        mesh_lib.make_mesh(small_config(data=4))
    with pytest.raises(ValueError, match=r"-1 may be used for at most one axis"):
        mesh_lib.make_mesh(small_config(data=-1, tensor=-1))


def test_logical_to_spec():
    rules = mesh_lib.DEFAULT_RULES
    assert mesh_lib.logical_to_spec(("batch", "sequence", None), rules) == P(("data", "fsdp"), "sequence", None)
    assert mesh_lib.logical_to_spec(("embed", "heads", "head_dim"), rules) == P("fsdp", "tensor", None)
    with pytest.raises(ValueError, match=r"logical axis 'experts' has no sharding rule; known names: \[.*'batch'"):
        mesh_lib.logical_to_spec(("experts",), rules)
    with pytest.raises(ValueError, match=r"mesh axis 'tensor' is used by both logical axes 'heads' and 'mlp'"):
        mesh_lib.logical_to_spec(("heads", "mlp"), rules)
    mesh = mesh_lib.make_mesh(small_config(fsdp=2, tensor=4))
    with pytest.raises(ValueError, match=r"dimension 1 \('heads'\) of size 6 is not divisible by mesh axes \('tensor',\)"):
        mesh_lib.logical_to_sharding(("embed", "heads"), mesh, rules, shape=(32, 6))


def test_model_shardings_follow_the_rules():
    config = small_config(num_kv_heads=4, fsdp=2, tensor=4)
    mesh = mesh_lib.make_mesh(config)
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    shardings = nnx.to_pure_dict(mesh_lib.model_shardings(nnx.state(abstract), mesh, mesh_lib.DEFAULT_RULES))
    qkv = shardings["blocks"][0]["attention"]["qkv"]
    assert qkv["query"]["kernel"].spec == P("fsdp", "tensor", None)
    assert qkv["key"]["kernel"].spec == P("fsdp", "tensor", None)
    assert shardings["blocks"][0]["attention"]["out"]["proj"]["kernel"].spec == P("tensor", None, "fsdp")
    assert shardings["blocks"][0]["mlp"]["down"]["kernel"].spec == P("tensor", "fsdp")
    assert shardings["embed"]["embedding"].spec == P("tensor", "fsdp")
    assert shardings["lm_head"].spec == P("fsdp", "tensor")
    assert shardings["final_norm"]["scale"].spec == P(None)


def place(config, mesh):
    """Build the model on `mesh` through a jitted initialiser with the rules' out_shardings."""
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = mesh_lib.model_shardings(abstract_state, mesh, mesh_lib.rules_from_config(config))
    state = jax.jit(lambda: nnx.split(Transformer(config, rngs=nnx.Rngs(0)))[1], out_shardings=shardings)()
    return graphdef, state, shardings


def loss_and_grads(graphdef, state, ids, pos, seg):
    def loss_fn(state):
        logits, _ = nnx.merge(graphdef, state)(ids, pos, seg)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], axis=-1)[..., 0]
        return jnp.mean(nll), logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
    return loss, logits, grads


def run(config, devices, data):
    mesh = mesh_lib.make_mesh(config, devices=devices)
    rules = mesh_lib.rules_from_config(config)
    graphdef, state, shardings = place(config, mesh)
    data_sharding = mesh_lib.batch_sharding(mesh, rules)
    ids, pos, seg = (jax.device_put(x, data_sharding) for x in data)
    step = jax.jit(lambda s, a, b, c: loss_and_grads(graphdef, s, a, b, c),
                   in_shardings=(shardings, data_sharding, data_sharding, data_sharding),
                   out_shardings=(None, None, shardings))
    with jax.set_mesh(mesh):
        loss, logits, grads = step(state, ids, pos, seg)
    return state, loss, logits, grads


@pytest.fixture(scope="module")
def single_device_results():
    """Loss, logits and grads on one device, computed once per number of KV heads and layer layout."""
    cache = {}

    def get(kv_heads, scan_layers):
        if (kv_heads, scan_layers) not in cache:
            cache[kv_heads, scan_layers] = run(small_config(num_kv_heads=kv_heads, scan_layers=scan_layers),
                                               jax.devices()[:1], batch(np.random.default_rng(0)))[1:]
        return cache[kv_heads, scan_layers]
    return get


@pytest.mark.parametrize("mesh, scan_layers", [
    (dict(data=2, fsdp=2, tensor=2), False),
    (dict(fsdp=8), False),
    (dict(data=2, tensor=4), False),
    (dict(fsdp=2, sequence=2, tensor=2), False),
    (dict(data=2, fsdp=2, tensor=2), True),     # scanned layers: stacked params sharded likewise
    (dict(fsdp=2, sequence=2, tensor=2), True),
])
def test_sharded_equals_single_device(mesh, scan_layers, single_device_results):
    data = batch(np.random.default_rng(0))
    kv_heads = 4 if mesh.get("tensor") == 4 else 2
    loss1, logits1, grads1 = single_device_results(kv_heads, scan_layers)
    state, loss8, logits8, grads8 = run(small_config(num_kv_heads=kv_heads, scan_layers=scan_layers, **mesh),
                                        jax.devices(), data)
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(logits8), np.asarray(logits1), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    params = nnx.to_pure_dict(state)
    query = (params["layers"] if scan_layers else params["blocks"][0])["attention"]["qkv"]["query"]["kernel"]
    layer_axis = (None,) if scan_layers else ()
    expected = P(*layer_axis, "fsdp" if mesh.get("fsdp", 1) > 1 else None,
                 "tensor" if mesh.get("tensor", 1) > 1 else None, None)
    assert query.sharding.is_equivalent_to(jax.sharding.NamedSharding(query.sharding.mesh, expected), query.ndim)
