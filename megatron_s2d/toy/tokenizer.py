"""The toy tokenizer: a small byte-level BPE trained locally (no download) on toy-world text.

Design (mirrors Qwen's tokenizer at toy scale):
- byte-level BPE with the full 256-byte alphabet, so *any* text encodes and decodes exactly (no unknown token);
- digits are always split into single-digit tokens (like Qwen / Llama-3), so arithmetic is done digit by digit and
  no number is a merge;
- ~100 merges learned from toy questions, solutions and the pipeline's instruction, so words like " answer" and
  "\\boxed" are single tokens (training stops when no pair repeats, below the 384 cap);
- special tokens `<|endoftext|>` (pad; also named bos, never added automatically, as in Qwen), `<|im_start|>`,
  `<|im_end|>` (eos: generation stops there);
- a Qwen-style ChatML jinja `chat_template`.
Models pad their embedding table to the next multiple of 16 (`padded_vocab_size`, like Qwen's 151,936 rows for a
151,669-token tokenizer), so vocab-parallel sharding at TP = 2, 4, 8, 16 divides evenly; the padding rows are never
produced by the tokenizer.

Building it is deterministic: the training text is a fixed function of `problems.SHIPPED_SEED`, independent of the
build seed (teacher and student always share this tokenizer).
"""

from __future__ import annotations

import random
from pathlib import Path

from megatron_s2d.data.prompts import DEFAULT_INSTRUCTION
from megatron_s2d.toy import problems

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = PAD_TOKEN
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EOS_TOKEN = IM_END
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
MAX_VOCAB_SIZE = 384  # BPE trainer cap; training stops earlier when no pair repeats (~360 tokens)
VOCAB_MULTIPLE = 16
MODEL_MAX_LENGTH = 256

# Same message layout as Qwen's ChatML template (without tools / thinking blocks).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The pipeline's default instruction (data.prompts) is in the BPE corpus so that it tokenizes compactly.
_EXTRA_TEXTS = (DEFAULT_INSTRUCTION, "system\nuser\nassistant\nYou are a helpful assistant.")


def chat_text(prompt: str, response: str | None = None) -> str:
    """The exact string `CHAT_TEMPLATE` renders for one user turn (+ generation prompt), plus `response` and the
    closing `<|im_end|>` when a response is given. Used to build pre-training text without a tokenizer object."""
    text = f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n"
    return text if response is None else text + response + IM_END


def training_corpus(n_items: int = 3000) -> list[str]:
    """Fixed text the BPE merges are learned from: toy questions, solutions, role names and the instruction.

    Special-token strings are left out on purpose: they are matched whole before BPE runs, so merges of their
    pieces ("<|", "im") would only waste vocabulary.
    """
    rng = random.Random(f"toy-tokenizer/{problems.SHIPPED_SEED}")
    texts = list(_EXTRA_TEXTS * 1000)
    for i in range(n_items):
        item = problems.sample_item(rng, problems.LEVELS[i % len(problems.LEVELS)])
        texts.append(problems.render_prompt(item, rng))
        texts.append(problems.solution_text(item, hedged=i % 2 == 1))
    return texts


def build_tokenizer():
    """Train the BPE and wrap it as a `transformers.PreTrainedTokenizerFast` (with chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START], model_max_length=MODEL_MAX_LENGTH, padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def padded_vocab_size(n_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Model embedding rows: the tokenizer size rounded up to `multiple` (16: divisible by TP sizes 1, 2, 4, 8, 16)."""
    return -(-n_tokens // multiple) * multiple


def save_tokenizer(out_dir: Path):
    """Build and `save_pretrained` the tokenizer into `out_dir`; returns the tokenizer."""
    hf = build_tokenizer()
    hf.save_pretrained(str(out_dir))
    return hf
