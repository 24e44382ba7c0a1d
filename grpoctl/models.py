"""Loading a policy and its tokenizer from a directory, and building tiny ones.

All loading goes through `AutoModelForCausalLM.from_pretrained` on a local
directory, so the embedded default, a test model and a user's Qwen or Llama
checkpoint take the same path. Weights load from safetensors only
(`use_safetensors=True`: a pickle-only checkpoint is refused, never unpickled),
and `trust_remote_code` stays off unless the user asks.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

from grpoctl import lora as lora_lib  # light: peft is imported only when LoRA is used
from grpoctl.config import DTYPES, resolve_threads
from grpoctl.errors import GrpoctlError, first_line

DEFAULT_MODEL = "default"  # the name users type for the embedded tiny model


def resolve_model_dir(name: str | os.PathLike) -> Path:
    """`default` is the embedded model shipped in the package; anything else is a path."""
    if str(name) == DEFAULT_MODEL:
        return Path(__file__).parent / "default_model"
    return Path(name)


def check_model_dir(path: str | os.PathLike) -> Path:
    """A directory with config.json and safetensors weights, or a one-line error.

    A LoRA adapter checkpoint (adapter_config.json + adapter_model.safetensors, see
    lora.py) passes too when the base model it names passes.
    """
    p = resolve_model_dir(path)
    if not p.is_dir():
        raise GrpoctlError(f"{p}: not a model directory (no such directory)")
    if lora_lib.is_adapter_dir(p):
        base = lora_lib.check_adapter_files(p)
        try:
            check_model_dir(base)
        except GrpoctlError as e:
            raise GrpoctlError(f"{p}: the adapter's base model: {e}") from None
        return p
    if not (p / "config.json").is_file():
        raise GrpoctlError(f"{p}: not a model directory (no config.json)")
    # optimizer.safetensors is a checkpoint's AdamW state (checkpoint.py), not weights
    if not any(f.name != "optimizer.safetensors" for f in p.glob("*.safetensors")):
        pickles = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
        hint = f" (found {pickles[0]}: pickle weights are not loaded)" if pickles else ""
        raise GrpoctlError(f"{p}: no *.safetensors weights{hint}")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise GrpoctlError(f"{index}: not a weights index (JSON with a weight_map)") from None
        missing = sorted(str(s) for s in shards if not (p / str(s)).is_file())
        if missing:
            raise GrpoctlError(f"{p}: no {missing[0]}, which {index.name} names")
    return p


def use_threads(model: str, threads: int | None) -> None:
    """--threads of a command that runs `model`, applied before the model loads: the
    number given, else the model's default (config.resolve_threads, as `loop`); 0 leaves
    torch's own choice. Every command that runs a model calls this, and only this."""
    threads = resolve_threads(model, threads)
    if threads:
        import torch

        torch.set_num_threads(threads)


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer saved beside the weights, with a pad token and left padding.

    Left padding keeps every prompt's last token at the same position, so a
    batch generates in lock-step and log-probs match a later forward pass.
    """
    from transformers import AutoTokenizer

    path = resolve_model_dir(path)
    if lora_lib.is_adapter_dir(path) and not (path / "tokenizer_config.json").is_file():
        path = lora_lib.adapter_base(path)  # an adapter saved without a tokenizer: the base model's
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for a bad directory
        raise GrpoctlError(f"{path}: cannot load tokenizer: {first_line(e)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_policy(path: str | os.PathLike, dtype: str = "float32", device: str = "cpu",
                trust_remote_code: bool = False, attn_implementation: str | None = None):
    """A causal LM from a local directory, in eval mode (no dropout), on `device`.

    attn_implementation: "eager", "sdpa", "flash_attention_2", ...; None (default) =
    transformers' choice (sdpa where torch has it). A LoRA adapter checkpoint loads as
    its base model with the adapter attached and trainable (lora.py).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display owns stderr
    p = check_model_dir(path)
    if dtype not in DTYPES:
        raise GrpoctlError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if lora_lib.is_adapter_dir(p):  # the base it names, then the adapter, trainable
        lora_lib.require_peft()  # before the base loads
        base = load_policy(lora_lib.adapter_base(p), dtype, device, trust_remote_code,
                           attn_implementation)
        return lora_lib.attach_saved_adapter(base, p, device)
    kwargs = {"dtype": getattr(torch, dtype), "use_safetensors": True,
              "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its page of load report; the one-line error below says it
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(p), output_loading_info=True,
                                                           **kwargs)
    except Exception as e:
        reason = first_line(e)
        if "ignore_mismatched_sizes" in reason:  # it points at the report silenced above
            reason = "the weights do not match the architecture in config.json: some have " \
                     "another shape"
        if attn_implementation:
            reason += f" (--attn-implementation {attn_implementation})"
        raise GrpoctlError(f"{p}: cannot load model: {reason}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    check_loading_info(p, info)
    model.to(device)
    check_finite_weights(p, model)
    model.eval()  # RL updates run without dropout so log-probs match the sampler's
    return model


def check_loading_info(path, info: dict) -> None:
    """Refuse weights that do not fit config.json's architecture.

    transformers initialises missing weights at random and only logs it: such a model
    samples garbage, and `update --out` of it onto its own directory would overwrite
    the real weights.
    """
    problems = []
    for key, word in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "of another shape")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if names:
            problems.append(f"{len(names)} {word} (first: {names[0]})")
    if problems:
        raise GrpoctlError(f"{path}: the weights do not match the architecture in config.json: "
                           f"{'; '.join(problems)}")


def check_finite_weights(path, model) -> None:
    """Refuse a model whose weights hold NaN or infinity, in one line naming the directory
    and the first such tensor: it would sample garbage (or crash the sampler on a NaN
    distribution) and train to NaN. Every parameter must be finite; buffers may hold
    infinity (attention masks do) but not NaN. One pass over the weights, on their device."""
    import torch

    tensors = [(n, t, True) for n, t in model.named_parameters()] + \
              [(n, t, False) for n, t in model.named_buffers()]
    for name, tensor, parameter in tensors:
        if not tensor.is_floating_point():
            continue
        bad = ~torch.isfinite(tensor) if parameter else torch.isnan(tensor)
        if bool(bad.any()):
            what = "NaN" if bool(torch.isnan(tensor).any()) else "infinity"
            raise GrpoctlError(f"{path}: weight '{name}' holds {what} "
                               f"({int(bad.sum())} of {tensor.numel()} values); the model "
                               f"cannot be sampled or trained from it")


def check_finite_files(path) -> None:
    """check_finite_weights for a model directory's safetensors files, for an engine that
    loads them itself (vLLM): NaN anywhere, or infinity outside a mask, is one line
    naming the directory and the tensor. Reads every weight once."""
    import torch
    from safetensors import safe_open

    for file in sorted(Path(path).glob("*.safetensors")):
        if file.name == "optimizer.safetensors":  # a checkpoint's AdamW state, not weights
            continue
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if not tensor.is_floating_point():
                    continue
                bad = torch.isnan(tensor) if "mask" in name else ~torch.isfinite(tensor)
                if bool(bad.any()):
                    what = "NaN" if bool(torch.isnan(tensor).any()) else "infinity"
                    raise GrpoctlError(f"{path}: weight '{name}' holds {what} "
                                       f"({int(bad.sum())} of {tensor.numel()} values); the "
                                       f"model cannot be sampled or trained from it")


def load_training_policy(path: str | os.PathLike, dtype: str = "float32", device: str = "cpu",
                         trust_remote_code: bool = False, attn_implementation: str | None = None,
                         gradient_checkpointing: bool = False, lora=None, seed: int = 0):
    """The policy `update` and `loop` train: load_policy, then LoRA and gradient checkpointing.

    lora: a config.AdapterSettings; with r > 0 a fresh adapter is attached (its random
    init seeded by `seed`), unless `path` is an adapter checkpoint, which continues
    its own adapter. None or r = 0: every parameter trains.
    float16 trains only the LoRA adapter (kept in fp32 by peft): plain fp16 AdamW
    has no fp32 master weights and its eps (1e-8) underflows to 0, so one step
    turns parameters into NaN (measured on a tiny Llama).
    """
    p = resolve_model_dir(path)
    model = load_policy(p, dtype, device, trust_remote_code, attn_implementation)
    wanted = lora is not None and lora.lora_r > 0
    if lora_lib.has_lora(model):
        lora_lib.check_same_adapter(model, lora, p)
    elif wanted:
        model = lora_lib.wrap_with_lora(model, lora, seed=seed)
    if dtype == "float16" and not lora_lib.has_lora(model):
        raise GrpoctlError("--dtype float16 cannot train every parameter (AdamW's state "
                           "underflows in fp16 with no fp32 master copy): use bfloat16 or "
                           "float32, or train a LoRA adapter (--lora-r) on the fp16 model")
    if dtype == "bfloat16" and not lora_lib.has_lora(model):
        print("warning: --dtype bfloat16 keeps the weights and AdamW state in bf16 (no fp32 "
              "master copy): updates under ~1/256 of a weight round away (at lr 1e-6, 98% of "
              "a tiny model's weights did not move); prefer float32, or LoRA", file=sys.stderr)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


# --- gradient checkpointing ----------------------------------------------------


def enable_gradient_checkpointing(model) -> int:
    """Recompute each decoder layer's activations in the backward pass instead of keeping
    them: activation memory drops from every layer's intermediates to one hidden state
    per layer, for about one more forward pass of compute. Returns the number of
    layers wrapped.

    Why not transformers' `gradient_checkpointing_enable()`: it checkpoints only when
    `self.training` is True (transformers 5.24, modeling_layers.py), and grpoctl keeps
    the policy in eval mode so its log-probs match the sampler's (no dropout). So each
    decoder layer (transformers' GradientCheckpointingLayer) gets its forward wrapped
    in torch.utils.checkpoint (non-reentrant, torch's recommended mode) here, whatever
    the mode. Gradients are the same as without (tested).

    A layer call that carries a KV cache runs as is: replaying it would write the
    cache twice. logprobs.py therefore skips its shared-prompt cache path while
    this is on (`is_gradient_checkpointing`).
    """
    import torch
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise GrpoctlError(f"--gradient-checkpointing: {type(model).__name__} has no decoder "
                           f"layers transformers can checkpoint (remote code?)")

    def checkpointed(forward):
        @functools.wraps(forward)
        def run(*args, **kwargs):
            has_cache = any(kwargs.get(k) is not None for k in ("cache", "past_key_values"))
            if not torch.is_grad_enabled() or has_cache:
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return run

    for layer in layers:
        if not getattr(layer, "grpoctl_checkpointed", False):
            layer.forward = checkpointed(layer.forward)  # instance attribute: hooks stay outside
            layer.grpoctl_checkpointed = True
    return len(layers)


def is_gradient_checkpointing(model) -> bool:
    """True when enable_gradient_checkpointing wrapped this model's layers."""
    return any(getattr(m, "grpoctl_checkpointed", False) for m in model.modules())


def check_vocab(tokenizer, model, source: str = "model") -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table."""
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embed:
        raise GrpoctlError(f"{source}: tokenizer has {len(tokenizer)} tokens but the model "
                           f"embeds only {n_embed}")


def position_limit(model) -> int | None:
    """The positions the model has (max_position_embeddings, or GPT-2's n_positions), or
    None when its config does not say. Past them absolute position embeddings fail with an
    IndexError and rotary ones give numbers the model was never trained on."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# --- tiny models, for tests and the embedded default ------------------------


def byte_level_tokenizer():
    """A 258-token byte-level tokenizer (no merges): every UTF-8 string round-trips.

    Ids: 0 = <|pad|>, 1 = <|endoftext|> (eos), then one token per byte.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = [chr(c) for c in _bytes_to_unicode()]
    specials = ["<|pad|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(specials + byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>",
                                   eos_token="<|endoftext|>", padding_side="left")


def _bytes_to_unicode() -> list[int]:
    # GPT-2's printable stand-ins for bytes, in byte order (what ByteLevel expects).
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(b)
        else:
            out.append(256 + extra)
            extra += 1
    return out


def tiny_config(arch: str = "llama", vocab_size: int = 258, hidden: int = 64, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, max_positions: int = 512):
    """A small config of a standard architecture (llama, qwen2 or qwen3)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    return cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 4,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
               head_dim=hidden // heads, max_position_embeddings=max_positions,
               pad_token_id=0, bos_token_id=1, eos_token_id=1, tie_word_embeddings=True)


def make_tiny_model(path: str | os.PathLike, arch: str = "llama", seed: int = 0,
                    chat_template: str | None = None, **config_kwargs) -> Path:
    """Save a randomly initialised tiny causal LM and its byte tokenizer to `path`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kwargs))
    tok = byte_level_tokenizer()
    if chat_template:
        tok.chat_template = chat_template
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return Path(path)
