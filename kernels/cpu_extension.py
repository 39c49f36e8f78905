"""Building specmesh's C++ CPU kernels: compiled on first use, cached on disk, or a one-line reason.

Each kernel module passes its source and the CPU flags it needs; `load_inline` compiles it with
-O3 -march=native into torch's extension dir (about a minute on 2 cores, once per source). Where
that cannot work (not Linux x86_64, a missing instruction set, no compiler) the caller gets None
and one line saying why, and keeps its torch path.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from types import ModuleType


def cpu_flags() -> set[str]:
    """The flags /proc/cpuinfo lists for this CPU (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build_extension(name: str, source: str, required_flags: Iterable[str], what: str,
                    flags: set[str]) -> tuple[ModuleType | None, str]:
    """(compiled module, "") or (None, why not in one line); `what` names the kernel in that line."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return None, f"{what} needs Linux on x86_64, not {sys.platform}/{os.uname().machine}"
    missing = [f for f in required_flags if f not in flags]
    if missing:
        return None, f"this CPU lacks {', '.join(missing)}, which {what} needs"
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline(name=name, cpp_sources=source, extra_cflags=["-O3", "-march=native", "-fopenmp"],
                             extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a compile error: the caller keeps torch, says why
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"{what} did not build ({type(e).__name__}: {first})"
    return module, ""
