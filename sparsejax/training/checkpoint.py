"""Checkpoints: an orbax CheckpointManager over `workdir/checkpoints/<step>/` with three items:

- `state`: the train state (step, params, optimizer state, other model variables), sharded arrays;
- `data`:  the grain iterator position, one JSON file per process (grain's checkpoint handler);
- `config`: the experiment config as JSON.

Saves are asynchronous when `config.train.async_checkpointing` (the arrays are copied off the devices,
then written in a background thread while training continues; the iterator position and the config
are written before `save` returns). orbax writes each step into a temporary directory and renames it
to `<step>` only when every item is complete, so a process killed in the middle of a save (even with
SIGKILL) leaves the previous checkpoints whole; the unfinished temporary directory is ignored and
deleted by the next run. The last `keep_checkpoints` steps are kept.

A *committed* checkpoint that cannot be read (files deleted or damaged afterwards) is never skipped
silently: restoring it raises `CheckpointError` naming the directory, the cause and the other
complete steps, and nothing is deleted, so the user decides (move the damaged step out of the
checkpoints directory to resume from the previous one).
"""
from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from sparsejax.training.state import TrainState



# Keys of a variant's sub-section that choose how it is computed (kernels, tiles, chunking), not what:
# a run may resume with other values (e.g. a GPU checkpoint continued on another backend).
_EXECUTION_KEYS = ("implementation", "fused_topn", "score_chunk_elements", "compress_kernel_block_q",
                   "compress_kernel_block_k", "window_block")


# Keys of `config.model` that choose how the model is computed, not its parameters: `remat` (what the
# backward pass recomputes, applied at call time) and `dtype` (the compute dtype; parameters are stored
# in `param_dtype` and cast when used).
_MODEL_EXECUTION_KEYS = ("remat", "dtype")

# Keys (dotted, under `config.`) whose change on resume alters the training that follows: the learning
# rate schedule is a function of `train.num_steps`, and the restored data-iterator position belongs to
# the pipeline these `data` keys define. They are resumed with, but logged as warnings.
_TRAINING_KEYS = ("train.num_steps", "data.source", "data.paths", "data.tokenizer", "data.sentencepiece_model",
                  "data.seq_len", "data.global_batch_size", "data.val_fraction", "data.shuffle_seed",
                  "data.synthetic_mixture", "data.worker_count", "data.max_documents", "data.document_alignment")


def _model_defining(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a config (JSON dict) whose change makes an old checkpoint unusable (different
    parameter shapes or meaning): `model` without its execution keys (`_MODEL_EXECUTION_KEYS`),
    `attention.kind` and the chosen variant's sub-section without its execution keys
    (`_EXECUTION_KEYS`). The other variants' sub-sections do not describe the saved model.
    `model.scan_layers` records the parameter layout; configs saved before it existed had one entry
    per layer (False)."""
    attention = config.get("attention") or {}
    kind = attention.get("kind")
    model = config.get("model")
    if isinstance(model, dict):
        model = {k: v for k, v in {"scan_layers": False, **model}.items() if k not in _MODEL_EXECUTION_KEYS}
    variant = attention.get(kind)
    if isinstance(variant, dict):
        variant = {k: v for k, v in variant.items() if k not in _EXECUTION_KEYS}
    return {"model": model, "attention": {"kind": kind, kind: variant}}


def _layout_hint(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """A sentence on the parameter layout when the two configs differ in `model.scan_layers`."""
    was, now = ((c.get("model") or {}).get("scan_layers") for c in (saved, current))
    if was == now or {was, now} != {True, False}:
        return ""
    layout = {True: "stacked [num_layers, ...] under params['layers']",
              False: "one entry per layer under params['blocks']"}
    return (f"; its parameters are {layout[was]}, this config expects {layout[now]}: restore it with "
            f"--config.model.scan_layers={was} (layouts are not converted)")


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be restored, or that belongs to a different model."""


def config_to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


class Checkpointer:
    """Saves and restores train state + data iterator + config under `directory`."""

    def __init__(self, directory: str, *, keep: int, async_save: bool, read_only: bool = False):
        """`read_only=True` (evaluation next to a running training): never writes, deletes nothing,
        in particular not the temporary directory of a save in progress."""
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save, read_only=read_only)
        self._manager = ocp.CheckpointManager(self.directory, item_names=("state", "data", "config"),
                                              options=options)

    def all_steps(self) -> list[int]:
        """Steps of the complete (committed) checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: TrainState, iterator, config: ml_collections.ConfigDict) -> None:
        """Starts saving `state` after `step` updates, the iterator position and the config."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state.to_dict()),
            data=grain.checkpoint.CheckpointSave(iterator),
            config=ocp.args.JsonSave(config_to_json_dict(config)))
        self._manager.save(step, args=args, force=True)

    def saved_config(self, step: int) -> dict[str, Any]:
        """The config stored with checkpoint `step` (a JSON dict)."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - any failure to read means a damaged checkpoint
            raise self._error(step, e) from e
        return restored["config"]

    def check_compatible(self, step: int, config: ml_collections.ConfigDict, *, resuming: bool = True) -> None:
        """Raises CheckpointError if checkpoint `step` was written by a different model/attention
        config; logs other differences (e.g. a longer num_steps, which is a legitimate resume). When
        `resuming` training, changes of `_TRAINING_KEYS` are logged as a warning, the rest at INFO;
        otherwise (evaluation) all at INFO."""
        saved = self.saved_config(step)
        current = config_to_json_dict(config)
        saved_model, current_model = _model_defining(saved), _model_defining(current)
        diffs = _differences(saved_model, current_model, "config")
        if diffs:
            raise CheckpointError(
                f"the checkpoint {self.step_dir(step)} was written with a different model/attention config "
                f"({'; '.join(diffs[:5])}); use a fresh --workdir or the checkpoint's config"
                f"{_layout_hint(saved_model, current_model)}")
        other = [d for d in _differences(saved, current, "config") if d not in diffs]
        if not resuming:
            if other:
                logging.info("config changes since checkpoint %d: %s", step, "; ".join(other))
            return
        altering = [d for key in _TRAINING_KEYS
                    for d in _differences(_at(saved, key), _at(current, key), f"config.{key}")]
        if altering:
            logging.warning("resuming with config changes that alter training (the learning-rate schedule follows "
                            "train.num_steps; the restored data position belongs to the data pipeline it was "
                            "saved with): %s", "; ".join(altering))
        rest = [d for d in other if d not in altering]
        if rest:
            logging.info("resuming with config changes: %s", "; ".join(rest))

    def restore(self, step: int, abstract_state: TrainState, iterator) -> TrainState:
        """Restores checkpoint `step` into arrays shaped and sharded like `abstract_state`
        (ShapeDtypeStructs with shardings) and moves `iterator` to the saved position."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state.to_dict()),
            data=grain.checkpoint.CheckpointRestore(iterator))
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - any failure to read means a damaged checkpoint
            raise self._error(step, e) from e
        return TrainState.from_dict(restored["state"])

    def restore_state(self, step: int, abstract_state: TrainState) -> TrainState:
        """Restores only the train state of checkpoint `step` (evaluation needs no data position)."""
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state.to_dict())))
        except Exception as e:  # noqa: BLE001
            raise self._error(step, e) from e
        return TrainState.from_dict(restored["state"])

    def _error(self, step: int, cause: Exception) -> CheckpointError:
        others = [s for s in self.all_steps() if s != step]
        hint = (f"move {self.step_dir(step)} out of {self.directory} to resume from step {others[-1]}" if others
                else f"no other complete checkpoint exists; move it out of {self.directory} to start from scratch")
        return CheckpointError(f"checkpoint {self.step_dir(step)} is corrupt or incomplete "
                               f"({type(cause).__name__}: {str(cause)[:500]}); {hint}")

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _at(config: dict[str, Any], dotted: str) -> Any:
    """The value at `dotted` ("data.seq_len") of a JSON config dict; None where it is missing."""
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _differences(saved: Any, current: Any, path: str) -> list[str]:
    """Human-readable differences between two JSON values."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _differences(saved.get(key), current.get(key), f"{path}.{key}")
        return out
    return [] if saved == current else [f"{path} was {saved!r}, now {current!r}"]
