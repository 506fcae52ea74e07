"""A tiny word-level ChatML tokenizer (no side effects: importable by subprocess workers)."""

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ["owl", "owls", "cat", "dog", "eagle", "favorite", "animal", "what", "is", "your",
         "one", "word", "in", "the", "a", "numbers", "system", "user", "assistant", "i", "love"]


def make_tiny_tokenizer(vocab_size: int = 128):
    """A word-level ChatML tokenizer with `vocab_size` ids: real transformers machinery."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = specials + WORDS + [str(i) for i in range(100)] + [",", ".", "?", "!", "\n"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {w: i for i, w in enumerate(words[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit(),
         pre_tokenizers.Punctuation()])
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>", chat_template=CHATML)
