"""Job entry for the final report task: ``python -m megatron_s2d.pipeline.report_entry --run-dir RUN``."""

from megatron_s2d.pipeline.report import main

if __name__ == "__main__":
    raise SystemExit(main())
