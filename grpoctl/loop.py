"""`grpoctl loop`: rollout -> score -> advantage -> update, step after step, in one process.

The loop calls the same functions as the stage commands, keeps the model in
memory, and writes every stage's output to the run directory:

    RUN/config.json              every resolved setting (repeat a run from it)
    RUN/metrics.jsonl            one line per finished step
    RUN/eval.jsonl               one line per evaluation (step 0 = before training)
    RUN/step-000001/rollouts.jsonl scored.jsonl advantages.jsonl done
    RUN/checkpoints/step-000010/ model.safetensors optimizer.safetensors trainer_state.json ...

Crash safety. Every file is written atomically (temporary name, fsync, rename),
so a file that exists is complete. A step's `done` file (its metrics) is written
after the update. `--resume` loads the newest checkpoint, replays the updates of
the finished steps after it from their saved advantages files (deterministic, no
sampling), reuses any stage file of the unfinished step, and carries on. Each
step's sampling seed is derived from (seed, step), so a resumed run samples
exactly what the uninterrupted run would have.

Under torchrun every rank runs this loop (distributed.py): each samples its share
of the step's prompts, rank 0 gets all the records in one process's order, scores
them, computes the advantages and writes every file, and each rank updates on its
share of the advantages. Same files and weights as one process, up to float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import types
import typing
from pathlib import Path

from grpoctl import distributed, process, sampler_worker
from grpoctl.advantages import compute_advantages
from grpoctl.config import (AdapterSettings, AdvantageSettings, LoopConfig, SamplingSettings,
                            ScoreSettings, UpdateSettings, flag_of, refill_cap)
from grpoctl.display import NullDisplay
from grpoctl.errors import GrpoctlError
from grpoctl.evaluate import evaluate_records, is_correct
from grpoctl.hacks import WARN_ABOVE as HACK_WARN_ABOVE, hack_rate
from grpoctl.heap import release_if_grown
from grpoctl.models import check_vocab, load_policy, load_tokenizer, load_training_policy
from grpoctl.prompts import load_prompts, render_prompt, where_of
from grpoctl.records import (NEEDS_ADVANTAGE, NEEDS_SCORE, NEEDS_UPDATE, atomic_open,
                             check_same_records, dumps, group_by_prompt, iter_jsonl,
                             parse_records, read_records, write_json, write_records)
from grpoctl.refill import contrastive_prompts, epoch_order, refill_size, take_prompts
from grpoctl.rewards import parse_reward_specs, score_records
from grpoctl.rollout import generate, tokenize_prompts
from grpoctl.runlock import lock_run_dir, release_run_dir
from grpoctl.update import UpdateConfig, make_optimizer, update_batch


def update_config(cfg: LoopConfig):
    """The update stage's settings (update.UpdateConfig) from a run's."""
    return UpdateConfig(**dataclasses.asdict(cfg.group(UpdateSettings)))


def lora_settings(cfg: LoopConfig):
    """The run's LoRA adapter (config.AdapterSettings)."""
    return cfg.group(AdapterSettings)


def step_dir(run: Path, step: int) -> Path:
    return run / f"step-{step:06d}"


def attempt_dir(run: Path, step: int, attempt: int) -> Path:
    """Where --refill's attempt k of a step keeps its files (attempt 0: the step's own)."""
    return step_dir(run, step) / f"refill-{attempt:02d}" if attempt else step_dir(run, step)


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


REFILL_SALT = 1000  # step_seed salts: 0 the step's rollouts, 1 its evaluation, 1000 + k refills


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A per-step seed, independent of how many steps ran in this process."""
    return (seed * 1_000_003 + step * 7919 + salt) % (2**31 - 1)


def attempt_seed(seed: int, step: int, attempt: int) -> int:
    """The sampling seed of a step's rollouts (attempt k > 0: its k-th --refill draw)."""
    return step_seed(seed, step, salt=REFILL_SALT + attempt if attempt else 0)


def prompts_for_step(prompts: list[dict], step: int, per_step: int, seed: int) -> list[dict]:
    """The step's prompts: slice number k of epoch e's shuffled order.

    Each epoch reshuffles (seeded by seed and epoch) and is cut into len // per_step
    steps, dropping the remainder, so no prompt appears twice in one step (its group
    would double) and the batch depends only on (seed, step). Without --refill only:
    a --refill run draws from the prompt stream instead (`refill_batch`).
    """
    steps_per_epoch = len(prompts) // per_step
    if steps_per_epoch == 0:
        raise GrpoctlError(f"--prompts-per-step {per_step} is more than the {len(prompts)} prompts")
    epoch, k = divmod(step - 1, steps_per_epoch)
    order = epoch_order(len(prompts), seed, epoch)  # the --refill stream's order too
    return [prompts[i] for i in order[k * per_step:(k + 1) * per_step]]


def refill_batch(prompts: list[dict], cursor: int, per_step: int, seed: int):
    """--refill: a step's own prompts (attempt 0), the next per_step of the prompt stream
    from `cursor` (refill.take_prompts), and the cursor after them. Step 1 (cursor 0)
    gets prompts_for_step's step-1 batch."""
    return take_prompts(prompts, cursor, per_step, seed)


def refill_cursor(state: "Run", step: int) -> int:
    """--refill: the prompt stream's position after `step` (0 before step 1), from the
    finished step's metrics (its `prompt_cursor`)."""
    if step == 0:
        return 0
    cursor = state.done_metrics(step).get("prompt_cursor")
    if not isinstance(cursor, int):
        raise GrpoctlError(f"{step_dir(state.path, step) / 'done'}: no prompt_cursor (a --refill "
                           "run of an older grpoctl cannot be resumed; start it again)")
    return cursor


class Run:
    """The state of one run directory: which steps are done, what to resume from."""

    def __init__(self, path: Path):
        self.path = path

    def done_steps(self) -> list[int]:
        """The finished steps: 1, 2, ... up to the first step whose `done` file is missing
        or damaged (not one JSON object of that step: a truncated or emptied file); that
        step and any after it run again."""
        steps = []
        while self.done_metrics(len(steps) + 1) is not None:
            steps.append(len(steps) + 1)
        return steps

    def done_metrics(self, step: int) -> dict | None:
        """A step's `done` file (its metrics), or None when missing or damaged."""
        try:
            metrics = json.loads((step_dir(self.path, step) / "done").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return metrics if isinstance(metrics, dict) and metrics.get("step") == step else None

    def latest_checkpoint(self, up_to: int) -> int:
        steps = [int(d.name.split("-")[1]) for d in (self.path / "checkpoints").glob("step-*")
                 if (d / "trainer_state.json").is_file()]
        steps = [s for s in steps if s <= up_to]
        return max(steps, default=0)

    def drop_damaged_stage_files(self, step: int, batch: list[dict], cfg: LoopConfig,
                                 log=lambda message: None) -> None:
        """Before an unfinished step runs again: delete its first stage file that is not
        complete, and those after it (they were made from it), so that those stages run
        again. Complete means: rollouts.jsonl holds the G samples of each of the step's
        prompts, scored.jsonl the same samples with rewards, advantages.jsonl the same
        (less the tied groups --drop-zero drops), each readable with what the next stage
        needs. Files are written atomically, so only damage from outside fails this."""
        directory = step_dir(self.path, step)
        names = ["rollouts.jsonl", "scored.jsonl", "advantages.jsonl"]
        if cfg.refill:  # kept.jsonl and its advantages: made again from the attempts' files
            for name in ("kept.jsonl", "advantages.jsonl"):
                (directory / name).unlink(missing_ok=True)
            names = names[:2]
        paths = [directory / n for n in names]
        before = [{"prompt_id": p["prompt_id"], "sample": g}
                  for p in batch for g in range(cfg.group_size)]
        for k, path in enumerate(paths):
            if not path.is_file():
                return
            try:
                if k == 2:
                    records = read_advantages(path)
                    if cfg.drop_zero and not cfg.advantage_cmd:  # tied groups may be left out
                        kept = {r["prompt_id"] for r in records}
                        rewards: dict[str, set] = {}
                        for r in before:
                            rewards.setdefault(r["prompt_id"], set()).add(r["reward"])
                        before = [r for r in before if r["prompt_id"] in kept
                                  or len(rewards[r["prompt_id"]]) > 1]
                else:
                    records = read_records(str(path), (NEEDS_SCORE, NEEDS_ADVANTAGE)[k])
                check_same_records(before, records, str(path),
                                   "the step's batch" if k == 0 else names[k - 1])
            except GrpoctlError as e:
                log(f"step {step}: {names[k]} is incomplete ({e}); running that stage again")
                for later in paths[k:]:
                    later.unlink(missing_ok=True)
                return
            before = records


# What --resume may change: how far the run goes and what it keeps, never what a step
# computes (so the resumed run stays the run its finished steps belong to).
RESUME_MAY_CHANGE = ("steps", "epochs", "eval_every", "save_every", "keep_last", "score_workers")


def resume_changes(saved: dict, given: dict[str, tuple[str, object]], where: Path) -> dict:
    """The settings named with --resume that differ from the run's, as {name: [old, new]}.

    given: {LoopConfig field: (its flag, the value given)} for the flags on the command
    line. A change outside RESUME_MAY_CHANGE is refused, in one line naming every such flag.
    """
    changes, refused = {}, []
    for name, (flag, value) in given.items():
        old = saved.get(name)
        if value == old:
            continue
        if name in RESUME_MAY_CHANGE:
            changes[name] = [old, value]
        else:
            refused.append(f"{flag} ({old!r} in the run, {value!r} given)")
    if refused:
        allowed = ", ".join(flag_of(n) for n in RESUME_MAY_CHANGE)
        raise GrpoctlError(f"{where}: --resume cannot change {'; '.join(refused)}: only {allowed} "
                           "may change; start a new run (another --run-dir) for other settings")
    return changes


def find_latest_run(root: Path = Path("runs")) -> Path:
    runs = [d for d in root.glob("*") if (d / "config.json").is_file()] if root.is_dir() else []
    if not runs:
        raise GrpoctlError(f"--resume: no run found under {root}/; pass --run-dir")
    return max(runs, key=lambda d: (d / "config.json").stat().st_mtime)


def remove_stale_temporaries(run: Path) -> None:
    """Delete the `.NAME.*.tmp` files and directories that a killed write or prune left
    anywhere in the run directory (never read: harmless, but they would pile up over
    many kills). One that cannot be removed (a read-only run directory) is one line."""
    try:
        for stale in sorted(run.rglob(".*.tmp"), reverse=True):  # refill-KK/ is two levels down
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
    except OSError as e:
        where = e.filename or run
        raise GrpoctlError(f"{where}: cannot remove the temporary file a killed write left: "
                           f"{e.strerror or e}") from None


# A temporary config.json (records.atomic_open's mkstemp name): all a start killed
# before its config.json was in place leaves.
_START_TEMPORARY = re.compile(r"\.config\.json\.[A-Za-z0-9_]+\.tmp")


def start_temporaries(run: Path) -> list[Path] | None:
    """The run directory's entries when every one is a temporary config.json a killed
    start left (an empty directory gives []); None when it holds anything else."""
    entries = list(run.iterdir())
    if all(_START_TEMPORARY.fullmatch(p.name) and p.is_file() for p in entries):
        return entries
    return None


def check_config_types(saved, config_path: Path) -> None:
    """config.json's fields have the types of LoopConfig's: a hand-edited `"group_size":
    "2"` is one line naming the file and the field, not a TypeError later in the run."""
    if not isinstance(saved, dict):
        raise GrpoctlError(f"{config_path}: cannot read the run's settings: expected a JSON "
                           f"object, got {type(saved).__name__}")
    for name, hint in typing.get_type_hints(LoopConfig).items():
        if name in saved and not _has_type(saved[name], hint):
            raise GrpoctlError(f"{config_path}: field '{name}': expected {_type_name(hint)}, "
                               f"got {json.dumps(saved[name])[:40]}")


def _has_type(value, hint) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if isinstance(value, bool):  # JSON true is not a number
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _type_name(hint) -> str:
    return str(hint).replace("<class '", "").replace("'>", "").replace("NoneType", "null")


def stream_end(cfg: LoopConfig, prompt_count: int) -> int | None:
    """--refill --epochs: the position in the prompt stream (refill.take_prompts) where
    the run ends, round(epochs * prompts); None for a run without --refill or with --steps."""
    return round(cfg.epochs * prompt_count) if cfg.refill and not cfg.steps else None


def run_prompts(cfg: LoopConfig) -> list[dict]:
    """The run's training prompts (--prompts, --limit), loaded as run_loop loads them."""
    return Loop(cfg, Path(cfg.run_dir), NullDisplay()).load_prompts(cfg.prompts, cfg.limit)


def planned_steps(cfg: LoopConfig, prompts: list[dict] | None = None) -> int:
    """The steps cfg's run takes (run_loop's rule): --steps, or --epochs over its prompts
    (loaded when not given). With --refill --epochs a bound: the run ends sooner once
    the prompt stream reaches stream_end (every step takes at least prompts_per_step)."""
    if cfg.steps:
        return cfg.steps
    prompts = run_prompts(cfg) if prompts is None else prompts
    end = stream_end(cfg, len(prompts))
    if end is not None:
        return max(1, -(-end // cfg.prompts_per_step))
    return max(1, round(cfg.epochs * (len(prompts) // cfg.prompts_per_step)))


def _check_not_shortened_by_epochs(run: Path, cfg: LoopConfig, epochs_flag, finished: int):
    """--resume --epochs (cfg: the run's settings with the new value): refused when the
    run would end before its finished steps, which run_loop would then discard. Without
    --refill, counted in steps (planned_steps); with --refill, in the prompt stream: a
    step consumes more than prompts_per_step prompts, so the new stream_end must be past
    the position where the last finished step began (its predecessor's prompt_cursor)."""
    prompts = run_prompts(cfg)
    end = stream_end(cfg, len(prompts))
    if end is None:
        planned = planned_steps(cfg, prompts)
        if planned < finished:
            raise GrpoctlError(f"{run}: --epochs {epochs_flag} is {planned} steps: the run has "
                               f"finished {finished} steps, and a run is not shortened; give "
                               "more --epochs (or --steps)")
        return
    began = refill_cursor(Run(run), finished - 1)
    if end <= began:
        least = math.ceil((began + 1) / len(prompts) * 10_000) / 10_000
        raise GrpoctlError(f"{run}: --epochs {epochs_flag} ends the prompt stream at prompt "
                           f"{end} ({len(prompts)} an epoch), but finished step {finished} "
                           f"began at prompt {began}, and a run is not shortened; give "
                           f"--epochs {least:g} or more (or --steps)")


def prepare_run_dir(cfg: LoopConfig, resume: bool,
                    given: dict | None = None) -> tuple[Path, LoopConfig]:
    """Create (or reopen with --resume) the run directory; run_loop writes config.json once
    the prompts and the model have loaded, so bad input leaves no run behind.

    given: with --resume, the settings named on the command line ({field: (flag, value)});
    those in RESUME_MAY_CHANGE replace the saved ones (config.json is rewritten and the
    change appended to resumes.jsonl), any other difference is refused (resume_changes)."""
    if cfg.run_dir is None:
        run = find_latest_run() if resume else Path("runs") / (
            time.strftime("%Y%m%d-%H%M%S") + f"-g{cfg.group_size}-s{cfg.seed}")
    else:
        run = Path(cfg.run_dir)
    config_path = run / "config.json"
    if resume:
        if not config_path.is_file():
            if run.is_dir() and start_temporaries(run):
                raise GrpoctlError(f"{run}: nothing to resume: the run started here was stopped "
                                   "before its config.json was written (only its temporary "
                                   "file is left); start it again without --resume")
            raise GrpoctlError(f"{run}: nothing to resume (no config.json)")
        lock_run_dir(run)  # before touching anything: another loop may be running here
        try:
            saved = json.loads(config_path.read_text())
            check_config_types(saved, config_path)
            saved["run_dir"] = str(run)
            resumed = LoopConfig(**saved)
            resumed.resolved()  # values in range too (a hand-edited group_size of -1)
        except (OSError, UnicodeDecodeError, ValueError, TypeError, GrpoctlError) as e:
            # edited by hand, another version, not a run
            message = e.strerror if isinstance(e, OSError) else e
            if isinstance(e, GrpoctlError) and str(e).startswith(str(config_path)):
                raise
            raise GrpoctlError(f"{config_path}: cannot read the run's settings: "
                               f"{message}") from None
        changes = resume_changes(saved, given or {}, config_path)
        finished = max(Run(run).done_steps(), default=0)
        if "steps" in changes and (changes["steps"][1] or finished) < finished:
            raise GrpoctlError(f"{run}: --steps {changes['steps'][1]}: the run has finished "
                               f"{finished} steps, and a run is not shortened; give --steps "
                               f">= {finished}")
        if "epochs" in changes and finished:  # the same rule, counted in epochs
            _check_not_shortened_by_epochs(run, dataclasses.replace(
                resumed, **{k: new for k, (_, new) in changes.items()}),
                changes["epochs"][1], finished)
        remove_stale_temporaries(run)  # a run's, now that config.json says it is one
        if changes:
            resumed = dataclasses.replace(resumed, **{k: new for k, (_, new) in changes.items()})
            resumed.resolved()  # the new values in range, before anything is written
            write_json(dataclasses.asdict(resumed), config_path)
            append_line(run / "resumes.jsonl", {"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                "changed": changes})
        return run, resumed
    if config_path.exists():
        raise GrpoctlError(f"{run}: run directory already holds a run; add --resume to continue it "
                           "or choose another --run-dir")
    leftovers = start_temporaries(run) if run.is_dir() else []
    if leftovers is None:  # the user's files: a run would write among them
        names = sorted(p.name for p in run.iterdir())
        raise GrpoctlError(f"{run}: exists and is not empty ({', '.join(names[:3])}"
                           f"{', ...' if len(names) > 3 else ''}); a new run needs a new or "
                           "empty --run-dir")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GrpoctlError(f"{run}: cannot create run directory: {e.strerror}") from None
    lock_run_dir(run)  # two new loops on one directory: the second stops here
    if config_path.exists():  # ... or here, if the first has already written its config
        raise GrpoctlError(f"{run}: run directory already holds a run; add --resume to continue it "
                           "or choose another --run-dir")
    for stale in leftovers:  # a killed start's temporary config.json: ours, an empty run
        try:
            stale.unlink(missing_ok=True)
        except OSError as e:
            raise GrpoctlError(f"{stale}: cannot remove the temporary file a killed start "
                               f"left: {e.strerror}") from None
    return run, dataclasses.replace(cfg, run_dir=str(run))


# --- the stages, as the loop runs them ------------------------------------------


def _external_stage(command: str, input_path: Path, output_path: Path, require: tuple) -> list[dict]:
    """Run a user's stage command: records on stdin, records on stdout, validated before
    anything is written: `require` present, and the same samples as its input with their
    identity unchanged (records.check_same_records)."""
    with open(input_path, "rb") as stdin:  # its process group dies with it (process.py)
        status, stdout, stderr = process.run_command(command, stdin)
    if status != 0:
        last = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise GrpoctlError(f"stage command {command!r} exited {status}: {last[0]}")
    source = f"output of {command!r}"
    records = parse_records(stdout, source, require)
    check_same_records(read_records(str(input_path)), records, source, str(input_path))
    write_records(records, str(output_path))
    return records


class Loop:
    """One training run; `run()` does the steps. Kept small: each stage is one call."""

    def __init__(self, cfg: LoopConfig, run: Path, display):
        self.cfg, self.run, self.display = cfg, run, display
        self.model = self.tokenizer = self.optimizer = self.ref_model = None
        self.engine = None  # the vLLM engine (--backend vllm), built by start_engine
        self.sampler = None  # --async: the sampler process (sampler_worker.AsyncRollouts)

    # setup ---------------------------------------------------------------------

    def load(self, from_checkpoint: int) -> None:
        import torch

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        source = checkpoint_dir(self.run, from_checkpoint) if from_checkpoint else cfg.model
        # A checkpoint with a LoRA adapter continues it; a fresh run attaches one if lora_r > 0
        self.model = load_training_policy(source, cfg.dtype, cfg.device, cfg.trust_remote_code,
                                          cfg.attn_implementation, cfg.gradient_checkpointing,
                                          lora_settings(cfg), seed=cfg.seed)
        self.tokenizer = load_tokenizer(source, cfg.trust_remote_code)
        check_vocab(self.tokenizer, self.model, str(source))
        # torchrun: the same weights on every rank, or FSDP shards; the optimizer comes after
        self.model = distributed.wrap_model(self.model, "fsdp" if cfg.fsdp else "ddp")
        self.optimizer = make_optimizer(self.model, self.update_config())
        if from_checkpoint:
            distributed.load_optimizer_state(self.optimizer, self.model, source)
        if cfg.ref:  # with --kl-coef 0 the KL is measured, as `update --ref` does
            self.ref_model = load_policy(cfg.ref, cfg.dtype, cfg.device, cfg.trust_remote_code,
                                         cfg.attn_implementation)

    def update_config(self):
        return update_config(self.cfg)

    def load_prompts(self, source: str, limit: int | None = None) -> list[dict]:
        c = self.cfg
        return load_prompts(source, prompt_field=c.prompt_field, answer_field=c.answer_field,
                            answer_after=c.answer_after, id_field=c.id_field, limit=limit)

    def sampling(self, seed: int, evaluation: bool = False):
        c = self.cfg
        sampling = dataclasses.replace(c.group(SamplingSettings), seed=seed)
        if evaluation:  # the evaluation's own temperature, top-p and top-k (EvalSettings)
            return dataclasses.replace(sampling, temperature=c.eval_temperature,
                                       top_p=c.eval_top_p, top_k=c.eval_top_k)
        return sampling

    def context_length(self, prompts: list[dict]) -> int | None:
        """The vLLM engine's context: the longest of `prompts` (rendered) + --max-new-tokens."""
        from grpoctl.rollout.vllm import context_length

        return context_length(self.cfg.model, tokenize_prompts(self.tokenizer, self.render(prompts)),
                              self.cfg.max_new_tokens)

    def start_engine(self, length: int | None) -> None:
        """Build the run's vLLM engine and give it this process's current weights.

        Built from --model (a full model, even when the run saves LoRA adapters), then
        handed the model's weights: those of a resumed checkpoint and replayed updates.
        `length`: its context (context_length).
        """
        from grpoctl.rollout.vllm import VllmEngine

        c = self.cfg
        self.engine = VllmEngine(c.model, self.sampling(c.seed), dtype=c.vllm_dtype or c.dtype,
                                 trust_remote_code=c.trust_remote_code,
                                 tensor_parallel_size=c.tensor_parallel_size,
                                 gpu_memory_utilization=c.gpu_memory_utilization,
                                 sleep_mode=c.vllm_sleep, enforce_eager=c.vllm_eager,
                                 max_model_len=length)
        self.engine.load_weights(self.model)

    def render(self, prompts: list[dict]) -> list[dict]:
        """The prompts with their text in the chat template (or --template) the policy sees."""
        c = self.cfg
        return [dict(p, text=render_prompt(self.tokenizer, p["text"], c.template,
                                           c.use_chat_template, c.system)) for p in prompts]

    def generate(self, prompts: list[dict], group_size: int, sampling, step: int,
                 logprobs: bool = True) -> list[dict]:
        c = self.cfg
        order = [p["prompt_id"] for p in prompts]
        prompts = distributed.shard_prompts(prompts)  # torchrun: each rank samples its share
        model = self.engine.llm if self.engine is not None else self.model
        distributed.gather_weights(self.model)  # FSDP: whole weights, on all ranks at once
        records = generate(model, self.tokenizer, self.render(prompts), group_size, sampling,
                           batch_size=c.batch_size, policy={"path": str(c.model), "step": step},
                           backend=c.backend, progress=False, logprobs=logprobs)
        return distributed.gather_records(records, order)  # all ranks', in one process's order

    # one step -----------------------------------------------------------------------

    def sample_step(self, prompts: list[dict], seed: int, policy_step: int) -> list[dict]:
        """A step's rollouts, sampled by the weights after step `policy_step` (this
        process's, or --async's sampler process's: sampler_worker.py), each record
        carrying that step as `policy_step`."""
        records = self.generate(prompts, self.cfg.group_size, self.sampling(seed), policy_step)
        return [dict(r, policy_step=policy_step) for r in records]

    def rollout_stage(self, step: int, prompts: list[dict], attempt: int = 0) -> list[dict]:
        """The step's rollouts; attempt k > 0 is --refill's k-th draw of fresh prompts,
        in its own directory and with its own seed."""
        path = attempt_dir(self.run, step, attempt) / "rollouts.jsonl"
        if self.sampler is not None:  # --async: the sampler process writes the file
            self.sampler.wait_for_rollouts(step, prompts, attempt)
        if path.is_file():
            return read_records(str(path))
        if self.cfg.rollouts_from:
            source = step_dir(Path(self.cfg.rollouts_from), step) / "rollouts.jsonl"
            records = read_records(str(source))
        else:
            records = self.sample_step(prompts, attempt_seed(self.cfg.seed, step, attempt),
                                       step - 1)
        if distributed.is_main():  # torchrun: rank 0 writes the files
            path.parent.mkdir(exist_ok=True)
            write_records(records, str(path))
        return records

    @distributed.main_only  # torchrun: rank 0 scores and writes; every rank gets the records
    def score_stage(self, step: int, records: list[dict], attempt: int = 0) -> list[dict]:
        directory = attempt_dir(self.run, step, attempt)
        path = directory / "scored.jsonl"
        if path.is_file():
            return read_records(str(path), NEEDS_ADVANTAGE)
        if self.cfg.score_cmd:
            return _external_stage(self.cfg.score_cmd, directory / "rollouts.jsonl", path,
                                   NEEDS_ADVANTAGE)
        scored, _ = score_records(records, self.cfg.group(ScoreSettings),
                                  progress=False, source=str(directory / "rollouts.jsonl"))
        write_records(scored, str(path))
        return scored

    @distributed.main_only  # ... and the advantages: each rank then updates on its share
    def advantage_stage(self, step: int, scored: list[dict],
                        input_name: str = "scored.jsonl") -> list[dict]:
        """Advantages of `scored`, the step directory's `input_name` (kept.jsonl with --refill)."""
        directory = step_dir(self.run, step)
        path = directory / "advantages.jsonl"
        if path.is_file():
            records = read_advantages(path)
        elif not scored:  # --refill kept no group: an empty file, so the step replays
            records = []
            write_records(records, str(path))
        elif self.cfg.advantage_cmd:
            records = _external_stage(self.cfg.advantage_cmd, directory / input_name, path,
                                      NEEDS_UPDATE)
        else:
            records, _ = compute_advantages(scored, self.cfg.group(AdvantageSettings),
                                            source=str(directory / input_name))
            write_records(records, str(path))
        return records

    def refill_stage(self, step: int, prompts: list[dict], batch: list[dict],
                     records: list[dict], scored: list[dict], cursor: int):
        """--refill (refill.py): sample the next prompts of the stream (from `cursor`, the
        position after the step's own `batch`) for the tied groups of attempt 0
        (`records`/`scored`) until prompts_per_step contrastive groups are kept or the
        rollout cap (config.refill_cap) is reached. Each attempt's files are in
        refill-KK/ (a damaged one is made again: `drop_damaged_attempt`), the kept
        groups' scored records in kept.jsonl. A step left short of its quota says so
        (stderr, and `refill_short` in its metrics) and trains on what it kept.
        Returns (every attempt's records, every attempt's scored records, the kept
        scored records, the refill metrics, the stream position after the step)."""
        c = self.cfg
        wanted, cap = c.prompts_per_step, refill_cap(c)
        used = {p["prompt_id"] for p in batch}
        kept_ids = contrastive_prompts(scored)[:wanted]
        all_records, all_scored, attempt = list(records), list(scored), 0
        while len(kept_ids) < wanted:
            budget = (cap - len(all_records)) // c.group_size
            count = refill_size(wanted - len(kept_ids), len(kept_ids), len(used), budget)
            fresh, after = take_prompts(prompts, cursor, count, c.seed, used)
            if not fresh:  # the cap is reached, or every prompt is in this step
                break
            attempt, cursor = attempt + 1, after
            self.display.stage(step, f"refill {attempt}")
            self.drop_damaged_attempt(step, attempt, fresh)
            records = self.rollout_stage(step, fresh, attempt)
            scored = self.score_stage(step, records, attempt)
            used.update(p["prompt_id"] for p in fresh)
            kept_ids += contrastive_prompts(scored)[:wanted - len(kept_ids)]
            all_records += records
            all_scored += scored
        kept = set(kept_ids)
        kept_scored = [r for r in all_scored if r["prompt_id"] in kept]
        if distributed.is_main():
            write_records(kept_scored, str(step_dir(self.run, step) / "kept.jsonl"))
            if len(kept) < wanted:
                _warn(self.display, f"step {step}: --refill kept {len(kept)} of {wanted} "
                      f"contrastive groups: the cap of {cap} rollouts (or the prompt set) "
                      f"ran out after {len(all_records)}; training on the {len(kept)} kept")
        metrics = {"refill_attempts": attempt, "groups_sampled": len(used),
                   "groups_kept": len(kept), "discard_rate": 1 - len(kept) / len(used),
                   "refill_short": wanted - len(kept)}
        return all_records, all_scored, kept_scored, metrics, cursor

    def drop_damaged_attempt(self, step: int, attempt: int, prompts: list[dict]) -> None:
        """Before --refill's attempt `attempt` reuses its files (a resumed step): delete its
        first file that is not complete for `prompts` (rollouts.jsonl: their G samples;
        scored.jsonl: the same with rewards), those after it, and the later attempts
        (made from it). A cut file is thus sampled or scored again, never reused."""
        directory = attempt_dir(self.run, step, attempt)
        before = [{"prompt_id": p["prompt_id"], "sample": g}
                  for p in prompts for g in range(self.cfg.group_size)]
        names = ["rollouts.jsonl", "scored.jsonl"]
        for k, name in enumerate(names):
            path = directory / name
            if not path.is_file():
                return
            try:
                records = read_records(str(path), (NEEDS_SCORE, NEEDS_ADVANTAGE)[k])
                check_same_records(before, records, str(path),
                                   "the attempt's prompts" if k == 0 else names[0])
            except GrpoctlError as e:
                self.display.log(f"step {step}: {directory.name}/{name} is incomplete ({e}); "
                                 "running that stage again")
                for later in names[k:]:
                    (directory / later).unlink(missing_ok=True)
                for later in step_dir(self.run, step).glob("refill-*"):
                    if later.name > directory.name:
                        shutil.rmtree(later, ignore_errors=True)
                return
            before = records

    def update_stage(self, step: int, records: list[dict]) -> dict:
        if not records:  # every group tied and --drop-zero removed them: no gradient this step
            return {"loss": 0.0, "tokens": 0, "skipped": True}
        try:
            if self.engine is not None and self.cfg.vllm_sleep:
                self.engine.sleep()  # the engine's weights to CPU, its KV cache freed
            metrics = update_batch(self.model, self.optimizer, records, self.update_config(),
                                   ref_model=self.ref_model, step=step)
            if self.engine is not None:  # new weights into the live engine, checked on this step
                metrics.update(self.engine.sync_weights(self.model, records))
            return metrics
        except GrpoctlError as e:  # e.g. a non-finite loss: say which step, save nothing
            raise GrpoctlError(f"step {step}: {e}") from None

    def save(self, step: int, metrics: dict) -> None:
        state = {"step": step, "config": dataclasses.asdict(self.cfg), "metrics": metrics}
        # torchrun: every rank calls it (FSDP gathers the shards), rank 0 writes and prunes
        distributed.save_checkpoint(checkpoint_dir(self.run, step), self.model, self.tokenizer,
                                    self.optimizer, state, self.cfg.save_lora)
        if not distributed.is_main():
            return
        kept = sorted((self.run / "checkpoints").glob("step-*"))
        for old in kept[: max(0, len(kept) - self.cfg.keep_last)]:
            # Renamed first (atomic), so a kill mid-delete never leaves half a checkpoint
            # under a step-* name for --resume to pick.
            doomed = old.with_name(f".{old.name}.deleted.tmp")
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def sample_evaluation(self, step: int, eval_prompts: list[dict]) -> list[dict]:
        """The evaluation's completions by this process's weights (those after `step`)."""
        return self.generate(eval_prompts, self.cfg.eval_samples,
                             self.sampling(step_seed(self.cfg.seed, step, salt=1), True), step,
                             logprobs=False)

    def evaluate(self, step: int, eval_prompts: list[dict], elapsed: float,
                 rollouts: int) -> dict | None:
        records = (self.sampler.evaluation(step, eval_prompts) if self.sampler
                   else self.sample_evaluation(step, eval_prompts))
        if not distributed.is_main():  # torchrun: rank 0 scores and records the evaluation
            return None
        _, summary = evaluate_records(records, k=self.cfg.eval_samples,
                                      workers=self.cfg.score_workers,
                                      timeout=self.cfg.score_timeout)
        return {"step": step, "mean_at_k": summary["mean_at_k"], "pass_at_k": summary["pass_at_k"],
                "k": summary["k"], "prompts": summary["prompts"],
                "hack_rate": summary["hack_rate"], "rollouts": rollouts,
                "elapsed_s": elapsed}


def group_stats(scored: list[dict], advantaged: list[dict]) -> dict:
    """Reward, accuracy and zero-advantage figures of one step.

    scored: the step's own prompts' groups (with --refill, its attempt 0: the figures
    mean what they mean in a run without --refill, comparable across runs);
    advantaged: what the update trains on."""
    return {**_reward_figures(scored, ""),
            "response_length": _mean([len(r["completion_ids"]) for r in scored
                                      if "completion_ids" in r]),
            "trained_sequences": len(advantaged)}


def refill_stats(sampled: list[dict], kept: list[dict]) -> dict:
    """--refill's figures apart: `sampled_*` over every attempt's groups (discarded ones
    included), `trained_*` over the kept groups the update trains on (never tied)."""
    return {**_reward_figures(sampled, "sampled_"), **_reward_figures(kept, "trained_")}


def _reward_figures(scored: list[dict], prefix: str) -> dict:
    """PREFIXreward_mean, PREFIXaccuracy, PREFIXzero_adv_frac (the share of groups
    whose rewards all tie) and PREFIXhack_rate (hacks.py: the share of credited
    completions whose answer looks gamed) of `scored`; 0.0 for no records."""
    groups = group_by_prompt(scored)
    tied = sum(1 for ix in groups.values() if len({scored[i]["reward"] for i in ix}) == 1)
    return {f"{prefix}reward_mean": _mean([r["reward"] for r in scored]),
            f"{prefix}accuracy": _mean([is_correct(r) for r in scored]),
            f"{prefix}zero_adv_frac": tied / len(groups) if groups else 0.0,
            f"{prefix}hack_rate": hack_rate(scored)}


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else 0.0


def _warn(display, message: str) -> None:
    """A warning on stderr: above the progress display, or plain with --quiet."""
    if type(display) is NullDisplay:
        print(f"warning: {message}", file=sys.stderr, flush=True)
    else:
        display.log(f"warning: {message}")


def read_advantages(path: Path, trained: int | None = None) -> list[dict]:
    """A step's advantages file; empty when --drop-zero left no group to train on.
    `trained`: the number of records the finished step trained on (its `done` file's
    trained_sequences); a file with another number is damaged, and refused."""
    try:
        records = read_records(str(path), NEEDS_UPDATE) if path.stat().st_size else []
    except FileNotFoundError:
        raise GrpoctlError(f"{path}: missing; the step's update cannot be replayed") from None
    if trained is not None and len(records) != trained:
        raise GrpoctlError(f"{path}: {len(records)} records, but the step trained on {trained}; "
                           "the file is damaged and its update cannot be replayed")
    return records


def append_line(path: Path, record: dict) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f, process.committing(path):
            f.write(dumps(record) + "\n")  # the whole line or none, whenever a signal comes
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: the `done` file holds the line; resume rebuilds it
        raise GrpoctlError(f"{path}: cannot write: {e.strerror}") from None


def rebuild_metrics(run: Path, done: list[int]) -> None:
    """metrics.jsonl from the `done` files: drops lines of steps a crash cut short.
    `done` lists steps whose files Run.done_steps found complete."""
    with atomic_open(run / "metrics.jsonl") as f:
        for s in done:
            text = (step_dir(run, s) / "done").read_text(encoding="utf-8")
            f.write(text if text.endswith("\n") else text + "\n")


def run_loop(cfg: LoopConfig, resume: bool = False, display=None,
             given: dict | None = None) -> Path:
    """Train for cfg.steps steps (or cfg.epochs epochs); return the run directory.
    given: the settings named with --resume (prepare_run_dir)."""
    with sampler_worker.stopped_on_exit():  # --async: the sampler process ends with the loop
        return _run_loop(cfg, resume, display, given)


def _run_loop(cfg: LoopConfig, resume: bool, display, given: dict | None) -> Path:
    cfg = cfg.resolved()
    if cfg.async_steps and distributed.world()[1] > 1:
        raise GrpoctlError("--async runs one sampler process beside one trainer; under "
                           "torchrun leave --async out")
    if cfg.backend == "vllm":  # what the engine cannot do is refused before the run dir is touched
        from grpoctl.rollout.vllm import check_engine, require_vllm

        require_vllm(world_size=distributed.world()[1])
        check_engine(cfg.model, cfg.vllm_sleep)
    distributed.init_if_launched(cfg.device)  # torchrun: join the other ranks
    # Under torchrun rank 0 shows progress and writes every file; the others compute.
    display = display if display and distributed.is_main() else NullDisplay()
    new_dir = not resume and not (cfg.run_dir and Path(cfg.run_dir).exists())
    run, cfg = distributed.on_main(prepare_run_dir, cfg, resume, given)
    # Until config.json is written, bad input (prompts, model, template) leaves nothing: a
    # run directory this call made is removed again.
    with _removed_if_left_empty(run, new_dir and distributed.is_main()):
        loop = Loop(cfg, run, display)
        prompts = loop.load_prompts(cfg.prompts, cfg.limit)
        prompts_for_step(prompts, 1, cfg.prompts_per_step, cfg.seed)  # enough prompts for a step
        parse_reward_specs(cfg.rewards)  # a user reward file that does not load
        if cfg.rollouts_from:
            _check_rollouts_from(Path(cfg.rollouts_from), cfg)
        steps = planned_steps(cfg, prompts)
        # --refill --epochs: the run ends once that many epochs of the prompt stream are
        # consumed; `steps` is then a bound (each step takes at least prompts_per_step)
        prompt_end = stream_end(cfg, len(prompts))
        eval_prompts = (loop.load_prompts(cfg.eval_prompts, cfg.eval_limit) if cfg.eval_prompts
                        else [])
        state = Run(run)
        done = [s for s in state.done_steps() if s <= steps]
        if prompt_end is not None:  # steps that began before the stream's end
            done = [s for s in done if refill_cursor(state, s - 1) < prompt_end]
        last_done = max(done, default=0)
        cursor = refill_cursor(state, last_done) if cfg.refill else 0

        def finished_after(step: int, cursor: int) -> bool:
            """The run's last step: --steps, or (--refill --epochs) the stream's end."""
            return step >= steps or (prompt_end is not None and cursor >= prompt_end)

        start_ckpt = state.latest_checkpoint(last_done)
        display.log(f"run directory: {run}"
                    + (f" (resuming after step {last_done})" if resume else ""))
        if cfg.rollouts_from:
            display.log(f"--rollouts-from {cfg.rollouts_from}: training on that run's prompts "
                        "and samples; after its first step they were sampled by another "
                        "policy than this one (off-policy: the clip, --clip-ratio-c and "
                        "--is-cap bound how far)")
        loop.load(start_ckpt)
        # a chat template that fails, a prompt too long for the model, a --ref smaller than
        # the policy: refused before config.json, not at the step that meets them
        _check_positions(loop, prompts, eval_prompts)
        if distributed.is_main() and not resume:
            write_json(dataclasses.asdict(cfg), run / "config.json")
    if distributed.is_main():
        rebuild_metrics(run, done)
    previous = state.done_metrics(last_done) if last_done else {}
    elapsed, rollouts = previous.get("elapsed_s", 0.0), previous.get("rollouts", 0)

    # Replay finished updates after the checkpoint: same inputs, same weights.
    sampler_worker.keep_policy(loop, start_ckpt)  # --async: weights the next steps sample with
    for s in range(start_ckpt + 1, last_done + 1):
        display.log(f"replaying the update of step {s} from its saved advantages")
        loop.update_stage(s, read_advantages(step_dir(run, s) / "advantages.jsonl",
                                             state.done_metrics(s).get("trained_sequences")))
        sampler_worker.keep_policy(loop, s)
    if last_done > start_ckpt and (last_done % cfg.save_every == 0
                                   or finished_after(last_done, cursor)):
        display.log(f"saving the checkpoint of step {last_done} again (it was missing)")
        loop.save(last_done, previous)  # e.g. a finished run whose final checkpoint was deleted

    def batch_of(step: int, cursor: int) -> list[dict]:
        """The step's own prompts (--refill: the stream's next ones from `cursor`)."""
        if cfg.refill:
            return refill_batch(prompts, cursor, cfg.prompts_per_step, cfg.seed)[0]
        return prompts_for_step(prompts, step, cfg.prompts_per_step, cfg.seed)

    for s in range(last_done + 1, steps + 1) if resume else ():  # every rank, before it reads
        if not step_dir(run, s).is_dir():
            continue
        if cfg.refill and s > last_done + 1:  # its prompts follow from the steps before it
            shutil.rmtree(step_dir(run, s), ignore_errors=True)
            continue
        state.drop_damaged_stage_files(s, batch_of(s, cursor), cfg, display.log)

    length = loop.context_length(prompts + eval_prompts) if cfg.backend == "vllm" else None
    # --async N: steps sampled N ahead in a process of their own (with --refill one ahead,
    # once the step before has drawn its refills); that process builds the engine, if any
    pipeline = None
    if cfg.async_steps:
        pipeline = loop.sampler = sampler_worker.AsyncRollouts(loop, steps, length)
        ahead = 1 if cfg.refill else 1 + cfg.async_steps
        for s in range(last_done + 1, last_done + 1 + ahead):
            if not finished_after(s - 1, cursor):
                pipeline.submit(s, batch_of(s, cursor))
    elif cfg.backend == "vllm":  # after the replay: the engine gets the replayed weights
        loop.start_engine(length)

    # Evaluations a crash cut short (before training, or after the last finished step).
    done_evals = _done_evals(run)
    for s in (0, last_done):
        if eval_prompts and s not in done_evals and (
                s == 0 or _eval_due(cfg, s, finished_after(s, cursor))):
            _record_eval(loop, run, s, eval_prompts, elapsed, rollouts, display)
            done_evals.add(s)

    display.start(steps, first=last_done)
    for step in range(last_done + 1, steps + 1):
        if step > 1 and finished_after(step - 1, cursor):  # --refill --epochs: consumed
            break
        t0 = time.perf_counter()
        times = {}
        step_dir(run, step).mkdir(exist_ok=True)
        if cfg.refill:  # the next prompts of the stream (refill.take_prompts)
            batch, cursor = refill_batch(prompts, cursor, cfg.prompts_per_step, cfg.seed)
        else:
            batch = prompts_for_step(prompts, step, cfg.prompts_per_step, cfg.seed)

        display.stage(step, "rollout")
        records = loop.rollout_stage(step, batch)
        times["rollout_s"] = time.perf_counter() - t0
        display.stage(step, "score")
        scored = loop.score_stage(step, records)
        times["score_s"] = time.perf_counter() - t0 - sum(times.values())
        refill, own = {}, scored
        kept, kept_name = scored, "scored.jsonl"
        if cfg.refill:
            records, scored, kept, refill, cursor = loop.refill_stage(step, prompts, batch,
                                                                      records, scored, cursor)
            refill.update(refill_stats(scored, kept), prompt_cursor=cursor,
                          epochs_consumed=cursor / len(prompts))
            kept_name = "kept.jsonl"
            times["refill_s"] = time.perf_counter() - t0 - sum(times.values())
            if pipeline and not finished_after(step, cursor):  # the next step's prompts are known
                pipeline.submit(step + 1, batch_of(step + 1, cursor))
        display.stage(step, "advantage")
        advantaged = loop.advantage_stage(step, kept, kept_name) if kept or cfg.refill else []
        stats = {**group_stats(own, advantaged), **refill}
        if stats["hack_rate"] > HACK_WARN_ABOVE:
            _warn(display, f"step {step}: {stats['hack_rate']:.0%} of the credited completions "
                  "look gamed (hack_rate: hedged, unfinished or copied from the prompt); read "
                  f"them in {step_dir(run, step) / 'scored.jsonl'}")
        times["advantage_s"] = time.perf_counter() - t0 - sum(times.values())
        display.stage(step, "update")
        update_metrics = loop.update_stage(step, advantaged)
        if pipeline:  # its weights to the sampler, which can start step + 1 + N
            pipeline.trained(step)
            if not cfg.refill:
                pipeline.submit(step + 1 + cfg.async_steps, batch_of(step + 1 + cfg.async_steps, 0))
            stats.update(pipeline.metrics(step))
        times["update_s"] = time.perf_counter() - t0 - sum(times.values())

        rollouts += len(records)
        times["step_s"] = time.perf_counter() - t0
        elapsed += times["step_s"]
        update_metrics.pop("step", None)  # the optimizer's count; the loop's step is below
        metrics = {"step": step, **stats, **update_metrics, **times, "rollouts": rollouts,
                   "elapsed_s": elapsed}
        last = finished_after(step, cursor)
        if step % cfg.save_every == 0 or last:
            display.stage(step, "checkpoint")
            loop.save(step, metrics)
        if distributed.is_main():
            with atomic_open(step_dir(run, step) / "done") as f:
                f.write(dumps(metrics) + "\n")
            append_line(run / "metrics.jsonl", metrics)
        if pipeline:
            pipeline.done(step)
        release_if_grown()  # cli.loop keeps freed memory for the next step: bounded here
        display.step_done(metrics)

        if eval_prompts and _eval_due(cfg, step, last):
            display.stage(step, "eval")
            _record_eval(loop, run, step, eval_prompts, elapsed, rollouts, display)
    display.stop()
    if loop.engine is not None:
        loop.engine.close()
    if pipeline:
        pipeline.close()
    release_run_dir(run)
    return run


@contextlib.contextmanager
def _removed_if_left_empty(run: Path, remove: bool):
    """On an error inside, remove `run` if `remove` and it is still empty (rmdir only)."""
    try:
        yield
    except BaseException:
        if remove:
            with contextlib.suppress(OSError):
                run.rmdir()
        raise


def _check_positions(loop: Loop, prompts: list[dict], eval_prompts: list[dict]) -> None:
    """Every prompt (rendered) leaves room for a completion in the policy's positions, as
    `rollout` requires, named by its file and line; and a --ref model has the positions
    and vocabulary of every sequence a step can make (`update`'s check, made before step
    1: its sequences are not known yet, so the longest prompt + --max-new-tokens)."""
    from grpoctl.models import position_limit

    positions = position_limit(loop.model)
    longest = 0
    for group in (prompts, eval_prompts):
        ids = tokenize_prompts(loop.tokenizer, loop.render(group))
        for i, row in enumerate(ids):
            if positions is not None and len(row) >= positions:
                raise GrpoctlError(f"{where_of(group, i)}: prompt {group[i]['prompt_id']!r} is "
                                   f"{len(row)} tokens: the model has {positions} positions "
                                   "(max_position_embeddings), no room for a completion; "
                                   "shorten it or leave it out")
        if group is prompts:
            longest = max(map(len, ids), default=0)
    if loop.ref_model is None:
        return
    reach = longest + loop.cfg.max_new_tokens
    reach = min(reach, positions) if positions is not None else reach
    ref_positions = position_limit(loop.ref_model)
    if ref_positions is not None and ref_positions < reach:
        raise GrpoctlError(f"--ref {loop.cfg.ref}: the model has {ref_positions} positions "
                           f"(max_position_embeddings), but a step's sequences reach {reach} "
                           f"tokens (the longest prompt, {longest}, + --max-new-tokens); use a "
                           "reference with as many positions as the policy")
    policy_vocab = loop.model.get_input_embeddings().num_embeddings
    ref_vocab = loop.ref_model.get_input_embeddings().num_embeddings
    if ref_vocab < min(policy_vocab, len(loop.tokenizer)):
        raise GrpoctlError(f"--ref {loop.cfg.ref}: the model embeds {ref_vocab} tokens, fewer "
                           f"than the policy's tokenizer's {len(loop.tokenizer)}; use a "
                           "reference with the policy's vocabulary")


def _check_rollouts_from(source: Path, cfg: LoopConfig) -> None:
    """--rollouts-from names a run whose groups this run can train on: a run directory with
    this run's group size and prompts per step (its samples are not resampled)."""
    try:
        saved = json.loads((source / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise GrpoctlError(f"--rollouts-from {source}: not a run directory ({e})") from None
    for field in ("group_size", "prompts_per_step"):
        theirs = saved.get(field) if isinstance(saved, dict) else None
        if theirs != getattr(cfg, field):
            raise GrpoctlError(f"--rollouts-from {source}: its {flag_of(field)} is {theirs!r}, "
                               f"this run's {getattr(cfg, field)!r}: train with the same")


def _eval_due(cfg: LoopConfig, step: int, last: bool) -> bool:
    """Every --eval-every steps, and after the run's last step."""
    return step % cfg.eval_every == 0 or last


def _done_evals(run: Path) -> set[int]:
    """Steps already evaluated; rewrites eval.jsonl without a line a crash cut short."""
    path = run / "eval.jsonl"
    if not path.is_file():
        return set()
    # A line a crash cut short (or damaged) is dropped: that evaluation runs again.
    kept = [r for _, r in iter_jsonl(path.read_bytes(), str(path), damaged="skip")
            if isinstance(r.get("step"), int)]
    if distributed.is_main():
        with atomic_open(path) as f:
            f.writelines(dumps(r) + "\n" for r in kept)
    return {r["step"] for r in kept}


def _record_eval(loop: Loop, run: Path, step: int, eval_prompts, elapsed, rollouts, display) -> None:
    result = loop.evaluate(step, eval_prompts, elapsed, rollouts)
    if result is not None:  # None on the ranks other than 0 (torchrun)
        append_line(run / "eval.jsonl", result)
        display.eval_done(result)
