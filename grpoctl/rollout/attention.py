"""Attention at a decode step on a CPU: one query token per row as two batched matmuls.

At a decode step each row attends with one query token to its whole KV cache: little
arithmetic over a lot of memory. torch's CPU flash-attention kernel, which sdpa picks,
spends most of that time around its small products: 4.5 ms per layer on SmolLM2-135M
(128 rows, 3 key/value heads of 64, 110 cached positions, 2 cores). As two batched
matmuls and a softmax, the query heads that share a key/value head taken as that head's
queries (nothing of the cache copied), 2.4-3.0 ms: the same numbers to fp32 rounding.

`decode_attention(model)` routes a model's attention through `decode_attention_forward`
for the duration of a `with` block, where the model's attention and masks go through
transformers' AttentionInterface and AttentionMaskInterface and it uses "sdpa" on the
CPU (else the block changes nothing). Every call other than a one-token decode step
(the prefill, dropout, soft-capping, attention sinks, a per-head mask) goes to sdpa,
as before; the model's setting is put back after, whatever happens inside.
"""

from __future__ import annotations

import contextlib
import sys

import torch

NAME = "grpoctl_decode"


def decode_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                             scaling=None, **kwargs):
    """transformers' attention-function signature: query [B, heads, q, D], key and value
    [B, kv_heads, keys, D]; returns ([B, q, heads, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if (length != 1 or dropout or heads % kv_heads
            or (attention_mask is not None and attention_mask.shape[1] != 1)
            or any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "position_bias"))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    # Head h uses key/value head h // (heads / kv_heads), as transformers' repeat_kv has it.
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2))  # [B, kv_heads, group, keys]
    scores.mul_(dim ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:  # [B, 1, 1, keys]: True (bool) or 0 (float) where seen
        mask = attention_mask[..., :key.shape[-2]]
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask)
    out = torch.matmul(scores.softmax(-1), value)  # [B, kv_heads, group, D]
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _switchable_config(model):
    """The config to switch where switching is safe (then NAME is registered), else None:
    a CPU model on sdpa whose modeling code, transformers' own, looks its attention and
    masks up by name (so the name is all that changes; a remote model's might branch on it)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # a transformers before these interfaces
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    config = getattr(base, "config", None)
    module = type(base).__module__
    modeling = getattr(sys.modules.get(module), "__dict__", {})
    if (config is None or getattr(config, "_attn_implementation", None) != "sdpa"
            or getattr(config, "sub_configs", None) or not module.startswith("transformers.")
            or "ALL_ATTENTION_FUNCTIONS" not in modeling or "create_causal_mask" not in modeling
            or next(base.parameters()).device.type != "cpu"):
        return None
    AttentionInterface.register(NAME, decode_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return config


@contextlib.contextmanager
def decode_attention(model):
    """Within the block, `model` (a CPU model on sdpa) attends at decode steps with
    decode_attention_forward; its attention setting is "sdpa" again after."""
    config = _switchable_config(model)
    if config is None:
        yield
        return
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
