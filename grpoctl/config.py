"""Every setting of grpoctl, declared once: its default, what it means, where it comes from.

Settings come in groups, one dataclass each, with a `check()` that refuses a bad value in
one line naming the flag (before anything is loaded or written):

    PromptSettings     which prompts, and how they become the policy's input
    ModelSettings      which model, and how it is loaded
    SamplingSettings   how rollouts are drawn (rollout/, and loop's training steps)
    VllmSettings       the vLLM engine (--backend vllm)
    ScoreSettings      rewards
    AdvantageSettings  estimators, and what to do with tied groups
    UpdateSettings     the policy-gradient step (shared by `update` and `loop`)
    AdapterSettings    LoRA adapters (the `lora` extra)
    EvalSettings       held-out evaluation during `loop`
    RunSettings        the run directory: steps, seed, checkpoints

`LoopConfig` is all of them: its fields are theirs, flat, so config.json stays one flat
object. This module imports neither torch nor any model code, so `report` and the CLI
can read settings cheaply.

Each field is the whole declaration of its flag (flags.py builds the commands' options
from it, scripts/make_docs.py the flag tables): its type and default, its docstring (the
help text), and through `setting(...)` what else the command line needs: another flag
name, a short name, a range, the allowed values. `check_fields` refuses what the
declaration rules out; each group's `check()` adds its rules across fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from grpoctl.errors import GrpoctlError

STD_MODES = ("group", "batch", "none")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean", "constant")
OLD_LOGPROBS = ("trainer", "sampler")
BACKENDS = ("hf", "vllm")
DTYPES = ("float32", "bfloat16", "float16")
SAVE_LORA_MODES = ("adapter", "merged")


def estimators() -> tuple:
    """The --estimator names: advantages.py's registry (imported when first asked)."""
    from grpoctl.advantages import ESTIMATORS

    return tuple(ESTIMATORS)


def setting(default=None, *, factory=None, flag: str | None = None, short: str | None = None,
            min: float | None = None, max: float | None = None, min_open: bool = False,
            max_open: bool = False, choices=None, invert: bool = False, none: str | None = None,
            cli: bool = True):
    """A settings field and what its flag needs beyond type, default and docstring:

        flag, short   the option's names when not --FIELD-NAME (short: e.g. -G)
        min, max      the range (min_open/max_open: the bound itself is out)
        choices       the allowed values (a tuple, or a function giving one)
        invert        a bool flag that turns the setting off (--no-chat-template)
        none          the word that means None on the command line (--eval-prompts none)
        cli           False: no flag (set by the code, not the user)
    """
    meta = {k: v for k, v in dict(flag=flag, short=short, min=min, max=max, min_open=min_open,
                                  max_open=max_open, choices=choices, invert=invert, none=none,
                                  cli=None if cli else False).items()
            if v is not None and v is not False or k == "cli" and v is False}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def redeclared(group: type, name: str, default=None):
    """A field of `group` declared again with another default (LoopConfig's model-dependent
    None), keeping what its flag needs."""
    f = next(f for f in dataclasses.fields(group) if f.name == name)
    return field(default=default, metadata=f.metadata)


def choices_of(f: dataclasses.Field) -> tuple:
    choices = f.metadata["choices"]
    return choices() if callable(choices) else choices


def _declared() -> dict:
    """{name: dataclasses.Field} of every setting (the groups, UpdateConfig, LoopConfig)."""
    return {f.name: f for cls in (*GROUPS, UpdateConfig, LoopConfig)
            for f in dataclasses.fields(cls)}


def flag_of(name: str) -> str:
    """The command-line flag of a setting."""
    f = _declared().get(name)
    return f.metadata.get("flag", "--" + name.replace("_", "-")) if f else \
        "--" + name.replace("_", "-")


def check_fields(settings, group: type) -> None:
    """The fields of `group` in `settings` (the group, or a LoopConfig) within what their
    declaration allows (`setting`'s range or choices), or a one-line GrpoctlError naming
    the flag. None passes where the type allows it."""
    names = {f.name for f in dataclasses.fields(group)}
    for f in dataclasses.fields(settings):
        if f.name not in names:
            continue
        meta, value = f.metadata, getattr(settings, f.name)
        optional = "None" in str(f.type)
        if value is None and optional:
            continue
        if "choices" in meta:
            _choice(settings, f.name, choices_of(f))
        elif "int" in str(f.type) and "float" not in str(f.type) and "min" in meta:
            _whole(settings, f.name, meta["min"])
        elif "float" in str(f.type):
            _number(settings, f.name, meta.get("min"), meta.get("max"), meta.get("min_open", False),
                    meta.get("max_open", False))


def _choice(settings, name: str, allowed: tuple) -> None:
    value = getattr(settings, name)
    if value not in allowed:
        raise GrpoctlError(f"{flag_of(name)}: expected one of {', '.join(allowed)}, got {value!r}")


def _number(settings, name: str, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """settings.name is a finite number in the range, or a one-line error naming the flag."""
    value = getattr(settings, name)
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        raise GrpoctlError(f"{flag_of(name)}: expected a finite number "
                           f"{' and '.join(bounds)}, got {value!r}")


def _whole(settings, name: str, low: int, optional: bool = False) -> None:
    value = getattr(settings, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise GrpoctlError(f"{flag_of(name)}: must be a whole number >= {low}, got {value!r}")


def default_old_logprobs(settings, backend: str | None = "hf",
                         dtypes: tuple = ("float32",)) -> str:
    """The π_old a setting of None means (UpdateSettings.old_logprobs):

        "trainer"  with --is-cap (TIS needs it), with more than one optimizer step per
                   batch (mini_batches × update_epochs > 1: TRL's rule), or when the
                   sampler is vLLM or any of `dtypes` (trainer's, sampler's) is not float32
        "sampler"  otherwise: hf sampling in float32, where both agree to ~1e-6

    backend: the sampler's (loop's --backend, or the records' sampling.backend)."""
    if settings.old_logprobs is not None:
        return settings.old_logprobs
    several_steps = settings.mini_batches * settings.update_epochs > 1
    mismatched = backend == "vllm" or any(d not in (None, "float32") for d in dtypes)
    return "trainer" if settings.is_cap is not None or several_steps or mismatched else "sampler"


def refill_cap(cfg) -> int:
    """--refill's rollout cap per step: --max-rollouts-per-step, or 8 × G × prompts per step."""
    return cfg.max_rollouts_per_step or 8 * cfg.group_size * cfg.prompts_per_step


def _model_path(name: str, value: str | None) -> None:
    """A model flag names `default` or an existing directory (models.resolve_model_dir)."""
    import os

    if value is not None and value != "default" and not os.path.isdir(value):
        raise GrpoctlError(f"{flag_of(name)} {value}: not a model directory (no such directory)")


@dataclass
class PromptSettings:
    PANEL = "Prompts"  # the section of --help its flags are listed in

    prompts: str = "arith:train"
    """Prompt file (JSONL, JSON, CSV, parquet; `-` = JSONL on stdin) or a built-in task
    split: `arith:train`, `arith:test`."""
    prompt_field: str | None = None
    """Column holding the prompt [default: first of prompt, problem, question]."""
    answer_field: str | None = None
    """Column holding the gold answer [default: answer]."""
    answer_after: str | None = None
    """Keep only the text after the last occurrence of this marker in the answer, e.g.
    '#### ' for GSM8K."""
    id_field: str | None = None
    """Column holding a stable prompt id [default: a hash of the prompt text]."""
    limit: int | None = setting(min=1)
    """Use only the first N prompts."""
    template: str = "{prompt}"
    """Prompt template; `{prompt}` is replaced by the prompt text (before the chat
    template)."""
    use_chat_template: bool = setting(True, flag="--no-chat-template", invert=True)
    """Do not apply the tokenizer's chat template (by default it is applied when the
    tokenizer has one)."""
    system: str | None = None
    """System message for the chat template."""

    def check(self) -> None:
        check_fields(self, __class__)
        if "{prompt}" not in self.template:
            raise GrpoctlError("--template: must contain {prompt}, where the prompt text goes")


@dataclass
class ModelSettings:
    PANEL = "Model"

    model: str = setting("default", short="-m")
    """Model directory (any transformers causal LM), or `default` for the embedded tiny
    model."""
    dtype: str = setting("float32", choices=DTYPES)
    """Weights dtype. float32 keeps sampler and trainer log-probs equal to ~1e-6 on CPU."""
    device: str = "cpu"
    """Torch device, e.g. cpu or cuda."""
    threads: int | None = setting(min=0)
    """CPU threads for torch (0 = torch's choice) [default: 1 for the embedded model,
    whose matrices are too small to share, else 0]."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory (off: only transformers' own
    architectures run)."""
    attn_implementation: str | None = None
    """Attention kernel: eager, sdpa, flash_attention_2 (GPU, needs flash-attn) [default:
    transformers' choice, sdpa]."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass: far less memory, about one
    more forward pass of time. Same gradients."""
    fsdp: bool = False
    """Under torchrun: shard the optimizer state and the summed gradients across ranks with
    FSDP2 (default: every rank holds the whole model and optimizer, DDP-style). No effect
    in a single process (distributed.py)."""

    def check(self) -> None:
        check_fields(self, __class__)


@dataclass
class SamplingSettings:
    """How completions are sampled (rollout/, and loop's training steps and evaluations).

    Training rollouts follow the paper's training setting (arXiv 2510.00977, App. C.1,
    verl's GRPO defaults): temperature 1, top-p 1, i.e. samples of the policy itself,
    which is what the GRPO objective assumes. The records' `sampling` field holds
    RECORDED of them."""

    PANEL = "Sampling"
    RECORDED = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")

    group_size: int = setting(2, short="-G", min=1)
    """Completions per prompt (G). 2 is 2-GRPO (the paper); 16 its 16-GRPO baseline."""
    prompts_per_step: int | None = setting(min=1)
    """Prompts per step; each gives G rollouts [default: 64 for the embedded model, else 32
    (the paper's 16-GRPO)]."""
    temperature: float = setting(1.0, min=0)
    """Sampling temperature: logits are divided by it; 0 = greedy (log-probs then at
    temperature 1)."""
    top_p: float = setting(1.0, min=0, max=1, min_open=True)
    """Nucleus sampling mass in (0, 1]; 1 = off."""
    top_k: int = setting(0, min=0)
    """Keep the K most likely tokens (0 = off)."""
    max_new_tokens: int | None = setting(min=1)
    """Generation budget per completion, in tokens; longer ones stop with finish "length"
    [default: 32 for the embedded model, else 1024; the paper: 4096]."""
    batch_size: int | None = setting(min=1)
    """Sequences generated together [default: 256 for the embedded model, else 64]."""
    backend: str = setting("hf", choices=BACKENDS)
    """Generation engine: `hf` (transformers) or `vllm` (needs the vllm extra on a GPU, or
    vLLM's CPU build: README, vLLM on CPU)."""
    seed: int = 0
    """Random seed: the same seed gives the same output, byte for byte. Every (prompt_id,
    sample) draws from its own stream seeded by (seed, prompt_id, sample); loop's prompt
    order derives from it too."""

    def check(self) -> None:
        check_fields(self, __class__)

    def for_model(self, model: str) -> SamplingSettings:
        """These settings with the model-dependent defaults (None) filled in."""
        return fill_model_defaults(dataclasses.replace(self), model)

    def recorded(self) -> dict:
        """The records' `sampling` field (docs/records.md), less the backend."""
        return {name: getattr(self, name) for name in self.RECORDED}


@dataclass
class VllmSettings:
    """One vLLM engine for the run, handed the new weights after each update."""

    PANEL = "vLLM"

    tensor_parallel_size: int = setting(1, min=1)
    """GPUs vLLM shards the model over (--backend vllm)."""
    gpu_memory_utilization: float = setting(0.4, min=0, max=1, min_open=True)
    """Share of each GPU's memory vLLM takes for weights and KV cache (--backend vllm); in
    `loop` the rest is the trainer's."""
    vllm_dtype: str | None = setting(choices=DTYPES)
    """Weights dtype of the vLLM engine, e.g. bfloat16 while the trainer keeps float32
    [default: --dtype]."""
    vllm_sleep: bool = False
    """Put the vLLM engine to sleep (weights to CPU, KV cache freed) during each update;
    GPU only."""
    vllm_eager: bool = setting(False, flag="--enforce-eager")
    """vLLM without its compile step and CUDA graphs: starts sooner, samples slower
    (--backend vllm)."""

    def check(self) -> None:
        check_fields(self, __class__)


@dataclass
class ScoreSettings:
    PANEL = "Score"

    rewards: list[str] = setting(factory=lambda: ["math"], flag="--reward", short="-r")
    """Reward as NAME[=WEIGHT], repeatable: `math`, `format`, `format:REGEX`,
    `path/file.py:fn`, `module:fn`."""
    score_workers: int | None = setting(flag="--workers", min=0)
    """Scoring processes; 0 = in this process, for debugging (soft time limits only)
    [default: all cores]."""
    score_timeout: float = setting(2.0, flag="--timeout", min=0, min_open=True)
    """CPU seconds a completion's check may take (a loaded machine gets the same rewards;
    scoring_pool.py); over it the reward is 0."""
    score_cmd: str | None = None
    """Shell command that replaces `score`: rollout records on stdin, scored on stdout."""

    def check(self) -> None:
        check_fields(self, __class__)
        if not self.rewards:
            raise GrpoctlError("--reward: at least one reward is needed")


@dataclass
class AdvantageSettings:
    PANEL = "Advantage"

    estimator: str = setting("group", choices=estimators)
    """How rewards become advantages (advantages.py's registry): `group` (GRPO's
    (r - mean)/std), `pairwise` (2-GRPO's ±1 / 0), `rloo` (leave-one-out)."""
    std: str = setting("group", choices=STD_MODES)
    """The --estimator group divisor: `group` std (GRPO), `batch` std, or `none`
    (Dr. GRPO)."""
    adv_eps: float = setting(1e-6, min=0)
    """ε added to the std before dividing (--estimator group); 1e-6 as verl (TRL adds
    1e-4)."""
    drop_zero: bool = False
    """Drop groups whose advantages are all zero (tied groups) before the update (DAPO's
    dynamic sampling filter)."""
    refill: bool = False
    """2-GRPO+RS / DAPO dynamic sampling: replace tied groups by groups of fresh prompts
    until the step has --prompts-per-step contrastive groups or --max-rollouts-per-step is
    spent; every attempt's files stay in the step directory (refill.py)."""
    max_rollouts_per_step: int | None = setting(min=1)
    """--refill's rollout budget per step, discarded rollouts included [default: 8 × G ×
    --prompts-per-step: at G 2 what 16-GRPO spends on those prompts, the paper's cap]."""
    advantage_cmd: str | None = None
    """Shell command that replaces `advantage`."""

    def check(self) -> None:
        check_fields(self, __class__)
        if self.std != "group" and self.estimator != "group":  # advantages.compute_advantages
            raise GrpoctlError(f"--std {self.std} applies to --estimator group only, "
                               f"not {self.estimator}")


@dataclass
class UpdateSettings:
    """The knobs of one policy-gradient step (update.py), shared by `update` and `loop`."""

    PANEL = "Update"

    lr: float = setting(1e-6, min=0)
    """AdamW learning rate. 1e-6 is TRL's default and the paper's 16-GRPO setting (2-GRPO
    used 8e-6, scaled with prompts per batch). Tiny models need about 1e-4."""
    warmup_steps: int = setting(0, min=0)
    """Linear learning-rate warm-up from 0 over the first N steps: rollout step s (counted
    from 1) uses lr × (s - 1) / N while s - 1 < N, so step 1 runs at lr 0 as in verl. 0 =
    the constant lr from the first step. The paper's runs warm up over 10 steps."""
    weight_decay: float = setting(0.0, min=0)
    """AdamW decoupled weight decay; 0.0 as in TRL's default."""
    beta1: float = setting(0.9, min=0, max=1, max_open=True)
    """AdamW β1 (first-moment decay), in [0, 1)."""
    beta2: float = setting(0.999, min=0, max=1, max_open=True)
    """AdamW β2 (second-moment decay), in [0, 1)."""
    adam_eps: float = setting(1e-8, min=0, min_open=True)
    """AdamW ε, added to the second-moment root."""
    clip_eps: float = setting(0.2, min=0)
    """PPO/GRPO clip range ε below 1 (and above, unless --clip-eps-high); 0.2 as in PPO and
    GRPO."""
    clip_eps_high: float | None = setting(min=0)
    """Clip range above 1 (DAPO's clip-higher and the paper use 0.28) [default:
    --clip-eps]."""
    clip_ratio_c: float | None = setting(min=1, min_open=True)
    """Dual clip (Ye et al. 2020; verl's clip_ratio_c, 3.0 there): for A < 0 cap each
    token's loss at C·|A|, so a stale ratio ρ > C gives no gradient. Must be > 1. It only
    acts off-policy: mini-batches, update epochs, replayed rollouts, another sampling
    engine [default: off]."""
    mini_batches: int = setting(1, min=1)
    """Optimizer steps per pass over the rollouts: their prompt groups (whole groups, file
    order) split into M mini-batches, one step each, all against the same π_old, so the
    clip acts from the second step on (verl: train_batch_size / ppo_mini_batch_size; TRL:
    steps_per_generation)."""
    update_epochs: int = setting(1, min=1)
    """Passes over the rollouts: M × E optimizer steps in all (verl ppo_epochs, TRL
    num_iterations). Not --epochs, which in `loop` counts passes over the prompt set."""
    loss_agg: str = setting("token-mean", choices=LOSS_AGGREGATIONS)
    """Per-token losses to one number: `token-mean` (DAPO, TRL), `seq-mean` (the GRPO
    paper's 1/G Σ 1/|o_i| Σ_t) or `constant` (Dr. GRPO: sum / (sequences × max
    tokens))."""
    max_grad_norm: float = setting(1.0, min=0)
    """Clip the global gradient L2 norm to this (0 = off); 1.0 as in TRL and verl."""
    kl_coef: float = setting(0.0, min=0)
    """Weight β of the k3 KL penalty to --ref (needs --ref). 0.0 as in DAPO, Dr. GRPO and
    TRL (the GRPO paper used 0.04)."""
    ref: str | None = None
    """Reference model directory for the KL penalty (with --kl-coef 0 the KL is measured
    only)."""
    micro_batch_size: int = setting(8, min=1)
    """Sequences per forward/backward pass; gradients accumulate. Changes memory, not the
    result."""
    is_cap: float | None = setting(min=0, min_open=True)
    """Truncated importance sampling (TIS, losses.py): weight each token's loss by
    min(π_trainer/π_sampler, CAP), correcting the sampler's (e.g. vLLM's) log-prob
    mismatch; 2.0 is usual (Yao et al. 2025; verl, TRL). Needs --old-logprobs trainer
    [default: off]."""
    old_logprobs: str | None = setting(choices=OLD_LOGPROBS)
    """π_old of the PPO ratio: `trainer` (the trainer's log-probs before the first
    optimizer step, as verl) or `sampler` (the records' logprobs) [default: trainer with
    vLLM, a dtype other than float32, several optimizer steps per batch or --is-cap; else
    sampler, which in float32 with hf agrees with the trainer to ~1e-6]."""

    def check(self) -> None:
        check_fields(self, __class__)
        if self.is_cap is not None and self.old_logprobs == "sampler":  # losses.truncated_is_weights
            raise GrpoctlError("--is-cap weighs each token by π_old_trainer / π_sampler: it needs "
                               "--old-logprobs trainer (or leave --old-logprobs out)")
        if self.kl_coef > 0 and not self.ref:
            raise GrpoctlError("--kl-coef > 0 needs a reference policy (--ref)")
        _model_path("ref", self.ref)


@dataclass
class UpdateConfig(UpdateSettings):
    """Every knob of one update step: the shared ones (UpdateSettings) and those the
    records can supply."""

    temperature: float | None = setting(min=0)  # as rollout refuses it
    """Temperature the log-probs are computed at; 0 (greedy) is scored at 1.0, like the
    records' logprobs [default: the records' sampling temperature, else 1.0]."""
    max_tokens: int | None = setting(min=1)
    """Normaliser of --loss-agg constant (Dr. GRPO) [default: the records'
    sampling.max_new_tokens]."""
    skip_zero_advantage: bool = setting(True, cli=False)
    """Do not forward sequences whose advantage is exactly 0 when kl_coef is 0: their loss
    and gradient are exactly 0 (they still count in the normalisers). Tied 2-GRPO pairs
    are most pairs, so this saves most of the update's time."""

    def check(self) -> None:
        super().check()
        check_fields(self, __class__)


@dataclass
class AdapterSettings:
    PANEL = "LoRA"

    lora_r: int = setting(0, min=0)
    """Train a LoRA adapter of this rank instead of every weight (needs the lora extra);
    0 = off. A --policy that holds an adapter continues it. TRL's examples use 16, peft's
    default 8."""
    lora_alpha: float | None = setting(min=0, min_open=True)
    """LoRA scale α (update = α/r · BA) [default: 2 × --lora-r, TRL's ModelConfig
    ratio]."""
    lora_dropout: float = setting(0.0, min=0, max=0.99)
    """Dropout on the LoRA input, in the update's gradient passes only (never while
    sampling or in π_old); 0 as in peft."""
    lora_target_modules: str = "all-linear"
    """Layers that get adapters: `all-linear` (every linear layer but the output head, as
    QLoRA recommends) or names, e.g. `q_proj,v_proj`."""
    save_lora: str = setting("adapter", choices=SAVE_LORA_MODES)
    """With --lora-r: `adapter` saves the adapter (it names the base model's path);
    `merged` also writes merged/, the merged weights as a plain model directory."""

    def check(self) -> None:
        check_fields(self, __class__)
        if not self.lora_target_modules.strip():
            raise GrpoctlError("--lora-target-modules: empty")

    def resolved_alpha(self) -> float:
        return 2.0 * self.lora_r if self.lora_alpha is None else float(self.lora_alpha)


@dataclass
class EvalSettings:
    """Evaluation follows the paper's evaluation setting: T 0.7, top-p 0.8, top-k 20."""

    PANEL = "Evaluation"

    eval_prompts: str | None = setting("arith:test", none="none")
    """Held-out prompts, or `none` (no evaluation)."""
    eval_every: int = setting(50, min=1)
    """Evaluate every N steps (and at the start and end)."""
    eval_samples: int = setting(4, min=1)
    """Samples per held-out prompt: k of Mean@k and Pass@k (the paper: 32)."""
    eval_limit: int | None = setting(min=1)
    """Evaluate on the first N held-out prompts."""
    eval_temperature: float = setting(0.7, min=0)
    """Evaluation sampling temperature (the paper's 0.7)."""
    eval_top_p: float = setting(0.8, min=0, max=1, min_open=True)
    """Evaluation nucleus mass (the paper's 0.8)."""
    eval_top_k: int = setting(20, min=0)
    """Evaluation top-k (the paper's 20; 0 = off)."""

    def check(self) -> None:
        check_fields(self, __class__)


@dataclass
class RunSettings:
    PANEL = "Run"

    run_dir: str | None = None
    """Run directory [default: runs/DATE-TIME-gG-sSEED]."""
    steps: int | None = setting(min=1)
    """Rollout steps [default: 100, or from --epochs]."""
    epochs: float | None = setting(min=0, min_open=True)
    """Passes over the prompts (instead of --steps)."""
    save_every: int = setting(25, min=1)
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = setting(2, min=1)
    """Checkpoints to keep."""
    rollouts_from: str | None = None
    """Train on another run directory's rollouts (its prompts and samples) instead of
    sampling: off-policy once this policy differs from that run's."""
    async_steps: int = setting(0, flag="--async", min=0)
    """Sample step t with the weights after step t - 1 - N (the initial model for the
    first N + 1 steps) in a sampler process of its own, while the trainer updates the
    steps before it; the update's ratio is then taken against those older log-probs.
    0 = each step sampled by the newest weights, in turn."""
    sampler_threads: int | None = setting(min=0)
    """CPU threads of the --async sampler process [default: --threads]."""
    sampler_device: str | None = None
    """Torch device of the --async sampler process and its vLLM engine, e.g. cuda:1 with
    the trainer on --device cuda:0 [default: --device]."""

    def check(self) -> None:
        check_fields(self, __class__)


ASYNC_CLIP_RATIO_C = 3.0  # --clip-ratio-c under --async: verl's default

GROUPS = (PromptSettings, ModelSettings, SamplingSettings, VllmSettings, ScoreSettings,
          AdvantageSettings, UpdateSettings, AdapterSettings, EvalSettings, RunSettings)

# Settings for the embedded tiny model where the general default would not suit
# it (a 1M-parameter model needs a far larger learning rate than a 1.5B one).
# One CPU thread for the tiny model: its matrices are too small to share, and a second
# busy-waiting thread on a loaded machine made steps up to 30x slower (measured).
EMBEDDED_DEFAULTS = {"lr": 1e-4, "max_new_tokens": 32, "steps": 100, "prompts_per_step": 64,
                     "batch_size": 256, "micro_batch_size": 256, "threads": 1}
GENERAL_DEFAULTS = {"lr": 1e-6, "max_new_tokens": 1024, "steps": 100, "prompts_per_step": 32,
                    "batch_size": 64, "micro_batch_size": 8, "threads": 0}


def fill_model_defaults(settings, model: str):
    """`settings` (changed in place, and returned) with each None that the tables above
    decide filled in for `model`."""
    base = EMBEDDED_DEFAULTS if model == "default" else GENERAL_DEFAULTS
    for name, value in base.items():
        if name != "steps" and getattr(settings, name, 0) is None:
            setattr(settings, name, value)
    return settings


def resolve_threads(model: str, threads: int | None) -> int:
    """--threads of any command that runs `model` (rollout, update, eval; loop through
    LoopConfig.resolved, from the same table): as given, else 1 for the embedded model and
    0 (torch's choice) for any other."""
    if threads is not None:
        return threads
    return (EMBEDDED_DEFAULTS if model == "default" else GENERAL_DEFAULTS)["threads"]


def _holds_adapter(model: str) -> bool:
    """`model` is a LoRA adapter checkpoint (it trains its adapter, whatever --lora-r)."""
    import os

    return os.path.isfile(os.path.join(model, "adapter_config.json"))


@dataclass
class LoopConfig(RunSettings, EvalSettings, AdapterSettings, UpdateSettings, AdvantageSettings,
                 ScoreSettings, VllmSettings, SamplingSettings, ModelSettings, PromptSettings):
    """Every setting of a run (all the groups above); saved as config.json."""

    lr: float | None = redeclared(UpdateSettings, "lr")
    """AdamW learning rate [default: 1e-4 for the embedded model, else 1e-6 (the paper's
    16-GRPO)]."""
    micro_batch_size: int | None = redeclared(UpdateSettings, "micro_batch_size")
    """Sequences per forward/backward pass [default: 256 for the embedded model, else 8]."""
    clip_ratio_c: float | None = redeclared(UpdateSettings, "clip_ratio_c")
    """Dual clip (Ye et al. 2020; verl's clip_ratio_c): for A < 0 cap each token's loss at
    C·|A|, so a stale ratio ρ > C gives no gradient. Must be > 1. It only acts off-policy:
    --async, mini-batches, update epochs, --rollouts-from, another sampling engine
    [default: 3.0 with --async (verl's value), else off]."""

    def check(self) -> None:
        self.resolved()

    def resolved(self) -> LoopConfig:
        """The None defaults that depend on the model filled in, and every value checked,
        group by group, then the rules across groups."""
        cfg = fill_model_defaults(dataclasses.replace(self), self.model)
        if cfg.steps is None and cfg.epochs is None:
            cfg.steps = EMBEDDED_DEFAULTS["steps"]  # the same for every model
        for group in GROUPS:
            group.check(cfg)
        if cfg.group_size < 2:
            raise GrpoctlError("--group-size must be at least 2: GRPO contrasts completions "
                               "of one prompt")
        from grpoctl.advantages import ESTIMATORS

        needs = ESTIMATORS[cfg.estimator].group_size  # pairwise: 2
        if needs is not None and cfg.group_size != needs:
            raise GrpoctlError(f"--estimator {cfg.estimator} needs --group-size {needs}")
        if cfg.lora_r > 0 and cfg.fsdp:  # distributed.wrap_model
            raise GrpoctlError("--fsdp trains every weight of the model; with LoRA (--lora-r) "
                               "leave --fsdp out: each rank then holds the model whole")
        if cfg.dtype == "float16" and cfg.lora_r == 0 and not _holds_adapter(cfg.model):
            raise GrpoctlError("--dtype float16 cannot train every parameter (AdamW's state "
                               "underflows in fp16): use bfloat16 or float32, or --lora-r")
        if cfg.refill and cfg.rollouts_from:
            raise GrpoctlError("--refill samples fresh prompts; it cannot reuse --rollouts-from")
        if cfg.max_rollouts_per_step is not None and (
                cfg.max_rollouts_per_step < cfg.prompts_per_step * cfg.group_size):
            raise GrpoctlError(f"--max-rollouts-per-step {cfg.max_rollouts_per_step} is less than "
                               f"one step's own rollouts ({cfg.prompts_per_step} prompts x "
                               f"{cfg.group_size})")
        if cfg.refill and refill_cap(cfg) < (cfg.prompts_per_step + 1) * cfg.group_size:
            raise GrpoctlError(f"--refill: --max-rollouts-per-step {refill_cap(cfg)} leaves no room "
                               f"for a refill group (the step's own rollouts are "
                               f"{cfg.prompts_per_step} x {cfg.group_size}); raise it or leave "
                               "--refill out")
        if cfg.async_steps:  # sampler_worker.py: one sampler process, prompts known ahead
            for on, why in ((cfg.vllm_sleep, "--vllm-sleep (the engine samples while the "
                             "trainer updates: give each its own memory or device)"),
                            (cfg.refill and cfg.async_steps > 1, "--refill (a step's prompts "
                             "follow the refills of the step before it: --async 1 at most)"),
                            (cfg.rollouts_from, "--rollouts-from (nothing is sampled)")):
                if on:
                    raise GrpoctlError(f"--async {cfg.async_steps} cannot run with {why}; "
                                       "leave one out")
            device = cfg.sampler_device or ""
            if device.startswith("cuda:") and not device[5:].isdigit():  # sampler_worker.gpu_env
                raise GrpoctlError(f"--sampler-device {device}: expected a device such as cpu, "
                                   "cuda or cuda:1")
        elif cfg.sampler_threads is not None or cfg.sampler_device is not None:
            raise GrpoctlError("--sampler-threads and --sampler-device apply to --async only")
        if cfg.vllm_sleep and cfg.backend != "vllm":
            raise GrpoctlError("--vllm-sleep needs --backend vllm")
        cfg.old_logprobs = default_old_logprobs(cfg, cfg.backend, (cfg.dtype, cfg.vllm_dtype))
        if cfg.async_steps and cfg.clip_ratio_c is None:
            # Samples N updates old hold tokens whose probability has since grown many-fold
            # (ρ up to 44 on SmolLM2); with A < 0 their gradient grows with ρ, unclipped.
            cfg.clip_ratio_c = ASYNC_CLIP_RATIO_C
        if cfg.async_steps and cfg.old_logprobs == "trainer" and cfg.is_cap is None:
            # π_old = the current weights: nothing would weigh the N-step-old samples
            raise GrpoctlError(f"--async {cfg.async_steps} with --old-logprobs trainer needs "
                               "--is-cap (decoupled PPO: the samples are older than the "
                               "weights); or take the ratio against the sampler's log-probs "
                               "(--old-logprobs sampler)")
        return cfg

    def group(self, settings: type):
        """This run's settings of one group, e.g. cfg.group(UpdateSettings)."""
        return settings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(settings)})
