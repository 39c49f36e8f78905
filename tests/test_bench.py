"""`specmesh bench`: the pure helpers, and one real `--quick --tiny` run of all five systems (mesh included).

The end-to-end run checks only that the command works and writes what other tools read: the JSON
schema (a "systems" list with the five names and numeric figures), the identity fractions (in fp32
on the tiny pair every system must produce hf_greedy's tokens), and a valid PNG. No timing assertions.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specmesh.clients.bench.prompts import DEFAULT_PROMPTS, Prompt, PromptError, load_prompts, select
from specmesh.clients.bench.report import figures, first_divergence, normalize
from specmesh.clients.bench.systems import SYSTEMS

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


def test_bad_arguments_fail_in_one_line() -> None:
    from specmesh.clients.cli import main

    assert main(["bench", "--tiny", "--systems", "hf_greedy,nope"]) == 2
    assert main(["bench", "--tiny", "--assist-tokens", "2,x"]) == 2


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
    assert [s["name"] for s in systems] == list(SYSTEMS)
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
    assert set(by_name["specmesh_mesh"]["peak_rss_mb_per_service"]) == {"router", "draft", "target", "treekv"}

    data = out_png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
