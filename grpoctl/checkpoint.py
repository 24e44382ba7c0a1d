"""A checkpoint directory: policy, tokenizer, optimizer state and trainer state, all atomic.

    out_dir/
      config.json  generation_config.json  model.safetensors    (save_pretrained: loads with
                                                                  AutoModelForCausalLM.from_pretrained)
      model.safetensors.index.json   which file holds each weight: loaders that read every
                               *.safetensors of a directory without an index (vLLM) would
                               otherwise take optimizer.safetensors for weights
      tokenizer.json  tokenizer_config.json  ...                 (tokenizer.save_pretrained)
      optimizer.safetensors    AdamW state per parameter NAME: "<name>.exp_avg",
                               "<name>.exp_avg_sq", "<name>.step" (no pickle anywhere)
      trainer_state.json       step, every hyperparameter, the last step's metrics

With LoRA (lora.py) the weights are the adapter instead: adapter_model.safetensors +
adapter_config.json (naming the base model's path), and the optimizer state covers
the adapter's parameters only; `save_lora="merged"` adds merged/, the base weights
with the adapter merged in, as a plain transformers directory (+ tokenizer).

Keying the optimizer state by parameter name (not by position, as
`optimizer.state_dict()` does) makes the file readable and robust: a tied
weight (lm_head = embed_tokens) is one parameter with one name, and a model
whose parameter order differs still gets the right state.

Writing is atomic: everything goes into a temporary sibling directory, every
file is fsynced, then the directory is renamed into place. An existing out_dir
is swapped with the new one in one step (Linux renameat2 RENAME_EXCHANGE), so a
crash leaves either the old or the new complete checkpoint at out_dir.

Writing is byte-deterministic: the same weights, optimizer state, tokenizer and trainer
state give the same bytes in every file, whichever process or resume wrote them. So
every safetensors header is written with sorted keys (safetensors orders its metadata by
a hash), the tokenizer is saved without the padding/truncation its last call left in it,
and trainer_state.json holds no wall-clock times (metrics.jsonl keeps them).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from grpoctl import process
from grpoctl.errors import GrpoctlError, first_line
from grpoctl.records import umask_mode

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


# --- optimizer state <-> flat {name.key: tensor} ------------------------------


def optimizer_tensors(optimizer: torch.optim.Optimizer, model) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as {"<param name>.<state key>": tensor}."""
    name_of = {id(p): name for name, p in model.named_parameters()}  # tied weights: one name
    tensors = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in name_of:
                raise ValueError("the optimizer holds a parameter that is not in the model")
            for key, value in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(value):
                    value = torch.tensor(value)
                # contiguous CPU copies: safetensors refuses shared or strided storage
                tensors[f"{name_of[id(p)]}.{key}"] = value.detach().to("cpu").contiguous().clone()
    return tensors


def read_optimizer_state(checkpoint_dir) -> dict[str, dict[str, torch.Tensor]] | None:
    """optimizer.safetensors as {parameter name: {state key: tensor}}; None when the
    checkpoint has none or an empty one (saved before the first step)."""
    from safetensors.torch import load_file

    path = Path(checkpoint_dir) / OPTIMIZER_FILE
    if not path.exists():
        return None
    try:
        saved = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise GrpoctlError(f"{path}: cannot read optimizer state: {first_line(e)}") from None
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in saved.items():
        name, _, state_key = key.rpartition(".")
        by_name.setdefault(name, {})[state_key] = tensor
    return by_name or None


def load_optimizer_state(optimizer: torch.optim.Optimizer, model, checkpoint_dir) -> bool:
    """Restore the state saved by `save_checkpoint` into `optimizer`, matching by name.

    Returns False when checkpoint_dir has no optimizer.safetensors or an empty one
    (a fresh policy: the optimizer starts from zero). Otherwise every parameter
    must have state (update_step gives every parameter a gradient, even a zero
    one). Hyperparameters (lr, betas, ...) are NOT restored: the optimizer keeps
    the ones it was built with (the CLI's flags; trainer_state.json records them).
    Raises GrpoctlError naming the file if it is corrupt or does not fit the model.
    """
    by_name = read_optimizer_state(checkpoint_dir)
    if by_name is None:
        return False
    path = Path(checkpoint_dir) / OPTIMIZER_FILE

    # Rebuild the position-keyed dict torch expects; load_state_dict then moves
    # each tensor to its parameter's device and dtype (and keeps `step` as saved).
    name_of = {id(p): name for name, p in model.named_parameters()}
    current = optimizer.state_dict()
    state, index = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = name_of.get(id(p))
            if name not in by_name:
                raise GrpoctlError(f"{path}: no optimizer state for parameter '{name}' "
                                   f"(saved for a different model?)")
            for key, tensor in by_name[name].items():
                if key != "step" and tensor.shape != p.shape:
                    raise GrpoctlError(f"{path}: '{name}.{key}' has shape {tuple(tensor.shape)}, "
                                       f"the parameter has {tuple(p.shape)}")
            state[index] = by_name.pop(name)
            index += 1
    if by_name:
        raise GrpoctlError(f"{path}: state for parameters the model does not have, "
                           f"e.g. '{next(iter(by_name))}' (saved for a different model?)")
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    return True


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's settings (lr, betas, ...), JSON-ready, without the parameters."""
    groups = []
    for group in optimizer.param_groups:
        settings = {}
        for key, value in group.items():
            if key == "params":
                continue
            if torch.is_tensor(value):
                value = value.item()
            settings[key] = list(value) if isinstance(value, tuple) else value
        groups.append(settings)
    return groups


def read_trainer_state(model_dir) -> dict:
    """trainer_state.json of a model or checkpoint directory: the one rule every command
    reads it by (update continues its step count from it, rollout and eval record it as
    the policy's step).

    - no trainer_state.json (a base model): {"step": 0};
    - grpoctl's own: `step`; a transformers Trainer checkpoint's: `global_step` (copied
      to `step` in the dict returned);
    - anything else (not JSON, not an object, a step that is not a whole number >= 0, a
      bool included) is a one-line GrpoctlError naming the file: a policy whose step
      cannot be read is not silently taken for step 0.
    `default` names the embedded model, as everywhere else.
    """
    from grpoctl.models import resolve_model_dir

    path = resolve_model_dir(model_dir) / TRAINER_STATE_FILE
    if not path.exists():
        return {"step": 0}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise GrpoctlError(f"{path}: cannot read trainer state: {first_line(e)}") from None
    if not isinstance(state, dict):
        raise GrpoctlError(f"{path}: cannot read trainer state: expected a JSON object, "
                           f"got {type(state).__name__}")
    key = "step" if "step" in state or "global_step" not in state else "global_step"
    step = state.get(key)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise GrpoctlError(f"{path}: cannot read trainer state: '{key}' must be a whole number "
                           f">= 0, got {json.dumps(step)[:40] if key in state else 'nothing'}")
    return {**state, "step": step}


def trainer_step(model_dir) -> int:
    """The training step of a model directory (read_trainer_state's rule; 0 for a base model)."""
    return read_trainer_state(model_dir)["step"]


# --- atomic directory writing ------------------------------------------------


# What a checkpoint directory holds: save_checkpoint's files, what transformers and peft
# save for a model, an adapter and a tokenizer. Anything else there is the user's, and
# replacing the checkpoint (atomically, as a whole directory) would delete it.
CHECKPOINT_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
    "model.safetensors.index.json", "optimizer.safetensors", "trainer_state.json",
    "adapter_config.json", "adapter_model.safetensors", "README.md", "merged",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "*.tiktoken",
    "chat_template.jinja", "chat_template.json", "additional_chat_templates",
)


def is_checkpoint(path: Path) -> bool:
    """A directory holding the files only save_checkpoint writes together."""
    return path.is_dir() and (path / TRAINER_STATE_FILE).is_file() \
        and (path / OPTIMIZER_FILE).is_file()


def check_out_dir(out_dir, inputs=()) -> None:
    """Refuse an out_dir whose replacement would destroy what grpoctl did not write.

    An existing out_dir is replaced whole, so it must be a grpoctl checkpoint (e.g. the
    policy being updated in place), and it must not hold any of `inputs` (the records
    file, the policy or reference directory) or anything a checkpoint does not
    (CHECKPOINT_FILES: a user's notes beside the weights): `--out .` or a directory of
    one's own files is refused, before anything is loaded.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not is_checkpoint(out):
        kind = "directory" if out.is_dir() else "file"
        raise GrpoctlError(f"{out_dir}: exists and is a {kind} that is not a grpoctl checkpoint; "
                           f"--out only replaces a checkpoint: choose a new path")
    for given in inputs:
        if given is not None and Path(given).resolve().is_relative_to(out) \
                and Path(given).resolve() != out:
            raise GrpoctlError(f"{out_dir}: holds the input {given}, which replacing it would "
                               f"delete: choose another --out")
    foreign = [name for name in sorted(os.listdir(out)) if not any(
        fnmatch.fnmatchcase(name, pattern) for pattern in CHECKPOINT_FILES)] \
        if out.exists() else []
    if foreign:
        raise GrpoctlError(f"{out_dir}: also holds {', '.join(foreign[:3])}"
                           f"{', ...' if len(foreign) > 3 else ''}, which a checkpoint does not "
                           "and replacing it would delete: move them out or choose a new --out")


def save_checkpoint(out_dir, model, tokenizer, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, save_lora: str = "adapter") -> Path:
    """Write a complete checkpoint to out_dir atomically (see the module docstring).

    trainer_state must be JSON-serialisable and hold at least "step".
    save_lora (a model with a LoRA adapter only): "adapter" (default) saves the
    adapter; "merged" also writes merged/ (lora.save_merged).
    Any write failure (full disk, read-only directory) raises GrpoctlError and
    leaves an existing out_dir untouched and no temporary directory behind.
    """
    from safetensors.torch import save_file

    from grpoctl import lora

    lora.check_save_mode(save_lora)

    out = Path(out_dir).absolute()
    if out.is_symlink():  # the directory it points to is replaced; the link stays a link
        out = out.resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise GrpoctlError(f"{out}: cannot write checkpoint: {e.strerror or e}") from None
    try:
        tmp.chmod(umask_mode(0o777))  # mkdtemp makes 0700 (in the try: Ctrl-C removes tmp)
        if lora.has_lora(model):
            lora.save_adapter(model, tmp)
            if save_lora == "merged":
                lora.save_merged(model, tmp / lora.MERGED_DIR)
                save_tokenizer(tokenizer, tmp / lora.MERGED_DIR)
                (tmp / lora.MERGED_DIR / TRAINER_STATE_FILE).write_text(  # its step, for rollout
                    json.dumps({"step": trainer_state["step"]}) + "\n", encoding="utf-8")
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
            write_weights_index(tmp)
        save_tokenizer(tokenizer, tmp)
        save_file(optimizer_tensors(optimizer, model), str(tmp / OPTIMIZER_FILE),
                  metadata={"format": "grpoctl-adamw", "keys": "<parameter name>.<state key>"})
        (tmp / TRAINER_STATE_FILE).write_text(
            json.dumps(without_timings(trainer_state), indent=2, ensure_ascii=False,
                       allow_nan=False) + "\n", encoding="utf-8")
        for f in sorted(tmp.rglob("*.safetensors")):  # weights, adapter, optimizer, merged/
            canonical_safetensors_header(f)
        for f in tmp.rglob("*"):  # files, and merged/ when there is one
            f.chmod(umask_mode(0o777 if f.is_dir() else 0o666))  # safetensors writes 0600
            _fsync(f)
        _fsync(tmp)
        with process.committing(out):  # a signal now is raised once out is the new checkpoint
            _move_into_place(tmp, out)
    except BaseException as e:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        if isinstance(e, GrpoctlError):
            raise
        if isinstance(e, Exception) and _is_write_error(e):
            raise GrpoctlError(f"{out}: cannot write checkpoint: {_reason(e)}") from None
        raise
    return out


# --- byte-determinism: the same training gives the same checkpoint bytes ---------------


def is_timing_key(key: str) -> bool:
    """A wall-clock measurement among the metrics: `seconds` or a name ending in `_s`
    (rollout_s, step_s, elapsed_s, ...), the rule metrics.jsonl's readers use too."""
    return key == "seconds" or key.endswith("_s")


def without_timings(trainer_state: dict) -> dict:
    """trainer_state with no wall-clock times in its metrics (at any depth, e.g. the
    per-optimizer-step metrics): they depend on the machine and its load, not on the
    training, and would make every checkpoint's bytes unique (they stay in metrics.jsonl
    and `update`'s own output)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not is_timing_key(str(k))}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    if not isinstance(trainer_state.get("metrics"), dict):
        return trainer_state
    return {**trainer_state, "metrics": strip(trainer_state["metrics"])}


def save_tokenizer(tokenizer, directory: Path) -> None:
    """tokenizer.save_pretrained from a clean state: no padding and no truncation in its
    tokenizer.json, whatever the last call made of them.

    A fast tokenizer keeps the padding and truncation of its last batch call in its
    backend (transformers sets them per call and only resets them on the next call
    that asks for none), and save_pretrained writes that state into tokenizer.json,
    so the file would depend on which call came last before the save (a resumed run
    saves after other calls than a straight one). The backend's settings are put back
    afterwards.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    padding = getattr(backend, "padding", None)
    truncation = getattr(backend, "truncation", None)
    if padding is not None:
        backend.no_padding()
    if truncation is not None:
        backend.no_truncation()
    try:
        tokenizer.save_pretrained(str(directory))
    finally:
        if padding is not None:
            backend.enable_padding(**padding)
        if truncation is not None:
            backend.enable_truncation(**truncation)


def canonical_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with its keys sorted.

    safetensors (0.8) keeps the metadata in a hash map, so two identical saves write
    their `__metadata__` keys in different orders (3 of 5 runs differed in bytes). The
    tensors' bytes and offsets are not touched: the header is re-serialised compactly
    with sorted keys and padded with spaces to the same 8-byte alignment. Where it would
    not fit the original length (it does whenever only the order differs) the file is
    rewritten whole.
    """
    with open(path, "r+b") as f:
        head = f.read(8)
        if len(head) < 8:
            return
        size = int.from_bytes(head, "little")
        raw = f.read(size)
        try:
            header = json.loads(raw)
        except ValueError:
            return  # not ours to judge here; readers report a corrupt file
        if not isinstance(header, dict):
            return
        ordered = {k: header[k] for k in sorted(header)}
        if isinstance(ordered.get("__metadata__"), dict):
            meta = ordered["__metadata__"]
            ordered["__metadata__"] = {k: meta[k] for k in sorted(meta)}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= size:
            f.seek(8)
            f.write(text + b" " * (size - len(text)))
            return
        f.seek(8 + size)
        data = f.read()
    padded = text + b" " * (-len(text) % 8)
    path.write_bytes(len(padded).to_bytes(8, "little") + padded + data)


def write_weights_index(directory: Path) -> None:
    """model.safetensors.index.json for a one-file model (sharded saves write their own)."""
    from safetensors import safe_open

    weights, index = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX_FILE
    if not weights.is_file() or index.exists():
        return
    total, names = 0, []
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():
            piece = f.get_slice(name)
            total += math.prod(piece.get_shape()) * _DTYPE_BYTES.get(piece.get_dtype(), 4)
            names.append(name)
    index.write_text(json.dumps({"metadata": {"total_size": total},
                                 "weight_map": {n: WEIGHTS_FILE for n in sorted(names)}},
                                indent=2) + "\n", encoding="utf-8")


# Bytes per element of the safetensors dtypes a model is saved in (for total_size).
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished tmp directory to out; an existing out is swapped out, then removed."""
    if not out.exists():
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp)  # tmp now holds the old checkpoint
    else:
        # No atomic exchange on this system: two renames. A crash between them
        # leaves the old checkpoint complete under the `.old` name.
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    _fsync(out.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_write_error(e: Exception) -> bool:
    # safetensors reports I/O failures as its own SafetensorError
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


def _reason(e: Exception) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return first_line(e)
