"""Timing helpers shared by the benchmark scripts (imported as `timing`: the scripts run as
`python benchmarks/<name>.py`, which puts this folder first on sys.path)."""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import traceback

import jax


def bench(fn, *args, reps: int = 10, warmup: int = 2, max_s: float = 20.0) -> tuple[float, float]:
    """(median wall time in ms, seconds of the first call) of the jitted `fn(*args)`.

    The first call (compilation included) counts as the first of `warmup` untimed calls; every call
    is synchronised with `block_until_ready`; timing stops early after `max_s` seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first_call_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        jax.block_until_ready(fn(*args))
    times, start = [], time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() - start > max_s:
            break
    return statistics.median(times), first_call_s


def median_ms(fn, *args, **kwargs) -> float:
    """The median of `bench` alone."""
    return bench(fn, *args, **kwargs)[0]


def guarded(name: str, fn, errors: dict):
    """fn(), or None after printing the error and recording it in `errors[name]`: a failed row is
    reported and the run goes on."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"  [{name}] FAILED: {msg}", flush=True)
        errors[name] = msg + "\n" + traceback.format_exc()[-2000:]
        return None


@contextlib.contextmanager
def kernel_configs(kernels=("fwd", "dq", "dkv"), **fields):
    """Inside: `pallas_gpu.default_configs` gives `kernels` their default `KernelConfig` with `fields`
    replaced (e.g. `stagger=False`, `list_chunk=32`). Functions must be traced inside to see it."""
    from pallas_kernels.block_sparse import pallas_gpu
    defaults = pallas_gpu.default_configs

    def changed(*args):
        return {name: dataclasses.replace(cfg, **fields) if name in kernels else cfg
                for name, cfg in defaults(*args).items()}
    pallas_gpu.default_configs = changed
    try:
        yield
    finally:
        pallas_gpu.default_configs = defaults
