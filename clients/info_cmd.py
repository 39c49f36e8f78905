"""`specmesh info`: what a running router serves, and the speculation shape it runs.

Prints ModelInfo: the models, context, vocabulary, whether the draft is paired, the tree the router
asks the draft for (width, depth, max subtree size) and how the draft's planner sizes each subtree
within it: its current choice (nodes sent, predicted tokens per round and round time), the means
since the pair was made, and the target's verify cost curve the choice rests on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import TYPE_CHECKING

from .common import fail

if TYPE_CHECKING:
    from .sdk import ModelInfo

NAME = "info"
CURVE_ROWS = (1, 2, 4, 8, 16, 32)  # the rows of the cost curve printed


def add_parser(sub: argparse._SubParsersAction) -> str:
    p = sub.add_parser(NAME, help="show what a running router serves and the speculation shape it runs")
    p.add_argument("--addr", default=os.environ.get("SPECMESH_ADDR", "127.0.0.1:50051"),
                   help="router gRPC address [env SPECMESH_ADDR]")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds for the call")
    p.add_argument("--tls-ca", default=os.environ.get("SPECMESH_TLS_CA") or None, metavar="PEM",
                   help="speak TLS, verifying the router with this CA [env SPECMESH_TLS_CA]; the API key, "
                        "if the router wants one, comes from env SPECMESH_API_KEY")
    p.add_argument("--json", action="store_true", help="print ModelInfo as one JSON object")
    return NAME


def describe(info: ModelInfo) -> list[str]:
    """ModelInfo as lines for people."""
    lines = [f"target   {info.target_model} ({info.dtype}, context {info.context_length}, vocab {info.vocab_size}, "
             f"eos {list(info.eos_token_ids)})"]
    if info.speculation is None:
        return [*lines, "draft    none: target-only decoding"]
    lines.append(f"draft    {info.draft_model or '?'} ({'paired' if info.draft_connected else 'not paired'})")
    s = info.speculation
    lines.append(f"tree     width {s.tree_width}, depth {s.depth}, at most {s.max_subtree_size} nodes per round")
    p = s.planner
    if p is None:
        return [*lines, "planner  unknown: the draft did not answer"]
    if not p.active:
        return [*lines, f"planner  off: every greedy round sends {s.max_subtree_size} nodes"]
    means = p.means_since()
    if means is None:
        lines.append("planner  on, no round planned yet")
    else:
        n, size, tokens, ms = means
        lines.append(f"planner  now {p.subtree_size:.1f} nodes per round, predicted {p.tokens_per_round:.2f} tokens "
                     f"in {p.round_ms:.1f} ms; {n} rounds since pairing: {size:.1f} nodes, {tokens:.2f} tokens, "
                     f"{ms:.1f} ms")
    curve = [f"{m}: {p.verify_ms_by_rows[m - 1]:.1f}" for m in CURVE_ROWS if m <= len(p.verify_ms_by_rows)]
    if curve:
        lines.append(f"verify   target ms by rows: {', '.join(curve)}")
    return lines


def run(args: argparse.Namespace) -> int:
    from .sdk import Client, SpecmeshClientError

    try:
        with Client(args.addr, timeout=args.timeout, tls_ca=args.tls_ca) as client:
            info = client.model_info()
    except SpecmeshClientError as exc:
        return fail(str(exc))
    print(json.dumps(dataclasses.asdict(info)) if args.json else "\n".join(describe(info)))
    return 0
