"""Data: problem type, dataset loaders (hub + local files), content-keyed splits, prompt building."""

from megatron_s2d.data.prompts import DEFAULT_INSTRUCTION, build_prompt, build_prompts
from megatron_s2d.data.sources import HUB_SOURCES, load_file_problems, load_hub_problems, load_problems
from megatron_s2d.data.splits import Split, SplitManifest, dedupe, split_fractions, split_halves, verify_split
from megatron_s2d.data.types import LoadResult, Problem, RowError

__all__ = [
    "DEFAULT_INSTRUCTION",
    "HUB_SOURCES",
    "LoadResult",
    "Problem",
    "RowError",
    "Split",
    "SplitManifest",
    "build_prompt",
    "build_prompts",
    "dedupe",
    "load_file_problems",
    "load_hub_problems",
    "load_problems",
    "split_fractions",
    "split_halves",
    "verify_split",
]
