"""Sequence-parallel attention on the visible GPUs: ring scaling, load balance, longest NSA context.

    python benchmarks/ring.py --sections=scaling,balance,longest --out=/tmp/ring.json
    python benchmarks/ring.py --smoke          # tiny shapes on 8 fake CPU devices (checks the script)

Sections:
- `scaling`: dense causal attention, forward + backward, at a fixed number of tokens per GPU
  (`--tokens_per_gpu`) on sub-meshes of the first 1, 2, 4, ... devices: the ring (`--scheme`,
  `--balance`) through `ContextParallel`, the single-device kernel on one GPU, the cuDNN anchor
  (`jax.nn.dot_product_attention`) on one GPU at the same shape. With n GPUs the sequence is n times
  longer, so each GPU computes about n times the blocks of the 1-GPU run (the exact counts come from
  the balance report); efficiency = t_1 · (max blocks per device on n / blocks on 1) / t_n.
- `step_layouts`: on one GPU, the single-device kernel (no ring, no communication) forward + backward
  over each (device, step) layout that the zigzag ring of `--layout_shards` shards computes at
  `--tokens_per_gpu` tokens per shard: local queries against the visiting shard's K/V with their
  positions. Time per block against the causal layout of one shard separates the layouts' own cost
  from the ring's (RESULTS.md, Ring (a)).
- `check`: values, not time: on all visible devices, the ring (`--scheme`) under zigzag and striped
  balance against the single-device `block_sparse_attention` on the first device, bf16, GQA
  (`--heads` / `--kv_heads`), packed documents (3 cuts), `--check_tokens` tokens: out, lse and the
  gradients of <out, dO> in token order; max |difference| over max |single-device value|. On a GPU both
  run the library's default kernels (on Hopper the Mosaic GPU ones at every ring step).
- `balance`: the per-device, per-step blocks of the balance report, max/mean per device, for dense
  causal attention (zigzag, striped, none) and for NSA's ring branches (selection from real
  compression scores of random projections, without the row's first block, which every device
  serves from a copy; window) at `--balance_tokens` over `--balance_shards`.
  Counting only: the numbers are the same on any backend.
- `longest`: train steps of `configs/nsa_1b_long.py` (`--layers` layers, all devices on `sequence`)
  at the lengths of `--lengths` in order (longest first), each in its own `benchmarks/train_step.py`
  process; records step time and peak memory, or the error (out of memory) of a length that fails,
  and stops at the first length that trains or at `--deadline_s`.

Timing: jitted, `--warmup` untimed calls, then the median of `--steps` calls, each with
`jax.block_until_ready`. Progress lines with timestamps go to stderr.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_list("sections", ["scaling", "balance", "longest"], "Sections to run.")
flags.DEFINE_integer("tokens_per_gpu", 32768, "scaling: sequence tokens per GPU.")
flags.DEFINE_list("gpus", ["1", "2", "4"], "scaling: device counts (sub-meshes of the first devices).")
flags.DEFINE_string("scheme", "ring", "scaling: context scheme.")
flags.DEFINE_string("balance", "zigzag", "scaling: balance scheme.")
flags.DEFINE_integer("heads", 16, "scaling: query heads.")
flags.DEFINE_integer("kv_heads", 8, "scaling: KV heads.")
flags.DEFINE_integer("head_dim", 128, "scaling: head dim.")
flags.DEFINE_integer("block", 128, "scaling: kernel block size (block_q = block_k).")
flags.DEFINE_integer("check_tokens", 16384, "check: sequence length (all devices together).")
flags.DEFINE_integer("layout_shards", 4, "step_layouts: ring size whose per-step layouts are timed.")
flags.DEFINE_integer("balance_tokens", 65536, "balance: sequence length.")
flags.DEFINE_integer("balance_shards", 4, "balance: sequence shards.")
flags.DEFINE_list("lengths", ["1048576", "524288", "262144"], "longest: sequence lengths, longest first.")
flags.DEFINE_integer("layers", 2, "longest: model layers (nsa_1b has 16).")
flags.DEFINE_float("deadline_s", 240.0, "longest: start no new length after this many seconds of the script.")
flags.DEFINE_integer("steps", 5, "Timed calls.")
flags.DEFINE_integer("warmup", 2, "Untimed calls.")
flags.DEFINE_bool("smoke", False, "Tiny shapes on 8 fake CPU devices.")
flags.DEFINE_string("out", None, "Write the results as JSON here.")
flags.DEFINE_string("profile_dir", None, "scaling: also write a Perfetto trace of one call per device count here.")
FLAGS = flags.FLAGS

_T0 = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


def profile(fn, *args, name: str) -> None:
    """One traced call of `fn` under `--profile_dir`/name (Perfetto JSON for offline kernel totals)."""
    import jax
    if FLAGS.profile_dir:
        os.makedirs(os.path.join(FLAGS.profile_dir, name), exist_ok=True)
        with jax.profiler.trace(os.path.join(FLAGS.profile_dir, name), create_perfetto_trace=True):
            jax.block_until_ready(fn(*args))


def timed(fn, *args, steps: int, warmup: int) -> dict:
    import jax
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return {"first_call_s": first, "median_s": statistics.median(times), "min_s": min(times)}


def context_config(n: int, t: int, scheme: str, balance: str, block: int, kind: str = "dense", stripe: int = 0):
    import ml_collections
    from sparsejax.parallel import context
    cfg = ml_collections.ConfigDict(dict(
        mesh=dict(data=1, fsdp=1, sequence=n, tensor=1), parallel=context.default_config(),
        data=dict(seq_len=t), attention=dict(kind=kind)))
    cfg.parallel.update(context_scheme=scheme, balance=balance, block_q=block, block_k=block,
                        stripe_size=stripe or block)
    return cfg


# ----------------------------------------------------------------------------------------- scaling
def scaling() -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from pallas_kernels import BlockLayout, block_sparse_attention
    from sparsejax.parallel import context, mesh as mesh_lib

    dtype = jnp.float32 if FLAGS.smoke else jnp.bfloat16
    h, hkv, d, blk = FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim, FLAGS.block
    rows = []
    base = None
    for n in (int(x) for x in FLAGS.gpus):
        if n > jax.device_count():
            progress(f"scaling: skip {n} GPUs (only {jax.device_count()})")
            continue
        t = n * FLAGS.tokens_per_gpu
        key = jax.random.key(n)
        q, k, v = (jax.random.normal(kk, (1, t, hh, d), dtype) for kk, hh in zip(jax.random.split(key, 3), (h, hkv, hkv)))
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        seg = jnp.ones((1, t), jnp.int32)
        row = {"gpus": n, "seq_len": t, "tokens_per_gpu": FLAGS.tokens_per_gpu}
        if n == 1:
            layout = BlockLayout.causal(t, t, block_q=blk, block_k=blk, num_head_units=hkv)

            def loss(q, k, v):
                return block_sparse_attention(q, k, v, layout, q_segment_ids=seg, kv_segment_ids=seg,
                                              return_lse=False).astype(jnp.float32).sum()
            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            row.update(timed(step, q, k, v, steps=FLAGS.steps, warmup=FLAGS.warmup))
            profile(step, q, k, v, name="gpus1")
            row["blocks_max_per_device"] = int(layout.kv_counts.sum())
            if jax.default_backend() == "gpu":
                anchor = jax.jit(jax.value_and_grad(lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, is_causal=True, implementation="cudnn").astype(jnp.float32).sum(), argnums=(0, 1, 2)))
                try:
                    row["cudnn"] = timed(anchor, q, k, v, steps=FLAGS.steps, warmup=FLAGS.warmup)
                except Exception as e:  # noqa: BLE001 - the anchor is reported, not required
                    row["cudnn"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        else:
            cfg = context_config(n, t, FLAGS.scheme, FLAGS.balance, blk)
            context.validate(cfg, num_devices=n)
            cp = context.from_config(cfg, num_devices=n)
            mesh = mesh_lib.make_mesh(cfg, devices=jax.devices()[:n])
            perm = cp.permutation(t)
            with jax.set_mesh(mesh):
                q, k, v, ppos, pseg = (jnp.take(x, jnp.asarray(perm), axis=1) for x in (q, k, v, pos, seg))
                step = jax.jit(jax.value_and_grad(
                    lambda q, k, v: cp(q, k, v, ppos, pseg)[0].astype(jnp.float32).sum(), argnums=(0, 1, 2)))
                row.update(timed(step, q, k, v, steps=FLAGS.steps, warmup=FLAGS.warmup))
                profile(step, q, k, v, name=f"gpus{n}")
                counts = np.asarray(jax.jit(lambda p, s: cp.block_counts(p, s, num_kv_heads=hkv))(ppos, pseg))
            row["blocks_per_device_step"] = counts.tolist()
            row["blocks_max_per_device"] = int(counts.sum(1).max())
            row["balance_max_over_mean"] = float(counts.sum(1).max() / counts.sum(1).mean())
            row["step_bound"] = float(counts.mean(0).sum() / counts.max(0).sum())
        if base is None and n == 1:
            base = row
        if base is not None:
            ideal = base["median_s"] * row["blocks_max_per_device"] / base["blocks_max_per_device"]
            row["efficiency"] = ideal / row["median_s"]
        rows.append(row)
        progress(f"scaling: {row}")
    return rows


# ------------------------------------------------------------------------------------------- check
def check() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from pallas_kernels import BlockLayout, block_sparse_attention
    from sparsejax.parallel import context, mesh as mesh_lib

    n, t = jax.device_count(), FLAGS.check_tokens
    h, hkv, d, blk = FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim, FLAGS.block
    dtype = jnp.float32 if FLAGS.smoke else jnp.bfloat16
    keys = jax.random.split(jax.random.key(7), 5)
    q, k, v, d_out = (jax.random.normal(kk, (1, t, hh, d), dtype) for kk, hh in zip(keys, (h, hkv, hkv, h)))
    d_lse = jax.random.normal(keys[4], (1, h, t), jnp.float32)
    cuts = np.sort(np.random.default_rng(7).choice(np.arange(1, t), 3, replace=False))
    seg = jnp.asarray(1 + np.searchsorted(cuts, np.arange(t), side="right"), jnp.int32)[None]
    pos = jnp.arange(t, dtype=jnp.int32)[None]

    def loss_and_outputs(attend):
        """jit of (q, k, v, d_out, d_lse) -> ((<out, d_out> + <finite lse, d_lse>, (out, lse)), dq, dk, dv)."""
        def fn(q, k, v, d_out, d_lse):
            out, lse = attend(q, k, v)
            finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
            return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)) + jnp.sum(finite * d_lse), (out, lse)
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))

    layout = BlockLayout.causal(t, t, block_q=blk, block_k=blk, num_head_units=hkv)
    with jax.default_device(jax.devices()[0]):
        (_, (out1, lse1)), grads1 = loss_and_outputs(lambda q, k, v: block_sparse_attention(
            q, k, v, layout, q_segment_ids=seg, kv_segment_ids=seg))(q, k, v, d_out, d_lse)
    want = [np.asarray(x, np.float32) for x in (out1, lse1, *grads1)]
    result = {"devices": n, "seq_len": t, "documents": 4, "heads": h, "kv_heads": hkv, "block": blk}
    for bal in ("zigzag", "striped"):
        cfg = context_config(n, t, FLAGS.scheme, bal, blk)
        context.validate(cfg, num_devices=n)
        cp = context.from_config(cfg, num_devices=n)
        perm = jnp.asarray(cp.permutation(t))
        inv = jnp.argsort(perm)
        with jax.set_mesh(mesh_lib.make_mesh(cfg, devices=jax.devices()[:n])):
            qp, kp, vp, pp, sp, dop = (jnp.take(x, perm, axis=1) for x in (q, k, v, pos, seg, d_out))
            (_, (out, lse)), grads = loss_and_outputs(lambda q, k, v: cp(q, k, v, pp, sp))(
                qp, kp, vp, dop, jnp.take(d_lse, perm, axis=2))
            got = [jnp.take(x, inv, axis=2 if x.ndim == 3 else 1) for x in (out, lse, *grads)]
        errs = {}
        for name, g_, w_ in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            g_ = np.asarray(g_, np.float32)
            both = np.isfinite(w_) & np.isfinite(g_)
            errs[name] = {"max_abs_over_max_ref": float(np.abs(g_ - w_)[both].max() / max(np.abs(w_[both]).max(), 1e-6)),
                          "same_nonfinite": bool((np.isfinite(w_) == np.isfinite(g_)).all()),
                          "nan": bool(np.isnan(g_).any())}
        result[bal] = errs
        progress(f"check {bal}: {errs}")
    return result


# ----------------------------------------------------------------------------------- step_layouts
def step_layouts() -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from pallas_kernels import BlockLayout, block_sparse_attention
    from sparsejax.parallel import context, ring

    dtype = jnp.float32 if FLAGS.smoke else jnp.bfloat16
    h, hkv, d, blk, n, tl = FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim, FLAGS.block, FLAGS.layout_shards, \
        FLAGS.tokens_per_gpu
    cp = context.from_config(context_config(n, n * tl, "ring", "zigzag", blk), num_devices=n)
    perm = np.asarray(cp.permutation(n * tl), np.int32)
    spec = ring.make_spec(axis="sequence", num_shards=n, inner=None, block_q=blk, block_k=blk, head_dim=d)
    key = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (1, tl, hh, d), dtype) for kk, hh in zip(key, (h, hkv, hkv)))
    seg = jnp.ones((1, tl), jnp.int32)

    def time_layout(layout, q_pos, kv_pos):
        def loss(q, k, v):
            return block_sparse_attention(q, k, v, layout, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=seg,
                                          kv_segment_ids=seg, return_lse=False).astype(jnp.float32).sum()
        return timed(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), q, k, v, steps=FLAGS.steps,
                     warmup=FLAGS.warmup)

    causal = BlockLayout.causal(tl, tl, block_q=blk, block_k=blk, num_head_units=hkv)
    base = time_layout(causal, None, None)
    blocks = int(causal.kv_counts.sum())
    rows = [{"layout": "causal", "blocks": blocks, **base, "us_per_block": 1e6 * base["median_s"] / blocks}]
    progress(f"step_layouts: causal {rows[-1]}")
    shard_pos = [jnp.asarray(perm[r * tl:(r + 1) * tl])[None] for r in range(n)]
    for r in (0, n - 1):                  # the two extremes of zigzag: first and last device
        q_ranges = ring.block_ranges(shard_pos[r], seg, blk)
        for step in range(n):
            s = (r - step) % n
            layout = jax.jit(lambda qr, kp, s=s: ring.step_layout(qr, kp, seg, None, s, spec=spec,
                                                                   num_kv_heads=hkv))(q_ranges, shard_pos[s])
            blocks = int(layout.kv_counts.sum())
            row = {"layout": f"device {r} step {step} (shard {s})", "blocks": blocks,
                   **time_layout(layout, shard_pos[r], shard_pos[s])}
            row["us_per_block"] = 1e6 * row["median_s"] / max(blocks, 1)
            row["relative_to_causal"] = row["us_per_block"] / rows[0]["us_per_block"]
            rows.append(row)
            progress(f"step_layouts: {row}")
    return rows


# ----------------------------------------------------------------------------------------- balance
def balance_section() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from sparsejax.attention import nsa
    from sparsejax.attention.compressed import CompressionParams, compressed_segments, document_starts
    from sparsejax.parallel import balance as balance_lib, context, mesh as mesh_lib, nsa_context

    t, n = FLAGS.balance_tokens, FLAGS.balance_shards
    out = {"seq_len": t, "shards": n}
    ratio = lambda c: float(c.sum(1).max() / c.sum(1).mean())
    # every ring step waits for its slowest device: the work-bound efficiency is sum_s mean / sum_s max
    steps_bound = lambda c: float(c.mean(0).sum() / c.max(0).sum())
    for bal in ("zigzag", "striped", "none"):
        cfg = context_config(n, t, "ring", bal, FLAGS.block)
        cp = context.from_config(cfg, num_devices=n)
        perm = cp.permutation(t)
        pos = jnp.asarray(perm)[None]
        with jax.set_mesh(mesh_lib.make_mesh(cfg, devices=jax.devices()[:n])):
            c = np.asarray(jax.jit(lambda p, s: cp.block_counts(p, s, num_kv_heads=1))(pos, jnp.ones_like(pos)))
        out[f"dense_{bal}"] = {"blocks": c.tolist(), "max_over_mean": ratio(c), "step_bound": steps_bound(c)}
        progress(f"balance dense {bal}: {out[f'dense_{bal}']['max_over_mean']:.3f}")

    spec = nsa.NSASpec()                                # the paper's sizes (nsa_1b)
    heads, dh = 16, 128
    key = jax.random.split(jax.random.key(0), 8)
    q = jax.random.normal(key[0], (1, t, heads, dh), jnp.float32)
    k = jax.random.normal(key[1], (1, t, 1, dh), jnp.float32)
    params = CompressionParams(*(0.02 * jax.random.normal(kk, s) for kk, s in zip(
        key[2:7], ((32, dh), (32, dh, 256), (256,), (256, dh), (dh,)))))
    seg = jnp.ones((1, t), jnp.int32)
    for bal in ("zigzag", "striped"):
        cfg = context_config(n, t, "ring", bal, FLAGS.block, stripe=max(FLAGS.block, 128))
        cp = context.from_config(cfg, num_devices=n)
        perm = cp.permutation(t)
        rows = jnp.asarray(perm)
        with jax.set_mesh(mesh_lib.make_mesh(cfg, devices=jax.devices()[:n])):
            def counts(q, k):
                qp, kp = (jnp.take(x, rows, axis=1) for x in (q, k))
                kc, _ = nsa_context.compress_sharded(kp, kp, params, params, spec=spec, cp=cp)
                kv_seg = compressed_segments(seg, kc.shape[1], spec.compress_block, spec.compress_stride)
                start = jnp.take(document_starts(seg), rows, axis=1)
                idx, cnt = nsa_context.select_sharded(qp, kc, kv_seg, seg, rows, start, spec=spec, cp=cp)
                blocks = nsa_context.ring_selection(idx, cnt, t, spec=spec, cp=cp)   # what the ring computes
                pos = jnp.broadcast_to(rows, (1, t))
                slc = cp.block_counts(pos, seg, 1, blocks, block_q=1, block_k=spec.select_block)
                per, nb = spec.window // spec.window_block, t // spec.window_block
                own = perm[::spec.window_block] // spec.window_block
                wo = cp.block_order(t, spec.window_block)
                lo = np.maximum(own - per, 0)
                win_idx = wo[np.minimum(lo[:, None] + np.arange(per + 1), nb - 1)][None, None]
                win_cnt = np.minimum(own - lo + 1, per + 1)[None, None]
                win = cp.block_counts(pos, seg, 1, (jnp.asarray(win_idx, jnp.int32), jnp.asarray(win_cnt, jnp.int32)),
                                      block_q=spec.window_block, block_k=spec.window_block)
                return slc, win
            slc, win = (np.asarray(x) for x in jax.jit(counts)(q, k))
        # selection blocks hold 64 keys for one query; window blocks 64 x 64: weigh by key-query pairs
        total = slc * spec.select_block + win * spec.window_block ** 2
        out[f"nsa_{bal}"] = {"selection_blocks": slc.tolist(), "window_blocks": win.tolist(),
                             "selection_max_over_mean": ratio(slc), "window_max_over_mean": ratio(win),
                             "ring_pairs_max_over_mean": ratio(total), "selection_step_bound": steps_bound(slc),
                             "ring_pairs_step_bound": steps_bound(total)}
        progress(f"balance nsa {bal}: {out[f'nsa_{bal}']}")
    return out


# ----------------------------------------------------------------------------------------- longest
def longest() -> list[dict]:
    """Each length in its own process (`benchmarks/train_step.py`: memory starts empty every time)."""
    import subprocess
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    overrides = [f"--config.model.num_layers={FLAGS.layers}"]
    if FLAGS.smoke:
        overrides += ["--config.model.d_model=64", "--config.model.num_heads=4", "--config.model.head_dim=16",
                      "--config.model.mlp_dim=128", "--config.model.dtype=float32", "--config.attention.nsa.window=128",
                      "--config.attention.nsa.compress_hidden=32", "--config.parallel.block_q=64",
                      "--config.parallel.block_k=64"]
    rows = []
    for t in (int(x) for x in FLAGS.lengths):
        left = FLAGS.deadline_s - (time.perf_counter() - _T0)
        if left < 30:
            rows.append({"seq_len": t, "skipped": f"deadline {FLAGS.deadline_s} s reached"})
            break
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "step.json")
            cmd = [sys.executable, os.path.join(root, "benchmarks", "train_step.py"),
                   f"--config={os.path.join(root, 'configs', 'nsa_1b_long.py')}", f"--config.data.seq_len={t}",
                   *overrides, "--steps=2", "--warmup=1", f"--label=nsa_1b_long_L{FLAGS.layers}_T{t}", f"--out={out}"]
            progress(f"longest: T={t}: {' '.join(cmd[1:])}")
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
                ok = proc.returncode == 0 and os.path.exists(out)
                error = None if ok else (proc.stderr or proc.stdout)[-1500:]
            except subprocess.TimeoutExpired as e:
                ok, error = False, f"timeout after {left:.0f} s: {(e.stderr or b'')[-800:]!r}"
            if ok:
                with open(out) as f:
                    record = json.load(f)
                record.pop("config", None)
                rows.append(record)
                progress(f"longest: T={t} ok: step {record['step_time_s']:.2f} s, peak memory "
                         f"{record['peak_memory_bytes']}, compile {record['compile_s']:.0f} s")
                break
            rows.append({"seq_len": t, "error": error})
            progress(f"longest: T={t} failed: {error[-600:]}")
    return rows


def main(argv):
    del argv
    if FLAGS.smoke:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        FLAGS.tokens_per_gpu, FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim, FLAGS.block = 256, 4, 2, 16, 32
        FLAGS.balance_tokens, FLAGS.lengths, FLAGS.layers, FLAGS.steps, FLAGS.warmup = 4096, ["2048"], 1, 1, 1
        FLAGS.check_tokens = 1024
    import jax
    result = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
              "jax_version": jax.__version__, "devices": jax.device_count(),
              "device_kind": jax.devices()[0].device_kind, "flags": {k: getattr(FLAGS, k) for k in (
                  "tokens_per_gpu", "scheme", "balance", "heads", "kv_heads", "head_dim", "block", "layers")}}
    for section, fn in (("check", check), ("scaling", scaling), ("step_layouts", step_layouts), ("balance", balance_section),
                        ("longest", longest)):
        if section in FLAGS.sections:
            try:
                result[section] = fn()
            except Exception as e:  # noqa: BLE001 - keep the other sections' numbers
                result[section] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
                progress(f"{section} failed: {result[section]['error']}")
            if FLAGS.out:
                with open(FLAGS.out, "w") as f:
                    json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
