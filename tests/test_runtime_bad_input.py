"""Bad input at the runtime level: every problem raises the specific specmesh error type, with a
message that names the problem (the router and CLI turn these into one line / one gRPC status)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from specmesh.services.runtime.draft_session import DraftSession
from specmesh.services.runtime.engines import DecodeStats, generate_ar, generate_serial, run_prefill, run_verify
from specmesh.services.runtime.forward_batch import Runner
from specmesh.services.runtime.errors import InvalidRequest, ModelError
from specmesh.services.runtime.loader import (
    check_pair,
    load_tokenizer,
    load_transformer,
    parse_dtype,
    transformer_from_state_dict,
)
from specmesh.services.runtime.request import Request
from specmesh.services.runtime.sampling import SamplingParams
from specmesh.services.runtime.target_session import TargetSession, Tree
from specmesh.services.runtime.tree_params import TreeParams

from runner_testing import run_rows

pytestmark = pytest.mark.usefixtures("single_thread")

TREE = TreeParams(width=2, subtree_size=4, depth=2)


# -- requests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("request_, context, words", [
    (Request([], 4), 64, ["prompt", "empty"]),
    (Request(list(range(70)), 4), 64, ["prompt", "70", "context", "64"]),
    (Request(list(range(60)), 10), 64, ["max_tokens", "10", "context", "64"]),
    (Request([1, 2], 0), 64, ["max_tokens", "0"]),
    (Request([1, 2], -3), 64, ["max_tokens", "-3"]),
], ids=["empty-prompt", "prompt-longer-than-context", "prompt-plus-max-tokens", "max-tokens-0", "max-tokens-neg"])
def test_bad_requests(tiny_target: Any, tiny_draft: Any, request_: Request, context: int, words: list[str]) -> None:
    for gen in (generate_ar(tiny_target, request_, context),
                generate_serial(tiny_target, tiny_draft, request_, context, TREE)):
        with pytest.raises(InvalidRequest) as err:
            list(gen)
        for word in words:
            assert word in str(err.value), str(err.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=-0.5), ["temperature", "-0.5"]),
    (dict(temperature=float("nan")), ["temperature"]),
    (dict(temperature=float("inf")), ["temperature"]),
    (dict(top_p=0.0), ["top_p", "0.0"]),
    (dict(top_p=1.01), ["top_p", "1.01"]),
    (dict(top_p=-0.2), ["top_p"]),
    (dict(top_p=float("nan")), ["top_p"]),
    (dict(top_k=-1), ["top_k", "-1"]),
])
def test_bad_sampling_params(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**kwargs)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_edge_sampling_params_are_fine() -> None:
    SamplingParams(temperature=0.0, top_p=1.0, top_k=0)
    SamplingParams(temperature=2.0, top_p=1e-6, top_k=1)


@pytest.mark.parametrize("kwargs, word", [
    (dict(width=0), "width"), (dict(subtree_size=0), "subtree_size"), (dict(depth=-1), "depth"),
    (dict(width=4, max_tree=4), "max_tree"), (dict(max_nodes=0), "max_nodes"),
])
def test_bad_tree_params(kwargs: dict, word: str) -> None:
    with pytest.raises(InvalidRequest, match=word):
        TreeParams(**kwargs)


def test_sessions_refuse_bad_input(tiny_target: Any, tiny_draft: Any) -> None:
    target = TargetSession(tiny_target.new_cache(8), SamplingParams())
    with pytest.raises(InvalidRequest, match="empty"):
        target.begin([])
    with pytest.raises(InvalidRequest, match="exceeds the context"):
        target.begin(list(range(9)))
    first = run_prefill(Runner(tiny_target), target, [1, 2, 3])  # commits the first token: the new root
    with pytest.raises(InvalidRequest, match="not the last committed token"):
        target.verify_rows(Tree([first + 1, 8], [-1, 0]))  # the root must be the last committed token
    with pytest.raises(InvalidRequest, match="context full"):
        target.verify_rows(Tree([first] + [5] * 7, [-1] + list(range(7))))
    with pytest.raises(InvalidRequest, match="exceeds the runner"):
        Runner(tiny_target, max_rows=2).forward_one(target.verify_rows(Tree([first, 5, 6], [-1, 0, 1])))
    draft = DraftSession(tiny_draft.new_cache(8), TREE, SamplingParams(), tiny_draft.vocab_size)
    with pytest.raises(InvalidRequest, match="empty"):
        draft.start([])
    with pytest.raises(InvalidRequest, match="context full"):
        draft.start(list(range(9)))


# -- models -----------------------------------------------------------------------------------------

def test_missing_model_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="does not exist") as err:
        load_transformer(missing)
    assert str(missing) in str(err.value)
    with pytest.raises(ModelError, match="does not exist"):
        load_tokenizer(missing)


def test_dir_without_weights(tmp_path: Path, tiny_pair: Any) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_pair[0], d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match=r"no \*\.safetensors weights"):
        load_transformer(d)


@pytest.mark.parametrize("damage", ["no-config", "bad-json", "no-model-type"])
def test_broken_config(tmp_path: Path, tiny_pair: Any, damage: str) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_pair[0], d)
    cfg = d / "config.json"
    if damage == "no-config":
        cfg.unlink()
    elif damage == "bad-json":
        cfg.write_text("{not json")
    else:
        data = json.loads(cfg.read_text())
        del data["model_type"]
        cfg.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="cannot read the model config") as err:
        load_transformer(d, torch.float32)
    assert str(d) in str(err.value)


def test_corrupt_weights(tmp_path: Path, tiny_pair: Any) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_pair[0], d)
    (d / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="cannot read weights"):
        load_transformer(d, torch.float32)


def test_missing_weight(tmp_path: Path, tiny_pair: Any) -> None:
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(tiny_pair[0], d)
    weights = load_file(d / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"weight 'model\.layers\.1\.mlp\.down_proj\.weight' missing"):
        load_transformer(d, torch.float32)


def test_unsupported_architecture(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(d)
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        load_transformer(d, torch.float32)


@pytest.mark.parametrize("overrides, words", [
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), ["RoPE", "dynamic"]),
    (dict(mlp_bias=True), ["mlp_bias"]),
])
def test_unsupported_config_features(overrides: dict, words: list[str]) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, **overrides)
    state = AutoModelForCausalLM.from_config(cfg).state_dict()
    with pytest.raises(ModelError) as err:
        transformer_from_state_dict(cfg, state)
    for word in words:
        assert word in str(err.value)


def test_bad_dtype_and_tensor_parallel_size(tiny_pair: Any) -> None:
    with pytest.raises(ModelError, match="unknown dtype 'fp16'"):
        parse_dtype("fp16")
    with pytest.raises(ModelError, match="tensor parallel size 3"):
        load_transformer(tiny_pair[0], torch.float32, tp_size=3)


# -- pairs ------------------------------------------------------------------------------------------

def other_tokenizer(path: Path) -> Any:
    """Same size as the tiny byte tokenizer (259) but the special tokens in another order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.add_special_tokens(["<|im_end|>", "<|im_start|>", "<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>").save_pretrained(path)
    return load_tokenizer(path)


def test_pair_with_different_tokenizers(tmp_path: Path, tiny_tokenizer: Any) -> None:
    other = other_tokenizer(tmp_path / "tok")
    assert len(other) == len(tiny_tokenizer)
    with pytest.raises(ModelError, match="tokenizers differ"):
        check_pair(tiny_tokenizer, other, 260, 260)
    extra = load_tokenizer(tmp_path / "tok")
    extra.add_tokens(["<extra>"])
    with pytest.raises(ModelError, match="tokenizers differ"):
        check_pair(extra, other, 260, 260)


def test_pair_vocab_smaller_than_tokenizer(tiny_tokenizer: Any) -> None:
    with pytest.raises(ModelError, match=r"model vocab \(250\) is smaller than the tokenizer \(259"):
        check_pair(tiny_tokenizer, tiny_tokenizer, 260, 250)


def padded(model_hf_dir: Path, vocab: int, dominant: bool) -> Any:
    """The checkpoint with its vocab padded to `vocab` rows (embedding and LM head), as Qwen pairs
    differ. Padding rows of the LM head are zero, or (dominant) +-100 times random unit directions,
    so that one of them almost surely has by far the largest logit."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_hf_dir, local_files_only=True)
    state = load_file(model_hf_dir / "model.safetensors")
    extra_rows, hidden = vocab - cfg.vocab_size, state["lm_head.weight"].shape[1]
    embed = state["model.embed_tokens.weight"]
    state["model.embed_tokens.weight"] = torch.cat([embed, torch.zeros(extra_rows, hidden)])
    head = torch.zeros(extra_rows, hidden)
    if dominant:
        dirs = torch.randn(extra_rows // 2, hidden, generator=torch.Generator().manual_seed(0))
        dirs = torch.nn.functional.normalize(dirs, dim=-1)
        head = 100.0 * torch.cat([dirs, -dirs])
    state["lm_head.weight"] = torch.cat([state["lm_head.weight"], head])
    cfg.vocab_size = vocab
    return transformer_from_state_dict(cfg, state)


@pytest.mark.parametrize("which", ["draft-264", "target-264"])
def test_pair_vocab_differs_by_padding_only(tiny_pair: Any, tiny_tokenizer: Any, tiny_target: Any,
                                            tiny_draft: Any, which: str) -> None:
    """Draft and target vocab sizes that differ only by padding rows are accepted (the shared width
    is the target's) and serial speculation stays lossless, even when the draft's padding rows would
    win its argmax (they must be cut, not proposed)."""
    if which == "draft-264":
        target, draft = tiny_target, padded(tiny_pair[1], 264, dominant=True)
        sanity = run_rows(draft, [65], draft.new_cache(1), mask=None)
        assert int(sanity.argmax()) >= 260, "the padding rows should dominate the draft's logits"
    else:
        target, draft = padded(tiny_pair[0], 264, dominant=False), tiny_draft
    assert check_pair(tiny_tokenizer, tiny_tokenizer, target.vocab_size, draft.vocab_size) == target.vocab_size
    for text in ("hello world", "abc", "def f(x):"):
        prompt = tiny_tokenizer(text)["input_ids"]
        request = Request(prompt, 24)
        ref = sum(generate_ar(target, request, 64), [])
        for tree in (TREE, TreeParams(width=4, subtree_size=16, depth=4)):
            stats = DecodeStats()
            assert sum(generate_serial(target, draft, request, 64, tree, stats), []) == ref
            assert stats.accepted_draft > 0  # the noisy draft still agrees through the padding


def test_first_draft_tree_is_re_rooted_at_the_prefill_token(tiny_target: Any) -> None:
    """The mesh's draft roots its first tree at the last prompt token; the target is one token ahead."""
    target = TargetSession(tiny_target.new_cache(64), SamplingParams())
    first = run_prefill(Runner(tiny_target), target, [1, 2, 3])
    other = (first + 1) % 200
    # root 3 -> children [other, first]; first -> [10, 11]; 10 -> [12]; other -> [13]
    tokens, parents = [3, other, first, 10, 11, 12, 13], [-1, 0, 0, 2, 2, 3, 1]
    probs = torch.arange(7.0)[:, None].expand(7, 4)
    got, skipped = target.adopt_draft_tree(Tree(tokens, parents, probs), 2)
    assert (got.tokens, got.parents, skipped) == ([first, 10, 11, 12], [-1, 0, 0, 1], [first])
    assert got.draft_probs[:, 0].tolist() == [2.0, 3.0, 4.0, 5.0]
    # A tree rooted at the last committed token is verified as it is.
    assert target.adopt_draft_tree(Tree([first], [-1]), 3) == (Tree([first], [-1]), [])
    # A root that is not the committed token at its position (or lies ahead) cannot be fitted.
    assert target.adopt_draft_tree(Tree([other], [-1]), 3) is None
    assert target.adopt_draft_tree(Tree([first], [-1]), 4) is None


def test_first_draft_tree_without_the_prefill_token_verifies_it_alone(tiny_target: Any) -> None:
    target = TargetSession(tiny_target.new_cache(64), SamplingParams())
    first = run_prefill(Runner(tiny_target), target, [1, 2, 3])
    other = (first + 1) % 200
    assert target.adopt_draft_tree(Tree([3, other], [-1, 0]), 2) == (Tree([first], [-1]), [first])


def test_a_tree_rooted_several_tokens_behind_is_fitted_along_the_committed_tokens(tiny_target: Any) -> None:
    """A draft that rejoins a running session roots its tree where its catch-up ended, behind the
    target: the path of committed tokens through its tree carries over, and the draft is given
    every token it has not seen."""
    runner = Runner(tiny_target)
    target = TargetSession(tiny_target.new_cache(64), SamplingParams())
    run_prefill(runner, target, [1, 2, 3])
    for _ in range(3):  # the target goes on alone
        run_verify(runner, target, target.decode_tree())
    seq = target.tokens  # 1 2 3 + 4 committed; the draft knows seq[:3] and roots its tree at seq[2]
    assert len(seq) == 7 and target.root == seq[6]
    other = (seq[5] + 1) % 200
    got, skipped = target.adopt_draft_tree(Tree([3, seq[3], seq[4], other], [-1, 0, 1, 2]), 2)
    assert (got.tokens, got.parents, skipped) == ([seq[6]], [-1], seq[3:])  # the path breaks: the root alone
    tokens, parents = [3, seq[3], seq[4], seq[5], seq[6], 7, 8, 9], [-1, 0, 1, 2, 3, 4, 4, 2]
    got, skipped = target.adopt_draft_tree(Tree(tokens, parents), 2)
    assert (got.tokens, got.parents, skipped) == ([seq[6], 7, 8], [-1, 0, 0], seq[3:])
    assert target.adopt_draft_tree(Tree([seq[4]], [-1]), 2) is None  # not the token at that position
