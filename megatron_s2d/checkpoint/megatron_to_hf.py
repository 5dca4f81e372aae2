"""megatron-s2d model checkpoint folder -> HF folder (sharded safetensors), streaming one layer at a time.

    s2d convert megatron-to-hf --megatron DIR --out DIR [--hf-reference DIR] [--dtype bf16|fp32]
        [--shard-size 5GB] [--overwrite]

Reads the dist checkpoint (written at any TP/PP, by the converter or by training) one layer at a time at the TP=1
shape and appends each HF tensor to the current safetensors shard as it is produced, so memory is about one layer
whatever the model size. The output is what ``transformers`` and vLLM load: ``model-*-of-*.safetensors`` +
``model.safetensors.index.json``, ``config.json``, ``generation_config.json`` and the tokenizer files.

config.json: from ``--hf-reference`` if given, else the one carried in ``hf_extra/``, else regenerated from the
ArchSpec (llama.py / qwen3.py); a given config is checked against the checkpoint's architecture and only its dtype
is updated. Output goes to a hidden temp sibling renamed into place at the end. No process group is needed.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
import torch

from megatron_s2d.models import llama, qwen3
from megatron_s2d.checkpoint.dcp_io import DistCheckpointReader
from megatron_s2d.checkpoint.hf_io import ShardedSafetensorsWriter, copy_files, parse_size, sort_hf_files
from megatron_s2d.checkpoint.hf_to_megatron import ConversionReport
from megatron_s2d.models.state_dict import arch_diff, embedding_map, final_maps, layer_maps, tensor_maps, to_hf
from megatron_s2d.errors import S2DError
from megatron_s2d.models.arch import ArchSpec, arch_from_hf_config
from megatron_s2d.checkpoint import model_ckpt

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_FAMILIES = {"llama": llama, "qwen3": qwen3}


def resolve_config(arch: ArchSpec, dtype: str, ckpt_dir: Path, hf_reference: Path | None) -> tuple[dict, str]:
    """(config.json dict, where it came from); a given config must describe exactly the checkpoint's arch."""
    candidates = []
    if hf_reference is not None:
        candidates.append(hf_reference / "config.json")
        if not candidates[0].is_file():
            raise S2DError(f"--hf-reference {hf_reference}: no config.json")
    candidates.append(ckpt_dir / model_ckpt.HF_EXTRA_DIR / "config.json")
    for path in candidates:
        if not path.is_file():
            continue
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise S2DError(f"{path}: not valid JSON ({e})") from e
        diff = arch_diff(arch_from_hf_config(cfg, where=str(path)), arch)
        if diff:
            raise S2DError(f"{path} does not describe the checkpoint's architecture ({'; '.join(diff)})")
        cfg = dict(cfg)
        name = llama.DTYPE_NAMES[dtype]
        if "dtype" in cfg or "torch_dtype" not in cfg:
            cfg["dtype"] = name
        if "torch_dtype" in cfg or "dtype" not in cfg:
            cfg["torch_dtype"] = name
        return cfg, str(path)
    return _FAMILIES[arch.model_type].hf_config(arch, dtype), "regenerated from the ArchSpec"


def _groups(arch: ArchSpec):
    yield [embedding_map(arch)]
    for i in range(arch.num_layers):
        yield layer_maps(arch, i)
    yield final_maps(arch)


def convert_megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, hf_reference: str | Path | None = None,
                           dtype: str | None = None, shard_size: str | int = "5GB", overwrite: bool = False,
                           weights_subdir: str = model_ckpt.WEIGHTS_DIR) -> ConversionReport:
    """Convert a megatron-s2d model checkpoint folder (or a training checkpoint with the same meta file and the
    weights under ``weights_subdir``) to an HF folder; see the module docstring."""
    ckpt = Path(ckpt_dir)
    arch, meta = model_ckpt.read_model_meta(ckpt)
    out_dtype = dtype or meta["dtype"]
    if out_dtype not in _TORCH_DTYPES:
        raise S2DError(f"--dtype {out_dtype!r}: expected one of {', '.join(_TORCH_DTYPES)}")
    max_bytes = parse_size(shard_size)
    if max_bytes <= 0:
        raise S2DError(f"--shard-size {shard_size!r} must be positive")
    ref = Path(hf_reference) if hf_reference is not None else None
    reader = DistCheckpointReader(ckpt / weights_subdir)
    maps = tensor_maps(arch)
    reader.check(maps, arch.num_layers)
    config, config_from = resolve_config(arch, out_dtype, ckpt, ref)
    out = model_ckpt.check_output_dir(out_dir, overwrite, inputs=(ckpt,) + ((ref,) if ref else ()))
    torch_dtype = _TORCH_DTYPES[out_dtype]
    plan = [(n, s, torch_dtype) for m in maps for n, s in zip(m.hf_names, m.hf_shapes)]

    start = time.perf_counter()
    tmp = model_ckpt.temp_sibling(out)
    try:
        tmp.mkdir(parents=True)
        writer = ShardedSafetensorsWriter(tmp, plan, max_bytes)
        for group in _groups(arch):
            for m, full in zip(group, reader.read(group, arch.num_layers)):
                for name, t in zip(m.hf_names, to_hf(m, arch, full)):
                    writer.write(name, t.to(torch_dtype))
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _carry_files(ckpt, ref, tmp)
        model_ckpt.publish_dir(tmp, out, overwrite, inputs=(ckpt,) + ((ref,) if ref else ()))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionReport(out, len(plan), writer.total_size, time.perf_counter() - start,
                            [f"config.json {config_from}", f"{len(writer.files)} safetensors shard(s)"])


def _carry_files(ckpt: Path, ref: Path | None, tmp: Path) -> None:
    """Tokenizer and other small HF files: the checkpoint's own first, the reference folder's for what is absent."""
    sources: list[Path] = []
    for sub in (model_ckpt.TOKENIZER_DIR, model_ckpt.HF_EXTRA_DIR):
        if (ckpt / sub).is_dir():
            sources += [p for p in sorted((ckpt / sub).iterdir()) if p.is_file()]
    if ref is not None:
        tok, extra = sort_hf_files(ref)
        have = {p.name for p in sources}
        sources += [p for p in tok + extra if p.name not in have]
    copy_files([p for p in sources if p.name != "config.json"], tmp)

