"""Speed of the whole NSA attention (compression MLPs, compression branch, importance pass + top-n,
selection branch, window branch, gates) against cuDNN dense causal attention with the same head
shapes, timed in the same run. Prints a table and writes every number to JSON.

Inputs are the projected tensors of one layer (`nsa.nsa_attention`'s arguments), bf16, B=1, the NSA
paper's head layout (64 query heads, 4 KV heads, D=128) and hyper-parameters (l=32, d=16, l'=64,
n=16, w=512), one document per row. Forward = the output; forward+backward = the gradient of
sum(out · cotangent) with respect to every float input (q, the six K/V, gates, MLP weights). Dense:
`jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")`, forward and the
gradient with respect to q, k, v. `--breakdown` also times each NSA piece forward at the longest T,
the importance pass + top-n on each path (`importance_topn_xla`; `importance_topn_pallas_gpu`: the
Pallas kernel's block scores per chunk of queries, then XLA's top-n, `--no-fused-topn` for the
whole-attention rows; `importance_topn_pallas_gpu_fused`: the kernel that scores, masks and keeps the
top n in one pass, the default as in NSA's config), the unfused Pallas importance kernel alone per launch configuration (`importance_kernel*`:
p_slc [B, K, T, S], all T in one call) and XLA's block_scores + top-n alone on its output
(`block_scores_topn`); on CPU the kernels run in interpret mode.

    python benchmarks/nsa.py --out $OUT/nsa.json                      # GPU: 8k 16k 32k 64k
    python benchmarks/nsa.py --lengths 256 --heads 4 --kv-heads 2 --head-dim 16 --dense xla \
        --implementation xla --dtype float32 --l 8 --d 4 --lp 16 --n 4 --w 32 --wb 16   # CPU smoke test
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import timing
from timing import bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels.block_sparse import pallas_gpu  # noqa: E402
from pallas_kernels.nsa_importance import ImportanceConfig, importance_scores  # noqa: E402
from sparsejax.attention import compressed as cmp_lib  # noqa: E402
from sparsejax.attention.compressed import CompressionParams  # noqa: E402
from sparsejax.attention.nsa import NSASpec, nsa_attention, selected_attention, window_attention  # noqa: E402

RESULTS: dict = {"rows": [], "errors": {}}


def guarded(name, fn):
    return timing.guarded(name, fn, RESULTS["errors"])


def make_inputs(args, t, dtype):
    ks = iter(jax.random.split(jax.random.key(t), 24))
    r = lambda shape, s=1.0: (s * jax.random.normal(next(ks), shape, jnp.float32)).astype(dtype)
    h, k, d, l, f = args.heads, args.kv_heads, args.head_dim, args.l, args.hidden
    cp = lambda: CompressionParams(r((l, d), 0.02), r((l, d, f), (l * d) ** -0.5), r((f,), 0.0),
                                   r((f, d), f ** -0.5), r((d,), 0.0))
    inputs = dict(q=r((1, t, h, d)), k_cmp=r((1, t, k, d)), v_cmp=r((1, t, k, d)), k_slc=r((1, t, k, d)),
                  v_slc=r((1, t, k, d)), k_win=r((1, t, k, d)), v_win=r((1, t, k, d)),
                  gates=jax.nn.sigmoid(r((1, t, h, 3)).astype(jnp.float32)).astype(dtype),
                  compress_k=cp(), compress_v=cp(),
                  rope_positions=jnp.arange(t, dtype=jnp.int32)[None], segment_ids=jnp.ones((1, t), jnp.int32))
    return inputs


INTS = ("rope_positions", "segment_ids")


def nsa_fns(spec):
    def forward(inputs):
        return nsa_attention(**inputs, spec=spec, rope_theta=500000.0)[0]

    def forward_backward(inputs, cot):
        ints = {n: inputs[n] for n in INTS}
        floats = {n: x for n, x in inputs.items() if n not in INTS}
        loss = lambda fl: (forward({**fl, **ints}).astype(jnp.float32) * cot).sum()
        return jax.grad(loss)(floats)
    return jax.jit(forward), jax.jit(forward_backward)


def dense_fns(kind):
    def forward(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=kind)

    def forward_backward(q, k, v, cot):
        return jax.grad(lambda q, k, v: (forward(q, k, v).astype(jnp.float32) * cot).sum(), argnums=(0, 1, 2))(q, k, v)
    return jax.jit(forward), jax.jit(forward_backward)


# (rows, block_n, warps, stages, precise) of the importance kernel's launch-configuration sweep
IMPORTANCE_CONFIGS = ((128, 64, 4, 3, True), (128, 64, 8, 3, True), (128, 128, 8, 2, True), (256, 64, 8, 2, True),
                      (64, 64, 4, 3, True), (128, 64, 8, 3, False))


def fwd_bwd(fn, argnums):
    """jit of the gradient of sum(fn(...)'s output) w.r.t. `argnums` (the forward + backward of a piece;
    for a function returning (out, lse), of out)."""
    def loss(*args):
        out = fn(*args)
        return (out[0] if isinstance(out, tuple) else out).astype(jnp.float32).sum()
    return jax.jit(jax.grad(loss, argnums=argnums))


# query and key blocks of the compression attention, and block of the window branch, timed besides
# the spec's (A/B; see RESULTS, NSA)
CMP_BLOCK_Q_AB = 64
CMP_BLOCK_K_AB = 64
WIN_BLOCK_AB = 64


def traced_with(module, name, value, fn):
    """fn (jitted), traced with `module.name` replaced by `value`. The first call traces, so the whole
    call, backward pass included, runs under the switch."""
    def traced(*args):
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            return fn(*args)
        finally:
            setattr(module, name, saved)
    return traced


def triton_backward(fn):
    """fn with `pallas_gpu.backward` on its Triton kernels even where the Mosaic GPU backward would run
    (the A/B of the Mosaic backward; the forward is unchanged)."""
    return traced_with(pallas_gpu, "_mosaic_bwd_config", lambda *a, **k: None, fn)


BREAKDOWN_GROUPS = ("cmp", "importance", "slc", "win")


def breakdown(args, spec, t, dtype):
    """Forward time of each NSA piece at length t and, as `<piece>_fwd_bwd`, its forward + backward
    (compression MLP, compression / selection / window attention, the compression attention with
    its backward on the Triton kernels as `cmp_attention_fwd_bwd_triton_bwd` and with query blocks
    of `CMP_BLOCK_Q_AB` as `cmp_attention_bq<n>` and compressed blocks of `CMP_BLOCK_K_AB` as
    `cmp_attention_bk<n>`, the window branch in blocks of `WIN_BLOCK_AB` as `win_attention_b<n>`); the importance pass + top-n on each
    implementation (A/B), the Pallas kernel's scores alone for a few launch configurations, and top-n
    alone; on a Hopper GPU also the Mosaic GPU scores kernel and the top-n over its scores per launch
    configuration (`mosaic_importance_pieces`). `args.pieces` picks groups of `BREAKDOWN_GROUPS` (the
    compression attention always runs: the others need its lse)."""
    x = make_inputs(args, t, dtype)
    groups = set(args.pieces.split(","))
    impl = spec.kernel_implementation
    interpret = jax.default_backend() == "cpu"           # the CPU smoke test runs the kernel interpreted
    l, s = spec.compress_block, spec.compress_stride
    pieces = {}
    comp = jax.jit(lambda x: cmp_lib.compress(x["k_cmp"], x["compress_k"], block=l, stride=s))
    pieces["compress_mlp_k"] = bench(comp, x)[0]
    pieces["compress_mlp_k_fwd_bwd"] = bench(fwd_bwd(lambda k, p: cmp_lib.compress(k, p, block=l, stride=s),
                                                     (0, 1)), x["k_cmp"], x["compress_k"])[0]
    kc = comp(x)
    vc = jax.jit(lambda x: cmp_lib.compress(x["v_cmp"], x["compress_v"], block=l, stride=s))(x)
    def cmp_fn(q, kc, vc, seg, block_q=spec.compress_kernel_block_q, block_k=spec.compress_kernel_block_k):
        return cmp_lib.compressed_attention(q, kc, vc, seg, block=l, stride=s, block_q=block_q,
                                            block_k=block_k, implementation=impl)
    cmp_attention = jax.jit(cmp_fn)
    pieces["cmp_attention"] = bench(cmp_attention, x["q"], kc, vc, x["segment_ids"])[0]
    lse = cmp_attention(x["q"], kc, vc, x["segment_ids"])[1]
    if "cmp" in groups:
        cmp_pieces(pieces, spec, x, kc, vc, cmp_fn)
    sel = dict(block=l, stride=s, select_block=spec.select_block, num_selected=spec.num_selected,
               num_initial=spec.num_initial, num_local=spec.num_local, chunk_elements=spec.score_chunk_elements)
    selects = {"xla": jax.jit(functools.partial(cmp_lib.select_blocks, implementation="xla", **sel))}
    idx, cnt = selects["xla"](x["q"], kc, lse, x["segment_ids"])
    if "importance" in groups:
        importance_paths(pieces, x, kc, lse, spec, t, interpret, sel, selects, (idx, cnt))
    if "slc" in groups:
        slc_fn = lambda q, k, v, seg, i, c: selected_attention(q, k, v, seg, i, c, select_block=spec.select_block,  # noqa: E731
                                                               implementation=impl)
        slc_args = (x["q"], x["k_slc"], x["v_slc"], x["segment_ids"], idx, cnt)
        pieces["slc_attention"] = bench(jax.jit(slc_fn), *slc_args)[0]
        pieces["slc_attention_fwd_bwd"] = bench(fwd_bwd(slc_fn, (0, 1, 2)), *slc_args)[0]
    if "win" in groups:
        win_pieces(pieces, spec, x)
    return pieces


def cmp_pieces(pieces, spec, x, kc, vc, cmp_fn):
    """Compression attention forward + backward, with the A/B rows (see `breakdown`)."""
    pieces["cmp_attention_fwd_bwd"] = bench(fwd_bwd(cmp_fn, (0, 1, 2)), x["q"], kc, vc, x["segment_ids"])[0]
    pieces["cmp_attention_fwd_bwd_triton_bwd"] = bench(
        triton_backward(fwd_bwd(cmp_fn, (0, 1, 2))), x["q"], kc, vc, x["segment_ids"])[0]
    if CMP_BLOCK_K_AB != spec.compress_kernel_block_k:
        ab = functools.partial(cmp_fn, block_k=CMP_BLOCK_K_AB)
        pieces[f"cmp_attention_bk{CMP_BLOCK_K_AB}"] = bench(jax.jit(ab), x["q"], kc, vc, x["segment_ids"])[0]
        pieces[f"cmp_attention_bk{CMP_BLOCK_K_AB}_fwd_bwd"] = bench(
            fwd_bwd(ab, (0, 1, 2)), x["q"], kc, vc, x["segment_ids"])[0]
    if CMP_BLOCK_Q_AB != spec.compress_kernel_block_q:
        ab = functools.partial(cmp_fn, block_q=CMP_BLOCK_Q_AB)
        pieces[f"cmp_attention_bq{CMP_BLOCK_Q_AB}"] = bench(jax.jit(ab), x["q"], kc, vc, x["segment_ids"])[0]
        pieces[f"cmp_attention_bq{CMP_BLOCK_Q_AB}_fwd_bwd"] = bench(
            fwd_bwd(ab, (0, 1, 2)), x["q"], kc, vc, x["segment_ids"])[0]


def triton_importance(fn):
    """fn with `select_blocks` on the fused Triton kernel even where the Mosaic GPU scores kernel would
    run (the A/B of `select_blocks_mosaic`)."""
    return traced_with(cmp_lib, "mosaic_importance_supported", lambda *a, **k: False, fn)


def importance_paths(pieces, x, kc, lse, spec, t, interpret, sel, selects, xla_selection):
    """The importance pass + top-n on each path (`importance_topn_<path>`; `pallas_gpu_fused` is the
    default: the Mosaic GPU scores + top-n on Hopper, `triton_fused` the fused Triton kernel there), the
    kernels alone, and the on-device checks against XLA."""
    paths = {"pallas_gpu": dict(implementation="pallas_gpu"),
             "pallas_gpu_fused": dict(implementation="pallas_gpu", fused_topn=True)}
    selects.update({name: jax.jit(functools.partial(cmp_lib.select_blocks, interpret=interpret, **path, **sel))
                    for name, path in paths.items()})
    if pallas_gpu.on_hopper():
        selects["triton_fused"] = triton_importance(jax.jit(functools.partial(
            cmp_lib.select_blocks, implementation="pallas_gpu", fused_topn=True, **sel)))
    for name, select in selects.items():
        res = guarded(f"importance_topn_{name}@{t}", lambda: bench(select, x["q"], kc, lse, x["segment_ids"]))
        if res:
            pieces[f"importance_topn_{name}"] = res[0]
    importance_pieces(pieces, x, kc, lse, spec, t, interpret)
    guarded(f"importance_check@{t}", lambda: importance_check(x, kc, lse, spec, t, interpret, xla_selection,
                                                              selects))
    if pallas_gpu.on_hopper():
        guarded(f"mosaic_importance@{t}", lambda: mosaic_importance_pieces(pieces, x, kc, lse, spec, t))


def importance_inputs(x, kc, spec, t):
    """What every importance kernel takes besides q, k̃ and lse at length t: (num_blocks S, segment ids
    [B, T], compressed segment ids [B, N], positions [B, T])."""
    seg = x["segment_ids"]
    kv_seg = cmp_lib.compressed_segments(seg, kc.shape[1], spec.compress_block, spec.compress_stride)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (x["q"].shape[0], t))
    return -(-t // spec.select_block), seg, kv_seg, positions


# (tokens, span) of `topn_of_scores` timed on the Mosaic kernel's scores
TOPN_CONFIGS = ((16, 1), (16, 2), (16, 4), (32, 2), (8, 2))


def mosaic_importance_pieces(pieces, x, kc, lse, spec, t):
    """The Mosaic GPU scores kernel alone (all T in one call, step-padded [B, K, T, steps, W]) and
    `topn_of_scores` on its output per launch configuration (`TOPN_CONFIGS`)."""
    from pallas_kernels import nsa_importance, nsa_importance_mosaic
    l, s, ls = spec.compress_block, spec.compress_stride, spec.select_block
    num_blocks, seg, kv_seg, positions = importance_inputs(x, kc, spec, t)
    default = nsa_importance_mosaic.default_block_n(block=l, stride=s, select_block=ls)
    for block_n in (64, 128):
        if block_n != default:                           # the A/B of the step width
            fn = jax.jit(functools.partial(nsa_importance_mosaic.block_scores_padded, block=l, stride=s,
                                           select_block=ls, num_blocks=num_blocks, block_n=block_n))
            res = guarded(f"importance_mosaic_scores_bn{block_n}@{t}",
                          lambda: bench(fn, x["q"], kc, lse, positions, seg, kv_seg))
            if res:
                pieces[f"importance_mosaic_scores_bn{block_n}"] = res[0]
    scores_fn = jax.jit(functools.partial(nsa_importance_mosaic.block_scores_padded, block=l, stride=s,
                                          select_block=ls, num_blocks=num_blocks))
    pieces["importance_mosaic_scores"] = bench(scores_fn, x["q"], kc, lse, positions, seg, kv_seg)[0]
    scores = scores_fn(x["q"], kc, lse, positions, seg, kv_seg)
    doc = cmp_lib.document_starts(seg)
    nbt = nsa_importance_mosaic.step_blocks(block=l, stride=s, select_block=ls)
    for tokens, span in TOPN_CONFIGS:
        fn = jax.jit(functools.partial(nsa_importance.topn_of_scores, nbt=nbt, select_block=ls,
                                       num_blocks=num_blocks, num_selected=spec.num_selected,
                                       num_initial=spec.num_initial, num_local=spec.num_local, tokens=tokens,
                                       span=span))
        res = guarded(f"topn_of_scores_t{tokens}_s{span}@{t}", lambda: bench(fn, scores, positions, doc))
        if res:
            pieces[f"topn_of_scores_t{tokens}_s{span}"] = res[0]


def win_pieces(pieces, spec, x):
    """Window attention forward + backward, with its A/B block size (see `breakdown`)."""
    impl = spec.kernel_implementation
    win_fn = lambda q, k, v, seg: window_attention(q, k, v, seg, window=spec.window, block=spec.window_block,  # noqa: E731
                                                   implementation=impl)
    win_args = (x["q"], x["k_win"], x["v_win"], x["segment_ids"])
    pieces["win_attention"] = bench(jax.jit(win_fn), *win_args)[0]
    pieces["win_attention_fwd_bwd"] = bench(fwd_bwd(win_fn, (0, 1, 2)), *win_args)[0]
    if WIN_BLOCK_AB != spec.window_block:
        ab = lambda q, k, v, seg: window_attention(q, k, v, seg, window=spec.window, block=WIN_BLOCK_AB,  # noqa: E731
                                                   implementation=impl)
        pieces[f"win_attention_b{WIN_BLOCK_AB}"] = bench(jax.jit(ab), *win_args)[0]
        pieces[f"win_attention_b{WIN_BLOCK_AB}_fwd_bwd"] = bench(fwd_bwd(ab, (0, 1, 2)), *win_args)[0]


def importance_pieces(pieces, x, kc, lse, spec, t, interpret):
    """The kernel's p_slc [B, K, T, S] for all T at once (no chunks) with the default and each launch
    configuration of `IMPORTANCE_CONFIGS` (on GPU), and block_scores + top-n alone on it."""
    l, s, ls = spec.compress_block, spec.compress_stride, spec.select_block
    num_blocks, seg, kv_seg, positions = importance_inputs(x, kc, spec, t)
    configs = [None] + [ImportanceConfig(*c) for c in IMPORTANCE_CONFIGS] if not interpret else [None]
    p_slc = None
    for cfg in configs:
        name = "importance_kernel" + ("" if cfg is None else "_r{}_n{}_w{}_s{}{}".format(
            cfg.rows, cfg.block_n, cfg.num_warps, cfg.num_stages, "" if cfg.precise else "_f16"))
        fn = jax.jit(functools.partial(importance_scores, block=l, stride=s, select_block=ls, num_blocks=num_blocks,
                                       interpret=interpret, config=cfg))
        res = guarded(f"{name}@{t}", lambda: bench(fn, x["q"], kc, lse, positions, seg, kv_seg))
        if res:
            pieces[name] = res[0]
            if p_slc is None:
                p_slc = fn(x["q"], kc, lse, positions, seg, kv_seg)
    if p_slc is None:
        return
    start = cmp_lib.document_starts(seg)
    topn = jax.jit(lambda p: cmp_lib.top_blocks(cmp_lib.block_scores(
        p, jnp.arange(t, dtype=jnp.int32), start, select_block=ls, num_initial=spec.num_initial,
        num_local=spec.num_local), spec.num_selected))
    res = guarded(f"topn@{t}", lambda: bench(topn, p_slc))
    if res:
        pieces["block_scores_topn"] = res[0]


def importance_check(x, kc, lse, spec, t, interpret, xla_selection, selects, rows=256):
    """On the device: the unfused kernel's p_slc of the last `rows` queries (and the Mosaic GPU kernel's,
    on Hopper) against the same scores in XLA float32 (max error relative to the largest score), and for
    each path of `selects` but xla the share of (token, KV group) rows whose selected blocks agree with
    XLA's (near ties may differ) and whether the counts are equal. RESULTS["importance_check"]."""
    b, _, h, d = x["q"].shape
    l, s, ls = spec.compress_block, spec.compress_stride, spec.select_block
    n, kv = kc.shape[1], kc.shape[2]
    first = t - min(rows, t)
    num_blocks, seg, kv_seg, positions = importance_inputs(x, kc, spec, t)
    got = importance_scores(x["q"], kc, lse, positions, seg, kv_seg, block=l, stride=s, select_block=ls,
                            num_blocks=num_blocks, q_start=first, q_count=t - first, interpret=interpret)

    @jax.jit
    def want(q, kc, lse):
        qg = q[:, first:].reshape(b, t - first, kv, h // kv, d)
        logits = jnp.einsum("bckgd,bnkd->bkgcn", qg, kc, preferred_element_type=jnp.float32,
                            precision=jax.lax.Precision.HIGHEST) / d ** 0.5
        lc = lse[:, :, first:].reshape(b, kv, h // kv, t - first)
        seen = (cmp_lib.compressed_positions(n, l, s)[None, None, None, None, :]
                <= jnp.arange(first, t)[None, None, None, :, None]) & (
            kv_seg[:, None, None, None, :] == seg[:, None, None, first:, None]) & jnp.isfinite(lc)[..., None]
        p = jnp.where(seen, jnp.exp(logits - jnp.where(seen, lc[..., None], 0.0)), 0.0).sum(2)
        return cmp_lib.block_importance(p, num_blocks, select_block=ls, block=l, stride=s)

    ref = want(x["q"], kc, lse)
    rel = lambda got: float(jnp.abs(got - ref).max() / jnp.maximum(jnp.abs(ref).max(), 1e-30))  # noqa: E731
    check = dict(T=t, rows=t - first, p_slc_max_rel_err=rel(got))
    if pallas_gpu.on_hopper():
        from pallas_kernels import nsa_importance_mosaic
        q_rows = slice(first, t)
        mosaic = nsa_importance_mosaic.importance_scores(
            x["q"][:, q_rows], kc, lse[:, :, q_rows], positions[:, q_rows], seg[:, q_rows], kv_seg, block=l,
            stride=s, select_block=ls, num_blocks=num_blocks)
        check["mosaic_p_slc_max_rel_err"] = rel(mosaic)
    for name, select in selects.items():
        if name != "xla":
            idx, cnt = select(x["q"], kc, lse, seg)
            check[f"{name}_selection_agreement"] = float(jnp.all(idx == xla_selection[0], axis=-1).mean())
            check[f"{name}_counts_equal"] = bool(jnp.all(cnt == xla_selection[1]))
    RESULTS["importance_check"] = check
    print("# importance kernel vs XLA: " + ", ".join(f"{k} {v}" for k, v in check.items()), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256, help="compression MLP width F")
    p.add_argument("--l", type=int, default=32)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--lp", type=int, default=64)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--w", type=int, default=512)
    p.add_argument("--wb", type=int, default=NSASpec.window_block, help="window kernel block")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--implementation", default="auto", help="block_sparse_attention implementation")
    p.add_argument("--dense", default="cudnn", help="jax.nn.dot_product_attention implementation")
    p.add_argument("--breakdown", action="store_true", help="time each NSA piece at the longest length")
    p.add_argument("--pieces", default=",".join(BREAKDOWN_GROUPS),
                   help=f"comma list of the breakdown's groups among {BREAKDOWN_GROUPS}")
    p.add_argument("--profile", action="store_true",
                   help="GPU time per kernel of the whole NSA forward and forward+backward at the longest length")
    p.add_argument("--fused-topn", action=argparse.BooleanOptionalAction, default=True,
                   help="whole-attention rows with the fused importance + top-n kernel "
                        "(config.attention.nsa.fused_topn, the default) or without it")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dtype = jnp.dtype(args.dtype)
    spec = NSASpec(compress_block=args.l, compress_stride=args.d, select_block=args.lp, num_selected=args.n,
                   window=args.w, window_block=args.wb, implementation=args.implementation,
                   fused_topn=args.fused_topn)
    RESULTS["meta"] = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), jax=jax.__version__,
                           device=jax.devices()[0].device_kind, python=platform.python_version(), args=vars(args))
    print(f"# {RESULTS['meta']['device']}, jax {jax.__version__}, B=1 H={args.heads} K={args.kv_heads} "
          f"D={args.head_dim} {args.dtype}; NSA l={args.l} d={args.d} l'={args.lp} n={args.n} w={args.w}", flush=True)
    print("| T | NSA fwd ms | NSA fwd+bwd ms | dense fwd ms | dense fwd+bwd ms | speed-up fwd | speed-up fwd+bwd |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    nsa_fwd, nsa_fb = nsa_fns(spec)
    dense_fwd, dense_fb = dense_fns(args.dense)

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(RESULTS, f, indent=1)

    for t in args.lengths:
        x = make_inputs(args, t, dtype)
        cot = jax.random.normal(jax.random.key(1), x["q"].shape, jnp.float32)
        row = {"T": t}
        for name, fn, fargs in (("nsa_fwd", nsa_fwd, (x,)), ("nsa_fwd_bwd", nsa_fb, (x, cot)),
                                ("dense_fwd", dense_fwd, (x["q"], x["k_slc"], x["v_slc"])),
                                ("dense_fwd_bwd", dense_fb, (x["q"], x["k_slc"], x["v_slc"], cot))):
            res = guarded(f"{name}@{t}", lambda: bench(fn, *fargs))
            if res:
                row[name], row[name + "_compile_s"] = res
        RESULTS["rows"].append(row)
        fmt = lambda k: f"{row[k]:.2f}" if k in row else "—"
        ratio = lambda a, b: f"{row[b] / row[a]:.2f}×" if a in row and b in row else "—"
        print(f"| {t:,} | {fmt('nsa_fwd')} | {fmt('nsa_fwd_bwd')} | {fmt('dense_fwd')} | {fmt('dense_fwd_bwd')} | "
              f"{ratio('nsa_fwd', 'dense_fwd')} | {ratio('nsa_fwd_bwd', 'dense_fwd_bwd')} |", flush=True)
        del x, cot
        save()
    if args.profile:
        t = max(args.lengths)
        x = make_inputs(args, t, dtype)
        cot = jax.random.normal(jax.random.key(1), x["q"].shape, jnp.float32)
        for name, fn, fargs in (("nsa_fwd", nsa_fwd, (x,)), ("nsa_fwd_bwd", nsa_fb, (x, cot))):
            prof = guarded(f"profile/{name}@{t}", lambda: timing.kernel_profile(fn, *fargs))
            if prof:
                RESULTS.setdefault("profile", {"T": t})[name] = prof
                timing.print_profile(prof, f"{name} at T={t}")
        del x, cot
        save()
    if args.breakdown:
        t = max(args.lengths)
        pieces = guarded(f"breakdown@{t}", lambda: breakdown(args, spec, t, dtype))
        if pieces:
            RESULTS["breakdown"] = {"T": t, **pieces}
            print(f"# pieces at T={t}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in pieces.items()), flush=True)
        save()


if __name__ == "__main__":
    main()
