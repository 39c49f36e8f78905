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
from specmesh.services.runtime.engines import generate_ar
from specmesh.services.runtime.request import Request
from specmesh.services.runtime.forward_batch import Logits, Runner, SeqRows, causal
from specmesh.services.runtime.tree_mask import ancestor_matrix

from runner_testing import run_rows

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
        got = run_rows(ours, prompt, cache)
        torch.testing.assert_close(got, hf_logits(hf, prompt), atol=ATOL, rtol=RTOL)
        # Logits.LAST picks the last row without changing it
        cache2 = ours.new_cache(64)
        last = run_rows(ours, prompt, cache2, logits=Logits.LAST)
        torch.testing.assert_close(last, got[-1:], atol=ATOL, rtol=RTOL)


def test_decode_step_logits_match(pair: tuple[Any, Any]) -> None:
    """Prefill a few tokens, then feed one token at a time (mask None) over the cache."""
    hf, ours = pair
    rng = random.Random(1)
    seq = random_prompt(rng, ours.vocab_size, 20)
    ref = hf_logits(hf, seq)
    cache = ours.new_cache(32)
    head = 5
    run_rows(ours, seq[:head], cache)
    for i in range(head, len(seq)):
        got = run_rows(ours, [seq[i]], cache, i, mask=None)
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
        run_rows(ours, prefix, cache)
    got = run_rows(ours, tokens, cache, prefix_len, positions=[d + prefix_len for d in depth],
                   mask=ancestor_matrix(parents))
    for i in range(n):
        seq = prefix + [tokens[j] for j in path_to(parents, i)]
        torch.testing.assert_close(got[i], hf_logits(hf, seq)[-1], atol=ATOL, rtol=RTOL,
                                   msg=lambda m, i=i: f"node {i} (parents {parents}): {m}")


def test_one_batched_forward_equals_each_sequence_alone(pair: tuple[Any, Any]) -> None:
    """Prefill chunk, tree verify, draft-style expansion against cached tree slots and a decode row
    of four sequences in one Runner.forward give each sequence's logits and KV as run alone (fp32)."""
    _hf, ours = pair
    runner = Runner(ours, max_rows=64)

    def setup() -> list[tuple[Any, SeqRows]]:
        rows = []
        # 0: a prompt chunk after 4 cached tokens; 1: a 7-node tree after 9 committed tokens;
        # 2: 3 leaves after 6 committed tokens and 2 cached tree slots; 3: one decode row.
        for kind, committed in (("chunk", 4), ("tree", 9), ("expand", 6), ("decode", 11)):
            cache = ours.new_cache(40)
            prefix = random_prompt(random.Random(committed), ours.vocab_size, committed)
            run_rows(ours, prefix, cache)
            r = random.Random(committed + 1)
            if kind == "chunk":
                toks = random_prompt(r, ours.vocab_size, 5)
                # Logits.LAST: the runner puts the token rows of the others first and must hand
                # every sequence its own logits back in the callers' order
                rows.append((cache, SeqRows(cache, toks, list(range(4, 9)), 4, 4, causal(5, ours.device),
                                            Logits.LAST)))
            elif kind == "tree":
                toks, parents = random_tree(r, 7, ours.vocab_size)
                depth = [len(path_to(parents, i)) - 1 for i in range(7)]
                rows.append((cache, SeqRows(cache, toks, [9 + d for d in depth], 9, 9, ancestor_matrix(parents))))
            elif kind == "expand":
                run_rows(ours, random_prompt(r, ours.vocab_size, 2), cache, 6, mask=torch.ones(2, 2).tril().bool())
                anc = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.bool)
                toks = random_prompt(r, ours.vocab_size, 3)
                rows.append((cache, SeqRows(cache, toks, [7, 8, 8], 8, 6, anc)))
            else:
                rows.append((cache, SeqRows(cache, [r.randrange(ours.vocab_size)], [11], 11, 11, None)))
        return rows

    alone = [(c, runner.forward_one(rows)) for c, rows in setup()]
    together_rows = setup()
    together = runner.forward([rows for _, rows in together_rows])
    for (c1, l1), (c2, _), l2 in zip(alone, together_rows, together):
        torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c2.k, c1.k, atol=1e-5, rtol=1e-5)


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
        got = run_rows(tiny_target, prompt, tiny_target.new_cache(n))
        torch.testing.assert_close(got, hf_logits(tiny_hf_target, prompt), atol=ATOL, rtol=RTOL)
        with torch.no_grad():
            ref = tiny_hf_target.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                          eos_token_id=None, pad_token_id=256)[0, n:].tolist()
        assert sum(generate_ar(tiny_target, Request(prompt, 32), 128), []) == ref, text
