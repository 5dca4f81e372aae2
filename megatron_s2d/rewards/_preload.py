"""Imported once by the forkserver (never by the trainer process): loads math-verify and warms it up so that every
forked reward worker starts warm. See `pool.py`."""

from megatron_s2d.rewards._worker import warm_up

warm_up()
