"""The grpoctl command line: commands, their own flags and exit codes, nothing else.

Flags that are settings are not declared here: a command names the settings groups it
takes (config.py), and flags.py makes one option per field, with the field's default,
range, choices and docstring as help. The command body gets the settings built and
checked.

Each command parses its flags and calls one library function; the work lives in
the stage modules (`rollout`, `rewards`, `advantages`, `update`, `loop`). Heavy
imports (torch, transformers, math-verify) happen inside the commands that need
them, so `grpoctl --help`, `score` and `advantage` start fast.

Errors the user can fix (`GrpoctlError`, a bad flag) print one line, `error: ...`, and
exit 2 (process.run_main, which also owns the streams and the signals).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from grpoctl import process
from grpoctl.config import (AdapterSettings, AdvantageSettings, EvalSettings, LoopConfig,
                            ModelSettings, PromptSettings, SamplingSettings, ScoreSettings,
                            UpdateConfig, VllmSettings)
from grpoctl.errors import GrpoctlError
from grpoctl.flags import Use, flags_given, refuse_non_finite, settings

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

# --- options -------------------------------------------------------------------
# Settings come from config.py's groups (flags.py builds the options from the fields); a
# command names the groups it takes with Use(...). Only options that are not settings are
# declared here.

Output = Annotated[str, typer.Option("--output", "-o", help="Output file; `-` is stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]

# What the commands that sample take of the model and vLLM settings; rollout's and eval's
# engine has the GPU to itself (vLLM's own default share, 0.9), loop's shares it
SAMPLER = ("model", "dtype", "device", "attn_implementation", "threads", "trust_remote_code")
ENGINE = Use(VllmSettings, only=("tensor_parallel_size", "gpu_memory_utilization", "vllm_eager"),
             defaults={"gpu_memory_utilization": 0.9})


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


@app.command()
@settings(prompts=Use(PromptSettings), model=Use(ModelSettings, only=SAMPLER),
          sampling=Use(SamplingSettings, skip=("prompts_per_step",),
                       defaults={"max_new_tokens": 256, "batch_size": 64}),
          vllm=ENGINE)
def rollout(prompts: PromptSettings, shard: Annotated[Optional[str], typer.Option(
                help="Take shard I of N prompts, as `I/N` (0-based); `cat` of all shards equals "
                "the whole run.", rich_help_panel="Prompts")] = None, *,
            model: ModelSettings, sampling: SamplingSettings, vllm: VllmSettings,
            output: Output = "-", quiet: Quiet = False):
    """Sample G completions per prompt and write one record per completion.

    Each record carries the token ids and the log-probability of every sampled token
    under the sampling policy (log softmax of logits / temperature, before top-p/top-k).

    Examples:

        grpoctl rollout --prompts arith:test --group-size 2 --limit 4

        grpoctl rollout -m ./Qwen2.5-Math-1.5B --prompts data/math500.jsonl -G 16 -o r.jsonl

        grpoctl rollout -m M --prompts gsm8k_test.jsonl --prompt-field question --answer-after '#### '
    """
    from grpoctl.models import use_threads
    from grpoctl.rollout import run_rollout

    use_threads(model.model, model.threads)
    run_rollout(prompts, model, sampling, vllm, output=output, shard=shard,
                progress=_progress(quiet), log=not quiet)


@app.command()
@settings(score=Use(ScoreSettings, skip=("score_cmd",)))
def score(records: Annotated[str, typer.Argument(help="Rollout file, or `-` for stdin.")] = "-", *,
          score: ScoreSettings,
          explain: Annotated[bool, typer.Option("--explain", help="Add `explain` to each record: "
                                                "why `math` gave its reward (docs/records.md).",
                                                rich_help_panel="Score")] = False,
          output: Output = "-", quiet: Quiet = False):
    """Add `reward` (weighted sum) and `rewards` (each component) to every record.

    `math` compares the last \\boxed{} answer (or a documented fallback) with the gold
    `answer` using math-verify, in worker processes with a per-item time limit.

    Examples:

        grpoctl score rollouts.jsonl -o scored.jsonl

        grpoctl rollout --limit 4 | grpoctl score --reward math=1 --reward format=0.1

        grpoctl score r.jsonl --reward my_rewards.py:brevity=0.5
    """
    from grpoctl.rewards import score_file

    stats = score_file(records, output, score, explain=explain, progress=_progress(quiet))
    _log(f"score: {json.dumps(stats)}")


@app.command()
@settings(settings=Use(AdvantageSettings, only=("estimator", "std", "adv_eps", "drop_zero"),
                       flags={"adv_eps": ("--eps", "--adv-eps")}))
def advantage(records: Annotated[str, typer.Argument(help="Scored file, or `-` for stdin.")] = "-",
              *, settings: AdvantageSettings,
              allow_uneven: Annotated[bool, typer.Option("--allow-uneven", help="Accept groups "
                                                         "of different sizes.")] = False,
              output: Output = "-"):
    """Turn rewards into one advantage per completion, group by group (by prompt_id).

    `group` is GRPO's (r - mean) / (std + eps); `pairwise` is 2-GRPO: exactly two samples
    per prompt, winner +1, loser -1, tie 0; `rloo` subtracts the mean of the others.

    Examples:

        grpoctl advantage scored.jsonl --estimator pairwise -o adv.jsonl

        grpoctl advantage scored.jsonl --estimator group --std none   # Dr. GRPO

        grpoctl rollout -G 2 | grpoctl score | grpoctl advantage --estimator pairwise --drop-zero
    """
    from grpoctl.advantages import advantage_file

    stats = advantage_file(records, output, settings, allow_uneven=allow_uneven)
    _log(f"advantage: {json.dumps(stats)}")


@app.command()
@settings(cfg=Use(UpdateConfig), model=Use(ModelSettings, skip=("model",)),
          adapter=Use(AdapterSettings))
def update(records: Annotated[str, typer.Argument(help="File with advantages, or `-` for stdin.")],
           policy: Annotated[str, typer.Option(help="Policy directory to update (`default` = the "
                                               "embedded model). Optimizer state in it is "
                                               "resumed.")] = "default",
           out: Annotated[str, typer.Option("--out", "-o", help="Directory for the updated "
                                            "checkpoint.")] = ...,
           *, cfg: UpdateConfig, model: ModelSettings, adapter: AdapterSettings,
           metrics: Annotated[Optional[str], typer.Option(help="Also append the step's metrics "
                                                          "(one JSON line) to this file.")] = None):
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
    from grpoctl import distributed
    from grpoctl.models import use_threads
    from grpoctl.update import run_update

    use_threads(policy, model.threads)
    with distributed.left_at_end():  # torchrun: run_update joins the ranks' process group
        result = run_update(records, policy, out, cfg, model, adapter, metrics_path=metrics)
        if distributed.is_main():  # torchrun: one line, from rank 0
            _log(json.dumps(result))


@app.command("eval")
@settings(prompts=Use(PromptSettings, defaults={"prompts": "arith:test"}),
          k=Use(EvalSettings, only=("eval_samples",), flags={"eval_samples": ("--samples", "-k")}),
          sampling=Use(SamplingSettings, skip=("group_size", "prompts_per_step"), defaults={
              "temperature": EvalSettings.eval_temperature, "top_p": EvalSettings.eval_top_p,
              "top_k": EvalSettings.eval_top_k, "max_new_tokens": 1024, "batch_size": 64}),
          score=Use(ScoreSettings, only=("rewards",)),
          model=Use(ModelSettings, only=SAMPLER, defaults={"model": None}), vllm=ENGINE)
def eval_(scored: Annotated[Optional[str], typer.Option(help="Evaluate an already-scored record "
                                                        "file instead of sampling from a model "
                                                        "(then leave --model out).")] = None,
          *, prompts: PromptSettings, k: EvalSettings,
          pass_k: Annotated[Optional[int], typer.Option(help="k of Pass@k when smaller than "
                                                        "--samples (unbiased estimator).")] = None,
          greedy: Annotated[bool, typer.Option("--greedy", help="Greedy decoding (one sample "
                                               "per prompt is enough).")] = False,
          sampling: SamplingSettings, score: ScoreSettings,
          by: Annotated[Optional[list[str]], typer.Option(help="Break down by this prompt-file "
                                                          "column, e.g. subject or level; "
                                                          "repeatable.")] = None,
          model: ModelSettings, vllm: VllmSettings,
          save: Annotated[Optional[str], typer.Option(help="Also write the scored samples "
                                                      "here.")] = None,
          quiet: Quiet = False):
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

    if model.model is not None:  # --scored alone runs no model (and needs no torch)
        from grpoctl.models import use_threads

        use_threads(model.model, model.threads)
    summary = run_eval(model, prompts, sampling, vllm, score, samples=k.eval_samples,
                       scored=scored, pass_k=pass_k, greedy=greedy, by=by or [], save=save,
                       progress=_progress(quiet))
    print(json.dumps(summary))


@app.command()
@settings(cfg=Use(LoopConfig))
def loop(ctx: typer.Context, cfg: LoopConfig,
         resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --run-dir (or "
                                              "the newest under runs/) where it stopped.",
                                              rich_help_panel="Run")] = False,
         quiet: Quiet = False):
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
    from grpoctl import distributed
    from grpoctl.display import make_display
    from grpoctl.heap import keep_freed_memory
    from grpoctl.loop import run_loop

    keep_freed_memory()  # step after step, the same large tensors: reuse them
    # --resume compares the settings named here with the run's; --run-dir names the run
    given = flags_given(ctx, cfg, skip=("run_dir",)) if resume else None
    try:
        # --threads: applied by the run itself (Loop.load), from the run's resolved settings
        # (with --resume, those in its config.json), by the rule of models.use_threads
        with distributed.left_at_end():  # torchrun: run_loop joins the ranks' process group
            run = run_loop(cfg, resume=resume, display=make_display(quiet), given=given)
    except KeyboardInterrupt:
        _log("interrupted: finished steps are saved; continue with the same command plus --resume")
        sys.exit(130)
    _log(f"done: {run}")


# --- show, diff: reading what a run learned (grpoctl/show.py, grpoctl/diff.py) ------------


@app.command()
@settings(model=Use(ModelSettings, only=("device",)))
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
    tokenizer: Annotated[Optional[str], typer.Option("--model", help="Tokenizer for --tokens [default: the run's "
                                                 "model; for a file, token ids].")] = None,
    policy: Annotated[Optional[str], typer.Option(help="With --tokens: shade by the ratio to this "
                                                  "checkpoint, with its entropy (loads torch).")] = None,
    *, model: ModelSettings,
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
    show_records(source, step, filters, limit or None, tokens, tokenizer, policy, model.device)


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
    from grpoctl.report import report_command

    _log(report_command(run_dirs, out, labels=label or None, baseline=baseline, html=html))


def main() -> None:
    """Entry point: the app run by process.run_main (one-line errors, streams, signals).

    Click's own usage errors (a bad flag value, a missing argument) would print a
    multi-line box; they get the same one-line `error: ...` as grpoctl's errors, so
    a pipeline's stderr stays greppable.
    """
    status = process.run_main(_run_app, _user_error)
    if isinstance(status, int):
        from grpoctl import distributed

        distributed.end_rank(status)  # torchrun: ends this rank here (no teardown abort)
    raise SystemExit(status)


def _run_app():
    # Without standalone mode the app returns its status (of `--help`, of an explicit
    # exit; 130 for a Ctrl-C it caught) and raises the errors, for _user_error to word
    try:
        return refuse_non_finite(typer.main.get_command(app))(prog_name="grpoctl",
                                                              standalone_mode=False)
    except typer.Abort:  # click's name for a Ctrl-C
        raise KeyboardInterrupt from None


def _user_error(e: Exception) -> tuple[str, int] | None:
    """(message, exit status) of an error the user can fix; None for a bug."""
    if isinstance(e, GrpoctlError):
        return str(e), e.exit_code
    if not isinstance(e, typer.TyperException):
        return None
    # Typer >= 0.26 ships its own copy of click and exports none of its exceptions but
    # BadParameter; all derive from typer.TyperException. A usage error (UsageError and
    # its subclasses) is the one that carries the context of the command it concerns.
    if type(e).__name__ == "NoArgsIsHelpError":  # plain `grpoctl`: show the help
        e.show()  # (typer's own rich_utils tells it by its name, too)
        sys.exit(2)
    if hasattr(e, "ctx"):
        where = e.ctx.command_path if e.ctx else "grpoctl"
        return f"{where}: {e.format_message()} (see `{where} --help`)", e.exit_code
    return e.format_message(), e.exit_code
