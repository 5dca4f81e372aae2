"""The memory phases of a colocated generation: the trainer and the rollout engine take turns on each GPU.

    engine = ColocatedEngine(vllm_or_routed, vllm=vllm_engine, trainer=TrainerMemory(policy), source=policy)
    result = engine.generate(prompts, params)   # offload -> wake weights -> refit -> wake kv -> generate -> sleep -> restore
    result.sync                                  # the refit it started with (refit_s, refit_gb, sync_max_logprob_diff)
    engine.sync_weights(policy)                  # lazy: the next generation refits
    with engine.generation():                    # one phase around several generate calls (teacher rollouts, eval)
        ...

Why. vLLM reserves ``gpu_memory_utilization x total`` once, at start-up (vLLM 0.32 ``v1/worker/utils.py:716-772``,
KV cache = reserve - non-KV, ``v1/worker/gpu_worker.py:634-806``), and maps it again at every wake-up, outside
PyTorch's caching allocator (``device_allocator/cumem.py``). Megatron holds weights, fp32 grad buffers, optimizer
state and cached activation blocks. On one GPU the two fit only in turns, so around every generation (a stage's
rollouts, the forward-KL warmup's teacher rollouts, the final evaluation) this module runs:

    offload    megatron's grad buffers freed (megatron-core 0.16.1 ``DistributedDataParallel.offload_grad_buffers``,
               ``distributed/distributed_data_parallel.py:575-605``: storage resized to 0, views kept) and the optimizer
               state moved to host memory (:func:`_offload_optimizer`); then gc.collect + torch.cuda.empty_cache
    wake       vLLM's weights only: ``wake_up(tags=["weights"])``                                   } vLLM only
    refit      the source model's weights (always after a level-2 sleep, see below)                 }
    empty      empty_cache: the refit's temporaries go back before the KV cache is mapped            }
    wake kv    ``wake_up(tags=["kv_cache"])``; with ``verify_sync``, the engine-vs-trainer probe   }
    generate
    sleep      vLLM level 2 (``VLLMEngine.sleep`` says why level 2 is safe)                         } vLLM only
    restore    optimizer state back on the device, grad buffers reallocated (megatron zeroes them: the next train
               step zeroes them anyway)

So vLLM is asleep whenever the trainer scores, trains, saves a checkpoint or evaluates. The refit is lazy
(``sync_weights`` marks the engine stale): after a level-2 sleep the weights must be loaded after the wake-up that
precedes generation, and a stage's last update is never refit for nothing. This is the order of NeMo-RL
(``nemo_rl/algorithms/grpo.py:2342-2417``: offload_before_refit, prepare_for_generation(tags=["weights"]), refit,
offload_after_refit, prepare_for_generation(tags=["kv_cache"])), verl (``verl/workers/megatron_workers.py:676-733``)
and Megatron-RL (``megatron/rl/rl_utils.py:1610-1730`` at core_v0.16.1: offload_grad_buffers + optimizer
offload_to_cpu around inference).

On CPU nothing much is freed (vLLM's sleep mode is GPU-only; the optimizer state is already on the host), but the
grad buffers' storage is released and the order is the same; ``trace`` records it (tests check it against the plan).
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

import torch

from megatron_s2d.errors import InternalError
from megatron_s2d.rollout.base import GenerationResult, SamplingParams

__all__ = ["ColocatedEngine", "TrainerMemory", "free_cache", "note", "offloaded"]


def free_cache() -> None:
    """Return PyTorch's cached device blocks to the driver (gc first: tensors held only by reference cycles)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def note(trace: list[str] | None, phase: str) -> None:
    if trace is not None:
        trace.append(phase)


@contextlib.contextmanager
def offloaded(trainer: "TrainerMemory | None", trace: list[str] | None = None) -> Iterator[None]:
    """Inside the block the trainer's grads and optimizer state are off the device and the cache is emptied (a
    generation phase; also where a vLLM engine starts, so that it measures the free memory every later wake-up sees)."""
    if trainer is not None:
        trainer.offload()
    free_cache()
    note(trace, "offload")
    try:
        yield
    finally:
        if trainer is not None:
            trainer.restore()
        note(trace, "restore")


@contextlib.contextmanager
def _storage_api() -> Iterator[None]:
    """megatron-core 0.16.1 frees and reallocates grad buffers through ``Tensor.storage().resize_()``
    (distributed/param_and_grad_buffer.py:968-970), which torch warns is deprecated on every call; the warning is megatron's,
    not something a user can act on, so it is not shown (it named our CPU shim's frame on the console)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
        yield


def _optimizers(optimizer) -> list:
    """The megatron optimizers inside ``optimizer`` (a ``ChainedOptimizer`` holds one per param-group kind)."""
    if optimizer is None:
        return []
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


class TrainerMemory:
    """What a trainable megatron policy gives back while an engine generates: its DDP grad buffers and its optimizer
    state. ``policy``: a ``policy.trainer.TrainablePolicy`` (frozen models have nothing to give back)."""

    def __init__(self, policy):
        if getattr(policy, "optimizer", None) is None:
            raise InternalError("TrainerMemory needs a trainable policy (one with an optimizer)")
        self.ddp, self.optimizer = policy.model, policy.optimizer
        # the optimizer's own tensors are moved; a tensor that shares storage with a model weight is the weight
        self._weights = {p.untyped_storage().data_ptr() for p in self.ddp.parameters()}
        self._moved: list[tuple[dict, object, torch.device]] = []  # (holder, key, device) of what went to the host
        self.offloaded = False

    def offload(self) -> None:
        if self.offloaded:
            raise InternalError("TrainerMemory.offload: already offloaded (phases must not nest)")
        cuda = torch.cuda.is_available()
        # torch.cuda.synchronize() raises without CUDA: megatron's default (synchronize=True) is GPU-only
        with _storage_api():
            self.ddp.offload_grad_buffers(synchronize=cuda, empty_cache=False)
        for opt in _optimizers(self.optimizer):
            self._offload_optimizer(opt)
        self.offloaded = True

    def restore(self) -> None:
        if not self.offloaded:
            raise InternalError("TrainerMemory.restore: nothing was offloaded")
        for holder, key, dev in self._moved:
            if isinstance(holder, torch.Tensor):  # a param-group tensor: its .data moves, the object stays
                holder.data = holder.data.to(dev)
            else:
                holder[key] = holder[key].to(dev)
        self._moved.clear()
        with _storage_api():
            self.ddp.restore_grad_buffers(synchronize=torch.cuda.is_available())  # zeroes the buffers
        self.offloaded = False

    def _offload_optimizer(self, opt) -> None:
        """Move the device tensors of one optimizer's state (Adam moments) and param groups (fp32 main params) to
        host memory. The loops of megatron-core 0.16.1 ``MegatronOptimizer.offload_to_cpu`` (``optimizer/
        optimizer.py:344-380``), with two differences that matter here:
          - param-group tensors that share storage with a model weight stay: with the non-distributed fp32 optimizer
            (``FP32Optimizer``: fp32 models, and every job on gloo) the param groups *are* the model's parameters,
            and with the distributed optimizer at fp32 they are views into its param buffer
            (``distrib_optimizer.py:421``): megatron's version would move the weights the engine generates from,
            or cut those views so that later steps update a detached copy;
          - ``restore`` moves back exactly what was moved: megatron's ``restore_from_cpu`` moves *every* host tensor
            to the device, including torch Adam's step counter, which its non-capturable path keeps on the host.
        On CPU nothing is a device tensor: nothing moves (megatron's version is a no-op there too)."""
        inner = getattr(opt, "optimizer", None)
        if inner is None or getattr(opt, "is_stub_optimizer", False):
            return
        for group in inner.param_groups:
            for p in group["params"]:
                if p.is_cuda and p.untyped_storage().data_ptr() not in self._weights:
                    self._moved.append((p, None, p.device))
                    p.data = p.data.cpu()
        for state in inner.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.is_cuda:
                    self._moved.append((state, k, v.device))
                    state[k] = v.cpu()


class ColocatedEngine:
    """A ``RolloutEngine`` that runs the memory phases of the module docstring around every generation.

    Args:
        engine: what generates: a ``MegatronSampler``, a ``VLLMEngine``, or a ``RoutedEngine`` around either.
        vllm: the ``VLLMEngine`` inside ``engine`` (None for the megatron sampler): its wake-ups, refits and sleeps
            run here, on every rank (a routed replica with no prompts still takes part in the collective refit).
        trainer: the :class:`TrainerMemory` of the job's trainable policy (None: nothing to offload).
        source: the model vLLM's weights come from (the policy, or a frozen teacher); the first generation refits.
        trace: a list the phase names are appended to, in order (tests read it); None: not recorded.
    """

    def __init__(self, engine, *, vllm=None, trainer: TrainerMemory | None = None, source=None,
                 trace: list[str] | None = None):
        self.engine, self.vllm, self.trainer, self.trace = engine, vllm, trainer, trace
        self._source = source if vllm is not None else None  # the model to refit from at the next wake-up
        self._last_source = source  # ... and the one vLLM's weights last came from (refit again after a sleep)
        self._depth = 0  # generation() nesting: only the outermost runs the phases
        self._sync: dict[str, float] = {}  # the refit of the current phase (reported once, by its first generate)

    def _note(self, phase: str) -> None:
        note(self.trace, phase)

    # ------------------------------------------------------------------------------------------- phases
    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        """One generation phase (offload, wake, refit, generate..., sleep, restore); nested calls join the outer."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        with offloaded(self.trainer, self.trace):
            self._depth = 1
            try:
                self._sync = self._wake()
                yield
            finally:
                self._depth = 0
                self._sleep()

    def _wake(self) -> dict[str, float]:
        v = self.vllm
        if v is None:
            return {}
        v.wake_up(["weights"])
        self._note("wake:weights")
        sync: dict[str, float] = {}
        if self._source is not None or not v.weights_current:
            source = self._source if self._source is not None else self._last_source
            sync = v.refit(source)
            self._last_source, self._source = source, None
            self._note("refit")
        free_cache()  # the refit's temporaries (gathered slices, vLLM's layerwise reload buffers)
        v.wake_up(["kv_cache"])
        self._note("wake:kv_cache")
        if sync and v.verify_sync:
            sync["sync_max_logprob_diff"] = v.check_sync(self._last_source)
            self._note("verify")
        return sync

    def _sleep(self) -> None:
        if self.vllm is not None:
            self.vllm.sleep()
            self._note("sleep")

    # ------------------------------------------------------------------------------------------- protocol
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        """``engine.generate`` inside a generation phase; ``result.sync`` holds the refit the phase started with."""
        with self.generation():
            result = self.engine.generate(prompts, params)
            self._note("generate")
            result.sync, self._sync = self._sync, {}
        return result

    def sync_weights(self, policy) -> dict[str, float]:
        """Lazy: the next generation refits from ``policy`` (its metrics come back in that result's ``sync``)."""
        if self.vllm is not None:
            self._source = policy
            self._note("stale")
        return {}

    def sleep(self) -> None:
        """The engine is asleep outside :meth:`generation` already; kept for the ``RolloutEngine`` protocol."""
        if not self._depth:
            self._sleep()

    def close(self) -> None:
        self.engine.close()
        self._note("close")
