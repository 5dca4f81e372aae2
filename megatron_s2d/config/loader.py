"""YAML -> typed config, with recipe inheritance and dotted ``key=value`` overrides.

* ``base: other.yaml`` in a recipe loads that file first and deep-merges this one on top (recipes are small diffs).
* ``stage_defaults: {...}`` is deep-merged under every entry of ``stages`` (so a plan states shared knobs once); a
  key applies to the stages whose kind has it (``grpo`` to GRPO stages, ``warmup`` to the forward-KL warmup, ...),
  and a key no stage kind has is an error.
* ``stages`` is a tagged union on ``kind``: each entry becomes the config class of its kind (``config.kinds``).
* Overrides: ``stages.opd.steps=2`` (a stage is addressed by name), ``models.teacher.tp=8``, ``eval.k=4``.
  Values are parsed as YAML scalars (``1e-5``, ``true``, ``null``, ``[a, b]``).
Unknown keys and wrongly-typed values are errors that name the dotted path and the file; an unknown key (or stage,
or kind) names the closest known one ("did you mean ...?").
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_s2d.config.schema import PlanConfig
from megatron_s2d.errors import S2DError


def _did_you_mean(keys, known) -> str:
    """`` (did you mean 'lr'?)`` for one unknown key, `` (did you mean 'lr' for 'lrr', 'tp' for 'tpp'?)`` for
    several: the closest known name of each that has one close enough (difflib's ratio >= 0.6); else ''."""
    guesses = [(k, difflib.get_close_matches(str(k), sorted(map(str, known)), n=1)) for k in keys]
    guesses = [(k, g[0]) for k, g in guesses if g]
    if not guesses:
        return ""
    if len(keys) == 1:
        return f" (did you mean {guesses[0][1]!r}?)"
    return " (did you mean " + ", ".join(f"{g!r} for {k!r}" for k, g in guesses) + "?)"


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise S2DError(f"{path}: recipe 'base' chain forms a cycle: {' -> '.join(map(str, seen + (path,)))}")
    if not path.is_file():
        raise S2DError(f"{path}: plan file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise S2DError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise S2DError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base:
        data = _deep_merge(_read_yaml(path.parent / base, seen + (path,)), data)
    return data


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except S2DError as e:
                errors.append(str(e))
        raise S2DError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {args}")
    if origin is Literal:
        if value not in args:
            raise S2DError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise S2DError(f"{where}: expected a list, got {type(value).__name__}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise S2DError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise S2DError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise S2DError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise S2DError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise S2DError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise S2DError(f"{where}: unsupported config type {tp}")


def from_dict(cls, data: Any, where: str = ""):
    """Build dataclass ``cls`` from a plain dict, refusing unknown keys and wrong types (errors name the path)."""
    if not isinstance(data, dict):
        raise S2DError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    from megatron_s2d.config.schema import RENAMED

    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for old, new in RENAMED.get(cls, {}).items():
        if old in data:
            raise S2DError(f"{f'{where}.' if where else ''}{old} was renamed: write {new}")
    unknown = sorted(set(data) - names)
    if unknown:
        raise S2DError(f"{where or cls.__name__}: unknown key(s) {unknown}{_did_you_mean(unknown, names)}; "
                       f"allowed: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise S2DError(f"override {text!r}: expected key=value (e.g. stages.opd.steps=2)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise S2DError(f"override {text!r}: cannot parse value: {e}") from e
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to the raw dict (before typing), addressing stages by name."""
    data = _deep_merge({}, data)
    for text in overrides:
        keys, value = _parse_override(text)
        node: Any = data
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):  # stages.<name>
                match = [s for s in node if isinstance(s, dict) and s.get("name") == k]
                if not match:
                    names = [s.get("name") for s in node if isinstance(s, dict)]
                    raise S2DError(f"override {text!r}: no stage named {k!r}{_did_you_mean([k], names)}; "
                                   f"stages: {names}")
                node = match[0]
                continue
            if k not in node or node[k] is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, (dict, list)):
                raise S2DError(f"override {text!r}: {'.'.join(keys[: i + 1])} is not a mapping")
        node[keys[-1]] = value
    return data


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _build_stages(raw_stages: Any, defaults: Any) -> list:
    """The ``stages`` list as typed configs, each of its kind's class, with ``stage_defaults`` merged in."""
    from megatron_s2d.config.kinds import KINDS

    if not isinstance(raw_stages, list):
        raise S2DError("'stages' must be a list of stage mappings")
    if not isinstance(defaults, dict):
        raise S2DError("'stage_defaults' must be a mapping")
    from megatron_s2d.config.schema import RENAMED

    known = set().union(*(_fields(k) for k in set(KINDS.values())))
    renamed = set().union(*(RENAMED.get(k, {}) for k in set(KINDS.values())))
    stray = sorted(set(defaults) - known - renamed)
    if stray:
        raise S2DError(f"stage_defaults: key(s) {stray}{_did_you_mean(stray, known)} belong to no stage kind; "
                       f"allowed: {sorted(known)}")

    def applies(key: str, cls) -> bool:  # a real field of this kind, or an old key no kind has (its message)
        return key in _fields(cls) or (key not in known and key in RENAMED.get(cls, {}))

    out = []
    for i, raw in enumerate(raw_stages):
        where = f"stages[{i}]"
        if not isinstance(raw, dict):
            raise S2DError(f"{where}: expected a mapping, got {type(raw).__name__}")
        where = f"stages.{raw.get('name') or i}"
        kind = raw.get("kind")
        if kind not in KINDS:
            hint = _did_you_mean([kind], KINDS) if isinstance(kind, str) else ""
            raise S2DError(f"{where}.kind = {kind!r}{hint}: expected one of {sorted(KINDS)}")
        cls = KINDS[kind]
        mine = {k: v for k, v in defaults.items() if applies(k, cls)}
        out.append(from_dict(cls, _deep_merge(mine, raw), where))
    return out


def plan_dict(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The plan file as a plain dict, ``base`` recipes merged and overrides applied (neither typed nor validated)."""
    return apply_overrides(_read_yaml(Path(path)), overrides or [])


def load_plan(path: str | Path, overrides: list[str] | None = None) -> PlanConfig:
    """Read a plan YAML (with ``base`` inheritance), apply overrides, type-check, and validate it."""
    from megatron_s2d.config.validate import validate_plan

    path = Path(path)
    data = plan_dict(path, overrides)
    try:
        stages = _build_stages(data.pop("stages", None) or [], data.pop("stage_defaults", None) or {})
        plan = from_dict(PlanConfig, data)
    except S2DError as e:
        raise S2DError(f"{path}: {e}") from e
    plan.stages = stages
    validate_plan(plan, where=str(path))
    return plan


def plan_from_dict(data: dict) -> PlanConfig:
    """A plan from an already-resolved dict (``to_dict`` of a plan; e.g. ``plan.resolved.yaml``), validated."""
    from megatron_s2d.config.validate import validate_plan

    data = dict(data)
    stages = _build_stages(data.pop("stages", None) or [], data.pop("stage_defaults", None) or {})
    plan = from_dict(PlanConfig, data)
    plan.stages = stages
    validate_plan(plan)
    return plan


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
