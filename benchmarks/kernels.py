"""Speed of the `pallas_gpu` block-sparse attention kernels on a GPU, with cuDNN and tokamax timed in
the same run. Prints a table per section and writes every number to a JSON file.

Sections (select with --sections, default check,a,b,c):
  check  correctness at a moderate size: pallas_gpu against `xla` and `reference` for out, lse, dq,
         dk, dv (relative Frobenius error), bf16 and f32, dense, sparse, segments, NSA shapes.
  a      dense causal layout, bf16, B=1, H=16, D=128, L in --dense-lengths: forward and
         forward+backward TFLOP/s (FLOPs 4*B*H*L^2*D/2 forward, 3.5x that for forward+backward),
         against cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`) and tokamax
         (`mosaic` and `triton`, where it imports); wall time and GPU kernel time.
  b      time against block density (1, .5, .25, .1, .05; random causal blocks of --density-block
         (64: the Triton kernels; 128: the Mosaic GPU kernels on Hopper) per head with the diagonal
         kept) at --density-lengths, relative to the dense causal layout of the same blocks: the
         wall time of a synchronised call (which includes the host's dispatch, ~0.3 ms) and the GPU
         kernels' time per call (`timing.kernel_profile`); also forward+backward with the dK/dV
         list split decided by shape alone (`split_at_run_time` off in the Mosaic backward,
         128-blocks, or the Triton one, 64-blocks; GPU time).
  c      NSA-shaped selection: 64 query heads, 4 KV heads, D=128, KV block 64, 16 blocks per token
         (block 0 and the token's own block always, the rest random causal), T in --nsa-lengths;
         and the same kernels on the community NSA benchmark's selections (`anchor_layout`: top-16
         of random scores over all blocks, block 0 put in, future blocks dropped), the pattern
         behind gpu-anchors.md's figures for its Triton kernel. Wall and GPU kernel times.
  determinism  bitwise repeatability of out, dq, dk, dv over two calls, pallas_gpu and xla, on
         random causal layouts (64- and 128-blocks) and NSA-shaped one-token units at 4,096 tokens.
  tune   launch-parameter sweep of the three kernels at the dense 32k shape.
  tune_nsa  the same at the NSA shape (--tune-nsa-length).
  tune_density  launch-parameter variants at section b's layouts (L = --tune-length), each timed at
         density 1 and --tune-density so that the ratio compares like with like.
  lists  time per listed block over list shapes and `KernelConfig.stagger` spans of the Triton
         kernels (--lists-staggers; forward and forward+backward, bf16, 16 q / 8 KV heads, D=128,
         128x128 blocks, T = --lists-length): ramp (causal), uniform_prefix (every row blocks
         0..nq/2-1, all keys visible), uniform_band (row i: blocks i-j mod nq, j < nq/2), bimodal
         (half the rows empty, half all nq blocks) and nsa_select (section c's layout); with each
         staggered result's difference to the unstaggered one.

  python benchmarks/kernels.py --out $OUT/kernels.json
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import timing
from timing import median_ms

from pallas_kernels import BlockLayout, block_sparse_attention
from pallas_kernels.block_sparse import pallas_gpu

RESULTS: dict = {}
INTERPRET = False  # --interpret: run the Pallas kernels in interpret mode (a CPU smoke test of this script)


def guarded(name, fn):
  return timing.guarded(name, fn, RESULTS.setdefault("errors", {}))


def randn(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def qkv(seed, b, t, hq, hkv, dqk, dv, dtype=jnp.bfloat16):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  return (randn(k1, (b, t, hq, dqk), dtype), randn(k2, (b, t, hkv, dqk), dtype),
          randn(k3, (b, t, hkv, dv), dtype), randn(k4, (b, t, hq, dv), dtype))


# ------------------------------------------------------------------------------------ attention fns
def sparse_fns(layout, impl="pallas_gpu", configs=None):
  """(forward, forward+backward) jitted functions of (q, k, v, do) for a block layout (the forward
  returns out, the forward+backward (dq, dk, dv) for the cotangent do)."""
  def attend(q, k, v):
    return block_sparse_attention(q, k, v, layout, implementation=impl, interpret=INTERPRET)

  if configs is not None:
    def attend(q, k, v):  # noqa: F811 - direct kernel call with explicit launch parameters
      return _direct(q, k, v, layout, configs)

  return jax.jit(lambda q, k, v, do: attend(q, k, v)[0]), forward_backward(lambda q, k, v: attend(q, k, v)[0])


def forward_backward(attend):
  """Jitted (q, k, v, do) -> (dq, dk, dv): `attend`'s forward and its backward from the cotangent do
  of its output (jax.vjp), nothing else (until 2026-11-29 15:20 the gradient of <out, do>, whose
  float32 product and casts added ~0.1-0.2 ms at 32k to every forward+backward row)."""
  def fwd_bwd(q, k, v, do):
    _, pull = jax.vjp(attend, q, k, v)
    return pull(do)
  return jax.jit(fwd_bwd)


def _direct(q, k, v, layout, configs):
  """pallas_gpu with explicit KernelConfigs, differentiable (same algebra as api.py)."""
  tq, tk = q.shape[1], k.shape[1]
  q_pos = jnp.broadcast_to(tk - tq + jnp.arange(tq, dtype=jnp.int32), (q.shape[0], tq))
  kv_pos = jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (k.shape[0], tk))
  scale = q.shape[-1] ** -0.5

  @jax.custom_vjp
  def f(q, k, v):
    return pallas_gpu.forward(q, k, v, layout, q_pos, kv_pos, None, None, sm_scale=scale,
                              causal=True, interpret=INTERPRET, config=configs["fwd"])

  def f_fwd(q, k, v):
    out, lse = f(q, k, v)
    return (out, lse), (q, k, v, out, lse)

  def f_bwd(res, cot):
    q, k, v, out, lse = res
    d_out, d_lse = cot
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta = jnp.where(jnp.isneginf(lse), 0.0, delta - d_lse)
    return pallas_gpu.backward(q, k, v, out, lse, delta, d_out.astype(q.dtype), layout, q_pos, kv_pos,
                               None, None, sm_scale=scale, causal=True, interpret=INTERPRET,
                               configs=configs)

  f.defvjp(f_fwd, f_bwd)
  return f(q, k, v)


def dense_fns(kind):
  """cuDNN / tokamax dense causal attention as (forward, forward+backward) of (q, k, v, do)."""
  if kind == "cudnn":
    attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,  # noqa: E731
                                                          implementation="cudnn")
  else:
    import tokamax  # noqa: PLC0415 - optional, only on the GPU machine
    impl = kind.split(":")[1]
    attend = lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=True,  # noqa: E731
                                                           implementation=impl)
  return jax.jit(lambda q, k, v, do: attend(q, k, v)), forward_backward(attend)


def dense_flops(b, h, l, d):
  return 4 * b * h * l * l * d / 2


# ------------------------------------------------------------------------------------------ layouts
def random_causal_layout(seed, l, h, block, density):
  """Per-head random causal block x block tiles kept with probability `density`, the diagonal always kept."""
  n = l // block
  i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
  keep = jax.random.uniform(jax.random.key(seed), (1, h, n, n)) < density
  mask = ((keep & (j < i)) | (j == i)) & (j <= i)
  cap = int(jnp.max(mask.sum(-1)))
  return BlockLayout.from_block_mask(mask, block_q=block, block_k=block, max_kv_blocks=cap)


def sink_layout(l, h, block):
  """Every query block lists block 0 and its own block (a sink, like NSA's forced block 0)."""
  n = l // block
  i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
  mask = jnp.broadcast_to((j == 0) | (j == i), (1, h, n, n))
  return BlockLayout.from_block_mask(mask, block_q=block, block_k=block, max_kv_blocks=2)


def nsa_layout(seed, t, hkv, block_k=64, top=16):
  """Per token and KV head: block 0, the token's own block and random other causal blocks, `top` in
  all (fewer where fewer are causal)."""
  nk = t // block_k
  own = (jnp.arange(t) // block_k)[:, None]
  blocks = jnp.arange(nk)[None, :]
  scores = jax.random.uniform(jax.random.key(seed), (1, hkv, t, nk), jnp.float32)
  scores = jnp.where((blocks == 0) | (blocks == own), 2.0, scores)
  scores = jnp.where(blocks <= own, scores, -jnp.inf)
  return BlockLayout.top_k(scores, min(top, nk), block_q=1, block_k=block_k)


def anchor_layout(seed, t, hkv, block_k=64, top=16):
  """The selections of the community NSA kernel's own benchmark (`generate_topk_idx_example` in
  XunhaoLai/native-sparse-attention-triton), the pattern its timings in gpu-anchors.md ran on: per
  token and KV head, the `top` largest of random normal scores over *all* T/block_k blocks, sorted,
  the smallest replaced by block 0, then every block after the token's own dropped. A token at
  fraction f of the sequence keeps about 1 + (top − 1)·f blocks (~8.5 on average, not 16)."""
  nk = t // block_k
  scores = jax.random.normal(jax.random.key(seed), (1, hkv, t, nk), jnp.float32)
  idx = jnp.sort(jax.lax.top_k(scores, min(top, nk))[1], axis=-1).at[..., 0].set(0)
  own = (jnp.arange(t) // block_k)[None, None, :, None]
  counts = (idx <= own).sum(-1).astype(jnp.int32)     # sorted: the kept blocks are a prefix
  return BlockLayout.from_indices(idx, counts, block_q=1, block_k=block_k, num_kv_blocks=nk)


# ----------------------------------------------------------------------------------------- sections
def section_check(args):
  print("\n== check: pallas_gpu vs xla and reference (relative Frobenius error) ==")
  t = args.check_length
  t_pad = -(-t // 64) * 64
  cases = [
      ("dense causal bf16 128/64", dict(t=t, hq=4, hkv=4, dqk=128, dv=128, dtype=jnp.bfloat16),
       lambda: BlockLayout.causal(t, t, block_q=128, block_k=64, num_head_units=4)),
      ("random 64-blocks per head f32 GQA2 ragged", dict(t=t - 24, hq=4, hkv=2, dqk=64, dv=64,
                                                          dtype=jnp.float32),
       lambda: random_causal_layout(1, t_pad, 4, 64, 0.3)),
      ("NSA 1-token units G16 192/128 bf16", dict(t=t // 2, hq=32, hkv=2, dqk=192, dv=128,
                                                   dtype=jnp.bfloat16),
       lambda: nsa_layout(2, t // 2, 2)),
      # Dqk = Dv: on Hopper the dK/dV of one-token units runs the Mosaic GPU kernel
      ("NSA 1-token units G16 128/128 bf16", dict(t=t, hq=32, hkv=2, dqk=128, dv=128,
                                                   dtype=jnp.bfloat16),
       lambda: nsa_layout(3, t, 2)),
      # 4t tokens, 16 heads of 64-blocks: enough dK/dV programs for the Triton backward's
      # `split_at_run_time`. Random 10%: whole lists; block 0 in every list: split
      ("random 64-blocks 10% 16 heads bf16 (whole at run time)",
       dict(t=4 * t, hq=16, hkv=16, dqk=64, dv=64, dtype=jnp.bfloat16),
       lambda: random_causal_layout(4, 4 * t, 16, 64, 0.1)),
      ("sink + diagonal 64-blocks 16 heads bf16 (split at run time)",
       dict(t=4 * t, hq=16, hkv=16, dqk=64, dv=64, dtype=jnp.bfloat16),
       lambda: sink_layout(4 * t, 16, 64)),
  ]
  out = {}
  for name, sh, make_layout in cases:
    def run(name=name, sh=sh, make_layout=make_layout):
      layout = make_layout()
      q, k, v, do = qkv(0, 1, sh["t"], sh["hq"], sh["hkv"], sh["dqk"], sh["dv"], sh["dtype"])
      dlse = jax.random.normal(jax.random.key(9), (1, sh["hq"], sh["t"]))
      res = {}
      for impl in ("pallas_gpu", "xla", "reference"):
        def f(q, k, v, impl=impl):
          return block_sparse_attention(q, k, v, layout, implementation=impl,
                                        interpret=INTERPRET and impl == "pallas_gpu")
        (o, lse), vjp = jax.vjp(f, q, k, v)
        grads = vjp((do, jnp.where(jnp.isneginf(lse), 0.0, dlse)))
        res[impl] = [np.asarray(x, np.float32) for x in (o, jnp.where(jnp.isneginf(lse), 0, lse), *grads)]
      row = {}
      for other in ("xla", "reference"):
        row[other] = {n: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
                      for n, a, b in zip(("out", "lse", "dq", "dk", "dv"), res["pallas_gpu"], res[other])}
      row["nan"] = bool(any(np.isnan(a).any() for a in res["pallas_gpu"]))
      print(f"  {name:40s} vs reference: " +
            " ".join(f"{n}={e:.1e}" for n, e in row["reference"].items()) + f"  NaN={row['nan']}")
      return row
    out[name] = guarded(f"check/{name}", run)
  RESULTS["check"] = out


def section_dense(args):
  print("\n== a: dense causal, bf16, B=1, H=16, D=128 (TFLOP/s) ==")
  rows = []
  for l in args.dense_lengths:
    q, k, v, do = qkv(l, 1, l, 16, 16, 128, 128)
    flops = dense_flops(1, 16, l, 128)
    entries = {"pallas_gpu": lambda: sparse_fns(
        BlockLayout.causal(l, l, block_q=args.block_q, block_k=args.block_k, num_head_units=16))}
    entries["cudnn"] = lambda: dense_fns("cudnn")
    if not args.no_tokamax:
      entries["tokamax:mosaic"] = lambda: dense_fns("tokamax:mosaic")
      entries["tokamax:triton"] = lambda: dense_fns("tokamax:triton")
    for name, make in entries.items():
      def run(make=make):
        fwd, fwd_bwd = make()
        reps = 10 if l <= 32768 else 4
        t_f = median_ms(fwd, q, k, v, do, reps=reps)
        t_fb = median_ms(fwd_bwd, q, k, v, do, reps=reps)
        g_f, g_fb = timing.gpu_ms(fwd, q, k, v, do), timing.gpu_ms(fwd_bwd, q, k, v, do)
        return dict(fwd_ms=t_f, fwd_bwd_ms=t_fb, fwd_tflops=flops / t_f / 1e9,
                    fwd_bwd_tflops=3.5 * flops / t_fb / 1e9, fwd_gpu_ms=g_f, fwd_bwd_gpu_ms=g_fb,
                    fwd_gpu_tflops=flops / g_f / 1e9, fwd_bwd_gpu_tflops=3.5 * flops / g_fb / 1e9)
      r = guarded(f"a/{name}/{l}", run)
      if r:
        rows.append(dict(impl=name, L=l, **r))
        print(f"  {name:16s} L={l:6d}  fwd {r['fwd_ms']:8.2f} ms {r['fwd_tflops']:6.0f} TF/s   "
              f"fwd+bwd {r['fwd_bwd_ms']:8.2f} ms {r['fwd_bwd_tflops']:6.0f} TF/s   GPU time: "
              f"{r['fwd_gpu_tflops']:6.0f} / {r['fwd_bwd_gpu_tflops']:6.0f} TF/s", flush=True)
  RESULTS["dense"] = dict(block_q=args.block_q, block_k=args.block_k, rows=rows)


def section_density(args):
  bl = args.density_block
  print(f"\n== b: time vs block density (per-head random causal {bl}x{bl} blocks, diagonal kept) ==")
  RESULTS["density_block"] = bl
  rows = []
  for l in args.density_lengths:
    q, k, v, do = qkv(l + 1, 1, l, 16, 16, 128, 128)
    base = None
    for dens in (1.0, 0.5, 0.25, 0.1, 0.05):
      def run(dens=dens):
        layout = random_causal_layout(3, l, 16, bl, dens)
        visited = float(layout.kv_counts.sum()) / (16 * (l // bl) * (l // bl + 1) / 2)
        fwd, fwd_bwd = sparse_fns(layout)
        reps = 10 if l <= 32768 else 5
        prof = timing.kernel_profile(fwd_bwd, q, k, v, do, calls=3, top=6)
        row = dict(fwd_ms=median_ms(fwd, q, k, v, do, reps=reps),
                   fwd_bwd_ms=median_ms(fwd_bwd, q, k, v, do, reps=reps), causal_fraction=visited,
                   fwd_gpu_ms=timing.gpu_ms(fwd, q, k, v, do),
                   fwd_bwd_gpu_ms=prof["gpu_ms"], fwd_bwd_kernels=prof["kernels"])
        # A/B: the dK/dV list split decided by shape alone (Mosaic backward for 128-blocks, Triton's for 64)
        with (timing.mosaic_bwd_config(split_at_run_time=False) if bl == 128 else
              timing.kernel_configs(("dkv",), split_at_run_time=False)):
          _, fb_static = sparse_fns(layout)
          row["fwd_bwd_gpu_ms_static_split"] = timing.gpu_ms(fb_static, q, k, v, do)
        return row
      r = guarded(f"b/{l}/{dens}", run)
      if r is None:
        continue
      if dens == 1.0:
        base = r
      if base:
        for key in ("fwd_ms", "fwd_bwd_ms", "fwd_gpu_ms", "fwd_bwd_gpu_ms"):
          r[key.replace("_ms", "_rel")] = r[key] / base[key]
      rows.append(dict(L=l, density=dens, **r))
      nan = float("nan")
      print(f"  L={l:6d} density {dens:4.2f} (kept {r['causal_fraction']:.3f} of causal blocks)  "
            f"fwd {r['fwd_ms']:8.2f} ms ({r.get('fwd_rel', nan):.3f}), GPU {r['fwd_gpu_ms']:8.2f} ms "
            f"({r.get('fwd_gpu_rel', nan):.3f})  fwd+bwd {r['fwd_bwd_ms']:8.2f} ms "
            f"({r.get('fwd_bwd_rel', nan):.3f}), GPU {r['fwd_bwd_gpu_ms']:8.2f} ms "
            f"({r.get('fwd_bwd_gpu_rel', nan):.3f})", flush=True)
      print("    fwd+bwd GPU kernels: " + ", ".join(f"{x['name'][:40]} {x['ms']:.3f}"
                                                  for x in r["fwd_bwd_kernels"]), flush=True)
      if "fwd_bwd_gpu_ms_static_split" in r:
        print(f"    fwd+bwd GPU with the dK/dV split decided by shape alone: "
              f"{r['fwd_bwd_gpu_ms_static_split']:.2f} ms", flush=True)
  RESULTS["density"] = rows


def section_nsa(args):
  print("\n== c: NSA selection, 64 q heads, 4 KV heads, D=128, block_k 64, top-16 per token ==")
  rows = []
  patterns = {"causal16": nsa_layout, "anchor": anchor_layout}
  for t in args.nsa_lengths:
    q, k, v, do = qkv(t + 2, 1, t, 64, 4, 128, 128)
    for pattern, make in patterns.items():
      def run(t=t, make=make):
        layout = make(4, t, 4)
        fwd, fwd_bwd = sparse_fns(layout)
        visited = float(layout.kv_counts.sum())
        flops = 4 * visited * 16 * 64 * 128        # useful work: kept blocks x 16 heads x 64 keys
        t_f, t_fb = median_ms(fwd, q, k, v, do), median_ms(fwd_bwd, q, k, v, do)
        return dict(fwd_ms=t_f, fwd_bwd_ms=t_fb, fwd_tflops=flops / t_f / 1e9,
                    fwd_bwd_tflops=3.5 * flops / t_fb / 1e9, blocks_per_token=visited / (4 * t),
                    fwd_gpu_ms=timing.gpu_ms(fwd, q, k, v, do),
                    fwd_bwd_gpu_ms=timing.gpu_ms(fwd_bwd, q, k, v, do))
      r = guarded(f"c/{pattern}/{t}", run)
      if r:
        rows.append(dict(T=t, pattern=pattern, **r))
        print(f"  T={t:6d} {pattern:9s} fwd {r['fwd_ms']:8.2f} ms ({r['fwd_tflops']:.0f} TF/s useful)   "
              f"fwd+bwd {r['fwd_bwd_ms']:8.2f} ms ({r['fwd_bwd_tflops']:.0f} TF/s)  "
              f"blocks/token {r['blocks_per_token']:.2f}  GPU {r['fwd_gpu_ms']:.2f} / "
              f"{r['fwd_bwd_gpu_ms']:.2f} ms", flush=True)

      def triton_dkv(t=t, make=make):
        """A/B in the same run: forward+backward with the Triton dK/dV kernel (on Hopper the default
        is the Mosaic GPU kernel for one-token units)."""
        with timing.kernel_configs(kernels=("dkv",), mosaic=False):
          _, fwd_bwd = sparse_fns(make(4, t, 4))
          return median_ms(fwd_bwd, q, k, v, do)
      ab = guarded(f"c/{pattern}/{t}/triton_dkv", triton_dkv)
      if ab:
        rows.append(dict(T=t, pattern=pattern, variant="triton_dkv", fwd_bwd_ms=ab))
        print(f"  T={t:6d} {pattern:9s} fwd+bwd with the Triton dK/dV {ab:8.2f} ms", flush=True)
  RESULTS["nsa"] = rows


def section_determinism(args):
  """Bitwise repeatability: each implementation's out, dq, dk, dv from two calls on the same inputs,
  on a random causal layout (many query units share each KV block, so an atomic accumulation of
  dK/dV would show) and on NSA-shaped one-token units, bf16."""
  print("\n== determinism: two calls, bitwise equal? ==")
  rows = []
  l = 256 if INTERPRET else 4096
  cases = {"random_64x64_gqa2": (random_causal_layout(7, l, 8, 64, 0.3), (l, 16, 8)),
           "random_128x128": (random_causal_layout(8, l, 16, 128, 0.3), (l, 16, 16)),
           "nsa_one_token": (nsa_layout(9, l, 4), (l, 64, 4))}
  for case, (layout, (t, hq, hkv)) in cases.items():
    q, k, v, do = qkv(11, 1, t, hq, hkv, 128, 128)
    for impl in ("pallas_gpu", "xla"):
      def run(layout=layout, impl=impl):
        fwd, fwd_bwd = sparse_fns(layout, impl)
        first = [np.asarray(x) for x in (fwd(q, k, v, do), *fwd_bwd(q, k, v, do))]
        second = [np.asarray(x) for x in (fwd(q, k, v, do), *fwd_bwd(q, k, v, do))]
        return {name: bool(np.array_equal(a.view(np.uint16), b.view(np.uint16)))
                for name, a, b in zip(("out", "dq", "dk", "dv"), first, second)}
      r = guarded(f"determinism/{case}/{impl}", run)
      if r:
        rows.append(dict(case=case, impl=impl, **r))
        print(f"  {case:18s} {impl:10s} " + "  ".join(f"{k} {'equal' if ok else 'DIFFERS'}" for k, ok in r.items()),
              flush=True)
  RESULTS["determinism"] = rows


def section_tune(args):
  print("\n== tune: launch parameters at dense causal L=%d ==" % args.tune_length)
  l = args.tune_length
  q, k, v, do = qkv(5, 1, l, 16, 16, 128, 128)
  flops = dense_flops(1, 16, l, 128)
  C = pallas_gpu.KernelConfig
  rows = []
  fwd_variants = {(128, 64): [(128, 4, 2, False), (128, 4, 3, False), (128, 8, 2, False),
                              (128, 8, 3, False), (128, 8, 2, True), (128, 4, 2, True),
                              (64, 4, 3, False)],
                   (128, 128): [(128, 8, 2, False), (128, 8, 3, False), (128, 8, 2, True)],
                   (64, 64): [(64, 4, 2, False), (64, 4, 3, False), (64, 4, 2, True)]}
  for (bq, bk), fvars in fwd_variants.items():
    layout = BlockLayout.causal(l, l, block_q=bq, block_k=bk, num_head_units=16)
    base = {n: dataclasses.replace(c, mosaic=False)  # the Triton kernels' launch parameters
            for n, c in pallas_gpu.default_configs(q, k, v, layout).items()}
    for var in fvars:
      cfg = dict(base, fwd=C(*var))
      def run(cfg=cfg, layout=layout):
        fwd, _ = sparse_fns(layout, configs=cfg)
        return median_ms(fwd, q, k, v, do, reps=5)
      t = guarded(f"tune/fwd/{bq}/{bk}/{var}", run)
      if t:
        rows.append(dict(kernel="fwd", block_q=bq, block_k=bk, config=dataclasses.asdict(C(*var)),
                         ms=t, tflops=flops / t / 1e9))
        print(f"  fwd bq={bq} bk={bk} {C(*var)}: {t:.2f} ms {flops / t / 1e9:.0f} TF/s", flush=True)
    skip = lambda c: dataclasses.replace(c, skip_full_masks=True)  # noqa: E731
    bvars = [dict(), dict(dq=skip(base["dq"]), dkv=skip(base["dkv"])),
             dict(dq=C(128, 8, 2)), dict(dkv=C(128, 8, 2)), dict(dq=C(64, 4, 3), dkv=C(64, 4, 3))]
    for var in bvars:
      cfg = dict(base, **var)
      def run(cfg=cfg, layout=layout):
        _, fb = sparse_fns(layout, configs=cfg)
        return median_ms(fb, q, k, v, do, reps=5)
      t = guarded(f"tune/bwd/{bq}/{bk}/{var}", run)
      if t:
        rows.append(dict(kernel="fwd+bwd", block_q=bq, block_k=bk,
                         configs={n: dataclasses.asdict(c) for n, c in cfg.items()},
                         ms=t, tflops=3.5 * flops / t / 1e9))
        print(f"  fwd+bwd bq={bq} bk={bk} dq={cfg['dq']} dkv={cfg['dkv']}: {t:.2f} ms "
              f"{3.5 * flops / t / 1e9:.0f} TF/s", flush=True)
  RESULTS["tune"] = rows


def section_tune_nsa(args):
  t = args.tune_nsa_length
  print(f"\n== tune_nsa: launch parameters at the NSA shape T={t} ==")
  q, k, v, do = qkv(6, 1, t, 64, 4, 128, 128)
  layout = nsa_layout(4, t, 4)
  C = pallas_gpu.KernelConfig
  base = pallas_gpu.default_configs(q, k, v, layout)
  rows = []
  variants = [dict(fwd=C(16, w, s)) for w in (2, 4) for s in (2, 3, 4)]
  variants += [dict(fwd=C(16, 4, 2, True)), dict(dq=C(16, 4, 2, True), dkv=C(64, 4, 2, True))]
  variants += [dict(dq=C(16, w, s)) for w, s in ((2, 2), (4, 3))]
  variants += [dict(dkv=C(r, w, s)) for r, w, s in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2),
                                                    (32, 4, 2))]
  for var in variants:
    cfg = dict(base, **var)
    def run(cfg=cfg, var=var):
      fwd, fb = sparse_fns(layout, configs=cfg)
      return median_ms(fwd, q, k, v, do, reps=5) if "fwd" in var else median_ms(fb, q, k, v, do, reps=5)
    ms = guarded(f"tune_nsa/{var}", run)
    if ms:
      what = "fwd" if "fwd" in var else "fwd+bwd"
      rows.append(dict(measure=what, **{n: dataclasses.asdict(c) for n, c in var.items()}, ms=ms))
      print(f"  {what:8s} {var}: {ms:.2f} ms", flush=True)
  RESULTS["tune_nsa"] = dict(base={n: dataclasses.asdict(c) for n, c in base.items()}, rows=rows)


def section_tune_density(args):
  l, dens = args.tune_length, args.tune_density
  print(f"\n== tune_density: launch parameters at section b's layouts, L={l}, density 1 and {dens} ==")
  q, k, v, do = qkv(l + 1, 1, l, 16, 16, 128, 128)
  layouts = {d: random_causal_layout(3, l, 16, 64, d) for d in (1.0, dens)}
  base = pallas_gpu.default_configs(q, k, v, layouts[1.0])
  fwd_vars = [{}, dict(num_stages=2), dict(num_stages=4), dict(num_warps=8), dict(num_warps=2),
              dict(stagger=0)]
  bwd_vars = [{}, dict(dq=dict(num_stages=3)), dict(dkv=dict(num_stages=3)), dict(dkv=dict(rows=32)),
              dict(dq=dict(num_warps=8), dkv=dict(num_warps=8)), dict(dq=dict(stagger=0), dkv=dict(stagger=0))]
  variants = [("fwd", dict(fwd=f)) for f in fwd_vars] + [("fwd+bwd", b) for b in bwd_vars]
  rows = []
  for what, var in variants:
    cfg = {n: dataclasses.replace(c, **var.get(n, {})) for n, c in base.items()}
    def run(cfg=cfg, what=what):
      ms = {}
      for d, layout in layouts.items():
        fwd, fb = sparse_fns(layout, configs=cfg)
        ms[d] = median_ms(fwd if what == "fwd" else fb, q, k, v, do, reps=10)
      return ms
    ms = guarded(f"tune_density/{what}/{var}", run)
    if ms:
      rows.append(dict(measure=what, change=var, configs={n: dataclasses.asdict(c) for n, c in cfg.items()},
                       dense_ms=ms[1.0], sparse_ms=ms[dens], ratio=ms[dens] / ms[1.0]))
      print(f"  {what:8s} {var}: density 1 {ms[1.0]:.2f} ms, {dens} {ms[dens]:.2f} ms, "
            f"ratio {ms[dens] / ms[1.0]:.3f}", flush=True)
  RESULTS["tune_density"] = dict(length=l, density=dens, rows=rows)


LISTS_BLOCK = 128  # lists: block_q = block_k


def list_layout(rows, units, nq):
  """The layout whose query block i visits KV blocks rows[i] in each of `units` head units
  (kv_indices [1, units, nq, K]); 128x128 blocks, nq KV blocks."""
  cap = max(1, *map(len, rows))
  idx = np.zeros((nq, cap), np.int32)
  for i, row in enumerate(rows):
    idx[i, :len(row)] = row
  cnt = np.array([len(row) for row in rows], np.int32)
  return BlockLayout.from_indices(np.broadcast_to(idx, (1, units, nq, cap)),
                                  np.broadcast_to(cnt, (1, units, nq)), block_q=LISTS_BLOCK,
                                  block_k=LISTS_BLOCK, num_kv_blocks=nq)


def list_shapes(t):
  """name -> () -> (layout, query heads, KV heads, every key visible) of the `lists` section at length t.
  Visible shapes put the queries at positions t.. after every key (a ring step visiting a shard)."""
  nq = t // LISTS_BLOCK
  half = nq // 2
  return {
      "ramp": lambda: (BlockLayout.causal(t, t, block_q=LISTS_BLOCK, block_k=LISTS_BLOCK, num_head_units=8),
                       16, 8, False),
      "uniform_prefix": lambda: (list_layout([range(half)] * nq, 8, nq), 16, 8, True),
      "uniform_band": lambda: (list_layout([[(i - j) % nq for j in range(half)] for i in range(nq)], 8, nq),
                               16, 8, True),
      "bimodal": lambda: (list_layout([[]] * half + [range(nq)] * (nq - half), 8, nq), 16, 8, True),
      "nsa_select": lambda: (nsa_layout(4, t, 4), 64, 4, False),
  }


def max_rel_diff(a, b):
  """max over leaves of max|a - b| / max|b| (float32)."""
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))) /
                   max(float(jnp.max(jnp.abs(y.astype(jnp.float32)))), 1e-30))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def list_fns(layout, t, visible):
  """{"fwd": out, "fwd_bwd": grad of sum(out) in q, k, v}: new jitted functions of (q, k, v), traced
  with the `default_configs` of the moment (one jitted function would keep its first trace). Segment
  ids all one; queries at positions t.. after every key if `visible`, else causal."""
  kv_pos = jnp.arange(t, dtype=jnp.int32)[None]
  seg = jnp.ones((1, t), jnp.int32)

  def attend(q, k, v):
    return block_sparse_attention(q, k, v, layout, q_positions=kv_pos + (t if visible else 0),
                                  kv_positions=kv_pos, q_segment_ids=seg, kv_segment_ids=seg,
                                  return_lse=False, implementation="pallas_gpu", interpret=INTERPRET)
  loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()  # noqa: E731
  return {"fwd": jax.jit(attend), "fwd_bwd": jax.jit(jax.grad(loss, argnums=(0, 1, 2)))}


def section_lists(args):
  t = args.lists_length
  if t < 2 * LISTS_BLOCK or t % (2 * LISTS_BLOCK):
    raise ValueError(f"--lists-length must be a positive multiple of {2 * LISTS_BLOCK}, got {t}")
  spans = [0] + [s for s in args.lists_staggers if s]  # 0 (no stagger) first: the others' baseline
  shapes = list_shapes(t)
  unknown = sorted(set(args.lists_shapes or shapes) - set(shapes))
  if unknown:
    raise ValueError(f"--lists-shapes: unknown {unknown}; choose from {list(shapes)}")
  print(f"\n== lists: time per listed block over list shapes and stagger spans {spans}, T={t} ==")
  print(f"  {'shape':15s} {'mode':8s} {'blocks':>9s}  " +
        "  ".join(f"{f'ns/blk @{s}':>11s}" for s in spans) + "  max rel diff")
  rows = []
  for name in args.lists_shapes or shapes:
    def run(name=name):
      layout, hq, hkv, visible = shapes[name]()
      q, k, v, _ = qkv(7, 1, t, hq, hkv, 128, 128)
      blocks = int(layout.kv_counts.sum())
      out = []
      for mode in ("fwd", "fwd_bwd"):
        base, here = None, []
        for span in spans:
          with timing.kernel_configs(stagger=span, mosaic=False):  # the Triton kernels; traced inside
            fn = list_fns(layout, t, visible)[mode]
            start = time.perf_counter()
            res = jax.block_until_ready(fn(q, k, v))
            # interpreted (a CPU smoke test): that one call's time; on the GPU the median of 10
            ms = (time.perf_counter() - start) * 1e3 if INTERPRET else median_ms(fn, q, k, v, reps=10, warmup=1)
          base = res if span == 0 else base
          here.append(dict(shape=name, mode=mode, stagger=span, blocks=blocks, ms=ms,
                           ns_per_block=1e6 * ms / blocks,
                           rel_diff=None if span == 0 else max_rel_diff(res, base)))
        out += here
        print(f"  {name:15s} {mode:8s} {blocks:9d}  " + "  ".join(f"{r['ns_per_block']:11.1f}" for r in here) +
              f"  {max([r['rel_diff'] for r in here[1:]], default=0.0):.1e}", flush=True)
      return out
    rows += guarded(f"lists/{name}", run) or []
  RESULTS["lists"] = dict(length=t, block=LISTS_BLOCK, rows=rows)


SECTIONS = {"check": section_check, "a": section_dense, "b": section_density, "c": section_nsa,
            "tune": section_tune, "tune_nsa": section_tune_nsa, "lists": section_lists, "tune_density": section_tune_density,
            "determinism": section_determinism}


def main():
  p = timing.parser(__doc__, SECTIONS, "check,a,b,c", "kernels.json")
  p.add_argument("--dense-lengths", type=timing.int_list, default=[8192, 32768, 131072])
  p.add_argument("--density-lengths", type=timing.int_list, default=[32768, 131072])
  p.add_argument("--nsa-lengths", type=timing.int_list, default=[8192, 16384, 65536])
  p.add_argument("--density-block", type=int, default=64, choices=(64, 128),
                 help="section b's block size (query and key)")
  p.add_argument("--tune-length", type=int, default=32768)
  p.add_argument("--check-length", type=int, default=1024)
  p.add_argument("--tune-nsa-length", type=int, default=16384)
  p.add_argument("--tune-density", type=float, default=0.1)
  p.add_argument("--lists-length", type=int, default=65536)
  p.add_argument("--lists-staggers", type=timing.int_list, default=[1 << 20, 64, 16],
                 help="lists: KernelConfig.stagger spans timed after 0 (no stagger); 1048576 = the whole list")
  p.add_argument("--lists-shapes", type=lambda s: s.split(","), default=None,
                 help="lists: list shapes to time (default all)")
  p.add_argument("--block-q", type=int, default=128)
  p.add_argument("--block-k", type=int, default=64)
  p.add_argument("--no-tokamax", action="store_true")
  p.add_argument("--interpret", action="store_true", help="CPU smoke test of the script (tiny sizes)")
  args = p.parse_args()
  global INTERPRET
  INTERPRET = args.interpret
  timing.SMOKE = args.interpret
  timing.run_sections(SECTIONS, args, RESULTS)


if __name__ == "__main__":
  main()
