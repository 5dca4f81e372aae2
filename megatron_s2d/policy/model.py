"""A megatron-core GPTModel at an explicit TP/PP layout: frozen, it scores (the ``Scorer`` interface).

    groups = model_groups(tp, pp)                          # runtime.groups: the job's layout, or one of its own
    model = MegatronModel(arch, model_cfg, groups, micro_batch_tokens=4096)
    lp = model.logprobs(batch, temperature)                # when groups.is_global; else wrap it in RoutedScorer

Every forward goes through megatron-core's pipeline schedule (``get_forward_backward_func``), so PP=1 and PP>1 share
one code path. Objectives are callables ``(logits_shard (B,T,V/tp), micro_batch) -> (loss, metric sums)``. The layout
is decided once, by the ``ModelGroups`` the model is built with: its process groups, its pipeline stage, whether the
schedule must be handed groups of its own (a layout other than parallel_state's). Training is
``policy.trainer.TrainablePolicy`` on top of this class (the same forward, the same micro-batching).
"""

from __future__ import annotations

import torch

from megatron_s2d.config.schema import ModelConfig
from megatron_s2d.models.arch import ArchSpec
from megatron_s2d.models.build import ModelOptions, build_gpt_model
from megatron_s2d.policy import objectives as O
from megatron_s2d.policy.batching import (block_causal_mask, pack_rows, pad_packed, placeholder_batch,
                                          plan_micro_batches, plan_packs, scatter_rows, slice_batch)
from megatron_s2d.policy.scoring import ScoringMethods

Objective = O.Objective


class MegatronModel(ScoringMethods):
    """A frozen megatron-core GPTModel at the layout of ``groups`` (``runtime.groups.ModelGroups``; None: the job's
    own layout at ``model_cfg.tp/pp``). ``initialize=False`` skips the random init (weights are loaded next: a 70B
    random init costs minutes)."""

    def __init__(self, arch: ArchSpec, model_cfg: ModelConfig, groups=None, seed: int = 1234,
                 initialize: bool = True, micro_batch_tokens: int = 4096):
        from megatron_s2d.runtime.groups import model_groups

        self.arch = arch
        self.model_cfg = model_cfg
        self.micro_batch_tokens = micro_batch_tokens  # per-rank token budget of one micro-batch (every call)
        # "auto" pads for now: the THD path (Transformer Engine) has a GPU test that has not run yet. The plan's
        # value is checked when the plan is loaded (config.validate)
        self.pack_sequences = model_cfg.pack_sequences is True
        self.groups = groups if groups is not None else model_groups(model_cfg.tp, model_cfg.pp)
        g = self.groups
        opts = ModelOptions(dtype=model_cfg.dtype, use_te=model_cfg.use_te, fp8=model_cfg.fp8,
                            recompute=model_cfg.recompute, seed=seed, initialize=initialize)
        # parallel_state's own layout: megatron's defaults; a layout of its own: its groups, handed down explicitly
        module = build_gpt_model(arch, opts) if g.is_global else build_gpt_model(arch, opts,
                                                                                 pg_collection=g.pg_collection)
        pgs = g.pg_collection
        self.tp_group, self.dp_group, self.pp_group = pgs.tp, pgs.dp, pgs.pp
        self.pp_size = g.pp
        self.is_last_stage = g.pp_rank == g.pp - 1
        self.pp_last_rank = torch.distributed.get_global_rank(self.pp_group, g.pp - 1)
        self.uses_te = bool(getattr(module, "s2d_uses_te", False))
        # every forward's token count is padded to this (FP8 GEMM shapes, sequence parallelism: models.build)
        self.token_multiple = int(getattr(module, "s2d_token_multiple", 1))
        module.config.variable_seq_lengths = True  # micro-batches have different shapes (token budget)
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        self.module = module  # the bare GPTModel

    # ----------------------------------------------------------------------------------------------- forward
    def run(self, batch: dict[str, torch.Tensor], objective: Objective, micro_batch_tokens: int,
            forward_only: bool, chunk=None) -> tuple[list[dict], int, int]:
        """``batch`` through the pipeline schedule in micro-batches of at most ``micro_batch_tokens`` tokens (padded
        or packed); ``chunk``: the module the schedule runs (the trainer's DDP wrapper; default the bare model).
        Returns the objective's per-micro-batch outputs (on every pipeline stage), their count and padded tokens."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        chunk = self.module if chunk is None else chunk
        if batch["tokens"].shape[0] == 0:  # an empty share: one zero-weight row keeps this rank in the collectives
            batch = placeholder_batch(batch)
        lengths = batch["lengths"].tolist()
        if self.pack_sequences:
            plan = plan_packs(lengths, micro_batch_tokens, self.token_multiple)
            micro = [dict(pack_rows(batch, rows), rows=torch.tensor(rows)) for rows in plan.groups]
        else:
            plan = plan_micro_batches(lengths, micro_batch_tokens, self.token_multiple)
            micro = [dict(slice_batch(batch, rows, length), rows=torch.tensor(rows))
                     for rows, length in zip(plan.groups, plan.lengths)]
        device = next(self.module.parameters()).device

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            mb = {k: v.to(device) for k, v in mb.items()}
            if "packed_tokens" in mb:
                out = self._packed_forward(model, mb)
            else:
                tokens = mb["tokens"]
                b, t = tokens.shape
                pos = torch.arange(t, device=device).unsqueeze(0).expand(b, t)
                out = model(tokens, pos, None)

            def loss_func(output):
                loss, metrics = objective(output, mb)
                metrics = dict(metrics)
                metrics["rows"] = mb["rows"]
                return loss, torch.tensor(0, dtype=torch.int), metrics

            return out, loss_func

        fb = get_forward_backward_func(pp_size=self.pp_size)
        max_len = max(plan.lengths) if plan.lengths else 1
        own = {}
        if not self.groups.is_global:  # a layout of its own: the schedule must not fall back to parallel_state
            own = dict(pg_collection=self.groups.pg_collection,
                       p2p_communicator=self.groups.p2p_communicator(self.module.config))
        store = fb(forward_step_func=forward_step, data_iterator=iter(micro), model=[chunk],
                   num_microbatches=len(micro), seq_length=max_len, micro_batch_size=1,
                   forward_only=forward_only, **own)
        return self._from_last_stage(store), len(micro), plan.padded_tokens

    def _packed_forward(self, model, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (1, S, V/tp) of a packed micro-batch: attention stays within each sequence. The model runs on the
        row padded to the token multiple (a filler sequence at the end: ``batching.pad_packed``); its logits are cut
        off here, so the objective sees the S real positions only."""
        s = mb["packed_tokens"].shape[1]
        tokens, pos, cu = pad_packed(mb["packed_tokens"], mb["pack_positions"], mb["cu_seqlens"],
                                     self.token_multiple)
        if self.uses_te:  # THD varlen attention; RoPE positions restart at every cu_seqlens boundary
            from megatron.core.packed_seq_params import PackedSeqParams

            cu = cu.to(torch.int32)
            longest = max(int(mb["lengths"].max()), tokens.shape[1] - s)  # the filler is a sequence too
            psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                  max_seqlen_kv=longest)
            out = model(tokens, pos, None, packed_seq_params=psp)
        else:  # local spec: a block-diagonal causal mask; RoPE is relative, so the packed offsets cancel in a block
            out = model(tokens, pos, block_causal_mask(cu.cpu()).to(tokens.device))
        # the last stage returns (1, S', V/tp) logits (a contiguous slice: batch 1); other stages hidden states
        return out[:, :s] if self.module.post_process else out

    def _from_last_stage(self, store: list[dict]) -> list[dict]:
        """The schedule's outputs live on the last pipeline stage: broadcast them to the other stages."""
        if self.pp_size == 1:
            return store
        # CPU tensors: pickled CUDA tensors would be rebuilt on the sender's device index on every receiver
        cpu = [{k: v.detach().cpu() for k, v in d.items()} for d in store] if self.is_last_stage else None
        obj = [cpu]
        torch.distributed.broadcast_object_list(obj, src=self.pp_last_rank, group=self.pp_group)
        return obj[0]

    @torch.no_grad()
    def forward_values(self, batch: dict[str, torch.Tensor], objective: Objective,
                       micro_batch_tokens: int) -> dict[str, torch.Tensor]:
        """Forward only; ``objective`` returns per-row tensors in its metrics (dim 0 = row). Reassembled in batch
        order and padded on dim 1 to the batch's T. Total: an empty batch gets the same keys, (0, T, ...) each."""
        was_training = self.module.training
        self.module.eval()
        try:
            store, _, _ = self.run(batch, objective, micro_batch_tokens, forward_only=True)
        finally:
            self.module.train(was_training)
        n, t = batch["tokens"].shape
        if n == 0:  # the placeholder row of an empty share is not a result: its keys and shapes are (0 rows of each)
            store = [{k: v[:0] for k, v in d.items()} for d in store]
        out = scatter_rows(((d["rows"], {k: v for k, v in d.items() if k != "rows"}) for d in store), n, t)
        # positions past a row's length depend on how rows were grouped into micro-batches: zero them so the
        # result is a function of the row alone
        valid = torch.arange(t)[None, :] < batch["lengths"][:, None]
        for k, v in out.items():
            out[k] = v * valid.view(n, t, *([1] * (v.dim() - 2))).to(v.dtype)
        return out
