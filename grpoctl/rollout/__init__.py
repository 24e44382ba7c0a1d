"""The rollout stage: sample G completions per prompt and record them.

    records = generate(model, tokenizer, prompts, group_size=2, sampling=SamplingParams())

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from grpoctl.errors import GrpoctlError
from grpoctl.models import check_model_dir, check_vocab, load_policy, load_tokenizer, position_limit
from grpoctl.prompts import load_prompts, render_prompt
from grpoctl.records import check_output, write_records

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled.

    Defaults follow the paper's training setting (arXiv 2510.00977, App. C.1,
    itself verl's GRPO defaults): temperature 1 and top-p 1, i.e. sampling from
    the policy itself, which is what the GRPO objective assumes. The paper
    evaluates at temperature 0.7, top-p 0.8, top-k 20 (loop's eval settings).

    temperature: logits are divided by it; 0 means greedy (argmax), and the
        recorded log-probs then use temperature 1.
    top_p: nucleus sampling mass in (0, 1]; 1 = off.
    top_k: sample among the k most likely tokens; 0 = off.
    max_new_tokens: completion budget; longer ones stop with finish "length"
        (the paper uses 4096; 256 here is a CPU-friendly default).
    seed: the same seed gives the same file, byte for byte; every (prompt_id,
        sample) draws from its own stream seeded by (seed, prompt_id, sample).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 0

    def check(self) -> None:
        """Raise GrpoctlError for a value no backend can use."""
        if not 0 <= self.temperature < float("inf"):  # NaN and inf too: not a temperature
            raise GrpoctlError(f"--temperature: expected a finite number >= 0, "
                               f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GrpoctlError(f"--top-p: expected a value in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GrpoctlError(f"--top-k: expected >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise GrpoctlError(f"--max-new-tokens: expected >= 1, got {self.max_new_tokens}")


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


def within_positions(sampling: SamplingParams, prompt_ids: list[list[int]], prompts: list[dict],
                     positions: int | None) -> SamplingParams:
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


def generate(model, tokenizer, prompts: list[dict], group_size: int, sampling: SamplingParams,
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
        sampling: SamplingParams (paper defaults: temperature 1, top-p 1).
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
    if backend not in BACKENDS:
        raise GrpoctlError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if group_size < 1:
        raise GrpoctlError(f"--group-size: expected >= 1, got {group_size}")
    if batch_size < 1:
        raise GrpoctlError(f"--batch-size: expected >= 1, got {batch_size}")
    sampling.check()
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
    settings = {**asdict(sampling), "backend": backend}
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


def run_rollout(model_dir: str, prompts_source: str, output: str = "-", group_size: int = 2,
                sampling: SamplingParams | None = None, batch_size: int = 64, backend: str = "hf",
                prompt_field: str | None = None, answer_field: str | None = None,
                answer_after: str | None = None, id_field: str | None = None,
                limit: int | None = None, shard: str | None = None, template: str = "{prompt}",
                use_chat_template: bool = True, system: str | None = None,
                dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
                progress: bool = True, tensor_parallel_size: int = 1,
                gpu_memory_utilization: float = 0.9,
                attn_implementation: str | None = None, log: bool = True,
                enforce_eager: bool = False) -> list[dict]:
    """`grpoctl rollout`: load prompts and a policy, generate, write records to `output`.

    `output` "-" is stdout.

    Prompts are loaded and rendered before the model, so a bad prompt file fails
    in a second. The policy step comes from the model directory's
    trainer_state.json (0 for a base model). Returns the records written.
    tensor_parallel_size and gpu_memory_utilization go to vLLM (--backend vllm only;
    vLLM's defaults, 1 GPU and 0.9 of its memory); enforce_eager: vLLM without its
    compile step (starts sooner, samples slower). attn_implementation: the hf
    backend's attention kernel (models.load_policy; None = transformers' choice).
    progress: the progress bar (a terminal only); log: a line on stderr when generation
    starts and one when the file is written.
    """
    sampling = sampling or SamplingParams()
    sampling.check()
    if backend not in BACKENDS:
        raise GrpoctlError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    check_output(output, [prompts_source])
    prompts = load_prompts(prompts_source, prompt_field=prompt_field, answer_field=answer_field,
                           answer_after=answer_after, id_field=id_field, limit=limit, shard=shard)
    check_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    rendered = [dict(p, text=render_prompt(tokenizer, p["text"], template, use_chat_template,
                                           system)) for p in prompts]
    prompt_ids = tokenize_prompts(tokenizer, rendered)
    if backend == "vllm":
        from grpoctl.rollout.vllm import context_length, load_llm

        model = load_llm(model_dir, sampling, dtype=dtype, trust_remote_code=trust_remote_code,
                         tensor_parallel_size=tensor_parallel_size,
                         gpu_memory_utilization=gpu_memory_utilization,
                         enforce_eager=enforce_eager,
                         max_model_len=context_length(model_dir, prompt_ids,
                                                      sampling.max_new_tokens))
    else:
        model = load_policy(model_dir, dtype, device, trust_remote_code, attn_implementation)
        check_vocab(tokenizer, model, str(model_dir))
        # refused or cut before the line below says sampling starts (generate's check is
        # then a no-op)
        sampling = within_positions(sampling, prompt_ids, rendered, position_limit(model))
    policy = {"path": str(model_dir), "step": policy_step(model_dir)}
    if log:
        print(f"rollout: {len(prompts)} prompts x {group_size} samples from {model_dir} "
              f"(step {policy['step']}, {backend})", file=sys.stderr, flush=True)
    start = time.perf_counter()
    records = generate(model, tokenizer, rendered, group_size, sampling, batch_size=batch_size,
                       policy=policy, backend=backend, progress=progress)
    write_records(records, output)
    if log:
        tokens = sum(len(r["completion_ids"]) for r in records)
        print(f"rollout: wrote {len(records)} records, {tokens} completion tokens, in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return records
