"""`specmesh run`: in-process decoding with our runner — autoregressive and serial tree speculation."""
from __future__ import annotations

import argparse
import sys

from .common import add_model_arguments, add_sampling_arguments, fail, prompt_ids, resolve_pair, sampling_from_args

NAME = "run"


def add_parser(sub: argparse._SubParsersAction) -> str:
    p = sub.add_parser(NAME, help="generate in-process (no services): AR and/or serial tree speculative decoding")
    p.add_argument("prompt", help="prompt text (rendered as one user chat turn unless --raw)")
    p.add_argument("--mode", choices=["ar", "serial", "both"], default="both")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--width", type=int, default=4, help="w: leaves per expansion")
    p.add_argument("--subtree-size", type=int, default=16, help="bs: tree nodes the target verifies per round")
    p.add_argument("--depth", type=int, default=3, help="d: expansions per round")
    p.add_argument("--plan", action="store_true",
                   help="serial: size each round's subtree (at most --subtree-size) by expected tokens per second, "
                        "from the target's cost curve measured at start (greedy only)")
    return NAME


def run(args: argparse.Namespace) -> int:
    from specmesh.services.runtime.tree_params import TreeParams
    from specmesh.services.runtime.engines import DecodeStats, generate_ar, generate_serial
    from specmesh.services.runtime.request import Request
    from specmesh.services.runtime.errors import SpecmeshError

    try:
        tree = TreeParams(width=args.width, subtree_size=args.subtree_size, depth=args.depth)
        sampling = sampling_from_args(args)
        pair = resolve_pair(args, need_draft=args.mode != "ar")
        ids = prompt_ids(pair.tokenizer, args.prompt, raw=args.raw)
        request = Request(ids, args.max_tokens, sampling, () if args.ignore_eos else pair.eos_ids)
        modes = ["ar", "serial"] if args.mode == "both" else [args.mode]
        planner = _planner(pair, tree) if args.plan and "serial" in modes else None
        for mode in modes:
            stats = DecodeStats()
            if mode == "ar":
                chunks = generate_ar(pair.target, request, args.context, stats)
            else:
                chunks = generate_serial(pair.target, pair.draft, request, args.context, tree, stats, planner)
            print(f"--- {mode} ---", file=sys.stderr)
            text = _stream(pair.tokenizer, chunks)
            line = (f"[{mode}] {stats.tokens} tokens in {stats.elapsed_s:.2f}s = {stats.tokens_per_s:.2f} tok/s, "
                    f"first token {stats.first_token_s or 0:.2f}s, {stats.mean_accepted:.2f} tokens per target forward")
            if mode == "serial":
                line += f", re-root hits {stats.reroot_hits}/{stats.reroot_hits + stats.new_trees}"
                if stats.subtree_sizes:
                    line += f", mean subtree {sum(stats.subtree_sizes) / len(stats.subtree_sizes):.1f} nodes"
                if planner is not None and planner.stats.rounds:
                    st = planner.stats
                    line += (f"; planner predicted {st.tokens_sum / st.rounds:.2f} tokens per round in "
                             f"{st.step_ms_sum / st.rounds:.1f} ms ({st.size_sum / st.rounds:.1f} nodes)")
            print(line, file=sys.stderr)
            del text
    except SpecmeshError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
    return 0


def _planner(pair, tree):  # type: ignore[no-untyped-def]
    """A planner for serial rounds: target cost by rows, plus `depth` draft expansions per round."""
    from specmesh.services.runtime.speculation_planner import serial_planner

    planner = serial_planner(pair.target, pair.draft, tree.width, tree.depth)
    curve = planner.curve
    print("target verify ms by rows: " + ", ".join(f"{r}: {ms:.1f}" for r, ms in zip(curve.rows, curve.ms))
          + f"; one draft expansion {planner.fixed_ms / tree.depth:.1f} ms", file=sys.stderr)
    return planner


def _stream(tokenizer, chunks) -> str:
    from specmesh.services.runtime.detokenize import IncrementalDetokenizer

    detok = IncrementalDetokenizer(tokenizer)
    out = []
    for chunk in chunks:
        text = detok.add_many(chunk)
        out.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()
    tail = detok.flush()
    sys.stdout.write(tail + "\n")
    return "".join(out) + tail
