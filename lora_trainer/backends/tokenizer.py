"""The CLIP tokenizer, offline.

The package ships OpenAI CLIP's BPE merges (`assets/bpe_simple_vocab_16e6.txt.gz`, the file open_clip ships, MIT
licensed). The `vocab.json`/`merges.txt` pair that transformers' CLIPTokenizerFast reads is derived from it exactly
as the Hugging Face `openai/clip-vit-large-patch14` files were, and cached once under LORA_TRAINER_CACHE (default
~/.cache/lora_trainer). SD1 pads with `<|endoftext|>`; SD2 and SDXL's second encoder pad with `!` (id 0).
"""

from __future__ import annotations

import functools
import gzip
import json
import os

from ..fileio import atomic_write_text

ASSET = os.path.join(os.path.dirname(__file__), "assets", "bpe_simple_vocab_16e6.txt.gz")
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 512 - 2  # 256 bytes, 256 bytes + "</w>", BOS and EOS
PAD_EOS = "<|endoftext|>"
PAD_BANG = "!"


def cache_dir() -> str:
    return os.environ.get("LORA_TRAINER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora_trainer")


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _derive_files(folder: str) -> tuple[str, str]:
    vocab_path = os.path.join(folder, "vocab.json")
    merges_path = os.path.join(folder, "merges.txt")
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        return vocab_path, merges_path
    with gzip.open(ASSET, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:NUM_MERGES + 1]
    base = list(_bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    atomic_write_text(merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_text(vocab_path, json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    return vocab_path, merges_path


@functools.lru_cache(maxsize=4)
def clip_tokenizer(pad_token: str = PAD_EOS):
    from transformers import CLIPTokenizerFast

    vocab, merges = _derive_files(os.path.join(cache_dir(), "clip_tokenizer"))
    return CLIPTokenizerFast(vocab, merges, pad_token=pad_token, model_max_length=77)
