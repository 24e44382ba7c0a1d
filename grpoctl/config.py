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
can read settings cheaply. Flags in cli.py take their defaults from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from grpoctl.errors import GrpoctlError

ESTIMATORS = ("group", "pairwise", "rloo")
STD_MODES = ("group", "batch", "none")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean", "constant")
OLD_LOGPROBS = ("trainer", "sampler")
BACKENDS = ("hf", "vllm")
DTYPES = ("float32", "bfloat16", "float16")
SAVE_LORA_MODES = ("adapter", "merged")
SCORE_TIMEOUT_S = 2.0


# Fields whose flag is not --FIELD-NAME
FLAGS = {"rewards": "--reward", "score_workers": "--workers", "score_timeout": "--timeout",
         "use_chat_template": "--no-chat-template", "vllm_eager": "--enforce-eager"}


def flag_of(name: str) -> str:
    """The command-line flag of a setting."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


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
    prompts: str = "arith:train"
    """Prompt file (JSONL, JSON, CSV, parquet) or a built-in task split (prompts.py)."""
    prompt_field: str | None = None
    """Column holding the prompt; None = the first of prompt, problem, question."""
    answer_field: str | None = None
    """Column holding the gold answer; None = answer."""
    answer_after: str | None = None
    """Keep the answer's text after the last occurrence of this marker ('#### ' for GSM8K)."""
    id_field: str | None = None
    """Column holding a stable prompt id; None = a hash of the prompt text."""
    limit: int | None = None
    """Use only the first N prompts."""
    template: str = "{prompt}"
    """The prompt text is put into this template ({prompt}) before the chat template."""
    use_chat_template: bool = True
    """Apply the tokenizer's chat template when it has one (--no-chat-template: off)."""
    system: str | None = None
    """System message for the chat template."""

    def check(self) -> None:
        _whole(self, "limit", 1, optional=True)
        if "{prompt}" not in self.template:
            raise GrpoctlError("--template: must contain {prompt}, where the prompt text goes")


@dataclass
class ModelSettings:
    model: str = "default"
    """A transformers causal-LM directory, or `default` for the embedded tiny model."""
    dtype: str = "float32"
    """Weights dtype (float32, bfloat16, float16). float32 keeps sampler and trainer
    log-probs equal to ~1e-6 on CPU."""
    device: str = "cpu"
    """Torch device, e.g. cpu or cuda."""
    threads: int | None = None
    """CPU threads for torch; None: 1 for the embedded model (its matrices are too small to
    share), 0 = torch's choice for any other."""
    trust_remote_code: bool = False
    """Run model code shipped in the checkpoint directory (off: transformers' own only)."""
    attn_implementation: str | None = None
    """eager, sdpa, flash_attention_2; None = transformers' choice (sdpa)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward: less memory, same gradients."""
    fsdp: bool = False
    """Under torchrun: FSDP2 shards instead of whole replicas per rank (distributed.py)."""

    def check(self) -> None:
        _choice(self, "dtype", DTYPES)
        _whole(self, "threads", 0, optional=True)


@dataclass
class SamplingSettings:
    """Training rollouts follow the paper's training setting (arXiv 2510.00977, App. C.1,
    verl's GRPO defaults): temperature 1, top-p 1, i.e. samples of the policy itself."""

    group_size: int = 2
    """G, completions per prompt. 2 is 2-GRPO (the paper); 16 its 16-GRPO baseline."""
    prompts_per_step: int | None = None
    """Prompts per step; None: 64 for the embedded model, else 32 (the paper's 16-GRPO)."""
    temperature: float = 1.0
    """Logits are divided by it; 0 = greedy (log-probs then at temperature 1)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 = off."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 = off."""
    max_new_tokens: int | None = None
    """Completion budget; None: 32 for the embedded model, else 1024 (the paper: 4096)."""
    batch_size: int | None = None
    """Sequences generated together; None: 256 for the embedded model, else 64."""
    backend: str = "hf"
    """hf (transformers, grpoctl's own decode loop) or vllm (rollout/vllm.py)."""

    def check(self) -> None:
        if not (isinstance(self.group_size, int) and self.group_size >= 2):
            raise GrpoctlError("--group-size must be at least 2: GRPO contrasts completions "
                               "of one prompt")
        _whole(self, "prompts_per_step", 1, optional=True)
        _number(self, "temperature", 0)
        _number(self, "top_p", 0, 1, low_open=True)
        _whole(self, "top_k", 0)
        _whole(self, "max_new_tokens", 1, optional=True)
        _whole(self, "batch_size", 1, optional=True)
        _choice(self, "backend", BACKENDS)


@dataclass
class VllmSettings:
    """One vLLM engine for the run, handed the new weights after each update."""

    tensor_parallel_size: int = 1
    """GPUs the engine shards the model over."""
    gpu_memory_utilization: float = 0.4
    """The engine's share of the GPU (weights and KV cache); the rest is the trainer's."""
    vllm_dtype: str | None = None
    """The engine's weights dtype; None = --dtype."""
    vllm_sleep: bool = False
    """Free the engine's GPU memory during each update (sleep mode; GPU only)."""
    vllm_eager: bool = False
    """enforce_eager: no compile step and CUDA graphs (starts sooner, samples slower)."""

    def check(self) -> None:
        _whole(self, "tensor_parallel_size", 1)
        _number(self, "gpu_memory_utilization", 0, 1, low_open=True)
        if self.vllm_dtype is not None:
            _choice(self, "vllm_dtype", DTYPES)


@dataclass
class ScoreSettings:
    rewards: list[str] = field(default_factory=lambda: ["math"])
    """Reward specs NAME[=WEIGHT]: math, format, format:REGEX, file.py:fn, module:fn."""
    score_workers: int | None = None
    """Scoring processes; None = all cores."""
    score_timeout: float = SCORE_TIMEOUT_S
    """CPU seconds allowed per completion's check (scoring_pool.py); over it the reward is 0."""
    score_cmd: str | None = None
    """Shell command replacing the score stage (records on stdin, scored records out)."""

    def check(self) -> None:
        if not self.rewards:
            raise GrpoctlError("--reward: at least one reward is needed")
        _whole(self, "score_workers", 0, optional=True)  # 0: score in this process
        _number(self, "score_timeout", 0, low_open=True)


@dataclass
class AdvantageSettings:
    estimator: str = "group"
    """group (GRPO's (r - mean)/std), pairwise (2-GRPO's ±1 / 0) or rloo (leave-one-out)."""
    std: str = "group"
    """The --estimator group divisor: group std (GRPO), batch std, or none (Dr. GRPO)."""
    adv_eps: float = 1e-6
    """Added to the std before dividing; 1e-6 as verl (TRL adds 1e-4)."""
    drop_zero: bool = False
    """Leave tied groups (advantage 0) out of the update (DAPO's filter)."""
    refill: bool = False
    """2-GRPO+RS (paper v3) / DAPO dynamic sampling: tied groups replaced by groups of
    fresh prompts until the step is full (refill.py)."""
    max_rollouts_per_step: int | None = None
    """--refill's budget per step, discarded rollouts included; None = 8 x the step's own
    rollouts (8 x G x prompts per step): at G = 2 that is 16 x prompts per step, what
    16-GRPO spends on the same prompts (the paper's cap), and it leaves room to refill at
    any G (`refill_cap`)."""
    advantage_cmd: str | None = None
    """Shell command replacing the advantage stage."""

    def check(self) -> None:
        _choice(self, "estimator", ESTIMATORS)
        _choice(self, "std", STD_MODES)
        _number(self, "adv_eps", 0)
        _whole(self, "max_rollouts_per_step", 1, optional=True)
        if self.std != "group" and self.estimator != "group":  # advantages.compute_advantages
            raise GrpoctlError(f"--std {self.std} applies to --estimator group only, "
                               f"not {self.estimator}")


@dataclass
class UpdateSettings:
    """The knobs of one policy-gradient step (update.py), shared by `update` and `loop`."""

    lr: float = 1e-6
    """AdamW learning rate. 1e-6 is TRL's default and the paper's 16-GRPO setting (2-GRPO
    used 8e-6, scaled with prompts per batch). Tiny models need about 1e-4 (environment.md)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up from 0: rollout step s (counted from 1) uses
    lr × (s - 1) / warmup_steps while s - 1 < warmup_steps, so step 1 runs at lr 0 as in
    verl (`update.scheduled_lr`). 0 = the constant lr from the first step. The paper's
    runs (verl) warm up over 10 steps."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay; 0.0 as in TRL's default."""
    beta1: float = 0.9
    """AdamW β1 (first-moment decay); torch/TRL/verl default."""
    beta2: float = 0.999
    """AdamW β2 (second-moment decay); torch/TRL/verl default."""
    adam_eps: float = 1e-8
    """AdamW ε; torch default."""
    clip_eps: float = 0.2
    """ε_low of the clipped ratio, 1 - ε_low; 0.2 as in PPO and GRPO."""
    clip_eps_high: float | None = None
    """ε_high, 1 + ε_high; None = clip_eps. DAPO's clip-higher (and the paper) use 0.28."""
    clip_ratio_c: float | None = None
    """Dual clip (Ye et al. 2020): for A < 0 the per-token policy loss is capped at C·|A|
    (losses.dual_clip). None = off; must be > 1. verl's `clip_ratio_c` (always on there,
    3.0). It only acts where ρ > C, i.e. off-policy: mini-batches, update epochs, replayed
    rollouts, another sampling engine."""
    mini_batches: int = 1
    """Optimizer steps per pass over a rollout batch: its prompt groups split into M
    mini-batches of whole groups (verl train_batch_size / ppo_mini_batch_size, TRL
    steps_per_generation). 1 = one step, as the paper's runs."""
    update_epochs: int = 1
    """Passes over the rollout batch: M × E optimizer steps in all (verl ppo_epochs, TRL
    num_iterations)."""
    loss_agg: str = "token-mean"
    """How per-token losses become one number: "token-mean" (DAPO, TRL), "seq-mean" (the
    GRPO paper's 1/G Σ 1/|o_i| Σ_t, the aggregation the 2-GRPO paper writes; which verl
    mode its unpublished runs used is unverified) or "constant"
    (Dr. GRPO: sum / (sequences × max_tokens))."""
    max_grad_norm: float = 1.0
    """Clip the global gradient L2 norm to this; 1.0 as in TRL and verl. 0 = no clipping."""
    kl_coef: float = 0.0
    """β of the k3 KL penalty to a reference policy. 0.0 as in DAPO, Dr. GRPO and TRL's
    current default (the GRPO paper used 0.04). Needs a reference model when > 0."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass; changes memory, not the result."""
    is_cap: float | None = None
    """Truncated importance sampling between sampler and trainer (TIS, losses.py): each
    token's policy loss is weighted by min(π_old/π_sampler, is_cap), and the clipped
    ratio is taken against the trainer's own π_old instead of the records' logprobs.
    None = off. 2.0 is the common value (Yao et al. 2025; verl, TRL). Needs
    old_logprobs "trainer" (the default when it is set)."""
    old_logprobs: str | None = None
    """π_old of the PPO ratio: "trainer" (the trainer's own log-probs of the sampled
    tokens before the first optimizer step, as verl always and TRL with several steps
    per batch) or "sampler" (the records' logprobs). None = "trainer" when the sampler
    may disagree with the trainer (vLLM, a dtype other than float32), when the batch
    takes more than one optimizer step, or with --is-cap; else "sampler", which in
    float32 with the hf sampler agrees with the trainer to ~1e-6 (`default_old_logprobs`)."""

    def check(self) -> None:
        _choice(self, "loss_agg", LOSS_AGGREGATIONS)
        for name in ("lr", "weight_decay", "clip_eps", "max_grad_norm", "kl_coef"):
            _number(self, name, 0)
        for name in ("beta1", "beta2"):  # AdamW's moment decay rates
            _number(self, name, 0, 1, high_open=True)
        _number(self, "adam_eps", 0, low_open=True)
        _number(self, "clip_eps_high", 0, optional=True)
        _number(self, "clip_ratio_c", 1, low_open=True, optional=True)
        _number(self, "is_cap", 0, low_open=True, optional=True)
        if self.old_logprobs is not None:
            _choice(self, "old_logprobs", OLD_LOGPROBS)
        if self.is_cap is not None and self.old_logprobs == "sampler":  # losses.truncated_is_weights
            raise GrpoctlError("--is-cap weighs each token by π_old_trainer / π_sampler: it needs "
                               "--old-logprobs trainer (or leave --old-logprobs out)")
        _whole(self, "warmup_steps", 0)
        _whole(self, "micro_batch_size", 1)
        _whole(self, "mini_batches", 1)
        _whole(self, "update_epochs", 1)


@dataclass
class UpdateConfig(UpdateSettings):
    """Every knob of one update step: the shared ones (config.UpdateSettings, documented
    there with their defaults and sources) and those the records can supply."""

    temperature: float | None = None
    """Temperature the log-probs are computed at; None = the records' sampling.temperature
    (1.0 when absent). 0 (greedy) is scored at 1.0, like the records' logprobs."""
    max_tokens: int | None = None
    """The generation budget for loss_agg="constant"; None = the records'
    sampling.max_new_tokens."""
    skip_zero_advantage: bool = True
    """Do not forward sequences whose advantage is exactly 0 when kl_coef is 0: their loss
    and gradient are exactly 0 (they still count in the normalisers). Tied 2-GRPO pairs
    are most pairs, so this saves most of the update's time."""

    def check(self) -> None:
        """Every setting in its range, or a one-line GrpoctlError naming the flag."""
        super().check()
        _number(self, "temperature", 0, optional=True)  # as rollout refuses it
        _whole(self, "max_tokens", 1, optional=True)


@dataclass
class AdapterSettings:
    lora_r: int = 0
    """Adapter rank; 0 = train every parameter. TRL's examples use 16, peft's default 8."""
    lora_alpha: float | None = None
    """Scale α (the update is α/r · BA); None = 2r, TRL's ModelConfig ratio."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input, in the update's gradient pass only; 0 as in peft."""
    lora_target_modules: str = "all-linear"
    """peft's "all-linear" (every linear layer but the output head) or module names."""
    save_lora: str = "adapter"
    """"adapter" saves the adapter; "merged" also writes checkpoints' merged/ directory."""

    def check(self) -> None:
        _whole(self, "lora_r", 0)
        _number(self, "lora_alpha", 0, low_open=True, optional=True)
        _number(self, "lora_dropout", 0, 1, high_open=True)
        if not self.lora_target_modules.strip():
            raise GrpoctlError("--lora-target-modules: empty")
        _choice(self, "save_lora", SAVE_LORA_MODES)


@dataclass
class EvalSettings:
    """Evaluation follows the paper's evaluation setting: T 0.7, top-p 0.8, top-k 20."""

    eval_prompts: str | None = "arith:test"
    """Held-out prompts; None = no evaluation."""
    eval_every: int = 50
    """Evaluate every N steps, and before the first and after the last."""
    eval_samples: int = 4
    """Samples per held-out prompt: the k of Mean@k and Pass@k (the paper: 32)."""
    eval_limit: int | None = None
    """Evaluate on the first N held-out prompts."""
    eval_temperature: float = 0.7
    """Evaluation sampling temperature (the paper's 0.7)."""
    eval_top_p: float = 0.8
    """Evaluation nucleus mass (the paper's 0.8)."""
    eval_top_k: int = 20
    """Evaluation top-k (the paper's 20); 0 = off."""

    def check(self) -> None:
        _whole(self, "eval_every", 1)
        _whole(self, "eval_samples", 1)
        _whole(self, "eval_limit", 1, optional=True)
        _number(self, "eval_temperature", 0)
        _number(self, "eval_top_p", 0, 1, low_open=True)
        _whole(self, "eval_top_k", 0)


@dataclass
class RunSettings:
    run_dir: str | None = None
    """The run directory; None = runs/DATE-TIME-gG-sSEED."""
    seed: int = 0
    """Sampling seeds and prompt order derive from it: same seed, same files."""
    steps: int | None = None
    """Rollout steps; None: from epochs, else 100."""
    epochs: float | None = None
    """Passes over the prompts, instead of steps."""
    save_every: int = 25
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""
    rollouts_from: str | None = None
    """Train on another run's rollouts (off-policy: they were sampled by that run's policy)."""

    def check(self) -> None:
        _whole(self, "steps", 1, optional=True)
        _number(self, "epochs", 0, low_open=True, optional=True)
        _whole(self, "save_every", 1)
        _whole(self, "keep_last", 1)


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

    lr: float | None = None
    """As UpdateSettings.lr; None: 1e-4 for the embedded model, else 1e-6."""
    micro_batch_size: int | None = None
    """As UpdateSettings.micro_batch_size; None: 256 for the embedded model, else 8."""
    ref: str | None = None
    """Reference model for the KL penalty (--kl-coef > 0)."""

    def resolved(self) -> LoopConfig:
        """The None defaults that depend on the model filled in, and every value checked,
        group by group, then the rules across groups."""
        base = EMBEDDED_DEFAULTS if self.model == "default" else GENERAL_DEFAULTS
        cfg = dataclasses.replace(self)
        for name in ("lr", "max_new_tokens", "prompts_per_step", "batch_size", "micro_batch_size",
                     "threads"):
            if getattr(cfg, name) is None:
                setattr(cfg, name, base[name])
        if cfg.steps is None and cfg.epochs is None:
            cfg.steps = base["steps"]
        for group in GROUPS:
            group.check(cfg)
        if cfg.estimator == "pairwise" and cfg.group_size != 2:
            raise GrpoctlError("--estimator pairwise needs --group-size 2")
        if cfg.kl_coef > 0 and not cfg.ref:
            raise GrpoctlError("--kl-coef > 0 needs a reference policy (--ref)")
        _model_path("ref", cfg.ref)  # as `update --ref` refuses it, with --kl-coef 0 too
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
        if cfg.vllm_sleep and cfg.backend != "vllm":
            raise GrpoctlError("--vllm-sleep needs --backend vllm")
        cfg.old_logprobs = default_old_logprobs(cfg, cfg.backend, (cfg.dtype, cfg.vllm_dtype))
        return cfg

    def group(self, settings: type):
        """This run's settings of one group, e.g. cfg.group(UpdateSettings)."""
        return settings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(settings)})
