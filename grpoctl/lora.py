"""LoRA through peft: train small low-rank adapters instead of every weight (optional).

    pip install 'grpoctl[lora]'          # peft

W x becomes W x + (α / r) B A x for each targeted linear layer, with A [r, in] random,
B [out, r] zero (so the first forward equals the base model's), and only A and B
trained (Hu et al., 2021). peft does the wrapping; this file keeps grpoctl's side:

- The model that `update` and `loop` pass around stays the plain transformers model
  (peft injects its LoRA layers into it in place), so log-probs, generation and
  checkpoint code see the same forward signature with or without LoRA. peft's
  wrapper object is kept beside it (`model.__dict__["peft_wrapper"]`, not a
  submodule) for saving.
- An adapter checkpoint is a directory with peft's adapter_model.safetensors and
  adapter_config.json (whose base_model_name_or_path is the base model's absolute
  path: the base must stay there), plus grpoctl's tokenizer, optimizer and trainer
  state. `models.load_policy` on it loads the base, then the adapter, trainable.
- This file never imports models.py (models.py imports it): it checks an adapter's
  own files and attaches adapters to a model it is given; finding, checking and
  loading the base model stays in models.py.
- `--save-lora merged` also writes `merged/`: the base weights plus each adapter
  delta, as a plain transformers directory for rollout engines (vLLM) or sharing.

Safetensors only: adapters are loaded from adapter_model.safetensors; a pickle-only
adapter (adapter_model.bin) is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

from grpoctl.config import AdapterSettings
from grpoctl.errors import GrpoctlError, first_line

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_DIR = "merged"


def check_save_mode(save_lora: str) -> None:
    """--save-lora is "adapter" or "merged", or a one-line error."""
    AdapterSettings(save_lora=save_lora).check()


def is_adapter_dir(path) -> bool:
    """True for a LoRA adapter checkpoint (it has adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def require_peft():
    """The peft module, or a one-line error naming the extra to install."""
    try:
        import peft
    except ImportError:
        raise GrpoctlError("LoRA needs peft: pip install 'grpoctl[lora]'") from None
    return peft


@contextlib.contextmanager
def _quiet():
    """peft 0.21 calls transformers 5's deprecated `is_gradient_checkpointing`: not the
    user's concern, so that FutureWarning is not printed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        yield


def _target_modules(spec: str):
    spec = spec.strip()
    return spec if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]


def wrap_with_lora(model, settings: AdapterSettings, seed: int = 0):
    """Attach a fresh LoRA adapter to `model` in place; only A and B stay trainable.

    Returns the same transformers model object, in eval mode. A's random init is
    seeded by `seed` (so a run restarted from step 0 gets the same adapter).
    """
    import torch

    settings.check()
    peft = require_peft()
    config = peft.LoraConfig(r=settings.lora_r, lora_alpha=settings.resolved_alpha(),
                             lora_dropout=settings.lora_dropout,
                             target_modules=_target_modules(settings.lora_target_modules),
                             task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        try:
            wrapper = peft.get_peft_model(model, config)
        except ValueError as e:  # e.g. target modules not found in the model
            raise GrpoctlError(f"--lora-target-modules {settings.lora_target_modules!r}: "
                               f"{first_line(e)}") from None
    # Saved adapters name their base by absolute path, so they load from any directory.
    wrapper.peft_config["default"].base_model_name_or_path = str(Path(model.name_or_path).resolve())
    return _unwrapped(wrapper)


def _unwrapped(wrapper):
    model = wrapper.get_base_model()
    model.__dict__["peft_wrapper"] = wrapper  # a plain attribute: not a submodule, not saved
    model.eval()  # peft creates its new layers in training mode (dropout on)
    return model


def has_lora(model) -> bool:
    """True when `model` carries a peft adapter attached by this module."""
    return "peft_wrapper" in getattr(model, "__dict__", {})


def lora_rank(model) -> int:
    return int(model.__dict__["peft_wrapper"].peft_config["default"].r)


def check_same_adapter(model, settings: AdapterSettings | None, source) -> None:
    """A checkpoint's adapter continues as saved: refuse a --lora-r that says otherwise."""
    if settings is not None and settings.lora_r and settings.lora_r != lora_rank(model):
        raise GrpoctlError(f"{source}: holds a LoRA adapter of rank {lora_rank(model)} but "
                           f"--lora-r is {settings.lora_r}; leave --lora-r out to continue it")


# --- adapter checkpoints -----------------------------------------------------------


def adapter_base(path) -> Path:
    """The base model directory an adapter checkpoint names (adapter_config.json)."""
    config_path = Path(path) / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GrpoctlError(f"{config_path}: cannot read adapter config: {e}") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise GrpoctlError(f"{config_path}: no base_model_name_or_path (which model does "
                           f"this adapter belong to?)")
    return Path(base)  # grpoctl writes it absolute; another tool's relative path is taken as is


def check_adapter_files(path) -> Path:
    """An adapter directory's own files: safetensors weights, and a base that is not itself
    an adapter. Returns that base directory, for models.check_model_dir to check in turn."""
    p = Path(path)
    if not (p / ADAPTER_WEIGHTS).is_file():
        hint = (" (found adapter_model.bin: pickle weights are not loaded)"
                if (p / "adapter_model.bin").is_file() else "")
        raise GrpoctlError(f"{p}: LoRA adapter directory without {ADAPTER_WEIGHTS}{hint}")
    base = adapter_base(p)
    if (base / ADAPTER_CONFIG).is_file():
        raise GrpoctlError(f"{p}: the adapter's base {base} is itself an adapter")
    return base


def attach_saved_adapter(base, path, device: str = "cpu"):
    """`base` (the model adapter_base(path) names, loaded by models.load_policy) with the
    adapter saved in `path` attached, trainable (LoRA weights only), in eval mode. Through
    models.load_policy, update, rollout, eval and loop's resume all load an adapter
    checkpoint the same way (unmerged: the same arithmetic the update used)."""
    peft = require_peft()
    try:
        with _quiet():
            wrapper = peft.PeftModel.from_pretrained(base, str(path), is_trainable=True,
                                                     use_safetensors=True)
    except Exception as e:  # a corrupt or mismatched adapter
        raise GrpoctlError(f"{path}: cannot load LoRA adapter: {first_line(e)}") from None
    return _unwrapped(wrapper.to(device))


def save_adapter(model, directory) -> None:
    """Write adapter_model.safetensors and adapter_config.json (peft's format) to directory."""
    wrapper = model.__dict__["peft_wrapper"]
    with _quiet():
        wrapper.save_pretrained(str(directory), safe_serialization=True)
    readme = Path(directory) / "README.md"  # peft's model-card stub: not part of a checkpoint
    if readme.is_file():
        os.remove(readme)


def merged_state_dict(model) -> dict:
    """The plain model's weights with every adapter's delta (α/r · B A) added, under the
    names the model has without LoRA. The model is not changed (peft's merge_and_unload
    would remove the adapter, and merge/unmerge would round the base weights)."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter)
                key = f"{name}.base_layer.weight"
                deltas[key] = delta if key not in deltas else deltas[key] + delta
    merged = {}
    for key, tensor in model.state_dict().items():
        if any(part.startswith("lora_") for part in key.split(".")):
            continue  # the adapter's own A and B
        if key in deltas:
            tensor = (tensor.float() + deltas[key].float()).to(tensor.dtype)
        merged[key.replace(".base_layer.", ".")] = tensor.detach()
    return merged


def save_merged(model, directory) -> None:
    """Save base + adapter as a plain transformers directory (config + safetensors)."""
    model.save_pretrained(str(directory), state_dict=merged_state_dict(model),
                          safe_serialization=True)


@contextlib.contextmanager
def dropout_on(model):
    """LoRA dropout (if any) active inside the block, whatever the model's mode: the
    update's gradient passes. Everything else (sampling, π_old) runs without it."""
    dropouts = []
    if has_lora(model):
        import torch

        dropouts = [m for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Dropout) and ".lora_dropout." in f".{name}."]
    for m in dropouts:
        m.train()
    try:
        yield
    finally:
        for m in dropouts:
            m.eval()


def has_dropout(model) -> bool:
    """True when the model's LoRA adapter has dropout > 0 (see dropout_on)."""
    if not has_lora(model):
        return False
    return any(float(c.lora_dropout) > 0 for c in model.__dict__["peft_wrapper"].peft_config.values())


def describe(model) -> dict:
    """The attached adapter's settings, JSON-ready (for trainer_state.json)."""
    config = model.__dict__["peft_wrapper"].peft_config["default"]
    targets = config.target_modules
    return {"r": int(config.r), "alpha": float(config.lora_alpha),
            "dropout": float(config.lora_dropout),
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "base": config.base_model_name_or_path}
