"""Throughput of the training step of a config on the current devices: tokens/s, step time, TFLOP/s
per device, MFU and peak device memory. Prints a summary and writes it as JSON.

    python benchmarks/train_step.py --config=configs/dense_1b.py --steps=10 --warmup=2 --out=/tmp/b.json
    python benchmarks/train_step.py --config=configs/dense_1b.py --config.model.remat=full ...
    python benchmarks/train_step.py --table='/tmp/bench/*.json'     # one table row per JSON file

The state and the step are built exactly as the training loop builds them (`StateFactory`,
`make_train_step`: sharded parameters and AdamW state, one jitted step with explicit shardings and
donated state, gradient accumulation when `config.train.grad_accum_steps > 1`). Only the data
differs: synthetic batches of the config's shape `[global_batch_size, seq_len]` with uniform random
token ids, one document per row (segment ids all 1, positions 0..T-1, every token in the loss). No
packing: the computed attention is then exactly the full causal triangle that the FLOP count of
`sparsejax.training.metrics` assumes; packed documents would let cuDNN skip blocks between documents.

Timing: the step is compiled ahead of time (`lower(...).compile()`, reported as `compile_s`), run
`--warmup` times, then `--steps` times, each step timed on the host around the call and
`jax.block_until_ready` of the new state and metrics; the median is reported (mean and min too).
FLOPs per token come from `sparsejax.training.metrics.train_flops_per_token` (3 x forward matmuls
plus the attention the variant computes; remat recomputation is not counted); the peak per device
from `config.train.peak_flops_per_device` or the table in that module. Peak memory is
`device.memory_stats()["peak_bytes_in_use"]` (largest over local devices; absent on CPU), next to
XLA's own estimate for the compiled step.
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

# Run from a plain checkout too (the GPU machine has no install): `sparsejax` and `configs` live in the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed steps (after the warm-up).", lower_bound=1)
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.", lower_bound=0)
flags.DEFINE_string("out", None, "Write the results as JSON to this path.")
flags.DEFINE_string("label", None, "Name of this run in the JSON and the table (default: the overrides).")
flags.DEFINE_bool("profile", False, "Also trace one more step and record its GPU time per kernel name "
                  "(`timing.kernel_profile`).")
flags.DEFINE_string("hlo", None, "Also write the step's HLO after XLA's optimisations (`compiled.as_text()`) "
                    "to this path, e.g. to count the kernels the compiled step launches.")
flags.DEFINE_string("table", None, "Only print a table of the JSON files matching this glob, then exit.")
FLAGS = flags.FLAGS

GiB = 2.0 ** 30


def synthetic_batch(config, seed: int) -> dict:
    """Host numpy batch of this process's rows: inputs/targets uniform in [0, vocab_size), positions
    0..T-1, segment_ids 1 (one document per row), loss_mask 1. All [B / process_count, T]."""
    import jax
    import numpy as np

    rows = config.data.global_batch_size // jax.process_count()
    t = config.data.seq_len
    rng = np.random.default_rng([seed, jax.process_index()])
    tokens = rng.integers(0, config.model.vocab_size, size=(rows, t + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy(),
        "segment_ids": np.ones((rows, t), np.int32),
        "loss_mask": np.ones((rows, t), np.float32),
    }


def peak_memory_bytes() -> int | None:
    """Largest `peak_bytes_in_use` over the local devices; None where the backend keeps no stats."""
    import jax

    peaks = []
    for device in jax.local_devices():
        stats = device.memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def compiled_memory(compiled) -> dict | None:
    """XLA's estimate for one device: argument, output, temporary and generated-code bytes."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it; the estimate is optional
        return None
    if analysis is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {k: int(getattr(analysis, k)) for k in keys if hasattr(analysis, k)}


_T0 = time.perf_counter()


def progress(message: str) -> None:
    """A time-stamped progress line on stderr (seconds since the script started)."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


def run(config, steps: int, warmup: int, label: str, profile: bool = False, hlo: str | None = None) -> dict:
    """Builds state and step as `sparsejax.training.loop` does, times `steps` steps, returns the record
    (with `profile`: and the GPU kernels of one more step, `timing.kernel_profile`; with `hlo`: the
    compiled step's optimised HLO written to that path)."""
    import jax
    import numpy as np

    from sparsejax import config as config_lib
    from sparsejax.parallel.mesh import batch_sharding, make_mesh, rules_from_config
    from sparsejax.training import metrics as metrics_lib
    from sparsejax.training.optimizer import make_optimizer
    from sparsejax.training.state import StateFactory
    from sparsejax.training.step import make_global_batch, make_train_step

    progress(f"{label}: jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}")
    config_lib.validate(config, jax.device_count())
    mesh = make_mesh(config)
    sharding = batch_sharding(mesh, rules_from_config(config))
    optimizer = make_optimizer(config.train)
    factory = StateFactory(config, mesh, optimizer)
    train_step = make_train_step(config, factory.graphdef, optimizer, mesh, factory.shardings, sharding)
    global_batch, seq_len = config.data.global_batch_size, config.data.seq_len
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(factory.abstract.params))

    progress(f"state and step built: {params:,} parameters")
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        initializer = factory.initializer().lower().compile()
        progress(f"initialiser compiled in {time.perf_counter() - start:.1f} s")
        state = jax.block_until_ready(initializer())
        progress("state initialised")
        batches = [make_global_batch(synthetic_batch(config, seed), sharding, global_batch) for seed in range(2)]
        start = time.perf_counter()
        lowered = train_step.lower(state, batches[0])
        lower_s = time.perf_counter() - start
        progress(f"step traced and lowered in {lower_s:.1f} s")
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        progress(f"step compiled in {compile_s - lower_s:.1f} s")
        if hlo:
            with open(hlo, "w") as f:
                f.write(compiled.as_text())
        losses, times = [], []
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batches[i % len(batches)])
            jax.block_until_ready((state, metrics))
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
            losses.append(float(metrics["loss"]))
            progress(f"step {i + 1}/{warmup + steps} ({'timed' if i >= warmup else 'warm-up'}): "
                     f"{elapsed:.4f} s, loss {losses[-1]:.4f}")
        kernels = None
        if profile:
            import timing
            holder = [state]                 # the step donates its state: thread it through the calls

            def one_step():
                holder[0], step_metrics = compiled(holder[0], batches[0])
                return holder[0], step_metrics
            kernels = timing.kernel_profile(one_step, calls=1)
            timing.print_profile(kernels, f"one {label} step")
    if not all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite loss in the benchmark steps: {losses}")

    devices = jax.devices()
    step_time = statistics.median(times)
    tokens_per_s = global_batch * seq_len / step_time
    flops_per_token = metrics_lib.train_flops_per_token(config)
    peak = metrics_lib.peak_flops_per_device(devices[0], config.train.peak_flops_per_device)
    tflops = None if flops_per_token is None else flops_per_token * tokens_per_s / len(devices) / 1e12
    mfu = None if tflops is None or peak is None else tflops * 1e12 / peak
    return {
        "label": label,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device_kind": devices[0].device_kind, "num_devices": len(devices), "platform": devices[0].platform,
        "jax_version": jax.__version__, "mesh": dict(mesh.shape),
        "params": params, "global_batch_size": global_batch, "seq_len": seq_len,
        "grad_accum_steps": config.train.grad_accum_steps, "remat": config.model.remat,
        "dtype": config.model.dtype, "attention": config.attention.kind,
        "steps": steps, "warmup": warmup, "lower_s": lower_s, "compile_s": compile_s,
        "step_time_s": step_time, "step_time_mean_s": statistics.fmean(times), "step_time_min_s": min(times),
        "tokens_per_s": tokens_per_s,
        "train_flops_per_token": flops_per_token,
        "tflops_per_device": tflops, "peak_flops_per_device": peak, "mfu": mfu,
        "peak_memory_bytes": peak_memory_bytes(), "compiled_memory": compiled_memory(compiled),
        "first_loss": losses[0], "last_loss": losses[-1], "kernel_profile": kernels,
        "config": json.loads(config.to_json()),
    }


def _fmt(value, spec: str) -> str:
    """`format(value, spec)`, or "-" right-aligned to the spec's width when value is None."""
    return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0] or 1))


def table(records: list[dict]) -> str:
    """One row per record: label, batch, remat, step time, tokens/s, TFLOP/s per device, MFU, memory."""
    header = (f"{'label':<28} {'B':>4} {'acc':>3} {'remat':>5} {'compile s':>9} {'step s':>8} "
              f"{'tokens/s':>10} {'TFLOP/s/dev':>11} {'MFU':>6} {'peak GiB':>8}")
    lines = [header, "-" * len(header)]
    for r in records:
        mem = None if r.get("peak_memory_bytes") is None else r["peak_memory_bytes"] / GiB
        lines.append(
            f"{r['label'][:28]:<28} {r['global_batch_size']:>4} {r['grad_accum_steps']:>3} {r['remat']:>5} "
            f"{r['compile_s']:>9.1f} {r['step_time_s']:>8.4f} {r['tokens_per_s']:>10.0f} "
            f"{_fmt(r['tflops_per_device'], '11.1f')} {_fmt(None if r['mfu'] is None else 100 * r['mfu'], '5.1f')}% "
            f"{_fmt(mem, '8.1f')}")
    return "\n".join(lines)


def summary(r: dict) -> str:
    mem = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / GiB:.2f} GiB"
    mfu = "n/a (unknown device peak)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}% of {r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s"
    tflops = "n/a" if r["tflops_per_device"] is None else f"{r['tflops_per_device']:.1f}"
    return (f"{r['label']}: {r['device_kind']} x{r['num_devices']}, jax {r['jax_version']}, mesh {r['mesh']}\n"
            f"  params {r['params']:,}; batch {r['global_batch_size']} x {r['seq_len']} tokens "
            f"(grad_accum {r['grad_accum_steps']}), remat {r['remat']}, {r['dtype']}, attention {r['attention']}\n"
            f"  compile {r['compile_s']:.1f} s; step time median {r['step_time_s']:.4f} s "
            f"(mean {r['step_time_mean_s']:.4f}, min {r['step_time_min_s']:.4f}, {r['steps']} steps)\n"
            f"  tokens/s {r['tokens_per_s']:,.0f}; TFLOP/s per device {tflops}; MFU {mfu}\n"
            f"  peak device memory {mem}; loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.table is not None:
        paths = sorted(glob.glob(FLAGS.table))
        if not paths:
            sys.exit(f"error: --table={FLAGS.table!r} matches no file")
        records = []
        for path in paths:
            with open(path) as f:
                records.append(json.load(f))
        print(table(records))
        return
    if FLAGS.config is None:
        raise app.UsageError("--config is required (or --table to print saved results)")
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    label = FLAGS.label or (" ".join(a[len("--config."):] for a in overrides) or "default")
    record = run(FLAGS.config, FLAGS.steps, FLAGS.warmup, label, FLAGS.profile, FLAGS.hlo)
    print(summary(record), flush=True)
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    app.run(main)
