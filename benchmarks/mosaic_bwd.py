"""The Mosaic GPU block-sparse backward (`pallas_kernels/block_sparse/mosaic_gpu_bwd.py`) on a Hopper
GPU, against the Triton-lowered `pallas_gpu` backward and cuDNN in the same run. Prints a table per
section and writes every number to a JSON file.

Sections (select with --sections, default check,dense,variants):
  check     dq, dk, dv of mosaic fwd + mosaic bwd (`mosaic_gpu_bwd.attention`, jax.vjp with random
            cotangents on out and lse) against `reference` (float32) at a small size: max abs error
            and max abs error relative to max |reference| per gradient, NaN check. Cases: dense
            causal (block_k 128 and 64 with GQA 2), a random non-causal layout with empty rows,
            random causal GQA 4 with one list per KV head (Hl = Hkv), segment ids with causal
            masking, float16 with D = 64 and segments, a layout of batch 1 broadcast over batch 2;
            then a few of them under the launch variants (overlap, pingpong, dq_sub_k=None), with
            split dK/dV lists (`list_chunk`), with ragged ends (NSA's compression shape:
            Tk = Tq/16 - 1, split; and Tq = Tk = L - 40), and with sliding windows; the
            forward's out too. --check-only picks cases by name.
  dense     dense causal layout, bf16, B=1, H=16 q heads, 16 KV heads, D=128, L in --lengths:
            forward+backward time (jax.grad of sum(out * dO) in q, k, v) and TFLOP/s (FLOPs
            3.5 * 4*B*H*L^2*D/2) of: mosaic fwd + mosaic bwd, mosaic fwd + pallas_gpu bwd,
            pallas_gpu fwd+bwd, cuDNN (`jax.nn.dot_product_attention(..., implementation="cudnn",
            is_causal=True)`); plus mosaic fwd alone (so bwd = fwd+bwd - fwd) and the mosaic
            backward alone (both kernels, 2.5 * 4*B*H*L^2*D/2 FLOPs).
  variants  the mosaic backward at the dense causal shape, L = --variant-length: each kernel alone
            (dQ credited 1.5 forward-equivalents of FLOPs, dK/dV 2) and both, under launch
            variants (`BwdConfig`: pingpong, software pipelining (overlap), dQ key
            sub-block, register split, stagger; block_k 64 with 4 dQ stages).

With --interpret (a CPU smoke test of the script, tiny sizes) the Mosaic kernels are only lowered for
CUDA (their rows say "lowered"), pallas_gpu runs in interpret mode.

  python benchmarks/mosaic_bwd.py --out $OUT/mosaic_bwd.json
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import timing

from pallas_kernels import BlockLayout, block_sparse_attention
from pallas_kernels.block_sparse import mosaic_gpu, mosaic_gpu_bwd, pallas_gpu, split
from sparsejax.attention import compressed as cmp_lib

RESULTS: dict = {}
INTERPRET = False
Cfg = mosaic_gpu_bwd.BwdConfig


OUT_PATH = None


def guarded(name, fn):
  """fn() with its error recorded; RESULTS are written after every row (partial results survive a
  run that is killed, e.g. by a hung kernel under `timeout`)."""
  result = timing.guarded(name, fn, RESULTS.setdefault("errors", {}))
  RESULTS.setdefault("done", []).append(name)
  if OUT_PATH:
    timing.write_json(RESULTS, OUT_PATH)
  return result


def qkv(seed, b, t, hq, hkv, d, dtype=jnp.bfloat16, tk=None):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(key, (b, n, h, d), jnp.float32).astype(dtype)
             for key, n, h in ((k1, t, hq), (k2, tk or t, hkv), (k3, tk or t, hkv)))
  d_out = jax.random.normal(k4, (b, t, hq, d), jnp.float32).astype(dtype)
  return q, k, v, d_out


def positions(b, tq, tk, stride=None):
  """Bottom-right aligned query and key positions; with `stride`, NSA's compression branch's: query
  i at i, compressed key j at its block's last token j·stride + 2·stride − 1 (l = 2d)."""
  if stride:
    return (jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (b, tq)),
            jnp.broadcast_to(cmp_lib.compressed_positions(tk, 2 * stride, stride), (b, tk)))
  return (jnp.broadcast_to(tk - tq + jnp.arange(tq, dtype=jnp.int32), (b, tq)),
          jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (b, tk)))


def causal_layout(l, block_k, heads):
  return BlockLayout.causal(l, l, block_q=128, block_k=block_k, num_head_units=heads)


def random_layout(seed, t, heads, block_k, density, causal, empty_rows=0.0):
  """Per-head random blocks kept with probability `density`; causal: only blocks at or before the
  unit, its own blocks always kept; `empty_rows`: the fraction of units with an empty list."""
  nq, nk = t // 128, t // block_k
  keys = jax.random.split(jax.random.key(seed), 2)
  mask = jax.random.uniform(keys[0], (1, heads, nq, nk)) < density
  if causal:
    i, j = jnp.arange(nq)[:, None], jnp.arange(nk)[None, :]
    first, last = i * 128 // block_k, (i * 128 + 127) // block_k
    mask = (mask & (j <= last)) | ((j >= first) & (j <= last))
  mask = mask & ~(jax.random.uniform(keys[1], (1, heads, nq, 1)) < empty_rows)
  cap = max(1, int(jnp.max(mask.sum(-1))))
  return BlockLayout.from_block_mask(mask, block_q=128, block_k=block_k, max_kv_blocks=cap)


def sink_layout(t, heads):
  """Every 128-block query unit lists block 0 and its own block."""
  i, j = jnp.arange(t // 128)[:, None], jnp.arange(t // 128)[None, :]
  mask = jnp.broadcast_to((j == 0) | (j == i), (1, heads, t // 128, t // 128))
  return BlockLayout.from_block_mask(mask, block_q=128, block_k=128, max_kv_blocks=2)


def attention_fn(impl, layout, causal=True, bwd_config=None, window=None, stride=None):
  """(q, k, v, q_seg, kv_seg) -> (out, lse), default positions, differentiable: impl is
  "mosaic" (mosaic fwd + mosaic bwd), "mosaic+pallas_gpu" (mosaic fwd + pallas_gpu bwd),
  "pallas_gpu" or "reference" (block_sparse_attention)."""
  def f(q, k, v, q_seg=None, kv_seg=None):
    q_pos, kv_pos = positions(q.shape[0], q.shape[1], k.shape[1], stride)
    scale = q.shape[-1] ** -0.5
    if impl in ("pallas_gpu", "reference"):
      return block_sparse_attention(q, k, v, layout, causal=causal, return_lse=True,
                                    q_positions=q_pos, kv_positions=kv_pos,
                                    implementation=impl, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                    interpret=INTERPRET and impl == "pallas_gpu", window=window)
    if impl == "mosaic":
      return mosaic_gpu_bwd.attention(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg, sm_scale=scale,
                                      causal=causal, window=window, bwd_config=bwd_config)
    assert impl == "mosaic+pallas_gpu", impl
    fwd = lambda *a: mosaic_gpu.forward(*a, sm_scale=scale, causal=causal)  # noqa: E731
    bwd = lambda *a: pallas_gpu.backward(*a, sm_scale=scale, causal=causal, interpret=INTERPRET)  # noqa: E731
    return mosaic_gpu_bwd.with_vjp(fwd, bwd)(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg)
  return f


def grad_fn(attend, with_lse_cotangent=True):
  """Jitted (q, k, v, d_out, d_lse, *seg) -> (dq, dk, dv) of sum(out * d_out) [+ sum(lse * d_lse)]."""
  def loss(q, k, v, d_out, d_lse, *seg):
    out, lse = attend(q, k, v, *seg)
    value = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32))
    if with_lse_cotangent:
      value += jnp.sum(jnp.where(jnp.isneginf(lse), 0.0, lse) * d_lse)
    return value
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def cudnn_grad_fn():
  def loss(q, k, v, d_out, d_lse):
    del d_lse
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def uses_mosaic(impl):
  return impl.startswith("mosaic")


def run(fn, *args, mosaic=True):
  """fn(*args) on the GPU; with --interpret and a Mosaic kernel inside, only its CUDA lowering."""
  return timing.run_or_lower(fn, *args, lower_only=INTERPRET and mosaic)


def bench(fn, *args, mosaic=True, reps=10):
  """(median ms, first-call s), or (None, lowering s) with --interpret and a Mosaic kernel."""
  return timing.bench_or_lower(fn, *args, lower_only=INTERPRET and mosaic, reps=reps)


def dense_flops(b, h, l, d):
  return 4 * b * h * l * l * d / 2


def grad_errors(got, want):
  row = {}
  for name, x, w in zip(("dq", "dk", "dv"), got, want):
    x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)
    err = float(np.abs(x - w).max())
    row[f"{name}_err"] = err
    row[f"{name}_rel"] = err / max(1.0, float(np.abs(w).max()))
    row[f"{name}_nan"] = bool(np.isnan(x).any())
  return row


# ----------------------------------------------------------------------------------------- sections
def section_check(args):
  print("\n== check: mosaic fwd+bwd gradients vs reference (float32): max abs / relative errors ==")
  t = args.check_length
  cases = [
      ("dense causal bk128", dict(hq=4, hkv=4, d=128), lambda: causal_layout(t, 128, 4), True, False),
      ("dense causal bk64 GQA2", dict(hq=4, hkv=2, d=128), lambda: causal_layout(t, 64, 4), True, False),
      ("random non-causal, empty rows", dict(hq=4, hkv=4, d=128),
       lambda: random_layout(1, t, 4, 64, 0.3, causal=False, empty_rows=0.25), False, False),
      ("random causal GQA4 Hl=Hkv", dict(hq=8, hkv=2, d=128),
       lambda: random_layout(2, t, 2, 128, 0.4, causal=True), True, False),
      ("segments causal", dict(hq=4, hkv=4, d=128),
       lambda: random_layout(3, t, 4, 64, 0.5, causal=True), True, True),
      ("f16 D=64 segments non-causal", dict(hq=2, hkv=2, d=64, dtype=jnp.float16),
       lambda: random_layout(4, t, 2, 128, 0.5, causal=False, empty_rows=0.2), False, True),
      ("batch 2, layout batch 1", dict(b=2, hq=2, hkv=1, d=128), lambda: causal_layout(t, 128, 2),
       True, False),
  ]
  # the launch variants of the variants section (their async wgmma waits and schedule barriers
  # only run for real on the GPU)
  cases = [c + (None,) for c in cases] + [
      ("dense causal bk128 [overlap]", dict(hq=4, hkv=4, d=128), lambda: causal_layout(t, 128, 4),
       True, False, dict(overlap=True)),
      ("segments causal [overlap]", dict(hq=4, hkv=4, d=128),
       lambda: random_layout(3, t, 4, 64, 0.5, causal=True), True, True, dict(overlap=True)),
      ("dense causal bk128 [pingpong]", dict(hq=4, hkv=4, d=128), lambda: causal_layout(t, 128, 4),
       True, False, dict(pingpong=True)),
      ("random causal GQA4 Hl=Hkv [overlap, dq_sub_k=None]", dict(hq=8, hkv=2, d=128),
       lambda: random_layout(2, t, 2, 128, 0.4, causal=True), True, False,
       dict(overlap=True, dq_sub_k=None, dq_stages=2)),
      # split dK/dV lists (float32 partials summed in order) and ragged ends: NSA's compression
      # attention (Tk = Tq / 16 - 1 compressed keys at stride 16, its layout and positions, GQA 4
      # with a list per KV head, segment ids)
      ("dense causal bk128 [split 2]", dict(hq=4, hkv=4, d=128), lambda: causal_layout(t, 128, 4),
       True, False, dict(list_chunk=2, dkv_stages=2)),
      ("random causal GQA4 Hl=Hkv [split 1, overlap]", dict(hq=8, hkv=2, d=128),
       lambda: random_layout(2, t, 2, 128, 0.4, causal=True), True, False,
       dict(list_chunk=1, dkv_stages=2, overlap=True)),
      ("NSA compression Tk=Tq/16-1 GQA4 segments [split 1]",
       dict(hq=8, hkv=2, d=128, tk=t // 16 - 1, stride=16),
       lambda: cmp_lib.compressed_layout(t, t // 16 - 1, block=32, stride=16, num_kv_heads=2,
                                         block_q=128, block_k=64),
       True, True, dict(list_chunk=1, dkv_stages=3)),
      ("ragged Tq=Tk=L-40 [by shape]", dict(hq=4, hkv=4, d=128, tq=t - 40, tk=t - 40),
       lambda: causal_layout(t - 40, 128, 4), True, False, dict()),
      # sliding windows (NSA's window branch: w = 512 over 128-blocks): without segments (the
      # block-level mask skip, far edge included) and with segments and GQA
      ("window 300 causal bk64", dict(hq=4, hkv=4, d=128, window=300),
       lambda: BlockLayout.sliding_window(t, t, 300, block_q=128, block_k=64, num_head_units=4),
       True, False, None),
      ("window 512 bk128 GQA4 Hl=Hkv segments", dict(hq=8, hkv=2, d=128, window=512),
       lambda: BlockLayout.sliding_window(t, t, 512, block_q=128, block_k=128, num_head_units=2),
       True, True, None),
      # `split_at_run_time` (lax.cond on the longest KV-major list): 4,096 tokens and 16 heads give
      # the whole-list programs it needs. Random 10%: short real lists, the whole branch; block 0 in
      # every list (a sink, as NSA's forced block): the split branch.
      ("random causal 10% bk128 16 heads [split at run time: whole]",
       dict(hq=16, hkv=16, d=128, tq=4096, tk=4096),
       lambda: random_layout(9, 4096, 16, 128, 0.1, causal=True), True, False,
       dict(split_at_run_time=True)),
      ("sink + diagonal bk128 16 heads [split at run time: split]",
       dict(hq=16, hkv=16, d=128, tq=4096, tk=4096), lambda: sink_layout(4096, 16), True, False,
       dict(split_at_run_time=True)),
  ]
  if args.check_only:
    cases = [c for c in cases if any(part in c[0] for part in args.check_only.split(","))]
  out = RESULTS["check"] = {}
  for name, sh, make_layout, causal, segments, changes in cases:
    def check(sh=sh, make_layout=make_layout, causal=causal, segments=segments, changes=changes):
      layout = make_layout()
      b, tq, tk = sh.get("b", 1), sh.get("tq", t), sh.get("tk", t)
      q, k, v, d_out = qkv(7, b, tq, sh["hq"], sh["hkv"], sh["d"], sh.get("dtype", jnp.bfloat16), tk)
      d_lse = jax.random.normal(jax.random.key(8), (b, sh["hq"], tq), jnp.float32)
      seg = ()
      stride = sh.get("stride")
      if segments:  # three segments of random lengths (positions), per batch row
        q_pos, kv_pos = positions(b, tq, tk, stride)
        cuts = jax.random.randint(jax.random.key(5), (b, 2), 1, max(tq, tk))
        ids = lambda pos: (pos[:, :, None] >= cuts[:, None, :]).sum(-1).astype(jnp.int32)  # noqa: E731
        seg = (ids(q_pos), ids(kv_pos))
      cfg = None
      if changes is not None:
        cfg = dataclasses.replace(mosaic_gpu_bwd.default_config(q, layout, k.shape[2]), **changes)
      w = sh.get("window")
      mosaic = attention_fn("mosaic", layout, causal, cfg, w, stride)
      reference = attention_fn("reference", layout, causal, window=w, stride=stride)
      got = run(grad_fn(mosaic), q, k, v, d_out, d_lse, *seg)
      if got is None:
        return dict(lowered=True)
      want = grad_fn(reference)(q, k, v, d_out, d_lse, *seg)
      row = grad_errors(got, want)
      if cfg is not None and mosaic_gpu_bwd.runs_split_test(layout, k.shape[2], b, cfg):
        chunk = mosaic_gpu_bwd.list_chunk(layout, k.shape[2], b, cfg)
        row["split_branch"] = bool(split.longest_list(layout) > 2 * chunk)
      # the forward's out too (lse enters the gradients through d_lse), and how much of the reference
      # is nonzero (a case whose rows all see nothing would check nothing)
      out = jax.jit(mosaic)(q, k, v, *seg)[0]
      out_ref = jax.jit(reference)(q, k, v, *seg)[0]
      row["nonzero_rows"] = float(jnp.mean(jnp.any(out_ref != 0, axis=-1)))
      row["out_err"] = float(jnp.abs(out.astype(jnp.float32) - out_ref.astype(jnp.float32)).max())
      tol = 2e-2
      row["ok"] = all(row[f"{g}_rel"] < tol and not row[f"{g}_nan"] for g in ("dq", "dk", "dv"))
      row["ok"] = row["ok"] and row["out_err"] < 3e-2 and row["nonzero_rows"] > 0.5
      return row
    r = guarded(f"check/{name}", check)
    out[name] = r
    if r and "ok" in r:
      errs = f"rows {r['nonzero_rows']:.2f} out {r['out_err']:.1e}  " + "  ".join(
          f"{g} {r[f'{g}_err']:.1e} ({r[f'{g}_rel']:.1e})" for g in ("dq", "dk", "dv"))
      branch = {True: "  (split branch)", False: "  (whole branch)"}.get(r.get("split_branch"), "")
      print(f"  {name:48s} {errs}  {'OK' if r['ok'] else 'FAIL'}{branch}", flush=True)
    elif r:
      print(f"  {name:48s} lowered for CUDA", flush=True)


def _print_row(name, label, r):
  if r["ms"] is None:
    print(f"  {name:22s} {label}  lowered for CUDA ({r['first_call_s']:.1f} s)", flush=True)
    return
  print(f"  {name:22s} {label}  {r['ms']:8.3f} ms  {r['tflops']:6.0f} TF/s  "
        f"(first call {r['first_call_s']:.1f} s)", flush=True)


_FWD_CACHE: dict = {}


def _backward_only(layout, config, q, k, v, d_out, kernels=("dq", "dkv")):
  """(jitted mosaic backward of (q, k, v, out, lse, delta, d_out), its inputs)."""
  q_pos, kv_pos = positions(q.shape[0], q.shape[1], k.shape[1])
  scale = q.shape[-1] ** -0.5
  key = (q.shape, layout.block_k)
  if key not in _FWD_CACHE:  # the forward's out, lse and delta, once per shape and block_k
    if INTERPRET:
      out = jnp.zeros_like(q)
      lse = jnp.zeros((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)
    else:
      out, lse = jax.jit(lambda q, k, v: mosaic_gpu.forward(
          q, k, v, layout, q_pos, kv_pos, None, None, sm_scale=scale, causal=True))(q, k, v)
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    _FWD_CACHE.clear()
    _FWD_CACHE[key] = out, lse, delta
  out, lse, delta = _FWD_CACHE[key]
  fn = jax.jit(lambda q, k, v, out, lse, delta, d_out: mosaic_gpu_bwd.backward(
      q, k, v, out, lse, delta, d_out, layout, q_pos, kv_pos, None, None, sm_scale=scale,
      causal=True, config=config, kernels=kernels))
  return fn, (q, k, v, out, lse, delta, d_out)


def section_dense(args):
  print("\n== dense causal, bf16, B=1, H=16, Hkv=16, D=128: forward+backward TFLOP/s "
        "(3.5 x 4BHL^2D/2) ==")
  rows = []
  RESULTS["dense"] = dict(block_k=args.block_k, rows=rows)
  for l in args.lengths:
    q, k, v, d_out = qkv(l, 1, l, 16, 16, 128)
    d_lse = jnp.zeros((1, 16, l), jnp.float32)
    unit = dense_flops(1, 16, l, 128)
    layout = causal_layout(l, args.block_k, 16)
    at_l = {}
    entries = [(impl, impl, lambda impl=impl: grad_fn(attention_fn(impl, layout), False),
                uses_mosaic(impl), 3.5)
               for impl in ("mosaic", "mosaic+pallas_gpu", "pallas_gpu")]
    entries.append(("cudnn", "cudnn", cudnn_grad_fn, False, 3.5))

    def fwd_only():
      return jax.jit(lambda q, k, v, d_out, d_lse: attention_fn("mosaic", layout)(q, k, v))
    entries.append(("mosaic fwd only", "mosaic_fwd", fwd_only, True, 1.0))
    for label, name, make, mosaic, factor in entries:
      def one(make=make, mosaic=mosaic):
        ms, first = bench(make(), q, k, v, d_out, d_lse, mosaic=mosaic)
        return dict(ms=ms, first_call_s=first)
      r = guarded(f"dense/{name}/{l}", one)
      if r is None:
        continue
      r.update(impl=name, L=l, flops_factor=factor,
               tflops=factor * unit / r["ms"] / 1e9 if r["ms"] else None)
      rows.append(r)
      at_l[name] = r["ms"]
      _print_row(label, f"L={l:6d}", r)

    def bwd_only():
      fn, ins = _backward_only(layout, None, q, k, v, d_out)
      ms, first = bench(fn, *ins)
      return dict(ms=ms, first_call_s=first)
    r = guarded(f"dense/mosaic_bwd/{l}", bwd_only)
    if r is not None:
      r.update(impl="mosaic_bwd", L=l, flops_factor=2.5,
               tflops=2.5 * unit / r["ms"] / 1e9 if r["ms"] else None,
               config=dataclasses.asdict(mosaic_gpu_bwd.default_config(q, layout)))
      rows.append(r)
      _print_row("mosaic bwd only", f"L={l:6d}", r)
    if at_l.get("mosaic"):
      print("  mosaic fwd+bwd speed-up: " + ", ".join(
          f"{at_l[o] / at_l['mosaic']:.2f}x vs {o}" for o in ("mosaic+pallas_gpu", "pallas_gpu", "cudnn")
          if at_l.get(o)), flush=True)


def section_variants(args):
  l = args.variant_length
  print(f"\n== mosaic backward alone, launch variants, dense causal L={l}, bf16, H=16, D=128 "
        "(2.5 x 4BHL^2D/2) ==")
  q, k, v, d_out = qkv(l, 1, l, 16, 16, 128)
  unit = dense_flops(1, 16, l, 128)
  # (block_k, changes to default_config, kernels timed)
  variants = [(128, {}, "dq"), (128, {}, "dkv"), (128, dict(pingpong=True), "dq"),
              (128, dict(pingpong=True), "dkv"), (128, dict(dq_sub_k=None, dq_stages=2), "dq"),
              (128, dict(dkv_stages=2), "dkv"), (128, dict(dq_stages=2), "dq"),
              (128, dict(registers=(232, 40)), "dq"), (128, dict(registers=(232, 40)), "dkv"),
              (128, dict(overlap=True), "dq"), (128, dict(overlap=True, dq_sub_k=None, dq_stages=2), "dq"),
              (128, dict(overlap=True), "dkv"), (128, dict(overlap=True, registers=(232, 40)), "dkv"),
              (128, dict(overlap=True), "dq,dkv"),
              (128, dict(stagger=0), "dq,dkv"), (128, dict(pingpong=True), "dq,dkv"),
              (64, {}, "dq,dkv"), (64, dict(pingpong=True), "dq,dkv"), (64, dict(overlap=True), "dq,dkv")]
  rows = []
  RESULTS["variants"] = dict(L=l, rows=rows)
  # FLOPs credited: dQ kernel 1.5 units (S, dP, dQ), dK/dV kernel 2 (Sᵀ, dPᵀ, dV, dK); both 2.5
  share = {"dq": 1.5, "dkv": 2.0, "dq,dkv": 2.5}
  for bk, changes, kernels in variants:
    cfg = dataclasses.replace(mosaic_gpu_bwd.default_config(q, causal_layout(l, bk, 16)), **changes)
    label = (f"{kernels:6s} bk={bk:3d} stages={cfg.dq_stages}/{cfg.dkv_stages} "
             f"dq_sub_k={cfg.dq_sub_k} pingpong={int(cfg.pingpong)} overlap={int(cfg.overlap)} "
             f"regs={cfg.registers[0]}/"
             f"{cfg.registers[1]} stagger={cfg.stagger}")

    def one(bk=bk, cfg=cfg, kernels=kernels):
      fn, ins = _backward_only(causal_layout(l, bk, 16), cfg, q, k, v, d_out, tuple(kernels.split(",")))
      ms, first = bench(fn, *ins)
      return dict(ms=ms, first_call_s=first)
    r = guarded(f"variants/{label}", one)
    if r is None:
      continue
    r.update(block_k=bk, kernels=kernels, **dataclasses.asdict(cfg),
             tflops=share[kernels] * unit / r["ms"] / 1e9 if r["ms"] else None)
    rows.append(r)
    _print_row("mosaic bwd", label, r)


SECTIONS = dict(check=section_check, dense=section_dense, variants=section_variants)


def main():
  p = timing.parser(__doc__, SECTIONS, "check,dense,variants", "mosaic_bwd.json")
  p.add_argument("--lengths", type=timing.int_list, default=[8192, 32768])
  p.add_argument("--block-k", type=int, default=128, help="dense section's block_k")
  p.add_argument("--check-length", type=int, default=1024)
  p.add_argument("--check-only", default="",
                 help="check only the cases whose name contains one of these comma-separated parts")
  p.add_argument("--variant-length", type=int, default=32768)
  p.add_argument("--interpret", action="store_true",
                 help="CPU smoke test of the script: tiny sizes, Mosaic kernels lowered, pallas_gpu interpreted")
  args = p.parse_args()
  global INTERPRET, OUT_PATH
  INTERPRET, OUT_PATH = args.interpret, args.out
  timing.SMOKE = args.interpret
  if INTERPRET:
    args.lengths, args.check_length, args.variant_length = [256], 256, 256
  timing.run_sections(SECTIONS, args, RESULTS)


if __name__ == "__main__":
  main()
