"""Project-wide error types: who is at fault decides the type, the exit code and the message.

* :class:`S2DError` — bad user input (config, data files, rows, arguments, a layout that does not fit). The message
  names the offending field, file or row and what to change. ``s2d`` and the stage jobs exit with code 2.
  It subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working.
* :class:`InternalError` — one of our own invariants broke (a routing mismatch between ranks, a loss field a stage
  forgot to set, a refit that left parameters unloaded, non-finite numbers where the inputs were valid). That is a
  bug in megatron-s2d (or in a library under it), not something the user can fix by editing the plan: the message
  states the invariant; the process exits with code 1 and a traceback.
"""


class S2DError(ValueError):
    """Bad input to megatron-s2d: the message names the field, file and/or row that is wrong and what to change."""


class InternalError(RuntimeError):
    """A broken invariant of megatron-s2d itself (a bug): the message states the invariant that broke."""
