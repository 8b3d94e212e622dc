"""The Mosaic GPU block-sparse forward (`pallas_kernels/block_sparse/mosaic_gpu.py`) on a Hopper GPU,
against the Triton-lowered `pallas_gpu` forward and cuDNN in the same run. Prints a table per section
and writes every number to a JSON file.

Sections (select with --sections, default check,dense,sparse,variants):
  check     correctness at a small size against `reference` (float32): max abs error of out and of
            the finite lse, and whether the -inf rows agree. Cases: dense causal (block_k 64 and
            128), a random non-causal layout with empty rows, GQA with one list per KV head
            (Hl = Hkv), segment ids with causal masking, float16 with D = 64, and a layout of batch
            1 broadcast over batch 2; four of them again on a persistent grid of 5 programs.
  dense     dense causal layout, bf16, B=1, H=16 q heads, 16 KV heads, D=128, L in --lengths:
            forward time and TFLOP/s (FLOPs 4*B*H*L^2*D/2) of mosaic_gpu (default config),
            pallas_gpu (`block_sparse_attention(..., implementation="pallas_gpu", return_lse=True)`)
            cuDNN (`jax.nn.dot_product_attention(..., implementation="cudnn", is_causal=True)`) and
            tokamax's Mosaic kernel where it imports (--no-tokamax: not), with the max abs
            difference of mosaic_gpu's out and lse to pallas_gpu's.
  sparse    a random causal layout of 128x128 blocks at --density (each query unit's own block
            kept), L = --sparse-length: mosaic_gpu (default, and a persistent grid of one program
            per SM; each twice; with stagger 0; the same blocks listed as 64-key halves with a ring
            of 2 and of 4 slots) vs pallas_gpu, TFLOP/s over the listed blocks (4*D*128*128 per
            listed block and head), wall time and GPU kernel time; and, as a control, lists of the
            same mean length that are contiguous (a sliding window of blocks).
  variants  launch variants of mosaic_gpu at the dense causal shape, L = --variant-length:
            block_k 64/128 x pipeline stages 2/3/4 (those that fit shared memory: block_k 128 takes
            2), pingpong off, stagger off, softmax fence on, a persistent grid (one program per SM).

With --interpret (a CPU smoke test of the script, tiny sizes) pallas_gpu runs in interpret mode and
mosaic_gpu, which jax cannot interpret, is only lowered for CUDA (its rows say "lowered").

  python benchmarks/mosaic_fwd.py --out $OUT/mosaic_fwd.json
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import timing

from pallas_kernels import BlockLayout, block_sparse_attention
from pallas_kernels.block_sparse import mosaic_gpu

RESULTS: dict = {}
INTERPRET = False


def guarded(name, fn):
  return timing.guarded(name, fn, RESULTS.setdefault("errors", {}))


def qkv(seed, b, t, hq, hkv, d, dtype=jnp.bfloat16):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(key, (b, t, h, d), jnp.float32).astype(dtype)
               for key, h in ((k1, hq), (k2, hkv), (k3, hkv)))


def default_positions(b, tq, tk):
  return (jnp.broadcast_to(tk - tq + jnp.arange(tq, dtype=jnp.int32), (b, tq)),
          jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (b, tk)))


def sm_count():
  """Streaming multiprocessors of the first device (132 on an H200; 132 where jax does not say)."""
  return getattr(jax.devices()[0], "core_count", None) or 132


def mosaic_fn(layout, causal=True, config=None):
  """Jitted mosaic_gpu forward of (q, k, v[, q_seg, kv_seg]) -> (out, lse), default positions."""
  def f(q, k, v, q_seg=None, kv_seg=None):
    q_pos, kv_pos = default_positions(q.shape[0], q.shape[1], k.shape[1])
    return mosaic_gpu.forward(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg,
                              sm_scale=q.shape[-1] ** -0.5, causal=causal, config=config)
  return jax.jit(f)


def pallas_fn(layout, causal=True, impl="pallas_gpu"):
  def f(q, k, v, q_seg=None, kv_seg=None):
    return block_sparse_attention(q, k, v, layout, causal=causal, return_lse=True, implementation=impl,
                                  q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                  interpret=INTERPRET and impl == "pallas_gpu")
  return jax.jit(f)


def cudnn_fn():
  return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                              implementation="cudnn"))


def tokamax_fn():
  import tokamax  # noqa: PLC0415 - optional, only on the GPU machine
  return jax.jit(lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=True,
                                                               implementation="mosaic"))


def run_mosaic(fn, *args):
  """fn(*args) on the GPU; with --interpret only its CUDA lowering (returns None)."""
  return timing.run_or_lower(fn, *args, lower_only=INTERPRET)


def time_mosaic(fn, *args, reps=10):
  """(median ms, first-call s), or (None, lowering s) with --interpret."""
  return timing.bench_or_lower(fn, *args, lower_only=INTERPRET, reps=reps)


def dense_flops(b, h, l, d):
  return 4 * b * h * l * l * d / 2


def causal_layout(l, block_k, heads):
  return BlockLayout.causal(l, l, block_q=128, block_k=block_k, num_head_units=heads)


def random_layout(seed, tq, tk, heads, block_k, density, causal, empty_rows=0.0):
  """Per-head random blocks kept with probability `density` (query units of 128 tokens); causal:
  only blocks at or before the unit's keys, its own blocks always kept; `empty_rows`: the fraction
  of units whose list is empty."""
  nq, nk = tq // 128, tk // block_k
  keys = jax.random.split(jax.random.key(seed), 2)
  mask = jax.random.uniform(keys[0], (1, heads, nq, nk)) < density
  if causal:
    i, j = jnp.arange(nq)[:, None], jnp.arange(nk)[None, :]
    first, last = (i * 128 + tk - tq) // block_k, (i * 128 + 127 + tk - tq) // block_k
    mask = (mask & (j <= last)) | ((j >= first) & (j <= last))
  empty = jax.random.uniform(keys[1], (1, heads, nq, 1)) < empty_rows
  mask = mask & ~empty
  cap = max(1, int(jnp.max(mask.sum(-1))))
  return BlockLayout.from_block_mask(mask, block_q=128, block_k=block_k, max_kv_blocks=cap)


def max_diffs(out, lse, out_ref, lse_ref):
  """max |out - out_ref|, max |lse - lse_ref| over rows finite in both, and whether the -inf rows
  agree."""
  out, out_ref = np.asarray(out, np.float32), np.asarray(out_ref, np.float32)
  lse, lse_ref = np.asarray(lse), np.asarray(lse_ref)
  finite = np.isfinite(lse) & np.isfinite(lse_ref)
  return dict(out_err=float(np.abs(out - out_ref).max()),
              lse_err=float(np.abs(lse - lse_ref)[finite].max(initial=0.0)),
              empty_rows_agree=bool((np.isneginf(lse) == np.isneginf(lse_ref)).all()),
              empty_rows=int(np.isneginf(lse_ref).sum()),
              nan=bool(np.isnan(out).any() or np.isnan(lse).any()))


# ----------------------------------------------------------------------------------------- sections
def section_check(args):
  print("\n== check: mosaic_gpu vs reference (float32), max abs errors ==")
  t = args.check_length
  cases = [
      ("dense causal bk128", dict(hq=4, hkv=4, d=128),
       lambda: causal_layout(t, 128, 4), True, False),
      ("dense causal bk64 GQA2", dict(hq=4, hkv=2, d=128),
       lambda: causal_layout(t, 64, 4), True, False),
      ("random non-causal, empty rows", dict(hq=4, hkv=4, d=128),
       lambda: random_layout(1, t, t, 4, 64, 0.3, causal=False, empty_rows=0.25), False, False),
      ("random causal GQA4 Hl=Hkv", dict(hq=8, hkv=2, d=128),
       lambda: random_layout(2, t, t, 2, 128, 0.4, causal=True), True, False),
      ("segments causal", dict(hq=4, hkv=4, d=128),
       lambda: random_layout(3, t, t, 4, 64, 0.5, causal=True), True, True),
      ("f16 D=64 segments non-causal", dict(hq=2, hkv=2, d=64, dtype=jnp.float16),
       lambda: random_layout(4, t, t, 2, 128, 0.5, causal=False, empty_rows=0.2), False, True),
      ("batch 2, layout batch 1", dict(b=2, hq=2, hkv=1, d=128),
       lambda: causal_layout(t, 128, 2), True, False),
  ]
  persistent = mosaic_gpu.MosaicConfig(num_stages=2, programs=5)  # several items per program
  cases += [(f"{name}, programs=5", sh, make_layout, causal, segments, persistent)
            for name, sh, make_layout, causal, segments in (cases[0], cases[2], cases[3], cases[4])]
  out = {}
  for name, sh, make_layout, causal, segments, *config in cases:
    def run(sh=sh, make_layout=make_layout, causal=causal, segments=segments, config=config):
      layout = make_layout()
      b = sh.get("b", 1)
      q, k, v = qkv(7, b, t, sh["hq"], sh["hkv"], sh["d"], sh.get("dtype", jnp.bfloat16))
      extra = ()
      if segments:  # three segments of random lengths, per batch row
        cuts = jax.random.randint(jax.random.key(5), (b, 2), 1, t)
        seg = (jnp.arange(t)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(jnp.int32)
        extra = (seg, seg)
      got = run_mosaic(mosaic_fn(layout, causal, *config), q, k, v, *extra)
      if got is None:
        return dict(lowered=True)
      want = pallas_fn(layout, causal, impl="reference")(q, k, v, *extra)
      row = max_diffs(*got, *want)
      tol = 2e-2 if q.dtype == jnp.bfloat16 else 4e-3
      row["ok"] = bool(row["out_err"] < tol and row["lse_err"] < 1e-2 and row["empty_rows_agree"]
                       and not row["nan"])
      return row
    r = guarded(f"check/{name}", run)
    out[name] = r
    if r and "ok" in r:
      print(f"  {name:32s} out {r['out_err']:.1e}  lse {r['lse_err']:.1e}  empty rows "
            f"{r['empty_rows']} agree={r['empty_rows_agree']}  NaN={r['nan']}  "
            f"{'OK' if r['ok'] else 'FAIL'}", flush=True)
    elif r:
      print(f"  {name:32s} lowered for CUDA", flush=True)
  RESULTS["check"] = out


def section_dense(args):
  print("\n== dense causal, bf16, B=1, H=16, Hkv=16, D=128: forward TFLOP/s ==")
  rows = []
  for l in args.lengths:
    q, k, v = qkv(l, 1, l, 16, 16, 128)
    flops = dense_flops(1, 16, l, 128)
    layout = causal_layout(l, args.block_k, 16)
    base = {}

    def pallas(layout=layout, q=q, k=k, v=v):
      fn = pallas_fn(layout)
      ms, first = timing.bench(fn, q, k, v)
      base["out"] = fn(q, k, v)
      return dict(ms=ms, first_call_s=first)

    def mosaic(layout=layout, q=q, k=k, v=v):
      fn = mosaic_fn(layout)
      ms, first = time_mosaic(fn, q, k, v)
      row = dict(ms=ms, first_call_s=first, config=dataclasses.asdict(mosaic_gpu.default_config(q, layout)))
      if ms is not None and "out" in base:
        row.update(max_diffs(*fn(q, k, v), *base["out"]))
      return row

    def anchor(make, q=q, k=k, v=v):
      ms, first = timing.bench(make(), q, k, v)
      return dict(ms=ms, first_call_s=first)

    entries = [("pallas_gpu", pallas), ("mosaic_gpu", mosaic), ("cudnn", lambda: anchor(cudnn_fn))]
    if not args.no_tokamax:
      entries.append(("tokamax:mosaic", lambda: anchor(tokamax_fn)))
    at_l = {}
    for name, run in entries:
      r = guarded(f"dense/{name}/{l}", run)
      if r is None:
        continue
      r.update(impl=name, L=l, tflops=flops / r["ms"] / 1e9 if r["ms"] else None)
      rows.append(r)
      at_l[name] = r["ms"]
      _print_row(name, f"L={l:6d}", r)
    if at_l.get("mosaic_gpu"):
      print("  mosaic_gpu speed-up: " + ", ".join(
          f"{at_l[other] / at_l['mosaic_gpu']:.2f}x vs {other}" for other in at_l
          if other != "mosaic_gpu" and at_l[other]), flush=True)
  RESULTS["dense"] = dict(block_k=args.block_k, rows=rows)


def _print_row(name, label, r):
  if r["ms"] is None:
    print(f"  {name:14s} {label}  lowered for CUDA ({r['first_call_s']:.1f} s)", flush=True)
    return
  err = f"  vs pallas_gpu: out {r['out_err']:.1e} lse {r['lse_err']:.1e}" if "out_err" in r else ""
  dev = f"  (GPU {r['gpu_ms']:.3f} ms, kernel {r['kernel_ms']:.3f})" if "gpu_ms" in r else ""
  print(f"  {name:14s} {label}  {r['ms']:8.3f} ms  {r['tflops']:6.0f} TF/s{dev}{err}", flush=True)


def section_sparse(args):
  l, dens = args.sparse_length, args.density
  print(f"\n== random causal 128x128 blocks, density {dens}, L={l}, bf16, H=16, D=128 ==")
  q, k, v = qkv(11, 1, l, 16, 16, 128)
  layout = random_layout(11, l, l, 16, 128, dens, causal=True)
  blocks = int(layout.kv_counts.sum())
  # the control: lists of about the same mean length, but contiguous (the last blocks before the
  # diagonal, a sliding window), so that the same work reads neighbouring K/V blocks
  span = max(1, round(blocks / layout.kv_counts.size))
  window = BlockLayout.sliding_window(l, l, span * 128, block_q=128, block_k=128, num_head_units=16)
  base, rows = {}, []

  def pallas():
    fn = pallas_fn(layout)
    ms, first = timing.bench(fn, q, k, v)
    base["out"] = fn(q, k, v)
    return dict(ms=ms, first_call_s=first, **device_ms(fn, q, k, v))

  def mosaic(config=None, lay=layout):
    fn = mosaic_fn(lay, config=config)
    ms, first = time_mosaic(fn, q, k, v)
    row = dict(ms=ms, first_call_s=first)
    if ms is not None:
      row.update(device_ms(fn, q, k, v))
    if ms is not None and "out" in base and lay is not window:
      row.update(max_diffs(*fn(q, k, v), *base["out"]))
    return row

  persistent = dataclasses.replace(mosaic_gpu.default_config(q, layout), programs=sm_count())
  p_name = f"mosaic_gpu programs={persistent.programs}"
  window_blocks = int(window.kv_counts.sum())
  unstaggered = dataclasses.replace(mosaic_gpu.default_config(q, layout), stagger=0)
  # the same blocks as 64-key halves (two list entries per 128-key block), with a deeper ring
  halves = BlockLayout.from_block_mask(jnp.repeat(layout.dense_block_mask(), 2, axis=-1), block_q=128,
                                       block_k=64)
  half_configs = [dataclasses.replace(mosaic_gpu.default_config(q, halves), num_stages=n) for n in (2, 4)]
  entries = [("pallas_gpu", pallas, blocks), ("mosaic_gpu", mosaic, blocks),
             (p_name, lambda: mosaic(persistent), blocks),
             ("mosaic_gpu (again)", mosaic, blocks), (f"{p_name} (again)", lambda: mosaic(persistent), blocks),
             ("mosaic_gpu stagger=0", lambda: mosaic(unstaggered), blocks),
             *[(f"mosaic_gpu as 64-key halves, {c.num_stages} stages",
                functools.partial(mosaic, c, halves), blocks) for c in half_configs],
             (f"mosaic_gpu contiguous {span}", lambda: mosaic(lay=window), window_blocks),
             (f"{p_name} contiguous {span}", lambda: mosaic(persistent, window), window_blocks)]
  for name, run, nblocks in entries:
    r = guarded(f"sparse/{name}", run)
    if r is None:
      continue
    r.update(impl=name, blocks=nblocks, tflops=4 * 128 ** 3 * nblocks / r["ms"] / 1e9 if r["ms"] else None)
    rows.append(r)
    _print_row(name, f"{nblocks} blocks", r)
  RESULTS["sparse"] = dict(L=l, density=dens, listed_blocks=blocks, rows=rows)


def device_ms(fn, *args):
  """GPU kernel time per call (`timing.kernel_profile`): all kernels, and the attention kernel alone
  (the largest)."""
  prof = timing.kernel_profile(fn, *args, calls=5)
  return dict(gpu_ms=prof["gpu_ms"], kernel_ms=prof["kernels"][0]["ms"])


def section_variants(args):
  l = args.variant_length
  print(f"\n== mosaic_gpu launch variants, dense causal L={l}, bf16, H=16, D=128 ==")
  q, k, v = qkv(l, 1, l, 16, 16, 128)
  flops = dense_flops(1, 16, l, 128)
  fits = lambda bk, s: mosaic_gpu.smem_bytes(128, bk, s, 2, False) <= mosaic_gpu.SMEM_LIMIT  # noqa: E731
  variants = [(bk, mosaic_gpu.MosaicConfig(num_stages=s)) for bk in (128, 64) for s in (2, 3, 4)
              if fits(bk, s)]
  skipped = [f"bk={bk} stages={s}" for bk in (128, 64) for s in (2, 3, 4) if not fits(bk, s)]
  print(f"  (not run, over shared memory: {', '.join(skipped) or 'none'})")
  variants += [(128, mosaic_gpu.MosaicConfig(num_stages=2, pingpong=False)),
               (64, mosaic_gpu.MosaicConfig(num_stages=4, pingpong=False)),
               (128, mosaic_gpu.MosaicConfig(num_stages=2, stagger=0)),
               (128, mosaic_gpu.MosaicConfig(num_stages=2, softmax_fence=True)),
               (64, mosaic_gpu.MosaicConfig(num_stages=4, softmax_fence=True)),
               (128, mosaic_gpu.MosaicConfig(num_stages=2, programs=sm_count()))]
  rows = []
  for bk, cfg in variants:
    label = (f"bk={bk:3d} stages={cfg.num_stages} pingpong={int(cfg.pingpong)} stagger={cfg.stagger:2d} "
             f"fence={int(cfg.softmax_fence)} programs={cfg.programs}")

    def run(bk=bk, cfg=cfg):
      fn = mosaic_fn(causal_layout(l, bk, 16), config=cfg)
      ms, first = time_mosaic(fn, q, k, v)
      return dict(ms=ms, first_call_s=first, **(device_ms(fn, q, k, v) if ms is not None else {}))
    r = guarded(f"variants/{label}", run)
    if r is None:
      continue
    r.update(block_k=bk, **dataclasses.asdict(cfg), tflops=flops / r["ms"] / 1e9 if r["ms"] else None)
    rows.append(r)
    _print_row("mosaic_gpu", label, r)
  RESULTS["variants"] = dict(L=l, rows=rows, skipped_over_shared_memory=skipped)


SECTIONS = dict(check=section_check, dense=section_dense, sparse=section_sparse,
                variants=section_variants)


def main():
  p = timing.parser(__doc__, SECTIONS, "check,dense,sparse,variants", "mosaic_fwd.json")
  p.add_argument("--lengths", type=timing.int_list, default=[8192, 32768])
  p.add_argument("--block-k", type=int, default=128, help="dense section's block_k")
  p.add_argument("--check-length", type=int, default=1024)
  p.add_argument("--sparse-length", type=int, default=32768)
  p.add_argument("--density", type=float, default=0.1)
  p.add_argument("--variant-length", type=int, default=32768)
  p.add_argument("--no-tokamax", action="store_true")
  p.add_argument("--interpret", action="store_true",
                 help="CPU smoke test of the script: tiny sizes, pallas_gpu interpreted, mosaic_gpu lowered")
  args = p.parse_args()
  global INTERPRET
  INTERPRET = args.interpret
  timing.SMOKE = args.interpret
  if INTERPRET:
    args.lengths, args.check_length, args.sparse_length, args.variant_length = [256], 256, 256, 256
    args.no_tokamax = True
  timing.run_sections(SECTIONS, args, RESULTS)


if __name__ == "__main__":
  main()
