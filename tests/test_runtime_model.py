"""Our forward pass (runtime.model.Transformer) against transformers, in fp32, on tiny random models.

Covered shapes: Qwen2 (q/k/v biases) and Llama (no bias, and with attention_bias), tied and untied
LM heads, grouped-query / multi-query / full multi-head attention, an explicit head_dim that differs
from hidden/heads, and static RoPE scaling (linear, llama3). For each: prefill logits, per-step decode
logits, logits of a random token tree, and greedy output token for token against `generate`.
"""
from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from specmesh.services.runtime.engines import Request, generate_ar
from specmesh.services.runtime.model import causal_mask
from specmesh.services.runtime.tree_mask import ancestor_matrix, tree_mask

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = RTOL = 1e-4

CONFIGS = {
    "qwen2-untied-gqa": dict(arch="qwen2", heads=4, kv_heads=2),
    "qwen2-tied-mha": dict(arch="qwen2", heads=4, kv_heads=4, tie_word_embeddings=True),
    "llama-untied-mqa": dict(arch="llama", heads=4, kv_heads=1, seed=1),
    "llama-tied-gqa-headdim": dict(arch="llama", heads=4, kv_heads=2, head_dim=16, tie_word_embeddings=True, seed=2),
    "llama-bias-linear-rope": dict(arch="llama", heads=2, kv_heads=1, attention_bias=True, seed=3,
                                   rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "llama-llama3-rope": dict(arch="llama", heads=4, kv_heads=2, seed=4, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32, "rope_theta": 10000.0}),
    "qwen2-yarn-rope": dict(arch="qwen2", heads=4, kv_heads=2, seed=5, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1000000.0}),
}


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request: pytest.FixtureRequest, make_hf_model: Any) -> tuple[Any, Any]:
    """(transformers model, our Transformer) with identical weights."""
    return make_hf_model(vocab=96, hidden=32, **CONFIGS[request.param])


def hf_logits(hf: Any, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def random_prompt(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def test_config_is_what_the_case_claims(pair: tuple[Any, Any]) -> None:
    """Guard against a silently ignored config override (the cases would then test less)."""
    hf, ours = pair
    cfg = ours.config
    assert cfg.model_type == hf.config.model_type
    assert cfg.tie_word_embeddings == bool(hf.config.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        assert ours.lm_head.data_ptr() == ours.embed.data_ptr()
    assert (ours.layers[0].qkv_bias is not None) == (cfg.model_type == "qwen2" or hf.config.attention_bias)
    assert cfg.num_kv_heads == hf.config.num_key_value_heads
    head_dim = getattr(hf.config, "head_dim", None) or hf.config.hidden_size // hf.config.num_attention_heads
    assert cfg.head_dim == head_dim
    llama_bias = cfg.model_type == "llama" and bool(hf.config.attention_bias)
    assert (ours.layers[0].o_bias is not None) == llama_bias


def test_prefill_logits_match(pair: tuple[Any, Any]) -> None:
    hf, ours = pair
    rng = random.Random(0)
    for n in (1, 2, 7, 33):
        prompt = random_prompt(rng, ours.vocab_size, n)
        cache = ours.new_cache(64)
        got = ours.forward(torch.tensor(prompt), torch.arange(n), cache, 0, causal_mask(0, n))
        torch.testing.assert_close(got, hf_logits(hf, prompt), atol=ATOL, rtol=RTOL)
        # logits_rows picks rows without changing them
        cache2 = ours.new_cache(64)
        last = ours.forward(torch.tensor(prompt), torch.arange(n), cache2, 0, causal_mask(0, n),
                            logits_rows=slice(n - 1, n))
        torch.testing.assert_close(last, got[-1:], atol=ATOL, rtol=RTOL)


def test_decode_step_logits_match(pair: tuple[Any, Any]) -> None:
    """Prefill a few tokens, then feed one token at a time (mask None) over the cache."""
    hf, ours = pair
    rng = random.Random(1)
    seq = random_prompt(rng, ours.vocab_size, 20)
    ref = hf_logits(hf, seq)
    cache = ours.new_cache(32)
    head = 5
    ours.forward(torch.tensor(seq[:head]), torch.arange(head), cache, 0, causal_mask(0, head))
    for i in range(head, len(seq)):
        got = ours.forward(torch.tensor([seq[i]]), torch.tensor([i]), cache, i, None)
        torch.testing.assert_close(got[0], ref[i], atol=ATOL, rtol=RTOL, msg=lambda m, i=i: f"step {i}: {m}")


def random_tree(rng: random.Random, n: int, vocab: int) -> tuple[list[int], list[int]]:
    """Arbitrary parents (parents[i] < i, root 0); random tokens, duplicates among siblings allowed."""
    parents = [-1] + [rng.randrange(i) for i in range(1, n)]
    return [rng.randrange(vocab) for _ in range(n)], parents


def path_to(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


@pytest.mark.parametrize("prefix_len,n", [(0, 6), (1, 9), (11, 17)])
def test_tree_forward_matches_each_path(pair: tuple[Any, Any], prefix_len: int, n: int) -> None:
    """One tree forward (positions = committed + depth, ancestor mask) == each root-to-node path run
    as a plain sequence through transformers."""
    hf, ours = pair
    rng = random.Random(100 * prefix_len + n)
    prefix = random_prompt(rng, ours.vocab_size, prefix_len)
    tokens, parents = random_tree(rng, n, ours.vocab_size)
    depth = [len(path_to(parents, i)) - 1 for i in range(n)]
    assert max(depth) >= 2 or n < 4  # a real tree, not just a star
    cache = ours.new_cache(64)
    if prefix_len:
        ours.forward(torch.tensor(prefix), torch.arange(prefix_len), cache, 0, causal_mask(0, prefix_len))
    mask = tree_mask(prefix_len, ancestor_matrix(parents))
    got = ours.forward(torch.tensor(tokens), torch.tensor(depth) + prefix_len, cache, prefix_len, mask)
    for i in range(n):
        seq = prefix + [tokens[j] for j in path_to(parents, i)]
        torch.testing.assert_close(got[i], hf_logits(hf, seq)[-1], atol=ATOL, rtol=RTOL,
                                   msg=lambda m, i=i: f"node {i} (parents {parents}): {m}")


def test_greedy_matches_transformers_generate(pair: tuple[Any, Any]) -> None:
    hf, ours = pair
    rng = random.Random(2)
    for n in (1, 3, 12):
        prompt = random_prompt(rng, ours.vocab_size, n)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, n:].tolist()
        got = sum(generate_ar(ours, Request(prompt, 24), 64), [])
        assert got == ref, f"prompt {prompt}"


def test_loaded_checkpoint_matches_transformers(tiny_pair: Any, tiny_target: Any, tiny_hf_target: Any,
                                                tiny_tokenizer: Any) -> None:
    """The saved tiny target through load_transformer (safetensors, byte tokenizer) == transformers."""
    texts = ["hello world", "x", "def f(a, b):\n    return a + b", "The quick brown fox jumps over the lazy dog"]
    for text in texts:
        prompt = tiny_tokenizer(text)["input_ids"]
        n = len(prompt)
        got = tiny_target.forward(torch.tensor(prompt), torch.arange(n), tiny_target.new_cache(n), 0,
                                  causal_mask(0, n))
        torch.testing.assert_close(got, hf_logits(tiny_hf_target, prompt), atol=ATOL, rtol=RTOL)
        with torch.no_grad():
            ref = tiny_hf_target.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                          eos_token_id=None, pad_token_id=256)[0, n:].tolist()
        assert sum(generate_ar(tiny_target, Request(prompt, 32), 128), []) == ref, text
