"""Timing helpers shared by the benchmark scripts, and the main loop of those run in sections
(`parser`, `run_sections`). Imported as `timing`: the scripts run as `python benchmarks/<name>.py`,
which puts this folder first on sys.path."""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import glob
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback

import jax

# Set by a script's CPU smoke test (--interpret): every timing takes one warm-up and one timed call,
# every profile one call; the numbers are meaningless there, only the code path is exercised.
SMOKE = False


def bench(fn, *args, reps: int = 10, warmup: int = 2, max_s: float = 20.0) -> tuple[float, float]:
    """(median wall time in ms, seconds of the first call) of the jitted `fn(*args)`.

    The first call (compilation included) counts as the first of `warmup` untimed calls; every call
    is synchronised with `block_until_ready`; timing stops early after `max_s` seconds."""
    if SMOKE:
        reps, warmup = 1, 1
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


def run_or_lower(fn, *args, lower_only: bool = False):
    """The jitted `fn(*args)`, synchronised; lower_only: only its lowering for CUDA (None), as a CPU
    smoke test of a script does for a kernel that cannot run there (Mosaic GPU)."""
    if lower_only:
        fn.trace(*args).lower(lowering_platforms=("cuda",))
        return None
    return jax.block_until_ready(fn(*args))


def bench_or_lower(fn, *args, lower_only: bool = False, reps: int = 10) -> tuple[float | None, float]:
    """`bench`, or (None, seconds taken to lower for CUDA) when lower_only."""
    if lower_only:
        start = time.perf_counter()
        run_or_lower(fn, *args, lower_only=True)
        return None, time.perf_counter() - start
    return bench(fn, *args, reps=reps)


def median_ms(fn, *args, **kwargs) -> float:
    """The median of `bench` alone."""
    return bench(fn, *args, **kwargs)[0]


# lines of a GPU plane that repeat kernels already on a stream line (summaries derived from them)
_DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Source code", "Steps", "Launch Stats",
                  "Framework Ops", "Framework Name Scope")


def kernel_profile(fn, *args, calls: int = 2, top: int = 30) -> dict:
    """Where the GPU time of the jitted `fn(*args)` goes: a `jax.profiler` trace of `calls` warm calls,
    its first GPU's kernels summed by name (without a GPU: the XLA CPU client's events). Returns
    {"calls", "gpu_ms" (kernel time per call, all streams added), "kernels": [{"name", "ms",
    "launches"} per call, the `top` largest], "families" (ms by name without XLA's numeric suffix,
    the `top` largest), "other_ms" (the kernels past the `top`), "lines" (the trace lines read),
    "plane"}. Overlapping streams add up, so gpu_ms can exceed the wall time."""
    from jax.profiler import ProfileData

    calls = 1 if SMOKE else calls
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError(f"the profiler wrote no .xplane.pb under {tmp}")
        data = ProfileData.from_file(paths[0])
    planes = sorted((p for p in data.planes if p.name.startswith("/device:GPU")), key=lambda p: p.name)
    if planes:
        plane = planes[0]
        lines = [line for line in plane.lines if line.name not in _DERIVED_LINES]
    else:  # CPU (a smoke test of the scripts): the XLA CPU client's threads
        plane = next((p for p in data.planes if p.name == "/host:CPU"), None)
        if plane is None:
            raise RuntimeError(f"no GPU or host CPU plane in the trace; planes: {[p.name for p in data.planes]}")
        lines = [line for line in plane.lines if line.name.startswith("tf_XLA")]
    ms, launches = collections.defaultdict(float), collections.defaultdict(int)
    for line in lines:
        for event in line.events:
            ms[event.name] += event.duration_ns / 1e6 / calls
            launches[event.name] += 1
    ranked = sorted(ms, key=ms.get, reverse=True)
    families = collections.defaultdict(float)   # XLA's numbered fusions ("loop_fusion.12") by kind
    for n in ms:
        families[re.sub(r"[._]\d+$", "", n)] += ms[n]
    return {"calls": calls, "gpu_ms": sum(ms.values()),
            "kernels": [{"name": n, "ms": ms[n], "launches": launches[n] / calls} for n in ranked[:top]],
            "families": dict(sorted(families.items(), key=lambda kv: -kv[1])[:top]),
            "other_ms": sum(ms[n] for n in ranked[top:]), "lines": [line.name for line in lines],
            "plane": plane.name}


def gpu_ms(fn, *args, calls: int = 3) -> float:
    """`kernel_profile`'s GPU kernel time per call alone."""
    return kernel_profile(fn, *args, calls=calls)["gpu_ms"]


def print_profile(profile: dict, title: str) -> None:
    """The table of `kernel_profile`'s result."""
    print(f"# GPU kernels of {title}: {profile['gpu_ms']:.2f} ms per call ({profile['plane']})", flush=True)
    for k in profile["kernels"]:
        print(f"  {k['ms']:9.3f} ms  {k['launches']:6.0f}x  {k['name'][:110]}")
    print(f"  {profile['other_ms']:9.3f} ms  (the other kernels)")
    print("  by family: " + ", ".join(f"{n} {v:.2f}" for n, v in list(profile["families"].items())[:12]),
          flush=True)


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


@contextlib.contextmanager
def mosaic_bwd_config(**fields):
    """Inside: `mosaic_gpu_bwd.default_config` (the Hopper backward's launch parameters as the
    dispatch picks them) with `fields` replaced (e.g. `split_at_run_time=True`). Functions must be
    traced inside to see it."""
    from pallas_kernels.block_sparse import mosaic_gpu_bwd
    defaults = mosaic_gpu_bwd.default_config
    mosaic_gpu_bwd.default_config = lambda *args: dataclasses.replace(defaults(*args), **fields)
    try:
        yield
    finally:
        mosaic_gpu_bwd.default_config = defaults


def parser(doc: str, sections: dict, default: str, out_name: str) -> argparse.ArgumentParser:
    """An argument parser with the options of every sectioned script: --sections (a comma list of
    names of `sections`; `default` when not given) and --out (the JSON file, default $OUT/out_name)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=default, help=f"comma list of {list(sections)}")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), out_name))
    return p


def int_list(text: str) -> list[int]:
    """An option's comma-separated integers."""
    return [int(x) for x in text.split(",")]


def write_json(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def run_sections(sections: dict, args, results: dict) -> None:
    """A benchmark script's main loop: record the device, versions, date and command line in
    results["meta"], then run sections[name](args) for each name of the comma list `args.sections`,
    writing `results` to the JSON file `args.out` after each (finished sections survive a failure)."""
    unknown = [name for name in args.sections.split(",") if name not in sections]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {list(sections)}")
    dev = jax.devices()[0]
    results["meta"] = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                           python=platform.python_version(), date=datetime.datetime.now(
                               datetime.timezone.utc).isoformat(timespec="seconds"),
                           argv=" ".join(sys.argv))
    print(results["meta"])
    for name in args.sections.split(","):
        t = time.perf_counter()
        sections[name](args)
        print(f"  ({name}: {time.perf_counter() - t:.0f} s)", flush=True)
        write_json(results, args.out)
    print(f"\nwrote {args.out}")
