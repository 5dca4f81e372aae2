"""A run folder: preparing it before the first job (plan resolution, toy world, base-model import, splits), and the
report computed from it afterwards."""
