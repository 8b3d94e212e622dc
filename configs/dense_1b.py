"""About 1.0B-parameter dense model at 8k context, sized for one H200 (bfloat16 compute, cuDNN
flash attention, remat of everything but the weight matmuls and the attention kernel's outputs:
53.8% MFU on one H200, benchmarks/RESULTS.md).

Shape: d_model 2048, 16 layers, 16 heads of 128, 8 KV heads (GQA 2), SwiGLU 8192, byte vocabulary
(padded to 320), tied embeddings: 1.007B parameters (tests/sparsejax/test_model.py prints the count).
Layers unrolled, the configuration measured on the GPU. `--config.model.scan_layers=True` stacks the
parameters [16, ...] and traces one layer: on CPU the train step compiles in 3.7 s instead of 13.7 s
and the initialiser in 2.5 s instead of 22.2 s (benchmarks/compile_time.py; on the H200 the unrolled
initialiser takes ~90 s to compile, the scanned step 15 s). Scanned, the step is 5% slower on the
H200: 0.993 s against 0.944 s (51.1% against 53.8% MFU).

    python train.py --config=configs/dense_1b.py --workdir=/tmp/dense_1b
"""
from configs import common


def get_config():
    config = common.base_config()
    common.llama_model(config, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8, mlp_dim=8192,
                       dtype="bfloat16", remat="dots_attention", rope_theta=500000.0)
    config.attention.kind = "dense"
    common.update(config.data, source="embedded", tokenizer="byte", seq_len=8192, global_batch_size=8)
    common.update(config.train, num_steps=2000, learning_rate=3e-4, warmup_steps=200, end_lr_ratio=0.1,
                  log_every=10, eval_every=500, eval_batches=8, checkpoint_every=500)
    return config
