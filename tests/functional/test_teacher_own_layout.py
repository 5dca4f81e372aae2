"""A real plan where the teacher has its own layout (tp=2, or pp=2) next to a tp=1 student on 2 processes: the forward-KL
warmup's teacher generates for both student data-parallel ranks (routed generation, top-k at the rollout T) and
OPD's teacher scores both ranks' rollouts (routed scoring). Exactness of the routing against one process is
tests/distributed/test_scorer_layout.py; this checks the stages run it end to end."""

import json

import pytest
import torch

from tests.functional.conftest import mini_plan, s2d, write_plan

pytestmark = pytest.mark.functional


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}], ids=["teacher-tp2", "teacher-pp2"])
def test_fkl_and_opd_with_teacher_at_its_own_layout_next_to_student_tp1(mini_world, tmp_path, layout):
    stages = [
        {"name": "fkl", "kind": "fkl_warmup", "teacher": "base", "split": "1H",
         "rollout": {"temperature": 0.8, "max_new_tokens": 8},
         "warmup": {"topk": 4, "teacher_samples_per_prompt": 2}},
        {"name": "opd", "kind": "opd", "init": "fkl", "teacher": "base", "split": "1H"},
    ]
    run = tmp_path / "run"
    plan = mini_plan(mini_world, run, stages, eval={"k": 1, "max_new_tokens": 4, "include_base": False},
                     launch={"executor": "local", "nodes": 1, "procs_per_node": 2})
    plan["models"]["teacher"].update(layout)
    proc = s2d("run", write_plan(tmp_path / "plan.yaml", plan), "stage_defaults.steps=2")
    for name in ("fkl", "opd"):
        assert (run / "stages" / name / "COMPLETE").is_file(), name
    out = proc.stdout + proc.stderr
    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    assert (f"teacher at its own layout tp={tp} pp={pp} (1 replicas) next to the student at tp=1 pp=1 (dp=2)"
            in out)
    # each student DP rank got teacher samples for its own prompts, with teacher top-k at every response token
    from megatron_s2d.rollout.sample_store import load_samples

    caches = [[s for step in load_samples(run / "stages" / "fkl" / "teacher_cache" / f"dp_rank_{r:05d}")
               for s in step] for r in (0, 1)]
    assert len(caches[0]) == len(caches[1]) == 2 * 1 * 2  # steps x prompts per rank x samples per prompt
    assert {tuple(s.prompt_ids) for s in caches[0]}.isdisjoint({tuple(s.prompt_ids) for s in caches[1]})
    for s in caches[0] + caches[1]:
        assert len(s.topk_ids) == len(s.response_ids) and all(len(k) == 4 for k in s.topk_ids)
        top = torch.tensor(s.topk_logprobs)
        assert torch.isfinite(top).all() and (top <= 0).all() and (top[:, :-1] >= top[:, 1:]).all()
    metrics = [json.loads(l) for l in (run / "stages" / "opd" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["teacher_logprob_mean"] < 0 and abs(m["reverse_kl_mean"]) < 50
