"""Load-balancing permutations (zigzag, striped) and the per-device, per-step balance report."""
import jax
import ml_collections
import numpy as np
import pytest

from sparsejax.parallel import balance, context
from sparsejax.parallel import mesh as mesh_lib


def test_zigzag_and_striped_examples():
    # 16 tokens, 2 shards: zigzag chunks of 4 -> shard 0 holds chunks 0 and 3, shard 1 chunks 1 and 2.
    np.testing.assert_array_equal(balance.permutation(16, 2, "zigzag"),
                                  [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    # stripes of 2 dealt round-robin over 2 shards.
    np.testing.assert_array_equal(balance.permutation(16, 2, "striped", stripe=2),
                                  [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15])
    np.testing.assert_array_equal(balance.permutation(16, 2, "none"), np.arange(16))


@pytest.mark.parametrize("scheme", balance.SCHEMES)
def test_permutation_properties(scheme):
    t, n, stripe = 1024, 4, 32
    perm = balance.permutation(t, n, scheme, stripe=stripe)
    assert sorted(perm.tolist()) == list(range(t))
    inv = balance.inverse(perm)
    np.testing.assert_array_equal(perm[inv], np.arange(t))
    for shard in perm.reshape(n, -1):               # each shard ascending in original order
        assert np.all(np.diff(shard) > 0)
    bperm = balance.block_permutation(perm, 32)
    np.testing.assert_array_equal(np.repeat(bperm * 32, 32) + np.tile(np.arange(32), t // 32), perm)


def test_block_permutation_rejects_split_blocks():
    perm = balance.permutation(64, 2, "striped", stripe=8)
    with pytest.raises(ValueError, match="not whole blocks of 16"):
        balance.block_permutation(perm, 16)


def test_permute_batch_roundtrip_and_errors():
    rng = np.random.default_rng(0)
    t = 64
    batch = {key: rng.integers(0, 9, size=(3, t)).astype(np.int32) for key in balance.BATCH_SEQUENCE_KEYS}
    batch["extra"] = np.arange(3)
    perm = balance.permutation(t, 4, "zigzag")
    out = balance.permute_batch(batch, perm)
    for key in balance.BATCH_SEQUENCE_KEYS:
        np.testing.assert_array_equal(out[key][:, 5], batch[key][:, perm[5]])
        np.testing.assert_array_equal(balance.unpermute(out[key], perm), batch[key])
    assert out["extra"] is batch["extra"]
    with pytest.raises(ValueError, match=r"batch lacks \['loss_mask'\]"):
        balance.permute_batch({k: v for k, v in batch.items() if k != "loss_mask"}, perm)


def test_check_errors():
    with pytest.raises(ValueError, match=r"balance scheme 'spiral' is not one of \('zigzag', 'striped', 'none'\)"):
        balance.check(64, 2, "spiral", stripe=8, block=8)
    with pytest.raises(ValueError, match=r"zigzag balance needs seq_len divisible by .* = 64; got seq_len=96"):
        balance.check(96, 4, "zigzag", stripe=8, block=8)
    with pytest.raises(ValueError, match=r"striped balance needs seq_len divisible by sequence shards \* stripe = 4\*16 = 64"):
        balance.check(96, 4, "striped", stripe=16, block=8)
    with pytest.raises(ValueError, match=r"sequence sharding needs seq_len divisible by .* = 32; got seq_len=48"):
        balance.check(48, 4, "none", stripe=8, block=8)


@pytest.fixture(scope="module")
def reports():
    """Balance reports of dense causal attention, one document of 1024 tokens, 4 shards, blocks of 16."""
    t, block = 1024, 16
    config = ml_collections.ConfigDict(dict(
        mesh=dict(data=2, fsdp=1, sequence=4, tensor=1),
        parallel=dict(context_scheme="ring", balance="zigzag", stripe_size=block, inner_ring_size=0, block_q=block,
                      block_k=block, implementation="auto"),
        data=dict(seq_len=t), attention=dict(kind="dense")))
    context.validate(config)
    cp = context.from_config(config)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t))
    seg = np.ones((2, t), np.int32)
    report = jax.jit(lambda p, s: cp.block_counts(p, s, num_kv_heads=2))     # one compile for every permutation
    out = {}
    with jax.set_mesh(mesh_lib.make_mesh(config)):
        for bal in balance.SCHEMES:
            perm = balance.permutation(t, 4, bal, stripe=block)
            out[bal] = np.asarray(report(balance.permute(pos, perm), balance.permute(seg, perm)))
    return out


@pytest.mark.parametrize("bal", ["zigzag", "striped", "none"])
def test_balance_report_dense_causal(reports, bal):
    counts = reports[bal]
    assert counts.shape == (4, 4)                    # [devices, ring steps]
    nb = 1024 // 16
    assert counts.sum() == 2 * 2 * nb * (nb + 1) // 2  # batch x head units x causal blocks: nothing lost or repeated
    per_device = counts.sum(1)
    ratio = per_device.max() / per_device.mean()
    if bal == "none":
        assert ratio > 1.5                           # contiguous shards: the last device does most of the work
        assert counts[0, 1:].sum() == 0              # device 0 never sees a visible later shard
    else:
        assert ratio <= 1.1
        step_ratio = counts.max(0) / counts.mean(0)   # per step too: nobody waits at the ppermute
        assert step_ratio.max() <= 1.35
