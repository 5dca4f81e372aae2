"""Toy pre-training pieces: answer grading, batching, deterministic order, loss goes down."""

import random

import pytest
import torch

from megatron_s2d.errors import S2DError
from megatron_s2d.toy import models as M
from megatron_s2d.toy import pretrain as PT
from megatron_s2d.toy import problems as P
from megatron_s2d.toy import tokenizer as T


GRADE_CASES = [  # (response, gold, (correct, computed, committed))
    ("7 * 8 = 56. The answer is \\boxed{56}.", 56, (True, True, True)),
    ("7 * 8 = 56. The answer is \\boxed{56 \\pm 1}.", 56, (False, True, False)),
    ("7 * 8 = 56. The answer is \\boxed{57 \\pm 1}.", 56, (False, False, False)),
    ("7 * 8 = 54. The answer is \\boxed{54}.", 56, (False, False, True)),
    ("\\boxed{ 12 }", 12, (True, True, True)),
    ("\\boxed{3} no, \\boxed{12}", 12, (False, True, True)),
    ("\\boxed{12} or \\boxed{12}", 12, (True, True, True)),
    ("The answer is 5.", 5, (False, False, False)),
    ("\\boxed{1.5}", 1, (False, False, False)),
]


@pytest.mark.parametrize("text,gold,expected", GRADE_CASES)
def test_grade(text, gold, expected):
    assert PT.grade(text, gold) == expected


def test_grade_agrees_with_the_pipeline_reward_on_toy_answers():
    """The build's quick eval and the pipeline's math-verify reward agree on every toy response form (a hedged pair
    of boxes is an answer set: wrong), except the unboxed answer, which math-verify still reads."""
    from megatron_s2d.rewards import score_batch, shutdown_pool

    try:
        rewards = score_batch([t for t, _, _ in GRADE_CASES], [str(g) for _, g, _ in GRADE_CASES])
    finally:
        shutdown_pool()
    for (text, gold, (correct, _, _)), r in zip(GRADE_CASES, rewards):
        assert r == (1.0 if correct or text == "The answer is 5." else 0.0), text


def test_packed_batch_layout():
    ids, pos, labels = PT._packed_batch([([5, 6, 7], 1), ([9, 10, 11, 12], 2), ([3, 4], 1)], pad_id=0, row_tokens=6)
    assert ids.tolist() == [[9, 10, 11, 12, 3, 4], [5, 6, 7, 0, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert labels.tolist() == [[-100, -100, 11, 12, -100, 4], [-100, 6, 7, -100, -100, -100]]
    with pytest.raises(S2DError, match="row_tokens"):
        PT._packed_batch([([1] * 7, 1)], pad_id=0, row_tokens=6)


def test_packed_loss_and_grads_equal_padded_batch():
    """Packing must not let sequences see each other: same loss and gradients as a right-padded batch."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(M.make_config(M.STUDENT_SPEC, 368, bos_token_id=0, eos_token_id=2,
                                                           pad_token_id=0))
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(3, 360, (n,), generator=g).tolist(), n // 3) for n in (20, 33, 9, 41, 27, 14)]
    width = max(len(r) for r, _ in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    attn, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (seq, n_prompt) in enumerate(rows):
        ids[i, : len(seq)], attn[i, : len(seq)] = torch.tensor(seq), 1
        labels[i, n_prompt: len(seq)] = torch.tensor(seq[n_prompt:])
    padded = model(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False).loss
    padded.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    p_ids, p_pos, p_labels = PT._packed_batch(rows, pad_id=0, row_tokens=64)
    assert p_ids.shape[0] < len(rows)
    packed = model(input_ids=p_ids, position_ids=p_pos, labels=p_labels, use_cache=False).loss
    packed.backward()
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    for r, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-7)


def test_batch_order_is_seeded_and_covers_the_corpus():
    a = PT.batch_order(100, 8, 30, random.Random("s"))
    assert a == PT.batch_order(100, 8, 30, random.Random("s"))
    assert a != PT.batch_order(100, 8, 30, random.Random("t"))
    assert len(a) == 30 and all(len(b) == 8 for b in a)
    first_epoch = [i for b in a[:12] for i in b]
    assert len(set(first_epoch)) == 96  # one epoch = 12 full batches, no repeats


def test_corpus_text_is_chat_formatted_with_and_without_instruction():
    from megatron_s2d.data.prompts import DEFAULT_INSTRUCTION

    items = P.pretrain_items(200, 0, set(), [1] * 5)
    pairs = PT.corpus_texts(items, 0, 0.5)
    with_instr = sum(DEFAULT_INSTRUCTION in p for p, _ in pairs)
    assert 50 < with_instr < 150
    for (prompt, response), item in zip(pairs, items):
        assert prompt.startswith(T.IM_START + "user\n") and prompt.endswith(T.IM_START + "assistant\n")
        assert response == P.solution_text(item) + T.IM_END


def test_pretrain_lowers_loss_and_is_reproducible():
    torch.set_num_threads(1)
    tok = T.build_tokenizer()
    rows = PT.tokenize_corpus(tok, PT.corpus_texts(P.pretrain_items(64, 0, set(), [1] * 5), 0, 0.5))
    cfg = PT.PretrainConfig(steps=12, batch_sequences=16, lr=3e-3, warmup_steps=2)

    def run():
        torch.manual_seed(0)
        model = __import__("transformers").AutoModelForCausalLM.from_config(
            M.make_config(M.STUDENT_SPEC, T.padded_vocab_size(len(tok)), bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        return model, PT.pretrain(model, rows, cfg, seed=0, pad_id=tok.pad_token_id, log=lambda s: None)

    model, stats = run()
    assert stats["final_loss"] < stats["first_loss"] - 0.5
    _, again = run()
    assert again["final_loss"] == stats["final_loss"]
    ev = PT.evaluate(model, tok, P.load_shipped("test")[:3], samples_per_problem=2, seed=0, max_new_tokens=8)
    assert ev["samples"] == 6 and 0.0 <= ev["accuracy"] <= 1.0
