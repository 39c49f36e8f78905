"""The PNG: tokens/s per system, grouped by category (plus "all"), one bar per system."""
from __future__ import annotations

from pathlib import Path

COLORS = {"hf_greedy": "#9e9e9e", "hf_assisted": "#616161", "specmesh_ar": "#90caf9",
          "specmesh_serial": "#1e88e5", "specmesh_mesh": "#0d47a1", "llamacpp_ar": "#ffb74d",
          "llamacpp_spec": "#e65100"}


def plot(entries: list[dict], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [e for e in entries if not e.get("error")]
    cats: list[str] = []
    for e in ok:
        cats += [c for c in e["per_category"] if c not in cats]
    groups = ["all", *cats]
    n = max(1, len(ok))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 1.5), 4.2), dpi=110)
    for i, e in enumerate(ok):
        values = [e["tokens_per_s"]] + [e["per_category"].get(c, {}).get("tokens_per_s", 0.0) for c in cats]
        label = e["name"] + (f" ({e['setting'].split(' (')[0]})" if "setting" in e else "")
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=label, color=COLORS.get(e["name"]))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30 if len(groups) > 5 else 0, ha="right" if len(groups) > 5 else "center")
    ax.set_ylabel("tokens / s")
    ax.set_title(title or "specmesh bench: tokens/s per system and category", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if ok:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png", bbox_inches="tight")
    plt.close(fig)
