"""Throughput of the toy-world pre-training step on CPU: packed vs right-padded batches, teacher and student.

    python benchmarks/toy_build.py [--threads 2] [--steps 10] [--batch 64]

Prints seconds per optimizer step, sequences/s and response tokens/s, and process-CPU-seconds per wall-second
(close to the thread count on an idle machine; much lower means other processes compete for the cores and the
wall-clock figures are not representative). The full build's step counts times these step times estimate its
pre-training wall time (`megatron_s2d.toy.build.ToyBuildConfig`).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from megatron_s2d.toy import models, problems
from megatron_s2d.toy import tokenizer as toy_tok
from megatron_s2d.toy.build import LEVEL_WEIGHTS, ToyBuildConfig
from megatron_s2d.toy.pretrain import _packed_batch, corpus_texts, tokenize_corpus


def _padded(rows, pad_id):
    width = max(len(s) for s, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attn, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (seq, n_prompt) in enumerate(rows):
        ids[i, : len(seq)], attn[i, : len(seq)] = torch.tensor(seq), 1
        labels[i, n_prompt: len(seq)] = torch.tensor(seq[n_prompt:])
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "use_cache": False}


def _packed(rows, pad_id, row_tokens):
    ids, pos, labels = _packed_batch(rows, pad_id, row_tokens)
    return {"input_ids": ids, "position_ids": pos, "labels": labels, "use_cache": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    tok = toy_tok.build_tokenizer()
    items = problems.pretrain_items(args.batch * (args.steps + 2), 0, set(), LEVEL_WEIGHTS)
    rows = tokenize_corpus(tok, corpus_texts(items, 0, ToyBuildConfig().instruction_fraction))
    rng = random.Random(0)
    batches = [rng.sample(rows, args.batch) for _ in range(args.steps + 2)]
    cfg = ToyBuildConfig()
    print(f"threads {args.threads}, {args.batch} sequences/step, mean length "
          f"{sum(len(s) for s, _ in rows) / len(rows):.1f} tokens")
    for name, spec, pcfg in (("teacher", cfg.teacher, cfg.teacher_pretrain),
                             ("student", cfg.student, cfg.student_pretrain)):
        hf_cfg = models.make_config(spec, toy_tok.padded_vocab_size(len(tok)), bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for layout in ("padded", "packed"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(hf_cfg)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            inputs = [_padded(b, tok.pad_token_id) if layout == "padded" else
                      _packed(b, tok.pad_token_id, pcfg.row_tokens) for b in batches]
            for i, kw in enumerate(inputs):
                if i == 2:  # two warm-up steps
                    wall, cpu = time.perf_counter(), time.process_time()
                loss = model(**kw).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            resp = sum(int((kw["labels"] != -100).sum()) for kw in inputs[2:])
            print(f"{name:8s} {layout:7s} {wall / args.steps:.4f} s/step  {args.batch * args.steps / wall:7.1f} seq/s  "
                  f"{resp / wall:8.0f} response tok/s  cpu/wall {cpu / wall:.2f}  "
                  f"(build: {pcfg.steps} steps -> ~{pcfg.steps * wall / args.steps:.0f} s)")


if __name__ == "__main__":
    main()
