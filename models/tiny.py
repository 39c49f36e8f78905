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


def make_contrary_draft(path: Path, target: Path) -> Path:
    """The target with its logits negated: the draft ranks the target's greedy choice last, so
    (with a vocabulary wider than the tree) every node it sends is rejected, and it says so with
    the target's own confidence. What a planner test needs to see a draft that never pays."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        model.lm_head.weight.neg_()
    model.save_pretrained(path)
    make_tokenizer(path)
    return path


def make_tiny_pair(root: Path, seed: int = 0, draft_arch: str | None = None, noise: float = 0.3,
                   contrary: bool = False) -> tuple[Path, Path]:
    """(target_dir, draft_dir) under root; reuses them if already made with the same settings.
    `contrary`: the draft is `make_contrary_draft` of the target (`draft_arch`, `noise` unused)."""
    root = Path(root)
    stamp = root / "pair.json"
    settings = {"seed": seed, "draft_arch": draft_arch, "noise": noise, "contrary": contrary, "version": 1}
    target, draft = root / "target", root / "draft"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return target, draft
    make_tiny_model(target, "qwen2", seed)
    if contrary:
        make_contrary_draft(draft, target)
    elif draft_arch is None:
        make_tiny_model(draft, "qwen2", seed + 1, noise_from=target, noise=noise)
    else:
        make_tiny_model(draft, draft_arch, seed + 1, hidden=32, layers=1, heads=2, kv_heads=1)
    stamp.write_text(json.dumps(settings))
    return target, draft


#: GGUF types of a tiny quantized model: a mix like llama.cpp's Q4_K_M (4-bit projections, a few
#: 8-bit ones, so fused q/k/v mixes formats), using the types the gguf package can quantize.
TINY_GGUF_TYPES = {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "Q4_0",
                   "ffn_gate": "Q4_0", "ffn_up": "Q5_0", "ffn_down": "Q4_1", "output": "Q8_0", "token_embd": "Q8_0"}


def write_tiny_gguf(model_dir: Path, path: Path, types: dict[str, str] | None = None) -> Path:
    """Write a tiny checkpoint as a GGUF file that transformers and llama.cpp can read back.

    Tensors are quantized by the gguf package (per `types`, keyed by the GGUF tensor kind; norms and
    biases stay F32), llama q/k rows are permuted as llama.cpp's converter does, and the byte-level
    tokenizer and chat template go into the metadata.
    """
    import gguf
    import numpy as np
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from .gguf_weights import _llama_rope_order, gguf_name

    types = TINY_GGUF_TYPES if types is None else types
    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    arch = cfg.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg.vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    special = set(SPECIALS) | {t for t in tokens if t.startswith("[PAD")}
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([])
    w.add_token_scores([0.0] * len(tokens))  # no merges: transformers rebuilds them from scores (none apply)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    state = load_file(str(next(Path(model_dir).glob("*.safetensors"))))
    for name, t in state.items():
        gname = gguf_name(name)
        kind = gname.split(".")[-2] if gname.startswith("blk.") else gname.split(".")[0]
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(kind)
        if arch == "llama" and heads is not None:  # llama.cpp's permute: the inverse of our un-permute
            t = t[torch.argsort(_llama_rope_order(t.shape[0], heads))]
        data = t.float().numpy()
        qtype = types.get(kind) if gname.endswith(".weight") and data.ndim == 2 else None
        if qtype is None:
            w.add_tensor(gname, np.ascontiguousarray(data))
        else:
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gname, gguf.quants.quantize(data, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
