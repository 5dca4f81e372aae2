"""Plans end to end: run layout, data splits, preflight (toy world, base-model import, checks), report."""
