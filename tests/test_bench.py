"""`specmesh bench`: the pure helpers, the llama.cpp peer's command line, lookup and report columns (llama.cpp
itself is never built or run here: CI has none), and one real `--quick --tiny` run of the five
transformers/specmesh systems (mesh included; the llama.cpp ones are skipped: the tiny pair has no GGUF).

The end-to-end run checks only that the command works and writes what other tools read: the JSON
schema (a "systems" list with the five names and numeric figures), the identity fractions (in fp32
on the tiny pair every system must produce hf_greedy's tokens), and a valid PNG. No timing assertions.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specmesh.clients import bench_cmd
from specmesh.clients.bench.llamacpp import completion_request, server_command
from specmesh.clients.bench.loadtest import request_for
from specmesh.clients.bench.peers import PeerError, find_llama_server, llama_server_path
from specmesh.clients.bench.prompts import DEFAULT_PROMPTS, Prompt, PromptError, load_prompts, select
from specmesh.clients.bench.report import build_systems, figures, first_divergence, normalize, table
from specmesh.clients.bench.systems import LLAMACPP_SYSTEMS, SYSTEMS
from specmesh.models.store import MARKER_NAME

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ helpers

def test_default_prompt_set_is_valid_spec_bench() -> None:
    prompts = load_prompts(None)
    assert 8 <= len(prompts) <= 16
    assert len({p.category for p in prompts}) >= 5
    for line in DEFAULT_PROMPTS.read_text().splitlines():
        obj = json.loads(line)
        assert set(obj) == {"question_id", "category", "turns"} and obj["turns"][0].strip()


def test_load_prompts_reads_first_turn_and_rejects_bad_files(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"question_id": 7, "category": "qa", "turns": ["first", "second"]}\n\n')
    assert load_prompts(f) == [Prompt("7", "qa", "first")]
    f.write_text('{"question_id": 1, "turns": []}\n')
    with pytest.raises(PromptError, match="p.jsonl:1"):
        load_prompts(f)
    f.write_text('{"question_id": 1, "turns": ["a"]}\n{"question_id": 1, "turns": ["b"]}\n')
    with pytest.raises(PromptError, match="more than once"):
        load_prompts(f)
    with pytest.raises(PromptError, match="cannot read"):
        load_prompts(tmp_path / "missing.jsonl")


def test_select_spreads_over_categories_and_keeps_order() -> None:
    ps = [Prompt(str(i), c, "x") for i, c in enumerate("aaabbc")]
    assert [p.question_id for p in select(ps, 3)] == ["0", "3", "5"]
    assert [p.question_id for p in select(ps, 4)] == ["0", "1", "3", "5"]
    assert select(ps, 0) == ps


def test_identity_normalization() -> None:
    assert normalize([5, 6, 9, 7], eos=[9], max_new=10) == [5, 6]
    assert normalize([5, 6, 7], eos=[9], max_new=2) == [5, 6]
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 4, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def test_figures_from_records() -> None:
    rec = {"new_tokens": 6, "wall_s": 2.0, "ttft_s": 0.5, "round_accepted": [2, 0, 1], "target_forward_s": 1.0,
           "category": "qa"}
    f = figures([rec, {**rec, "wall_s": 1.0}], speculative=True)
    assert f["tokens_per_s"] == pytest.approx(12 / 3)
    assert f["tokens_per_s_median"] == pytest.approx(4.5)
    assert f["mean_accepted"] == pytest.approx(2.0)  # 12 tokens over 6 target forwards
    assert f["acceptance_per_depth"] == pytest.approx([4 / 6, 2 / 6])
    assert f["target_forward_share"] == pytest.approx(2 / 3)
    assert figures([rec], speculative=False)["acceptance_per_depth"] is None
    # decode only: 5 tokens after the first, in 1.5 s and 0.5 s after it
    assert f["decode_tokens_per_s"] == pytest.approx(10 / 2.0)
    assert f["decode_tokens_per_s_median"] == pytest.approx((5 / 1.5 + 5 / 0.5) / 2)


def test_shape_figures_measured_and_predicted() -> None:
    """The chosen shape per round: the prefill's round is left out, the planner's sums are per planned round."""
    rec = {"new_tokens": 8, "wall_s": 1.0, "ttft_s": 0.2, "round_tokens": [1, 3, 4], "round_accepted": [0, 2, 3],
           "round_times_s": [0.2, 0.5, 1.0], "round_tree_size": [1, 6, 8], "round_verify_ms": [50.0, 10.0, 20.0],
           "target_forward_s": 0.08, "category": "qa",
           "plan": {"rounds": 1, "subtree_size_sum": 8, "tokens_per_round_sum": 3.5, "round_ms_sum": 18.0}}
    other = {**rec, "round_times_s": [0.1, 0.3, 0.4],
             "plan": {"rounds": 3, "subtree_size_sum": 12, "tokens_per_round_sum": 6.5, "round_ms_sum": 42.0}}
    f = figures([rec, other], speculative=True)
    assert f["mean_subtree_size"] == pytest.approx(7.0) and f["decode_tokens_per_round"] == pytest.approx(3.5)
    assert f["round_ms"] == pytest.approx((0.8 + 0.3) / 4 * 1000) and f["verify_ms"] == pytest.approx(15.0)
    assert f["planned_rounds"] == 4 and f["predicted_subtree_size"] == pytest.approx(5.0)
    assert f["predicted_tokens_per_round"] == pytest.approx(2.5) and f["predicted_round_ms"] == pytest.approx(15.0)
    plain = figures([{**rec, "plan": None, "round_tree_size": None, "round_verify_ms": None}], speculative=False)
    assert plain["planned_rounds"] is None and plain["predicted_round_ms"] is None
    assert plain["mean_subtree_size"] is None and plain["round_ms"] == pytest.approx(400.0)


def test_figures_from_llamacpp_totals() -> None:
    """llama.cpp records have no per-round lists: tokens per target forward come from its draft counters."""
    rec = {"new_tokens": 10, "wall_s": 2.0, "ttft_s": 0.2, "round_accepted": None, "target_forwards": 4,
           "accepted_draft": 6, "target_forward_s": None, "category": "qa"}
    f = figures([rec], speculative=True)
    assert f["mean_accepted"] == pytest.approx(10 / 4) and f["mean_accepted_draft"] == pytest.approx(6 / 4)
    assert f["acceptance_per_depth"] is None and f["target_forward_share"] is None
    assert f["decode_tokens_per_s"] == pytest.approx(9 / 1.8)


def test_bad_arguments_fail_in_one_line() -> None:
    from specmesh.clients.cli import main

    assert main(["bench", "--tiny", "--systems", "hf_greedy,nope"]) == 2
    assert main(["bench", "--tiny", "--assist-tokens", "2,x"]) == 2


# ------------------------------------------------------------------------------------------ llama.cpp peer

def test_loadtest_tags_each_run_so_nothing_comes_from_the_prefix_cache() -> None:
    prompt = Prompt("q1", "qa", "What is a radix tree?")
    chat = request_for(prompt, 8, raw=False, tag="[mesh x2 1] hi")
    assert [(m.role, m.content) for m in chat.messages.messages] == [("system", "[mesh x2 1] hi"),
                                                                     ("user", "What is a radix tree?")]
    assert request_for(prompt, 8, raw=True, tag="[mesh x2 1]").prompt == "[mesh x2 1]\nWhat is a radix tree?"
    assert request_for(prompt, 8, raw=True).prompt == "What is a radix tree?"  # --cached-prompts
    plain = request_for(prompt, 8, raw=False)
    assert [m.role for m in plain.messages.messages] == ["user"] and plain.max_tokens == 8


def test_llamacpp_server_command_line() -> None:
    ar = server_command("/bin/llama-server", "/m/t.gguf", 8123, 2, 4096)
    assert ar[0] == "/bin/llama-server"
    flags = dict(zip(ar[1::2], ar[2::2]))
    assert flags["-m"] == "/m/t.gguf" and flags["--host"] == "127.0.0.1" and flags["--port"] == "8123"
    assert flags["-t"] == flags["-tb"] == "2" and flags["-c"] == "4096" and flags["-np"] == "1"
    assert "-md" not in ar and "--spec-type" not in ar
    spec = server_command("/bin/llama-server", "/m/t.gguf", 8123, 2, 4096, draft_gguf="/m/d.gguf", draft_n_max=3)
    assert spec[:len(ar)] == ar
    extra = dict(zip(spec[len(ar)::2], spec[len(ar) + 1::2]))
    # without --spec-type this llama.cpp loads the draft and never speculates
    assert extra == {"-md": "/m/d.gguf", "--spec-type": "draft-simple", "--spec-draft-n-max": "3", "-td": "2",
                     "-tbd": "2"}
    with pytest.raises(ValueError, match="spec-draft-n-max"):
        server_command("/bin/llama-server", "/m/t.gguf", 8123, 2, 4096, draft_gguf="/m/d.gguf")


def test_llamacpp_request_is_greedy_on_our_token_ids() -> None:
    body = completion_request([151644, 872, 198], 16)
    assert body["prompt"] == [151644, 872, 198] and body["n_predict"] == 16 and body["temperature"] == 0.0
    assert body["stream"] and body["return_tokens"] and body["cache_prompt"] is False


def _bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_cmd.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_llama_server_lookup_and_not_installed_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SPECMESH_CACHE", str(tmp_path))
    with pytest.raises(PeerError, match="specmesh bench --install-peers") as exc:
        find_llama_server()
    assert str(llama_server_path()) in str(exc.value) and "AGPL" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(PeerError, match="--llama-server /nowhere/llama-server"):
        find_llama_server("/nowhere/llama-server")

    # asked for by name: one line, exit 2, before anything runs
    from specmesh.clients.cli import main

    assert main(["bench", "--tiny", "--systems", "specmesh_ar,llamacpp_ar"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: llamacpp_ar:") and "--install-peers" in errors[0]
    # by default: skipped, with one note for both
    dense = tmp_path / "dense"
    assert bench_cmd.runnable_systems(list(SYSTEMS), _bench_args(), dense, dense) == \
        [s for s in SYSTEMS if s not in LLAMACPP_SYSTEMS]
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and note[0].startswith("note: skipping llamacpp_ar, llamacpp_spec:")

    # a build in the cache is found; llama.cpp still needs models that came from GGUF files
    binary = llama_server_path()
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert find_llama_server() == binary.resolve()
    assert "tiny pair has none" in bench_cmd.llamacpp_problem("llamacpp_ar", _bench_args("--tiny"), dense, dense)
    default, converted = tmp_path / "default", tmp_path / "converted"
    gguf = tmp_path / "t.gguf"
    gguf.write_bytes(b"GGUF")
    for d, marker in ((default, {"source": "default", "role": "draft"}),
                      (converted, {"source": "gguf", "gguf_path": str(gguf)})):
        d.mkdir()
        (d / MARKER_NAME).write_text(json.dumps(marker))
    assert bench_cmd.llamacpp_problem("llamacpp_spec", _bench_args(), default, converted) is None
    assert bench_cmd.llamacpp_problem("llamacpp_ar", _bench_args(), converted, dense) is None  # AR: no draft
    assert bench_cmd.llamacpp_problem("llamacpp_spec", _bench_args(), converted, dense) == \
        f"llama.cpp needs GGUF files and the draft {dense} is a dense checkpoint"
    gguf.unlink()
    assert bench_cmd.llamacpp_problem("llamacpp_ar", _bench_args(), converted, dense) == \
        f"llama.cpp needs the target's GGUF {gguf}, which no longer exists"
    with pytest.raises(ValueError, match="^llamacpp_ar: llama.cpp needs the target's GGUF"):
        bench_cmd.runnable_systems(["specmesh_ar", "llamacpp_ar"], _bench_args("--systems", "llamacpp_ar"),
                                   converted, dense)


def _rec(qid: str, ids: list[int], wall: float, ttft: float, **extra: object) -> dict:
    per_token = {"round_tokens": [1] * len(ids), "round_accepted": [0] * len(ids), "target_forward_s": wall / 2}
    return {"question_id": qid, "category": "qa" if qid == "1" else "math", "prompt_tokens": 5,
            "output_ids": ids, "new_tokens": len(ids), "wall_s": wall, "ttft_s": ttft, **per_token, **extra}


def _llama_rec(qid: str, ids: list[int], wall: float, accepted: int) -> dict:
    return _rec(qid, ids, wall, 0.1, round_tokens=None, round_accepted=None, target_forward_s=None,
                target_forwards=len(ids) - accepted, accepted_draft=accepted)


def test_report_columns_for_llamacpp_systems() -> None:
    eos = [99]
    results = {
        "specmesh_ar": {"records": [_rec("1", [1, 2, 3, 4], 1.0, 0.25), _rec("2", [5, 6, 7, 99], 1.0, 0.25)],
                        "process_peak_rss_kb": 2048 * 1024},
        "llamacpp_ar": {"records": [_llama_rec("1", [1, 2, 3, 4], 0.5, 0), _llama_rec("2", [5, 6, 8, 99], 0.5, 0)],
                        "peak_rss_kb_server": 1024 * 1024, "process_peak_rss_kb": 100 * 1024},
        "llamacpp_spec": {"sweep": [
            {"setting": "n-max=2", "draft_n_max": 2, "peak_rss_kb_server": 1500 * 1024,
             "records": [_llama_rec("1", [1, 2, 3, 4], 1.0, 2), _llama_rec("2", [5, 6, 7, 99], 1.0, 2)]},
            {"setting": "n-max=3", "draft_n_max": 3, "peak_rss_kb_server": 1600 * 1024,
             "records": [_llama_rec("1", [1, 9, 3, 4], 0.4, 3), _llama_rec("2", [5, 6, 7], 0.4, 1)]},
        ], "process_peak_rss_kb": 100 * 1024},
    }
    entries = build_systems(results, eos, max_new=4)
    assert [e["name"] for e in entries] == ["specmesh_ar", "llamacpp_ar", "llamacpp_spec"]
    ar, lar, lspec = entries
    assert ar["identical_to_specmesh_ar"] == 1.0 and ar["first_divergence_vs_specmesh_ar"] is None
    assert lar["identical_to_specmesh_ar"] == 0.5 and lar["first_divergence_vs_specmesh_ar"] == 2
    assert [p["first_divergence_vs_specmesh_ar"] for p in lar["prompts"]] == [None, 2]
    assert lar["peak_rss_mb"] == pytest.approx(1024) and lar["client_peak_rss_mb"] == pytest.approx(100)
    assert lar["mean_accepted"] == pytest.approx(1.0)
    assert lar["decode_tokens_per_s"] == pytest.approx(6 / 0.8)
    # the sweep's fastest setting stands for the system, with its own server's peak and identity
    assert lspec["setting"] == "n-max=3" and lspec["tokens_per_s"] == pytest.approx(7 / 0.8)
    assert lspec["peak_rss_mb"] == pytest.approx(1600)
    assert lspec["mean_accepted"] == pytest.approx(7 / 3)  # 7 tokens over 4 - 3 + 3 - 1 target forwards
    assert lspec["identical_to_specmesh_ar"] == 0.5 and lspec["first_divergence_vs_specmesh_ar"] == 1
    assert [s["identical_to_specmesh_ar"] for s in lspec["sweep"]] == [1.0, 0.5]
    assert lspec["identical_to_hf_greedy"] is None  # no hf_greedy in this run

    text = table(entries).splitlines()
    assert text[0].split() == ["system", "tok/s", "med", "tok/s", "all", "decode", "tok/s", "TTFT", "s", "tok/round",
                               "pred", "tok/round", "subtree", "round", "ms", "pred", "round", "ms", "tgt", "share",
                               "x", "greedy", "x", "assisted", "=greedy", "=ar", "ar", "diff@", "RSS", "MB"]
    label_width = len(text[1].split()[0])  # the dashes under "system"
    rows = {line[:label_width].strip(): line[label_width:].split() for line in text[2:]}
    assert set(rows) == {"specmesh_ar", "llamacpp_ar", "llamacpp_spec n-max=3 (best)", "llamacpp_spec n-max=2",
                         "llamacpp_spec n-max=3"}
    assert rows["llamacpp_ar"][-3:] == ["50%", "2", "1024"]
    assert rows["llamacpp_spec n-max=2"][-3:] == ["100%", "-", "1500"]
    # without specmesh_ar in the run, the identity columns are empty, not an error
    alone = build_systems({"llamacpp_ar": results["llamacpp_ar"]}, eos, max_new=4)
    assert alone[0]["identical_to_specmesh_ar"] is None and alone[0]["first_divergence_vs_specmesh_ar"] is None
    assert table(alone).splitlines()[2].split()[-3:] == ["-", "-", "1024"]


# ------------------------------------------------------------------------------------------ end to end

def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.timeout(600)
def test_quick_tiny_run_writes_json_and_png(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "specmesh.clients.cli", "bench", "--quick", "--tiny", "--dtype", "fp32",
           "--json", str(out_json), "--plot", str(out_png), "--no-progress", "--log-dir", str(tmp_path / "logs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, cwd=tmp_path,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert "tok/s" in proc.stdout

    doc = json.loads(out_json.read_text())
    systems = doc["systems"]
    assert [s["name"] for s in systems] == [s for s in SYSTEMS if s not in LLAMACPP_SYSTEMS]
    n_prompts = len(doc["prompts"])
    assert n_prompts == 3
    for s in systems:
        assert s["error"] is None, s
        for field in ("tokens_per_s", "tokens_per_s_median", "ttft_s_median", "mean_accepted", "peak_rss_mb",
                      "identical_to_hf_greedy", "identical_to_specmesh_ar"):
            assert _is_number(s[field]), (s["name"], field, s[field])
        assert s["tokens_per_s"] > 0 and s["peak_rss_mb"] > 0 and s["mean_accepted"] >= 1.0
        # fp32 on the tiny pair: every system is lossless against plain greedy decoding
        assert s["identical_to_hf_greedy"] == 1.0, (s["name"], [p["first_divergence_vs_hf_greedy"]
                                                                for p in s["prompts"]])
        assert s["identical_to_specmesh_ar"] == 1.0, s["name"]
        assert len(s["prompts"]) == n_prompts
        for p in s["prompts"]:
            assert 1 <= p["new_tokens"] <= 16 and p["wall_s"] > 0
            assert sum(p["round_tokens"]) == p["new_tokens"]
        assert set(s["per_category"]) == {p["category"] for p in doc["prompts"]}
        if s["name"] in ("hf_assisted", "specmesh_serial", "specmesh_mesh"):
            assert isinstance(s["acceptance_per_depth"], list)
            assert all(0.0 <= a <= 1.0 for a in s["acceptance_per_depth"])
    by_name = {s["name"]: s for s in systems}
    assert by_name["hf_greedy"]["speedup_vs_hf_greedy"] == pytest.approx(1.0)
    assert by_name["hf_assisted"]["speedup_vs_hf_assisted"] == pytest.approx(1.0)
    sweep = by_name["hf_assisted"]["sweep"]
    assert [s["num_assistant_tokens"] for s in sweep][:4] == [2, 3, 4, 6]
    assert by_name["hf_assisted"]["tokens_per_s"] == max(s["tokens_per_s"] for s in sweep)
    assert _is_number(by_name["specmesh_serial"]["target_forward_share"])
    # the chosen shape: both specmesh speculative systems plan by default, within --subtree-size (16)
    for name in ("specmesh_serial", "specmesh_mesh"):
        s = by_name[name]
        assert s["planned_rounds"] >= 1, name
        assert 1.0 <= s["predicted_subtree_size"] <= 16 and 1.0 <= s["mean_subtree_size"] <= 16, name
        assert 1.0 <= s["predicted_tokens_per_round"] <= s["predicted_subtree_size"], name
        assert s["predicted_round_ms"] > 0 and s["round_ms"] > 0, name
        assert all(len(p["round_tree_size"]) == len(p["round_tokens"]) for p in s["prompts"]), name
    assert by_name["specmesh_serial"]["settings"]["planner"]["draft_ms_per_round"] > 0
    shape = by_name["specmesh_mesh"]["settings"]["services"]["speculation"]
    assert shape["max_subtree_size"] == 16 and shape["planner"]["active"]
    assert by_name["specmesh_mesh"]["verify_ms"] > 0 and by_name["hf_greedy"]["planned_rounds"] is None
    assert "pred round ms" in proc.stdout
    assert set(by_name["specmesh_mesh"]["peak_rss_mb_per_service"]) == {"router", "draft", "target", "treekv"}

    data = out_png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
