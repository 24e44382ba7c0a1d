"""Checkpoints: optimizer state by parameter name, exact round trips, atomic writes."""

from __future__ import annotations

import json
import os
import resource
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpoctl.checkpoint import (load_optimizer_state, optimizer_tensors, read_trainer_state,
                                save_checkpoint)
from grpoctl.errors import GrpoctlError
from grpoctl.models import load_policy, load_tokenizer
from grpoctl.update import UpdateConfig, make_optimizer


def _stepped(model_dir, steps=2, seed=0):
    """A policy and an AdamW that took `steps` steps on random gradients."""
    model = load_policy(model_dir)
    optimizer = make_optimizer(model, UpdateConfig(lr=1e-3, weight_decay=0.01))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    return model, optimizer


def _listing(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir())}


def test_optimizer_state_is_keyed_by_parameter_name(tiny_model, tmp_path):
    model, optimizer = _stepped(tiny_model)
    save_checkpoint(tmp_path / "ck", model, load_tokenizer(tiny_model), optimizer, {"step": 2})

    saved = load_file(str(tmp_path / "ck" / "optimizer.safetensors"))
    names = [n for n, _ in model.named_parameters()]
    assert set(saved) == {f"{n}.{k}" for n in names for k in ("exp_avg", "exp_avg_sq", "step")}
    # the tied embedding / output matrix is one parameter, stored once under its first name
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not any(k.startswith("lm_head.") for k in saved)
    embed = model.get_input_embeddings().weight
    assert torch.equal(saved["model.embed_tokens.weight.exp_avg"], optimizer.state[embed]["exp_avg"])
    assert saved["model.embed_tokens.weight.step"].item() == 2.0


def test_weights_index_names_only_the_weights_file(tiny_model, tmp_path):
    """Loaders that glob *.safetensors (vLLM) must not take optimizer.safetensors for weights."""
    model, optimizer = _stepped(tiny_model)
    save_checkpoint(tmp_path / "ck", model, load_tokenizer(tiny_model), optimizer, {"step": 2})
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    weights = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert index["weight_map"] == {name: "model.safetensors" for name in weights}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in weights.values())
    assert torch.equal(load_policy(tmp_path / "ck").model.embed_tokens.weight,
                       model.model.embed_tokens.weight)  # transformers still reads it


def test_checkpoint_directory_gets_the_permissions_mkdir_would_give(tiny_model, tmp_path):
    model, optimizer = _stepped(tiny_model)
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ck", model, load_tokenizer(tiny_model), optimizer, {"step": 2})
    finally:
        os.umask(old)
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o755  # mkdtemp alone gives 0700
    for f in (tmp_path / "ck").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name


def test_optimizer_state_round_trips_exactly_even_in_another_parameter_order(tiny_model, tmp_path):
    model, optimizer = _stepped(tiny_model)
    save_checkpoint(tmp_path / "ck", model, load_tokenizer(tiny_model), optimizer, {"step": 2})

    fresh = load_policy(tmp_path / "ck")
    reversed_params = list(fresh.parameters())[::-1]  # position-keyed state would misassign
    restored = torch.optim.AdamW(reversed_params, lr=1e-3, weight_decay=0.01)
    assert load_optimizer_state(restored, fresh, tmp_path / "ck") is True

    originals = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, originals[name])
        before, after = optimizer.state[originals[name]], restored.state[p]
        assert set(before) == set(after)
        for key in before:
            assert torch.equal(before[key], after[key]), (name, key)
            assert before[key].dtype == after[key].dtype


def test_absent_state_and_trainer_state(tiny_model, tmp_path):
    model = load_policy(tiny_model)
    optimizer = make_optimizer(model, UpdateConfig())
    assert load_optimizer_state(optimizer, model, tiny_model) is False  # a plain model dir
    assert read_trainer_state(tiny_model) == {"step": 0}
    # a checkpoint saved before any step holds an empty optimizer file: also "nothing to resume"
    save_checkpoint(tmp_path / "ck", model, load_tokenizer(tiny_model), optimizer, {"step": 0})
    assert load_optimizer_state(optimizer, model, tmp_path / "ck") is False


def test_corrupt_files_are_named(tiny_model, tmp_path):
    model, optimizer = _stepped(tiny_model, steps=1)
    ck = save_checkpoint(tmp_path / "ck", model, load_tokenizer(tiny_model), optimizer,
                         {"step": 1})
    opt_file = ck / "optimizer.safetensors"
    opt_file.write_bytes(opt_file.read_bytes()[:100])  # truncated, as by a crash mid-copy
    with pytest.raises(GrpoctlError, match="optimizer.safetensors"):
        load_optimizer_state(make_optimizer(model, UpdateConfig()), model, ck)

    (ck / "trainer_state.json").write_text("{not json")
    with pytest.raises(GrpoctlError, match="trainer_state.json"):
        read_trainer_state(ck)


def test_state_of_another_model_is_refused(tiny_model, tiny_qwen2, tmp_path):
    model, optimizer = _stepped(tiny_model, steps=1)
    save_checkpoint(tmp_path / "ck", model, load_tokenizer(tiny_model), optimizer, {"step": 1})
    other = load_policy(tiny_qwen2)  # qwen2 has q/k/v biases the llama lacks
    with pytest.raises(GrpoctlError, match="optimizer.safetensors"):
        load_optimizer_state(make_optimizer(other, UpdateConfig()), other, tmp_path / "ck")


def test_overwrite_replaces_the_whole_directory(tiny_model, tmp_path):
    model, optimizer = _stepped(tiny_model, steps=1)
    tok = load_tokenizer(tiny_model)
    out = tmp_path / "ck"
    save_checkpoint(out, model, tok, optimizer, {"step": 1})
    (out / "stale-file").write_text("from an older checkpoint")
    save_checkpoint(out, model, tok, optimizer, {"step": 2})
    assert not (out / "stale-file").exists()
    assert read_trainer_state(out)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary leftovers


def test_failed_write_leaves_the_previous_checkpoint_intact(tiny_model, tmp_path):
    model, optimizer = _stepped(tiny_model, steps=1)
    tok = load_tokenizer(tiny_model)
    out = tmp_path / "ck"
    save_checkpoint(out, model, tok, optimizer, {"step": 1})
    before = _listing(out)

    # A full disk, simulated: files may not grow past 20 kB (the weights are ~1 MB).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        with pytest.raises(GrpoctlError, match="cannot write checkpoint"):
            save_checkpoint(out, model, tok, optimizer, {"step": 2})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)

    assert _listing(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_unwritable_destination_is_a_one_line_error(tiny_model, tmp_path):
    model, optimizer = _stepped(tiny_model, steps=1)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(GrpoctlError, match="cannot write checkpoint"):
        save_checkpoint(blocker / "ck", model, load_tokenizer(tiny_model), optimizer, {"step": 1})
    if os.geteuid() != 0:  # root ignores directory permissions
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(GrpoctlError, match="cannot write checkpoint"):
                save_checkpoint(ro / "ck", model, load_tokenizer(tiny_model), optimizer, {"step": 1})
        finally:
            ro.chmod(0o755)


def test_trainer_state_is_plain_json(tiny_model, tmp_path):
    model, optimizer = _stepped(tiny_model, steps=1)
    state = {"step": 1, "update": {"lr": 1e-3}, "metrics": {"loss": 0.5}}
    save_checkpoint(tmp_path / "ck", model, load_tokenizer(tiny_model), optimizer, state)
    assert json.loads((tmp_path / "ck" / "trainer_state.json").read_text()) == state
    assert read_trainer_state(tmp_path / "ck") == state
    assert optimizer_tensors(optimizer, model)  # non-empty after a step


# --- byte-determinism ---------------------------------------------------------------------


def test_the_same_state_saved_twice_gives_the_same_bytes(tiny_model, tmp_path):
    """Every file, including optimizer.safetensors, whose metadata safetensors keeps in a
    hash map (its two keys came out in either order: 3 of 5 identical runs differed)."""
    model, optimizer = _stepped(tiny_model, steps=2)
    tokenizer = load_tokenizer(tiny_model)
    state = {"step": 2, "metrics": {"loss": 0.5}}
    for name in ("a", "b", "c", "d"):  # a new hash map each time: any order shows up
        save_checkpoint(tmp_path / name, model, tokenizer, optimizer, state)
    listings = [_listing(tmp_path / name) for name in ("a", "b", "c", "d")]
    assert all(listing == listings[0] for listing in listings[1:])
    header = (tmp_path / "a" / "optimizer.safetensors").read_bytes()
    size = int.from_bytes(header[:8], "little")
    meta = json.loads(header[8:8 + size])["__metadata__"]
    assert list(meta) == sorted(meta)  # written in sorted order


def test_canonical_header_keeps_every_tensor_and_the_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from grpoctl.checkpoint import canonical_safetensors_header

    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(5, dtype=torch.int64),
               "c": torch.zeros(0)}
    metas = [{"x": "1", "format": "pt", "keys": "é<>"}, {"keys": "é<>", "format": "pt", "x": "1"}]
    for i, meta in enumerate(metas):
        save_file(tensors, str(tmp_path / f"{i}.safetensors"), metadata=meta)
        canonical_safetensors_header(tmp_path / f"{i}.safetensors")
    assert (tmp_path / "0.safetensors").read_bytes() == (tmp_path / "1.safetensors").read_bytes()
    loaded = load_file(str(tmp_path / "0.safetensors"))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as f:
        assert f.metadata() == metas[0]


def test_the_tokenizer_is_saved_without_the_padding_its_last_call_left(tiny_model, tmp_path):
    """A fast tokenizer keeps the padding and truncation of its last batch call and
    save_pretrained wrote them into tokenizer.json ("padding" differed after some resumes).
    Saved from a clean state, the file is the same whatever came before; the tokenizer
    keeps its settings."""
    model, optimizer = _stepped(tiny_model, steps=1)
    clean = load_tokenizer(tiny_model)
    used = load_tokenizer(tiny_model)
    used(["a", "abcdef"], padding=True, truncation=True, max_length=4, pad_to_multiple_of=2)
    assert used.backend_tokenizer.padding is not None  # what the call left behind
    padding, truncation = used.backend_tokenizer.padding, used.backend_tokenizer.truncation
    save_checkpoint(tmp_path / "clean", model, clean, optimizer, {"step": 1})
    save_checkpoint(tmp_path / "used", model, used, optimizer, {"step": 1})
    assert _listing(tmp_path / "clean") == _listing(tmp_path / "used")
    saved = json.loads((tmp_path / "used" / "tokenizer.json").read_text())
    assert saved["padding"] is None and saved["truncation"] is None
    assert used.backend_tokenizer.padding == padding
    assert used.backend_tokenizer.truncation == truncation


def test_trainer_state_holds_no_wall_clock_times(tiny_model, tmp_path):
    """Timings depend on the machine and its load, not on the training: kept in
    metrics.jsonl, left out of the checkpoint, so that its bytes repeat."""
    model, optimizer = _stepped(tiny_model, steps=1)
    state = {"step": 1, "metrics": {"loss": 0.5, "seconds": 0.12, "rollout_s": 3.0,
                                    "elapsed_s": 9.5, "kl": 0.0,
                                    "per_optimizer_step": [{"loss": 0.4, "seconds": 0.1}]},
             "config": {"timeout": 2.0}}
    save_checkpoint(tmp_path / "ck", model, load_tokenizer(tiny_model), optimizer, state)
    saved = read_trainer_state(tmp_path / "ck")
    assert saved["metrics"] == {"loss": 0.5, "kl": 0.0, "per_optimizer_step": [{"loss": 0.4}]}
    assert saved["config"] == {"timeout": 2.0}  # only the metrics lose their timings


# --- one rule for trainer_state.json --------------------------------------------------------


@pytest.mark.parametrize("text, step", [
    ('{"step": 12}', 12),
    ('{"global_step": 40, "epoch": 1.0}', 40),       # a transformers Trainer checkpoint
    ('{"step": 3, "global_step": 40}', 3),           # grpoctl's own key first
    ('{"step": 0}', 0),
])
def test_every_command_reads_the_same_step(tiny_model, tmp_path, text, step):
    """update continues from read_trainer_state, rollout and eval record policy_step:
    one function, so the same file gives the same step everywhere."""
    import shutil

    from grpoctl.checkpoint import trainer_step
    from grpoctl.rollout import policy_step

    ck = tmp_path / "ck"
    shutil.copytree(tiny_model, ck)
    (ck / "trainer_state.json").write_text(text)
    assert read_trainer_state(ck)["step"] == trainer_step(ck) == policy_step(ck) == step


@pytest.mark.parametrize("text, fragment", [
    ('{"step": ', "cannot read trainer state"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"step": true}', "'step' must be a whole number >= 0, got true"),
    ('{"step": -1}', "'step' must be a whole number >= 0, got -1"),
    ('{"step": 2.5}', "'step' must be a whole number >= 0, got 2.5"),
    ('{"step": "3"}', "'step' must be a whole number >= 0, got \"3\""),
    ('{"epoch": 1}', "'step' must be a whole number >= 0, got nothing"),
    ('{"global_step": null}', "'global_step' must be a whole number >= 0, got null"),
    ("\xff\xfe", "cannot read trainer state"),
])
def test_a_bad_trainer_state_is_refused_the_same_way_everywhere(tiny_model, tmp_path, text,
                                                                 fragment):
    """rollout used to take a step it could not read for 0 (a policy of step 0) while
    update refused it: now both refuse it, in one line naming the file."""
    import shutil

    from grpoctl.rollout import policy_step

    ck = tmp_path / "ck"
    shutil.copytree(tiny_model, ck)
    (ck / "trainer_state.json").write_bytes(text.encode("latin-1"))
    for read in (read_trainer_state, policy_step):
        with pytest.raises(GrpoctlError) as e:
            read(ck)
        assert str(e.value).startswith(f"{ck / 'trainer_state.json'}: ")
        assert fragment in str(e.value) and "\n" not in str(e.value)
