"""Load math problems from the Hugging Face hub or from local files into `Problem`s: `load_problems`.

    res = load_problems("math500")                       # hub (needs network / HF cache)
    res = load_problems("data/dapo.parquet", limit=1000)  # local file, schema auto-detected from its columns
    print(res.summary()); train = res.problems

Hub datasets (ids and columns checked against the dataset cards / public loading code, Nov 2026):
- dapo-math-17k: BytedTsinghua-SIA/DAPO-Math-17k, split train, schema dapo. Card: prompt (list of role/content),
  reward_model {ground_truth, style}, extra_info {index}, data_source, ability. The hub page lists 1M-10M rows
  for ~17.4k distinct problems (each repeated): `splits.py` de-duplicates by content; use `limit` to cap loading.
- math: EleutherAI/hendrycks_math, split test, schema math. One config per subject (7); columns
  problem/level/type/solution; the full test set is 5,000 problems.
- math500: HuggingFaceH4/MATH-500, split test, schema math500. problem/solution/answer/subject/level(int)/unique_id.
- aime2024: HuggingFaceH4/aime_2024, split train, schema aime. id(int)/problem/solution/answer/url/year, 30 rows.
- aime2025: yentinglin/aime_2025, split train, schema aime. Loaded as (id, "train") by public eval code; its card
  was not seen: problem/answer assumed, id optional (row number otherwise).
- aime2025-mathai: math-ai/aime25, split test, schema aime. Public code reads problem/answer from "test".

Local files: .jsonl (one JSON object per line; row numbers are line numbers, blank lines skipped), .json (a list
of objects), .parquet (read with pyarrow, nested columns become dicts/lists), or a directory of such files. The
schema is detected from the columns (`schemas.detect_schema`) or given with `schema=`.

Malformed rows (missing/empty prompt or answer, wrong types, invalid JSON) are never dropped silently: each becomes
a `RowError(file, row, reason)` in `LoadResult.skipped`; with `strict=True` the first one raises S2DError.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_s2d.data.schemas import CONVERTERS, RowProblem, convert_row, detect_schema
from megatron_s2d.data.types import LoadResult, RowError
from megatron_s2d.errors import S2DError

MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class HubSource:
    name: str
    hub_id: str
    schema: str
    default_split: str
    configs: tuple[str | None, ...] = (None,)


HUB_SOURCES: dict[str, HubSource] = {
    s.name: s
    for s in (
        HubSource("dapo-math-17k", "BytedTsinghua-SIA/DAPO-Math-17k", "dapo", "train"),
        HubSource("math", "EleutherAI/hendrycks_math", "math", "test", MATH_SUBJECTS),
        HubSource("math500", "HuggingFaceH4/MATH-500", "math500", "test"),
        HubSource("aime2024", "HuggingFaceH4/aime_2024", "aime", "train"),
        HubSource("aime2025", "yentinglin/aime_2025", "aime", "train"),
        HubSource("aime2025-mathai", "math-ai/aime25", "aime", "test"),
    )
}
ALIASES = {"dapo": "dapo-math-17k", "math-500": "math500", "aime24": "aime2024", "aime25": "aime2025"}


class _Collector:
    """Turns (row_no, row) pairs into problems / RowErrors, honouring strict and limit."""

    def __init__(self, result: LoadResult, schema: str, strict: bool, limit: int | None) -> None:
        self.result, self.schema, self.strict, self.limit = result, schema, strict, limit

    @property
    def full(self) -> bool:
        return self.limit is not None and self.result.n_loaded >= self.limit

    def skip(self, where: str, row_no: int, reason: str) -> None:
        err = RowError(where, row_no, reason)
        if self.strict:
            raise S2DError(f"{err} (strict=True; fix the row or load with strict=False to skip it)")
        self.result.skipped.append(err)

    def add(self, where: str, row_no: int, row: object) -> None:
        try:
            self.result.problems.append(convert_row(self.schema, row, row_no, self.result.source))
        except RowProblem as e:
            self.skip(where, row_no, str(e))


def _read_jsonl(path: Path) -> Iterator[tuple[int, object | RowProblem]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, RowProblem(f"invalid JSON: {e.msg} at column {e.colno}")


def _read_json(path: Path) -> Iterator[tuple[int, object | RowProblem]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise S2DError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise S2DError(f"{path}: a .json file must hold a list of row objects, got {type(data).__name__}")
    yield from enumerate(data, start=1)


def _read_parquet(path: Path) -> Iterator[tuple[int, object | RowProblem]]:
    import pyarrow.parquet as pq  # installed with `datasets`

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet files
        raise S2DError(f"{path}: not a readable parquet file: {e}") from e
    row_no = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def _file_columns(path: Path, rows: list[tuple[int, object]]) -> set[str]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return set(pq.read_schema(path).names)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet files
            raise S2DError(f"{path}: not a readable parquet file: {e}") from e
    cols: set[str] = set()
    for _, row in rows:
        if isinstance(row, dict):
            cols.update(row)
    return cols


def _load_file(path: Path, result: LoadResult, schema: str | None, strict: bool, limit: int | None) -> None:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise S2DError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(FILE_SUFFIXES)}")
    where = str(path)
    if path.suffix.lower() == ".parquet":
        rows_iter, cols = reader(path), _file_columns(path, [])
    else:  # json/jsonl: read fully (these are small) so columns are known before converting
        rows = list(reader(path))
        rows_iter, cols = iter(rows), _file_columns(path, rows)
    file_schema = schema or result.schema or detect_schema(cols, where)
    if result.schema and file_schema != result.schema:
        raise S2DError(f"{where}: schema '{file_schema}' differs from '{result.schema}' of the other files")
    result.schema = file_schema
    result.files.append(where)
    collector = _Collector(result, file_schema, strict, limit)
    for row_no, row in rows_iter:
        if collector.full:
            break
        if isinstance(row, RowProblem):
            collector.skip(where, row_no, str(row))
        else:
            collector.add(where, row_no, row)


def load_file_problems(
    path: str | Path, *, schema: str | None = None, source: str | None = None, strict: bool = False,
    limit: int | None = None,
) -> LoadResult:
    """Load a local file or a directory of .jsonl/.json/.parquet files (sorted by name)."""
    path = Path(path)
    if schema is not None and schema not in CONVERTERS:
        raise S2DError(f"unknown schema '{schema}'; known: {', '.join(CONVERTERS)}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise S2DError(f"{path}: directory holds no {'/'.join(FILE_SUFFIXES)} files")
    elif path.is_file():
        files = [path]
    else:
        raise S2DError(f"{path}: no such file or directory")
    result = LoadResult(source=source or path.stem, schema=schema or "")
    for f in files:
        if limit is not None and result.n_loaded >= limit:
            break
        _load_file(f, result, schema, strict, limit)
    return result


def load_hub_problems(
    name: str, split: str | None = None, *, strict: bool = False, limit: int | None = None
) -> LoadResult:
    """Load a registered hub dataset through `datasets.load_dataset` (network or a populated HF cache)."""
    import datasets  # imported here: heavy, and only needed for hub loading

    src = HUB_SOURCES[ALIASES.get(name, name)]
    split = split or src.default_split
    result = LoadResult(source=src.name, schema=src.schema)
    collector = _Collector(result, src.schema, strict, limit)
    for config in src.configs:
        ds = datasets.load_dataset(src.hub_id, config, split=split)
        where = f"hf://{src.hub_id}" + (f"/{config}" if config else "") + f"[{split}]"
        result.files.append(where)
        for row_no, row in enumerate(ds, start=1):
            if collector.full:
                return result
            collector.add(where, row_no, dict(row, _config=config) if config else row)
    return result


def load_problems(
    name_or_path: str | Path, split: str | None = None, limit: int | None = None, *, schema: str | None = None,
    strict: bool = False, source: str | None = None,
) -> LoadResult:
    """Load problems by registered name (see the module table; aliases dapo, math-500, aime24, aime25) or path.

    split: hub split (default per dataset); not allowed for local paths. limit: stop after this many problems.
    schema: force a schema for local files. strict: raise S2DError on the first malformed row instead of
    recording it. source: the `Problem.source` for local files (default: the file name without suffix).
    """
    if limit is not None and limit < 0:
        raise S2DError(f"limit must be >= 0, got {limit}")
    key = str(name_or_path)
    if key in HUB_SOURCES or key in ALIASES:
        if schema is not None or source is not None:
            raise S2DError(f"'{key}' is a hub dataset: schema= and source= apply to local files only")
        return load_hub_problems(key, split, strict=strict, limit=limit)
    path = Path(key)
    if not path.exists():
        known = ", ".join(sorted([*HUB_SOURCES, *ALIASES]))
        raise S2DError(f"'{key}' is neither a registered dataset ({known}) nor an existing file or directory")
    if split is not None:
        raise S2DError(f"{path}: split= applies to hub datasets only; pass the file of the split you want")
    return load_file_problems(path, schema=schema, source=source, strict=strict, limit=limit)
