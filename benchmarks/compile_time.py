"""Compile time of the jitted state initialiser and of the train step, unrolled against scanned layers
(`config.model.scan_layers` False / True), built exactly as the training loop builds them
(`StateFactory.initializer`, `make_train_step`). Nothing runs: both are lowered and compiled ahead of
time from abstract inputs (`jit(...).lower(...).compile()`), so no parameter is allocated.

    JAX_PLATFORMS=cpu python benchmarks/compile_time.py --config=configs/dense_1b.py \\
        --config.model.d_model=512 --config.model.mlp_dim=2048 --config.model.num_heads=4 \\
        --config.data.seq_len=1024 --out=/tmp/compile.json
    python benchmarks/compile_time.py --config=configs/nsa_1b.py --out=$OUT/compile_nsa_1b.json   # GPU

Prints one line per setting (trace+lower seconds and compile seconds of each) and writes them as JSON.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

# Run from a plain checkout too (the GPU machine has no install): `sparsejax` and `configs` live in the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("out", None, "Write the results as JSON to this path.")
flags.DEFINE_list("scan_layers", ["false", "true"], "Settings of config.model.scan_layers to compile.")
FLAGS = flags.FLAGS


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def measure(config) -> dict:
    """Seconds to lower and to compile the initialiser and the train step of `config`."""
    import jax

    from sparsejax.parallel.mesh import batch_sharding, make_mesh, rules_from_config
    from sparsejax.training.optimizer import make_optimizer
    from sparsejax.training.state import StateFactory
    from sparsejax.training.step import BATCH_KEYS, make_train_step

    mesh = make_mesh(config)
    optimizer = make_optimizer(config.train)
    (factory, factory_s) = timed(lambda: StateFactory(config, mesh, optimizer))
    sharding = batch_sharding(mesh, rules_from_config(config))
    shape = (config.data.global_batch_size, config.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, "float32" if k == "loss_mask" else "int32", sharding=sharding)
             for k in BATCH_KEYS}
    step = make_train_step(config, factory.graphdef, optimizer, mesh, factory.shardings, sharding)
    with jax.set_mesh(mesh):
        init_lowered, init_lower_s = timed(lambda: factory.initializer().lower())
        _, init_compile_s = timed(init_lowered.compile)
        step_lowered, step_lower_s = timed(lambda: step.lower(factory.abstract_with_shardings(), batch))
        _, step_compile_s = timed(step_lowered.compile)
    return {"scan_layers": bool(config.model.scan_layers), "num_layers": config.model.num_layers,
            "state_factory_s": factory_s, "init_lower_s": init_lower_s, "init_compile_s": init_compile_s,
            "step_lower_s": step_lower_s, "step_compile_s": step_compile_s}


def main(argv):
    del argv
    import jax
    import ml_collections

    from sparsejax import config as config_lib

    records = []
    for setting in FLAGS.scan_layers:
        if setting not in ("false", "true"):
            raise ValueError(f"--scan_layers takes false/true, got {setting!r}")
        config = ml_collections.ConfigDict(FLAGS.config.to_dict())
        config.model.scan_layers = setting == "true"
        config_lib.validate(config, jax.device_count())
        record = measure(config)
        print(f"scan_layers={record['scan_layers']!s:5} L={record['num_layers']}: initialiser lower "
              f"{record['init_lower_s']:.1f} s, compile {record['init_compile_s']:.1f} s; train step lower "
              f"{record['step_lower_s']:.1f} s, compile {record['step_compile_s']:.1f} s", flush=True)
        records.append(record)
    info = {"backend": jax.default_backend(), "devices": jax.device_count(), "jax": jax.__version__,
            "model": FLAGS.config.model.to_dict(), "attention": FLAGS.config.attention.kind,
            "seq_len": FLAGS.config.data.seq_len, "global_batch_size": FLAGS.config.data.global_batch_size}
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"info": info, "records": records}, f, indent=1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
