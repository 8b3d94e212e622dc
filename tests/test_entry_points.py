"""eval.py from the command line and the quick-start notebook, end to end on CPU at tiny sizes."""
import json
import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
        "--config.model.num_kv_heads=1", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
        "--config.data.seq_len=128", "--config.data.global_batch_size=2"]


def _run(args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_train_then_eval_cli(tmp_path):
    workdir = str(tmp_path / "run")
    train = _run(["train.py", "--config=configs/dense_tiny.py", f"--workdir={workdir}", *TINY,
                  "--config.train.num_steps=2", "--config.train.warmup_steps=1", "--config.train.eval_every=0"])
    assert train.returncode == 0, train.stderr[-3000:]
    evaluation = _run(["eval.py", "--config=configs/dense_tiny.py", f"--workdir={workdir}", *TINY,
                       "--config.eval.context_lengths=(512,)", "--config.eval.depths=(0.0,1.0)",
                       "--config.eval.samples_per_cell=1", "--config.eval.validation_batches=1"])
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    report = json.load(open(os.path.join(workdir, "eval", "report_2.json")))
    assert report["step"] == 2
    assert 0.0 < report["validation"]["bits_per_byte"] < 20.0
    for task in ("passkey", "needle"):
        acc = report["retrieval"][task]["accuracy"]
        assert len(acc) == 1 and len(acc[0]) == 2 and all(0.0 <= a <= 1.0 for a in acc[0])
    assert os.path.getsize(os.path.join(workdir, "eval", "retrieval_2.png")) > 1000
    summary = json.loads(evaluation.stdout[evaluation.stdout.index("{"):])
    assert summary["step"] == 2


def test_eval_cli_without_checkpoint_fails_clearly(tmp_path):
    result = _run(["eval.py", "--config=configs/dense_tiny.py", f"--workdir={tmp_path}", *TINY])
    assert result.returncode != 0
    assert "no complete checkpoint" in result.stderr


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEJAX_NOTEBOOK_STEPS", "3")
    monkeypatch.setenv("SPARSEJAX_NOTEBOOK_WORKDIR", str(tmp_path / "nb"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    nb.cells = [c for c in nb.cells if "install" not in c.metadata.get("tags", [])]
    # Jupyter starts the kernel in the notebook's own directory, not the repository root.
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "bits_per_byte" in outputs
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the loss curve and the retrieval heatmap


def test_eval_cli_bad_config_is_one_line(tmp_path):
    unknown = _run(["eval.py", "--config=configs/dense_tiny.py", f"--workdir={tmp_path}", "--config.eval.nope=1"])
    assert unknown.returncode != 0 and "unknown key 'nope'" in unknown.stderr and "Traceback" not in unknown.stderr
    bad = _run(["eval.py", "--config=configs/dense_tiny.py", f"--workdir={tmp_path}", "--config.eval.depths=(2.0,)"])
    assert bad.returncode != 0 and "config.eval.depths contains 2.0" in bad.stderr and "Traceback" not in bad.stderr
