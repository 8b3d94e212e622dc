"""Multi-process training: two CPU processes on localhost (2 devices each, one 4-device mesh) run
train.py with explicit coordinator flags and train a tiny config; SIGTERM to one of them stops both
at the same step with a checkpoint (each process saves its own data-iterator position), and both
end with the same loss."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsejax import distributed

REPO = Path(__file__).resolve().parents[2]
TINY = ["--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
        "--config.model.num_kv_heads=2", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
        "--config.data.seq_len=32", "--config.data.global_batch_size=8", "--config.data.max_documents=40",
        "--config.train.num_steps=100000", "--config.train.warmup_steps=1", "--config.train.log_every=1",
        "--config.train.eval_every=4", "--config.train.eval_batches=1", "--config.train.checkpoint_every=2"]
FINISHED = re.compile(r"finished: preempted at step (\d+), loss ([0-9.eE+-]+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _read_losses(path: Path) -> dict[int, float]:
    losses = {}
    if path.exists():
        for line in open(path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in record:
                losses[record["step"]] = record["loss"]
    return losses


@pytest.mark.slow
def test_two_processes_train_and_stop_together(tmp_path):
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    processes = [
        subprocess.Popen([sys.executable, "train.py", "--config=configs/dense_tiny.py", f"--workdir={tmp_path}",
                          f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
                          *TINY], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = []
    try:
        deadline = time.monotonic() + 300
        while max(_read_losses(tmp_path / "metrics.jsonl"), default=0) < 5:
            assert time.monotonic() < deadline, "no progress to step 5"
            assert all(p.poll() is None for p in processes), [p.communicate()[1][-3000:] for p in processes]
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGTERM)  # one process only: both must stop at the same step
        for process in processes:
            outputs.append(process.communicate(timeout=120)[1])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    for i, (process, stderr) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"process {i}:\n{stderr[-4000:]}"
    assert "2 processes, 4 devices" in outputs[0], outputs[0][-2000:]
    finals = [FINISHED.search(stderr) for stderr in outputs]
    assert all(finals), [o[-2000:] for o in outputs]
    step = int(finals[0].group(1))
    assert int(finals[1].group(1)) == step >= 5
    assert finals[0].group(2) == finals[1].group(2)
    losses = _read_losses(tmp_path / "metrics.jsonl")
    assert sorted(losses) == list(range(1, step + 1))
    assert float(finals[0].group(2)) == losses[step]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records if "eval_loss" in r] == list(range(4, step + 1, 4))
    data = os.listdir(tmp_path / "checkpoints" / str(step) / "data")
    assert "process_0-of-2.json" in data and "process_1-of-2.json" in data


def test_launch_detection(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                 "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    assert distributed.maybe_initialize() is False
    assert distributed.maybe_initialize("localhost:1234", 1, 0) is False
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.maybe_initialize() is False
    assert calls == []
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.maybe_initialize() is True
    assert calls == [((), {})]
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
    assert distributed.maybe_initialize() is True
    assert len(calls) == 2


def test_incomplete_explicit_flags_are_an_error(monkeypatch):
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a, **k: None)
    with pytest.raises(ValueError, match="needs all of coordinator_address, num_processes and process_id"):
        distributed.maybe_initialize("localhost:1234", None, None)
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        distributed.maybe_initialize("localhost:1234", 2, 2)
