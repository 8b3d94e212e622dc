"""About 1B-parameter Native Sparse Attention model at 32k context on one H200.

The shape of `configs/dense_1b.py` (d_model 2048, 16 layers, 16 heads of 128, SwiGLU 8192, byte
vocabulary padded to 320, tied embeddings) with GQA 16 query heads per KV head as in the paper
(num_kv_heads 1: one shared selection per token for all 16 heads, the 16-row tiles the selection
kernel wants), and the paper's NSA hyper-parameters (l=32, d=16, l'=64, n=16 with 1 initial + 2
local forced blocks, w=512). Per layer NSA adds two K/V projections (window, compression), two
compression MLPs (32·128 -> 256 -> 128) and a gate: about 1.0B parameters in all.
Layers scanned (`model.scan_layers`: one layer traced, parameters stacked [16, ...]): on the H200
the step compiles in ~30 s and runs 1.15 s at 32k x 2 (56.8k tokens/s, 1.45x dense_1b) and 1.18 s at
64k x 1 (2.15x dense_1b; benchmarks/RESULTS.md, 2026-11-29), where 16 unrolled layers spent ~90 s
compiling the initialiser and 66 s the step. For dense_1b, unrolling
is 5% faster per step (0.94 vs 0.99 s at 8k): `--config.model.scan_layers=False` for long runs.

    python train.py --config=configs/nsa_1b.py --workdir=runs/nsa_1b
"""
from configs import common


def get_config():
    config = common.base_config()
    common.llama_model(config, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=1, mlp_dim=8192,
                       dtype="bfloat16", remat="dots_attention", rope_theta=500000.0)
    config.model.scan_layers = True
    config.attention.kind = "nsa"
    common.update(config.attention.nsa, compress_hidden=256)
    common.update(config.data, source="embedded", tokenizer="byte", seq_len=32768, global_batch_size=2)
    common.update(config.train, num_steps=2000, learning_rate=3e-4, warmup_steps=200, end_lr_ratio=0.1,
                  log_every=10, eval_every=500, eval_batches=8, checkpoint_every=500)
    return config
