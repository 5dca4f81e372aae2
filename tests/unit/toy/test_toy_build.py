"""Toy world build: quick build loads with transformers, caching, atomic replace, CLI."""

import json
import re

import pytest

from megatron_s2d.errors import S2DError
from megatron_s2d.toy import build as B
from megatron_s2d.toy import problems as P
from megatron_s2d.toy import tokenizer as T


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return B.build_toy_world(tmp_path_factory.mktemp("toy") / "world", seed=0, quick=True, log=lambda s: None)


def test_quick_build_loads_with_transformers(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    assert world.train_path.read_bytes() == P.shipped_path("train").read_bytes()
    assert world.test_path.read_bytes() == P.shipped_path("test").read_bytes()
    for d in (world.teacher_dir, world.student_dir):
        model = AutoModelForCausalLM.from_pretrained(str(d))
        tok = AutoTokenizer.from_pretrained(str(d))
        gen = GenerationConfig.from_pretrained(str(d))
        assert gen.eos_token_id == tok.convert_tokens_to_ids(T.IM_END) == model.config.eos_token_id
        assert model.config.vocab_size == T.padded_vocab_size(len(tok)) and model.config.vocab_size % 16 == 0
        assert (d / "model.safetensors").is_file()
        assert json.loads((d / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                       tokenize=False) == T.chat_text("x")
    teacher = json.loads((world.teacher_dir / "config.json").read_text())
    student = json.loads((world.student_dir / "config.json").read_text())
    assert teacher["model_type"] == student["model_type"] == "qwen3"
    assert teacher["hidden_size"] > student["hidden_size"]
    AutoTokenizer.from_pretrained(str(world.tokenizer_dir))


def test_build_info_records_accuracies(world):
    info = json.loads((world.root / B.INFO_FILE).read_text())
    assert info == world.info and info["seed"] == 0
    for name in ("teacher", "student"):
        acc = info["models"][name]["base_accuracy"]
        assert 0.0 <= acc["accuracy"] <= 1.0 and set(acc["by_level"]) == {"1", "2", "3", "4", "5"}


def test_pretraining_text_is_disjoint_from_train_and_test(world):
    banned = P.keys_of(P.load_shipped("train")) | P.keys_of(P.load_shipped("test"))
    corpora = {m: [json.loads(x) for x in (world.root / f"pretrain_{m}.jsonl").read_text().splitlines()]
               for m in ("teacher", "student")}
    assert len(corpora["teacher"]) == len(corpora["student"]) == B.QUICK_CONFIG.corpus_items
    for row in corpora["teacher"]:
        question = re.search(r"user\n(.*?)(?:\n\n|<\|im_end\|>)", row["prompt"]).group(1)
        assert not P.content_keys(P.expression_of(question)) & banned


def test_the_models_read_the_same_questions_and_the_student_hedges_more(world):
    """Same prompts and worked steps; every response the teacher's text hedges, the student's hedges too."""
    corpora = {m: [json.loads(x) for x in (world.root / f"pretrain_{m}.jsonl").read_text().splitlines()]
               for m in ("teacher", "student")}
    hedged = {m: [" \\pm 1}" in r["response"] for r in rows] for m, rows in corpora.items()}
    assert [r["prompt"] for r in corpora["teacher"]] == [r["prompt"] for r in corpora["student"]]
    assert all(s for t, s in zip(hedged["teacher"], hedged["student"]) if t)
    assert sum(hedged["student"]) > sum(hedged["teacher"]) > 0


def test_rebuild_reuses_cache_and_force_rebuilds(world):
    logs = []
    again = B.build_toy_world(world.root, seed=0, quick=True, log=logs.append)
    assert any("reusing" in line for line in logs) and again.info == world.info
    mtime = (world.teacher_dir / "model.safetensors").stat().st_mtime_ns
    (world.root.parent / f".{world.root.name}.tmp-killed").mkdir()  # what a killed build leaves behind
    other = B.build_toy_world(world.root, seed=1, quick=True, log=lambda s: None)  # new seed: rebuilt in place
    assert other.info["seed"] == 1 and other.info["config_hash"] != world.info["config_hash"]
    assert (world.teacher_dir / "model.safetensors").stat().st_mtime_ns != mtime
    assert not [p for p in world.root.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # cleaned up
    assert B.load_toy_world(world.root).info["seed"] == 1
    mtime = (world.teacher_dir / "model.safetensors").stat().st_mtime_ns
    B.build_toy_world(world.root, seed=1, quick=True, force=True, log=lambda s: None)
    assert (world.teacher_dir / "model.safetensors").stat().st_mtime_ns != mtime


def test_concurrent_builds_of_one_folder_build_once(tmp_path):
    import threading

    logs: list[str] = []
    worlds = []

    def run():
        worlds.append(B.build_toy_world(tmp_path / "w", seed=3, quick=True, log=logs.append))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(worlds) == 2 and worlds[0].info == worlds[1].info
    assert sum("reusing" in line for line in logs) == 1
    assert sum(line.startswith("[toy] building into") for line in logs) == 1


def test_refuses_foreign_folder_and_missing_world(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(S2DError, match="refusing to overwrite"):
        B.build_toy_world(tmp_path, quick=True, log=lambda s: None)
    with pytest.raises(S2DError, match="no toy world"):
        B.load_toy_world(tmp_path)


def test_config_hash_and_steps_scale():
    cfg = B.ToyBuildConfig()
    assert B.config_hash(0, cfg) == B.config_hash(0, B.ToyBuildConfig())
    assert B.config_hash(0, cfg) != B.config_hash(1, cfg)
    half = cfg.scaled(0.5)
    assert half.teacher_pretrain.steps == round(cfg.teacher_pretrain.steps * 0.5)
    assert B.config_hash(0, half) != B.config_hash(0, cfg)
    assert B.config_hash(0, B.QUICK_CONFIG) != B.config_hash(0, cfg)


def test_cli_quick_llama(tmp_path, capsys):
    world = B.main(["--out", str(tmp_path / "w"), "--quick", "--arch", "llama", "--seed", "2"])
    out = capsys.readouterr().out
    assert "teacher: base accuracy" in out and "student: base accuracy" in out
    cfg = json.loads((world.student_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["rope_parameters"]["rope_type"] == "llama3"
