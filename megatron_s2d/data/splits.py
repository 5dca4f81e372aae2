"""Deterministic, content-keyed data splits with JSON manifests (lineage for the stage graph).

    halves = split_halves(problems, seed=0)            # the paper's 1H / 2H allocation
    a, b = halves                                      # Split objects: .problems, .manifest
    parts = split_fractions(problems, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=0)
    Path("1H.json").write_text(a.manifest.to_json())

How membership is decided: problems are first de-duplicated by `Problem.content_hash()` (sha256 of normalised
prompt + answer; of identical copies the one with the smallest id is kept, and the number removed is recorded).
Each unique problem gets the key sha256(f"{seed}:{content_hash}"); problems are sorted by key and cut into
consecutive blocks with the requested sizes (largest-remainder rounding; ties go to the earlier split name, so an
odd count gives the extra problem to the first half). Membership therefore depends only on the set of contents and
the seed, never on input order, and split sizes are exact. Members are returned in key order, a seeded shuffle.
Adding problems to the parent can move existing problems between splits (sizes are exact, not per-item buckets);
the manifest's parent_hash makes that visible.

A `SplitManifest` records name, content_hash (sha256 over the sorted member content hashes), count, per-source
counts, seed, fraction, parent_hash (the same hash over the whole de-duplicated parent) and the duplicates removed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from megatron_s2d.data.types import Problem
from megatron_s2d.errors import S2DError


def set_hash(content_hashes: Iterable[str]) -> str:
    """Order-independent hash of a set of content hashes."""
    return hashlib.sha256("\n".join(sorted(content_hashes)).encode("ascii")).hexdigest()


@dataclass(frozen=True)
class SplitManifest:
    name: str
    content_hash: str
    count: int
    sources: dict[str, int]
    seed: int
    fraction: float
    parent_hash: str
    parent_count: int
    duplicates_removed: int

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> SplitManifest:
        expected = set(cls.__dataclass_fields__)
        if set(d) != expected:
            raise S2DError(
                f"split manifest: fields {sorted(set(d) ^ expected)} missing or unexpected; expected {sorted(expected)}"
            )
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> SplitManifest:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class Split:
    """A named subset of problems and its manifest."""

    name: str
    problems: tuple[Problem, ...]
    manifest: SplitManifest

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self):
        return iter(self.problems)


@dataclass(frozen=True)
class Dedup:
    problems: tuple[Problem, ...]  # unique by content, sorted by content hash
    hashes: tuple[str, ...]
    duplicates_removed: int


def dedupe(problems: Iterable[Problem]) -> Dedup:
    """Unique problems by content hash; of duplicates the smallest id is kept, independent of input order."""
    best: dict[str, Problem] = {}
    n = 0
    for p in problems:
        if not isinstance(p, Problem):
            raise S2DError(f"splits: item {n} is a {type(p).__name__}, expected Problem")
        n += 1
        h = p.content_hash()
        if h not in best or p.id < best[h].id:
            best[h] = p
    hashes = tuple(sorted(best))
    return Dedup(tuple(best[h] for h in hashes), hashes, n - len(best))


def _block_sizes(n: int, fractions: dict[str, float]) -> dict[str, int]:
    exact = {name: f * n for name, f in fractions.items()}
    sizes = {name: math.floor(x) for name, x in exact.items()}
    order = sorted(fractions, key=lambda name: -(exact[name] - sizes[name]))  # stable: ties keep given order
    for name in order[: n - sum(sizes.values())]:
        sizes[name] += 1
    return sizes


def _validate_fractions(fractions: dict[str, float]) -> None:
    if not fractions:
        raise S2DError("split_fractions: no splits given")
    for name, f in fractions.items():
        if not isinstance(name, str) or not name:
            raise S2DError(f"split_fractions: split names must be non-empty strings, got {name!r}")
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise S2DError(f"split_fractions: fraction of '{name}' must be in (0, 1], got {f!r}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise S2DError(f"split_fractions: fractions must sum to 1, got {total:.6g} ({fractions})")


def split_fractions(problems: Iterable[Problem], fractions: dict[str, float], seed: int = 0) -> dict[str, Split]:
    """Partition the de-duplicated problems into named splits of the given fractions (see module docstring)."""
    _validate_fractions(fractions)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise S2DError(f"split seed must be an int, got {seed!r}")
    d = dedupe(problems)
    parent_hash = set_hash(d.hashes)
    keyed = sorted(
        zip(d.hashes, d.problems), key=lambda hp: hashlib.sha256(f"{seed}:{hp[0]}".encode("ascii")).hexdigest()
    )
    sizes = _block_sizes(len(keyed), fractions)
    out: dict[str, Split] = {}
    start = 0
    for name, frac in fractions.items():
        block = keyed[start : start + sizes[name]]
        start += sizes[name]
        members = tuple(p for _, p in block)
        manifest = SplitManifest(
            name=name,
            content_hash=set_hash(h for h, _ in block),
            count=len(members),
            sources=dict(sorted(Counter(p.source for p in members).items())),
            seed=seed,
            fraction=float(frac),
            parent_hash=parent_hash,
            parent_count=len(keyed),
            duplicates_removed=d.duplicates_removed,
        )
        out[name] = Split(name, members, manifest)
    return out


def split_halves(
    problems: Iterable[Problem], seed: int = 0, names: Sequence[str] = ("1H", "2H")
) -> tuple[Split, Split]:
    """The paper's 1H/2H allocation: two disjoint halves (the first gets the extra problem when the count is odd)."""
    if len(names) != 2 or names[0] == names[1]:
        raise S2DError(f"split_halves: need two distinct names, got {tuple(names)}")
    parts = split_fractions(problems, {names[0]: 0.5, names[1]: 0.5}, seed)
    return parts[names[0]], parts[names[1]]


def verify_split(split: Split) -> None:
    """Check that a split's members still match its manifest (content hash and count); S2DError otherwise."""
    actual = set_hash(p.content_hash() for p in split.problems)
    if actual != split.manifest.content_hash or len(split.problems) != split.manifest.count:
        raise S2DError(
            f"split '{split.name}': members do not match the manifest (hash {actual[:12]} vs "
            f"{split.manifest.content_hash[:12]}, count {len(split.problems)} vs {split.manifest.count})"
        )
