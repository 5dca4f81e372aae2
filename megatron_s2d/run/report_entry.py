"""Job entry for the final report task: ``python -m megatron_s2d.run.report_entry --run-dir RUN``."""

from megatron_s2d.run.report import main

if __name__ == "__main__":
    raise SystemExit(main())
