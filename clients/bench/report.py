"""From the workers' raw per-prompt records to figures, the JSON "systems" list and the printed table.

Definitions (per system, and the same per category):
  tokens_per_s          all new tokens / all request wall time (prompt processing included)
  tokens_per_s_median   median over prompts of new tokens / wall time
  decode_tokens_per_s   the tokens after the first / the time after the first token (all, and median)
  ttft_s_median         median time from sending the request to the first generated token
  mean_accepted         new tokens per target forward (accepted draft tokens + the bonus token)
  decode_tokens_per_round  the same over the rounds after the first (the first is the prefill's token)
  mean_subtree_size     nodes the target verified per round after the first (specmesh serial, mesh)
  round_ms              mean time between consecutive rounds' tokens arriving (decoding only)
  verify_ms             mean target step time per round after the first (the mesh's stream reports it)
  predicted_*           what the speculation planner expected of the rounds it sized (planned_rounds):
                        subtree size, tokens per round, round time (the target step; serial: plus the
                        draft's expansions). Compare with mean_subtree_size, decode_tokens_per_round,
                        round_ms (serial) / verify_ms (mesh)
  acceptance_per_depth  [d] = fraction of rounds that accepted at least d+1 draft tokens
  target_forward_share  time inside target forwards / wall time (None where not measurable)
  identical_to_X        fraction of prompts whose output equals system X's token for token (both cut
                        at the first EOS, EOS dropped, at most max_new_tokens)
  first_divergence_vs_X the earliest token position where a prompt's output differs from X's (None if
                        every prompt is identical); per prompt in prompts[i]
  peak_rss_mb           peak resident memory of the system's serving processes
"""
from __future__ import annotations

import statistics
from typing import Any, Iterable

from .systems import LLAMACPP_SYSTEMS, SYSTEMS

SPECULATIVE = {"hf_assisted", "specmesh_serial", "specmesh_mesh", "llamacpp_spec"}
REFERENCES = ("hf_greedy", "specmesh_ar")
NUMERIC_FIELDS = ("tokens_per_s", "tokens_per_s_median", "decode_tokens_per_s", "decode_tokens_per_s_median",
                  "ttft_s_median", "mean_accepted", "peak_rss_mb")


def normalize(ids: Iterable[int], eos: Iterable[int], max_new: int) -> list[int]:
    stop = set(eos)
    out = []
    for tok in list(ids)[:max_new]:
        if tok in stop:
            break
        out.append(tok)
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length); None if identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _mb(kb: int | None) -> float | None:
    return kb / 1024 if kb else None


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def shape_figures(records: list[dict]) -> dict[str, Any]:
    """The speculation shape of a set of records: measured per round, and as the planner predicted it."""
    sizes = [n for r in records for n in (r.get("round_tree_size") or [])[1:]]
    decoded = [n for r in records for n in (r.get("round_tokens") or [])[1:]]
    verify = [ms for r in records for ms in (r.get("round_verify_ms") or [])[1:]]
    timed = [r["round_times_s"] for r in records if r.get("round_times_s") and len(r["round_times_s"]) > 1]
    gaps = sum(len(t) - 1 for t in timed)
    plans = [r["plan"] for r in records if r.get("plan")]
    planned = sum(p["rounds"] for p in plans)

    def predicted(key: str) -> float | None:
        return sum(p[key] for p in plans) / planned if planned > 0 else None

    return {
        "mean_subtree_size": _mean(sizes),
        "decode_tokens_per_round": _mean(decoded),
        "round_ms": sum(t[-1] - t[0] for t in timed) / gaps * 1000 if gaps else None,
        "verify_ms": _mean(verify),
        "planned_rounds": planned if plans else None,
        "predicted_subtree_size": predicted("subtree_size_sum"),
        "predicted_tokens_per_round": predicted("tokens_per_round_sum"),
        "predicted_round_ms": predicted("round_ms_sum"),
    }


def figures(records: list[dict], speculative: bool) -> dict[str, Any]:
    """The figures of one set of prompt records (a whole system, or one category of it)."""
    tokens = sum(r["new_tokens"] for r in records)
    wall = sum(r["wall_s"] for r in records)
    per_round = all(r["round_accepted"] is not None for r in records)
    if per_round:
        accepted = [a for r in records for a in r["round_accepted"]]
        rounds, accepted_total = len(accepted), sum(accepted)
    else:  # llama.cpp: totals only (see systems.py)
        accepted = []
        rounds = sum(r["target_forwards"] for r in records)
        accepted_total = sum(r["accepted_draft"] for r in records)
    ttfts = [r["ttft_s"] for r in records if r["ttft_s"] is not None]
    forward = [r["target_forward_s"] for r in records]
    per_depth = None
    if speculative and rounds and per_round:
        per_depth = [sum(a > d for a in accepted) / rounds for d in range(max(accepted, default=0))]
    # Decode only: from the first token to the last, so prefill (and its first token) is left out.
    decoding = [(r["new_tokens"] - 1, r["wall_s"] - r["ttft_s"]) for r in records
                if r["ttft_s"] is not None and r["new_tokens"] > 1 and r["wall_s"] > r["ttft_s"]]
    decode_time = sum(s for _, s in decoding)
    return {
        "prompts_run": len(records),
        "new_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "tokens_per_s_median": _median([r["new_tokens"] / r["wall_s"] for r in records if r["wall_s"] > 0]) or 0.0,
        "decode_tokens_per_s": sum(n for n, _ in decoding) / decode_time if decode_time > 0 else None,
        "decode_tokens_per_s_median": _median([n / s for n, s in decoding]),
        "ttft_s_median": _median(ttfts),
        "ttft_s_mean": statistics.fmean(ttfts) if ttfts else None,
        "rounds": rounds,
        "mean_accepted": tokens / rounds if rounds else None,
        "mean_accepted_draft": accepted_total / rounds if rounds else None,
        "acceptance_per_depth": per_depth,
        "target_forward_share": (sum(forward) / wall if wall > 0 and records and None not in forward else None),
        **shape_figures(records),
    }


def summarize(name: str, records: list[dict]) -> dict[str, Any]:
    speculative = name in SPECULATIVE
    out = figures(records, speculative)
    cats: dict[str, list[dict]] = {}
    for r in records:
        cats.setdefault(r["category"], []).append(r)
    out["per_category"] = {c: figures(rs, speculative) for c, rs in cats.items()}
    out["prompts"] = records
    return out


def build_systems(results: dict[str, dict], eos: list[int], max_new: int) -> list[dict]:
    """One entry per system run (in the canonical order), with identity and speedups filled in."""
    entries: list[dict] = []
    for name in SYSTEMS:
        if name not in results:
            continue
        res = results[name]
        entry: dict[str, Any] = {"name": name, "error": res.get("error"), "notes": list(res.get("notes", []))}
        if res.get("error"):
            entry.update({f: None for f in NUMERIC_FIELDS})
            entry.update(identical_to_hf_greedy=None, identical_to_specmesh_ar=None, log_tail=res.get("log_tail"))
            entries.append(entry)
            continue
        if "sweep" in res:  # hf_assisted, llamacpp_spec: the best setting stands for the system
            sweep = [{**{k: v for k, v in s.items() if k != "records"}, **summarize(name, s["records"])}
                     for s in res["sweep"]]
            for s in sweep:
                if "peak_rss_kb_server" in s:  # llama.cpp: one server per setting
                    s["peak_rss_mb"] = _mb(s["peak_rss_kb_server"])
            best = max(sweep, key=lambda s: s["tokens_per_s"])
            entry.update({k: v for k, v in best.items()})
            entry["sweep"] = sweep
        else:
            entry.update(summarize(name, res["records"]))
        if name in LLAMACPP_SYSTEMS:  # the server's own peak, not the client's
            entry["peak_rss_mb"] = _mb(entry.get("peak_rss_kb_server", res.get("peak_rss_kb_server")))
            entry["client_peak_rss_mb"] = res["process_peak_rss_kb"] / 1024
            entry["notes"].append("peak_rss_mb is llama-server's (VmHWM, which counts the mmapped GGUF pages it "
                                  "touched); mean_accepted comes from llama.cpp's draft_n_accepted")
        elif name == "specmesh_mesh":
            services = res.get("peak_rss_kb_services") or {}
            entry["peak_rss_mb"] = sum(services.values()) / 1024 if services else None
            entry["peak_rss_mb_per_service"] = {k: v / 1024 for k, v in services.items()}
            entry["client_peak_rss_mb"] = res["process_peak_rss_kb"] / 1024
            entry["notes"].append("target_forward_share sums the target_ms the stream reports per round; "
                                  "peak_rss_mb is the sum of the four services' peaks")
        else:
            entry["peak_rss_mb"] = res["process_peak_rss_kb"] / 1024
        entry["load_s"] = res.get("load_s")
        entry["settings"] = res.get("settings", {})
        entries.append(entry)

    by_name = {e["name"]: e for e in entries if not e.get("error")}
    refs = {r: {p["question_id"]: normalize(p["output_ids"], eos, max_new) for p in by_name[r]["prompts"]}
            for r in REFERENCES if r in by_name}
    greedy_tps = by_name["hf_greedy"]["tokens_per_s"] if "hf_greedy" in by_name else None
    assisted_tps = by_name["hf_assisted"]["tokens_per_s"] if "hf_assisted" in by_name else None
    for e in entries:
        if e.get("error"):
            continue
        for target in [e, *e.get("sweep", [])]:
            _identity(target, refs, eos, max_new)
            target["speedup_vs_hf_greedy"] = target["tokens_per_s"] / greedy_tps if greedy_tps else None
            target["speedup_vs_hf_assisted"] = target["tokens_per_s"] / assisted_tps if assisted_tps else None
            for cat, figs in target["per_category"].items():
                g = by_name["hf_greedy"]["per_category"].get(cat) if greedy_tps else None
                figs["speedup_vs_hf_greedy"] = figs["tokens_per_s"] / g["tokens_per_s"] if g and g["tokens_per_s"] else None
    return entries


def _identity(entry: dict, refs: dict[str, dict], eos: list[int], max_new: int) -> None:
    for ref, outputs in [(r, refs.get(r)) for r in REFERENCES]:
        key = f"identical_to_{ref}"
        if outputs is None:
            entry[key] = entry[f"first_divergence_vs_{ref}"] = None
            continue
        same = 0
        divergences = []
        for p in entry["prompts"]:
            mine = normalize(p["output_ids"], eos, max_new)
            theirs = outputs.get(p["question_id"])
            div = first_divergence(mine, theirs) if theirs is not None else 0
            p[key] = div is None
            p[f"first_divergence_vs_{ref}"] = div
            same += div is None
            divergences += [] if div is None else [div]
        entry[key] = same / len(entry["prompts"]) if entry["prompts"] else None
        entry[f"first_divergence_vs_{ref}"] = min(divergences, default=None)


# ------------------------------------------------------------------------------------------ table

def _f(x: Any, fmt: str = "{:.2f}", none: str = "-") -> str:
    return none if x is None else fmt.format(x)


def _short(setting: dict) -> str:
    return setting["setting"].split(" (")[0]


def table(entries: list[dict]) -> str:
    head = ["system", "tok/s med", "tok/s all", "decode tok/s", "TTFT s", "tok/round", "pred tok/round", "subtree",
            "round ms", "pred round ms", "tgt share", "x greedy", "x assisted", "=greedy", "=ar", "ar diff@", "RSS MB"]
    rows = []
    failed = []
    for e in entries:
        if e.get("error"):
            failed.append(f"{e['name']}: FAILED ({e['error']})")
            continue
        items = [(e["name"] + (f" {_short(e)} (best)" if "sweep" in e else ""), e)]
        if "sweep" in e and len(e["sweep"]) > 1:
            items += [(f"  {e['name']} {_short(s)}", s) for s in e["sweep"]]
        for label, s in items:
            rows.append([label, _f(s["tokens_per_s_median"]), _f(s["tokens_per_s"]), _f(s["decode_tokens_per_s"]),
                         _f(s["ttft_s_median"]), _f(s["mean_accepted"]), _f(s["predicted_tokens_per_round"]),
                         _f(s["mean_subtree_size"], "{:.1f}"), _f(s["round_ms"], "{:.1f}"),
                         _f(s["predicted_round_ms"], "{:.1f}"), _f(s["target_forward_share"], "{:.0%}"),
                         _f(s["speedup_vs_hf_greedy"], "{:.2f}x"), _f(s["speedup_vs_hf_assisted"], "{:.2f}x"),
                         _f(s["identical_to_hf_greedy"], "{:.0%}"), _f(s["identical_to_specmesh_ar"], "{:.0%}"),
                         _f(s["first_divergence_vs_specmesh_ar"], "{}"),
                         _f(s.get("peak_rss_mb", e["peak_rss_mb"]), "{:.0f}")])
    return "\n".join([_grid(head, rows), *failed])


def category_table(entries: list[dict]) -> str:
    ok = [e for e in entries if not e.get("error")]
    cats: list[str] = []
    for e in ok:
        cats += [c for c in e["per_category"] if c not in cats]
    head = ["tok/s by category"] + cats
    rows = [[e["name"]] + [_f(e["per_category"].get(c, {}).get("tokens_per_s")) for c in cats] for e in ok]
    return _grid(head, rows)


def _grid(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows] if i < len(r)) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
