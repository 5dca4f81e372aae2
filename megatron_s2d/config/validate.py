"""Plan validation: everything that can be checked before a single process starts.

Checks the stage DAG (unknown stages, cycles, the right model per stage kind), label hygiene (a stage may not consume
labels an ancestor consumed unless it is marked ``replay``), stage names (safe folder names and override keys),
value ranges, and the layout of every stage job: world size, data-parallel split of the prompts, mini-batches per
rank (``batch_layout_errors``, also run by the dry run). Checks that need the model files (architecture vs TP/PP,
tokenizers, each model's context: ``context_errors`` takes the numbers) and the data files run in ``launch.checks``
(the dry run) and ``run.preflight`` (a run, before anything heavy). The facts about each stage kind come from :mod:`megatron_s2d.config.kinds`. Settings that are
allowed but bias an objective (truncated sampling in a policy-gradient stage) are warned about (``PlanWarning``).
"""

from __future__ import annotations

import math
import re
import warnings

from megatron_s2d.config.kinds import KINDS
from megatron_s2d.config.schema import (
    GRPOStageConfig, OPDStageConfig, PlanConfig, RolloutCorrectionConfig, StageBase, TeacherSFTStageConfig,
    WarmupStageConfig,
)
from megatron_s2d.errors import S2DError

__all__ = ["PlanWarning", "ancestors", "batch_layout_errors", "context_errors", "engine_for", "label_ledger",
           "layout_errors", "parents", "plan_warnings", "topo_order", "validate_plan", "vllm_tp"]

# A stage's name is a folder (RUN/stages/<name>/, a job, a script) and the key of its dotted overrides
# (stages.<name>.steps=2): no path separators or dots. Reserved: "base" (init / teacher: the base model) and the
# launcher's own jobs, "base_eval" (stages.layout.BASE_EVAL) and "report" (launch.jobs.REPORT).
STAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
RESERVED_STAGE_NAMES = ("base", "base_eval", "report")


def parents(stage: StageBase) -> list[str]:
    """Stage names this stage reads checkpoints from (its policy init and its teacher)."""
    out = []
    if stage.init != "base":
        out.append(stage.init)
    out += [t for t in stage.teachers() if t != "base"]
    return out


def topo_order(plan: PlanConfig, where: str = "plan") -> list[StageBase]:
    """Stages in dependency order; raises on unknown references and cycles (naming the cycle)."""
    by_name = {s.name: s for s in plan.stages}
    order, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            cycle = path[path.index(name):] + [name]
            raise S2DError(f"{where}: stage graph has a cycle: {' -> '.join(cycle)}")
        state[name] = "active"
        for p in parents(by_name[name]):
            visit(p, path + [name])
        state[name] = "done"
        order.append(by_name[name])

    for s in plan.stages:
        visit(s.name, [])
    return order


def ancestors(plan: PlanConfig, name: str) -> list[str]:
    by_name = {s.name: s for s in plan.stages}
    seen: list[str] = []
    stack = list(parents(by_name[name]))
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.append(n)
            stack.extend(parents(by_name[n]))
    return seen


def _check_clip(w: str, clip) -> None:
    if not 0 <= clip.eps_low < 1 or clip.eps_high < 0:
        raise S2DError(f"{w}.clip: eps_low must be in [0, 1) and eps_high >= 0 (got {clip.eps_low}, {clip.eps_high})")
    if clip.dual_clip_c != 0 and not clip.dual_clip_c > 1:
        raise S2DError(f"{w}.clip.dual_clip_c = {clip.dual_clip_c}: the dual-clip bound must be > 1 (verl uses 3), "
                       "or 0 to turn dual clip off")


def _check_correction(w: str, c) -> None:
    if not c.tis_cap > 0 or not 0 <= c.low <= 1 <= c.high or not 0 <= c.icepop_low <= 1 <= c.icepop_high:
        raise S2DError(f"{w}.rollout_correction: tis_cap must be > 0, low <= 1 <= high and icepop_low <= 1 <= "
                       f"icepop_high (got tis_cap {c.tis_cap}, band [{c.low}, {c.high}], icepop band "
                       f"[{c.icepop_low}, {c.icepop_high}])")
    d = RolloutCorrectionConfig()
    if c.mode == "icepop" and (c.low, c.high) != (d.low, d.high):
        # plans written when low / high were also IcePop's band: say where that band went, instead of ignoring it
        raise S2DError(f"{w}.rollout_correction: low / high = [{c.low}, {c.high}] are the band of a sequence's "
                       "geometric-mean ratio (modes mis, seq_mask_tis); mode icepop reads icepop_low / icepop_high "
                       "(each token's ratio): set those instead")


def _check_kind_fields(s: StageBase, w: str) -> None:
    """Ranges of the fields only one kind has."""
    if isinstance(s, GRPOStageConfig):
        if s.samples_per_prompt < 2:
            raise S2DError(f"{w}.samples_per_prompt = {s.samples_per_prompt}: GRPO needs a group of >= 2 samples")
        _check_clip(w, s.clip)
        _check_correction(w, s.rollout_correction)
        if not s.grpo.kl_clamp > 0 or s.grpo.kl_beta < 0:
            raise S2DError(f"{w}.grpo: kl_beta must be >= 0 and kl_clamp > 0")
    elif isinstance(s, WarmupStageConfig):
        wu = s.warmup
        if wu.mode == "topk" and wu.topk < 1:
            raise S2DError(f"{w}.warmup.topk must be >= 1 for mode = 'topk'")
        if wu.teacher_samples_per_prompt < 1:
            raise S2DError(f"{w}.warmup.teacher_samples_per_prompt = {wu.teacher_samples_per_prompt} must be >= 1")
        if not 0 < wu.teacher_tail_floor < 1:
            raise S2DError(f"{w}.warmup.teacher_tail_floor = {wu.teacher_tail_floor} must be in (0, 1)")
    elif isinstance(s, OPDStageConfig):
        if s.samples_per_prompt < 1:
            raise S2DError(f"{w}.samples_per_prompt = {s.samples_per_prompt} must be >= 1")
        if s.opd.mode == "topk" and s.opd.topk < 1:
            raise S2DError(f"{w}.opd.topk must be >= 1 for mode = 'topk'")
        if s.opd.mode == "topk" and s.opd.task_reward_coef != 0:
            # the top-k reverse KL has no advantage to blend a reward into: the loss would ignore it while the
            # stage still graded every sample and counted its split's labels as consumed
            raise S2DError(f"{w}.opd.task_reward_coef = {s.opd.task_reward_coef}: the task reward enters only the "
                           "advantages of opd.mode 'sampled'; the top-k reverse KL of opd.mode 'topk' does not read "
                           "it. Set opd.task_reward_coef: 0, or opd.mode: sampled")
        if s.opd.task_reward_coef and s.samples_per_prompt < 2:
            raise S2DError(f"{w}.opd.task_reward_coef needs samples_per_prompt >= 2 (the task reward enters through "
                           "its advantage within each prompt's group)")
        _check_clip(w, s.clip)
        _check_correction(w, s.rollout_correction)
        if s.opd.mode == "topk" and s.rollout_correction.mode not in ("none", "auto"):
            raise S2DError(f"{w}.rollout_correction applies to the policy gradient (opd.mode 'sampled'); the top-k "
                           "reverse KL of opd.mode 'topk' is not importance-weighted: set rollout_correction.mode: none")
    elif isinstance(s, TeacherSFTStageConfig):
        sft = s.sft
        if sft.samples_per_prompt < 1 or sft.rounds < 1:
            raise S2DError(f"{w}.sft: samples_per_prompt and rounds must be >= 1 (got {sft.samples_per_prompt}, "
                           f"{sft.rounds})")
        if sft.source == "rejection" and s.steps % sft.rounds:
            raise S2DError(f"{w}.steps = {s.steps} does not divide into sft.rounds = {sft.rounds} rounds (each round "
                           "samples the split, then trains steps / rounds steps on its kept samples); use a multiple "
                           f"of {sft.rounds}")
        if sft.source == "solutions" and sft.rounds != 1:
            raise S2DError(f"{w}.sft.rounds = {sft.rounds} applies to sft.source: rejection (sampling rounds); "
                           "sft.source: solutions trains on the fixed reference solutions: remove sft.rounds")


def _check_stage(plan: PlanConfig, s: StageBase, where: str) -> None:
    by_name = {x.name: x for x in plan.stages}
    w = f"{where}: stages.{s.name}"
    teacher = s.teachers()[0] if s.teachers() else None
    for ref, label in ((s.init, "init"), (teacher, "teacher")):
        if ref not in (None, "base") and ref not in by_name:
            raise S2DError(f"{w}.{label} = {ref!r} names no stage; stages: {sorted(by_name)} (or 'base')")
    if s.init != "base" and by_name[s.init].trains != s.trains:
        raise S2DError(f"{w}.init = {s.init!r}: a {s.kind} stage trains the {s.trains}, but stage "
                       f"{s.init!r} trains the {by_name[s.init].trains}")
    if isinstance(s, (WarmupStageConfig, OPDStageConfig)):  # the kinds with a ``teacher`` field
        if teacher is None:
            raise S2DError(f"{w}.teacher is required for a {s.kind} stage ('base' or the name of a stage that trains "
                           "the teacher: teacher_rl, teacher_sft)")
        if teacher != "base" and by_name[teacher].trains != "teacher":
            raise S2DError(f"{w}.teacher = {teacher!r} is a {by_name[teacher].kind} stage, not one that trains the "
                           "teacher")
    if s.split is None:
        raise S2DError(f"{w}.split is required (one of {sorted(plan.data.split.fractions)})")
    parts = split_parts(s.split)
    unknown = [p for p in parts if p not in plan.data.split.fractions]
    if unknown or len(set(parts)) != len(parts):
        raise S2DError(f"{w}.split = {s.split!r} is not a data split or a union of distinct ones joined by '+' "
                       f"(e.g. '1H+2H'); splits: {sorted(plan.data.split.fractions)}")
    for name in ("steps", "prompts_per_step", "updates_per_step", "micro_batch_tokens", "keep_checkpoints"):
        if getattr(s, name) < 1:
            raise S2DError(f"{w}.{name} = {getattr(s, name)} must be >= 1")
    if s.save_every < 0:
        raise S2DError(f"{w}.save_every = {s.save_every} must be >= 0 (0: only at the end)")
    r = s.rollout
    if r.max_new_tokens >= s.micro_batch_tokens:
        raise S2DError(f"{w}.micro_batch_tokens = {s.micro_batch_tokens} cannot hold one sequence of "
                       f"rollout.max_new_tokens = {r.max_new_tokens} plus its prompt")
    # every stage kind trains on sampled log-probs at the rollout temperature (see policy.objectives): greedy
    # decoding has no sampling distribution to train on
    if not (r.temperature > 0 and math.isfinite(r.temperature)):
        raise S2DError(f"{w}.rollout.temperature = {r.temperature}: a {s.kind} stage trains on the sampling "
                       "distribution softmax(logits / T), so T must be a finite number > 0 (0 = greedy is for "
                       "evaluation only)")
    if not 0 < r.top_p <= 1 or r.top_k < 0 or r.max_new_tokens < 1:
        raise S2DError(f"{w}.rollout: top_p must be in (0, 1], top_k >= 0 and max_new_tokens >= 1")
    if r.max_batch_tokens != "auto" and (not isinstance(r.max_batch_tokens, int) or r.max_batch_tokens < 1):
        raise S2DError(f"{w}.rollout.max_batch_tokens = {r.max_batch_tokens!r}: 'auto' (sized from free memory) or an "
                       "integer >= 1 (the megatron sampler's KV-cache budget in tokens)")
    if s.teachers() and plan.models["teacher"].fp8 == "delayed":
        t, own = plan.models["teacher"], plan.models[s.trains]
        if (t.tp, t.pp) != (own.tp, own.pp):
            raise S2DError(f"{w}: models.teacher.fp8 = 'delayed' with the teacher at a layout of its own "
                           f"(tp={t.tp} pp={t.pp}, the {s.trains} at tp={own.tp} pp={own.pp}): delayed scaling "
                           "all-reduces amaxes over the job's layout (megatron fp8_utils.get_fp8_context), not the "
                           "teacher's; use models.teacher.fp8: tensorwise or blockwise (no cross-rank amax)")
    util = r.vllm.gpu_memory_utilization
    if (util is not None and not 0 < util <= 1) or r.vllm.cpu_kvcache_gib <= 0:
        raise S2DError(f"{w}.rollout.vllm: gpu_memory_utilization must be in (0, 1] (or unset: derived from the memory "
                       "estimate) and cpu_kvcache_gib > 0")
    o = s.optim
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise S2DError(f"{w}.optim.lr = {o.lr} must be a positive number")
    if o.warmup_updates < 0 or not 0 <= o.min_lr <= o.lr:
        raise S2DError(f"{w}.optim: warmup_updates must be >= 0 and 0 <= min_lr <= lr")
    _check_kind_fields(s, w)


def _check_stage_name(name: str, i: int, where: str) -> None:
    if not STAGE_NAME.fullmatch(name):
        safe = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")
        safe = safe if safe[:1].isalpha() else f"s_{safe}"
        raise S2DError(f"{where}: stages[{i}].name = {name!r}: a stage name must match {STAGE_NAME.pattern} (a letter, "
                       f"then letters, digits or '_'): it names the folder RUN/stages/<name>/ and is the key of "
                       f"overrides like stages.<name>.steps=2; e.g. {safe!r}")
    if name in RESERVED_STAGE_NAMES:
        raise S2DError(f"{where}: stages[{i}].name = {name!r} is reserved ('base' is the base model in init / "
                       "teacher; 'base_eval' and 'report' are the launcher's own jobs); choose another name")


def context_errors(plan: PlanConfig, contexts: dict[str, int]) -> list[str]:
    """Token budgets against each model's context. Every sequence is a prompt of up to ``data.max_prompt_tokens``
    plus a response of up to ``max_new_tokens``, and every model that generates or scores it must hold it within its
    ``max_position_embeddings`` (``contexts``: role -> that number, read from the model's config by the caller:
    ``run.preflight`` before a run, ``launch.checks`` in the dry run). A stage's sequences pass through each model its
    job holds (the trained one, the teacher that generates or scores them); evaluation's through each model it
    evaluates (the stages' final policies with ``eval: true``, both base models with ``eval.include_base``)."""
    p = plan.data.max_prompt_tokens
    budgets = [(f"stages.{s.name}.rollout.max_new_tokens", s.rollout.max_new_tokens, s.models(),
                "generates or scores this stage's samples")
               for s in plan.stages]
    evaluated = {s.trains for s in plan.stages if s.eval}
    evaluated |= {"teacher", "student"} if plan.eval.include_base else set()
    budgets.append(("eval.max_new_tokens", plan.eval.max_new_tokens, sorted(evaluated), "is evaluated"))
    out = []
    for field, n, roles, does in budgets:
        for role in roles:
            ctx = contexts[role]
            if p + n > ctx:
                fix = (f"lower {field} to <= {ctx - p}, or data.max_prompt_tokens" if ctx > p
                       else f"lower data.max_prompt_tokens well below {ctx}")
                out.append(f"{field} = {n} + data.max_prompt_tokens = {p} is {p + n} tokens, past the context of "
                           f"models.{role} (max_position_embeddings = {ctx}), which {does}: {fix}")
    return out


def batch_layout_errors(plan: PlanConfig, stage: StageBase) -> list[str]:
    """Problems a stage job would hit at step 0 with the job's layout: its prompts are split over the data-parallel
    ranks of the model it trains (DP = world / (tp x pp)), and every rank cuts its rows into ``updates_per_step``
    mini-batches. Checked when the plan is loaded and by the dry run, naming the stage and the fields."""
    role = stage.trains
    m = plan.models[role]
    world = trainer_world(plan, stage)
    if world < 1 or m.tp < 1 or m.pp < 1 or world % (m.tp * m.pp):
        return []  # reported by the world-size and placement checks
    dp = world // (m.tp * m.pp)
    w = f"stages.{stage.name}"
    if stage.prompts_per_step % dp:
        return [f"{w}.prompts_per_step = {stage.prompts_per_step} does not divide over the {dp} data-parallel ranks "
                f"of models.{role} (world {world} / tp {m.tp} / pp {m.pp}); use a multiple of {dp}"]
    rows = stage.prompts_per_step // dp * stage.rows_per_prompt()
    what = ("warmup.teacher_samples_per_prompt" if isinstance(stage, WarmupStageConfig) else
            "rows per prompt (sft: 1 solution, or at most sft.samples_per_prompt kept samples)"
            if isinstance(stage, TeacherSFTStageConfig) else "samples_per_prompt")
    if stage.updates_per_step > rows:
        return [f"{w}.updates_per_step = {stage.updates_per_step} exceeds the {rows} sequences each data-parallel rank "
                f"trains on per step (prompts_per_step / dp x {what} = {stage.prompts_per_step} / {dp} x "
                f"{stage.rows_per_prompt()}): some updates would have no rows; lower updates_per_step"]
    return []


def split_parts(split: str) -> list[str]:
    """The data splits a stage's ``split`` names: one ("1H") or a union joined by '+' ("1H+2H": all the labels)."""
    return split.split("+")


def label_ledger(plan: PlanConfig) -> dict[str, list[str]]:
    """For every stage, the data splits whose labels it or its ancestors consumed."""
    by_name = {s.name: s for s in plan.stages}
    return {s.name: sorted({part for a in ancestors(plan, s.name) + [s.name] if by_name[a].consumes_labels()
                            for part in split_parts(by_name[a].split)}) for s in plan.stages}


def engine_for(rollout, vllm_installed: bool | None = None) -> str:
    """The engine a stage's rollouts use: 'vllm' or 'megatron' (``auto``: vLLM when installed)."""
    if rollout.engine != "auto":
        return rollout.engine
    if vllm_installed is None:
        import importlib.util

        vllm_installed = importlib.util.find_spec("vllm") is not None
    return "vllm" if vllm_installed else "megatron"


def vllm_tp(plan: PlanConfig, stage: StageBase) -> int:
    """The vLLM tensor-parallel size of a stage's generation (default: the generating model's training tp)."""
    return stage.rollout.vllm.tp or plan.models[stage.samples_from].tp


def _check_generations(plan: PlanConfig, where: str) -> None:
    """Refuse at plan time (and in --dry-run) what no engine can serve, instead of hours into a SLURM job."""
    if plan.eval.engine == "vllm":
        raise S2DError(f"{where}: eval.engine = 'vllm': evaluation inside a plan runs on the megatron sampler in this "
                       "release; set eval.engine: megatron (run `s2d eval --engine vllm` on an exported checkpoint for "
                       "vLLM evaluation)")
    world = plan.launch.nodes * plan.launch.procs_per_node
    for s in plan.stages:
        if s.rollout.engine == "megatron":
            continue
        tp = vllm_tp(plan, s)
        if tp < 1 or world % tp:
            raise S2DError(f"{where}: stages.{s.name}.rollout.vllm.tp = {tp} does not divide the world size {world} "
                           "(vLLM runs world / tp replicas of tp ranks)")


def validate_plan(plan: PlanConfig, where: str = "plan") -> None:
    if not plan.stages:
        raise S2DError(f"{where}: 'stages' is empty")
    names = [s.name for s in plan.stages]
    for i, n in enumerate(names):
        if not n:
            raise S2DError(f"{where}: stages[{i}].name is empty")
        _check_stage_name(n, i, where)
        if names.count(n) > 1:
            raise S2DError(f"{where}: stage name {n!r} is used twice")
        if plan.stages[i].kind not in KINDS:
            raise S2DError(f"{where}: stages.{n}.kind = {plan.stages[i].kind!r}: expected one of {sorted(KINDS)}")
    for role in ("teacher", "student"):
        m = plan.models.get(role)
        if m is None:
            raise S2DError(f"{where}: models.{role} is required")
        if not (m.hf or m.megatron or plan.toy_world):
            raise S2DError(f"{where}: models.{role} needs 'hf' (HF folder) or 'megatron' (checkpoint folder)")
        if m.tp < 1 or m.pp < 1:
            raise S2DError(f"{where}: models.{role}: tp and pp must be >= 1")
    unknown_models = sorted(set(plan.models) - {"teacher", "student"})
    if unknown_models:
        raise S2DError(f"{where}: models: unknown role(s) {unknown_models}; expected 'teacher' and 'student'")
    fr = plan.data.split.fractions
    if not fr or any(v <= 0 for v in fr.values()) or sum(fr.values()) > 1 + 1e-9:
        raise S2DError(f"{where}: data.split.fractions {fr} must be positive and sum to <= 1")
    for s in plan.stages:
        _check_stage(plan, s, where)
    topo_order(plan, where)
    # Label hygiene: a stage must not consume labels an ancestor already consumed, unless marked replay.
    by_name = {s.name: s for s in plan.stages}
    for s in plan.stages:
        if not s.consumes_labels():
            continue
        used = {part: a for a in ancestors(plan, s.name) if by_name[a].consumes_labels()
                for part in split_parts(by_name[a].split)}
        reused = [part for part in split_parts(s.split) if part in used]
        if reused and not s.replay:
            raise S2DError(
                f"{where}: stages.{s.name} would reuse the labels of split {reused[0]!r}, already consumed by ancestor "
                f"stage {used[reused[0]]!r}; use another split, or set replay: true (the matched-replay control)")
    if plan.launch.nodes < 1 or plan.launch.procs_per_node < 1:
        raise S2DError(f"{where}: launch.nodes and launch.procs_per_node must be >= 1")
    d = plan.data
    limits = [("data.pool_limit", d.pool_limit)] + [(f"data.eval[{i}].limit", e.limit) for i, e in enumerate(d.eval)]
    for name, value in [("data.max_prompt_tokens", d.max_prompt_tokens)] + limits:
        if value is not None and value < 1:
            raise S2DError(f"{where}: {name} = {value} must be >= 1" + (" (or null: all)" if "limit" in name else ""))
    if plan.eval.k < 1 or plan.eval.max_new_tokens < 1 or plan.eval.temperature < 0:
        raise S2DError(f"{where}: eval: k and max_new_tokens must be >= 1 and temperature >= 0")
    if not 0 < plan.eval.top_p <= 1 or plan.eval.top_k < 0:
        raise S2DError(f"{where}: eval: top_p = {plan.eval.top_p} must be in (0, 1] and top_k = {plan.eval.top_k} "
                       ">= 0 (0: off)")
    _check_generations(plan, where)
    errors = layout_errors(plan)
    if errors:
        raise S2DError(f"{where}: " + "; ".join(errors))
    for message in plan_warnings(plan):
        warnings.warn(f"{where}: {message}", PlanWarning, stacklevel=2)


class PlanWarning(UserWarning):
    """A setting the plan may use but that changes what a stage's objective means. Shown when the launcher loads the
    plan (each message once); the stage jobs, which load the plan again, do not repeat it."""


def plan_warnings(plan: PlanConfig) -> list[str]:
    """Allowed settings worth a word: truncated sampling in a policy-gradient stage (GRPO, sampled OPD), which no
    ratio or importance weight corrects (see ``RolloutConfig``)."""
    out = []
    for s in plan.stages:
        pg = isinstance(s, GRPOStageConfig) or (isinstance(s, OPDStageConfig) and s.opd.mode == "sampled")
        r = s.rollout
        if pg and (r.top_p < 1 or r.top_k > 0):
            out.append(f"stages.{s.name} samples truncated (rollout.top_p = {r.top_p}, rollout.top_k = {r.top_k}): "
                       "its policy gradient treats the tokens as drawn from the untruncated policy (the log-probs, "
                       "the PPO ratio and the rollout IS weights are all of softmax(z / T) before truncation), so "
                       "the update is biased; set rollout.top_p: 1 and rollout.top_k: 0 for training")
    return out


def separate(stage: StageBase) -> bool:
    """Whether a stage generates on ranks of its own (``rollout.placement: separate``; a stage that does not
    generate ignores the placement settings)."""
    return stage.generates() and stage.rollout.placement == "separate"


def trainer_world(plan: PlanConfig, stage: StageBase) -> int:
    """The ranks of a stage's job that train: all of them, or all but ``rollout.generation_ranks`` (separate)."""
    world = plan.launch.nodes * plan.launch.procs_per_node
    return world - stage.rollout.generation_ranks if separate(stage) else world


def can_separate(stage: StageBase) -> bool:
    """Whether generation ranks of their own can serve a stage: every kind that generates (GRPO, OPD and the
    forward-KL warmup one request per step, rejection SFT its rounds' requests, ``rollout.remote``)."""
    return isinstance(stage, (GRPOStageConfig, OPDStageConfig, WarmupStageConfig, TeacherSFTStageConfig))


def placement_errors(plan: PlanConfig, stage: StageBase) -> list[str]:
    """The placement settings of a stage that generates: generation ranks that exist and hold whole replicas of the
    generating model, trainers that hold whole replicas of the trained one, a staleness only separate ranks allow."""
    r, w = stage.rollout, f"stages.{stage.name}.rollout"
    if not stage.generates():
        return []
    world = plan.launch.nodes * plan.launch.procs_per_node
    out = []
    if r.max_staleness < 0 or r.sync_timeout_s <= 0 or r.transfer_bucket_mib < 1:
        out.append(f"{w}: max_staleness must be >= 0, sync_timeout_s > 0 and transfer_bucket_mib >= 1")
    if r.placement == "auto":  # the launcher chooses (launch.pricing.resolve_placements) and checks the choice
        if r.generation_ranks:
            out.append(f"{w}.generation_ranks = {r.generation_ranks}: placement 'auto' chooses it (the price "
                       "model's cheapest fitting split); remove it, or set placement: separate")
        return out
    if r.placement != "separate":
        if r.max_staleness > 0:
            out.append(f"{w}.max_staleness = {r.max_staleness}: running generation ahead of training needs ranks "
                       "of its own; set rollout.placement: separate (with generation_ranks), or max_staleness: 0")
        return out
    if not can_separate(stage):
        out.append(f"{w}.placement = 'separate': generation ranks do not serve a {stage.kind} stage; use "
                   "rollout.placement: colocated")
    if isinstance(stage, TeacherSFTStageConfig) and r.max_staleness:
        out.append(f"{w}.max_staleness = {r.max_staleness}: a rejection round samples with the weights of every "
                   "update before it (nothing runs ahead of its training steps); set max_staleness: 0")
    gen, n = plan.models[stage.samples_from], r.generation_ranks
    trained = plan.models[stage.trains]
    # a replica on the generation ranks: vLLM's (vllm.tp ranks, every layer on each) or the sampler's (tp x pp)
    vllm = engine_for(r) == "vllm"
    replica, shape = ((vllm_tp(plan, stage), f"rollout.vllm.tp = {vllm_tp(plan, stage)}") if vllm else
                      (gen.tp * gen.pp, f"tp x pp = {gen.tp * gen.pp}"))
    if not 0 < n < world:
        out.append(f"{w}.generation_ranks = {n}: with placement 'separate' between 1 and {world - 1} of the job's "
                   f"{world} ranks (launch.nodes x launch.procs_per_node) generate; the rest train")
    elif n % replica or (world - n) % (trained.tp * trained.pp):
        out.append(f"{w}.generation_ranks = {n}: the {n} generation ranks must hold whole replicas of the "
                   f"{stage.samples_from}'s {'vLLM engine' if vllm else 'sampler'} ({shape}) and the {world - n} "
                   f"trainers whole replicas of the {stage.trains} (tp x pp = {trained.tp * trained.pp})")
    return out


def layout_errors(plan: PlanConfig) -> list[str]:
    """Every divisibility problem of the plan's jobs, in one place: each model's tp x pp divides the world, each
    stage's prompts divide over its data-parallel ranks and every rank has rows for every update. The plan loader
    and the dry run (``launch.checks``) both call this."""
    world = plan.launch.nodes * plan.launch.procs_per_node
    out = [f"models.{role}: tp x pp = {m.tp * m.pp} does not divide the world size {world} (launch.nodes "
           f"{plan.launch.nodes} x launch.procs_per_node {plan.launch.procs_per_node})"
           for role, m in plan.models.items() if m.tp < 1 or m.pp < 1 or world % (m.tp * m.pp)]
    out += [e for s in plan.stages for e in placement_errors(plan, s)]
    return out + [e for s in plan.stages for e in batch_layout_errors(plan, s)]
