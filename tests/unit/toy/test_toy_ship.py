"""The shipped toy world: built by this code from seed 0 (config hash), its files intact (digests recorded at build
time), loadable with transformers; builds are deterministic (two processes, same bytes); plans use the shipped world
for seed 0 and build any other seed."""

import json
import subprocess
import sys

import pytest

from megatron_s2d.toy import build as B
from megatron_s2d.toy import tokenizer as T


def test_shipped_world_is_this_codes_seed_0_build():
    world, why = B.shipped_world(0)
    assert world is not None, why
    assert world.info["config_hash"] == B.config_hash(0, B.ToyBuildConfig())
    assert B.content_digests(world.root) == world.info["digests"]  # every shipped file as built
    assert sorted(p.name for p in world.root.iterdir()) == sorted(B.SHIPPED_FILES)


def test_shipped_models_load_and_keep_the_designed_gap():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world, _ = B.shipped_world(0)
    for d in (world.teacher_dir, world.student_dir):
        model = AutoModelForCausalLM.from_pretrained(str(d))
        tok = AutoTokenizer.from_pretrained(str(d))
        assert model.config.vocab_size == T.padded_vocab_size(len(tok))
    acc = {m: world.info["models"][m]["base_accuracy"] for m in ("teacher", "student")}
    # the designed world (toy package docstring): both compute many answers right; the student hedges far more
    assert acc["teacher"]["committed"] > acc["student"]["committed"] + 0.2
    assert acc["teacher"]["accuracy"] > acc["student"]["accuracy"]


def test_other_seed_is_not_the_shipped_world():
    world, why = B.shipped_world(1)
    assert world is None and "seed 0" in why and "seed 1" in why


def _build(out):
    subprocess.run([sys.executable, "-m", "megatron_s2d.toy.build", "--out", str(out), "--quick"], check=True,
                   capture_output=True, text=True, timeout=300)
    return json.loads((out / B.INFO_FILE).read_text())


def test_build_is_deterministic_across_processes(tmp_path):
    """Same seed and config in two fresh processes: identical tokenizer and model bytes; build_info.json differs only
    in wall times."""
    a, b = _build(tmp_path / "a"), _build(tmp_path / "b")
    assert B.content_digests(tmp_path / "a") == B.content_digests(tmp_path / "b") == a["digests"]
    assert B.deterministic_info(a) == B.deterministic_info(b)
    assert a["build_seconds"] >= 0 and "build_seconds" not in B.deterministic_info(a)


def test_world_for_uses_the_shipped_world_for_its_seed(tmp_path):
    logs = []
    world = B.world_for(0, tmp_path / "unused", log=logs.append)
    assert world.root == B.SHIPPED_DIR and not logs and not (tmp_path / "unused").exists()


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_package_data_lists_the_shipped_files(name):
    """pyproject's package-data globs cover every shipped file (a wheel would otherwise miss some)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    globs = tomllib.loads((Path(B.__file__).parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["megatron_s2d"]
    for rel in B.content_digests(B.SHIPPED_DIR):
        if rel.startswith(name):
            assert any(fnmatch.fnmatch(f"toy/world/{rel}", g) for g in globs), rel
