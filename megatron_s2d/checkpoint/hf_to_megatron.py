"""HF safetensors (Llama-3.x / Qwen3) -> megatron-s2d model checkpoint folder, streaming.

    s2d convert hf-to-megatron --hf DIR --out DIR --tp N --pp M [--dtype bf16|fp32] [--overwrite]

Every check runs before anything is written (architecture, TP/PP divisibility, missing / extra tensors, shapes,
dtypes, output folder); then the dist checkpoint is written chunk by chunk, each chunk read from the safetensors
on demand (see ``dcp_io``), so memory stays at about one tensor whatever the model size. Output goes to a hidden
temp sibling renamed into place at the end. The dist checkpoint is stored in TP=1/PP=1 chunks; megatron reshards
it on load, so ``--tp/--pp`` are validated against the architecture and recorded as the intended layout.
No process group is needed: this runs in a plain process.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_s2d.checkpoint.dcp_io import write_dist_checkpoint
from megatron_s2d.checkpoint.hf_io import HFWeights, copy_files, sort_hf_files
from megatron_s2d.models.state_dict import chunk_from_hf, embedding_map, hf_shapes, tensor_maps
from megatron_s2d.errors import S2DError
from megatron_s2d.models.arch import ArchSpec, check_layout, load_arch
from megatron_s2d.checkpoint import model_ckpt

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers some older HF saves contain


@dataclass
class ConversionReport:
    out_dir: Path
    num_tensors: int
    bytes_written: int  # tensor bytes written (excluding headers / metadata)
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / 1e9 / max(self.seconds, 1e-9)


@dataclass
class _Plan:
    hf_dir: Path
    out_dir: Path
    arch: ArchSpec
    weights: HFWeights
    dtype: str
    tp: int
    pp: int
    notes: list[str]


def _fmt(names: list[str], limit: int = 12) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_tensors(arch: ArchSpec, weights: HFWeights, where: Path) -> list[str]:
    """Refuse missing / extra tensors and wrong shapes, naming them; returns notes about tolerated tensors."""
    expected = hf_shapes(arch)
    present = weights.tensors
    notes = []
    ignored = [n for n in present if n.endswith(_IGNORED_SUFFIXES)]
    if arch.tie_word_embeddings and "lm_head.weight" in present:
        # some tied checkpoints store the (identical) lm_head anyway: allow it only if it really is the embedding
        emb = embedding_map(arch).hf_names[0]
        if emb in present and torch.equal(weights.read("lm_head.weight"), weights.read(emb)):
            ignored.append("lm_head.weight")
            notes.append("ignored lm_head.weight: identical to the tied embedding")
        else:
            raise S2DError(f"{where}: tie_word_embeddings is true but 'lm_head.weight' is present and differs from "
                           f"'{emb}'")
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected) - set(ignored))
    if missing:
        raise S2DError(f"{where}: missing tensors: {_fmt(missing)}")
    if extra:
        raise S2DError(f"{where}: unexpected tensors (not part of a {arch.model_type} model with this config): "
                       f"{_fmt(extra)}")
    bad = [f"'{n}': expected {tuple(s)}, got {present[n].shape}" for n, s in expected.items()
           if tuple(present[n].shape) != tuple(s)]
    if bad:
        raise S2DError(f"{where}: tensor shape mismatch: {'; '.join(bad[:12])}")
    non_float = [n for n in expected if not present[n].dtype.is_floating_point]
    if non_float:
        raise S2DError(f"{where}: tensors with a non-floating dtype: {_fmt(non_float)}")
    if ignored:
        notes.append(f"ignored {len(ignored)} tensor(s): {_fmt(sorted(ignored), 4)}")
    return notes


def plan_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1, dtype: str | None = None,
                        overwrite: bool = False) -> _Plan:
    """All validation of an hf -> megatron conversion; writes nothing. Raises S2DError naming what is wrong."""
    hf = Path(hf_dir)
    if not hf.is_dir():
        raise S2DError(f"--hf {hf}: no such folder")
    arch = load_arch(hf)
    check_layout(arch, tp, pp, where=f"--tp {tp} --pp {pp}")
    if dtype is not None and dtype not in _TORCH_DTYPES:
        raise S2DError(f"--dtype {dtype!r}: expected one of {', '.join(_TORCH_DTYPES)}")
    weights = HFWeights(hf)
    notes = _check_tensors(arch, weights, hf)
    if dtype is None:  # keep bf16 checkpoints bf16; anything else (fp32, fp16) goes to fp32 without loss
        dtypes = {weights.tensors[n].dtype for n in hf_shapes(arch)}
        dtype = "bf16" if dtypes == {torch.bfloat16} else "fp32"
    out = model_ckpt.check_output_dir(out_dir, overwrite, inputs=(hf,))
    return _Plan(hf, out, arch, weights, dtype, tp, pp, notes)


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1,
                           dtype: str | None = None, overwrite: bool = False) -> ConversionReport:
    """Convert an HF model folder to a megatron-s2d model checkpoint folder (see module docstring)."""
    plan = plan_hf_to_megatron(hf_dir, out_dir, tp, pp, dtype, overwrite)
    start = time.perf_counter()
    maps = tensor_maps(plan.arch)
    tmp = model_ckpt.temp_sibling(plan.out_dir)
    try:
        tmp.mkdir(parents=True)
        nbytes = write_dist_checkpoint(
            tmp / model_ckpt.WEIGHTS_DIR, maps, plan.arch.num_layers, _TORCH_DTYPES[plan.dtype],
            lambda m, chunk: chunk_from_hf(m, plan.arch, chunk, plan.weights.read))
        tok, extra = sort_hf_files(plan.hf_dir)
        copy_files(tok, tmp / model_ckpt.TOKENIZER_DIR)
        copy_files(extra, tmp / model_ckpt.HF_EXTRA_DIR)
        source = {"kind": "hf", "path": str(plan.hf_dir.resolve()), "model_type": plan.arch.model_type,
                  "files": [p.name for p in plan.weights.files], "storage_layout": {"tp": 1, "pp": 1}}
        model_ckpt.write_model_meta(tmp, plan.arch, plan.dtype, {"tp": plan.tp, "pp": plan.pp}, source)
        model_ckpt.publish_dir(tmp, plan.out_dir, overwrite, inputs=(plan.hf_dir,))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(len(m.hf_names) for m in maps)
    return ConversionReport(plan.out_dir, n, nbytes, time.perf_counter() - start, plan.notes)

