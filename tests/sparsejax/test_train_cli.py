"""train.py from the command line: a short run writes metrics.jsonl, TensorBoard files, config.json
and checkpoints; config errors exit non-zero with a message naming the key."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
        "--config.model.num_kv_heads=2", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
        "--config.data.seq_len=32", "--config.data.global_batch_size=4", "--config.data.max_documents=40"]


def run_train(*args, timeout=300):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "train.py", "--config=configs/dense_tiny.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_train_py_runs_and_writes_metrics(tmp_path):
    workdir = tmp_path / "tiny"
    result = run_train(f"--workdir={workdir}", *TINY, "--config.train.num_steps=6", "--config.train.log_every=2",
                       "--config.train.warmup_steps=2", "--config.train.eval_every=6",
                       "--config.train.eval_batches=1", "--config.train.checkpoint_every=3")
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    assert all(isinstance(r["loss"], float) and r["loss"] > 0 for r in train_records)
    assert [r["step"] for r in records if "eval_loss" in r] == [6]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    assert json.load(open(workdir / "config.json"))["train"]["num_steps"] == 6
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))
    assert "step 6/6" in result.stderr and "finished: completed at step 6" in result.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.train.learning_rate=-1.0", "config.train.learning_rate=-1.0"),
    ("--config.attention.kind=nonexistent", "'nonexistent'"),
    ("--config.train.no_such_key=1", "no_such_key"),
])
def test_config_errors_exit_nonzero_with_the_message(tmp_path, override, message):
    result = run_train(f"--workdir={tmp_path}", *TINY, override, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_workdir_is_an_error():
    result = run_train(*TINY, timeout=120)
    assert result.returncode != 0
    assert "no workdir" in result.stderr
