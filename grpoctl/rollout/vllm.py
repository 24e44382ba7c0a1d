"""Sampling with vLLM's offline engine (`vllm.LLM`), for GPUs.

Imported only for `--backend vllm`; vllm is an optional extra
(`pip install 'grpoctl[vllm]'`), never a silent fallback to hf.

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

Prompts go in as token ids (the same ids the records hold) and every (prompt,
sample) is its own request with n=1 and the seed grpoctl.rollout.hf uses for
it, so both backends give each sequence its own reproducible random stream.
(The streams differ between backends: same seed, different engine, different
samples.)
"""

from __future__ import annotations

from grpoctl.errors import GrpoctlError

MISSING = "--backend vllm needs the vllm extra: pip install 'grpoctl[vllm]'"


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise GrpoctlError(MISSING) from None
    return vllm


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


def load_llm(model_dir, sampling, dtype: str = "bfloat16", trust_remote_code: bool = False,
             **engine_kwargs):
    """A vllm.LLM for `model_dir` whose returned log-probs match `sampling` (see logprobs_mode).

    engine_kwargs go to vllm.LLM as is (e.g. gpu_memory_utilization, max_model_len).
    """
    from grpoctl.models import check_model_dir

    path = check_model_dir(model_dir)
    mode = logprobs_mode(sampling)
    vllm = _import_vllm()
    llm = vllm.LLM(model=str(path), dtype=dtype, trust_remote_code=trust_remote_code,
                   seed=sampling.seed, logprobs_mode=mode, generation_config="vllm",
                   **engine_kwargs)
    # Kept beside the engine so rollout.stop_token_ids finds the checkpoint's EOS
    # ids (e.g. Qwen-Instruct's <|im_end|>) as it does on a transformers model.
    llm.generation_config = _generation_config(path)
    return llm


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
                stop_ids: set[int], progress: bool = True
                ) -> list[tuple[list[int], list[float], str]]:
    """(completion_ids, logprobs, finish_reason) per (prompt, sample), by prompt then sample."""
    vllm = _import_vllm()
    from grpoctl.rollout.hf import sequence_seed

    wanted = logprobs_mode(sampling)
    have = _engine_logprobs_mode(llm)
    if have is not None and have != wanted:
        raise GrpoctlError(f"the vLLM engine was built with logprobs_mode={have}, these sampling "
                           f"settings need {wanted} (build it with rollout.vllm.load_llm)")

    requests, params = [], []
    for p, ids in zip(prompts, prompt_ids):
        for s in range(group_size):
            requests.append({"prompt_token_ids": ids})
            params.append(vllm.SamplingParams(
                n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k, max_tokens=sampling.max_new_tokens,
                seed=sequence_seed(sampling.seed, p["prompt_id"], s),
                logprobs=0,  # the sampled token's log-prob only
                stop_token_ids=sorted(stop_ids), skip_special_tokens=True))
    outputs = llm.generate(requests, params, use_tqdm=progress)

    results = []
    for out in outputs:  # vLLM returns outputs in request order
        c = out.outputs[0]
        ids = list(c.token_ids)
        logprobs = [float(step[tok].logprob) for tok, step in zip(ids, c.logprobs)]
        if len(logprobs) != len(ids):
            raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(ids)} tokens")
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request finished with {c.finish_reason!r}")
        # No stop strings are set, so "stop" means a stop token, which vLLM keeps
        # at the end of token_ids. Some versions say "length" when that token was
        # also the last one allowed; hf calls that "stop", and so do we.
        finish = "stop" if c.finish_reason == "stop" or (ids and ids[-1] in stop_ids) else "length"
        results.append((ids, logprobs, finish))
    return results
