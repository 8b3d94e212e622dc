"""Tiny dense model on the embedded corpus (Python standard library sources, bytes): trains on a
2-core CPU in a few minutes with a clearly falling loss.

    python train.py --config=configs/dense_tiny.py --workdir=/tmp/tiny
"""
from configs import common


def get_config():
    config = common.base_config()
    common.llama_model(config, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384,
                       dtype="float32", remat="none")
    config.attention.kind = "dense"
    # document starts on nsa_tiny's selection grid (l' = 16): both tiny configs train on identical rows
    common.update(config.data, source="embedded", tokenizer="byte", seq_len=256, global_batch_size=16,
                  document_alignment=16)
    common.update(config.train, num_steps=200, learning_rate=3e-3, warmup_steps=20, end_lr_ratio=0.1,
                  log_every=10, eval_every=100, eval_batches=4, checkpoint_every=100)
    return config
