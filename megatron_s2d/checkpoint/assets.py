"""Model assets: what a megatron-s2d checkpoint says about the model besides its weights, loaded once.

    assets = ModelAssets.load(ckpt_dir)
    assets.arch, assets.tokenizer, assets.stop_ids, assets.pad_id, assets.decode(ids)

Every place that needs "the tokenizer, stop ids and pad id of this checkpoint" (stage jobs, base evaluation,
``s2d eval``) uses this, so they agree on which tokens end a response and which pads a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_s2d.checkpoint.model_ckpt import read_model_meta
from megatron_s2d.errors import S2DError, read_json
from megatron_s2d.models.arch import ArchSpec


def stop_token_ids(ckpt_dir: Path, tokenizer) -> tuple[int, ...]:
    """EOS ids for generation: the checkpoint's generation_config, else the tokenizer's EOS."""
    gen_cfg = Path(ckpt_dir) / "hf_extra" / "generation_config.json"
    ids = None
    if gen_cfg.is_file():
        ids = read_json(gen_cfg).get("eos_token_id")
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        raise S2DError(f"{ckpt_dir}: no eos_token_id in hf_extra/generation_config.json and none in the tokenizer")
    return tuple(ids) if isinstance(ids, list) else (int(ids),)


def _tokenizer_fingerprint(tok_dir: Path) -> tuple[dict, dict]:
    from transformers import AutoTokenizer

    if not Path(tok_dir).is_dir():
        raise S2DError(f"{tok_dir}: tokenizer folder missing")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    specials = {k: getattr(tok, k, None) for k in ("bos_token", "eos_token", "pad_token")}
    return tok.get_vocab(), specials


def check_same_tokenizer(dir_a: str | Path, dir_b: str | Path) -> None:
    """Teacher and student must share a tokenizer: same vocabulary (token -> id) and special tokens (per-token
    log-probs are compared id by id)."""
    va, sa = _tokenizer_fingerprint(Path(dir_a))
    vb, sb = _tokenizer_fingerprint(Path(dir_b))
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:3]
        raise S2DError(f"tokenizer mismatch between {dir_a} and {dir_b}: vocabularies differ "
                       f"({len(va)} vs {len(vb)} tokens; e.g. {diff}). On-policy distillation compares per-token "
                       "log-probs id by id, so teacher and student must share one tokenizer")
    if sa != sb:
        raise S2DError(f"tokenizer mismatch between {dir_a} and {dir_b}: special tokens differ ({sa} vs {sb})")


@dataclass(frozen=True)
class ModelAssets:
    path: Path  # the checkpoint folder
    arch: ArchSpec
    meta: dict
    tokenizer: object  # transformers tokenizer
    stop_ids: tuple[int, ...]  # a response ends after emitting one of these (kept in the response)
    pad_id: int  # pads rows of a batch (never a target)

    @staticmethod
    def load(ckpt_dir: str | Path) -> "ModelAssets":
        from transformers import AutoTokenizer

        path = Path(ckpt_dir)
        arch, meta = read_model_meta(path)
        tok_dir = path / "tokenizer"
        if not tok_dir.is_dir():
            raise S2DError(f"{path}: no tokenizer/ folder in the checkpoint (it is copied from the HF folder when the "
                           "base model is imported)")
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return ModelAssets(path, arch, meta, tokenizer, stop_token_ids(path, tokenizer), int(pad))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def check_same_tokenizer(self, other: "ModelAssets | Path") -> None:
        check_same_tokenizer(self.path / "tokenizer", Path(getattr(other, "path", other)) / "tokenizer")
