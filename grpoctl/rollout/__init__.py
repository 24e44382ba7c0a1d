"""The rollout stage: sample G completions per prompt and record them.

    records = generate(model, tokenizer, prompts, group_size=2, sampling=SamplingSettings(...))

returns one record per (prompt, sample), ordered by prompt then sample, with the
fields of docs/records.md: prompt_id, sample, prompt, completion, answer,
prompt_ids, completion_ids, logprobs, finish_reason, policy, sampling, meta.
`grpoctl loop` calls `generate` with the model it trains; `grpoctl rollout`
calls `run_rollout`, which loads the model and the prompts and writes the file.

Two backends produce the same records: `hf` (transformers, rollout/hf.py: any
device, the reference) and `vllm` (rollout/vllm.py: GPU, much faster on big
models, an optional extra).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from grpoctl.config import ModelSettings, PromptSettings, SamplingSettings, VllmSettings
from grpoctl.errors import GrpoctlError
from grpoctl.models import check_model_dir, check_vocab, load_policy, load_tokenizer, position_limit
from grpoctl.prompts import load_prompts, render_prompt
from grpoctl.records import check_output, write_records

def stop_token_ids(tokenizer, model=None) -> set[int]:
    """Tokens that end a completion: the tokenizer's EOS and `model.generation_config`'s EOS ids.

    Instruct models often list several (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>).
    """
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    if not ids:
        raise GrpoctlError("the tokenizer has no EOS token, so completions could never stop; "
                           "set eos_token in tokenizer_config.json")
    return ids


def tokenize_prompts(tokenizer, prompts: list[dict]) -> list[list[int]]:
    """Token ids of each prompt's (rendered) text, adding no special tokens of their own."""
    ids = [tokenizer(p["text"], add_special_tokens=False)["input_ids"] for p in prompts]
    for p, row in zip(prompts, ids):
        if not row:
            raise GrpoctlError(f"prompt {p['prompt_id']}: no tokens (empty prompt text)")
    return ids


def within_positions(sampling: SamplingSettings, prompt_ids: list[list[int]], prompts: list[dict],
                     positions: int | None) -> SamplingSettings:
    """`sampling` with max_new_tokens cut to what the longest prompt leaves of the model's
    positions (said on stderr; the records hold the budget used). A prompt that fills
    them is an error naming it. As vLLM caps a completion at its max_model_len."""
    if positions is None or not prompt_ids:
        return sampling
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    room = positions - len(prompt_ids[longest])
    if room < 1:
        raise GrpoctlError(f"prompt {prompts[longest]['prompt_id']!r} is "
                           f"{len(prompt_ids[longest])} tokens: the model has "
                           f"{positions} positions, no room for a completion")
    if sampling.max_new_tokens <= room:
        return sampling
    print(f"warning: --max-new-tokens {sampling.max_new_tokens} cut to {room}: the longest "
          f"prompt is {len(prompt_ids[longest])} tokens and the model has {positions} "
          "positions", file=sys.stderr, flush=True)
    return replace(sampling, max_new_tokens=room)


def generate(model, tokenizer, prompts: list[dict], group_size: int, sampling: SamplingSettings,
             batch_size: int = 64, policy: dict | None = None, backend: str = "hf",
             progress: bool = True, logprobs: bool = True) -> list[dict]:
    """Sample `group_size` completions for each prompt; one record per completion.

    Args:
        model: a transformers causal LM (backend "hf") or a vllm.LLM (backend
            "vllm", made by rollout.vllm.load_llm), already loaded.
        tokenizer: its tokenizer (models.load_tokenizer).
        prompts: [{"prompt_id", "text", "answer", "meta"}] with `text` already
            rendered (prompts.render_prompt); it is tokenized as is, with no
            special tokens added.
        group_size: G, completions per prompt (2 = the paper's 2-GRPO).
        sampling: SamplingSettings (paper defaults: temperature 1, top-p 1).
        batch_size: sequences decoded together by the hf backend (default 64);
            a prompt's G samples are separate rows. vLLM schedules by itself.
        policy: {"path", "step"} recorded in every record (default: unknown, 0).
        backend: "hf" or "vllm". There is no fallback from one to the other.
        progress: a progress bar over prompts on stderr.
        logprobs: False lets the vllm backend skip the log-probs (its records then
            have no `logprobs` field), so evaluation can sample at settings whose
            log-probs vLLM cannot give (rollout/vllm.py); hf always records them.
    Returns records ordered by prompt, then sample 0..G-1.
    """
    # every value in its declared range (config.SamplingSettings), the arguments included
    replace(sampling, group_size=group_size, batch_size=batch_size, backend=backend).check()
    if sampling.max_new_tokens is None:
        raise GrpoctlError("--max-new-tokens: no budget given (SamplingSettings.for_model "
                           "fills in the model's default)")
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    stop_ids = stop_token_ids(tokenizer, model)
    rows = [(i, s) for i in range(len(prompts)) for s in range(group_size)]

    if backend == "vllm":
        from grpoctl.rollout.vllm import sample_vllm

        results = sample_vllm(model, prompts, prompt_ids, group_size, sampling, stop_ids, progress,
                              with_logprobs=logprobs)
    else:
        sampling = within_positions(sampling, prompt_ids, prompts, position_limit(model))
        results = _sample_hf(model, tokenizer, prompts, prompt_ids, rows, sampling, stop_ids,
                             batch_size, progress)

    policy = dict(policy or {"path": "unknown", "step": 0})
    # temperature, top_p, top_k, max_new_tokens, seed, backend
    settings = {**sampling.recorded(), "backend": backend}
    records = []
    for (i, sample), (completion_ids, token_logprobs, finish) in zip(rows, results):
        p = prompts[i]
        record = {
            "prompt_id": p["prompt_id"],
            "sample": sample,
            "prompt": p["text"],
            "completion": tokenizer.decode(completion_ids, skip_special_tokens=True),
            "answer": p.get("answer"),
            "prompt_ids": prompt_ids[i],
            "completion_ids": completion_ids,
            "logprobs": token_logprobs,
            "finish_reason": finish,
            "policy": dict(policy),
            "sampling": dict(settings),
            "meta": p.get("meta") or {},
        }
        if len(token_logprobs) != len(completion_ids):  # vLLM asked for none: no field
            del record["logprobs"]
        records.append(record)
    return records


def _sample_hf(model, tokenizer, prompts, prompt_ids, rows, sampling, stop_ids, batch_size,
               progress):
    from grpoctl.rollout.attention import decode_attention
    from grpoctl.rollout.hf import sample_batch, sequence_seed
    from grpoctl.rollout.packed import packed_linears

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    results = []
    was_training = model.training
    model.eval()  # no dropout while sampling, whatever mode the trainer left the model in
    try:
        with packed_linears(model, min(batch_size, len(rows))), decode_attention(model), \
                _progress_bar(progress, len(prompts)) as advance:
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                seeds = [sequence_seed(sampling.seed, prompts[i]["prompt_id"], s) for i, s in batch]
                results += sample_batch(model, [prompt_ids[i] for i, _ in batch], seeds,
                                        sampling.max_new_tokens, sampling.temperature,
                                        sampling.top_p, sampling.top_k, stop_ids, pad_id)
                # A prompt counts as done once its last sample is.
                advance(sum(1 for i, s in batch if s == rows[-1][1]))
    finally:
        model.train(was_training)
    return results


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int):
    """`with _progress_bar(on, total) as advance: advance(n)`: a rich bar on stderr, or nothing."""
    if not enabled:
        yield lambda n: None
        return
    columns = (TextColumn("rollout"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("rollout", total=total)
        yield lambda n: progress.advance(task, n)


def policy_step(model_dir: str | Path) -> int:
    """The training step of a checkpoint, by checkpoint.read_trainer_state's rule (the one
    `update` continues from): `step` in its trainer_state.json (grpoctl's own, or
    `global_step` from a transformers Trainer checkpoint), 0 for a base model."""
    from grpoctl.checkpoint import trainer_step

    return trainer_step(model_dir)


def run_rollout(prompts: PromptSettings, model: ModelSettings, sampling: SamplingSettings,
                vllm: VllmSettings | None = None, output: str = "-", shard: str | None = None,
                progress: bool = True, log: bool = True) -> list[dict]:
    """`grpoctl rollout`: load prompts and a policy, generate, write records to `output`.

    `output` "-" is stdout; shard "I/N" takes every N-th prompt from the I-th
    (prompts.load_prompts). Prompts are loaded and rendered before the model, so a bad
    prompt file fails in a second. The policy step comes from the model directory's
    trainer_state.json (0 for a base model). `vllm` goes to the engine (--backend vllm
    only; default VllmSettings()). progress: the progress bar (a terminal only); log: a
    line on stderr when generation starts and one when the file is written. Returns the
    records written.
    """
    model_dir, vllm = model.model, vllm or VllmSettings()
    sampling = sampling.for_model(model_dir)
    sampling.check()
    prompts_source, group_size = prompts.prompts, sampling.group_size
    check_output(output, [prompts_source])
    prompt_rows = load_prompts(prompts_source, prompt_field=prompts.prompt_field,
                               answer_field=prompts.answer_field, answer_after=prompts.answer_after,
                               id_field=prompts.id_field, limit=prompts.limit, shard=shard)
    check_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir, model.trust_remote_code)
    rendered = [dict(p, text=render_prompt(tokenizer, p["text"], prompts.template,
                                           prompts.use_chat_template, prompts.system))
                for p in prompt_rows]
    prompt_ids = tokenize_prompts(tokenizer, rendered)
    backend = sampling.backend
    if backend == "vllm":
        from grpoctl.rollout.vllm import context_length, load_llm

        policy = load_llm(model_dir, sampling, dtype=model.dtype,
                          trust_remote_code=model.trust_remote_code,
                          tensor_parallel_size=vllm.tensor_parallel_size,
                          gpu_memory_utilization=vllm.gpu_memory_utilization,
                          enforce_eager=vllm.vllm_eager,
                          max_model_len=context_length(model_dir, prompt_ids,
                                                       sampling.max_new_tokens))
    else:
        policy = load_policy(model_dir, model.dtype, model.device, model.trust_remote_code,
                             model.attn_implementation)
        check_vocab(tokenizer, policy, str(model_dir))
        # refused or cut before the line below says sampling starts (generate's check is
        # then a no-op)
        sampling = within_positions(sampling, prompt_ids, rendered, position_limit(policy))
    source = {"path": str(model_dir), "step": policy_step(model_dir)}
    if log:
        print(f"rollout: {len(prompt_rows)} prompts x {group_size} samples from {model_dir} "
              f"(step {source['step']}, {backend})", file=sys.stderr, flush=True)
    start = time.perf_counter()
    records = generate(policy, tokenizer, rendered, group_size, sampling,
                       batch_size=sampling.batch_size, policy=source, backend=backend,
                       progress=progress)
    write_records(records, output)
    if log:
        tokens = sum(len(r["completion_ids"]) for r in records)
        print(f"rollout: wrote {len(records)} records, {tokens} completion tokens, in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return records
