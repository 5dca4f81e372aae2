"""The packages form one-way layers: a package imports only packages below it (function-level imports included),
so there is no package cycle. The order is the README's layout section; a new import that points up fails here,
naming the file, the line and the two packages."""

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
    "rollout",         # engines, refit, mismatch
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


def test_parallel_state_is_read_only_inside_runtime_policy_and_checkpoint():
    """megatron-core's parallel_state globals are the job layout's; reading them is the business of the layers that
    own process groups, not of stages, eval or launch (they get ranks and groups from ``runtime.dist``)."""
    allowed = {"runtime", "policy", "checkpoint", "models", "rollout"}
    bad = [f"{rel}:{line}" for path, rel, pkg in _files() for line, module in _imports(path)
           if module.startswith("megatron.core") and "parallel_state" in module and pkg not in allowed]
    bad += [f"{rel}" for path, rel, pkg in _files() if pkg not in allowed and pkg is not None
            and "parallel_state" in path.read_text()]
    assert not bad, f"parallel_state read outside {sorted(allowed)}: {bad}"
