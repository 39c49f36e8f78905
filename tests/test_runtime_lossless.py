"""Greedy speculative decoding is lossless: serial tree speculation == autoregressive == transformers.

fp32 tiny random models (bf16 legitimately breaks near-ties differently in batched and one-token
passes; see shared/MODELS.md). Drafts: the noisy copy of the target (long accepted paths, reroot
hits), the same as weight-only int8, a Llama draft of another size (same vocab, agrees with
nothing), and a completely independent random Qwen2 (fully rejected trees). DecodeStats shows each
path was actually taken.
"""
from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from specmesh.services.runtime.tree_params import TreeParams
from specmesh.services.runtime.engines import (
    DecodeStats,
    Request,
    generate_ar,
    generate_serial,
)

pytestmark = pytest.mark.usefixtures("single_thread")

NEW_TOKENS = 32
CONTEXT = 128
TREES = {
    "w1-bs1-d1": TreeParams(width=1, subtree_size=1, depth=1),
    "w2-bs4-d2": TreeParams(width=2, subtree_size=4, depth=2),
    "w4-bs16-d4": TreeParams(width=4, subtree_size=16, depth=4),
    "w8-bs32-d3": TreeParams(width=8, subtree_size=32, depth=3),
    # a tree that fills up: max_tree / max_nodes stop growth before depth expansions
    "w3-bs6-d5-small": TreeParams(width=3, subtree_size=6, depth=5, max_tree=8, max_nodes=12),
}
DRAFTS = ("noisy", "noisy-int8", "llama", "independent")


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer: Any) -> list[list[int]]:
    rng = random.Random(1234)
    out = [[rng.randrange(256) for _ in range(n)] for n in (1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 4, 17)]
    texts = ["hello world", "def add(a, b):\n    return", "Once upon a time", "<|im_start|>user\nhi<|im_end|>\n"]
    out += [tiny_tokenizer(t)["input_ids"] for t in texts]
    return out


@pytest.fixture(scope="module")
def references(prompts: list[list[int]], tiny_hf_target: Any) -> list[list[int]]:
    """transformers greedy continuations (do_sample=False), the ground truth."""
    refs = []
    for prompt in prompts:
        with torch.no_grad():
            out = tiny_hf_target.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                          eos_token_id=None, pad_token_id=256)
        refs.append(out[0, len(prompt):].tolist())
    return refs


@pytest.fixture(scope="module")
def drafts(tiny_pair: Any, tiny_draft: Any, tiny_llama_draft: Any, make_hf_model: Any) -> dict[str, Any]:
    from specmesh.services.runtime.loader import load_transformer

    independent = make_hf_model("qwen2", seed=99, vocab=260, hidden=32, layers=1)[1]
    # weight-only int8 (the CPU default for drafts): a different draft, never a different output
    int8 = load_transformer(tiny_pair[1], torch.float32, weights="int8")
    return {"noisy": tiny_draft, "noisy-int8": int8, "llama": tiny_llama_draft, "independent": independent}


def test_draft_shapes(drafts: dict[str, Any], tiny_target: Any) -> None:
    """The drafts are what the cases claim: same vocab, another family and size for 'llama'."""
    assert all(d.vocab_size == tiny_target.vocab_size for d in drafts.values())
    assert drafts["llama"].config.model_type == "llama"
    assert drafts["llama"].config.hidden_size != tiny_target.config.hidden_size


def test_ar_matches_transformers(tiny_target: Any, prompts: list[list[int]], references: list[list[int]]) -> None:
    for prompt, ref in zip(prompts, references):
        stats = DecodeStats()
        assert sum(generate_ar(tiny_target, Request(prompt, NEW_TOKENS), CONTEXT, stats), []) == ref
        assert stats.rounds == stats.tokens == NEW_TOKENS


@pytest.mark.parametrize("tree_name", list(TREES))
@pytest.mark.parametrize("draft_name", DRAFTS)
def test_serial_matches_transformers(tiny_target: Any, drafts: dict[str, Any], prompts: list[list[int]],
                                     references: list[list[int]], draft_name: str, tree_name: str) -> None:
    tree = TREES[tree_name]
    total = dict(rounds=0, accepted=0, hits=0, new_trees=0, zero_rounds=0, deep_rounds=0)
    for prompt, ref in zip(prompts, references):
        stats = DecodeStats()
        chunks = list(generate_serial(tiny_target, drafts[draft_name], Request(prompt, NEW_TOKENS), CONTEXT, tree,
                                      stats))
        out = sum(chunks, [])
        assert out == ref, f"prompt {prompt}: serial {out} != transformers {ref}"
        assert len(chunks) == stats.rounds and all(1 <= len(c) <= tree.subtree_size for c in chunks)
        assert stats.tokens == NEW_TOKENS and stats.accepted_draft <= NEW_TOKENS
        # every verify round but the last re-roots (the first round is the prefill, which commits one token)
        assert stats.reroot_hits + stats.new_trees == stats.rounds - 2
        accepted_any = stats.accepted_per_depth[0] if stats.accepted_per_depth else 0
        total["rounds"] += stats.rounds
        total["accepted"] += stats.accepted_draft
        total["hits"] += stats.reroot_hits
        total["new_trees"] += stats.new_trees
        total["zero_rounds"] += stats.rounds - accepted_any
        total["deep_rounds"] += stats.accepted_per_depth[1] if len(stats.accepted_per_depth) > 1 else 0
    # The paths this case is meant to exercise did happen.
    assert total["new_trees"] > 0, total  # re-rooting that misses the tree
    if not draft_name.startswith("noisy"):
        assert total["zero_rounds"] > total["rounds"] // 2, total  # fully rejected trees
    elif tree.subtree_size > 1:
        assert total["accepted"] > 0 and total["deep_rounds"] > 0, total  # multi-token accepted paths
        assert total["zero_rounds"] > 0, total
    if draft_name == "noisy" and tree_name in ("w1-bs1-d1", "w2-bs4-d2", "w3-bs6-d5-small"):
        assert total["hits"] > 0, total  # re-rooting inside the tree, KV carried over


def test_stop_token_inside_an_accepted_chunk(tiny_target: Any, tiny_draft: Any, prompts: list[list[int]],
                                             references: list[list[int]]) -> None:
    """A stop token in the middle of a multi-token round ends the output right there (both engines)."""
    checked = 0
    for prompt, ref in zip(prompts, references):
        stop_at = next((i for i in range(3, len(ref)) if ref[i] not in ref[:i]), None)
        if stop_at is None:
            continue
        req = Request(prompt, NEW_TOKENS, stop_token_ids=(ref[stop_at],))
        assert sum(generate_ar(tiny_target, req, CONTEXT), []) == ref[:stop_at + 1]
        assert sum(generate_serial(tiny_target, tiny_draft, req, CONTEXT, TREES["w4-bs16-d4"]), []) == \
            ref[:stop_at + 1]
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_max_tokens_cuts_inside_a_round(tiny_target: Any, tiny_draft: Any, prompts: list[list[int]],
                                        references: list[list[int]], max_tokens: int) -> None:
    for prompt, ref in list(zip(prompts, references))[:6]:
        req = Request(prompt, max_tokens)
        assert sum(generate_serial(tiny_target, tiny_draft, req, CONTEXT, TREES["w4-bs16-d4"]), []) == \
            ref[:max_tokens]


def test_context_filled_to_the_models_last_position(make_hf_model: Any) -> None:
    """prompt + max_tokens == context == max_position_embeddings: the trees near the end run past
    the last position (never committed); output still equals plain decoding."""
    _, target = make_hf_model("qwen2", seed=21, vocab=64, hidden=32, max_position_embeddings=64)
    _, draft = make_hf_model("qwen2", seed=21, vocab=64, hidden=32, layers=1, max_position_embeddings=64)
    prompt = [random.Random(5).randrange(64) for _ in range(40)]
    req = Request(prompt, 24)
    ref = sum(generate_ar(target, req, 64), [])
    assert len(ref) == 24
    for tree in (TREES["w4-bs16-d4"], TreeParams(width=2, subtree_size=4, depth=8)):
        assert sum(generate_serial(target, draft, req, 64, tree), []) == ref
