"""`specmesh loadtest`: N concurrent streams against a running mesh, for N = 1, 2, 4, 8.

    specmesh loadtest --addr 127.0.0.1:50051 --target-only-addr 127.0.0.1:50061 --concurrency 1,2,4,8

Every level streams the same prompts (greedy, `--max-tokens` each, EOS ignored) and reports
aggregate tokens/s, p50/p99 time to first token, p50/p99 inter-token latency and the mean tree
size verified per round; `--target-only-addr` (a second router on the same target and treekv,
started with `--draft-addr ''`, so it never speculates) is measured the same way as "target
alone". Writes loadtest.json and loadtest.png under --out and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .common import fail

NAME = "loadtest"


def add_parser(sub: argparse._SubParsersAction) -> str:
    p = sub.add_parser(NAME, help="concurrent streams against a running mesh (throughput and latency)")
    p.add_argument("--addr", default=os.environ.get("SPECMESH_ADDR", "127.0.0.1:50051"),
                   help="the mesh's router gRPC address [env SPECMESH_ADDR]")
    p.add_argument("--target-only-addr", default="", help="a router without a draft, measured as 'target alone'")
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated stream counts")
    p.add_argument("--prompts", default=None, help="Spec-Bench JSONL prompt file (default: the bundled set)")
    p.add_argument("--limit", type=int, default=8, help="prompts per level, spread over categories (0 = all)")
    p.add_argument("--max-tokens", type=int, default=96, help="tokens generated per stream")
    p.add_argument("--raw", action="store_true", help="send prompts as raw text (no chat template)")
    p.add_argument("--cached-prompts", action="store_true",
                   help="repeat the prompts exactly at every level and system, so later runs start from the "
                        "prefix cache (default: each run tags its prompts, so every system prefills them)")
    p.add_argument("--out", default="loadtest-results", help="directory for loadtest.json and loadtest.png")
    return NAME


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--concurrency must be comma-separated integers, got {text!r}") from None
    if not levels or any(n < 1 for n in levels):
        raise ValueError(f"--concurrency needs stream counts >= 1, got {text!r}")
    return levels


def run(args: argparse.Namespace) -> int:
    from .bench.loadtest import plot, run_loadtest, table, to_json
    from .bench.prompts import PromptError, load_prompts, select

    try:
        levels = parse_levels(args.concurrency)
        if args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        prompts = select(load_prompts(args.prompts), args.limit)
    except (ValueError, PromptError) as exc:
        return fail(str(exc))
    systems = {"mesh": args.addr}
    if args.target_only_addr:
        systems["target_alone"] = args.target_only_addr

    def progress(r) -> None:  # type: ignore[no-untyped-def]
        print(f"{r.system} x{r.concurrency}: {r.tokens_per_s:.1f} tok/s, ITL p99 {r.itl_p99_ms:.1f} ms"
              + (f", {len(r.errors)} errors" if r.errors else ""), file=sys.stderr)

    results = run_loadtest(systems, prompts, levels, args.max_tokens, args.raw, progress, args.cached_prompts)
    errors = [e for r in results for e in r.errors]
    if errors and all(r.tokens == 0 for r in results):
        return fail(f"every stream failed; first error: {errors[0]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loadtest.json").write_text(json.dumps({"max_tokens": args.max_tokens, "prompts": len(prompts),
                                                   "systems": systems, "levels": to_json(results)}, indent=2))
    plot(results, out / "loadtest.png")
    print(table(results))
    print(f"wrote {out / 'loadtest.json'} and {out / 'loadtest.png'}", file=sys.stderr)
    return 0
