"""Tiny random Hugging Face models built offline from configs, saved as model folders with a tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from sparsefit.compress import builtin_sentences


def word_tokenizer(folder: Path, bos: bool = False):
    """A word-level fast tokenizer over the builtin corpus' words (no network), saved in ``folder``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(
        {w for s in builtin_sentences("calibration") + builtin_sentences("heldout") for w in s.lower().split()}
    )
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words[:3000])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(str(folder))
    return fast, len(vocab)


def tiny_bert(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    _, vocab = word_tokenizer(folder)
    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=160,
    )
    torch.manual_seed(seed)
    transformers.BertModel(cfg).to(dtype).save_pretrained(str(folder))
    return folder


def tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    _, vocab = word_tokenizer(folder)
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_embd=24, n_layer=2, n_head=2, n_positions=160, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(seed)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(folder))
    return folder


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
