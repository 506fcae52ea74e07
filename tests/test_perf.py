"""MFU and tokens/s count model work on real tokens, never padding."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import hf_to_sjax, tiny_hf_model

from sjax.config import MeshConfig, TrainConfig
from sjax.models.transformer import ArchConfig
from sjax.perf import mfu
from sjax.sharding import make_mesh
from sjax.training import fit, train_flops, train_flops_per_token

ARCH = ArchConfig(arch="qwen2", vocab_size=100, d_model=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=8, d_ff=48)


def test_mfu_by_hand():
    # matmul params: 2 layers x (32 x (4 + 2 x 2) x 8 + 4 x 8 x 32 + 3 x 32 x 48) + 32 x 100
    #   = 2 x (2048 + 1024 + 4608) + 3200 = 18560
    # rows of 3 and 5 real tokens, full: 6 x 18560 per token + attention 6 x L x 4 x 8 x 2
    #   = 3 x (111360 + 1152) + 5 x (111360 + 1920) = 337536 + 566400 = 903936
    assert train_flops(ARCH, [3, 5], "full") == 903_936
    # LoRA: 4 x 18560 per token: 3 x (74240 + 1152) + 5 x (74240 + 1920) = 606976
    assert train_flops(ARCH, [3, 5], "lora") == 606_976
    # 903936 FLOPs in 2 s on two 100 kFLOP/s devices
    assert mfu(903_936, 2.0, 1e5, 2) == 2.25984
    assert mfu(903_936, 2.0, 1e5) == 4.51968


def _rows(lengths):
    return [{"messages": [{"role": "user", "content": "owl"},
                          {"role": "assistant", "content": " ".join(["cat"] * n)}]}
            for n in lengths]


def test_fit_metrics_count_real_tokens_only(tmp_path, tiny_tokenizer):
    """One step over rows of very different lengths (most of the padded batch is padding):
    tokens/s and MFU are those of the real tokens."""
    from sjax.data import sft

    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=4))
    data = sft.tokenize_rows(_rows([1, 2, 3, 40]), tiny_tokenizer, 64)
    # <|im_start|> user owl <|im_end|> <|im_start|> assistant ANSWER <|im_end|>; the bucket
    # (64) is longer than every row, so the inputs hold each row whole
    real = [len(ids) for ids in data.ids]
    assert real == [8, 9, 10, 47]
    cfg = TrainConfig(mode="lora", lora_rank=4, batch_size=4, grad_accum=1, epochs=1,
                      vocab_chunk=32)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    out = fit(arch, jax.tree.map(jnp.asarray, params), data, cfg, mesh, tmp_path, pad_id=1,
              log=lambda s: None)
    rec = out["history"][0]
    # the padded batch is 4 x 63 (bucket 64, minus the shifted token): 252 tokens, 74 real
    assert np.isclose(rec["tokens_per_s"] * rec["step_s"], 74, rtol=1e-9)
    flops = sum(train_flops_per_token(arch, n, "lora") * n for n in real)
    assert np.isclose(rec["mfu"] * rec["step_s"] * out["peak_flops"], flops, rtol=1e-9)
