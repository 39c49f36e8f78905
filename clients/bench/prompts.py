"""Prompt sets in Spec-Bench's JSONL format: one {"question_id", "category", "turns"} object per line.

Only the first turn is used, as a single-turn chat prompt (rendered with the target's chat template
by the caller). The default set ships with specmesh (clients/data/bench_prompts.jsonl).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "bench_prompts.jsonl"


class PromptError(ValueError):
    """A prompt file that cannot be used (one line, for the CLI)."""


@dataclass(frozen=True)
class Prompt:
    question_id: str
    category: str
    text: str


def load_prompts(path: str | Path | None = None) -> list[Prompt]:
    """Read a Spec-Bench JSONL file (blank lines ignored); the order of the file is kept."""
    path = Path(path) if path else DEFAULT_PROMPTS
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PromptError(f"cannot read prompts file {path}: {exc.strerror or exc}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}:{n}: not JSON ({exc.msg})") from None
        turns = obj.get("turns") if isinstance(obj, dict) else None
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise PromptError(f"{path}:{n}: expected {{\"question_id\", \"category\", \"turns\": [text, ...]}}")
        qid = obj.get("question_id", n)
        prompts.append(Prompt(str(qid), str(obj.get("category") or "uncategorized"), turns[0]))
    if not prompts:
        raise PromptError(f"{path}: no prompts")
    ids = [p.question_id for p in prompts]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PromptError(f"{path}: question_id {dup} appears more than once")
    return prompts


def select(prompts: list[Prompt], limit: int) -> list[Prompt]:
    """At most `limit` prompts (0 = all), spread over categories: the first prompt of each category
    in file order, then the second of each, and so on; the result keeps the file's order."""
    if limit <= 0 or limit >= len(prompts):
        return list(prompts)
    rank: dict[str, int] = {}
    keyed = []
    for i, p in enumerate(prompts):
        r = rank.get(p.category, 0)
        rank[p.category] = r + 1
        keyed.append((r, i))
    chosen = sorted(i for _, i in sorted(keyed)[:limit])
    return [prompts[i] for i in chosen]
