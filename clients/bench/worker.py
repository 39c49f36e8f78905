"""One benchmarked system in its own process: `python -m specmesh.clients.bench.worker SPEC OUT`.

A process per system keeps one system's memory, threads and warm caches away from the next, and
makes its peak RSS its own (getrusage of this process; for the mesh, the services' VmHWM).
Progress goes to the parent as lines "tick\\t" / "phase\\t<text>" on the original stdout; everything
else this process (or a child) prints lands on stderr, which the parent sends to a log file.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    progress_file = os.fdopen(os.dup(1), "w", buffering=1)  # os.dup: not inherited by children
    os.dup2(2, 1)  # stray prints (and children's stdout) go to the log, not into the progress pipe

    def progress(kind: str, text: str) -> None:
        progress_file.write(f"{kind}\t{text}\n")
        progress_file.flush()

    # SIGTERM -> SystemExit, so that `finally` blocks run (the mesh runner stops `specmesh up`).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    spec = json.loads(Path(spec_path).read_text())
    from .systems import run_system

    try:
        result = run_system(spec, progress)
        code = 0
    except BaseException as exc:  # reported to the parent, which carries on with the next system
        traceback.print_exc()
        lines = [line for line in str(exc).splitlines() if line.strip()]
        result = {"error": f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")}
        code = 1
    result["process_peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tmp = out_path + ".tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, out_path)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
