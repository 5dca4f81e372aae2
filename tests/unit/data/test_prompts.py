"""Prompt building with a tiny tokenizer made locally (tokenizers + PreTrainedTokenizerFast, no downloads)."""

import warnings

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_s2d.data import DEFAULT_INSTRUCTION, Problem, build_prompt, build_prompts
from megatron_s2d.data import prompts as prompts_mod

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tokenizer(chat_template: str | None, name: str) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "<|end|>": 1, "what": 2, "is": 3}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|end|>")
    hf.chat_template = chat_template
    hf.name_or_path = name
    return hf


PROBLEM = Problem("t/1", "What is $1+1$?\n\nBe careful.", "2", "toy")


def test_chat_template_is_applied():
    text = build_prompt(_tokenizer(CHAT_TEMPLATE, "chat-tok"), PROBLEM)
    assert text == (
        "<|user|>\nWhat is $1+1$?\n\nBe careful.\n\n" + DEFAULT_INSTRUCTION + "<|end|>\n<|assistant|>\n"
    )
    assert "\\boxed{}" in DEFAULT_INSTRUCTION


def test_custom_instruction_and_batch():
    tok = _tokenizer(CHAT_TEMPLATE, "chat-tok")
    texts = build_prompts(tok, [PROBLEM, Problem("t/2", "Q2", "1", "toy")], instruction="Answer in \\boxed{}.")
    assert texts[1] == "<|user|>\nQ2\n\nAnswer in \\boxed{}.<|end|>\n<|assistant|>\n"


def test_plain_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(prompts_mod, "_warned_no_template", set())
    tok = _tokenizer(None, "plain-tok")
    with pytest.warns(UserWarning, match="no chat template"):
        text = build_prompt(tok, PROBLEM)
    assert text == "Problem: What is $1+1$?\n\nBe careful.\n" + DEFAULT_INSTRUCTION + "\nSolution:"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        assert build_prompt(tok, PROBLEM, instruction="") == "Problem: What is $1+1$?\n\nBe careful.\nSolution:"


def test_rejects_non_problem():
    with pytest.raises(ValueError, match="expected a Problem"):
        build_prompt(_tokenizer(CHAT_TEMPLATE, "x"), {"prompt": "Q"})
