"""`specmesh generate "prompt"`: stream a completion from a running router.

Text goes to stdout as it arrives; per-run stats (tokens, tokens/s, time to first token, tokens
per target round) go to stderr. `--json` prints one JSON object instead of the streamed text.
Bad input or a server error: one line `error: <message>` on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .common import add_sampling_arguments, fail

NAME = "generate"


def add_parser(sub: argparse._SubParsersAction) -> str:
    """Register the command on the `specmesh` subparsers; returns its name."""
    p = sub.add_parser(NAME, help="stream a completion from a running router")
    p.add_argument("prompt", help="prompt text ('-' reads stdin); one user chat turn unless --raw")
    p.add_argument("--addr", default=os.environ.get("SPECMESH_ADDR", "127.0.0.1:50051"),
                   help="router gRPC address [env SPECMESH_ADDR]")
    add_sampling_arguments(p)  # --max-tokens --temperature --top-p --top-k --seed --raw --ignore-eos
    p.add_argument("--chat", dest="raw", action="store_false", help="apply the chat template (the default)")
    p.add_argument("--system", default=None, help="system message (chat only)")
    p.add_argument("--stop", action="append", default=[], metavar="S", help="stop string (repeatable)")
    p.add_argument("--stop-token-id", dest="stop_token_ids", action="append", type=int, default=[], metavar="ID",
                   help="stop token id (repeatable)")
    p.add_argument("--request-id", default="", help="id for Abort (default: assigned by the router)")
    p.add_argument("--timeout", type=float, default=None, help="seconds for the whole request")
    p.add_argument("--tls-ca", default=os.environ.get("SPECMESH_TLS_CA") or None, metavar="PEM",
                   help="speak TLS, verifying the router with this CA [env SPECMESH_TLS_CA]; the API key, "
                        "if the router wants one, comes from env SPECMESH_API_KEY")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, usage, stats)")
    return NAME


def _request_kwargs(args: argparse.Namespace, prompt: str) -> dict:
    kwargs: dict = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed, stop=args.stop, stop_token_ids=args.stop_token_ids,
                        ignore_eos=args.ignore_eos, request_id=args.request_id)
    if args.raw:
        if args.system is not None:
            raise ValueError("--system needs the chat template (drop --raw)")
        kwargs["prompt"] = prompt
    else:
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        kwargs["messages"] = [*system, {"role": "user", "content": prompt}]
    return kwargs


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit code (0 ok, 2 error, 130 interrupted)."""
    from .sdk import Client, SpecmeshClientError

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        kwargs = _request_kwargs(args, prompt)
    except ValueError as exc:
        return fail(str(exc))
    text: list[str] = []
    ids: list[int] = []
    final = None
    first_s = None
    t0 = time.perf_counter()
    try:
        with Client(args.addr, timeout=args.timeout, tls_ca=args.tls_ca) as client:
            for chunk in client.generate(**kwargs):
                if chunk.is_final:
                    final = chunk
                    continue
                if first_s is None and chunk.token_ids:
                    first_s = time.perf_counter() - t0
                text.append(chunk.text)
                ids.extend(chunk.token_ids)
                if not args.json and chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
    except SpecmeshClientError as exc:
        if text and not args.json:
            print(file=sys.stdout)
        return fail(exc.message)
    except KeyboardInterrupt:  # leaving the stream cancels the request on the router
        print(file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - t0
    if final is None or final.usage is None:
        return fail("the router ended the stream without a final message")
    u = final.usage
    stats = {"elapsed_s": round(elapsed, 4), "first_token_s": round(first_s, 4) if first_s is not None else None,
             "tokens_per_s": round(u.completion_tokens / elapsed, 2) if elapsed > 0 else 0.0}
    if args.json:
        json.dump({"request_id": final.request_id, "text": "".join(text), "token_ids": ids,
                   "finish_reason": final.finish_reason,
                   "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                             "cached_tokens": u.cached_tokens, "rounds": u.rounds,
                             "mean_accepted_tokens": round(u.mean_accepted_tokens, 4)},
                   "stats": stats}, sys.stdout, ensure_ascii=False)
    print(file=sys.stdout)
    ttft = f", first token {first_s * 1000:.0f} ms" if first_s is not None else ""
    ttft += f", {u.cached_tokens} of {u.prompt_tokens} prompt tokens cached" if u.cached_tokens else ""
    print(f"[{final.finish_reason}] {u.completion_tokens} tokens in {elapsed:.2f}s = {stats['tokens_per_s']:.1f} tok/s"
          f"{ttft}, {u.mean_accepted_tokens:.2f} tokens per target round ({u.rounds} rounds)", file=sys.stderr)
    return 0
