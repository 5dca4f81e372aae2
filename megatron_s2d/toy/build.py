"""Build (or reuse) the toy world: tokenizer and pre-trained base teacher and student (the problem sets are the
package's shipped data sets, `toy.problems`).

    python -m megatron_s2d.toy.build --out DIR [--seed 0] [--force] [--quick] [--arch llama]
    python -m megatron_s2d.toy.build --ship        # rebuild the world shipped in the package (seed 0)

The default world (seed 0) ships inside the package (`SHIPPED_DIR`, a few MB), so a toy plan spends no time here;
a plan with another `toy_world_seed` builds its world into the run folder (~7 min on 2 CPU cores).

Layout of `out_dir`:
    tokenizer/            the shared tokenizer (`save_pretrained`)
    teacher/, student/    HF model folders: model.safetensors, config.json, generation_config.json, tokenizer files
    pretrain_{teacher,student}.jsonl  each model's pre-training corpus (prompt / response), for audits (not shipped)
    build_info.json       seed, config hash, measured base accuracies, file digests, timings; written last

Determinism: the same seed and config give byte-identical tokenizer and model files on these machines (fixed torch
thread count, `ToyBuildConfig.threads`); build_info.json differs only in wall times (`deterministic_info`).

Caching: a build is keyed by `config_hash` (seed, architectures, model shapes, pre-training settings, tokenizer
and data-file digests). If `out_dir/build_info.json` has the same hash, the build is reused; otherwise it is built
into a temporary sibling folder and renamed into place at the end, so an interrupted build never looks complete.
A non-empty `out_dir` that is not a toy world is never overwritten.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from megatron_s2d.errors import S2DError
from megatron_s2d.toy import models, problems, tokenizer as toy_tok
from megatron_s2d.toy.pretrain import PretrainConfig, corpus_texts, evaluate, pretrain, stratified_subset, \
    tokenize_corpus

BUILD_VERSION = 2
INFO_FILE = "build_info.json"
SHIPPED_DIR = Path(__file__).parent / "world"  # the default world (seed 0), shipped as package data
SHIPPED_FILES = ("tokenizer", "teacher", "student", INFO_FILE)
LEVEL_WEIGHTS = (1.0, 1.5, 1.0, 1.5, 2.0)  # pre-training mix: more of the harder levels


@dataclass(frozen=True)
class ToyBuildConfig:
    """Everything a toy build depends on besides the seed. Batch size is sequences per step on one process."""

    arch: str = "qwen3"
    teacher: models.ToyModelSpec = models.TEACHER_SPEC
    student: models.ToyModelSpec = models.STUDENT_SPEC
    # The shipped build (seed 0, 2 CPU cores, 416 s; build-time eval: 100 test problems x 2 samples, temperature 1):
    # the teacher computes 65% of the answers right, commits 47% of its responses (no hedge) and is graded 28.5%
    # correct; the student computes 55% right but commits only 1.5% (graded 1.5%). Accuracy rises steeply with steps
    # (a student at 500 steps computed 2% right): change step counts only with a fresh measurement.
    teacher_pretrain: PretrainConfig = PretrainConfig(steps=1200, batch_sequences=64, lr=1e-3)
    student_pretrain: PretrainConfig = PretrainConfig(steps=1500, batch_sequences=64, lr=1e-3)
    corpus_items: int = 20_000  # pre-training examples (sampled with repeats, none in train/test)
    level_weights: tuple[float, ...] = LEVEL_WEIGHTS
    instruction_fraction: float = 0.5  # share of pre-training user turns that carry the pipeline's instruction
    # Share of pre-training responses that end hedged ("\\boxed{N \\pm 1}", graded wrong), per model.
    teacher_hedge_fraction: float = 0.5
    student_hedge_fraction: float = 0.99
    eval_per_level: int = 20  # build-time eval: this many test problems per level ...
    eval_samples: int = 2  # ... times this many samples each, at temperature 1
    threads: int = 2  # torch CPU threads; results are reproducible for a fixed thread count

    def to_dict(self) -> dict:
        return asdict(self)

    def scaled(self, steps_scale: float) -> "ToyBuildConfig":
        """Same build with pre-training steps (and warmup) multiplied by `steps_scale` (>= 1 step each)."""

        def scale(p: PretrainConfig) -> PretrainConfig:
            steps = max(1, round(p.steps * steps_scale))
            return replace(p, steps=steps, warmup_steps=min(p.warmup_steps, steps))

        return replace(self, teacher_pretrain=scale(self.teacher_pretrain),
                       student_pretrain=scale(self.student_pretrain))


QUICK_CONFIG = replace(
    ToyBuildConfig(), corpus_items=256, eval_per_level=1, eval_samples=1,
    teacher_pretrain=PretrainConfig(steps=2, batch_sequences=8, warmup_steps=1),
    student_pretrain=PretrainConfig(steps=2, batch_sequences=8, warmup_steps=1),
)


@dataclass(frozen=True)
class ToyWorld:
    """Paths of a built toy world and its build_info.json contents."""

    root: Path
    teacher_dir: Path
    student_dir: Path
    tokenizer_dir: Path
    train_path: Path
    test_path: Path
    info: dict = field(default_factory=dict)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data_digest(path: Path) -> str:
    """sha256 of a shipped problem file as the build reads it: every row without its ``solution`` (re-serialised
    exactly as ``problems.write_jsonl`` wrote rows before they carried one). The build reads prompts, answers and
    levels; a solution is ``problems.solution_text`` of the row's own expression, so adding that field (for
    ``teacher_sft``) changes no build: the shipped world keeps its config hash and bytes."""
    h = hashlib.sha256()
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        row.pop("solution", None)
        h.update((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    return h.hexdigest()


def config_hash(seed: int, cfg: ToyBuildConfig) -> str:
    """Digest of everything that determines the build's output (seed, config, code version, shipped data)."""
    from megatron_s2d.data.prompts import DEFAULT_INSTRUCTION

    payload = {
        "version": BUILD_VERSION, "seed": seed, "config": cfg.to_dict(), "instruction": DEFAULT_INSTRUCTION,
        "chat_template": toy_tok.CHAT_TEMPLATE, "max_vocab": toy_tok.MAX_VOCAB_SIZE,
        "data": {s: _data_digest(problems.shipped_path(s)) for s in problems.SHIPPED_SIZES},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _world(root: Path, info: dict) -> ToyWorld:
    return ToyWorld(root=root, teacher_dir=root / "teacher", student_dir=root / "student",
                    tokenizer_dir=root / "tokenizer", train_path=problems.shipped_path("train"),
                    test_path=problems.shipped_path("test"), info=info)


def load_toy_world(out_dir: str | Path) -> ToyWorld:
    """The complete toy world in `out_dir`; S2DError when there is none."""
    root = Path(out_dir)
    info_path = root / INFO_FILE
    if not info_path.is_file():
        raise S2DError(f"{root}: no toy world here (missing {INFO_FILE}); build one with "
                       f"`python -m megatron_s2d.toy.build --out {root}`")
    return _world(root, json.loads(info_path.read_text()))


def _save_model(model, tok, path: Path) -> None:
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    _fix_tokenizer_class(path)
    for f in path.iterdir():
        f.chmod(0o644)  # safetensors writes the weights owner-only; the world is read by other processes / users


def _fix_tokenizer_class(path: Path) -> None:
    """Name the class `PreTrainedTokenizerFast` (what every transformers version and vLLM resolve) instead of the
    transformers-5-only backend name."""
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _train_one(name: str, spec: models.ToyModelSpec, pcfg: PretrainConfig, rows, tok, cfg: ToyBuildConfig,
               seed: int, eval_set, log) -> tuple[object, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    hf_cfg = models.make_config(spec, toy_tok.padded_vocab_size(len(tok)), arch=cfg.arch, name=name,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg)
    model.generation_config = models.make_generation_config(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[toy] pre-training {name} ({cfg.arch}, {n_params / 1e6:.2f} M params, {pcfg.steps} steps)")
    stats = pretrain(model, rows, pcfg, seed, tok.pad_token_id, log=log)
    t0 = time.time()
    acc = evaluate(model, tok, eval_set, cfg.eval_samples, seed)
    stats["eval_seconds"] = round(time.time() - t0, 2)
    log(f"[toy] {name} base accuracy {acc['accuracy']:.3f} (answer computed right {acc['computed']:.3f}, committed "
        f"{acc['committed']:.3f}) by level {acc['by_level']} ({acc['samples']} samples)")
    return model, {"params": n_params, "pretrain": stats, "base_accuracy": acc}


def _build_into(root: Path, seed: int, cfg: ToyBuildConfig, digest: str, log) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _build_steps(root, seed, cfg, digest, log)
    finally:
        torch.set_num_threads(threads_before)


def _build_steps(root: Path, seed: int, cfg: ToyBuildConfig, digest: str, log) -> dict:
    import torch

    start = time.time()
    tok = toy_tok.save_tokenizer(root / "tokenizer")
    _fix_tokenizer_class(root / "tokenizer")
    train, test = problems.load_shipped("train"), problems.load_shipped("test")
    exclude = problems.keys_of(train) | problems.keys_of(test)
    items = problems.pretrain_items(cfg.corpus_items, seed, exclude, cfg.level_weights)
    info: dict = {"seed": seed, "config_hash": digest, "config": cfg.to_dict(), "tokenizer_size": len(tok),
                  "vocab_size": toy_tok.padded_vocab_size(len(tok)), "models": {}}
    eval_set = stratified_subset(test, cfg.eval_per_level)
    # Teacher and student see the same questions and worked solutions (as two sizes of one model family would); the
    # student's text hedges more (see the package docstring for why).
    for name, spec, pcfg, hedge in (("teacher", cfg.teacher, cfg.teacher_pretrain, cfg.teacher_hedge_fraction),
                                    ("student", cfg.student, cfg.student_pretrain, cfg.student_hedge_fraction)):
        pairs = corpus_texts(items, seed, cfg.instruction_fraction, hedge)
        with open(root / f"pretrain_{name}.jsonl", "w", encoding="utf-8") as f:
            for prompt, response in pairs:
                f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
        model, info["models"][name] = _train_one(name, spec, pcfg, tokenize_corpus(tok, pairs), tok, cfg, seed,
                                                 eval_set, log)
        _save_model(model, tok, root / name)
    info["digests"] = content_digests(root)
    info["build_seconds"] = round(time.time() - start, 1)
    info["torch_threads"] = torch.get_num_threads()
    info["versions"] = {"torch": torch.__version__, "transformers": _version("transformers"),
                        "tokenizers": _version("tokenizers")}
    return info


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def build_toy_world(out_dir: str | Path, seed: int = 0, force: bool = False, *, quick: bool = False,
                    steps_scale: float = 1.0, config: ToyBuildConfig | None = None, log=print) -> ToyWorld:
    """Build the toy world into `out_dir` (or reuse a complete build with the same seed and config hash).

    quick: a seconds-long build for tests (2 pre-training steps per model, 5-problem eval), same layout.
    steps_scale: multiply the pre-training steps (e.g. 0.1 for a fast smoke run); ignored with `config`.
    Concurrent callers on one `out_dir` are serialised by a lock file beside it; the later one reuses the build.
    """
    cfg = config or (QUICK_CONFIG if quick else ToyBuildConfig())
    if config is None and steps_scale != 1.0:
        cfg = cfg.scaled(steps_scale)
    root = Path(out_dir)
    digest = config_hash(seed, cfg)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info_path = root / INFO_FILE
        if root.exists() and not force and info_path.is_file():
            info = json.loads(info_path.read_text())
            if info.get("config_hash") == digest:
                log(f"[toy] reusing {root} (config hash {digest})")
                return _world(root, info)
        if root.exists() and any(root.iterdir()) and not info_path.is_file():
            raise S2DError(f"{root}: exists, is not empty and holds no toy world ({INFO_FILE}); refusing to "
                           "overwrite it, pick another --out")
        for stale in [*root.parent.glob(f".{root.name}.tmp-*"), *root.parent.glob(f".{root.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build (we hold the lock: nobody else's)
        info = _build_and_swap(root, seed, cfg, digest, log)
    log(f"[toy] built {root} in {info['build_seconds']} s")
    return _world(root, info)


def _build_and_swap(root: Path, seed: int, cfg: ToyBuildConfig, digest: str, log) -> dict:
    """Build into a temporary sibling folder, then replace `root` with it (rename: never half-written)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the world is read by other processes / users
    try:
        log(f"[toy] building into {tmp} (seed {seed}, config hash {digest})")
        text = json.dumps(_build_into(tmp, seed, cfg, digest, log), indent=2, sort_keys=True) + "\n"
        (tmp / INFO_FILE).write_text(text)
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            root.rename(old)
            shutil.rmtree(old)
        tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return json.loads(text)  # what a later load sees (tuples become lists)


def shipped_world(seed: int, cfg: ToyBuildConfig | None = None) -> tuple[ToyWorld | None, str]:
    """(the toy world shipped inside the package, "") when it is the build of `seed` and `cfg` (default config) by
    this code; else (None, why not)."""
    info_path = SHIPPED_DIR / INFO_FILE
    if not info_path.is_file():
        return None, f"no toy world is shipped in {SHIPPED_DIR}"
    info = json.loads(info_path.read_text())
    want = config_hash(seed, cfg or ToyBuildConfig())
    if info.get("config_hash") != want:
        return None, (f"the shipped toy world is seed {info.get('seed')}, config hash {info.get('config_hash')}; "
                      f"this plan asks for seed {seed}, config hash {want}")
    return _world(SHIPPED_DIR, info), ""


def world_for(seed: int, build_dir: str | Path, log=print) -> ToyWorld:
    """The toy world of `seed`: the shipped one when it matches, else built (or reused) in `build_dir`."""
    world, why = shipped_world(seed)
    if world is not None:
        return world
    log(f"[toy] {why}: building it in {build_dir} (takes ~7 min on 2 CPU cores)")
    return build_toy_world(build_dir, seed=seed, log=log)


def ship(seed: int = 0, log=print) -> ToyWorld:
    """Build the default toy world of `seed` and store it as the package's shipped world (models, tokenizer,
    build_info.json; not the pre-training corpus, which the build regenerates)."""
    with tempfile.TemporaryDirectory() as tmp:
        world = build_toy_world(Path(tmp) / "world", seed=seed, log=log)
        if SHIPPED_DIR.exists():
            shutil.rmtree(SHIPPED_DIR)
        SHIPPED_DIR.mkdir(parents=True)
        for name in SHIPPED_FILES:
            src = world.root / name
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, SHIPPED_DIR / name)
    return _world(SHIPPED_DIR, json.loads((SHIPPED_DIR / INFO_FILE).read_text()))


def content_digests(root: Path) -> dict[str, str]:
    """sha256 of every shipped file of a world (tokenizer and models; build_info.json aside, whose wall times
    differ between builds: compare its `deterministic_info`). Builds of one seed and config give the same digests
    with the same torch thread count on these machines (tests/unit/toy/test_toy_ship.py)."""
    return {str(p.relative_to(root)): _file_digest(p) for name in SHIPPED_FILES if (root / name).is_dir()
            for p in sorted((root / name).rglob("*")) if p.is_file()}


def deterministic_info(info: dict) -> dict:
    """build_info.json without what legitimately differs between two builds (wall times)."""
    out = json.loads(json.dumps(info))
    out.pop("build_seconds", None)
    for m in out.get("models", {}).values():
        for key in ("train_seconds", "eval_seconds"):
            m.get("pretrain", {}).pop(key, None)
    return out


def main(argv: list[str] | None = None) -> ToyWorld:
    parser = argparse.ArgumentParser(prog="python -m megatron_s2d.toy.build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="output folder (default with --ship: the package's shipped world)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    parser.add_argument("--quick", action="store_true", help="seconds-long build for tests")
    parser.add_argument("--ship", action="store_true", help="store the build as the package's shipped world")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply pre-training steps")
    parser.add_argument("--arch", choices=models.ARCHS, default="qwen3")
    parser.add_argument("--threads", type=int, default=ToyBuildConfig.threads,
                        help="torch CPU threads (part of the config hash: float results depend on it)")
    args = parser.parse_args(argv)
    if args.ship:
        world = ship(args.seed)
    else:
        if not args.out:
            parser.error("--out is required (or --ship)")
        base = QUICK_CONFIG if args.quick else ToyBuildConfig()
        cfg = replace(base, arch=args.arch, threads=args.threads)
        if args.steps_scale != 1.0:
            cfg = cfg.scaled(args.steps_scale)
        world = build_toy_world(args.out, seed=args.seed, force=args.force, config=cfg)
    for name in ("teacher", "student"):
        acc = world.info["models"][name]["base_accuracy"]
        print(f"{name}: base accuracy {acc['accuracy']:.3f} (computed {acc['computed']:.3f}, committed "
              f"{acc['committed']:.3f}) by level {acc['by_level']}")
    print(f"build seconds: {world.info['build_seconds']}")
    return world


if __name__ == "__main__":
    main()
