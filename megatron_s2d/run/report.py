"""``s2d report RUN_DIR``: the paper-style tables and plots, computed from the run's own files.

Routes table: one row per route (base models, each stage's final policy), one column per eval set with avg@k +-
standard error, plus the labels the route consumed (its own and its ancestors': which splits, how many problems) and
its control name.

Paired table: every route is evaluated on the same problems with the same sampling seeds (``eval.runner``), so two
routes compare problem by problem: difference of avg@k +- the paired standard error (``eval.metrics.
paired_difference``), and z = difference / se. The contrasts (``contrasts``), all read off the plan's lineage:
1. what each stage added: the stage minus the model it started from (its ``init`` stage, or the base model);
2. each control minus the main-route stage of the same kind (cold GRPO vs student GRPO after the bridge, OPD-only vs
   OPD after the warmup, teacher-sample SFT vs the top-k warmup, raw-teacher transfer vs the RL-teacher bridge,
   matched replay vs held-out student GRPO, ...);
3. a multi-stage control's final student minus the main route's final student (the 1H/2H allocation contrast).

Beside the paper (``run/paper.py``): when the run's eval sets are the paper's (MATH-500, AIME 2024/2025), its routes
in the paper's row order with the paper's published figures (package data) and ours - paper; the toy world's
report says it is not comparable.

Plots: training curves per stage; student accuracy per route with standard-error bars against the teacher's
(base and RL, as bands); the paired differences with their error bars.
Nothing here is hard-coded: every number is read from eval.json / lineage.json / metrics.jsonl of this run.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from megatron_s2d.errors import S2DError, read_json, read_jsonl
from megatron_s2d.eval.metrics import paired_difference
from megatron_s2d.run import paper
from megatron_s2d.stages.layout import BASE_EVAL, RunLayout

# how to repair a damaged file the report reads (the stage job writes them when it completes)
_FIX = "restore it, or redo the stage that wrote it (`s2d run PLAN --restart STAGE`)"


def _read_json(path: Path):
    return read_json(path, _FIX) if path.is_file() else None


@contextlib.contextmanager
def _fields_of(path: Path):
    """A missing field or a wrong type in a file the report reads is an S2DError naming the file."""
    try:
        yield
    except (KeyError, TypeError, AttributeError) as e:
        raise S2DError(f"{path}: damaged (field {e} missing or of the wrong type): {_FIX}") from e


def _plan(layout: RunLayout) -> dict:
    """The run's resolved plan as a dict ({} without one)."""
    if not layout.plan.is_file():
        return {}
    import yaml

    try:
        plan = yaml.safe_load(layout.plan.read_text()) or {}
    except yaml.YAMLError as e:
        raise S2DError(f"{layout.plan}: damaged YAML ({e}): restore it, or re-run `s2d run PLAN`, which "
                       "writes it") from e
    if not isinstance(plan, dict):
        raise S2DError(f"{layout.plan}: damaged (not a mapping): restore it, or re-run `s2d run PLAN`, which writes it")
    return plan


def _plan_order(layout: RunLayout) -> list[str]:
    """The stage names of the run's resolved plan, in plan order ([] without one)."""
    with _fields_of(layout.plan):
        return [s["name"] for s in _plan(layout).get("stages", [])]


def collect(layout: RunLayout) -> dict:
    """Rows of the report: [{route, kind, control, labels, evals: {set: {avg, stderr, k, n}}}], plus curves."""
    rows, curves = [], {}
    base_path = layout.stage(BASE_EVAL) / "eval.json"
    with _fields_of(base_path):
        for label, ev in (_read_json(base_path) or {}).items():
            rows.append({"route": label, "kind": "base", "control": None, "labels_splits": [],
                         "labels_consumed": 0, "model": label.removesuffix("_base"), "init": None,
                         "evals": ev["results"]})
    stages_dir = layout.root / "stages"
    plan_order = _plan_order(layout)
    names = plan_order + sorted(p.name for p in stages_dir.iterdir() if p.is_dir() and p.name not in plan_order) \
        if stages_dir.is_dir() else []
    for name in names:
        if name == BASE_EVAL:
            continue
        lineage_path, eval_path = layout.stage(name) / "lineage.json", layout.stage(name) / "eval.json"
        lineage, ev = _read_json(lineage_path), _read_json(eval_path)
        metrics_path = layout.stage(name) / "metrics.jsonl"
        if metrics_path.is_file():
            curves[name] = read_jsonl(metrics_path, _FIX)
        if lineage is None:
            continue
        with _fields_of(lineage_path):
            consumed = lineage["ledger"]["labels_consumed"] + sum(
                led["labels_consumed"] for led in lineage.get("ancestor_ledgers", {}).values())
            model = lineage.get("policy_model", "student")
            init = lineage.get("parents", {}).get("init") or "base"
            row = {"route": name, "kind": lineage["kind"], "control": lineage.get("control"),
                   "labels_splits": lineage.get("labels_used_by_lineage", []), "labels_consumed": consumed,
                   "model": model, "init": f"{model}_base" if init == "base" else init, "ledger": lineage["ledger"],
                   "split": lineage.get("split"), "teacher": lineage.get("parents", {}).get("teacher")}
        with _fields_of(eval_path):
            row["evals"] = (ev or {}).get("results", {})
        rows.append(row)
    if not rows:
        raise S2DError(f"{layout.root}: nothing to report (no base_eval/ or stages/*/lineage.json yet)")
    plan = _plan(layout)
    with _fields_of(layout.plan):
        beside = paper.paper_table(rows, plan) if paper.comparability(plan, rows) == "paper" else None
    return {"rows": rows, "curves": curves, "paired": paired(rows), "plan": plan, "paper": beside}


def contrasts(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(route a, route b, what a - b measures) for the paired table, in the order of the rules in the module
    docstring; only pairs whose two routes both exist."""
    by = {r["route"]: r for r in rows}
    stages = [r for r in rows if r["kind"] != "base"]
    out: list[tuple[str, str, str]] = []

    def add(a: str, b: str, why: str) -> None:
        if a in by and b in by and a != b and (a, b) not in [(x, y) for x, y, _ in out]:
            out.append((a, b, why))

    for r in stages:
        add(r["route"], r["init"], f"what {r['route']} ({r['kind']}) added to the model it started from")
    main = [r for r in stages if not r["control"]]
    main_of_kind = {}
    for r in main:
        main_of_kind.setdefault(r["kind"], r["route"])
    for r in stages:
        if r["control"] and r["kind"] in main_of_kind:
            add(r["route"], main_of_kind[r["kind"]], f"control {r['control']} vs the main route's {r['kind']}")
    main_finals = _final_students(main)
    controls: dict[str, list[dict]] = {}
    for r in stages:
        if r["control"]:
            controls.setdefault(r["control"], []).append(r)
    for control, members in controls.items():
        finals = _final_students(members)
        if len(members) > 1 and main_finals and len(finals) == 1:
            add(finals[0], main_finals[-1], f"control {control}: its final student vs the main route's final student")
    return out


def _final_students(routes: list[dict]) -> list[str]:
    """The student routes among ``routes`` that no other of them starts from (the ends of their chains), in order."""
    students = [r["route"] for r in routes if r["model"] == "student"]
    inits = {r["init"] for r in routes if r["model"] == "student"}
    return [m for m in students if m not in inits]


def paired(rows: list[dict]) -> list[dict]:
    """The paired differences of every contrast on every eval set both routes were evaluated on (same problems)."""
    by = {r["route"]: r for r in rows}
    out = []
    for a, b, why in contrasts(rows):
        for s, ea in by[a]["evals"].items():
            eb = by[b]["evals"].get(s)
            if not eb or "scores" not in ea or "scores" not in eb or ea.get("problems") != eb.get("problems") \
                    or ea.get("grader", "math_verify") != eb.get("grader", "math_verify") \
                    or len(ea["scores"]) != len(eb["scores"]):
                continue  # not the same problems (or not the same grader): no paired comparison
            d = paired_difference(ea["scores"], eb["scores"])
            out.append({"a": a, "b": b, "set": s, "why": why, "diff": d.mean, "stderr": d.stderr,
                        "n_problems": d.n_problems})
    return out


def paired_markdown(data: dict) -> str:
    """The paired table: a - b +- paired se (percentage points) and z, per contrast and eval set."""
    lines = ["| contrast | eval set | difference ± paired se (points) | z | what it measures |", "|---|---|---|---|---|"]
    for p in data["paired"]:
        z = p["diff"] / p["stderr"] if p["stderr"] > 0 else float("nan")
        lines.append(f"| {p['a']} − {p['b']} | {p['set']} | {100 * p['diff']:+.1f} ± {100 * p['stderr']:.1f} "
                     f"(n={p['n_problems']}) | {z:+.1f} | {p['why']} |")
    return "\n".join(lines)


def _graders(rows: list[dict], s: str) -> str:
    """The grader(s) that scored eval set ``s`` (eval.json records it; results written before it did are math-verify's,
    then the only grader)."""
    return "/".join(sorted({r["evals"][s].get("grader", "math_verify") for r in rows if s in r["evals"]}))


def eval_settings(plan: dict) -> str:
    """One line: the plan's evaluation sampling and grader (a setting the plan's file predates: not shown)."""
    ev = plan.get("eval") or {}
    keys = [k for k in ("k", "temperature", "top_p", "top_k", "max_new_tokens") if k in ev]
    if not keys:
        return "Evaluation settings: not recorded (the run folder has no plan.resolved.yaml)."
    return ("Evaluation (from the plan): " + ", ".join(f"{k} {ev[k]}" for k in keys)
            + f", grader {plan.get('grader', 'math_verify')}.")


def table_markdown(data: dict) -> str:
    sets = []
    for r in data["rows"]:
        for s in r["evals"]:
            if s not in sets:
                sets.append(s)
    head = ["route", "kind", "control", *[f"{s} avg@k ± se ({_graders(data['rows'], s)})" for s in sets],
            "labels (splits)", "labels used"]
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
        paths.append(_accuracy_plot(rows, out_dir, plt))
    if data.get("paired"):
        paths.append(_paired_plot(data["paired"], out_dir, plt))
    return paths


def _accuracy_plot(rows: list[dict], out_dir: Path, plt) -> Path:
    """Student routes as bars with standard-error bars; the teacher's routes as horizontal bands (mean +- se)."""
    sets = list(rows[0]["evals"])
    students = [r for r in rows if r.get("model", "student") == "student"]
    teachers = [r for r in rows if r.get("model") == "teacher"]
    fig, axes = plt.subplots(1, len(sets), figsize=(max(6.0, 0.8 * len(students) + 2) * len(sets), 4.0),
                             squeeze=False)
    for ax, s in zip(axes[0], sets):
        shown = [r for r in students if s in r["evals"]]
        vals = [100 * r["evals"][s]["avg"] for r in shown]
        errs = [100 * r["evals"][s]["stderr"] for r in shown]
        ax.bar(range(len(shown)), vals, yerr=errs, capsize=3, color="tab:blue", label="student routes")
        for i, t in enumerate(r for r in teachers if s in r["evals"]):
            m, e = 100 * t["evals"][s]["avg"], 100 * t["evals"][s]["stderr"]
            color = f"C{i + 1}"
            ax.axhline(m, color=color, ls="--", lw=1.2, label=f"{t['route']} {m:.1f} ± {e:.1f}")
            ax.axhspan(m - e, m + e, color=color, alpha=0.15)
        ax.set_xticks(range(len(shown)), [r["route"] for r in shown], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(f"avg@k (%) on {s}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    p = out_dir / "accuracy_per_route.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def _paired_plot(pairs: list[dict], out_dir: Path, plt) -> Path:
    """Each contrast's paired difference with +-2 paired standard errors (zero line: no difference)."""
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(pairs) + 1.2))
    ys = range(len(pairs))[::-1]
    ax.errorbar([100 * p["diff"] for p in pairs], list(ys), xerr=[200 * p["stderr"] for p in pairs], fmt="o",
                capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(list(ys), [f"{p['a']} − {p['b']} ({p['set']})" for p in pairs], fontsize=7)
    ax.set_xlabel("paired difference of avg@k (points), ± 2 se")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    p = out_dir / "paired_differences.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[str, list[Path]]:
    """report.md (routes table, then paired table), report.json (rows and paired differences) and the plots, into
    ``out_dir`` (default: the run's ``report/``). The run folder is only read: a report of a read-only run goes
    elsewhere (``s2d report RUN --out DIR``); a folder it cannot write is an S2DError naming it."""
    layout = RunLayout.of(run_dir)
    out = Path(out_dir).resolve() if out_dir is not None else layout.report
    data = collect(layout)
    md = table_markdown(data) + "\n\n" + eval_settings(data["plan"])
    if data["paired"]:
        md += "\n\nPaired differences (same problems, same sampling seeds):\n\n" + paired_markdown(data)
    beside = paper.paper_markdown(data["plan"], data["rows"], data["paper"])
    if beside:
        md += "\n\n" + beside
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(md + "\n")
        (out / "report.json").write_text(json.dumps({"rows": data["rows"], "paired": data["paired"],
                                                     "paper": data["paper"]}, indent=1))
        return md, plot(data, out)
    except OSError as e:
        raise S2DError(f"{out}: cannot write the report there ({e}): "
                       + ("pass --out DIR to write it elsewhere" if out_dir is None else "choose another --out")) from e


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="megatron_s2d.run.report")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", default=None, help="where the report goes (default: RUN_DIR/report)")
    args = ap.parse_args(argv)
    md, plots = write_report(args.run_dir, args.out)
    print(md)
    for p in plots:
        print(f"plot: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
