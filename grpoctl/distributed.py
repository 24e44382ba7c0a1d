"""Several processes, one update: `update` and `loop` under torchrun.

    torchrun --nproc-per-node 4 -m grpoctl update adv.jsonl --policy ckpt-0 --out ckpt-1
    torchrun --nproc-per-node 4 -m grpoctl loop --model M --run-dir runs/r --fsdp

torchrun starts N copies of the command and gives each RANK, WORLD_SIZE and
LOCAL_RANK in its environment; `init_if_launched` sees them and joins the process
group (nccl on CUDA, gloo on CPU). Without torchrun every function here is a no-op
and grpoctl is one process, exactly as before.

One update step on N ranks (update.update_step):
  1. every rank reads the WHOLE file and computes every token's weight over it
     (losses.token_weights: 1/total tokens, ...), as one process would;
  2. each rank forwards and backpropagates only its share of the prompt groups
     (`shard_groups`): its gradient is ∇ of its part of the full-batch loss;
  3. `sum_gradients` adds the ranks' gradients: Σ_r ∇L_r = ∇L, the full-batch
     gradient. A SUM, not DDP's average: the weights already divide by the whole file;
  4. the gradient is clipped with its global norm (`clip_grad_norm`) and every rank
     takes the same AdamW step. The result equals one process's up to float rounding.

Two ways to hold the model (`wrap_model`):
  "ddp"   every rank holds the whole model and optimizer; the gradients are summed by
          one all_reduce per parameter after the micro-batches. torch's
          DistributedDataParallel wrapper is not used: it all-reduces inside every
          backward pass, which needs the same number of passes on every rank, but the
          ranks' shares differ in micro-batches and a micro-batch calls the model twice
          (the shared prompt pass of logprobs.py).
  "fsdp"  torch FSDP2 (`fully_shard`): the optimizer state (AdamW's two moments, most of
          the memory) and the summed gradients are sharded across ranks. The parameters
          are gathered once per step and kept whole until the gradients are
          reduce-scattered, for the same reason: a collective inside every forward would
          need equal micro-batch counts. Gradient sync is off during the micro-batches;
          `sum_gradients` runs one dummy forward/backward with sync on, which
          reduce-scatters the accumulated gradients (as a sum).

Only rank 0 writes files. A checkpoint is an ordinary single-process checkpoint
(FSDP: the full weights and optimizer state are gathered on rank 0), so a later
`grpoctl update` in one process resumes from it, and the other way round.
The run directory must be on a filesystem every rank sees (always true on one machine).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import os
import sys
from pathlib import Path

from grpoctl.errors import GrpoctlError

MODES = ("ddp", "fsdp")
# Rank 0 scores and evaluates alone while the others wait in the next collective:
# allow more than NCCL's default 10 minutes for that.
TIMEOUT = datetime.timedelta(hours=2)


# --- who am I -------------------------------------------------------------------


def launched() -> bool:
    """True when torchrun started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def world() -> tuple[int, int]:
    """(rank, number of ranks): from the process group once joined, else torchrun's
    environment, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if launched():
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def is_main() -> bool:
    """True on rank 0, the rank that writes files (and in a single process)."""
    return world()[0] == 0


def local_device(device: str) -> str:
    """This rank's device: `cuda` becomes `cuda:LOCAL_RANK` under torchrun (one GPU per rank)."""
    if launched() and device.startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def init_if_launched(device: str = "cpu") -> str:
    """Join torchrun's process group (nccl for cuda, gloo for cpu) once; return this
    rank's device (`local_device`). Without torchrun: nothing, returns `device`."""
    import torch
    import torch.distributed as dist

    device = local_device(device)
    if not launched() or dist.is_initialized():
        return device
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
    atexit.register(leave)  # a library caller that never calls leave(); commands do (left_at_end)
    return device


def leave(wait_for_others: bool = False) -> None:
    """Leave the process group, if this process joined one: after a barrier when
    `wait_for_others` (every rank got here), then destroy it. Nothing otherwise.

    A rank must not exit with its group still alive: the group's C++ threads (gloo's
    workers, NCCL's watchdog) are then torn down during interpreter shutdown, which can
    abort the process (`terminate called without an active exception`, SIGABRT) after
    its work succeeded, more often on a loaded machine.
    """
    if "torch.distributed" not in sys.modules:  # never imported: never joined
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait_for_others:
            dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def left_at_end():
    """Around a whole command that may join the process group (init_if_launched): the
    group is left when the command ends, on every path. On success the ranks first meet
    in a barrier, so none tears down its end while another still uses it; on an error
    or an interrupt there is no barrier (the other ranks may be gone, or stopped
    elsewhere) and the group is destroyed at once."""
    try:
        yield
    except BaseException:
        leave(wait_for_others=False)
        raise
    leave(wait_for_others=True)


def end_rank(status: int) -> None:
    """Under torchrun: end this rank now with `status`, its process group left (`leave`),
    logging shut down and its standard streams flushed; the interpreter's own teardown is
    skipped (os._exit). Without torchrun: nothing, the caller exits as usual.

    A rank that finished its work, its group destroyed, could still abort while the
    interpreter and torch's C++ runtime were torn down (`terminate called without an
    active exception`, SIGABRT: objects holding gloo's or torch's threads destroyed in no
    set order), now and then on a loaded machine (1 of 24 torchruns of the distributed
    tests on 2 busy cores), and torchrun then reports a run that succeeded as failed. Every output is complete before this: commands
    write and rename their files before they return.
    """
    if not launched():
        return
    import logging

    try:
        leave()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        os._exit(status)


# --- who does what ----------------------------------------------------------------


def shard_groups(records: list[dict], rank: int, world: int,
                 indices: list[int] | None = None) -> list[int]:
    """The record indices (out of `indices`, default all) that `rank` forwards.

    Whole prompt groups (by prompt_id: a group's samples share one prompt pass,
    logprobs.py), dealt largest first to the rank with the fewest tokens so far
    (a group costs its prompt once plus its completions), so the ranks' work is
    roughly equal. Every rank computes the same split; the order of `indices` is kept.
    """
    indices = list(range(len(records))) if indices is None else list(indices)
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(records[i]["prompt_id"], []).append(i)

    def cost(members: list[int]) -> int:
        return len(records[members[0]]["prompt_ids"]) + sum(
            len(records[i]["completion_ids"]) for i in members)

    load, owner = [0] * world, {}
    for prompt_id, members in sorted(groups.items(), key=lambda g: (-cost(g[1]), g[1][0])):
        least = min(range(world), key=lambda r: (load[r], r))
        owner[prompt_id] = least
        load[least] += cost(members)
    return [i for i in indices if owner[records[i]["prompt_id"]] == rank]


def my_share(records: list[dict], indices: list[int]) -> list[int]:
    """shard_groups for this rank; all of `indices` in a single process."""
    rank, n = world()
    return indices if n == 1 else shard_groups(records, rank, n, indices)


def shard_prompts(prompts: list[dict]) -> list[dict]:
    """This rank's prompts to sample: every N-th, like `rollout --shard RANK/N`."""
    rank, n = world()
    return prompts[rank::n]


def gather_records(records: list[dict], prompt_ids: list[str]) -> list[dict]:
    """Every rank's records, on every rank, in one process's order: by the position of
    their prompt_id in `prompt_ids` (the prompts in the order given), then by sample."""
    import torch.distributed as dist

    n = world()[1]
    if n == 1:
        return records
    parts = [None] * n
    dist.all_gather_object(parts, records)
    position = {prompt_id: k for k, prompt_id in enumerate(prompt_ids)}
    return sorted((r for part in parts for r in part),
                  key=lambda r: (position[r["prompt_id"]], r["sample"]))


def on_main(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 only; every rank returns its result. A GrpoctlError
    on rank 0 is raised on every rank (with the same message), so all stop cleanly."""
    import torch.distributed as dist

    if world()[1] == 1:
        return fn(*args, **kwargs)
    box = [None]
    if is_main():
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except GrpoctlError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise GrpoctlError(value)
    return value


def main_only(method):
    """Decorator: run the function on rank 0 only, every rank gets its result (on_main)."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        return on_main(method, *args, **kwargs)
    return wrapper


# --- the model and its gradients ----------------------------------------------


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap_model(model, mode: str = "ddp"):
    """Prepare this rank's model for training on all ranks; returns it (the same object).

    "ddp" (default): rank 0's weights are copied to every rank (weights a checkpoint
    lacks are initialised at random, differently on each rank). "fsdp": FSDP2
    `fully_shard` over all ranks, set up as the module docstring explains; make the
    optimizer AFTER this (the parameters become sharded DTensors).
    In a single process the model is returned unchanged, whatever the mode.
    """
    import torch.distributed as dist

    if mode not in MODES:
        raise GrpoctlError(f"parallel mode: expected one of {', '.join(MODES)}, got {mode!r}")
    n = world()[1]
    if n == 1:
        return model
    if mode == "ddp":
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not all(p.requires_grad for p in model.parameters()):
        raise GrpoctlError("--fsdp trains every weight of the model; with frozen weights "
                           "(LoRA) leave --fsdp out: each rank then holds the model whole")
    device_type = model.get_input_embeddings().weight.device.type
    fully_shard(model, mesh=init_device_mesh(device_type, (n,)), reshard_after_forward=False)
    model.set_gradient_divide_factor(1.0)  # reduce-scatter as a sum, not an average...
    model.set_force_sum_reduction_for_comms(True)  # ...with a plain SUM (gloo has no PREMUL_SUM)
    _accumulate_locally(model, True)
    return model


def _accumulate_locally(model, on: bool) -> None:
    """FSDP: on = backward passes keep whole, unsynced gradients and whole parameters."""
    model.set_requires_gradient_sync(not on)
    model.set_reshard_after_backward(not on)


def gather_weights(model) -> None:
    """FSDP: gather the whole parameters now, on every rank at the same point (before
    sampling, where ranks make different numbers of forward passes). Else nothing."""
    if world()[1] > 1 and is_fsdp(model):
        model.unshard()


def sum_gradients(model, params: list) -> None:
    """Replace each rank's gradient by the sum over the ranks (call it on every rank,
    after the micro-batches, with every parameter's .grad set).

    ddp: all_reduce(SUM) of each gradient. fsdp: one forward/backward of a single
    token, times 0, with gradient sync on: FSDP reduce-scatters the gradients the
    micro-batches accumulated (plus exactly 0), then shards the parameters again.
    """
    import torch
    import torch.distributed as dist

    if world()[1] == 1:
        return
    if not is_fsdp(model):
        for p in params:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        return
    _accumulate_locally(model, False)
    token = torch.zeros((1, 1), dtype=torch.long, device=model.get_input_embeddings().weight.device)
    (model(input_ids=token).logits[..., 0].sum() * 0.0).backward()
    _accumulate_locally(model, True)


def clip_grad_norm(params: list, max_norm: float) -> float:
    """torch's clip_grad_norm_ with the norm of the WHOLE gradient: FSDP's gradient
    shards (DTensors) are combined across ranks. Returns the norm before clipping."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # a DTensor: the norm of this rank's shards only
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.item()


def reduce_metrics(values: dict, op: str = "sum") -> dict:
    """Each value combined over the ranks: op "sum", "min" or "max" (ints stay ints).
    Metrics each rank measured on its own share become the metrics of the whole file."""
    import torch
    import torch.distributed as dist

    if world()[1] == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    keys = list(values)  # the same order on every rank: the same code built the dict
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                "max": dist.ReduceOp.MAX}[op])
    return {k: type(values[k])(v) for k, v in zip(keys, tensor.tolist())}


# --- checkpoints ------------------------------------------------------------------


def load_optimizer_state(optimizer, model, checkpoint_dir) -> bool:
    """checkpoint.load_optimizer_state, also for an FSDP model: the saved (whole) state is
    read on every rank and each rank keeps its shard. Returns False when there is none."""
    from grpoctl import checkpoint

    if not is_fsdp(model):
        return checkpoint.load_optimizer_state(optimizer, model, checkpoint_dir)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = checkpoint.read_optimizer_state(checkpoint_dir)
    if state is None:
        return False
    path = Path(checkpoint_dir) / checkpoint.OPTIMIZER_FILE
    name_of = {id(p): name for name, p in model.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [name_of[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
    wanted = {name for g in groups for name in g["params"]}
    if set(state) != wanted:
        odd = sorted(set(state) ^ wanted)[0]
        raise GrpoctlError(f"{path}: the saved state and the model's parameters differ, e.g. "
                           f"'{odd}' (saved for a different model?)")
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
    return True


def save_checkpoint(out_dir, model, tokenizer, optimizer, trainer_state: dict, *args) -> None:
    """checkpoint.save_checkpoint (same arguments), written by rank 0 only. Call it on EVERY
    rank: under FSDP the whole weights and optimizer state are first gathered onto rank 0."""
    from grpoctl import checkpoint

    if is_fsdp(model):
        model, optimizer = _gather_whole(model, optimizer)
    if is_main():
        checkpoint.save_checkpoint(out_dir, model, tokenizer, optimizer, trainer_state, *args)


def _gather_whole(model, optimizer):
    """FSDP -> (an ordinary model, an optimizer holding its state) on rank 0, (None, None)
    on the others, so checkpoint.save_checkpoint writes the single-process layout."""
    import torch
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    from torch.distributed.fsdp import FSDPModule

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole, on rank 0's CPU
    weights = get_model_state_dict(model, options=options)
    moments = get_optimizer_state_dict(model, optimizer, options=options)
    if not is_main():
        return None, None
    # fully_shard made the class FSDP<Model>(FSDPModule, Model): build a plain Model
    # without allocating weights (meta device), then take the gathered tensors as its own.
    plain_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = plain_class(model.config)
    plain.load_state_dict(weights, assign=True)
    plain.tie_weights()  # assign=True replaced the tied tensors one by one
    params = dict(plain.named_parameters())
    holder = torch.optim.AdamW([params[name] for name in moments["state"]])
    for name, state in moments["state"].items():
        holder.state[params[name]] = state
    return plain, holder
