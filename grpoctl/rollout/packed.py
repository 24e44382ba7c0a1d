"""Linear layers with pre-packed weights while the hf backend samples on a CPU.

On a CPU a decode step multiplies few rows (the batch) by every weight matrix, and
torch's default GEMM does that poorly for the LM head's long, thin weight: on
SmolLM2-135M ([rows x 576] @ [576 x 49,152]) at 16 rows it ran at 20 GFLOP/s on 2
cores against 54 for oneDNN with the weight reordered once into its blocked layout
(bench/bench_hf_rollout.py). `packed_linears(model)` gives every plain nn.Linear of the
model such a packed copy for the duration of a `with` block (sampling only: the packed
op has no backward) and puts the originals back after, whatever happens inside.

The packed op is torch's own (`torch.ops.mkldnn._linear_pointwise`, what its CPU
compiler emits), but not a public API: it is used only when it exists, the model is on
the CPU and a probe gives F.linear's result (to fp32 rounding), and only for fp32
weights; otherwise the block runs on the model as it is. The packed copies cost one
more copy of the linear weights in memory while sampling. Whole rollout on SmolLM2-135M,
128 rows: 0.88x the time without packing (bench/bench_hf_rollout.py).
"""

from __future__ import annotations

import contextlib

import torch


class PackedLinear(torch.nn.Module):
    """A stand-in for one nn.Linear: the same product, its weight packed by oneDNN. It keeps
    the original's weight, bias and sizes as attributes, for code that reads them (peft's
    LoRA layers read their base layer's weight)."""

    def __init__(self, linear: torch.nn.Linear, rows_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.weight_packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(),
                                                                     rows_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        bias = None if self.bias is None else self.bias.detach()
        out = torch.ops.mkldnn._linear_pointwise(flat, self.weight_packed, bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def can_pack(model) -> bool:
    """True where packing applies: a model on the CPU and a torch whose packed op works."""
    if next(model.parameters()).device.type != "cpu":
        return False
    if not (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:  # the op's signature is torch's to change: check it gives F.linear's numbers
        probe = torch.nn.Linear(48, 40)
        x = torch.randn(3, 5, 48)
        with torch.inference_mode():
            return torch.allclose(PackedLinear(probe, 16)(x), probe(x), rtol=1e-5, atol=1e-5)
    except (RuntimeError, TypeError):
        return False


@contextlib.contextmanager
def packed_linears(model, rows_hint: int):
    """Within the block, every plain fp32 nn.Linear of `model` (LM head included) runs with
    a packed weight, when `can_pack(model)`; the model is given back as it was after."""
    swapped = []
    try:
        if can_pack(model):
            with torch.inference_mode():
                for parent in list(model.modules()):
                    for name, child in list(parent._modules.items()):
                        if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32:
                            parent._modules[name] = PackedLinear(child, rows_hint)
                            swapped.append((parent, name, child))
        yield
    finally:
        for parent, name, child in swapped:
            parent._modules[name] = child
