"""Project-wide error types: who is at fault decides the type, the exit code and the message.

* :class:`S2DError` — bad user input (config, data files, rows, arguments, a layout that does not fit). The message
  names the offending field, file or row and what to change. ``s2d`` and the stage jobs exit with code 2.
  It subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working.
* :class:`InternalError` — one of our own invariants broke (a routing mismatch between ranks, a loss field a stage
  forgot to set, a refit that left parameters unloaded, non-finite numbers where the inputs were valid). That is a
  bug in megatron-s2d (or in a library under it), not something the user can fix by editing the plan: the message
  states the invariant; the process exits with code 1 and a traceback.

:func:`read_json` / :func:`read_jsonl` read the run folder's JSON files (lineage, eval results, trainer state,
manifests, metrics): a damaged one is an S2DError naming the file, never a traceback that does not.
"""

import json
from pathlib import Path


class S2DError(ValueError):
    """Bad input to megatron-s2d: the message names the field, file and/or row that is wrong and what to change."""


class InternalError(RuntimeError):
    """A broken invariant of megatron-s2d itself (a bug): the message states the invariant that broke."""


def read_json(path, fix: str = "restore it, or remove it and re-run the step that writes it"):
    """The JSON value in file ``path`` (a run folder's lineage, eval results, trainer state, manifests, ...).

    A file that is not valid JSON (cut short by a full disk or a killed writer, or edited by hand) is an
    :class:`S2DError` naming the file, where it breaks, and ``fix``. OS errors (missing, unreadable) pass through as
    they are: they carry the path, and ``s2d`` names it."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise S2DError(f"{path}: damaged JSON ({e}): {fix}") from e
    except UnicodeDecodeError as e:
        raise S2DError(f"{path}: damaged JSON (not UTF-8 text at byte {e.start}): {fix}") from e


def read_jsonl(path, fix: str = "restore it, or remove it and re-run the step that writes it") -> list:
    """The JSON values of file ``path``, one a line (blank lines skipped); a damaged line is an :class:`S2DError`
    naming the file, the line and ``fix``."""
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise S2DError(f"{path}: damaged JSON at line {n} ({e.msg}: column {e.colno}): {fix}") from e
        except UnicodeDecodeError as e:
            raise S2DError(f"{path}: damaged JSON at line {n} (not UTF-8 text at byte {e.start}): {fix}") from e
    return out
