"""`specmesh cachebench`: the prefix cache's two workloads, cache off then on, on meshes it starts.

    specmesh cachebench --out cache-results -- --target-threads 1 --draft-threads 1

Everything after `--` goes to `specmesh up` (model, threads, weights...; the default pair by
default). Each mesh runs a chat whose second turn repeats a long first turn, then `--users`
concurrent chats sharing a long system prompt. Prints a markdown table with the on/off ratios and
writes cachebench.json under --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import fail

NAME = "cachebench"


def add_parser(sub: argparse._SubParsersAction) -> str:
    p = sub.add_parser(NAME, help="prefix cache on against off: chat turn 2 TTFT, shared system prompt prefill")
    p.add_argument("--prompts", default=None, help="Spec-Bench JSONL file the long texts come from "
                                                   "(default: the bundled set)")
    p.add_argument("--chat-words", type=int, default=760, help="words in the chat's first turn (~1000 tokens)")
    p.add_argument("--system-words", type=int, default=380, help="words in the shared system prompt (~500 tokens)")
    p.add_argument("--users", type=int, default=8, help="concurrent users sharing the system prompt")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--out", default="cachebench-results", help="directory for cachebench.json")
    p.add_argument("up_args", nargs=argparse.REMAINDER, help="after --: flags for `specmesh up`")
    return NAME


def run(args: argparse.Namespace) -> int:
    from .bench.prefix_cache import run as run_bench
    from .bench.prefix_cache import table, to_json
    from .bench.prompts import PromptError, load_prompts

    for name in ("chat_words", "system_words", "users", "max_tokens"):
        if getattr(args, name) < 1:
            return fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        prompts = load_prompts(args.prompts)
    except PromptError as exc:
        return fail(str(exc))
    up_args = [a for a in args.up_args if a != "--"]
    try:
        runs = run_bench(up_args, prompts, args.chat_words, args.system_words, args.users, args.max_tokens,
                         progress=lambda text: print(text, file=sys.stderr, flush=True))
    except RuntimeError as exc:
        return fail(str(exc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cachebench.json").write_text(json.dumps({"up_args": up_args, "runs": to_json(runs)}, indent=2))
    print(table(runs))
    print(f"wrote {out / 'cachebench.json'}", file=sys.stderr)
    return 0
