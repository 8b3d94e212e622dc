"""Training under context parallelism on 8 fake CPU devices: a train step (dense and NSA models,
packed documents) with the sequence sharded 4 ways equals the same step with sequence = 1 (losses,
gradient norms, updated parameters). The data boundary (balance permutation) runs inside the step."""
import jax
import numpy as np
import pytest

from sparsejax.parallel import mesh as mesh_lib


# ------------------------------------------------------------------------ training step, sequence = 4 vs 1
def _train(config, devices, batches):
    """Losses and gradient norms of consecutive train steps, and the final parameters (host numpy)."""
    from sparsejax.training.optimizer import make_optimizer
    from sparsejax.training.state import StateFactory
    from sparsejax.training.step import make_global_batch, make_train_step

    mesh = mesh_lib.make_mesh(config, devices)
    optimizer = make_optimizer(config.train)
    factory = StateFactory(config, mesh, optimizer)
    state = factory.create()
    sharding = mesh_lib.batch_sharding(mesh, mesh_lib.rules_from_config(config))
    step = make_train_step(config, factory.graphdef, optimizer, mesh, factory.shardings, sharding)
    losses = []
    with jax.set_mesh(mesh):
        for local in batches:
            state, metrics = step(state, make_global_batch(local, sharding, config.data.global_batch_size))
            losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return np.array(losses), jax.tree.map(np.asarray, state.params)


def tiny(kind, scan_layers=False, **mesh):
    from configs import dense_tiny, nsa_tiny
    config = (nsa_tiny if kind == "nsa" else dense_tiny).get_config()
    config.model.update(d_model=32, num_layers=2 if scan_layers else 1, num_heads=4, num_kv_heads=2, head_dim=8,
                        mlp_dim=64, scan_layers=scan_layers)
    # document_alignment 1: document boundaries at any offset, inside shards and across them
    config.data.update(seq_len=128, global_batch_size=2, max_documents=40, document_alignment=1)
    config.train.update(num_steps=2, warmup_steps=1, learning_rate=1e-2, log_every=1, eval_every=0,
                        checkpoint_every=0, async_checkpointing=False)
    if kind == "nsa":
        config.attention.nsa.update(compress_kernel_block_q=16, window=32, window_block=16)
    config.parallel.update(block_q=16, block_k=16, stripe_size=16)
    config.mesh.update(**{"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1, **mesh})
    return config


@pytest.fixture(scope="module")
def packed_batches():
    from sparsejax.data import make_train_iterator
    iterator = make_train_iterator(tiny("dense"))
    batches = [next(iterator) for _ in range(2)]
    assert (batches[0]["segment_ids"].max(1) > 1).any(), "the tiny batches should hold packed documents"
    return batches


@pytest.mark.parametrize("kind,scheme,bal,scan_layers", [
    ("dense", "ring", "zigzag", False), ("nsa", "ring", "striped", False),
    ("dense", "ring", "zigzag", True), ("nsa", "ring", "striped", True),   # shard_map inside the scan body
])
def test_train_step_sequence_4_equals_sequence_1(packed_batches, kind, scheme, bal, scan_layers):
    from sparsejax import config as config_lib
    devices = jax.devices()
    reference = tiny(kind, scan_layers, data=2)
    config_lib.validate(reference, 2)
    ref_losses, ref_params = _train(reference, devices[:2], packed_batches)
    parallel = tiny(kind, scan_layers, data=2, sequence=4)
    parallel.parallel.update(context_scheme=scheme, balance=bal)
    config_lib.validate(parallel, 8)
    losses, params = _train(parallel, devices, packed_batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    # Adam divides by the gradient's own scale, so a coordinate with a near-zero gradient moves by up to
    # lr = 1e-2 on float rounding alone (the ring's merges and XLA's CPU code order sums differently):
    # 2e-4 is 2% of one update. A wrong gradient moves whole tensors by a sizeable part of lr.
    for a, r in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, r, atol=2e-4, rtol=1e-4)


def test_a_sequence_sharded_step_outside_its_mesh_is_an_error(packed_batches):
    """Without `jax.set_mesh` the model would take its single-device path on the permuted batch and
    return a wrong loss: the data boundary refuses instead."""
    from sparsejax.training.optimizer import make_optimizer
    from sparsejax.training.state import StateFactory
    from sparsejax.training.step import make_global_batch, make_train_step

    config = tiny("dense", data=2, sequence=4)
    mesh = mesh_lib.make_mesh(config, jax.devices())
    optimizer = make_optimizer(config.train)
    factory = StateFactory(config, mesh, optimizer)
    sharding = mesh_lib.batch_sharding(mesh, mesh_lib.rules_from_config(config))
    step = make_train_step(config, factory.graphdef, optimizer, mesh, factory.shardings, sharding)
    batch = make_global_batch(packed_batches[0], sharding, config.data.global_batch_size)
    with pytest.raises(ValueError, match=r"mesh.sequence=4 devices, but no mesh with that sequence axis is set"):
        step(factory.create(), batch)


def test_nsa_1b_long_config_validates_for_four_devices():
    from configs import nsa_1b_long
    from sparsejax import config as config_lib
    config = nsa_1b_long.get_config()
    config_lib.validate(config, 4)
    assert config.data.seq_len == 1 << 20 and config.parallel.balance == "striped"
    config.data.seq_len = 1_000_000
    with pytest.raises(ValueError, match=r"seq_len = 1000000 .* divisible by sequence shards \* stripe = 4\*128 = 512"):
        config_lib.validate(config, 4)
