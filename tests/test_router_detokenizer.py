"""Incremental detokenization with the real byte-level tiny tokenizer: multi-byte characters split
across tokens must never come out broken, whatever the chunking."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specmesh.services.runtime.detokenize import IncrementalDetokenizer
from specmesh.models.tiny import make_tokenizer

TEXTS = ["héllo wörld", "中文字符 and 日本語", "emoji 🎉🚀 mixed é中🎉", "naïve — “quotes” ✓", "plain ascii"]
EOS = 258  # <|im_end|> in the tiny tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    path: Path = tmp_path_factory.mktemp("tok")
    make_tokenizer(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_never_splits_a_character(tokenizer: Any, text: str) -> None:
    ids = _ids(tokenizer, text)
    assert len(ids) == len(text.encode())  # byte-level: multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text
    # A character is released exactly when its last byte arrives.
    assert sum(1 for d in deltas if d) == len(text)


@pytest.mark.parametrize("text", TEXTS)
def test_prompt_context_is_not_emitted(tokenizer: Any, text: str) -> None:
    prompt = _ids(tokenizer, "prompt: ü ")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    assert "".join(detok.add(t) for t in _ids(tokenizer, text)) + detok.flush() == text


def test_incomplete_character_is_held_then_flushed_as_replacement(tokenizer: Any) -> None:
    ids = _ids(tokenizer, "a🎉")
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add(t) for t in ids[:3]] == ["a", "", ""]  # 2 of the emoji's 4 bytes
    assert detok.flush() == "\ufffd"  # the stream ended inside the character: shown as decode() shows it


def test_special_tokens_are_skipped(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add(t) for t in [*_ids(tokenizer, "ok"), EOS]] == ["o", "k", ""]
    assert detok.flush() == ""


def test_add_many_ending_inside_a_character_emits_the_complete_part(tokenizer: Any) -> None:
    ids = _ids(tokenizer, "xé中")
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add_many(ids[:4]) == "xé"  # x, é (2 bytes), first byte of 中
    assert detok.add_many(ids[4:]) == "中"
    assert detok.add_many([]) == ""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(exclude_characters="\ufffd", exclude_categories=("Cs",)), min_size=1, max_size=40), data=st.data())
def test_any_chunking_gives_the_text_and_no_broken_characters(tokenizer: Any, text: str, data: st.DataObject) -> None:
    ids = _ids(tokenizer, text)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(ids) - 1)), max_size=8)))
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add_many(ids[a:b]) for a, b in zip([0, *cuts], [*cuts, len(ids)])]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids)
