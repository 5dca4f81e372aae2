"""``s2d report RUN_DIR``: the paper-style table and plots, computed from the run's own files.

Table: one row per route (base models, each stage's final policy), one column per eval set with avg@k +- standard
error, plus the labels the route consumed (its own and its ancestors': which splits, how many problems) and its
control name. Plots: training curves per stage (reward / reverse KL / loss-like metric) and accuracy per route.
Nothing here is hard-coded: every number is read from eval.json / lineage.json / metrics.jsonl of this run.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_s2d.errors import S2DError
from megatron_s2d.stages.layout import BASE_EVAL, RunLayout


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def collect(layout: RunLayout) -> dict:
    """Rows of the report: [{route, kind, control, labels, evals: {set: {avg, stderr, k, n}}}], plus curves."""
    rows, curves = [], {}
    base = _read_json(layout.stage(BASE_EVAL) / "eval.json") or {}
    for label, ev in base.items():
        rows.append({"route": label, "kind": "base", "control": None, "labels_splits": [], "labels_consumed": 0,
                     "evals": ev["results"]})
    stages_dir = layout.root / "stages"
    plan_order = []
    if layout.plan.is_file():
        import yaml

        plan_order = [s["name"] for s in (yaml.safe_load(layout.plan.read_text()) or {}).get("stages", [])]
    names = plan_order + sorted(p.name for p in stages_dir.iterdir() if p.is_dir() and p.name not in plan_order) \
        if stages_dir.is_dir() else []
    for name in names:
        if name == BASE_EVAL:
            continue
        lineage = _read_json(layout.stage(name) / "lineage.json")
        ev = _read_json(layout.stage(name) / "eval.json")
        metrics_path = layout.stage(name) / "metrics.jsonl"
        if metrics_path.is_file():
            curves[name] = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
        if lineage is None:
            continue
        consumed = lineage["ledger"]["labels_consumed"] + sum(
            led["labels_consumed"] for led in lineage.get("ancestor_ledgers", {}).values())
        rows.append({"route": name, "kind": lineage["kind"], "control": lineage.get("control"),
                     "labels_splits": lineage.get("labels_used_by_lineage", []), "labels_consumed": consumed,
                     "ledger": lineage["ledger"], "evals": (ev or {}).get("results", {})})
    if not rows:
        raise S2DError(f"{layout.root}: nothing to report (no base_eval/ or stages/*/lineage.json yet)")
    return {"rows": rows, "curves": curves}


def table_markdown(data: dict) -> str:
    sets = []
    for r in data["rows"]:
        for s in r["evals"]:
            if s not in sets:
                sets.append(s)
    head = ["route", "kind", "control", *[f"{s} avg@k ± se" for s in sets], "labels (splits)", "labels used"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data["rows"]:
        cells = [r["route"], r["kind"], r["control"] or ""]
        for s in sets:
            e = r["evals"].get(s)
            cells.append(f"{100 * e['avg']:.1f} ± {100 * e['stderr']:.1f} (k={e['k']}, n={e['n_problems']})"
                         if e else "–")
        cells += [",".join(r["labels_splits"]) or "none", str(r["labels_consumed"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(data: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    curves = data["curves"]
    if curves:
        keys = ["reward_mean", "reverse_kl_mean", "kl_mean", "nll_mean", "entropy_mean", "response_len_mean"]
        present = [k for k in keys if any(k in m for c in curves.values() for m in c)]
        fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.4), squeeze=False)
        for ax, key in zip(axes[0], present):
            for name, c in curves.items():
                pts = [(m["step"], m[key]) for m in c if key in m]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=name)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.tight_layout()
        p = out_dir / "training_curves.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    rows = [r for r in data["rows"] if r["evals"]]
    if rows:
        sets = list(rows[0]["evals"])
        fig, axes = plt.subplots(1, len(sets), figsize=(max(6, 0.9 * len(rows)) * len(sets), 3.8), squeeze=False)
        for ax, s in zip(axes[0], sets):
            names = [r["route"] for r in rows if s in r["evals"]]
            vals = [100 * r["evals"][s]["avg"] for r in rows if s in r["evals"]]
            errs = [100 * r["evals"][s]["stderr"] for r in rows if s in r["evals"]]
            ax.bar(range(len(names)), vals, yerr=errs, capsize=3, color="tab:blue")
            ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
            ax.set_ylabel(f"avg@k (%) on {s}")
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        p = out_dir / "accuracy_per_route.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def write_report(run_dir: str | Path) -> tuple[str, list[Path]]:
    layout = RunLayout.of(run_dir)
    data = collect(layout)
    layout.report.mkdir(parents=True, exist_ok=True)
    md = table_markdown(data)
    (layout.report / "report.md").write_text(md + "\n")
    (layout.report / "report.json").write_text(json.dumps(data["rows"], indent=1))
    return md, plot(data, layout.report)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="megatron_s2d.run.report")
    ap.add_argument("--run-dir", required=True)
    args = ap.parse_args(argv)
    md, plots = write_report(args.run_dir)
    print(md)
    for p in plots:
        print(f"plot: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
