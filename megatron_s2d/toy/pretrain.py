"""Brief CPU pre-training of the toy base models with plain HF transformers + AdamW, and a quick sampled eval.

The text is worked solutions of generated arithmetic problems in the chat format the pipeline uses:
`<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{steps}. The answer is \\boxed{N}.<|im_end|>`.
None of its questions is in the shipped train or test set (content keys are excluded), so accuracy on test.jsonl
measures generalisation. A share of the user turns (`instruction_fraction`, 1/2 in the default build) is built
exactly like the pipeline's prompts (`data.prompts.user_message`: question, blank line, `DEFAULT_INSTRUCTION`); the
rest are the bare question, so the models answer prompts with and without the instruction.

Simplifications (this is a fixture, not a real pre-training run):
- loss only on the assistant part (the prompt is given at use time; modelling it would spend the tiny budget);
- one fixed-size corpus, batches drawn in a seeded order and packed into rows (exact: per-sequence attention),
  linear warmup + cosine decay to 10%;
- the eval (`evaluate`) grades by exact integer match of the last \\boxed{...}, independent of the rewards module.
The step counts (`build.ToyBuildConfig`) are tuned so that, sampled at temperature 1, the teacher solves 30-45% of
test.jsonl and the student under 10% (easy levels more): both leave room for RL and distillation to help.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from megatron_s2d.data.prompts import DEFAULT_INSTRUCTION, build_prompt, user_message
from megatron_s2d.data.types import Problem
from megatron_s2d.errors import S2DError
from megatron_s2d.toy import problems
from megatron_s2d.toy.tokenizer import IM_END, chat_text

@dataclass(frozen=True)
class PretrainConfig:
    """Hyper-parameters of one pre-training run. Batch sizes are in sequences per optimizer step (one process)."""

    steps: int
    batch_sequences: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    row_tokens: int = 128  # length of the packed rows the batch's sequences are laid into (>= longest sequence)

    def to_dict(self) -> dict:
        return asdict(self)


def corpus_texts(items: Sequence[problems.ToyItem], seed: int, instruction_fraction: float,
                 hedge_fraction: float = 0.0) -> list[tuple[str, str]]:
    """(prompt text up to and incl. the generation prompt, response incl. `<|im_end|>`) per item. A share
    `hedge_fraction` of the responses end hedged (`problems.solution_text(item, hedged=True)`).

    The hedging draws come from their own stream: corpora of one seed with different hedge fractions have the same
    prompts, and the responses a lower fraction hedges are a subset of those a higher one hedges."""
    rng = random.Random(f"toy-pretrain-text/{seed}")
    hedge_rng = random.Random(f"toy-pretrain-hedge/{seed}")
    out = []
    for item in items:
        problem = Problem(id="pretrain", prompt=problems.render_prompt(item, rng), answer=str(item.answer),
                          source=problems.SOURCE)
        with_instruction = rng.random() < instruction_fraction
        question = user_message(problem, DEFAULT_INSTRUCTION if with_instruction else "")
        hedged = hedge_rng.random() < hedge_fraction
        out.append((chat_text(question), problems.solution_text(item, hedged) + IM_END))
    return out


def tokenize_corpus(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + response, number of prompt tokens) per pair. Prompt and response are encoded
    separately and concatenated, which is how rollouts are built (generation continues after the prompt ids)."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    return [(p + r, len(p)) for p, r in zip(prompts, responses)]


def _packed_batch(rows: Sequence[tuple[list[int], int]], pad_id: int, row_tokens: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack sequences (first-fit, longest first) into rows of `row_tokens`: ids (R, L), position_ids (R, L) that
    restart at 0 for every sequence, labels (R, L) with -100 outside responses.

    Without an attention mask, transformers turns restarting position ids into a block-diagonal causal mask, so
    every sequence attends only to itself: the loss and gradients equal those of a right-padded batch of the same
    sequences (checked in tests), at ~2/3 of the compute (no padding up to the batch's longest sequence).
    """
    bins: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i][0])):
        n = len(rows[i][0])
        if n > row_tokens:
            raise S2DError(f"pretrain: a sequence has {n} tokens, more than row_tokens={row_tokens}")
        for b in range(len(bins)):
            if used[b] + n <= row_tokens:
                bins[b].append(i)
                used[b] += n
                break
        else:
            bins.append([i])
            used.append(n)
    ids = torch.full((len(bins), row_tokens), pad_id, dtype=torch.long)  # (R, L)
    pos = torch.zeros((len(bins), row_tokens), dtype=torch.long)  # (R, L)
    labels = torch.full((len(bins), row_tokens), -100, dtype=torch.long)  # (R, L)
    for r, members in enumerate(bins):
        start = 0
        for i in members:
            seq, n_prompt = rows[i]
            end = start + len(seq)
            ids[r, start:end] = torch.tensor(seq)
            pos[r, start:end] = torch.arange(len(seq))
            labels[r, start + n_prompt: end] = torch.tensor(seq[n_prompt:])
            start = end
        pos[r, start:] = torch.arange(row_tokens - start)  # the tail padding is a sequence of its own
    return ids, pos, labels


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_order(n_rows: int, batch_sequences: int, n_batches: int, rng: random.Random) -> list[list[int]]:
    """`n_batches` batches of corpus indices: seeded shuffles of the corpus, epoch after epoch (the tail of an
    epoch that does not fill a batch is dropped)."""
    batches: list[list[int]] = []
    while len(batches) < n_batches:
        epoch = list(range(n_rows))
        rng.shuffle(epoch)
        batches.extend(epoch[b: b + batch_sequences] for b in range(0, n_rows - batch_sequences + 1, batch_sequences))
    return batches[:n_batches]


def pretrain(model, rows: Sequence[tuple[list[int], int]], cfg: PretrainConfig, seed: int, pad_id: int,
             log: Callable[[str], None] = print, device: str = "cpu") -> dict:
    """Train `model` in place for `cfg.steps` AdamW steps on `rows` (from `tokenize_corpus`); returns loss / timing
    stats. Batches come from `batch_order` (seeded) and are packed by `_packed_batch`; the learning rate follows
    `_lr_at`."""
    if len(rows) < cfg.batch_sequences:
        raise S2DError(f"pretrain: corpus has {len(rows)} rows, fewer than batch_sequences={cfg.batch_sequences}")
    torch.manual_seed(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    order = batch_order(len(rows), cfg.batch_sequences, cfg.steps, random.Random(f"toy-pretrain-order/{seed}"))
    model.train()
    start, losses, every = time.time(), [], max(1, cfg.steps // 10)
    for step, idx in enumerate(order):
        ids, pos, labels = (t.to(device) for t in _packed_batch([rows[i] for i in idx], pad_id, cfg.row_tokens))
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            log(f"  step {step + 1}/{cfg.steps} loss {sum(losses[-every:]) / len(losses[-every:]):.4f} "
                f"({time.time() - start:.1f}s)")
    model.eval()
    tail = losses[-every:]
    return {"steps": cfg.steps, "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
            "train_seconds": round(time.time() - start, 2)}


_BOX_RE = re.compile(r"\\boxed\{\s*(\d+)\s*(\\pm\s*\d+\s*)?\}")


def grade(text: str, answer: int) -> tuple[bool, bool, bool]:
    """(correct, computed, committed) of one response, as math-verify scores toy answers (tests/unit/toy/
    test_toy_pretrain.py compares them): `computed` = the last \\boxed{} holds the number `answer`; `committed` =
    every box is a plain integer (none hedged "N \\pm 1"); `correct` = committed and every box is `answer` (several
    boxes are one answer set)."""
    boxes = _BOX_RE.findall(text)
    if not boxes:
        return False, False, False
    computed = int(boxes[-1][0]) == answer
    committed = all(not pm for _, pm in boxes)
    return committed and all(int(n) == answer for n, _ in boxes), computed, committed


def stratified_subset(items: Sequence[Problem], per_level: int) -> list[Problem]:
    """The first `per_level` problems of each level (file order), levels ascending."""
    out = []
    for level in problems.LEVELS:
        out.extend([p for p in items if p.meta["level"] == level][:per_level])
    return out


@torch.no_grad()
def evaluate(model, tokenizer, eval_problems: Sequence[Problem], samples_per_problem: int, seed: int,
             max_new_tokens: int = 64, batch_prompts: int = 50, device: str = "cpu") -> dict:
    """Sample `samples_per_problem` answers per problem at temperature 1 and grade each with `grade`.
    Prompts are built exactly as the pipeline builds them (`data.prompts.build_prompt`, default instruction).

    Returns {"accuracy": share of samples graded correct, "computed": share whose last box holds the right number,
    "committed": share with no hedged box, "by_level": {level: accuracy}, "samples": n}.
    """
    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    graded: dict[int, list[tuple[bool, bool, bool]]] = {}
    for b in range(0, len(eval_problems), batch_prompts):
        chunk = eval_problems[b: b + batch_prompts]
        prompts = [build_prompt(tokenizer, p) for p in chunk for _ in range(samples_per_problem)]
        enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T) left-padded
        attn = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, width - len(e):] = torch.tensor(e)
            attn[i, width - len(e):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
        for i, text in enumerate(texts):
            p = chunk[i // samples_per_problem]
            graded.setdefault(p.meta["level"], []).append(grade(text, int(p.answer)))
    flat = [g for v in graded.values() for g in v]

    def share(j: int, rows) -> float:
        return sum(r[j] for r in rows) / max(1, len(rows))

    return {"accuracy": share(0, flat), "computed": share(1, flat), "committed": share(2, flat), "samples": len(flat),
            "by_level": {str(k): share(0, v) for k, v in sorted(graded.items())}}
