"""Checkpoints: round trip, exact resume, damaged and partial checkpoints, a diverged loss, a stop on
SIGTERM after the step in flight, the config changes a resume accepts, refuses or warns about, and
train.py killed with SIGKILL in the middle of a save, resumed, then stopped with SIGTERM."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from configs import dense_tiny
from sparsejax.parallel.mesh import batch_sharding, make_mesh, rules_from_config
from sparsejax.training import metrics as metrics_lib
from sparsejax.training.checkpoint import Checkpointer, CheckpointError
from sparsejax.training.loop import TrainingDivergedError, train
from sparsejax.training.optimizer import make_optimizer
from sparsejax.training.state import StateFactory
from sparsejax.training.step import make_global_batch, make_train_step

REPO = Path(__file__).resolve().parents[2]

TINY = dict(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64)


def tiny_config(**train) -> ml_collections.ConfigDict:
    config = dense_tiny.get_config()
    config.model.update(**TINY)
    config.data.update(seq_len=32, global_batch_size=8, max_documents=40)
    config.mesh.update(data=1, fsdp=-1, sequence=1, tensor=1)
    config.train.update(num_steps=6, warmup_steps=2, log_every=1, eval_every=0, checkpoint_every=0,
                        keep_checkpoints=3)
    config.train.update(**train)
    return config


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The runs of this module compile the same steps again and again: share them on disk."""
    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])


def read_metrics(workdir) -> dict[int, dict]:
    records = {}
    for line in open(Path(workdir) / "metrics.jsonl"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # empty, or cut short by a kill
            continue
        if "loss" in record:
            records[record["step"]] = record
    return records


def test_round_trip_restores_state_and_data_position(tmp_path):
    from sparsejax.data import make_train_iterator
    config = tiny_config()
    mesh = make_mesh(config)
    optimizer = make_optimizer(config.train)
    factory = StateFactory(config, mesh, optimizer)
    sharding = batch_sharding(mesh, rules_from_config(config))
    step_fn = make_train_step(config, factory.graphdef, optimizer, mesh, factory.shardings, sharding)
    state = factory.create()
    iterator = make_train_iterator(config)
    with jax.set_mesh(mesh):
        for _ in range(2):
            state, _ = step_fn(state, make_global_batch(next(iterator), sharding, 8))
    checkpointer = Checkpointer(str(tmp_path), keep=2, async_save=True)
    checkpointer.save(2, state, iterator, config)
    checkpointer.wait()
    expected_next = next(iterator)

    fresh_iterator = make_train_iterator(config)
    restored = checkpointer.restore(2, factory.abstract_with_shardings(), fresh_iterator)
    assert int(restored.step) == 2
    flat, tree = jax.tree.flatten(state.to_dict())
    flat_r, tree_r = jax.tree.flatten(restored.to_dict())
    assert tree == tree_r
    for a, b in zip(flat, flat_r):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == b.sharding
    got_next = next(fresh_iterator)
    for key in expected_next:
        np.testing.assert_array_equal(got_next[key], expected_next[key])
    assert checkpointer.saved_config(2)["model"]["d_model"] == 32
    checkpointer.close()

    # Evaluation restores the state alone, read-only: an unfinished save next to it is left alone.
    in_progress = tmp_path / "3.orbax-checkpoint-tmp-99"
    in_progress.mkdir()
    reader = Checkpointer(str(tmp_path), keep=2, async_save=False, read_only=True)
    assert reader.all_steps() == [2]
    params_only = reader.restore_state(2, factory.abstract_with_shardings())
    reader.close()
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params_only.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    time.sleep(0.5)
    assert in_progress.exists()


def test_exact_resume_and_damaged_checkpoints(tmp_path):
    """An uninterrupted run vs a run resumed from its step-3 checkpoint: identical losses, bitwise.
    Then a damaged latest checkpoint gives a clear error and nothing is deleted."""
    config = tiny_config(checkpoint_every=3)
    full = tmp_path / "full"
    assert train(config, str(full)).step == 6
    reference = read_metrics(full)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    assert sorted(int(p) for p in os.listdir(full / "checkpoints")) == [3, 6]

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "3", resumed / "checkpoints" / "3")
    result = train(config, str(resumed))
    assert result.step == 6 and result.last_checkpoint == 6
    again = read_metrics(resumed)
    assert sorted(again) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "grad_norm", "param_norm", "learning_rate"):
            assert again[step][key] == reference[step][key], (step, key)

    # A finished run restarted on its workdir does no further step.
    assert train(config, str(resumed)).step == 6

    # Damage the newest checkpoint: a clear error naming it and the way out; nothing deleted.
    state_dir = resumed / "checkpoints" / "6" / "state"
    for path in state_dir.rglob("*"):
        if path.is_file() and ("ocdbt" in path.name or path.parent.name == "d"):
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"checkpoints/6 is corrupt.*resume from step 3"):
        train(config, str(resumed))
    assert sorted(os.listdir(resumed / "checkpoints")) == ["3", "6"]

    # A checkpoint of a different model is refused by name, and the run's config.json is left as it was.
    saved_config = (full / "config.json").read_bytes()
    other = tiny_config(checkpoint_every=3)
    other.model.mlp_dim = 128
    with pytest.raises(CheckpointError, match="config.model.mlp_dim was 64, now 128"):
        train(other, str(full))
    assert (full / "config.json").read_bytes() == saved_config
    # Another variant's hyper-parameters do not describe this (dense) model: the run resumes.
    unrelated = tiny_config(checkpoint_every=3)
    unrelated.attention.nsa.window = 1024
    assert train(unrelated, str(full)).step == 6
    # Nor do the remat policy and the compute dtype (parameters are stored in param_dtype).
    recomputed = tiny_config(checkpoint_every=3)
    recomputed.model.update(remat="full", dtype="bfloat16")
    assert train(recomputed, str(full)).step == 6
    assert json.load(open(full / "config.json"))["model"]["remat"] == "full"


def test_partial_checkpoint_is_ignored_and_cleaned(tmp_path):
    """A step directory left unfinished (orbax's temporary name, as after a kill mid-save) is
    neither listed nor restored, and the next manager removes it."""
    config = tiny_config(checkpoint_every=2, num_steps=2)
    assert train(config, str(tmp_path)).step == 2
    partial = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_text("half written")
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=3, async_save=False)
    assert checkpointer.all_steps() == [2]
    checkpointer.close()
    deadline = time.monotonic() + 20  # the clean-up runs in a background thread
    while partial.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not partial.exists()


def test_diverged_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(learning_rate=1e30, warmup_steps=0, checkpoint_every=1, num_steps=6)
    with pytest.raises(TrainingDivergedError) as info:
        train(config, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    bad = records[-1]
    assert bad["error"] == "non-finite"
    step = bad["step"]
    assert f"training diverged at step {step}" in str(info.value)
    saved = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
    assert saved and saved[-1] == step - 1
    assert f"last good checkpoint is step {step - 1}" in str(info.value)


def test_sigterm_stops_after_the_step_in_flight_and_resumes_exactly(tmp_path, monkeypatch):
    """SIGTERM arriving during step 3 (sent when its metrics are written): step 3 is the last, its
    checkpoint is saved, no step 4 is dispatched; the resumed run repeats an uninterrupted one."""
    config = tiny_config()
    assert train(config, str(tmp_path / "reference")).step == 6
    reference = read_metrics(tmp_path / "reference")

    write, sent = metrics_lib.MetricWriter.write, []

    def write_then_signal(self, record, tb_prefix=""):
        write(self, record, tb_prefix)
        if record["step"] == 3 and not sent:
            sent.append(os.getpid())
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(metrics_lib.MetricWriter, "write", write_then_signal)
    workdir = tmp_path / "preempted"
    result = train(config, str(workdir))
    assert (result.stopped_by, result.step, result.last_checkpoint) == ("preempted", 3, 3)
    assert sorted(read_metrics(workdir)) == [1, 2, 3]
    assert os.listdir(workdir / "checkpoints") == ["3"]

    result = train(config, str(workdir))
    assert (result.stopped_by, result.step) == ("completed", 6)
    resumed = read_metrics(workdir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step]["loss"] == reference[step]["loss"], step


def test_training_changes_are_warnings_on_resume(tmp_path, caplog):
    """Changes that alter the training that follows (the schedule's num_steps, the data pipeline of the
    restored iterator) are logged as a warning naming the keys and values; the rest at INFO."""
    from sparsejax.data import make_train_iterator
    config = tiny_config()
    factory = StateFactory(config, make_mesh(config), make_optimizer(config.train))
    checkpointer = Checkpointer(str(tmp_path), keep=2, async_save=False)
    checkpointer.save(0, factory.create(), make_train_iterator(config), config)
    checkpointer.wait()
    changed = tiny_config(num_steps=12, log_every=2)
    changed.data.update(seq_len=64, shuffle_seed=5)
    changed.model.remat = "full"
    with caplog.at_level("INFO"):
        checkpointer.check_compatible(0, changed)
    checkpointer.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO" and "config changes" in r.getMessage()]
    assert len(warnings) == 1 and len(infos) == 1, (warnings, infos)
    for change in ("config.train.num_steps was 6, now 12", "config.data.seq_len was 32, now 64",
                   "config.data.shuffle_seed was 0, now 5"):
        assert change in warnings[0] and change not in infos[0]
    for change in ("config.train.log_every was 1, now 2", "config.model.remat was 'none', now 'full'"):
        assert change in infos[0] and change not in warnings[0]


# -------------------------------------------------------------------------- train.py processes

def _command(workdir, num_steps):
    overrides = {**{f"model.{k}": v for k, v in TINY.items()}, "data.seq_len": 32, "data.global_batch_size": 8,
                 "data.max_documents": 40, "train.num_steps": num_steps, "train.warmup_steps": 5,
                 "train.log_every": 1, "train.eval_every": 0, "train.checkpoint_every": 10,
                 "train.keep_checkpoints": 2}
    return [sys.executable, str(REPO / "train.py"), "--config=configs/dense_tiny.py", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in overrides.items()]]


def _env(cache):
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _wait_for(predicate, process, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            raise AssertionError(f"train.py exited ({process.returncode}) before {what}:\n"
                                 f"{process.stderr.read()[-4000:]}")
        time.sleep(0.002)
    process.kill()
    raise AssertionError(f"timed out waiting for {what}:\n{process.communicate()[1][-4000:]}")


def _max_step(workdir):
    try:
        return max(read_metrics(workdir), default=0)
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_kill9_mid_save_resumes_exactly_and_sigterm_saves(tmp_path):
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    checkpoints = workdir / "checkpoints"
    num_steps = 100000  # never reached: both runs are stopped by signals

    def saving_after_20():
        """A checkpoint of step >= 20 being written (or, should saves be too quick to catch, one of
        step >= 40 just written)."""
        if not checkpoints.exists():
            return None
        names = os.listdir(checkpoints)
        for name in names:
            if "tmp" in name and int(name.split(".")[0]) >= 20:
                return name
        return next((name for name in names if name.isdigit() and int(name) >= 40), None)

    # Run 1: SIGKILL while the checkpoint of step >= 20 is being written.
    first = subprocess.Popen(_command(workdir, num_steps), cwd=REPO, env=_env(cache), text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = _wait_for(saving_after_20, first, 240, "a checkpoint save at step >= 20")
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    first.stderr.close()
    complete = sorted(int(p) for p in os.listdir(checkpoints) if p.isdigit())
    resume_step = complete[-1]
    killed_history = read_metrics(workdir)
    assert int(partial.split(".")[0]) >= 20 and resume_step >= 10
    assert max(killed_history) >= resume_step

    # Run 2: resumes from the last complete checkpoint, repeats the lost steps exactly, and on
    # SIGTERM saves and exits 0.
    second = subprocess.Popen(_command(workdir, num_steps), cwd=REPO, env=_env(cache), text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = max(killed_history) + 3
    _wait_for(lambda: _max_step(workdir) >= target, second, 240, f"step {target} after resuming")
    second.send_signal(signal.SIGTERM)
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr[-4000:]
    assert f"resumed from checkpoint {checkpoints / str(resume_step)}" in stderr
    assert "SIGTERM received" in stderr
    history = read_metrics(workdir)
    last = max(history)
    assert sorted(history) == list(range(1, last + 1))
    assert (checkpoints / str(last)).is_dir(), f"no checkpoint at the SIGTERM step {last}: {os.listdir(checkpoints)}"
    assert not [p for p in os.listdir(checkpoints) if "tmp" in p]
    assert len(os.listdir(checkpoints)) <= 2  # keep_checkpoints
    for step, record in killed_history.items():
        assert history[step]["loss"] == record["loss"], step
        assert history[step]["grad_norm"] == record["grad_norm"], step


def test_scanned_layers_round_trip_and_the_other_layout_is_refused(tmp_path):
    """A scanned-layer state restores exactly; the config recorded with it names the layout, and a
    config with unrolled layers is refused (the layouts are not converted)."""
    from sparsejax.data import make_train_iterator
    config = tiny_config()
    config.model.scan_layers = True
    mesh = make_mesh(config)
    factory = StateFactory(config, mesh, make_optimizer(config.train))
    state = factory.create()
    assert jax.tree.leaves(state.params["layers"])[0].shape[0] == TINY["num_layers"]
    checkpointer = Checkpointer(str(tmp_path), keep=2, async_save=False)
    checkpointer.save(0, state, make_train_iterator(config), config)
    checkpointer.wait()
    checkpointer.check_compatible(0, config)
    restored = checkpointer.restore_state(0, factory.abstract_with_shardings())
    assert jax.tree.structure(restored.to_dict()) == jax.tree.structure(state.to_dict())
    for a, b in zip(jax.tree.leaves(state.to_dict()), jax.tree.leaves(restored.to_dict())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == b.sharding
    unrolled = tiny_config()
    with pytest.raises(CheckpointError, match=r"config.model.scan_layers was True, now False.*stacked "
                                              r"\[num_layers, \.\.\.\].*--config.model.scan_layers=True"):
        checkpointer.check_compatible(0, unrolled)
    checkpointer.close()


def test_execution_keys_do_not_block_a_resume():
    """A variant's kernel choices (implementation, fused top-n, tiles, chunking) may change on resume;
    its hyper-parameters may not."""
    from sparsejax.training.checkpoint import _model_defining
    saved = {"model": {"d_model": 64}, "attention": {"kind": "nsa", "dense": {"implementation": "auto"}, "nsa": {
        "num_selected": 16, "implementation": "auto", "fused_topn": False, "score_chunk_elements": 1 << 26}}}
    resumed = {"model": {"d_model": 64}, "attention": {"kind": "nsa", "nsa": {
        "num_selected": 16, "implementation": "pallas_gpu", "fused_topn": True, "score_chunk_elements": 1 << 20}}}
    assert _model_defining(saved) == _model_defining(resumed)
    resumed["model"].update(remat="full", dtype="bfloat16")  # how it is computed, not its parameters
    assert _model_defining(saved) == _model_defining(resumed)
    resumed["model"]["param_dtype"] = "bfloat16"
    assert _model_defining(saved) != _model_defining(resumed)
    del resumed["model"]["param_dtype"]
    resumed["attention"]["nsa"]["num_selected"] = 8
    assert _model_defining(saved) != _model_defining(resumed)
