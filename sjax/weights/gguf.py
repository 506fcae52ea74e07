"""GGUF checkpoints: architecture from metadata, tensors dequantised to HF layout.

The `gguf` package dequantises every tensor type in the shipped files into HF's [out, in]
layout; llama-architecture files additionally store Q/K rows permuted by llama.cpp's
converter, which `_unpermute` undoes per head.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize

from sjax.errors import SjaxError
from sjax.models.transformer import ARCHS, ArchConfig

GGUF_MAGIC = b"GGUF"

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def open_reader(path: Path):
    if not is_gguf(path):
        raise SjaxError(f"{path}: not a GGUF file (bad magic bytes)")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # truncated or corrupt: gguf raises assorted errors
        raise SjaxError(f"{path}: unreadable GGUF ({type(e).__name__}: {e})") from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def arch_from_gguf(reader, path: Path) -> ArchConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise SjaxError(f"{path}: architecture {arch!r} is not supported "
                        f"(supported: {', '.join(ARCHS)})")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise SjaxError(f"{path}: GGUF rope_freqs (Llama-3.1 rope scaling) is not supported; "
                        "load the Hugging Face folder instead")
    try:
        d = int(_field(reader, f"{arch}.embedding_length"))
        n = int(_field(reader, f"{arch}.attention.head_count"))
        vocab = _field(reader, f"{arch}.vocab_size") or len(
            reader.fields["tokenizer.ggml.tokens"].data)
        return ArchConfig(
            arch=arch, vocab_size=int(vocab), d_model=d,
            n_layers=int(_field(reader, f"{arch}.block_count")), n_heads=n,
            n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n)),
            head_dim=int(_field(reader, f"{arch}.attention.key_length", d // n)),
            d_ff=int(_field(reader, f"{arch}.feed_forward_length")),
            rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            tie_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names,
            max_positions=int(_field(reader, f"{arch}.context_length", 32768)),
        )
    except (TypeError, KeyError) as e:
        raise SjaxError(f"{path}: GGUF metadata incomplete ({e})") from None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (per head: interleaved -> rotate-half pairs)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def hf_tensors_from_gguf(reader, arch: ArchConfig, path: Path) -> dict[str, np.ndarray]:
    """Dequantise every tensor to fp32 under its HF name."""
    out = {}
    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, i, rest = t.name.split(".", 2)
            if rest not in _LAYER_NAMES:
                raise SjaxError(f"{path}: unexpected tensor {t.name!r}")
            name = f"model.layers.{i}.{_LAYER_NAMES[rest]}"
        elif t.name in _TOP_NAMES:
            name = _TOP_NAMES[t.name]
        else:
            raise SjaxError(f"{path}: unexpected tensor {t.name!r}")
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if arch.arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            w = _unpermute(w, arch.n_heads if ".attn_q." in t.name else arch.n_kv_heads)
        out[name] = w
    return out


# ----------------------------------------------------------------------------- tokenizer

# How each `tokenizer.ggml.pre` splits text before byte-level BPE (the regex its merges were
# learned on); a file without an entry here gets GPT-2's split (ByteLevel's own regex).
# Qwen2's is transformers' models/qwen2 PRETOKENIZE_REGEX, copied: it is part of the model.
_PRE_SPLITS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types: special tokens, plain added tokens


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in which byte-level vocabularies are spelled
    (what the ByteLevel pre-tokenizer emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def tokenizer_from_gguf(reader, path: Path):
    """The Hugging Face fast tokenizer a byte-level BPE GGUF describes (vocabulary, merges,
    pre-tokenizer split, special tokens, chat template), built with `tokenizers` alone: the
    transformers GGUF path reads the file with torch, which sjax does not need at run time.
    tests/test_registry_models.py checks it against that path, token for token."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise SjaxError(f"{path}: tokenizer.ggml.model={kind!r}: sjax builds byte-level BPE "
                        "(gpt2) tokenizers only; load the Hugging Face folder instead")
    try:
        tokens = list(_field(reader, "tokenizer.ggml.tokens"))
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    except TypeError:
        raise SjaxError(f"{path}: GGUF tokenizer incomplete (no tokens or merges)") from None
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    alphabet = bytes_to_unicode()
    spelled = set(alphabet.values())
    vocab = {t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                               continuing_subword_prefix="", end_of_word_suffix=""))
    split = _PRE_SPLITS.get(_field(reader, "tokenizer.ggml.pre"))
    tok.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else
                         pre_tokenizers.Sequence([
                             pre_tokenizers.Split(Regex(split), behavior="isolated"),
                             pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                      use_regex=False)]))
    tok.decoder = decoders.ByteLevel()
    # a control token spelled outside the byte alphabet is a converter's mislabel, not special
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= spelled])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab])

    def special(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special("bos"), eos_token=special("eos"),
        unk_token=special("unknown"), pad_token=special("padding"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)))
