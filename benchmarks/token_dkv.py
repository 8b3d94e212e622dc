"""NSA selection's dK/dV on a Hopper GPU: the Mosaic GPU kernel of one-token units
(`pallas_kernels/block_sparse/mosaic_gpu_token_dkv.py`) against the Triton dK/dV of `pallas_gpu`, in
the same run. Prints a table per section and writes every number to a JSON file.

Inputs: bf16, B=1, 64 query heads, 4 KV heads (G = 16), D=128, KV blocks of 64, n=16 blocks per
token (block 0, the token's own block and 14 random earlier ones, as NSA's selection lists), one
document; lse and delta from the Triton forward with random cotangents on out and lse.

Sections (select with --sections, default check,speed):
  check  dk, dv of the Mosaic kernel against the Triton dK/dV (`pallas_gpu.backward` with the
         "dkv" config's mosaic off) at --check-length, and against `reference` (float32) at 512
         tokens: max abs error relative to max |want|, NaN check.
  speed  at each of --lengths: `pallas_gpu.backward` with Triton dK/dV, with this kernel (both
         with the Triton dQ), and this kernel alone; executed TFLOP/s of dK/dV (4 matmuls of
         2·G·64·D FLOPs per list entry and KV block). The same three again without segment ids
         (`kernels.py c` passes none; NSA passes them), "_noseg" in the JSON.

With --interpret (a CPU smoke test) the Mosaic kernel is only lowered for CUDA.

  python benchmarks/token_dkv.py --out $OUT/token_dkv.json
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import timing

from pallas_kernels import BlockLayout
from pallas_kernels.block_sparse import mosaic_gpu_token_dkv as token_dkv
from pallas_kernels.block_sparse import pallas_gpu, reference

RESULTS: dict = {}
HQ, HKV, D, BLOCK_K, N = 64, 4, 128, 64, 16


def inputs(seed, t):
  """(q, k, v, layout, pos, seg, d_out, d_lse, scale) of the NSA selection shape at t tokens."""
  keys = jax.random.split(jax.random.key(seed), 7)
  normal = lambda key, *shape: jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)  # noqa: E731
  q, d_out = normal(keys[0], 1, t, HQ, D), normal(keys[1], 1, t, HQ, D)
  k, v = normal(keys[2], 1, t, HKV, D), normal(keys[3], 1, t, HKV, D)
  own = (jnp.arange(t, dtype=jnp.int32) // BLOCK_K)[None, None, :, None]
  extra = (jax.random.uniform(keys[4], (1, HKV, t, N - 2)) * own).astype(jnp.int32)  # [0, own)
  idx = jnp.concatenate([jnp.zeros_like(own).repeat(HKV, 1), jnp.broadcast_to(own, (1, HKV, t, 1)),
                         extra], axis=-1)
  layout = BlockLayout.from_indices(idx, jnp.full((1, HKV, t), N, jnp.int32), block_q=1,
                                    block_k=BLOCK_K, num_kv_blocks=-(-t // BLOCK_K))
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  seg = jnp.ones((1, t), jnp.int32)
  d_lse = jax.random.normal(keys[5], (1, HQ, t), jnp.float32)
  return q, k, v, layout, pos, seg, d_out, d_lse, 1.0 / np.sqrt(D)


def lse_delta(q, k, v, layout, pos, seg, d_out, d_lse, scale, interpret):
  out, lse = pallas_gpu.forward(q, k, v, layout, pos, pos, seg, seg, sm_scale=scale, causal=True,
                                interpret=interpret)
  row = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  return out, lse, jnp.where(jnp.isneginf(lse), 0.0, row - d_lse)


def backward(mosaic_dkv: bool):
  """pallas_gpu.backward (Triton dQ) with the Mosaic (True) or Triton (False) dK/dV, jitted."""
  def fn(q, k, v, out, lse, delta, d_out, layout, pos, seg, scale):
    with timing.kernel_configs(("dkv",), mosaic=mosaic_dkv):
      return pallas_gpu.backward(q, k, v, out, lse, delta, d_out, layout, pos, pos, seg, seg,
                                 sm_scale=scale, causal=True, interpret=False)
  return jax.jit(fn, static_argnames="scale")


def mosaic_only(q, k, v, out, lse, delta, d_out, layout, pos, seg, scale):
  del out
  return token_dkv.dkv(q, k, v, lse, delta, d_out, layout, pos, pos, seg, seg, sm_scale=scale,
                       causal=True)


def rel_err(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return dict(rel=float(np.abs(got - want).max() / max(1.0, np.abs(want).max())),
              nan=bool(np.isnan(got).any()))


def section_check(args):
  rows = RESULTS.setdefault("check", {})
  q, k, v, layout, pos, seg, d_out, d_lse, scale = inputs(0, args.check_length)
  out, lse, delta = lse_delta(q, k, v, layout, pos, seg, d_out, d_lse, scale, args.interpret)
  fn = jax.jit(mosaic_only, static_argnames="scale")
  if args.interpret:
    fn.trace(q, k, v, out, lse, delta, d_out, layout, pos, seg, scale=scale).lower(
        lowering_platforms=("cuda",))
    print("  check: lowered")
    return
  got = fn(q, k, v, out, lse, delta, d_out, layout, pos, seg, scale=scale)
  want = backward(False)(q, k, v, out, lse, delta, d_out, layout, pos, seg, scale=scale)[1:]
  for name, x, w in zip(("dk", "dv"), got, want):
    rows[f"vs_triton_{name}"] = rel_err(x, w)
  t = 512
  q, k, v, layout, pos, seg, d_out, d_lse, scale = inputs(1, t)
  out, lse, delta = lse_delta(q, k, v, layout, pos, seg, d_out, d_lse, scale, False)
  got = fn(q, k, v, out, lse, delta, d_out, layout, pos, seg, scale=scale)
  _, vjp = jax.vjp(lambda q, k, v: reference.forward(q, k, v, layout, pos, pos, seg, seg, sm_scale=scale,
                                                     causal=True, interpret=False), q, k, v)
  want = vjp((d_out, d_lse))[1:]
  for name, x, w in zip(("dk", "dv"), got, want):
    rows[f"vs_reference_{name}"] = rel_err(x, w)
  for name, r in rows.items():
    print(f"  {name:22s} max rel error {r['rel']:.3g}{'  NaN!' if r['nan'] else ''}")


def section_speed(args):
  rows = RESULTS.setdefault("speed", {})
  print(f"  {'T':>6s} {'bwd triton dkv':>15s} {'bwd mosaic dkv':>15s} {'mosaic dkv':>11s} {'TFLOP/s':>8s}")
  for t in args.lengths:
    q, k, v, layout, pos, seg, d_out, d_lse, scale = inputs(0, t)
    out, lse, delta = lse_delta(q, k, v, layout, pos, seg, d_out, d_lse, scale, args.interpret)
    a = (q, k, v, out, lse, delta, d_out, layout, pos, seg)
    row = {}
    fn = jax.jit(mosaic_only, static_argnames="scale")
    for suffix, args_ in (("", a), ("_noseg", a[:-1] + (None,))):
      if args.interpret:
        fn.trace(*args_, scale=scale).lower(lowering_platforms=("cuda",))
        row["mosaic_dkv_ms" + suffix] = None
        continue
      row["bwd_triton_dkv_ms" + suffix] = timing.bench(functools.partial(backward(False), scale=scale), *args_)[0]
      row["bwd_mosaic_dkv_ms" + suffix] = timing.bench(functools.partial(backward(True), scale=scale), *args_)[0]
      row["mosaic_dkv_ms" + suffix] = timing.bench(functools.partial(fn, scale=scale), *args_)[0]
    entries = float(layout.kv_counts.sum())   # list entries of all KV heads
    flops = 8 * entries * (HQ // HKV) * BLOCK_K * D
    row["mosaic_dkv_tflops"] = flops / row["mosaic_dkv_ms"] / 1e9 if row["mosaic_dkv_ms"] else None
    rows[t] = row
    fmt = lambda x, w: f"{x:{w}.2f}" if x is not None else f"{'lowered':>{w}s}"  # noqa: E731
    print(f"  {t:6d} {fmt(row.get('bwd_triton_dkv_ms'), 15)} {fmt(row.get('bwd_mosaic_dkv_ms'), 15)} "
          f"{fmt(row['mosaic_dkv_ms'], 11)} {fmt(row['mosaic_dkv_tflops'], 8)}", flush=True)
    print(f"  {'no seg':>6s} {fmt(row.get('bwd_triton_dkv_ms_noseg'), 15)} "
          f"{fmt(row.get('bwd_mosaic_dkv_ms_noseg'), 15)} {fmt(row['mosaic_dkv_ms_noseg'], 11)}", flush=True)


SECTIONS = {"check": section_check, "speed": section_speed}


def main():
  p = timing.parser(__doc__, SECTIONS, "check,speed", "token_dkv.json")
  p.add_argument("--lengths", type=timing.int_list, default=[16384, 65536])
  p.add_argument("--check-length", type=int, default=4096)
  p.add_argument("--interpret", action="store_true",
                 help="CPU smoke test: tiny sizes, the Mosaic kernel lowered, Triton interpreted")
  args = p.parse_args()
  if args.interpret:
    args.lengths, args.check_length = [256], 256
  timing.run_sections(SECTIONS, args, RESULTS)


if __name__ == "__main__":
  main()
