"""The grpoctl command line: flags, help texts and exit codes, nothing else.

Each command parses its flags and calls one library function; the work lives in
the stage modules (`rollout`, `rewards`, `advantages`, `update`, `loop`). Heavy
imports (torch, transformers, math-verify) happen inside the commands that need
them, so `grpoctl --help`, `score` and `advantage` start fast.

Errors the user can fix (`GrpoctlError`) print one line, `error: ...`, and exit 2.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Annotated, Literal, Optional

import typer

from grpoctl import process
from grpoctl.config import FLAGS, LoopConfig, UpdateSettings
from grpoctl.errors import GrpoctlError

app = typer.Typer(
    name="grpoctl",
    help="GRPO post-training as composable stages: rollout | score | advantage | update, "
    "and `loop` to run them all.\n\n"
    "Every stage reads a JSONL file or `-` (stdin) and writes `-o FILE` or stdout; "
    "progress and logs go to stderr. Records are documented in docs/records.md.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

# --- options shared by several commands ----------------------------------------
# Each is an Annotated type so `rollout`, `loop` and `eval` spell a knob the same way.


def option(panel: str, *names: str, **kwargs):
    """typer.Option shown in the `panel` section of --help (loop has some 80 options)."""
    return typer.Option(*names, rich_help_panel=panel, **kwargs)


Output = Annotated[str, typer.Option("--output", "-o", help="Output file; `-` is stdout.")]
Model = Annotated[str, option(
    "Model", "--model", "-m", help="Model directory (any transformers causal LM), "
    "or `default` for the embedded tiny model.")]
Prompts = Annotated[str, option(
    "Prompts", help="Prompt file (JSONL, JSON, CSV, parquet; `-` = JSONL on stdin) or a built-in "
    "task split: `arith:train`, `arith:test`.")]
PromptField = Annotated[Optional[str], option(
    "Prompts", help="Column holding the prompt [default: first of prompt, problem, question].")]
AnswerField = Annotated[Optional[str], option(
    "Prompts", help="Column holding the gold answer [default: answer].")]
AnswerAfter = Annotated[Optional[str], option(
    "Prompts", help="Keep only the text after the last occurrence of this marker in the answer, "
    "e.g. '#### ' for GSM8K.")]
IdField = Annotated[Optional[str], option(
    "Prompts", help="Column holding a stable prompt id [default: a hash of the prompt text].")]
Limit = Annotated[Optional[int], option("Prompts", help="Use only the first N prompts.")]
Template = Annotated[str, option(
    "Prompts", help="Prompt template; `{prompt}` is replaced by the prompt text.")]
NoChatTemplate = Annotated[bool, option(
    "Prompts", "--no-chat-template", help="Do not apply the tokenizer's chat "
    "template.")]
System = Annotated[Optional[str], option("Prompts", help="System message for the chat template.")]
GroupSize = Annotated[int, option(
    "Sampling", "--group-size", "-G", min=1, help="Completions per prompt (G). 2 is 2-GRPO.")]
Temperature = Annotated[float, option(
    "Sampling", min=0.0, help="Sampling temperature (0 = greedy).")]
TopP = Annotated[float, option("Sampling", min=0.0, max=1.0, help="Nucleus sampling mass.")]
TopK = Annotated[int, option("Sampling", min=0, help="Keep the K most likely tokens (0 = off).")]
MaxNewTokens = Annotated[int, option(
    "Sampling", min=1, help="Generation budget per completion, in tokens.")]
Seed = Annotated[int, option(
    "Sampling", help="Random seed: the same seed gives the same output, byte for byte.")]
BatchSize = Annotated[int, option("Sampling", min=1, help="Sequences generated together.")]
Backend = Annotated[Literal["hf", "vllm"], option(
    "Sampling", help="Generation engine: `hf` (transformers) or `vllm` (needs the vllm extra on a "
    "GPU, or vLLM's CPU build: README, vLLM on CPU).")]
EnforceEager = Annotated[bool, option(
    "vLLM", "--enforce-eager", help="vLLM without its compile step and CUDA graphs: starts sooner, "
    "samples slower (--backend vllm).")]
TensorParallel = Annotated[int, option(
    "vLLM", min=1, help="GPUs vLLM shards the model over (--backend vllm).")]
GpuMemory = Annotated[float, option(
    "vLLM", min=0.01, max=1.0, help="Share of each GPU's memory vLLM takes for weights and KV "
    "cache (--backend vllm).")]
Dtype = Annotated[Literal["float32", "bfloat16", "float16"], option("Model", help="Weights dtype.")]
WarmupSteps = Annotated[int, option(
    "Update", min=0, help="Linear learning-rate warm-up over the first N steps (the paper: 10); 0 "
    "= constant lr.")]
Device = Annotated[str, option("Model", help="Torch device, e.g. cpu or cuda.")]
TrustRemoteCode = Annotated[bool, option(
    "Model", "--trust-remote-code", help="Allow model code from the checkpoint "
    "directory (off: only transformers' own architectures run).")]
Reward = Annotated[Optional[list[str]], option(
    "Score", "--reward", "-r", help="Reward as NAME[=WEIGHT], repeatable: `math`, `format`, "
    "`path/file.py:fn`, `module:fn` [default: math].")]
Workers = Annotated[Optional[int], option(
    "Score", min=0, help="Scoring processes; 0 = in this process, for debugging (soft time "
    "limits only) [default: all cores].")]
ScoreTimeout = Annotated[float, option(
    "Score", "--timeout", min=0.01, help="CPU seconds a completion's check may take (a "
    "loaded machine gets the same rewards); over it the reward is 0.")]
Estimator = Annotated[Literal["group", "pairwise", "rloo"], option(
    "Advantage", help="`group` (GRPO), `pairwise` (2-GRPO) or `rloo`.")]
Std = Annotated[Literal["group", "batch", "none"], option(
    "Advantage", help="`group` (GRPO), `batch`, or `none` (Dr. GRPO). Used by --estimator group.")]
AdvEps = Annotated[float, option(
    "Advantage", min=0.0, help="ε added to the std before dividing (--estimator group).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
Threads = Annotated[Optional[int], option(
    "Model", min=0, help="CPU threads for torch (0 = torch's choice) [default: 1 for the embedded "
    "model, else 0].")]
Fsdp = Annotated[bool, option(
    "Model", "--fsdp", help="Under torchrun: shard the optimizer state and the summed gradients "
    "across ranks with FSDP2 (default: every rank holds the whole model and optimizer, "
    "DDP-style). No effect in a single process.")]
AttnImplementation = Annotated[Optional[str], option(
    "Model", help="Attention kernel: eager, sdpa, flash_attention_2 (GPU, needs flash-attn) "
    "[default: transformers' choice, sdpa].")]
GradientCheckpointing = Annotated[bool, option(
    "Model", "--gradient-checkpointing", help="Recompute each layer's activations in the backward "
    "pass: far less memory, about one more forward pass of time. Same gradients.")]
LoraR = Annotated[int, option(
    "LoRA", min=0, help="Train a LoRA adapter of this rank instead of every weight (needs the lora "
    "extra); 0 = off. A --policy that holds an adapter continues it.")]
LoraAlpha = Annotated[Optional[float], option(
    "LoRA", help="LoRA scale α (update = α/r · BA) [default: 2 × --lora-r, as TRL].")]
LoraDropout = Annotated[float, option(
    "LoRA", min=0.0, max=0.99, help="Dropout on the LoRA input during the update (peft's default "
    "0).")]
LoraTargetModules = Annotated[str, option(
    "LoRA", help="Layers that get adapters: `all-linear` (every linear layer but the output head) "
    "or names, e.g. `q_proj,v_proj`.")]
SaveLora = Annotated[Literal["adapter", "merged"], option(
    "LoRA", help="With --lora-r: `adapter` saves the adapter (it names the base model's path); "
    "`merged` also writes merged/, the merged weights as a plain model directory.")]
# The update's knobs, shared by `update` and `loop` (defaults and sources: update.UpdateConfig).
WeightDecay = Annotated[float, option("Update", help="AdamW decoupled weight decay.")]
Beta1 = Annotated[float, option("Update", help="AdamW β1 (first-moment decay), in [0, 1).")]
AdamEps = Annotated[float, option("Update", help="AdamW ε, added to the second-moment root.")]
Beta2 = Annotated[float, option("Update", help="AdamW β2 (second-moment decay), in [0, 1).")]
ClipEps = Annotated[float, option(
    "Update", help="PPO/GRPO clip range ε below 1 (and above, unless --clip-eps-high).")]
ClipEpsHigh = Annotated[Optional[float], option(
    "Update", help="Clip range above 1 (DAPO's clip-higher uses 0.28) [default: --clip-eps].")]
ClipRatioC = Annotated[Optional[float], option(
    "Update", help="Dual clip (Ye et al. 2020; verl's clip_ratio_c, 3.0 there): for A < 0 cap each "
    "token's loss at C·|A|, so a stale ratio ρ > C gives no gradient. Must be > 1 [default: off].")]
MiniBatches = Annotated[int, option(
    "Update", help="Optimizer steps per pass over the rollouts: their prompt groups (whole groups, "
    "file order) split into M mini-batches, one step each, all against the sampler's log-probs, "
    "so the clip acts from the second step on (verl: train_batch_size / ppo_mini_batch_size; TRL: "
    "steps_per_generation).")]
UpdateEpochs = Annotated[int, option(
    "Update", help="Passes over the rollouts: M × E optimizer steps in all (verl ppo_epochs, TRL "
    "num_iterations). Not --epochs, which in `loop` counts passes over the prompt set.")]
LossAgg = Annotated[Literal["token-mean", "seq-mean", "constant"], option(
    "Update", help="Per-token losses to one number: `token-mean` (DAPO, TRL), `seq-mean` (the GRPO "
    "paper) or `constant` (Dr. GRPO).")]
MaxGradNorm = Annotated[float, option("Update", help="Clip the gradient norm to this (0 = off).")]
KlCoef = Annotated[float, option(
    "Update", help="Weight β of the k3 KL penalty to --ref (needs --ref).")]
Ref = Annotated[Optional[str], option(
    "Update", help="Reference model directory for the KL penalty.")]
IsCap = Annotated[Optional[float], option(
    "Update", help="Truncated importance sampling: weight each token's loss by "
    "min(π_trainer/π_sampler, CAP), correcting the sampler's (e.g. vLLM's) log-prob mismatch; 2.0 "
    "is usual [default: off].")]
OldLogprobs = Annotated[Optional[str], option(
    "Update", help="π_old of the PPO ratio: `trainer` (the trainer's log-probs before the first "
    "optimizer step, as verl) or `sampler` (the records' logprobs) [default: trainer with vLLM, "
    "a dtype other than float32, several optimizer steps per batch or --is-cap; else "
    "sampler].")]


def _print_version(value: bool) -> None:
    if value:
        from grpoctl import __version__

        print(f"grpoctl {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version,
                                                   is_eager=True,
                                                   help="Print the version and exit.")] = False):
    """Options before the command name (the app's help text is set in typer.Typer above)."""


def _progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _use_threads(model: str, threads: int | None) -> None:
    """--threads of a command that runs `model`, applied before the model loads: the
    number given, else the model's default (config.resolve_threads, as `loop`); 0 leaves
    torch's own choice. Every command that runs a model calls this, and only this."""
    from grpoctl.config import resolve_threads

    threads = resolve_threads(model, threads)
    if threads:
        import torch

        torch.set_num_threads(threads)


# --- rollout -------------------------------------------------------------------


@app.command()
def rollout(
    model: Model = "default",
    prompts: Prompts = "arith:train",
    prompt_field: PromptField = None,
    answer_field: AnswerField = None,
    answer_after: AnswerAfter = None,
    id_field: IdField = None,
    limit: Limit = None,
    shard: Annotated[Optional[str], typer.Option(help="Take shard I of N prompts, as `I/N` (0-based); "
                                                 "`cat` of all shards equals the whole run.")] = None,
    template: Template = "{prompt}",
    no_chat_template: NoChatTemplate = False,
    system: System = None,
    group_size: GroupSize = 2,
    temperature: Temperature = LoopConfig.temperature,
    top_p: TopP = LoopConfig.top_p,
    top_k: TopK = LoopConfig.top_k,
    max_new_tokens: MaxNewTokens = 256,
    seed: Seed = 0,
    batch_size: BatchSize = 64,
    backend: Backend = "hf",
    tensor_parallel_size: TensorParallel = 1,
    gpu_memory_utilization: GpuMemory = 0.9,
    enforce_eager: EnforceEager = False,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    attn_implementation: AttnImplementation = None,
    threads: Threads = None,
    trust_remote_code: TrustRemoteCode = False,
    output: Output = "-",
    quiet: Quiet = False,
):
    """Sample G completions per prompt and write one record per completion.

    Each record carries the token ids and the log-probability of every sampled token
    under the sampling policy (log softmax of logits / temperature, before top-p/top-k).

    Examples:

        grpoctl rollout --prompts arith:test --group-size 2 --limit 4

        grpoctl rollout -m ./Qwen2.5-Math-1.5B --prompts data/math500.jsonl -G 16 -o r.jsonl

        grpoctl rollout -m M --prompts gsm8k_test.jsonl --prompt-field question --answer-after '#### '
    """
    from grpoctl.rollout import SamplingParams, run_rollout

    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                              max_new_tokens=max_new_tokens, seed=seed)
    _use_threads(model, threads)
    run_rollout(
        model_dir=model, prompts_source=prompts, output=output, group_size=group_size,
        sampling=sampling, batch_size=batch_size, backend=backend,
        prompt_field=prompt_field, answer_field=answer_field, answer_after=answer_after,
        id_field=id_field, limit=limit, shard=shard, template=template,
        use_chat_template=not no_chat_template, system=system, dtype=dtype, device=device,
        trust_remote_code=trust_remote_code, progress=_progress(quiet), log=not quiet,
        tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
        attn_implementation=attn_implementation, enforce_eager=enforce_eager,
    )


# --- score ---------------------------------------------------------------------


@app.command()
def score(
    records: Annotated[str, typer.Argument(help="Rollout file, or `-` for stdin.")] = "-",
    reward: Reward = None,
    workers: Workers = None,
    timeout: ScoreTimeout = LoopConfig.score_timeout,
    output: Output = "-",
    quiet: Quiet = False,
):
    """Add `reward` (weighted sum) and `rewards` (each component) to every record.

    `math` compares the last \\boxed{} answer (or a documented fallback) with the gold
    `answer` using math-verify, in worker processes with a per-item time limit.

    Examples:

        grpoctl score rollouts.jsonl -o scored.jsonl

        grpoctl rollout --limit 4 | grpoctl score --reward math=1 --reward format=0.1

        grpoctl score r.jsonl --reward my_rewards.py:brevity=0.5
    """
    from grpoctl.records import (NEEDS_SCORE, check_output, read_records, source_name,
                                 write_records)
    from grpoctl.rewards import parse_reward_specs, score_records

    check_output(output, [records])
    specs = parse_reward_specs(reward or ["math"])
    rows = read_records(records, NEEDS_SCORE)
    scored, stats = score_records(rows, specs, workers=workers, timeout=timeout,
                                  progress=_progress(quiet), source=source_name(records))
    write_records(scored, output)
    _log(f"score: {json.dumps(stats)}")


# --- advantage -----------------------------------------------------------------


@app.command()
def advantage(
    records: Annotated[str, typer.Argument(help="Scored file, or `-` for stdin.")] = "-",
    estimator: Estimator = "group",
    std: Std = "group",
    eps: Annotated[float, typer.Option(help="Added to the std before dividing.")] = 1e-6,
    allow_uneven: Annotated[bool, typer.Option("--allow-uneven",
                                               help="Accept groups of different sizes.")] = False,
    drop_zero: Annotated[bool, typer.Option("--drop-zero",
                                            help="Drop groups whose advantages are all zero "
                                            "(DAPO's dynamic sampling).")] = False,
    output: Output = "-",
):
    """Turn rewards into one advantage per completion, group by group (by prompt_id).

    `group` is GRPO's (r - mean) / (std + eps); `pairwise` is 2-GRPO: exactly two samples
    per prompt, winner +1, loser -1, tie 0; `rloo` subtracts the mean of the others.

    Examples:

        grpoctl advantage scored.jsonl --estimator pairwise -o adv.jsonl

        grpoctl advantage scored.jsonl --estimator group --std none   # Dr. GRPO

        grpoctl rollout -G 2 | grpoctl score | grpoctl advantage --estimator pairwise --drop-zero
    """
    from grpoctl.advantages import compute_advantages
    from grpoctl.records import (NEEDS_ADVANTAGE, check_output, read_records, source_name,
                                 write_records)

    check_output(output, [records])
    rows = read_records(records, NEEDS_ADVANTAGE)
    out, stats = compute_advantages(rows, estimator=estimator, std=std, eps=eps,
                                    allow_uneven=allow_uneven, drop_zero=drop_zero,
                                    source=source_name(records))
    write_records(out, output)
    _log(f"advantage: {json.dumps(stats)}")


# --- update --------------------------------------------------------------------


@app.command()
def update(
    records: Annotated[str, typer.Argument(help="File with advantages, or `-` for stdin.")],
    policy: Annotated[str, typer.Option(help="Policy directory to update (`default` = the embedded "
                                        "model). Optimizer state in it is resumed.")] = "default",
    out: Annotated[str, typer.Option("--out", "-o", help="Directory for the updated "
                                     "checkpoint.")] = ...,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-6,
    warmup_steps: WarmupSteps = UpdateSettings.warmup_steps,
    weight_decay: WeightDecay = UpdateSettings.weight_decay,
    beta1: Beta1 = UpdateSettings.beta1,
    beta2: Beta2 = UpdateSettings.beta2,
    adam_eps: AdamEps = UpdateSettings.adam_eps,
    clip_eps: ClipEps = UpdateSettings.clip_eps,
    clip_eps_high: ClipEpsHigh = None,
    clip_ratio_c: ClipRatioC = None,
    mini_batches: MiniBatches = UpdateSettings.mini_batches,
    update_epochs: UpdateEpochs = UpdateSettings.update_epochs,
    loss_agg: LossAgg = UpdateSettings.loss_agg,
    max_grad_norm: MaxGradNorm = UpdateSettings.max_grad_norm,
    kl_coef: KlCoef = UpdateSettings.kl_coef,
    ref: Ref = None,
    micro_batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward/backward; "
                                                  "gradients accumulate over the file.")] = 8,
    temperature: Annotated[Optional[float], typer.Option(help="Divide logits by this [default: "
                                                         "the records' sampling temperature].")] = None,
    is_cap: IsCap = None,
    old_logprobs: OldLogprobs = None,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    attn_implementation: AttnImplementation = None,
    gradient_checkpointing: GradientCheckpointing = False,
    lora_r: LoraR = 0,
    lora_alpha: LoraAlpha = None,
    lora_dropout: LoraDropout = 0.0,
    lora_target_modules: LoraTargetModules = "all-linear",
    save_lora: SaveLora = "adapter",
    trust_remote_code: TrustRemoteCode = False,
    max_tokens: Annotated[Optional[int], typer.Option(help="Normaliser of --loss-agg constant "
                                                      "(Dr. GRPO) [default: the records' "
                                                      "sampling.max_new_tokens].")] = None,
    metrics: Annotated[Optional[str], typer.Option(help="Also append the step's metrics (one "
                                                   "JSON line) to this file.")] = None,
    fsdp: Fsdp = False,
    threads: Threads = None,
):
    """Take ONE clipped policy-gradient step over the whole file (or M × E steps with
    --mini-batches/--update-epochs) and save a checkpoint.

    The checkpoint holds safetensors weights, the tokenizer, the optimizer state
    (safetensors) and trainer_state.json; updating it again resumes the optimizer,
    so steps chained in a shell loop equal steps in one process.

    Examples:

        grpoctl update adv.jsonl --policy default --out ckpt-1 --lr 1e-4

        grpoctl update adv.jsonl --policy ckpt-1 --out ckpt-2 --clip-eps-high 0.28 --loss-agg seq-mean

        grpoctl rollout -G 2 | grpoctl score | grpoctl advantage --estimator pairwise | \\
            grpoctl update - --policy default --out ckpt-1

        grpoctl update adv.jsonl --policy ./Qwen2.5-Math-1.5B --out ckpt-1 --dtype bfloat16 \\
            --lora-r 16 --gradient-checkpointing --is-cap 2

        grpoctl update adv.jsonl --policy ckpt-1 --out ckpt-2 --mini-batches 4 \\
            --update-epochs 2 --clip-ratio-c 3
    """
    from grpoctl.config import UpdateConfig
    from grpoctl.lora import LoraSettings

    cfg = UpdateConfig(lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
                       beta1=beta1, beta2=beta2, adam_eps=adam_eps, clip_eps=clip_eps,
                       clip_eps_high=clip_eps_high, loss_agg=loss_agg, max_grad_norm=max_grad_norm, kl_coef=kl_coef,
                       micro_batch_size=micro_batch_size, temperature=temperature,
                       max_tokens=max_tokens, is_cap=is_cap, clip_ratio_c=clip_ratio_c,
                       old_logprobs=old_logprobs,
                       mini_batches=mini_batches, update_epochs=update_epochs)
    lora = LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                        target_modules=lora_target_modules)
    cfg.check()  # a bad flag fails here in a fraction of a second, before torch is imported
    lora.check()
    from grpoctl import distributed
    from grpoctl.update import run_update

    _use_threads(policy, threads)
    with distributed.left_at_end():  # torchrun: run_update joins the ranks' process group
        result = run_update(records, policy, out, cfg, ref_dir=ref, dtype=dtype, device=device,
                            trust_remote_code=trust_remote_code, metrics_path=metrics,
                            fsdp=fsdp, attn_implementation=attn_implementation,
                            gradient_checkpointing=gradient_checkpointing, lora_settings=lora,
                            save_lora=save_lora)
        if distributed.is_main():  # torchrun: one line, from rank 0
            _log(json.dumps(result))


@app.command("eval")
def eval_(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model directory, or `default`. "
                                                 "Leave out when giving --scored.")] = None,
    scored: Annotated[Optional[str], typer.Option(help="Evaluate an already-scored record file "
                                                  "instead of sampling from a model.")] = None,
    prompts: Prompts = "arith:test",
    prompt_field: PromptField = None,
    answer_field: AnswerField = None,
    answer_after: AnswerAfter = None,
    id_field: IdField = None,
    limit: Limit = None,
    template: Template = "{prompt}",
    no_chat_template: NoChatTemplate = False,
    system: System = None,
    samples: Annotated[int, typer.Option("--samples", "-k", min=1, help="Samples per prompt: k of "
                                         "Mean@k and Pass@k.")] = LoopConfig.eval_samples,
    pass_k: Annotated[Optional[int], typer.Option(help="k of Pass@k when smaller than "
                                                  "--samples (unbiased estimator).")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy decoding (one sample per "
                                         "prompt is enough).")] = False,
    temperature: Temperature = LoopConfig.eval_temperature,  # the paper's evaluation sampling
    top_p: TopP = LoopConfig.eval_top_p,
    top_k: TopK = LoopConfig.eval_top_k,
    max_new_tokens: MaxNewTokens = 1024,
    seed: Seed = 0,
    batch_size: BatchSize = 64,
    reward: Reward = None,
    by: Annotated[Optional[list[str]], typer.Option(help="Break down by this prompt-file column, "
                                                    "e.g. subject or level; repeatable.")] = None,
    backend: Backend = "hf",
    tensor_parallel_size: TensorParallel = 1,
    gpu_memory_utilization: GpuMemory = 0.9,
    enforce_eager: EnforceEager = False,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    attn_implementation: AttnImplementation = None,
    threads: Threads = None,
    trust_remote_code: TrustRemoteCode = False,
    save: Annotated[Optional[str], typer.Option(help="Also write the scored samples here.")] = None,
    quiet: Quiet = False,
):
    """Held-out accuracy: Mean@k and Pass@k, as a table on stderr and JSON on stdout.

    Samples k completions per prompt (the paper's evaluation sampling by default:
    temperature 0.7, top-p 0.8, top-k 20), scores them with `math`, and averages.

    Examples:

        grpoctl eval --model default --prompts arith:test --samples 4 --max-new-tokens 32

        grpoctl eval -m ckpt --prompts data/math500.jsonl -k 8 --by subject --by level

        grpoctl eval --scored runs/r/step-000010/scored.jsonl

        grpoctl eval -m ckpt --prompts data/math500.jsonl -k 32 --backend vllm
    """
    from grpoctl.evaluate import run_eval

    if model is not None:  # --scored alone runs no model (and needs no torch)
        _use_threads(model, threads)
    summary = run_eval(
        model=model, scored=scored, prompts_source=prompts, prompt_field=prompt_field,
        answer_field=answer_field, answer_after=answer_after, id_field=id_field, limit=limit,
        template=template, use_chat_template=not no_chat_template, system=system, samples=samples,
        pass_k=pass_k, greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k,
        max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, rewards=reward or ["math"],
        by=by or [], dtype=dtype, device=device, trust_remote_code=trust_remote_code, save=save,
        progress=_progress(quiet), attn_implementation=attn_implementation, backend=backend,
        tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager)
    print(json.dumps(summary))


@app.command()
def loop(
    ctx: typer.Context,
    model: Model = LoopConfig.model,
    prompts: Prompts = LoopConfig.prompts,
    prompt_field: PromptField = None,
    answer_field: AnswerField = None,
    answer_after: AnswerAfter = None,
    id_field: IdField = None,
    limit: Limit = None,
    template: Template = LoopConfig.template,
    no_chat_template: NoChatTemplate = False,
    system: System = None,
    group_size: GroupSize = LoopConfig.group_size,
    prompts_per_step: Annotated[Optional[int], option("Sampling", min=1, help="Prompts per step; each gives "
                                                            "G rollouts [default: 64 for the embedded "
                                                            "model, else 32].")] = None,
    steps: Annotated[Optional[int], option("Run", min=1, help="Optimizer steps [default: 100, or from "
                                                 "--epochs].")] = None,
    epochs: Annotated[Optional[float], option("Run", help="Passes over the prompts (instead of "
                                                    "--steps).")] = None,
    temperature: Temperature = LoopConfig.temperature,
    top_p: TopP = LoopConfig.top_p,
    top_k: TopK = LoopConfig.top_k,
    max_new_tokens: Annotated[Optional[int], option("Sampling", min=1, help="Generation budget per "
                                                          "completion [default: 32 for the embedded "
                                                          "model, else 1024].")] = None,
    batch_size: Annotated[Optional[int], option("Sampling", min=1, help="Sequences generated together "
                                                      "[default: 256 for the embedded model, else 64]."
                                                      )] = None,
    backend: Backend = LoopConfig.backend,
    tensor_parallel_size: TensorParallel = LoopConfig.tensor_parallel_size,
    gpu_memory_utilization: Annotated[float, option("vLLM",
        min=0.01, max=1.0, help="Share of the GPU's memory the vLLM engine takes for weights and "
        "KV cache; the rest is the trainer's (--backend vllm).")] = 0.4,
    vllm_dtype: Annotated[Optional[str], option("vLLM", help="Weights dtype of the vLLM engine, "
                                                      "e.g. bfloat16 while the trainer keeps "
                                                      "float32 [default: --dtype].")] = None,
    vllm_sleep: Annotated[bool, option("vLLM", "--vllm-sleep", help="Put the vLLM engine to sleep "
                                             "(weights to CPU, KV cache freed) during each "
                                             "update; GPU only.")] = False,
    enforce_eager: EnforceEager = False,
    reward: Reward = None,
    workers: Workers = None,
    timeout: ScoreTimeout = LoopConfig.score_timeout,
    score_cmd: Annotated[Optional[str], option("Score", help="Shell command that replaces `score`: "
                                                     "rollout records on stdin, scored on stdout.")] = None,
    estimator: Estimator = LoopConfig.estimator,
    std: Std = LoopConfig.std,
    drop_zero: Annotated[bool, option("Advantage", "--drop-zero", help="Drop all-tied groups before the "
                                            "update.")] = False,
    adv_eps: AdvEps = LoopConfig.adv_eps,
    refill: Annotated[bool, option("Advantage", "--refill", help="2-GRPO+RS / DAPO dynamic sampling: "
                                         "replace tied groups by groups of fresh prompts until "
                                         "the step has --prompts-per-step contrastive groups or "
                                         "--max-rollouts-per-step is spent; every attempt's "
                                         "files stay in the step directory.")] = False,
    max_rollouts_per_step: Annotated[Optional[int], option("Advantage",
        min=1, help="--refill's rollout budget per step, discarded rollouts included "
        "[default: 8 × -G × --prompts-per-step; at G 2 what 16-GRPO spends on those "
        "prompts].")] = None,
    advantage_cmd: Annotated[Optional[str], option("Advantage", help="Shell command that replaces "
                                                         "`advantage`.")] = None,
    lr: Annotated[Optional[float], option("Update", help="AdamW learning rate [default: 1e-4 for the "
                                                "embedded model, else 1e-6 (the paper's 16-GRPO)].")] = None,
    warmup_steps: WarmupSteps = LoopConfig.warmup_steps,
    weight_decay: WeightDecay = LoopConfig.weight_decay,
    beta1: Beta1 = LoopConfig.beta1,
    beta2: Beta2 = LoopConfig.beta2,
    adam_eps: AdamEps = LoopConfig.adam_eps,
    clip_eps: ClipEps = LoopConfig.clip_eps,
    clip_eps_high: ClipEpsHigh = None,
    clip_ratio_c: ClipRatioC = None,
    mini_batches: MiniBatches = LoopConfig.mini_batches,
    update_epochs: UpdateEpochs = LoopConfig.update_epochs,
    loss_agg: LossAgg = LoopConfig.loss_agg,
    max_grad_norm: MaxGradNorm = LoopConfig.max_grad_norm,
    kl_coef: KlCoef = LoopConfig.kl_coef,
    ref: Ref = None,
    micro_batch_size: Annotated[Optional[int], option("Update", min=1, help="Sequences per forward/"
                                                            "backward [default: 256 for the embedded "
                                                            "model, else 8].")] = None,
    is_cap: IsCap = None,
    old_logprobs: OldLogprobs = None,
    lora_r: LoraR = LoopConfig.lora_r,
    lora_alpha: LoraAlpha = None,
    lora_dropout: LoraDropout = LoopConfig.lora_dropout,
    lora_target_modules: LoraTargetModules = LoopConfig.lora_target_modules,
    save_lora: SaveLora = LoopConfig.save_lora,
    dtype: Dtype = LoopConfig.dtype,
    device: Device = LoopConfig.device,
    attn_implementation: AttnImplementation = None,
    gradient_checkpointing: GradientCheckpointing = False,
    threads: Threads = None,
    fsdp: Fsdp = False,
    trust_remote_code: TrustRemoteCode = False,
    eval_prompts: Annotated[Optional[str], option("Evaluation", help="Held-out prompts, or `none` "
                                                        "[default: arith:test].")] = "arith:test",
    eval_every: Annotated[int, option("Evaluation", min=1, help="Evaluate every N steps (and at the "
                                            "start and end).")] = 50,
    eval_samples: Annotated[int, option("Evaluation", min=1, help="Samples per held-out prompt: k of "
                                              "Mean@k and Pass@k.")] = LoopConfig.eval_samples,
    eval_limit: Annotated[Optional[int], option("Evaluation", help="Evaluate on the first N held-out "
                                                      "prompts.")] = None,
    eval_temperature: Annotated[float, option("Evaluation", min=0.0, help="Evaluation sampling "
                                                    "temperature (the paper's 0.7).")] = LoopConfig.eval_temperature,
    eval_top_p: Annotated[float, option("Evaluation", min=0.0, max=1.0, help="Evaluation nucleus mass "
                                              "(the paper's 0.8).")] = LoopConfig.eval_top_p,
    eval_top_k: Annotated[int, option("Evaluation", min=0, help="Evaluation top-k (the paper's 20; "
                                            "0 = off).")] = LoopConfig.eval_top_k,
    run_dir: Annotated[Optional[str], option("Run", help="Run directory [default: "
                                                   "runs/DATE-TIME-gG-sSEED].")] = None,
    seed: Seed = LoopConfig.seed,
    save_every: Annotated[int, option("Run", min=1, help="Checkpoint every N steps (and at the end).")] = 25,
    keep_last: Annotated[int, option("Run", min=1, help="Checkpoints to keep.")] = 2,
    rollouts_from: Annotated[Optional[str], option(
        "Run", help="Train on another run directory's rollouts (its prompts and samples) "
        "instead of sampling: off-policy once this policy differs from that run's.")] = None,
    resume: Annotated[bool, option("Run", "--resume", help="Continue the run in --run-dir (or the "
                                         "newest under runs/) where it stopped.")] = False,
    quiet: Quiet = False,
):
    """Train: rollout, score, advantage and update, step after step, keeping every file.

    With no flags it trains the embedded tiny model on the built-in arithmetic task
    (about two minutes on two CPU cores). The run directory holds config.json,
    metrics.jsonl, eval.jsonl, each step's rollouts/scored/advantages files and
    checkpoints; Ctrl-C or a crash loses nothing, and `--resume` continues.

    Examples:

        grpoctl loop --group-size 2

        grpoctl loop -G 16 --prompts-per-step 8 --run-dir runs/g16

        grpoctl loop --resume --run-dir runs/g16

        grpoctl loop -G 2 --score-cmd 'python my_scorer.py' --run-dir runs/custom
    """
    cfg = _loop_config(ctx.params)
    cfg.resolved()  # a bad flag fails here, before grpoctl.loop imports torch (run_loop does it too)
    from grpoctl import distributed
    from grpoctl.display import make_display
    from grpoctl.loop import run_loop

    given = _flags_given(ctx, cfg) if resume else None
    try:
        # --threads: applied by the run itself (Loop.load), from the run's resolved settings
        # (with --resume, those in its config.json), by the rule of _use_threads
        with distributed.left_at_end():  # torchrun: run_loop joins the ranks' process group
            run = run_loop(cfg, resume=resume, display=make_display(quiet), given=given)
    except KeyboardInterrupt:
        _log("interrupted: finished steps are saved; continue with the same command plus --resume")
        sys.exit(130)
    _log(f"done: {run}")


# `loop` parameters whose LoopConfig field has another name (config.FLAGS, read backwards)
_LOOP_FIELDS = {flag.lstrip("-").replace("-", "_"): field for field, flag in FLAGS.items()}


def _loop_config(flags: dict) -> LoopConfig:
    """The LoopConfig of `loop`'s flags (ctx.params: every option by its parameter name)."""
    values = {_LOOP_FIELDS.get(name, name): value for name, value in flags.items()
              if name not in ("resume", "quiet")}
    values["use_chat_template"] = not values["use_chat_template"]  # the flag says "no"
    values["rewards"] = list(values["rewards"] or ["math"])  # click gives a tuple
    if values["eval_prompts"] == "none":
        values["eval_prompts"] = None
    return LoopConfig(**values)


def _flags_given(ctx: typer.Context, cfg) -> dict:
    """{LoopConfig field: (flag, value)} for the settings named on the command line (what
    --resume compares with the run's saved settings)."""
    given = {}
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)  # an enum typer does not export: by name
        if param.name in ("run_dir", "resume", "quiet") or \
                getattr(source, "name", None) != "COMMANDLINE":
            continue
        field = _LOOP_FIELDS.get(param.name, param.name)
        given[field] = (param.opts[0], getattr(cfg, field))
    return given


# --- show, diff: reading what a run learned (grpoctl/show.py, grpoctl/diff.py) ------------


@app.command()
def show(
    source: Annotated[str, typer.Argument(help="Records file (`-` = stdin) or run directory.")],
    step: Annotated[Optional[int], typer.Option(help="Step of a run directory [default: the "
                                                "last finished].")] = None,
    tied: Annotated[bool, typer.Option("--tied", help="Only groups whose rewards all tie.")] = False,
    contrastive: Annotated[bool, typer.Option("--contrastive", help="Only groups whose rewards "
                                              "differ.")] = False,
    wrong: Annotated[bool, typer.Option("--wrong", help="Only groups with a wrong answer.")] = False,
    right: Annotated[bool, typer.Option("--right", help="Only groups with a right answer.")] = False,
    prompt_id: Annotated[Optional[str], typer.Option(help="Only this prompt_id (a glob: "
                                                     "'arith-train-00*').")] = None,
    grep: Annotated[Optional[str], typer.Option(help="Only groups whose prompt, gold answer or a "
                                                "completion matches this regular expression.")] = None,
    limit: Annotated[int, typer.Option(min=0, help="Groups to show (0 = all).")] = 20,
    tokens: Annotated[bool, typer.Option("--tokens", help="Completions token by token, shaded by "
                                         "log-prob.")] = False,
    model: Annotated[Optional[str], typer.Option(help="Tokenizer for --tokens [default: the run's "
                                                 "model; for a file, token ids].")] = None,
    policy: Annotated[Optional[str], typer.Option(help="With --tokens: shade by the ratio to this "
                                                  "checkpoint, with its entropy (loads torch).")] = None,
    device: Device = "cpu",
):
    """Records group by group: the prompt, each completion with its rewards, advantage,
    length, finish reason, and its answer against the gold.

    A run directory shows the richest file of the step (advantages > scored > rollouts).
    Reading stops after --limit groups, so big files show at once. Colour on a terminal,
    plain text in a pipe.

    Examples:

        grpoctl show runs/g2 --contrastive --limit 5

        grpoctl show runs/g2 --step 1 --wrong --grep 'boxed'

        grpoctl show scored.jsonl --prompt-id 'arith-train-0023*' --tokens --model default

        grpoctl show runs/g2 --tokens --policy runs/g2/checkpoints/step-000002 --limit 2
    """
    from grpoctl.show import Filters
    from grpoctl.show import show as show_records

    filters = Filters(tied=tied, contrastive=contrastive, wrong=wrong, right=right,
                      prompt_id=prompt_id, grep=grep)
    show_records(source, step, filters, limit or None, tokens, model, policy, device)


@app.command()
def diff(
    sources: Annotated[list[str], typer.Argument(help="Two records files, run directories (last "
                                                 "step) or RUN:STEP; or one run with two --step.")],
    step: Annotated[Optional[list[int]], typer.Option(help="Step(s): twice with one run, once "
                                                      "for the same step of two runs.")] = None,
    limit: Annotated[int, typer.Option(min=0, help="Prompts listed, most changed first (0 = "
                                       "all).")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="The comparison as JSON on stdout.")] = False,
):
    """Per prompt in common: accuracy on each side, flips, and the change in length.

    A completion is right when rewards.math == 1 (else reward > 0; unscored: its
    extracted answer equals the gold). A prompt is solved when at least half its
    completions are right; a flip is a prompt that changed side.

    Examples:

        grpoctl diff runs/g2:1 runs/g2:16

        grpoctl diff runs/g2 --step 1 --step 16

        grpoctl diff runs/g2-s0 runs/g2-s1 --step 16

        grpoctl diff before.jsonl after.jsonl --json | jq .summary
    """
    from grpoctl.diff import compare, print_diff, sides

    a, b = sides(sources, step or [])
    result = compare(a, b)
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print_diff(result, limit or None)


@app.command()
def report(
    run_dirs: Annotated[list[str], typer.Argument(help="Run directories written by `grpoctl loop`.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Directory for report.md and the PNG "
                                     "plots.")] = "report",
    label: Annotated[Optional[list[str]], typer.Option(help="Label for each run, in order (once "
                                                       "per run) [default: from its settings].")] = None,
    baseline: Annotated[Optional[str], typer.Option(help="Run the ratios divide by [default: the "
                                                    "largest group size].")] = None,
    html: Annotated[bool, typer.Option("--html", help="Also index.html and a page per run: plots "
                                       "linked to each step's groups and completions (works from "
                                       "file://; grpoctl/report_html.py).")] = False,
):
    """Plots and a table of finished runs: accuracy and reward against step, rollouts and seconds.

    Runs that differ only in their seed are averaged (mean and std). Plots need the
    `plot` extra (matplotlib); without it only report.md is written.

    Examples:

        grpoctl report runs/g2-s0 runs/g16-s0 -o report

        grpoctl report runs/g2-* runs/g16-* --baseline runs/g16-s0

        grpoctl report runs/g2-s0 --html -o report && xdg-open report/index.html
    """
    if html:
        from grpoctl.report_html import write_html_report

        result = write_html_report(run_dirs, out, labels=label or None, baseline=baseline)
        _log(f"wrote {result['index']} and {len(result['pages'])} run page(s), "
             f"{result['steps']} steps, {result['bytes'] / 1e6:.1f} MB")
        return
    from grpoctl.report import write_report

    result = write_report(run_dirs, out, labels=label or None, baseline=baseline)
    _log("wrote " + ", ".join([result["report"], *result["plots"]]))


def _one_line(text: str) -> str:
    """A message as one line: its lines joined, runs of whitespace made one space."""
    return " ".join(text.split())


def _settle_stdout() -> OSError | None:
    """Flush stdout; if that fails (`> /dev/full`, a closed pipe), point file descriptor 1
    at /dev/null so that the interpreter's own flush at exit neither fails again nor
    prints "Exception ignored". Returns the error, or None."""
    try:
        sys.stdout.flush()
        return None
    except (OSError, ValueError) as e:  # ValueError: stdout already closed
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass  # a replaced sys.stdout (tests): nothing to redirect
        return e if isinstance(e, OSError) else OSError(str(e))


class _WatchedStdout:
    """sys.stdout, remembering a failed write: tells `print` to a full device (an OSError
    of stdout) from an OSError elsewhere (a bug, which keeps its traceback)."""

    def __init__(self, stream):
        self._stream = stream
        self.error: OSError | None = None

    def _watch(self, name, *args):
        try:
            return getattr(self._stream, name)(*args)
        except OSError as e:
            self.error = e
            raise

    def write(self, text):
        return self._watch("write", text)

    def writelines(self, lines):
        return self._watch("writelines", lines)

    def flush(self):
        return self._watch("flush")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _finite_floats(command):
    """Every float option of every command refuses NaN and infinity as a flag error.

    typer's float options (and their min/max bounds) let "nan" and "inf" through, and a
    NaN then surfaces far from its flag (as a NaN loss, or an error about a record).
    One rule for all of them, so a new option is covered too: each parameter's
    callback (click's public hook, called with the converted value, in every typer
    version) refuses a float value that is not finite. No option has a callback of
    its own; one would still run, after the check.
    """
    for sub in getattr(command, "commands", {}).values():
        for param in sub.params:
            if not getattr(param.callback, "refuses_non_finite", False):
                param.callback = _refusing_non_finite(param.callback)
    return command


def _refusing_non_finite(callback):
    def finite(ctx, param, value):
        if isinstance(value, float) and not math.isfinite(value):
            raise typer.BadParameter(f"{str(value)!r} is not a finite number", ctx=ctx,
                                     param=param)
        return value if callback is None else callback(ctx, param, value)
    finite.refuses_non_finite = True
    return finite


def main() -> None:
    """Entry point: run the app, turning every user error into one line and exit status 2.

    Click's own usage errors (a bad flag value, a missing argument) would print a
    multi-line box; they get the same one-line `error: ...` as grpoctl's errors, so
    a pipeline's stderr stays greppable. Every message is one line (a multi-line one
    is joined). stdout that cannot be written (`> /dev/full`) is one line too; a reader
    that went away (`| head`) ends the command quietly with status 1, as click does.
    """
    process.reopen_closed_standard_streams()
    watched = sys.stdout = _WatchedStdout(sys.stdout)
    status = 0
    try:
        with process.interrupt_on_termination_signals():
            _main(watched)
    except SystemExit as e:  # 130 for SIGTERM/SIGHUP too; say which it was
        status = process.exit_status(e.code)
    finally:
        if sys.stdout is watched:
            sys.stdout = watched._stream
    if isinstance(status, int):
        from grpoctl import distributed

        distributed.end_rank(status)  # torchrun: ends this rank here (no teardown abort)
    raise SystemExit(status)


def _main(watched: _WatchedStdout) -> None:
    def fail(message: str, code: int) -> None:
        _settle_stdout()
        print(f"error: {_one_line(message)}", file=sys.stderr)
        sys.exit(code)

    try:
        status = _finite_floats(typer.main.get_command(app))(prog_name="grpoctl",
                                                             standalone_mode=False)
        stdout_error = _settle_stdout()  # what is still buffered, written now
        if isinstance(stdout_error, BrokenPipeError):
            sys.exit(1)
        if stdout_error is not None:
            fail(f"<stdout>: cannot write: {stdout_error.strerror or stdout_error}", 2)
    except typer.TyperException as e:
        # Typer >= 0.26 ships its own copy of click and exports none of its exceptions but
        # BadParameter; all derive from typer.TyperException. A usage error (UsageError and
        # its subclasses) is the one that carries the context of the command it concerns.
        if type(e).__name__ == "NoArgsIsHelpError":  # plain `grpoctl`: show the help
            e.show()  # (typer's own rich_utils tells it by its name, too)
            sys.exit(2)
        if hasattr(e, "ctx"):
            where = e.ctx.command_path if e.ctx else "grpoctl"
            fail(f"{where}: {e.format_message()} (see `{where} --help`)", e.exit_code)
        fail(e.format_message(), e.exit_code)
    except GrpoctlError as e:
        fail(str(e), e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        _settle_stdout()
        print(process.interrupt_message(), file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # stdout written directly (print) on a full device; else a bug
        if watched.error is not e:
            raise
        _settle_stdout()
        if isinstance(e, BrokenPipeError):
            sys.exit(1)
        fail(f"<stdout>: cannot write: {e.strerror or e}", 2)
    # Without standalone mode the app returns the status of `--help` and of explicit
    # exits, and 130 for a Ctrl-C, which typer catches and would end silently.
    if status == 130:  # which outputs, if any, were put in place before the signal
        print(process.interrupt_message(), file=sys.stderr)
    sys.exit(status if isinstance(status, int) else 0)
