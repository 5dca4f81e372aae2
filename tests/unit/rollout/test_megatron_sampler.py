"""MegatronSampler on a tiny megatron-core Qwen3 model (TP=1, CPU).

THE correctness test: KV-cached greedy generation equals naive greedy generation that recomputes the full forward
every step, token for token, and every returned log-prob (and top-k log-prob) equals a teacher-forced full forward
over prompt + response to 1e-5 (fp32). Prompts have different lengths, the budget forces several chunks, and stop
tokens finish rows early so that batch compaction runs.
"""

from __future__ import annotations


import pytest
import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.models import ModelOptions, arch_from_hf_config, build_gpt_model
from megatron_s2d.policy.logprobs import token_logprobs, topk_logprobs
from megatron_s2d.rollout import GenerationResult, MegatronSampler, SamplingParams
from megatron_s2d.rollout.megatron_sampler import plan_chunks
from megatron_s2d.runtime.dist import init_distributed

TINY = dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6, tie_word_embeddings=True,
            max_position_embeddings=64)
PROMPT_LENS = (3, 9, 5, 12, 5, 1)
TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny():
    # One intra-op thread: these tensors are tiny, and OpenMP spin-waiting on a shared 2-core machine makes each
    # decode step ~20x slower with 2 threads than with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    init_distributed(1, 1)
    arch = arch_from_hf_config(TINY)
    torch.manual_seed(0)
    model = build_gpt_model(arch, ModelOptions(use_te="no"))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, arch.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]
    yield model, arch, prompts
    torch.set_num_threads(threads)


def _full_logits(model, ids: list[int]) -> torch.Tensor:
    """No cache: the whole sequence through the model -> (T, V)."""
    with torch.no_grad():
        return model(torch.tensor([ids]), None, None)[0]


def _naive_greedy(model, prompt, max_new, stop):
    model.eval()
    seq, out = list(prompt), []
    for _ in range(max_new):
        tok = int(_full_logits(model, seq)[-1].argmax())
        out.append(tok)
        seq.append(tok)
        if tok in stop:
            return out, "stop"
    return out, "length"


def _teacher_forced(model, sample, temperature, k=0):
    """Log-probs (R,) and optional top-k (values, ids) (R, k) of the response under a full forward."""
    model.eval()
    logits = _full_logits(model, sample.prompt_ids + sample.response_ids)
    p, r = len(sample.prompt_ids), len(sample.response_ids)
    pred = logits[p - 1: p - 1 + r]  # (R, V): position t-1 predicts token t
    lp = token_logprobs(pred, torch.tensor(sample.response_ids), temperature=temperature)
    return (lp, topk_logprobs(pred, k, temperature=temperature)) if k else (lp, None)


def test_plan_chunks():
    assert plan_chunks([1, 2, 3, 10], 4, 21) == [range(0, 3), range(3, 4)]  # 3 rows * (3 + 4) = 21; 4 * 14 > 21
    assert plan_chunks([1, 2, 3, 10], 4, 15) == [range(0, 2), range(2, 3), range(3, 4)]
    assert plan_chunks([30], 4, 10) == [range(0, 1)]  # a row larger than the budget runs alone
    assert plan_chunks([2] * 5, 2, 1000) == [range(0, 5)]


def test_greedy_kv_cache_equals_no_cache_and_teacher_forcing(tiny):
    model, arch, prompts = tiny
    max_new = 10
    free = [_naive_greedy(model, p, max_new, set())[0] for p in prompts]
    stop = {free[0][2], free[2][5]}  # tokens greedy decoding is known to emit: some rows stop early
    want = [_naive_greedy(model, p, max_new, stop) for p in prompts]
    sampler = MegatronSampler(model, arch, max_batch_tokens=60, eos_token_ids=[])  # several chunks
    model.train()
    res = sampler.generate(prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=max_new,
                                                   stop_token_ids=tuple(stop)))
    assert model.training, "train mode must be restored"
    assert isinstance(res, GenerationResult) and res.metrics["chunks"] > 1
    reasons = set()
    for p, group in enumerate(res.samples):
        assert len(group) == 2
        for s in group:
            assert s.prompt_ids == prompts[p]
            assert (s.response_ids, s.finish_reason) == want[p], f"prompt {p}"
            lp, _ = _teacher_forced(model, s, temperature=1.0)  # greedy reports untempered log-probs
            torch.testing.assert_close(torch.tensor(s.logprobs), lp, **TOL)
            reasons.add(s.finish_reason)
    assert reasons == {"stop", "length"}


def test_sampled_logprobs_topk_and_stops(tiny):
    model, arch, prompts = tiny
    temp, top_k, max_new, k = 0.7, 40, 12, 4
    stop = tuple(range(24))
    params = SamplingParams(n=3, temperature=temp, top_p=0.9, top_k=top_k, max_new_tokens=max_new,
                            stop_token_ids=stop, logprob_topk=k, seed=5)
    res = MegatronSampler(model, arch, max_batch_tokens=80).generate(prompts, params)
    model.eval()
    n_stop = 0
    for group in res.samples:
        for s in group:
            lp, (top_v, top_i) = _teacher_forced(model, s, temp, k)
            torch.testing.assert_close(torch.tensor(s.logprobs), lp, **TOL)
            assert torch.equal(torch.tensor(s.topk_ids), top_i)
            torch.testing.assert_close(torch.tensor(s.topk_logprobs), top_v, **TOL)
            # every drawn token lies inside the top-k candidates of its position
            logits = _full_logits(model, s.prompt_ids + s.response_ids)[len(s.prompt_ids) - 1: -1]
            assert bool((logits.gather(1, torch.tensor(s.response_ids)[:, None]) >=
                         logits.topk(top_k, dim=-1).values[:, -1:]).all())
            body = s.response_ids[:-1]
            assert not set(body) & set(stop), "generation must end at the first stop token"
            if s.finish_reason == "stop":
                assert s.response_ids[-1] in stop
                n_stop += 1
            else:
                assert len(s.response_ids) == max_new and s.response_ids[-1] not in stop
    m = res.metrics
    lens = [len(s.response_ids) for g in res.samples for s in g]
    assert m["generated_tokens"] == sum(lens) and m["mean_response_len"] == pytest.approx(sum(lens) / len(lens))
    assert m["truncation_rate"] == pytest.approx(1 - n_stop / len(lens)) and 0 < n_stop < len(lens)
    assert m["tokens_per_s"] > 0


def test_reproducible_and_batch_invariant(tiny):
    model, arch, prompts = tiny
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=11, stop_token_ids=(0, 1, 2))

    def run(ps=prompts, **kw):
        res = MegatronSampler(model, arch, **kw).generate(ps, params)
        return [[(s.response_ids, s.finish_reason) for s in g] for g in res.samples], res

    a, ra = run()
    assert run()[0] == a
    b, rb = run(max_batch_tokens=30, compact_ratio=1.0, prefill_chunk_tokens=4)  # other chunking/compaction
    assert b == a and rb.metrics["chunks"] > ra.metrics["chunks"]
    assert run(ps=prompts[:2])[0] == a[:2]  # a sample does not depend on the other prompts in the call
    other = MegatronSampler(model, arch).generate(prompts, SamplingParams(**{**params.__dict__, "seed": 12}))
    assert [[(s.response_ids, s.finish_reason) for s in g] for g in other.samples] != a
    assert len({tuple(s[0]) for s in a[3]}) > 1, "the n samples of a prompt must differ"


def test_eval_mode_no_grad_and_restore(tiny):
    model, arch, prompts = tiny
    seen = []
    hook = model.decoder.register_forward_pre_hook(lambda m, args: seen.append((m.training, torch.is_grad_enabled())))
    try:
        model.eval()
        MegatronSampler(model, arch).generate(prompts[:1], SamplingParams(max_new_tokens=2))
        assert not model.training
        model.train()
        MegatronSampler(model, arch).generate(prompts[:1], SamplingParams(max_new_tokens=2))
    finally:
        hook.remove()
    assert model.training and all(p.grad is None for p in model.parameters())
    assert seen and all(s == (False, False) for s in seen)


def test_bad_input_is_refused(tiny, monkeypatch):
    model, arch, prompts = tiny
    sampler = MegatronSampler(model, arch)
    bad = [(dict(top_p=0.0), "top_p"), (dict(n=0), "params.n"), (dict(temperature=-1.0), "temperature"),
           (dict(stop_token_ids=(999,)), "stop_token_ids"), (dict(max_new_tokens=0), "max_new_tokens"),
           (dict(max_new_tokens=60), "max_position_embeddings"), (dict(logprob_topk=300), "logprob_topk")]
    for kw, word in bad:
        with pytest.raises(S2DError, match=word):
            sampler.generate(prompts, SamplingParams(**kw))
    with pytest.raises(S2DError, match=r"prompts\[1\]: empty"):
        sampler.generate([[1], []], SamplingParams(max_new_tokens=4))
    with pytest.raises(S2DError, match=r"prompts\[0\]: token id"):
        sampler.generate([[256]], SamplingParams(max_new_tokens=4))
    with pytest.raises(S2DError, match="max_batch_tokens"):
        MegatronSampler(model, arch, max_batch_tokens=0)
    with pytest.raises(S2DError, match="GPTModel"):
        MegatronSampler(torch.nn.Linear(2, 2), arch)
    # a pipeline stage without a pipeline group (pipeline parallelism itself is supported: tests/distributed)
    monkeypatch.setattr(model, "post_process", False)
    with pytest.raises(S2DError, match="one pipeline stage but no pipeline group"):
        MegatronSampler(model, arch)
