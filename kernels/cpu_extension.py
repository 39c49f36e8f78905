"""Building specmesh's C++ CPU kernels: compiled on first use, cached on disk, or a one-line reason.

Each kernel module passes its source and the CPU flags it needs; `load_inline` compiles it with
-O3 -march=native into torch's extension dir (about a minute on 2 cores, once per source). The
library's name carries a hash of the source, flags and interpreter, so a process that finds it
built imports it directly: `load_inline` itself runs ninja to check it (over a second per service
start). Where building cannot work (not Linux x86_64, a missing instruction set, no compiler) the
caller gets None and one line saying why, and keeps its torch path.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

CFLAGS = ("-O3", "-march=native", "-fopenmp")


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
        import torch
        from torch.utils import cpp_extension

        digest = hashlib.sha256("\0".join([source, *CFLAGS, torch.__version__, sys.version]).encode()).hexdigest()
        versioned = f"{name}_{digest[:16]}"
        built = _import_built(versioned, Path(cpp_extension._get_build_directory(versioned, False)))
        module = built or cpp_extension.load_inline(name=versioned, cpp_sources=source, extra_cflags=list(CFLAGS),
                                                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a compile error: the caller keeps torch, says why
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"{what} did not build ({type(e).__name__}: {first})"
    return module, ""


def _import_built(name: str, build_dir: Path) -> ModuleType | None:
    """The extension `name` from its build dir if a complete build is there, else None."""
    library = build_dir / f"{name}.so"
    if not library.is_file():
        return None
    try:
        loader = importlib.machinery.ExtensionFileLoader(name, str(library))
        spec = importlib.util.spec_from_file_location(name, str(library), loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    except ImportError:  # half written by a concurrent build: let load_inline wait for it
        return None


@dataclass
class CpuExtension:
    """One C++ kernel library, built (or imported) on first use, once per process."""

    name: str
    source: str
    required_flags: tuple[str, ...]
    what: str  # names the kernel in the one-line reason
    fallback: str  # what callers keep without it, for the warning
    flags: Callable[[], set[str]] = cpu_flags
    _built: tuple[ModuleType | None, str] | None = field(default=None, init=False, repr=False)

    def _build(self) -> tuple[ModuleType | None, str]:
        if self._built is None:
            self._built = build_extension(self.name, self.source, self.required_flags, self.what, self.flags())
            if self._built[0] is None:
                log.warning("%s; %s", self._built[1], self.fallback)
        return self._built

    def available(self) -> bool:
        """Whether the library is (or can be) built here; builds it on the first call."""
        return self._build()[0] is not None

    def unavailable_reason(self) -> str:
        """One line saying why the library cannot run here ("" when it can)."""
        return self._build()[1]

    def module(self) -> ModuleType:
        """The compiled module; RuntimeError with the reason where there is none."""
        module, why = self._build()
        if module is None:
            raise RuntimeError(why)
        return module

    def reset(self) -> None:
        """Forget the outcome (tests): the next call builds, or loads from disk, again."""
        self._built = None
