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


def run_train(*args, config="configs/dense_tiny.py", timeout=300):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "train.py", f"--config={config}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, message):
    """Exit status non-zero, one `error:` line containing `message`, no traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


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


def write_texts(directory, count):
    directory.mkdir()
    for i in range(count):
        (directory / f"book{i}.txt").write_text(f"Book {i}. " + "The quick brown fox jumps over the lazy dog. " * 20)


def test_data_paths_override_from_the_command_line(tmp_path):
    """README's `--config.data.paths='("/data/books/*.txt",)'`: the tuple override selects the files;
    a glob that matches nothing is a one-line error naming it."""
    write_texts(tmp_path / "books", 2)
    pattern = str(tmp_path / "books" / "*.txt")
    workdir = tmp_path / "run"
    result = run_train(f"--workdir={workdir}", *TINY, "--config.data.source=files",
                       f"--config.data.paths=('{pattern}',)", "--config.data.val_fraction=0.5",
                       "--config.train.num_steps=1", "--config.train.warmup_steps=1", "--config.train.eval_every=0")
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.load(open(workdir / "config.json"))["data"]
    assert (data["source"], data["paths"]) == ("files", [pattern])
    missing = str(tmp_path / "books" / "*.md")
    result = run_train(f"--workdir={tmp_path / 'other'}", *TINY, "--config.data.source=files",
                       f'--config.data.paths=("{missing}",)', timeout=120)
    assert_one_line_error(result, f"data.paths[0]={missing!r} matches no files")


@pytest.mark.parametrize("case", ["no_config_file", "config_argument", "workdir_is_a_file", "empty_sentencepiece",
                                  "text_as_array_record"])
def test_bad_inputs_are_one_line_errors(tmp_path, case):
    """Inputs that used to end in a traceback: each exits non-zero with one line naming the flag or key
    and the value."""
    config, args = "configs/dense_tiny.py", [f"--workdir={tmp_path / 'run'}", *TINY]
    if case == "no_config_file":
        config = "configs/nosuch.py"
        message = "invalid flag --config: [Errno 2] No such file or directory: 'configs/nosuch.py'"
    elif case == "config_argument":
        config, message = "configs/dense_tiny.py:bad", "--config=configs/dense_tiny.py:bad"
    elif case == "workdir_is_a_file":
        (tmp_path / "afile").write_text("")
        args[0] = f"--workdir={tmp_path / 'afile'}"
        message = f"--workdir={tmp_path / 'afile'} is not a directory"
    elif case == "empty_sentencepiece":
        (tmp_path / "empty.model").write_bytes(b"")
        args += ["--config.data.tokenizer=sentencepiece",
                 f"--config.data.sentencepiece_model={tmp_path / 'empty.model'}"]
        message = f"data.sentencepiece_model={str(tmp_path / 'empty.model')!r} is not a valid SentencePiece model"
    else:
        write_texts(tmp_path / "texts", 2)
        pattern = str(tmp_path / "texts" / "*.txt")
        args += ["--config.data.source=array_record", f"--config.data.paths=('{pattern}',)"]
        message = f"data.source='array_record' cannot read its documents from data.paths=({pattern!r},)"
    result = run_train(*args, config=config, timeout=120)
    assert_one_line_error(result, message)
    if case == "config_argument":
        assert "TypeError: get_config() takes 0 positional arguments but 1 was given" in result.stderr
    assert not (tmp_path / "run").exists()
