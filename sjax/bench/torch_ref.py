"""The transformers side of every benchmark: the same weights and work, on the same device.

torch is imported inside each function: it is optional (the test extra) and slow to import.
"""

from __future__ import annotations

from sjax.errors import SjaxError
from sjax.weights.load import read_arch
from sjax.weights.random_init import hf_tensors


def torch_device():
    """Where the transformers reference runs: the GPU when there is one, as sjax does."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_sync() -> None:
    """Wait for queued GPU work, so a host timer reads finished work (no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_model(source):
    """The same checkpoint through transformers, fp32 on `torch_device()`: a GGUF file, a HF
    folder, or a shipped architecture folder (`model.init=random`), which gets exactly the
    random weights sjax creates for it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if source.is_dir() and not any(source.glob("*.safetensors*")):  # model.init=random
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(source)),
                                                 dtype=torch.float32)
        state = {k: torch.from_numpy(v) for k, v in hf_tensors(read_arch(source)).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or not set(missing) <= {"lm_head.weight"}:  # tied heads only
            raise SjaxError(f"{source}: random weights do not fit transformers' model "
                            f"(missing {missing}, unexpected {unexpected})")
        model.tie_weights()
        return model.to(torch_device())
    kw = ({"gguf_file": source.name} if source.is_file() else {})
    folder = source.parent if source.is_file() else source
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                **kw).to(torch_device())
