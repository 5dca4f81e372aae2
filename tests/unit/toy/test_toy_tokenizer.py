"""Toy tokenizer: exact round trip, digit splitting, special tokens, chat template, save/load."""

import pytest

from megatron_s2d.toy import problems as P
from megatron_s2d.toy import tokenizer as T


@pytest.fixture(scope="module")
def tok():
    return T.build_tokenizer()


def _texts():
    out = []
    for split in P.SHIPPED_SIZES:
        for p in P.load_shipped(split):
            out.append(p.prompt)
    import random

    rng = random.Random(0)
    for i in range(500):
        item = P.sample_item(rng, P.LEVELS[i % 5])
        out.append(T.chat_text(P.render_prompt(item, rng), P.solution_text(item)))
    return out + ["\\boxed{}", "{}()\\$^_ \n\t üñï€ 😀"]


def test_round_trip_is_exact(tok):
    for text in _texts():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_small_vocab_and_padding(tok):
    assert len(tok) <= T.MAX_VOCAB_SIZE < 512
    padded = T.padded_vocab_size(len(tok))
    assert padded % 16 == 0 and 0 <= padded - len(tok) < 16
    assert T.padded_vocab_size(368) == 368 and T.padded_vocab_size(369) == 384


def test_digits_are_single_tokens(tok):
    pieces = tok.convert_ids_to_tokens(tok("1234 + 5678 = 6912", add_special_tokens=False)["input_ids"])
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert all(len(p) == 1 for p in digits) and len(digits) == 12


def test_special_tokens_and_chat_template(tok):
    assert tok.eos_token == T.IM_END and tok.pad_token == T.PAD_TOKEN and tok.bos_token == T.PAD_TOKEN
    for special in T.SPECIAL_TOKENS:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok("What is 1 + 2?")["input_ids"][0] != tok.bos_token_id  # nothing is prepended
    msgs = [{"role": "user", "content": "What is 1 + 2?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == T.chat_text("What is 1 + 2?")
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.decode(ids) == text
    two = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "3"}], tokenize=False)
    assert two == T.chat_text("What is 1 + 2?", "3") + "\n"


def test_build_is_deterministic(tok):
    assert T.build_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_save_and_load_with_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    T.save_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = T.chat_text("Compute 512 - 87.", "512 - 87 = 425. The answer is \\boxed{425}.")
    assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
    assert loaded.eos_token == T.IM_END
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                      tokenize=False) == T.chat_text("hi")
