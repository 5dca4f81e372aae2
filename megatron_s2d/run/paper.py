"""The report beside the paper: this run's routes in the row order of the paper's tables, with the figures the paper
publishes (arXiv 2605.12483), when the run's eval sets are the paper's (MATH-500, AIME 2024, AIME 2025).

The figures ship with the package (``paper_figures.json``: each with its version and where in the paper it is
stated), never read from outside it. A route is placed on a paper row by what it is, read off the run's own plan and
lineage, never by its name:
- ``route``: ``direct_grpo`` (one GRPO stage from the base model), ``bridge`` (a chain of warmup / OPD stages from the
  base model), ``bridge_then_grpo`` / ``bridge_then_replay`` (a bridge, then student GRPO on a split the bridge did
  not use / did use);
- ``bridge``: ``two_stage`` (forward-KL warmup -> OPD), ``opd_only``, ``teacher_sample_sft`` (a sampled-token warmup
  alone), ``warmup_only`` (a top-k warmup alone: no paper row);
- ``teacher``: ``raw`` (the base teacher), ``rl`` (a ``teacher_rl`` stage), ``sft`` (a ``teacher_sft`` stage);
- ``data``: ``full`` (the route's labels and prompts cover every split of the pool) or ``half``;
- ``model`` / ``model_name`` / ``family`` / ``same_size``: from the plan's models (the basename of their folders).
Our value is the route's avg@k +- its standard error; a figure stated as a difference between two rows is set beside
our paired difference between the matching routes. "ours - paper" is a plain subtraction; a figure for other models
than this run's is shown but not subtracted. Nothing here adjusts our numbers.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from megatron_s2d.data.sources import ALIASES
from megatron_s2d.eval.metrics import paired_difference

FIGURES_FILE = "paper_figures.json"
TOY_NOTE = "Not comparable to the paper's figures (toy world)"


@functools.cache
def figures() -> dict:
    """The paper's figures and table rows, from the installed package's data file."""
    return json.loads(resources.files("megatron_s2d.run").joinpath(FIGURES_FILE).read_text(encoding="utf-8"))


def eval_sets(plan: dict, rows: list[dict]) -> dict[str, str]:
    """{eval set name as in eval.json: its source, canonical (aliases resolved)}; from the plan's ``data.eval``,
    else the set's own name."""
    out = {e["name"]: e["source"] for e in (plan.get("data") or {}).get("eval") or []}
    for r in rows:
        for name in r["evals"]:
            out.setdefault(name, name)
    return {name: ALIASES.get(src, src) for name, src in out.items()}


def comparability(plan: dict, rows: list[dict]) -> str | None:
    """"toy" (the toy world, or a toy eval set), "paper" (some eval set is one of the paper's), or None."""
    sets = eval_sets(plan, rows)
    if plan.get("toy_world") or any(str(src).startswith("toy-") for src in sets.values()):
        return "toy"
    return "paper" if any(src in figures()["eval_sets"] for src in sets.values()) else None


def _model_name(plan: dict, which: str) -> str | None:
    m = (plan.get("models") or {}).get(which) or {}
    path = m.get("hf") or m.get("megatron")
    return str(path).rstrip("/").rsplit("/", 1)[-1].lower() if path else None


def _family(name: str | None) -> str | None:
    return next((f for f in ("llama", "qwen") if name and f in name), None)


def route_features(rows: list[dict], plan: dict) -> dict[str, dict]:
    """{route: its features (module docstring)} for every stage route whose chain is one the paper's rows describe."""
    by = {r["route"]: r for r in rows}
    stages = {s["name"]: s for s in plan.get("stages") or []}
    parts_all = set(((plan.get("data") or {}).get("split") or {}).get("fractions") or {"1H", "2H"})
    names = {w: _model_name(plan, w) for w in ("teacher", "student")}

    def info(r: dict) -> dict:
        s = stages.get(r["route"], {})
        mode = (s.get("warmup") or {}).get("mode") or ("sampled" if r["control"] == "teacher_sample_sft" else "topk")
        return {"kind": r["kind"], "split": set((s.get("split") or r.get("split") or "").split("+")) - {""},
                "teacher": s.get("teacher", r.get("teacher")), "mode": mode}

    def chain(r: dict) -> list[dict] | None:
        """The route's stages from the base model to it (None: it starts from a stage this run has no lineage of)."""
        out = [r]
        while out[-1]["init"] in by and by[out[-1]["init"]]["kind"] != "base":
            out.append(by[out[-1]["init"]])
            if len(out) > len(by):
                return None  # a cycle: a damaged lineage; no paper row
        start = out[-1]["init"]
        return [info(x) for x in reversed(out)] if start in by or start == f"{r['model']}_base" else None

    out = {}
    for r in rows:
        if r["kind"] == "base" or (c := chain(r)) is None:
            continue
        f = {"model": r["model"], "model_name": names.get(r["model"]), "family": _family(names.get(r["model"])),
             "same_size": bool(names["teacher"]) and names["teacher"] == names["student"]}
        kinds = [x["kind"] for x in c]
        grpo = ("student_rl", "teacher_rl")
        if len(c) == 1 and kinds[0] in grpo:
            f.update(route="direct_grpo", data="full" if c[0]["split"] >= parts_all else "half")
            out[r["route"]] = f
            continue
        tail = c[-1] if kinds[-1] == "student_rl" else None
        bridge = c[:-1] if tail else c
        bk = [x["kind"] for x in bridge]
        if not bridge or any(k not in ("fkl_warmup", "opd") for k in bk):
            continue
        if bk == ["fkl_warmup", "opd"]:
            f["bridge"] = "two_stage"
        elif bk == ["opd"]:
            f["bridge"] = "opd_only"
        elif bk == ["fkl_warmup"]:
            f["bridge"] = "teacher_sample_sft" if bridge[0]["mode"] == "sampled" else "warmup_only"
        else:
            continue
        t = bridge[-1]["teacher"]
        # the teacher "base" is the raw teacher; a bridge whose teacher is not recorded is on no paper row
        t_kind = "base" if t == "base" else (by[t]["kind"] if t in by else (stages.get(t) or {}).get("kind"))
        f["teacher"] = {"base": "raw", "teacher_rl": "rl", "teacher_sft": "sft"}.get(t_kind)
        prompts = set().union(*(x["split"] for x in bridge))
        # the teacher's labels (its lineage's and its own split): a raw teacher consumed none
        t_labels = set() if t in (None, "base") else set(by[t]["labels_splits"] if t in by else []) | (
            set(((stages.get(t) or {}).get("split") or (by[t].get("split") if t in by else "") or "").split("+"))
            - {""})
        f["data"] = "full" if prompts >= parts_all and (t_labels >= parts_all or f["teacher"] == "raw") else "half"
        f["route"] = "bridge" if tail is None else \
            ("bridge_then_grpo" if not (tail["split"] & prompts) else "bridge_then_replay")
        out[r["route"]] = f
    return out


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _figure_applies(fig: dict, names: dict) -> bool:
    """The figure is for this run's models (each model the figure names is the run's)."""
    return all(names.get(which) == want for which, want in (fig.get("models") or {}).items())


def _for_models(fig: dict) -> str:
    return " -> ".join(fig["models"][w] for w in ("teacher", "student") if w in fig.get("models", {}))


def paper_table(rows: list[dict], plan: dict) -> dict:
    """{"lines": one per (paper row, our route, eval set) and per stated difference, in the paper's row order;
    "missing": paper rows this run has no route for; "other": this run's stage routes on no paper row; "notes"}."""
    fig = figures()
    by = {r["route"]: r for r in rows}
    feats = route_features(rows, plan)
    sets = eval_sets(plan, rows)
    ours_sets = [(name, src) for src in fig["eval_sets"] for name, s in sets.items() if s == src]
    names = {w: _model_name(plan, w) for w in ("teacher", "student")}
    matched = {row["id"]: [r for r, f in feats.items() if all(f.get(k) == v for k, v in row["match"].items())]
               for row in fig["rows"]}
    lines, notes = [], []
    for row in fig["rows"]:
        for route in matched[row["id"]]:
            r = by[route]
            where = f"{route} ({r.get('split') or 'base'})"
            for name, src in ours_sets:
                e = r["evals"].get(name)
                if e is None:
                    continue
                line = {"table": row["table"], "row": row["id"], "label": row["label"], "route": where, "set": name,
                        "source": src, "what": "value", "ours": [e["avg"], e["stderr"]],
                        "ours_text": f"{_pts(e['avg'])} ± {_pts(e['stderr'])} (k={e['k']}"
                                     + (f", {e['grader']})" if e.get("grader") else ")"), "paper": None,
                        "paper_text": "—", "diff": None}
                f = next((f for f in row["figures"] if f["set"] == src and "value" in f), None)
                if f is not None:
                    line["paper"], line["paper_text"] = f["value"], f"{f['value']:.1f} ({f['version']})"
                    if _figure_applies(f, names):
                        line["diff"] = 100 * e["avg"] - f["value"]
                    else:
                        line["paper_text"] += f", for {_for_models(f)}: not this run's models"
                    if f.get("note"):
                        notes.append(f"{row['id']}: {f['note']}")
                lines.append(line)
            for f in (f for f in row["figures"] if "difference" in f):
                lines.extend(_difference_lines(f, row, route, where, matched, by, ours_sets, names, notes))
    other = [r["route"] for r in rows if r["kind"] != "base" and not any(r["route"] in m for m in matched.values())]
    missing = [f"Table {row['table']}: {row['label']}" for row in fig["rows"] if not matched[row["id"]]]
    return {"lines": lines, "missing": missing, "other": other, "notes": list(dict.fromkeys(notes))}


def _difference_lines(f, row, route, where, matched, by, ours_sets, names, notes) -> list[dict]:
    """A figure the paper states as (row ``of``) - (row ``minus``), beside our paired difference of the matching
    routes (this row's route on its side; the first matching route on the other)."""
    a = route if f["of"] == row["id"] else next(iter(matched.get(f["of"], [])), None)
    b = route if f["minus"] == row["id"] else next(iter(matched.get(f["minus"], [])), None)
    out = []
    for name, src in ours_sets:
        if src != f["set"]:
            continue
        line = {"table": row["table"], "row": row["id"], "label": row["label"], "route": where, "set": name,
                "source": src, "what": "difference", "of": a, "minus": b, "ours": None, "ours_text": "—",
                "paper": f["difference"], "paper_text": f"{f['difference']:+.1f} ({f['version']})", "diff": None}
        ea, eb = (by[x]["evals"].get(name) if x else None for x in (a, b))
        if ea and eb and "scores" in ea and "scores" in eb and ea.get("problems") == eb.get("problems") \
                and len(ea["scores"]) == len(eb["scores"]) and ea.get("grader") == eb.get("grader"):
            d = paired_difference(ea["scores"], eb["scores"])
            line["ours"] = [d.mean, d.stderr]
            line["ours_text"] = f"{a} − {b}: {100 * d.mean:+.1f} ± {_pts(d.stderr)}"
            if _figure_applies(f, names):
                line["diff"] = 100 * d.mean - f["difference"]
        elif a and b:
            line["ours_text"] = f"{a} − {b}: not the same problems (or grader), no paired difference"
        else:
            line["ours_text"] = "— (no route of this run for " + (f["of"] if not a else f["minus"]) + ")"
        if not _figure_applies(f, names):
            line["paper_text"] += f", for {_for_models(f)}: not this run's models"
        if f.get("note"):
            notes.append(f"{row['id']}: {f['note']}")
        out.append(line)
    return out


def paper_markdown(plan: dict, rows: list[dict], table: dict | None) -> str:
    """The section of report.md beside the paper: the toy's plain line, or the table (empty for other data)."""
    kind = comparability(plan, rows)
    if kind == "toy":
        return TOY_NOTE + "."
    if kind is None or table is None:
        return ""
    fig = figures()
    src = fig["source"]
    labels = {k: v["label"] + (f" (paper: {v['paper_label']})" if v["paper_label"] != v["label"] else "")
              for k, v in fig["eval_sets"].items()}
    names = {w: _model_name(plan, w) or "unknown" for w in ("teacher", "student")}
    out = [f"Beside the paper (arXiv {src['arxiv']}): its figures are {src['metric']} as published (kept here "
           "without the paper's standard errors); ours are avg@k ± standard error across problems (this run: teacher "
           f"{names['teacher']}, student {names['student']}). Ours − paper is a plain subtraction, in points; "
           "— where the paper states no figure.", "",
           "| table | paper row | our route (split) | eval set | ours ± se | paper | ours − paper |",
           "|---|---|---|---|---|---|---|"]
    last = None
    for ln in table["lines"]:
        diff = f"{ln['diff']:+.1f}" if ln["diff"] is not None else "—"
        group = (ln["table"], ln["label"], ln["route"])
        head = " | ".join(group) if group != last else " |  | "  # a route's further lines: its cells left blank
        last = group
        out.append(f"| {head} | {labels[ln['source']]} | {ln['ours_text']} | {ln['paper_text']} | {diff} |")
    out.append("")
    out += [f"- {v['label']}: {v['note']}" for v in fig["eval_sets"].values() if v["note"]]
    out += [f"- {n}" for n in table["notes"]]
    if table["missing"]:
        out.append("- paper rows this run has no route for: " + "; ".join(table["missing"]))
    if table["other"]:
        out.append("- routes of this run on no paper row: " + ", ".join(table["other"]))
    out.append(f"- source: {src['title']}, {src['url']}; versions: "
               + "; ".join(f"{k} = {v}" for k, v in src["versions"].items()))
    return "\n".join(out)
