"""Tiny random model pairs made on the fly: for tests, smoke runs (`--tiny`) and CI.

The tokenizer is byte-level (256 byte tokens + ChatML specials) so any text round-trips; the
target is a 2-layer Qwen2, the default draft is the target's weights plus noise (so it agrees with
the target often enough to exercise long accepted paths), and `draft_arch="llama"` gives a draft of
another family and size with the same vocabulary.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)


def make_tiny_model(path: Path, arch: str = "qwen2", seed: int = 0, hidden: int = 64, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, vocab: int = 260, noise_from: Path | None = None,
                    noise: float = 0.0) -> Path:
    """Save a random (or noised copy of another) tiny model + the byte tokenizer into `path`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    path.mkdir(parents=True, exist_ok=True)
    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    config = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                 tie_word_embeddings=False, eos_token_id=258, pad_token_id=256, bos_token_id=None,
                 rope_theta=10000.0 if arch == "llama" else 1000000.0)
    torch.manual_seed(seed)
    if noise_from is not None:
        model = AutoModelForCausalLM.from_pretrained(noise_from, dtype=torch.float32, local_files_only=True)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise * p.std().clamp(min=1e-3))
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # sharper logits than the default init: less uniform, more like a real LM
            model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    make_tokenizer(path)
    return path


def make_tiny_pair(root: Path, seed: int = 0, draft_arch: str | None = None, noise: float = 0.3) -> tuple[Path, Path]:
    """(target_dir, draft_dir) under root; reuses them if already made with the same settings."""
    root = Path(root)
    stamp = root / "pair.json"
    settings = {"seed": seed, "draft_arch": draft_arch, "noise": noise, "version": 1}
    target, draft = root / "target", root / "draft"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return target, draft
    make_tiny_model(target, "qwen2", seed)
    if draft_arch is None:
        make_tiny_model(draft, "qwen2", seed + 1, noise_from=target, noise=noise)
    else:
        make_tiny_model(draft, draft_arch, seed + 1, hidden=32, layers=1, heads=2, kv_heads=1)
    stamp.write_text(json.dumps(settings))
    return target, draft
