"""Stage loops (one short loop per stage of the paper) and the job entry point."""
