"""Stop strings (StopMatcher) and the router's per-round output accounting (OutputProcessor):
a stop inside a chunk or spanning chunks ends the text right before it, the token that completed
it is the last one sent or counted, and nothing that might start a stop string leaks early."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specmesh.services.router.output import EOS, LENGTH, STOP, OutputProcessor
from specmesh.services.router.stop import StopMatcher
from specmesh.models.tiny import make_tokenizer

EOS_ID = 258


def run(stops: list[str], chunks: list[str]) -> tuple[list[str], bool]:
    m = StopMatcher(stops)
    out = []
    for c in chunks:
        text, stopped = m.feed(c)
        out.append(text)
        if stopped:
            return out, True
    out.append(m.flush())
    return out, False


def reference(stops: list[str], text: str) -> tuple[str, bool]:
    """Character by character: the output ends before the first stop string to complete."""
    for end in range(1, len(text) + 1):
        hits = [end - len(s) for s in stops if s and text[:end].endswith(s)]
        if hits:
            return text[:min(hits)], True
    return text, False


# ------------------------------------------------------------------------------- StopMatcher

def test_stop_inside_one_chunk() -> None:
    assert run(["STOP"], ["hello STOP world"]) == (["hello "], True)


def test_stop_spanning_chunks() -> None:
    assert run(["STOP"], ["hel", "lo ST", "OP more"]) == (["hel", "lo ", ""], True)


def test_holdback_releases_when_the_prefix_breaks() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("abc S") == ("abc ", False) and m.held == "S"
    assert m.feed("T") == ("", False) and m.held == "ST"
    assert m.feed("x") == ("STx", False) and m.held == ""
    assert m.feed("ST") == ("", False)
    assert m.flush() == "ST"  # the stream ended: the held text was not a stop


def test_overlapping_stops_first_to_complete_wins() -> None:
    # "bc" completes (at "c") before "abcd" does, even though "abcd" starts earlier.
    assert run(["abcd", "bc"], ["xabcd"]) == (["xa"], True)
    assert run(["abcd", "bc"], list("xabcd")) == (["x", "", "", "a"], True)
    # Same end: the one that starts first ("ab") ends the text earlier.
    m = StopMatcher(["b", "ab"])
    assert m.feed("xab") == ("x", True) and m.matched == "ab"


def test_self_overlapping_stop() -> None:
    assert run(["aab"], ["xaa", "ab"]) == (["x", "a"], True)  # held "aa", then "aab" completes after one "a"


def test_no_stops_pass_through_and_feed_after_stop() -> None:
    assert run([], ["a", "b"]) == (["a", "b", ""], False)
    m = StopMatcher(["x", "", "x"])
    assert m.stops == ("x",)
    assert m.feed("ax") == ("a", True)
    assert m.feed("more") == ("", True) and m.flush() == ""


def test_multibyte_stop() -> None:
    assert run(["中文"], ["abc中", "文def"]) == (["abc", ""], True)


@settings(max_examples=300, deadline=None)
@given(text=st.text("abc", max_size=30), stops=st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=3),
       data=st.data())
def test_matches_the_character_stream_under_any_chunking(text: str, stops: list[str], data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=6)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    out, stopped = run(stops, chunks)
    assert ("".join(out), stopped) == reference(stops, text)


# ------------------------------------------------------------------------------- OutputProcessor

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    path: Path = tmp_path_factory.mktemp("tok")
    make_tokenizer(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def proc(tokenizer: Any, max_tokens: int = 100, stop: tuple[str, ...] = (), user_stop: tuple[int, ...] = (),
         eos: tuple[int, ...] = (EOS_ID,)) -> OutputProcessor:
    return OutputProcessor(tokenizer, ids(tokenizer, "prompt"), max_tokens, stop, user_stop, eos)


def test_stop_inside_a_multi_token_round_cuts_tokens_and_usage(tokenizer: Any) -> None:
    p = proc(tokenizer, stop=("END",))
    first = p.process(ids(tokenizer, "one "))
    assert (first.text, first.finish_reason) == ("one ", None)
    step = p.process(ids(tokenizer, "two END three"))
    assert step.text == "two "
    assert step.token_ids == ids(tokenizer, "two END")  # ends at the token that completed "END"
    assert step.finish_reason == STOP
    assert p.usage.completion_tokens == len(ids(tokenizer, "one two END")) and p.usage.rounds == 2
    assert p.process(ids(tokenizer, "more")).token_ids == []  # nothing after the end


def test_stop_spanning_rounds_and_held_text(tokenizer: Any) -> None:
    p = proc(tokenizer, stop=("\n\n",))
    a = p.process(ids(tokenizer, "line\n"))
    assert a.text == "line" and a.finish_reason is None  # "\n" might start the stop: held back
    b = p.process(ids(tokenizer, "\nnext"))
    assert (b.text, b.token_ids, b.finish_reason) == ("", ids(tokenizer, "\n"), STOP)


def test_held_text_is_released_at_length(tokenizer: Any) -> None:
    p = proc(tokenizer, max_tokens=4, stop=("xyz",))
    step = p.process(ids(tokenizer, "abxy"))
    assert (step.text, step.finish_reason) == ("abxy", LENGTH)


def test_max_tokens_clips_a_round(tokenizer: Any) -> None:
    p = proc(tokenizer, max_tokens=5)
    assert p.process(ids(tokenizer, "abc")).finish_reason is None
    step = p.process(ids(tokenizer, "defgh"))
    assert (step.token_ids, step.text, step.finish_reason) == (ids(tokenizer, "de"), "de", LENGTH)
    assert p.usage.completion_tokens == 5


def test_multibyte_character_split_across_rounds_with_stop(tokenizer: Any) -> None:
    p = proc(tokenizer, stop=("中止",))
    b = ids(tokenizer, "好中止")
    first = p.process(b[:2])  # inside "好"
    assert first.text == ""
    second = p.process(b[2:5])  # rest of 好, first two bytes of 中
    assert second.text == "好" and second.finish_reason is None
    third = p.process(b[5:] + ids(tokenizer, "after"))
    assert (third.text, third.finish_reason, third.token_ids) == ("", STOP, b[5:])


def test_eos_and_user_stop_ids_are_told_apart(tokenizer: Any) -> None:
    p = proc(tokenizer)
    step = p.process([*ids(tokenizer, "ok"), EOS_ID, *ids(tokenizer, "x")])
    assert (step.token_ids, step.text, step.finish_reason) == ([*ids(tokenizer, "ok"), EOS_ID], "ok", EOS)
    dot = ids(tokenizer, ".")[0]
    p = proc(tokenizer, user_stop=(dot,))
    step = p.process(ids(tokenizer, "a.b"))
    assert (step.text, step.finish_reason) == ("a.", STOP)  # a user stop id's own text stays (vLLM's rule)
    p = proc(tokenizer, user_stop=(EOS_ID,))  # asked for by name: STOP, not EOS
    assert p.process([EOS_ID]).finish_reason == STOP


def test_target_finish_reason_is_refined(tokenizer: Any) -> None:
    p = proc(tokenizer, eos=())  # ignore_eos: EOS is an ordinary token
    assert p.process([EOS_ID, *ids(tokenizer, "a")]).finish_reason is None
    p = proc(tokenizer)
    assert p.process([EOS_ID], target_finish=STOP).finish_reason == EOS
    p = proc(tokenizer)
    last = p.process(ids(tokenizer, "ab"), target_finish=LENGTH)
    assert (last.text, last.finish_reason) == ("ab", LENGTH)
