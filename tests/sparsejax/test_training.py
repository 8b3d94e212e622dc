"""Training: schedule, optimizer and loss against references written from the equations, FLOPs
accounting, config.train validation, gradient accumulation, sharded == unsharded, loss decreases."""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import dense_tiny
from sparsejax import training
from sparsejax.parallel.mesh import batch_sharding, make_mesh, rules_from_config
from sparsejax.training import metrics as metrics_lib
from sparsejax.training.optimizer import learning_rate_schedule, make_optimizer
from sparsejax.training.state import StateFactory
from sparsejax.training.step import cross_entropy_sum, make_global_batch, make_train_step


def tiny_config(**train) -> ml_collections.ConfigDict:
    """dense_tiny shrunk to a few thousand parameters (fast to compile on a 2-core CPU)."""
    config = dense_tiny.get_config()
    config.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64)
    config.data.update(seq_len=32, global_batch_size=8, max_documents=40)
    config.train.update(num_steps=8, warmup_steps=2, log_every=1, eval_every=0, checkpoint_every=0,
                        async_checkpointing=False)
    config.train.update(**train)
    return config


# ------------------------------------------------------------------------------- references

def test_schedule_matches_reference():
    train = training.default_config()
    train.update(learning_rate=2e-3, warmup_steps=5, num_steps=25, end_lr_ratio=0.1)
    schedule = learning_rate_schedule(train)
    for count in range(30):
        if count < 5:
            want = 2e-3 * (count + 1) / 5
        else:
            progress = min((count - 5) / 20, 1.0)
            want = 2e-4 + (2e-3 - 2e-4) * 0.5 * (1 + math.cos(math.pi * progress))
        np.testing.assert_allclose(float(schedule(count)), want, rtol=1e-6)


def test_optimizer_matches_reference_adamw():
    """Clipping + AdamW with decoupled weight decay on matrices only, two updates, vs numpy."""
    train = training.default_config()
    train.update(learning_rate=1e-2, warmup_steps=0, num_steps=10, end_lr_ratio=1.0, weight_decay=0.1,
                 b1=0.9, b2=0.95, eps=1e-8, grad_clip=0.5)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "scale": rng.normal(size=(3,)).astype(np.float32)}
    tx = make_optimizer(train)
    state = tx.init(jax.tree.map(jnp.asarray, params))
    p = jax.tree.map(jnp.asarray, params)
    ref = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v = {k: np.zeros_like(x) for k, x in ref.items()}
    for t in range(1, 3):
        grads = {"w": rng.normal(size=(4, 3)).astype(np.float32), "scale": rng.normal(size=(3,)).astype(np.float32)}
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, p)
        p = jax.tree.map(lambda a, b: a + b, p, updates)
        norm = math.sqrt(sum(float(np.sum(np.square(g.astype(np.float64)))) for g in grads.values()))
        factor = min(1.0, 0.5 / norm)
        for k in ref:
            g = grads[k].astype(np.float64) * factor
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.95 * v[k] + 0.05 * g * g
            step = (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.95 ** t)) + 1e-8)
            decay = 0.1 * ref[k] if ref[k].ndim >= 2 else 0.0
            ref[k] = ref[k] - 1e-2 * (step + decay)
    for k in ref:
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6)


def test_cross_entropy_matches_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(3, 5)).astype(np.int32)
    mask = (rng.random((3, 5)) > 0.3).astype(np.float32)
    total, count = cross_entropy_sum(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    x = logits.astype(np.float64)
    log_probs = x - x.max(-1, keepdims=True)
    log_probs = log_probs - np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(total), float(np.sum(nll * mask)), rtol=1e-5)
    assert float(count) == float(mask.sum())


# ------------------------------------------------------------------------------------ FLOPs

def test_matmul_flops_count_every_weight_matrix_once():
    """2 FLOPs per weight of every matrix a token passes through: all matrices except the embedding
    table, plus the LM head (the embedding table itself when tied)."""
    from sparsejax.model import Transformer
    from flax import nnx
    for tied in (True, False):
        config = tiny_config()
        config.model.tie_embeddings = tied
        abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
        flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))[0]
        weights = sum(x.size for path, x in flat if x.ndim >= 2 and "embed" not in jax.tree_util.keystr(path))
        if tied:
            weights += config.model.vocab_size * config.model.d_model
        assert metrics_lib.matmul_flops_per_token(config) == 2 * weights


def test_attention_flops_come_from_the_variant(monkeypatch):
    config = tiny_config()

    class Reporting:
        @staticmethod
        def attention_flops(cfg, seq_len):
            return 1000.0 * seq_len

    import sparsejax.attention as registry
    monkeypatch.setattr(registry, "get_attention", lambda kind: Reporting)
    per_token = metrics_lib.attention_flops_per_token(config)
    assert per_token == config.model.num_layers * 1000.0
    assert metrics_lib.train_flops_per_token(config) == 3 * (metrics_lib.matmul_flops_per_token(config) + per_token)

    class Silent:
        pass
    monkeypatch.setattr(registry, "get_attention", lambda kind: Silent)
    assert metrics_lib.train_flops_per_token(config) is None


def test_dense_causal_attention_flops_half_of_the_square():
    config = tiny_config()
    t, h, d = 64, config.model.num_heads, config.model.head_dim
    full = 2 * t * t * h * d * 2  # q.k^T and p.v over the whole T x T square
    assert metrics_lib.dense_causal_attention_flops(config, t) == full / 2


def test_peak_flops_table_and_override():
    class Device:
        def __init__(self, kind):
            self.device_kind = kind
    assert metrics_lib.peak_flops_per_device(Device("NVIDIA H200")) == 989e12
    assert metrics_lib.peak_flops_per_device(Device("NVIDIA H100 PCIe")) == 756e12
    assert metrics_lib.peak_flops_per_device(Device("TPU v5 lite")) == 197e12
    assert metrics_lib.peak_flops_per_device(Device("TPU v5p")) == 459e12
    assert metrics_lib.peak_flops_per_device(Device("cpu")) is None
    assert metrics_lib.peak_flops_per_device(Device("cpu"), override=5e11) == 5e11


# ------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("key, value, words", [
    ("num_steps", 0, "num_steps=0"),
    ("learning_rate", -1.0, "learning_rate=-1.0"),
    ("learning_rate", float("nan"), "learning_rate=nan"),
    ("warmup_steps", 100, "exceeds"),
    ("b2", 1.0, "b2=1.0"),
    ("grad_accum_steps", 3, "does not divide"),
    ("keep_checkpoints", True, "keep_checkpoints=True"),
    ("async_checkpointing", 1, "async_checkpointing=1"),
])
def test_train_config_errors_name_key_and_valid_values(key, value, words):
    config = tiny_config()
    config.train.num_steps = 8
    with config.train.ignore_type():
        config.train[key] = value
    with pytest.raises(ValueError, match="valid values") as info:
        training.validate(config)
    assert words in str(info.value)


def test_unknown_train_key_is_named():
    config = tiny_config()
    config.train.lerning_rate = 1.0
    with pytest.raises(ValueError, match="lerning_rate"):
        training.validate(config)


# -------------------------------------------------------------------- step, sharding, loop

def _losses(config, devices, batches, accum=1):
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.grad_accum_steps = accum
    mesh = make_mesh(config, devices)
    optimizer = make_optimizer(config.train)
    factory = StateFactory(config, mesh, optimizer)
    state = factory.create()
    sharding = batch_sharding(mesh, rules_from_config(config))
    step = make_train_step(config, factory.graphdef, optimizer, mesh, factory.shardings, sharding)
    losses = []
    with jax.set_mesh(mesh):
        for local in batches:
            state, metrics = step(state, make_global_batch(local, sharding, config.data.global_batch_size))
            losses.append(float(metrics["loss"]))
    return np.array(losses)


@pytest.fixture(scope="module")
def batches():
    from sparsejax.data import make_train_iterator
    iterator = make_train_iterator(tiny_config())
    return [next(iterator) for _ in range(4)]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_equals_unsharded_and_grad_accumulation(batches, scan_layers):
    """Same 4-step loss curve on 1 device, on 8 devices in several mesh shapes, and with 2 micro-batches;
    with unrolled and with scanned layers (the state initialiser gives the same parameters on 1 and 8
    devices in both layouts)."""
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py sets 8 fake CPU devices"
    one = tiny_config(learning_rate=1e-2)
    one.model.scan_layers = scan_layers
    one.mesh.update(data=1, fsdp=1, sequence=1, tensor=1)
    reference = _losses(one, devices[:1], batches)
    assert reference[-1] < reference[0]
    shapes = [dict(data=1, fsdp=8, sequence=1, tensor=1), dict(data=2, fsdp=2, sequence=1, tensor=2)]
    for shape in shapes:
        sharded = tiny_config(learning_rate=1e-2)
        sharded.model.scan_layers = scan_layers
        sharded.mesh.update(**shape)
        np.testing.assert_allclose(_losses(sharded, devices, batches), reference, rtol=2e-5, err_msg=str(shape))
    accumulated = tiny_config(learning_rate=1e-2)
    accumulated.model.scan_layers = scan_layers
    accumulated.mesh.update(data=2, fsdp=2, sequence=1, tensor=1)
    np.testing.assert_allclose(_losses(accumulated, devices[:4], batches, accum=2), reference, rtol=2e-5)


def test_loss_decreases_and_metrics_are_written(tmp_path):
    from sparsejax.training.loop import train
    config = tiny_config(num_steps=40, learning_rate=1e-2, warmup_steps=4, log_every=5, eval_every=20,
                         eval_batches=2, peak_flops_per_device=1e9)
    result = train(config, str(tmp_path))
    assert result.stopped_by == "completed" and result.step == 40
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_lines = [r for r in lines if "loss" in r]
    eval_lines = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in train_lines] == list(range(5, 41, 5))
    assert [r["step"] for r in eval_lines] == [20, 40]
    first, last = train_lines[0]["loss"], train_lines[-1]["loss"]
    assert last < first - 1.0, (first, last)
    assert eval_lines[-1]["eval_loss"] < eval_lines[0]["eval_loss"]
    assert all(r["tokens_per_sec"] > 0 and r["step_time"] > 0 for r in train_lines[1:])
    if metrics_lib.train_flops_per_token(config) is not None:  # the variant reports its FLOPs
        assert all(0 < r["mfu"] for r in train_lines[1:])
    assert os.listdir(tmp_path / "tensorboard")
    assert json.load(open(tmp_path / "config.json"))["train"]["num_steps"] == 40


def _tensorboard_events(directory) -> list:
    """Every event of the TFRecord event files in `directory` (length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event
    events = []
    for name in sorted(os.listdir(directory)):
        data = (directory / name).read_bytes()
        offset = 0
        while offset < len(data):
            length = int.from_bytes(data[offset:offset + 8], "little")
            events.append(Event.FromString(data[offset + 12:offset + 12 + length]))
            offset += 12 + length + 4
    return events


def test_resumed_metric_writer_purges_the_later_steps(tmp_path):
    """Resumed at step 3 after steps 1..5 were logged: metrics.jsonl keeps 1..3, and the new TensorBoard
    event file starts with a session START at step 4, so TensorBoard hides the old events of steps >= 4."""
    from tensorboardX.proto.event_pb2 import SessionLog
    writer = metrics_lib.MetricWriter(str(tmp_path))
    for step in range(1, 6):
        writer.write({"step": step, "loss": 1.0 / step}, tb_prefix="train/")
    writer.close()
    writer = metrics_lib.MetricWriter(str(tmp_path), resume_step=3)
    writer.write({"step": 4, "loss": 0.5}, tb_prefix="train/")
    writer.close()
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    events = _tensorboard_events(tmp_path / "tensorboard")
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == SessionLog.START]
    assert starts[-1:] == [4], starts
    last_start = max(i for i, e in enumerate(events) if e.HasField("session_log"))
    assert [e.step for e in events[last_start:] if e.HasField("summary")] == [4]
