"""`specmesh models`: show the default pair's state, or prepare (assemble + convert) it now."""
from __future__ import annotations

import argparse
import json

from .common import fail

NAME = "models"


def add_parser(sub: argparse._SubParsersAction) -> str:
    p = sub.add_parser(NAME, help="status of the default model pair; --prepare assembles and converts it")
    p.add_argument("--prepare", action="store_true", help="assemble and convert both default models now")
    return NAME


def run(args: argparse.Namespace) -> int:
    from specmesh.services.runtime.errors import SpecmeshError
    from specmesh.models.store import default_model_status, resolve_model_dir

    try:
        if args.prepare:
            for role in ("target", "draft"):
                print(f"{role}: {resolve_model_dir(None, role)}")
        print(json.dumps(default_model_status(), indent=2, default=str))
    except SpecmeshError as exc:
        return fail(str(exc))
    return 0
