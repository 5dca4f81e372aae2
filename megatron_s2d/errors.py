"""Project-wide error type.

`S2DError` is raised for bad user input (config, data files, rows, arguments). It subclasses `ValueError` so
callers that already catch `ValueError` keep working; messages name the offending field, file or row.
"""


class S2DError(ValueError):
    """Bad input to megatron-s2d: the message names the field, file and/or row that is wrong and what to change."""
