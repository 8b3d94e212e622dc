"""What bounds NSA's selection forward: the bytes it moves, timed without its arithmetic.

The selection forward of one-token units (`pallas_gpu.forward`, goal (c) of issue 3) loads, per
(token, KV head) program, the K and V rows of every listed 64-key block: 64 x 128 bf16 each, 32 KB a
block. This script times, on the same lists and with the same loads (same grid, same flat row
indices, same masks, Pallas Triton), a kernel that only sums what it loads (`gather`): the time any
kernel of this design needs to move those bytes from L2/HBM into the SMs. Next to it, in the same
run: the real forward, the same gather over lists that every program shares (every program reads
blocks 0..count-1: the data stays hot in L2), K only (half the bytes), a plain HBM copy, and a
Mosaic GPU kernel that moves the same blocks by TMA into a shared-memory ring and does nothing else
(`tma_gather`): what a Hopper kernel of this design could move.

Sections (select with --sections, default gather):
  gather  at each of --lengths: GPU kernel time (`timing.gpu_ms`) and bytes per second of each
          kernel above, for the anchor selections (`kernels.anchor_layout`, the community NSA
          benchmark's) and causal16 (`kernels.nsa_layout`: block 0, the token's own block, 14 random
          earlier ones), with each (num_warps, num_stages) of --launch and each (tokens, stages) of
          --tma.

With --interpret (a CPU smoke test) the Triton kernels run in Pallas' interpreter at 256 tokens and
the Mosaic GPU kernel is only lowered for CUDA.

  python benchmarks/l2_gather.py --out $OUT/l2_gather.json
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import timing
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plmgpu
from jax.experimental.pallas import triton as plgpu

from kernels import anchor_layout, nsa_layout
from pallas_kernels import BlockLayout
from pallas_kernels.block_sparse import pallas_gpu

RESULTS: dict = {}
HQ, HKV, D, BLOCK_K = 64, 4, 128, 64


def shared_layout(layout):
  """The same counts, every list 0, 1, ..., count-1: all programs read the same few blocks."""
  idx = jnp.broadcast_to(jnp.arange(layout.kv_indices.shape[-1], dtype=jnp.int32),
                         layout.kv_indices.shape)
  return BlockLayout.from_indices(idx, layout.kv_counts, block_q=1, block_k=BLOCK_K,
                                  num_kv_blocks=layout.num_kv_blocks)


def _gather_kernel(idx_ref, cnt_ref, k_ref, v_ref, o_ref, *, hkv, tk, with_v, head_major):
  tok, kv_head = pl.program_id(0), pl.program_id(1)
  cols = jnp.arange(D)[None, :]

  def load(ref, block):
    t = block * BLOCK_K + jnp.arange(BLOCK_K)
    valid = t < tk
    rows = kv_head * tk + t if head_major else t * hkv + kv_head
    return plgpu.load(ref.at[rows[:, None], cols], mask=valid[:, None], other=0.0).astype(jnp.float32)

  def body(n, acc):
    block = idx_ref[tok, n]
    acc = acc + load(k_ref, block)
    return acc + load(v_ref, block) if with_v else acc

  acc = jax.lax.fori_loop(0, cnt_ref[tok], body, jnp.zeros((BLOCK_K, D), jnp.float32))
  plgpu.store(o_ref.at[tok * hkv + kv_head, jnp.arange(D)], jnp.sum(acc, axis=0))


@functools.partial(jax.jit, static_argnames=("with_v", "num_warps", "num_stages", "interpret",
                                             "head_major"))
def gather(k, v, layout, *, with_v=True, num_warps=2, num_stages=2, interpret=False, head_major=False):
  """[T * Hkv, D] float32: per (token, KV head) the column sums of its listed K (and V) blocks.
  k, v [1, Tk, Hkv, D], or [1, Hkv, Tk, D] with head_major (a block's rows contiguous)."""
  b = k.shape[0]
  tk, hkv = (k.shape[2], k.shape[1]) if head_major else (k.shape[1], k.shape[2])
  tq = layout.kv_indices.shape[2]
  flat = lambda x: x.reshape(b * tk * hkv, D)  # noqa: E731  (B = 1)
  whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
  specs = [pl.BlockSpec((None, None, tq, layout.kv_indices.shape[-1]), lambda t, h: (0, h, 0, 0)),
           pl.BlockSpec((None, None, tq), lambda t, h: (0, h, 0)),
           whole(flat(k)), whole(flat(v))]
  out_shape = jax.ShapeDtypeStruct((tq * hkv, D), jnp.float32)
  return pl.pallas_call(
      functools.partial(_gather_kernel, hkv=hkv, tk=tk, with_v=with_v, head_major=head_major),
      grid=(tq, hkv),
      in_specs=specs, out_specs=whole(out_shape), out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="l2_gather",
  )(layout.kv_indices, layout.kv_counts, flat(k), flat(v))


def _tma_kernel(idx_ref, cnt_ref, k_ref, v_ref, o_ref, *, tokens, stages, head_major):
  """One program per (`tokens` consecutive tokens, KV head): a producer warpgroup TMA-loads each
  listed K and V block into a ring of `stages` slots; a consumer warpgroup only waits for each slot
  and releases it. Program (0, 0) writes its last K tile (the output must come from somewhere)."""
  first, h = lax.axis_index("t") * tokens, lax.axis_index("h")
  swizzled = (plmgpu.TilingTransform((8, 64)), plmgpu.SwizzleTransform(128))
  scratch = dict(k=plmgpu.SMEM((stages, BLOCK_K, D), k_ref.dtype, transforms=swizzled),
                 v=plmgpu.SMEM((stages, BLOCK_K, D), v_ref.dtype, transforms=swizzled))
  bars = dict(full=plmgpu.Barrier(num_arrivals=2, num_barriers=stages),
              free=plmgpu.Barrier(num_barriers=stages))

  def steps_of(e):
    return cnt_ref[0, h, first + e]

  def body(s, b):
    wg = lax.axis_index("wg")
    total = functools.reduce(lambda a, e: a + steps_of(e), range(tokens), jnp.int32(0))

    @pl.when(wg == 0)
    def _produce():
      def token(e, step):
        @pl.loop(0, steps_of(e))
        def _load(n):
          slot = lax.rem(step + n, stages)
          pl.when(step + n >= stages)(lambda: plmgpu.barrier_wait(b["free"].at[slot]))
          rows = pl.ds(idx_ref[0, h, first + e, n] * BLOCK_K, BLOCK_K)
          at = (0, h, rows) if head_major else (0, rows, h)
          plmgpu.copy_gmem_to_smem(k_ref.at[at], s["k"].at[slot], b["full"].at[slot])
          plmgpu.copy_gmem_to_smem(v_ref.at[at], s["v"].at[slot], b["full"].at[slot])
        return step + steps_of(e)
      lax.fori_loop(0, tokens, token, jnp.int32(0))

      @pl.loop(jnp.maximum(total - stages, 0), total)
      def _drain(n):
        plmgpu.barrier_wait(b["free"].at[lax.rem(n, stages)])

    @pl.when(wg == 1)
    def _consume():
      @pl.loop(0, total)
      def _step(n):
        slot = lax.rem(n, stages)
        plmgpu.barrier_wait(b["full"].at[slot])
        plmgpu.barrier_arrive(b["free"].at[slot])

      @pl.when((first == 0) & (h == 0) & (total > 0))
      def _write():
        plmgpu.copy_smem_to_gmem(s["k"].at[lax.rem(total - 1, stages)], o_ref)
        plmgpu.wait_smem_to_gmem(0)

  pl.run_scoped(body, scratch, bars, collective_axes="wg")


@functools.partial(jax.jit, static_argnames=("tokens", "stages", "interpret", "head_major"))
def tma_gather(k, v, layout, *, tokens=8, stages=4, interpret=False, head_major=False):
  """[64, D]: the last K tile that program (0, 0) loaded (the timing is the point, not the output).
  k, v as for `gather`."""
  tq, hkv = layout.kv_indices.shape[2], k.shape[1 if head_major else 2]
  return plmgpu.kernel(
      functools.partial(_tma_kernel, tokens=tokens, stages=stages, head_major=head_major),
      out_type=jax.ShapeDtypeStruct((BLOCK_K, D), k.dtype), grid=(tq // tokens, hkv),
      grid_names=("t", "h"), num_threads=2, thread_name="wg", kernel_name="l2_tma_gather",
      interpret=interpret or None,
  )(layout.kv_indices, layout.kv_counts, k, v)


def check_gather(k, v, layout, interpret, head_major=False):
  """The gather kernel's sums against jnp on the same lists (max abs error)."""
  kk, vv = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) if head_major else (k, v)
  got = gather(kk, vv, layout, interpret=interpret, head_major=head_major).reshape(-1, HKV, D)
  idx, cnt = layout.kv_indices[0], layout.kv_counts[0]           # [Hkv, T, n], [Hkv, T]
  kb = k[0].astype(jnp.float32).reshape(-1, BLOCK_K, HKV, D).sum(1)  # [nk, Hkv, D]
  vb = v[0].astype(jnp.float32).reshape(-1, BLOCK_K, HKV, D).sum(1)
  heads = jnp.arange(HKV)[:, None, None]
  keep = (jnp.arange(idx.shape[-1]) < cnt[..., None])[..., None]
  want = jnp.where(keep, kb[idx, heads] + vb[idx, heads], 0.0).sum(2).transpose(1, 0, 2)
  return float(jnp.max(jnp.abs(got - want)))


def section_gather(args):
  print("\n== gather: the selection forward's bytes alone (GPU kernel time) ==")
  out = RESULTS.setdefault("gather", {})
  if not args.interpret:
    hbm = jnp.zeros((256 * 2 ** 20,), jnp.float32)   # 1 GiB: read once, written once
    ms = timing.gpu_ms(jax.jit(lambda x: x + 1.0), hbm)
    out["hbm_copy"] = dict(gpu_ms=ms, tb_s=2 * hbm.nbytes / ms / 1e9)
    print(f"  HBM copy of 1 GiB: {ms:.3f} ms, {out['hbm_copy']['tb_s']:.2f} TB/s (read + write)")
  for t in args.lengths:
    keys = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(keys[0], (1, t, HQ, D), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, t, HKV, D), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, t, HKV, D), jnp.float32).astype(jnp.bfloat16)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    for name, layout in (("anchor", anchor_layout(1, t, HKV)), ("causal16", nsa_layout(2, t, HKV))):
      row = out.setdefault(f"{name}_{t}", {})
      blocks = int(layout.kv_counts.sum())
      kv_bytes = blocks * BLOCK_K * D * 2 * 2
      row.update(blocks_per_token=blocks / (t * HKV), kv_gbytes=kv_bytes / 1e9,
                 check_max_abs=max(check_gather(k, v, layout, args.interpret, head_major=hm)
                                   for hm in (False, True)))
      print(f"  T={t} {name}: {blocks / (t * HKV):.2f} blocks per token, {kv_bytes / 1e9:.1f} GB of "
            f"K/V; gather vs jnp max abs {row['check_max_abs']:.2e}")
      timings = {}
      if not args.interpret:
        fwd = jax.jit(functools.partial(pallas_gpu.forward, sm_scale=D ** -0.5, causal=True,
                                        interpret=False))
        timings["forward"] = (timing.gpu_ms(fwd, q, k, v, layout, pos, pos, None, None), kv_bytes)
      for warps, stages in args.launch:
        f = functools.partial(gather, num_warps=warps, num_stages=stages, interpret=args.interpret)
        timings[f"gather_w{warps}s{stages}"] = (timing.gpu_ms(f, k, v, layout), kv_bytes)
        timings[f"gather_k_only_w{warps}s{stages}"] = (
            timing.gpu_ms(functools.partial(f, with_v=False), k, v, layout), kv_bytes // 2)
        timings[f"gather_shared_w{warps}s{stages}"] = (timing.gpu_ms(f, k, v, shared_layout(layout)),
                                                       kv_bytes)
      kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)     # [1, Hkv, T, D]
      timings["transpose_k_v"] = (timing.gpu_ms(jax.jit(lambda a, b: (a.transpose(0, 2, 1, 3),
                                                                       b.transpose(0, 2, 1, 3))), k, v),
                                  2 * (k.nbytes + v.nbytes))
      for warps, stages in args.launch[:2]:
        f = functools.partial(gather, num_warps=warps, num_stages=stages, interpret=args.interpret,
                              head_major=True)
        timings[f"gather_head_major_w{warps}s{stages}"] = (timing.gpu_ms(f, kh, vh, layout), kv_bytes)
      for tokens, stages in args.tma:
        f = jax.jit(functools.partial(tma_gather, tokens=tokens, stages=stages))
        if args.interpret:   # the Mosaic GPU kernel cannot run on a CPU: lowered only
          timing.run_or_lower(f, k, v, layout, lower_only=True)
          continue
        last = layout.kv_indices[0, 0, tokens - 1, layout.kv_counts[0, 0, tokens - 1] - 1]
        want = k[0, last * BLOCK_K:(last + 1) * BLOCK_K, 0]
        row[f"tma_check_t{tokens}s{stages}"] = bool(jnp.array_equal(f(k, v, layout), want))
        timings[f"tma_gather_t{tokens}s{stages}"] = (timing.gpu_ms(f, k, v, layout), kv_bytes)
        f = jax.jit(functools.partial(tma_gather, tokens=tokens, stages=stages, head_major=True))
        timings[f"tma_gather_head_major_t{tokens}s{stages}"] = (timing.gpu_ms(f, kh, vh, layout),
                                                                kv_bytes)
      for key, (ms, nbytes) in timings.items():
        row[key] = dict(gpu_ms=ms, tb_s=nbytes / ms / 1e9 if ms > 0 else None)
        print(f"    {key:34s} {ms:8.3f} ms  {nbytes / max(ms, 1e-9) / 1e9:6.2f} TB/s")


SECTIONS = {"gather": section_gather}


def main():
  p = timing.parser(__doc__, SECTIONS, "gather", "l2_gather.json")
  p.add_argument("--lengths", type=timing.int_list, default=[65536])
  p.add_argument("--launch", default="2:2,4:2,2:3,4:3,2:1",
                 type=lambda s: [tuple(int(x) for x in item.split(":")) for item in s.split(",")],
                 help="comma list of num_warps:num_stages for the gather kernel")
  p.add_argument("--tma", default="8:2,8:4,8:6,32:4",
                 type=lambda s: [tuple(int(x) for x in item.split(":")) for item in s.split(",")],
                 help="comma list of tokens:stages (tokens per program, ring slots) for the TMA gather")
  p.add_argument("--interpret", action="store_true",
                 help="CPU smoke test: Pallas interpreter, 256 tokens, one launch config")
  args = p.parse_args()
  if args.interpret:
    timing.SMOKE = True
    args.lengths, args.launch, args.tma = [256], args.launch[:1], args.tma[:1]
  timing.run_sections(SECTIONS, args, RESULTS)


if __name__ == "__main__":
  main()
