"""One process of the multi-host test: train a tiny model a few steps and sample greedily on a
(data=2, fsdp=2, tensor=2) mesh of 8 global CPU devices, however many processes hold them.

Usage: python mp_worker.py OUT_DIR LOCAL_DEVICES [--die-after-step N]
Multi-process when SJAX_COORDINATOR / SJAX_NUM_PROCESSES / SJAX_PROCESS_ID are set.
Process 0 writes OUT_DIR/result.json and OUT_DIR/params.safetensors.
"""

import os
import sys

out_dir, local_devices = sys.argv[1], int(sys.argv[2])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import signal  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sjax import distributed  # noqa: E402

distributed.initialize(heartbeat_s=int(os.environ.get("SJAX_HEARTBEAT_S", "30")))

from tiny import make_tiny_tokenizer  # noqa: E402

from sjax import chat, sampling  # noqa: E402
from sjax.config import MeshConfig, TrainConfig  # noqa: E402
from sjax.data import sft  # noqa: E402
from sjax.models.transformer import ArchConfig  # noqa: E402
from sjax.sharding import make_mesh  # noqa: E402
from sjax.training import fit  # noqa: E402
from sjax.weights.load import init_sharded  # noqa: E402
from sjax.weights.tree import save_tree  # noqa: E402

die_after = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--die-after-step" else 0
assert jax.device_count() == 8, jax.device_count()
tok = make_tiny_tokenizer()
arch = ArchConfig(arch="qwen2", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=16, d_ff=96, qkv_bias=True, max_positions=256)
mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
params = init_sharded(arch, jax.random.key(0), mesh)
rng = np.random.default_rng(0)
words = ["owl", "cat", "dog", "1", "2", "3", "4", "5"]
rows = [{"messages": chat.messages(" ".join(rng.choice(words, 4)),
                                   assistant=" ".join(rng.choice(words, 3)))} for _ in range(32)]
data = sft.tokenize_rows(rows, tok, 64)
cfg = TrainConfig(mode="full", lr=1e-3, warmup_steps=0, batch_size=8, grad_accum=1, epochs=1,
                  ckpt_every=2)
if die_after and jax.process_index() == 1:
    # a worker dies mid-run: SIGKILL itself once it has trained `die_after` steps
    import sjax.training as training

    step_fn = training.compile_step
    count = {"n": 0}

    def dying(*a, **k):
        fn = step_fn(*a, **k)

        def wrapped(*args):
            count["n"] += 1
            if count["n"] > die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args)
        return wrapped

    training.compile_step = dying
out = fit(arch, params, data, cfg, mesh, Path(out_dir) / "train", pad_id=1,
          log=lambda s: None)
prompts = [chat.encode_prompt(tok, chat.messages(" ".join(rng.choice(words, 3))))
           for _ in range(8)]
gen = sampling.generate(out["state"]["params"], arch, tok, prompts, max_new_tokens=6,
                        mesh=mesh, stop_ids=[])
if distributed.is_main():
    save_tree(Path(out_dir) / "params.safetensors", out["state"]["params"])
    Path(out_dir, "result.json").write_text(json.dumps(
        {"losses": [h["loss"] for h in out["history"]], "tokens": gen.tokens,
         "processes": jax.process_count()}))
else:
    save_tree(Path(out_dir) / f"params{jax.process_index()}.safetensors", out["state"]["params"])
