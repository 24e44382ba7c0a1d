"""Held-out evaluation: Mean@k and Pass@k over scored records.

Mean@k is the average correctness over the k samples of each prompt, averaged
over prompts (the paper's Mean@32). Pass@k is the chance that at least one of k
samples is correct, estimated without bias from n >= k samples per prompt
(Chen et al. 2021, "Evaluating Large Language Models Trained on Code"):

    pass@k = 1 - C(n - c, k) / C(n, k)      for c correct out of n.

A sample counts as correct when its `math` reward component is 1 (or, without a
`math` component, when its total reward is positive). `hack_rate` is the share of the
correct (credited) samples whose answer looks gamed (grpoctl/hacks.py).

One evaluation path: whoever samples (`grpoctl eval` here, `loop` between steps)
calls `rollout.generate(..., logprobs=False)` with its own model, then
`evaluate_records`, which scores the samples and summarises them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from math import comb

from rich.console import Console
from rich.table import Table

from grpoctl.config import (ModelSettings, PromptSettings, SamplingSettings, ScoreSettings,
                            VllmSettings)
from grpoctl.errors import GrpoctlError
from grpoctl.hacks import hack_rate
from grpoctl.models import check_model_dir, check_vocab, load_policy, load_tokenizer
from grpoctl.prompts import load_prompts, render_prompt, where_of
from grpoctl.records import (NEEDS_ADVANTAGE, STDIO, RecordError, _kind, check_output,
                             group_by_prompt, line_of, read_records, write_records)
from grpoctl.rewards import DEFAULT_TIMEOUT_S, score_records
from grpoctl.rollout import generate, policy_step, tokenize_prompts


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples with c correct (k <= n)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def is_correct(record: dict) -> bool:
    components = record.get("rewards") or {}
    if "math" in components:
        return components["math"] >= 1.0
    return record["reward"] > 0


def breakdown_key(record: dict, by: str, source: str = "<records>", line: int | None = None):
    """The value of `meta[by]` that `eval --by` groups a record under: a string, number,
    boolean or null (absent). A `meta` that is not an object, or a value that is a list
    or an object, is a RecordError naming the field."""
    meta = record.get("meta")
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise RecordError(source, line, "meta", f"expected an object of the prompt's columns "
                          f"(for --by {by}), got {_kind(meta)}")
    value = meta.get(by)
    if isinstance(value, (dict, list)):
        raise RecordError(source, line, f"meta.{by}", f"expected a string or number to group by "
                          f"(--by {by}), got {_kind(value)}")
    return value


def check_by_prompts(prompts: list[dict], by: Sequence[str]) -> None:
    """`eval --model --by`: each prompt's column can be grouped by, checked before sampling,
    so an error names the prompt file and line (the samples have no file of their own)."""
    for field in by:
        for i, p in enumerate(prompts):
            value = (p.get("meta") or {}).get(field)
            if isinstance(value, (dict, list)):
                raise GrpoctlError(f"{where_of(prompts, i)}: field '{field}': expected a string "
                                   f"or number to group by (--by {field}), got {_kind(value)}")


def summarize(records: list[dict], k: int | None = None, by: str | Sequence[str] | None = None,
              source: str = "<records>") -> dict:
    """Mean@k and Pass@k over scored records grouped by prompt_id.

    k defaults to the smallest group size. `by` names a `meta` field (e.g. `subject`,
    `level`), or several, for a per-value breakdown of each under "by". `source` names
    the records in errors (lines as records.line_of finds them).
    """
    fields = [f for f in ([by] if isinstance(by, str) else by or ()) if f]
    groups = group_by_prompt(records)
    n_min = min(len(ix) for ix in groups.values())
    k = n_min if k is None else k  # 0 is refused below, not taken for "unset"
    if not 0 < k <= n_min:
        raise GrpoctlError(f"Pass@k needs 1 <= k <= the samples per prompt ({n_min} here), "
                           f"got k={k}")
    per_prompt = []
    for indices in groups.values():
        correct = [is_correct(records[i]) for i in indices]
        per_prompt.append({
            "mean": sum(correct) / len(correct),
            "pass": pass_at_k(len(correct), sum(correct), min(k, len(correct))),
        })
    summary = _average(per_prompt)
    summary.update({"k": k, "prompts": len(groups), "samples": len(records),
                    "hack_rate": hack_rate(records)})
    for field in fields:
        summary.setdefault("by", {})[field] = _breakdown(records, groups, per_prompt, field,
                                                         source)
    return summary


def _breakdown(records: list[dict], groups: dict[str, list[int]], per_prompt: list[dict],
               by: str, source: str) -> dict:
    """{str(value of meta[by]): Mean@k, Pass@k and prompts of the prompts with that value};
    a group is keyed by its first record, and every other record of it is checked too."""
    keys = [breakdown_key(records[ix[0]], by, source, line_of(records, ix[0]))
            for ix in groups.values()]
    for indices in groups.values():  # every record of a group, not only its first
        for i in indices[1:]:
            breakdown_key(records[i], by, source, line_of(records, i))
    columns = {c for r in records if isinstance(r.get("meta"), dict) for c in r["meta"]}
    if by not in columns:
        raise GrpoctlError(f"--by {by}: no record has meta.{by} (the prompt file's columns "
                           f"are: {', '.join(sorted(columns)) or 'none'})")
    values = sorted(set(keys), key=lambda v: (v is None, str(v)))
    return {str(value): _average([p for p, key in zip(per_prompt, keys) if key == value])
            for value in values}


def _average(per_prompt: list[dict]) -> dict:
    n = len(per_prompt)
    return {"mean_at_k": sum(p["mean"] for p in per_prompt) / n,
            "pass_at_k": sum(p["pass"] for p in per_prompt) / n, "prompts": n}


def evaluate_records(records: list[dict], k: int | None = None, by: str | Sequence[str] = (),
                     rewards: Sequence[str] = ("math",), workers: int | None = None,
                     timeout: float = DEFAULT_TIMEOUT_S, source: str = "<samples>"
                     ) -> tuple[list[dict], dict]:
    """Score sampled completions and summarise them: (scored records, summary).

    The one evaluation path after sampling: `grpoctl eval` and loop's held-out
    evaluation both sample with their own model (`rollout.generate(..., logprobs=False)`)
    and call this. rewards: reward specs (the `math` reward by default, which decides
    correctness); workers and timeout go to the scoring pool (rewards.score_records, no
    progress bar); k, by and source as in `summarize`.
    """
    score = ScoreSettings(rewards=list(rewards), score_workers=workers, score_timeout=timeout)
    scored, _ = score_records(records, score, progress=False)
    return scored, summarize(scored, k=k, by=by, source=source)


def print_summary_table(summary: dict, title: str) -> None:
    """The summary as a rich table on stderr (stdout carries the JSON)."""
    k = summary["k"]
    table = Table(title=title)
    for column in ("", "prompts", f"mean@{k}", f"pass@{k}"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("all", str(summary["prompts"]), f"{summary['mean_at_k']:.4f}",
                  f"{summary['pass_at_k']:.4f}")
    for field, values in (summary.get("by") or {}).items():
        for key, row in values.items():
            table.add_row(f"{field}={key}", str(row["prompts"]), f"{row['mean_at_k']:.4f}",
                          f"{row['pass_at_k']:.4f}")
    if "hack_rate" in summary:  # credited samples whose answer looks gamed (hacks.py)
        table.add_row("hack rate", "", f"{summary['hack_rate']:.4f}", "")
    Console(stderr=True).print(table)


def run_eval(model: ModelSettings, prompts: PromptSettings, sampling: SamplingSettings,
             vllm: VllmSettings | None = None, score: ScoreSettings | None = None,
             samples: int = 4, scored: str | None = None, pass_k: int | None = None,
             greedy: bool = False, by: list[str] = (), save: str | None = None,
             progress: bool = False) -> dict:
    """`grpoctl eval`: sample `samples` completions per prompt with `model` and score them
    with score.rewards (or read a `scored` file instead, model.model None), print a table,
    return the summary. greedy: temperature 0 and one sample per prompt. by: break the
    summary down by these prompt-file columns; save: also write the scored samples.
    backend "vllm" samples with a vLLM engine (rollout/vllm.py) built with `vllm`.
    """
    vllm, score = vllm or VllmSettings(), score or ScoreSettings()
    if (model.model is None) == (scored is None):
        raise GrpoctlError("eval: give either --model (sample and score) or --scored FILE")
    if save == STDIO:
        raise GrpoctlError("--save -: stdout carries the summary; give --save a file")
    if save:
        check_output(save, [scored, prompts.prompts])
    if scored is not None:
        records = read_records(scored, NEEDS_ADVANTAGE)
        summary = summarize(records, k=pass_k, by=by, source=scored)
        title = scored
    else:
        path = model.model
        rows = load_prompts(prompts.prompts, prompt_field=prompts.prompt_field,
                            answer_field=prompts.answer_field, answer_after=prompts.answer_after,
                            id_field=prompts.id_field, limit=prompts.limit)
        check_by_prompts(rows, by)  # before sampling; errors name the prompt file's line
        check_model_dir(path)  # "not a model directory" rather than a tokenizer error
        sampling = sampling.for_model(path)
        if greedy:
            sampling = replace(sampling, temperature=0.0)
        sampling.check()
        tokenizer = load_tokenizer(path, model.trust_remote_code)
        rendered = [dict(p, text=render_prompt(tokenizer, p["text"], prompts.template,
                                               prompts.use_chat_template, prompts.system))
                    for p in rows]
        if sampling.backend == "vllm":
            from grpoctl.rollout.vllm import context_length, load_llm

            length = context_length(path, tokenize_prompts(tokenizer, rendered),
                                    sampling.max_new_tokens)
            policy = load_llm(path, sampling, dtype=model.dtype,
                              trust_remote_code=model.trust_remote_code, logprobs=False,
                              tensor_parallel_size=vllm.tensor_parallel_size,
                              gpu_memory_utilization=vllm.gpu_memory_utilization,
                              enforce_eager=vllm.vllm_eager, max_model_len=length)
        else:
            policy = load_policy(path, model.dtype, model.device, model.trust_remote_code,
                                 model.attn_implementation)
            check_vocab(tokenizer, policy, path)
        # logprobs=False: vLLM then samples at settings whose log-probs it cannot give
        sampled = generate(policy, tokenizer, rendered, 1 if greedy else samples, sampling,
                           batch_size=sampling.batch_size,
                           policy={"path": str(path), "step": policy_step(path)},
                           progress=progress, backend=sampling.backend, logprobs=False)
        records, summary = evaluate_records(sampled, k=pass_k, by=by, rewards=score.rewards)
        title = f"{path} on {prompts.prompts}"
    if save:  # after the summary, so a bad --pass-k writes nothing
        write_records(records, save)
    print_summary_table(summary, title)
    return summary
