"""The training loop: `train(config, workdir) -> TrainResult`.

One iteration: next batch (per process, assembled into global arrays) -> jitted train step ->
(one step later) fetch the metrics, check them, log them -> periodic validation and checkpoints.
Metrics of step s are fetched after step s+1 has been dispatched, so the host never stalls the device,
except at steps that log, validate, save or stop (those are checked at once).

- Steps are counted from 1: "step s" is the s-th update; its `loss` is the loss of the batch it used
  (before the update), and the checkpoint `s` holds the state after it and the data position after
  s batches. A run on a workdir with checkpoints resumes from the latest complete one; the
  losses then continue exactly as without the interruption (bitwise on CPU).
- A non-finite loss or gradient norm, or non-finite parameters after the update, at step s stop the run with
  `TrainingDivergedError` naming s and the last good checkpoint; the bad state is never saved.
- SIGTERM / SIGINT (preemption, Ctrl-C) set a flag, checked before the next step is dispatched: the
  step in flight when the signal arrives is the last (multi-process: the next step that is a multiple
  of log_every, where the processes agree); the loop saves a checkpoint of it, waits for it, and
  returns with `stopped_by="preempted"`. A second SIGINT aborts at once.
- Outputs in the workdir: `config.json` (written once the checkpoint, if any, was found compatible
  and restored), `metrics.jsonl` (train lines: step, loss, total_loss,
  learning_rate, grad_norm, param_norm, tokens_per_sec, step_time, mfu, variant auxiliaries; validation
  lines: step, split, eval_loss, eval_tokens), `tensorboard/` event files, `checkpoints/<step>/`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from sparsejax import config as config_lib
from sparsejax.parallel.mesh import batch_sharding, make_mesh, rules_from_config
from sparsejax.training import metrics as metrics_lib
from sparsejax.training.checkpoint import Checkpointer, config_to_json_dict
from sparsejax.training.optimizer import make_optimizer
from sparsejax.training.state import StateFactory
from sparsejax.training.step import make_eval_step, make_global_batch, make_train_step


class TrainingDivergedError(RuntimeError):
    """The loss (or gradient / parameter norm) became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    step: int                        # updates completed (and saved in the last checkpoint)
    stopped_by: str                  # "completed" | "preempted"
    last_checkpoint: int | None      # step of the newest complete checkpoint
    train_metrics: dict[str, Any]    # the last logged train record
    eval_metrics: dict[str, Any]     # the last validation record ({} if none)


class StopRequest:
    """SIGTERM / SIGINT handlers that only set a flag, checked by the loop at step boundaries.

    Installed only in the main thread (Python allows signal handlers nowhere else); the previous
    handlers come back on exit. A second SIGINT raises KeyboardInterrupt (abort without saving).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        del frame
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        logging.warning("%s received: saving a checkpoint at the end of this step, then stopping",
                        self.signal_name)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            logging.warning("not in the main thread: SIGTERM/SIGINT will not save a checkpoint")
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, step: int, every: int) -> bool:
        """Whether a stop signal arrived (in any process). With several processes all must stop at
        the same step, so they agree through a small collective, only every `every` steps (it waits
        for the device, which would otherwise run ahead of the host)."""
        local = self.signal_name is not None
        if jax.process_count() == 1:
            return local
        if step % every:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


def _write_json_atomic(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _format(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


class _Throughput:
    """Step time, tokens/s and MFU over the steps since the last log line. The first step after a
    (re)start (compilation), and time spent in validation and checkpointing, are left out."""

    def __init__(self, tokens_per_step: int, flops_per_token: float | None, peak_total: float | None):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_total = peak_total
        self.reset()

    def reset(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def tick(self) -> None:
        self.steps += 1

    def report(self) -> dict[str, float]:
        if self.steps == 0:
            return {}
        step_time = (time.perf_counter() - self.start) / self.steps
        out = {"step_time": step_time, "tokens_per_sec": self.tokens_per_step / step_time}
        if self.flops_per_token is not None and self.peak_total:
            out["mfu"] = self.flops_per_token * out["tokens_per_sec"] / self.peak_total
        self.reset()
        return out


def train(config: ml_collections.ConfigDict, workdir: str | None = None) -> TrainResult:
    """Trains `config` in `workdir` (default `config.workdir`), resuming from its latest checkpoint."""
    workdir = workdir or config.get("workdir")
    if not workdir:
        raise ValueError("no workdir: pass --workdir (or set config.workdir)")
    config_lib.validate(config, jax.device_count())
    return _Trainer(config, os.path.abspath(workdir)).run()


class _Trainer:
    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = workdir
        self.train_cfg = config.train
        self.is_chief = jax.process_index() == 0
        if self.is_chief:
            os.makedirs(workdir, exist_ok=True)
        self.mesh = make_mesh(config)
        self.batch_sharding = batch_sharding(self.mesh, rules_from_config(config))
        self.global_batch = config.data.global_batch_size
        self.optimizer = make_optimizer(config.train)
        self.factory = StateFactory(config, self.mesh, self.optimizer)
        self.train_step = make_train_step(config, self.factory.graphdef, self.optimizer, self.mesh,
                                          self.factory.shardings, self.batch_sharding)
        self.eval_step = make_eval_step(self.factory.graphdef, self.mesh, self.factory.shardings,
                                        self.batch_sharding, config)
        tokens_per_step = self.global_batch * config.data.seq_len
        peak = metrics_lib.peak_flops_per_device(jax.devices()[0], config.train.peak_flops_per_device)
        self.flops_per_token = metrics_lib.train_flops_per_token(config)
        self.throughput = _Throughput(tokens_per_step, self.flops_per_token,
                                      None if peak is None else peak * jax.device_count())
        self.last_saved: int | None = None
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------ setup
    def _data_iterator(self):
        from sparsejax.data import make_train_iterator
        return make_train_iterator(self.config, process_index=jax.process_index(),
                                   process_count=jax.process_count())

    def _initial_state(self, iterator):
        latest = self.checkpointer.latest_step()
        if latest is None:
            logging.info("no checkpoint in %s: starting from scratch", self.checkpointer.directory)
            return self.factory.create(), 0
        self.checkpointer.check_compatible(latest, self.config)
        state = self.checkpointer.restore(latest, self.factory.abstract_with_shardings(), iterator)
        restored_step = int(jax.device_get(state.step))
        if restored_step != latest:
            raise RuntimeError(f"checkpoint {self.checkpointer.step_dir(latest)} holds step {restored_step}")
        self.last_saved = latest
        logging.info("resumed from checkpoint %s", self.checkpointer.step_dir(latest))
        return state, latest

    # ------------------------------------------------------------------------------------- loop
    def run(self) -> TrainResult:
        iterator = self._data_iterator()
        self.checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                         keep=self.train_cfg.keep_checkpoints,
                                         async_save=self.train_cfg.async_checkpointing)
        try:
            state, start = self._initial_state(iterator)
        except BaseException:
            self.checkpointer.close()
            raise
        if self.is_chief:  # only now: a resume refused by check_compatible leaves the run's config.json
            _write_json_atomic(os.path.join(self.workdir, "config.json"), config_to_json_dict(self.config))
        num_steps = self.train_cfg.num_steps
        self.writer = metrics_lib.MetricWriter(self.workdir, resume_step=start)
        self._log_setup(start)
        progress = self._progress_bar(start, num_steps)
        stopped_by = "completed"
        step, pending = start, None
        try:
            with jax.set_mesh(self.mesh), StopRequest() as stop_request:
                self.throughput.reset()
                while step < num_steps:
                    if stop_request.requested(step, self.train_cfg.log_every):  # before dispatching the next step
                        stopped_by = "preempted"
                        break
                    batch = make_global_batch(next(iterator), self.batch_sharding, self.global_batch)
                    state, metrics = self.train_step(state, batch)
                    step += 1
                    if pending is not None:
                        self._finish(*pending, start, progress)
                    pending = (step, metrics)
                    save = (self.train_cfg.checkpoint_every and step % self.train_cfg.checkpoint_every == 0) \
                        or step == num_steps
                    evaluate = self.train_cfg.eval_every and (step % self.train_cfg.eval_every == 0 or step == num_steps)
                    if save or evaluate or step % self.train_cfg.log_every == 0:
                        self._finish(*pending, start, progress)
                        pending = None
                    if evaluate:
                        self._evaluate(step, state)
                    if save:
                        self._save(step, state, iterator)
                if pending is not None:
                    self._finish(*pending, start, progress)
                if stopped_by == "preempted":
                    self._save(step, state, iterator)
                    logging.warning("stopped by %s after step %d; checkpoint %s",
                                    stop_request.signal_name or "a signal to another process", step,
                                    self.checkpointer.step_dir(step))
        finally:
            if progress is not None:
                progress.close()
            self.checkpointer.close()
            self.writer.close()
        return TrainResult(step=step, stopped_by=stopped_by, last_checkpoint=self.checkpointer.latest_step(),
                           train_metrics=self.last_train, eval_metrics=self.last_eval)

    def _finish(self, step: int, metrics, start: int, progress) -> None:
        """Fetches the metrics of `step`, stops on non-finite values, logs every log_every steps."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if step == start + 1:
            self.throughput.reset()  # the first step after a (re)start includes compilation
        else:
            self.throughput.tick()
        if progress is not None:
            progress.update(1)
        params_finite = values.pop("params_finite") == 1.0
        if not (params_finite and all(math.isfinite(values[k]) for k in ("loss", "total_loss", "grad_norm"))):
            self._diverged(step, values, params_finite)
        if step % self.train_cfg.log_every == 0 or step == self.train_cfg.num_steps:
            record = {"step": step, **values, **self.throughput.report()}
            self.last_train = record
            self.writer.write(record, tb_prefix="train/")
            if self.is_chief:
                if progress is not None:
                    progress.set_postfix_str(_format({k: v for k, v in record.items()
                                                      if k in ("loss", "tokens_per_sec", "step_time", "mfu")}))
                logging.info("step %d/%d %s", step, self.train_cfg.num_steps,
                             _format({k: v for k, v in record.items() if k != "step"}))

    def _diverged(self, step: int, values: dict[str, float], params_finite: bool) -> None:
        self.writer.write({"step": step, **values, "error": "non-finite"}, tb_prefix="train/")
        self.checkpointer.wait()
        good = self.checkpointer.latest_step()
        where = (f"the last good checkpoint is step {good} ({self.checkpointer.step_dir(good)})"
                 if good is not None else "no checkpoint was saved before it")
        bad = ", ".join(f"{k}={values[k]}" for k in ("loss", "total_loss", "grad_norm"))
        bad += "" if params_finite else ", non-finite parameters after the update"
        raise TrainingDivergedError(
            f"training diverged at step {step}: {bad}. The state of step {step} was not saved; {where}. "
            "Lower config.train.learning_rate or raise warmup_steps before resuming.")

    def _evaluate(self, step: int, state) -> None:
        from sparsejax.data import make_eval_iterator
        iterator = make_eval_iterator(self.config, "validation", num_batches=self.train_cfg.eval_batches,
                                      process_index=jax.process_index(), process_count=jax.process_count())
        total, count = 0.0, 0.0
        for local in iterator:
            batch = make_global_batch(local, self.batch_sharding, self.global_batch)
            ce_sum, tokens = self.eval_step(state.params, state.rest, batch)
            total, count = total + ce_sum, count + tokens
        count = float(count)
        record = {"step": step, "split": "validation",
                  "eval_loss": float(total) / count if count else float("nan"), "eval_tokens": count}
        self.last_eval = record
        self.writer.write(record, tb_prefix="validation/")
        if self.is_chief:
            logging.info("step %d validation %s", step, _format({k: v for k, v in record.items() if k != "step"}))
        self.throughput.reset()

    def _save(self, step: int, state, iterator) -> None:
        if self.last_saved == step:
            return
        self.checkpointer.save(step, state, iterator, self.config)
        self.last_saved = step
        self.throughput.reset()

    # ---------------------------------------------------------------------------------- display
    def _log_setup(self, start: int) -> None:
        if not self.is_chief:
            return
        params = sum(x.size for x in jax.tree.leaves(self.factory.abstract.params))
        flops = f"{self.flops_per_token:.4g}" if self.flops_per_token is not None else "unknown"
        logging.info("model: %d parameters; %s training FLOPs per token; mesh %s; %d processes, %d devices",
                     params, flops, dict(self.mesh.shape), jax.process_count(), jax.device_count())
        logging.info("training steps %d..%d in %s", start + 1, self.train_cfg.num_steps, self.workdir)

    def _progress_bar(self, start: int, total: int):
        if not self.is_chief or not sys.stderr.isatty():
            return None
        from tqdm import tqdm
        return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
