"""The packages form one-way layers: a package imports only packages below it (function-level imports included),
so there is no package cycle. The order is the README's layout section; a new import that points up fails here,
naming the file, the line and the two packages. Within a package, files import each other without cycles either
(``launch/__init__.py`` -> ``launch/experiment.py`` -> ``launch/__init__.py`` was one the package test cannot see)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# bottom to top; a package may import itself and anything earlier in this list
LAYERS = [
    "errors",          # S2DError / InternalError
    "config",          # the typed plan, stage kinds, validation
    "models",          # HF config -> megatron-core GPTModel; state-dict adapters, HF config writers
    "checkpoint",      # model / training checkpoints, HF + dist-checkpoint streaming I/O, conversions, assets
    "runtime",         # distributed init, process groups, exchange, routing, preemption, CPU shim
    "losses",          # pure loss functions
    "policy",          # Policy / Scorer on megatron-core (process groups stay here)
    "rollout",         # engines, refit, the teacher-sample cache
    "rewards",         # math-verify worker pool
    "data",            # sources, splits, prompts
    "toy",             # the embedded toy world
    "eval",            # avg@k, the evaluator
    "stages",          # stage parts and loops, the job entry
    "run",             # a run folder: preflight, report
    "checkpoints_convert",  # the convert CLI and verify
    "launch",          # checks, NeMo-Run launch, the s2d CLI
]


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "checkpoints_convert":
        return "checkpoints_convert"
    if parts[0] != "megatron_s2d" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "megatron_s2d":
                for alias in node.names:
                    yield node.lineno, f"megatron_s2d.{alias.name}"
            else:
                yield node.lineno, node.module


def _files():
    for path in sorted((ROOT / "megatron_s2d").rglob("*.py")) + sorted((ROOT / "checkpoints_convert").rglob("*.py")):
        rel = path.relative_to(ROOT)
        pkg = "checkpoints_convert" if rel.parts[0] == "checkpoints_convert" else (
            rel.parts[1].removesuffix(".py") if len(rel.parts) > 1 else None)
        yield path, rel, pkg


def test_every_package_is_in_a_layer():
    pkgs = {pkg for _, _, pkg in _files() if pkg not in (None, "__init__")}
    assert pkgs <= set(LAYERS), f"packages without a layer: {sorted(pkgs - set(LAYERS))}"


def test_imports_point_down_only():
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for path, rel, pkg in _files():
        if pkg not in rank:
            continue
        for line, module in _imports(path):
            target = _package(module)
            if target is None or target == pkg:
                continue
            if target not in rank:
                bad.append(f"{rel}:{line} imports {module} (package {target!r} has no layer)")
            elif rank[target] > rank[pkg]:
                bad.append(f"{rel}:{line}: {pkg} imports {module} ({target} is above {pkg})")
    assert not bad, "upward imports:\n  " + "\n  ".join(bad)


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports(path: Path, modules: set[str]) -> set[str]:
    """Our modules a file imports (function-level included): ``import a.b`` and ``from a.b import x`` import the
    module a.b; ``from a import b`` imports the package ``a`` (its ``__init__`` runs and hands over ``b``) and, when
    ``b`` is a file of it, the module a.b. The parent packages every import runs implicitly are left out: they would
    make every package that re-exports its files a cycle."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} & modules
            out |= {f"{node.module}.{a.name}" for a in node.names} & modules
    return out


def module_cycles(files) -> list[list[str]]:
    """Every cycle of imports between the files of one package (strongly connected components of two or more
    files, each shown as one closed path), from ``(path, rel, package)`` triples."""
    files = [(path, _module_name(rel), pkg) for path, rel, pkg in files]
    names = {name for _, name, _ in files}
    package = {name: pkg for _, name, pkg in files}
    graph = {name: sorted(m for m in _module_imports(path, names) if m != name and package[m] == pkg)
             for path, name, pkg in files}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = {stack.pop()}
            while v not in comp:
                comp.add(stack.pop())
            if len(comp) > 1:
                cycles.append(_closed_path(graph, comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _closed_path(graph: dict[str, list[str]], comp: set[str]) -> list[str]:
    """One cycle through the first module of a strongly connected component (breadth-first back to it)."""
    start = min(comp)
    came = {w: start for w in graph[start] if w in comp}
    queue = list(came)
    while start not in came:
        v = queue.pop(0)
        for w in graph[v]:
            if w in comp and w not in came:
                came[w] = v
                queue.append(w)
    path, v = [start], came[start]
    while v != start:
        path.append(v)
        v = came[v]
    return [start] + path[:0:-1] + [start]


def test_no_import_cycles_between_the_files_of_a_package():
    cycles = module_cycles(_files())
    assert not cycles, "module cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_module_cycle_check_finds_a_cycle(tmp_path):
    """The check itself: a package whose ``__init__`` imports a file that imports the package back is a cycle; a
    file importing a sibling file (its parent ``__init__`` runs implicitly) is not."""
    pkg = tmp_path / "megatron_s2d" / "p"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from megatron_s2d.p.a import f\n")
    (pkg / "a.py").write_text("from megatron_s2d.p.b import g\n\ndef f():\n    from megatron_s2d.p import c\n")
    (pkg / "b.py").write_text("g = 1\n")
    (pkg / "c.py").write_text("")
    files = [(path, path.relative_to(tmp_path), "p") for path in sorted(pkg.glob("*.py"))]
    assert module_cycles(files) == [["megatron_s2d.p", "megatron_s2d.p.a", "megatron_s2d.p"]]
    (pkg / "a.py").write_text("from megatron_s2d.p.b import g\n\ndef f():\n    import megatron_s2d.p.c\n")
    assert module_cycles(files) == []


def test_parallel_state_is_read_only_inside_runtime_policy_and_checkpoint():
    """megatron-core's parallel_state globals are the job layout's; reading them is the business of the layers that
    own process groups, not of stages, eval or launch (they get ranks and groups from ``runtime.dist``)."""
    allowed = {"runtime", "policy", "checkpoint", "models", "rollout"}
    bad = [f"{rel}:{line}" for path, rel, pkg in _files() for line, module in _imports(path)
           if module.startswith("megatron.core") and "parallel_state" in module and pkg not in allowed]
    bad += [f"{rel}" for path, rel, pkg in _files() if pkg not in allowed and pkg is not None
            and "parallel_state" in path.read_text()]
    assert not bad, f"parallel_state read outside {sorted(allowed)}: {bad}"


# The stage loops read like the paper's pseudo-code: process groups, collectives and the split world stay below
# them (the job, the engines, the policy). A loop is a file of ``stages/`` registered in ``stages.entry.loop_of``.
LOOP_FILES = ("grpo.py", "opd.py", "fkl_warmup.py", "teacher_sft.py")
PROCESS_GROUP_MODULES = ("torch.distributed", "megatron.core.parallel_state", "megatron_s2d.runtime")


def test_no_stage_loop_imports_process_groups():
    from megatron_s2d.config import KINDS
    from megatron_s2d.stages.entry import loop_of

    loops = {Path(loop_of(cls(name="s", kind=kind)).__code__.co_filename).name for kind, cls in KINDS.items()}
    assert loops == set(LOOP_FILES)
    root = Path(__file__).resolve().parents[2] / "megatron_s2d" / "stages"
    bad = []
    for name in LOOP_FILES:
        text = (root / name).read_text()
        bad += [f"stages/{name}:{line} imports {module}" for line, module in _imports(root / name)
                if module.startswith(PROCESS_GROUP_MODULES)]
        bad += [f"stages/{name} uses torch.distributed" for _ in [1] if "torch.distributed" in text]
    assert not bad, "stage loops touching process groups:\n  " + "\n  ".join(bad)
