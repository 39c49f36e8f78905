"""`specmesh`: one command for running, serving, starting the mesh, and talking to it.

  specmesh run "prompt"           in-process decoding (autoregressive and serial tree speculation)
  specmesh up [--tiny]            start router + draft + target + treekv locally, print the address
  specmesh serve <service> ...    run one service (what the Helm chart runs)
  specmesh generate "prompt"      stream a completion from a running router
  specmesh info                   what a running router serves, and its speculation shape
  specmesh models                 show / prepare the default model pair
  specmesh bench                  benchmark against transformers and llama.cpp (see README)
  specmesh loadtest               concurrent streams against a running mesh (throughput, latency)
  specmesh cachebench             prefix cache on against off (chat turn 2 TTFT, shared system prompt)
"""
from __future__ import annotations

import argparse
import importlib
import sys

SERVICES = ("router", "draft", "target", "treekv")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # Each service owns its flags (services/<name>/config.py); hand the rest of the line over.
        if len(argv) < 2 or argv[1] not in SERVICES:
            print(f"error: specmesh serve needs one of: {', '.join(SERVICES)}", file=sys.stderr)
            return 2
        server = importlib.import_module(f"specmesh.services.{argv[1]}.server")
        return server.main(argv[2:])
    parser = argparse.ArgumentParser(prog="specmesh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run one service: specmesh serve router|draft|target|treekv --help")
    commands = {}
    for name in ("run_cmd", "up_cmd", "generate_cmd", "info_cmd", "models_cmd", "bench_cmd", "loadtest_cmd",
                 "cachebench_cmd"):
        try:
            module = importlib.import_module(f"specmesh.clients.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"specmesh.clients.{name}":
                raise
            continue
        commands[module.add_parser(sub)] = module
    args = parser.parse_args(argv)
    return commands[args.command].run(args)


if __name__ == "__main__":
    raise SystemExit(main())
