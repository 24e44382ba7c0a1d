"""Settings (grpoctl/config.py): declared once, documented, and checked before anything
is written. Bad values go through the real CLI entry point; the run directory, output
file or checkpoint must not exist afterwards."""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest
from conftest import run_in_process

from grpoctl import config
from grpoctl.config import GROUPS, LoopConfig, UpdateSettings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_has_a_docstring_and_belongs_to_one_group():
    tree = ast.parse((ROOT / "grpoctl" / "config.py").read_text())
    undocumented = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Settings"):
            body = node.body
            for i, item in enumerate(body):
                if isinstance(item, ast.AnnAssign):
                    after = body[i + 1] if i + 1 < len(body) else None
                    if not (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                            and isinstance(after.value.value, str)):
                        undocumented.append(f"{node.name}.{item.target.id}")
    assert undocumented == []
    names = [f.name for group in GROUPS for f in dataclasses.fields(group)]
    assert len(names) == len(set(names))  # no knob in two groups
    # LoopConfig is the groups (lr and micro_batch_size with model-dependent defaults) + ref
    assert {f.name for f in dataclasses.fields(LoopConfig)} == set(names) | {"ref"}


def test_config_imports_no_torch():
    import subprocess

    code = "import sys, grpoctl.config, grpoctl.report; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_update_and_loop_share_the_update_defaults():
    from grpoctl.update import UpdateConfig

    for f in dataclasses.fields(UpdateSettings):
        assert getattr(UpdateConfig(), f.name) == f.default
        if f.name not in ("lr", "micro_batch_size"):  # model-dependent in loop
            assert getattr(LoopConfig(), f.name) == f.default


def run_main(argv: list[str], cwd: Path, monkeypatch, capfd) -> tuple[int, str]:
    code, _, err = run_in_process(argv, cwd, monkeypatch, capfd)
    return code, err.strip()


LOOP_BAD = [
    (["--loss-agg", "tokenmean"], "--loss-agg"),
    (["--estimator", "pairwize"], "--estimator"),
    (["--backend", "hff"], "--backend"),
    (["--kl-coef", "0.1"], "--kl-coef > 0 needs a reference policy (--ref)"),
    (["--beta1", "2"], "--beta1"),
    (["--adam-eps", "0"], "--adam-eps"),
    (["--clip-ratio-c", "0.5"], "--clip-ratio-c"),
    (["--clip-eps-high", "-0.1"], "--clip-eps-high"),
    (["--mini-batches", "0"], "--mini-batches"),
    (["--update-epochs", "0"], "--update-epochs"),
    (["--is-cap", "0"], "--is-cap"),
    (["--max-rollouts-per-step", "4"], "--max-rollouts-per-step 4 is less than"),
    (["--refill", "--rollouts-from", "elsewhere"], "--refill"),
    (["--vllm-sleep"], "--vllm-sleep needs --backend vllm"),
    (["--template", "no placeholder"], "--template"),
    (["--group-size", "1"], "--group-size"),
    (["--estimator", "pairwise", "-G", "4"], "--estimator pairwise needs --group-size 2"),
    (["--lora-dropout", "0.995"], "--lora-dropout"),
    (["--lora-alpha", "0"], "--lora-alpha"),
    (["--save-lora", "both"], "--save-lora"),
    (["--dtype", "float8"], "--dtype"),
    (["--top-p", "0"], "--top-p"),
    (["--eval-top-p", "0"], "--eval-top-p"),
    (["--eval-samples", "0"], "--eval-samples"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--estimator", "rloo", "--std", "none"], "--std none applies to --estimator group only"),
    (["--ref", "missing-dir"], "--ref missing-dir: not a model directory"),
    (["--old-logprobs", "both"], "--old-logprobs"),
    (["--is-cap", "2", "--old-logprobs", "sampler"], "needs --old-logprobs trainer"),
    (["--refill", "-G", "16", "--max-rollouts-per-step", "64"], "leaves no room"),
    (["--lora-r", "4", "--fsdp"], "--fsdp"),
    (["--dtype", "float16"], "--dtype float16 cannot train every parameter"),
]


@pytest.mark.parametrize("flags, fragment", LOOP_BAD, ids=[" ".join(f) for f, _ in LOOP_BAD])
def test_loop_refuses_a_bad_setting_before_writing_anything(flags, fragment, tmp_path,
                                                            monkeypatch, capfd):
    code, err = run_main(["loop", "--steps", "1", "--prompts-per-step", "4", "--run-dir", "run",
                          *flags], tmp_path, monkeypatch, capfd)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert fragment in err, err
    assert list(tmp_path.iterdir()) == []  # no run directory, nothing else


UPDATE_BAD = [(flags, fragment) for flags, fragment in LOOP_BAD
              if flags[0] in ("--loss-agg", "--beta1", "--adam-eps", "--clip-ratio-c",
                              "--clip-eps-high", "--mini-batches", "--update-epochs", "--is-cap",
                              "--lr", "--weight-decay", "--kl-coef", "--lora-dropout",
                              "--lora-alpha", "--save-lora", "--dtype", "--old-logprobs")
              and flags[:2] != ["--dtype", "float16"]]


@pytest.mark.parametrize("flags, fragment", UPDATE_BAD, ids=[" ".join(f) for f, _ in UPDATE_BAD])
def test_update_refuses_a_bad_setting_before_writing_anything(flags, fragment, tmp_path,
                                                              monkeypatch, capfd):
    records = tmp_path / "adv.jsonl"
    records.write_text('{"prompt_id": "a", "sample": 0, "prompt_ids": [1], '
                       '"completion_ids": [2], "logprobs": [-1.0], "advantage": 1.0}\n')
    before = sorted(tmp_path.iterdir())
    code, err = run_main(["update", str(records), "--policy", "default", "-o", "out", *flags],
                         tmp_path, monkeypatch, capfd)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    fragment = "--kl-coef > 0 needs a reference policy (--ref)" if flags[0] == "--kl-coef" \
        else fragment
    assert fragment in err, err
    assert sorted(tmp_path.iterdir()) == before


def test_group_checks_name_the_flag():
    with pytest.raises(config.GrpoctlError, match="--workers"):
        config.ScoreSettings(score_workers=-1).check()
    with pytest.raises(config.GrpoctlError, match="--timeout"):
        config.ScoreSettings(score_timeout=0).check()
    with pytest.raises(config.GrpoctlError, match="--gpu-memory-utilization"):
        config.VllmSettings(gpu_memory_utilization=float("nan")).check()
    LoopConfig().resolved()  # the defaults pass


CROSS_RULES = [
    ["loop", "--estimator", "rloo", "--std", "none"],  # advantages.py's rule, at step 1 before
    ["loop", "--ref", "missing-dir", "--kl-coef", "0"],  # was ignored; `update` refuses it
    ["update", "adv.jsonl", "--ref", "missing-dir", "-o", "out"],
    ["loop", "--is-cap", "2", "--old-logprobs", "sampler"],
]


@pytest.mark.parametrize("argv", CROSS_RULES, ids=[" ".join(a) for a in CROSS_RULES])
def test_cross_flag_rules_are_refused_before_anything_is_written(argv, tmp_path):
    """A real subprocess: exit 2, one line, no run directory (nor anything else) written."""
    from conftest import run_cli

    (tmp_path / "adv.jsonl").write_text('{"prompt_id": "a", "sample": 0, "prompt_ids": [1], '
                                        '"completion_ids": [2], "logprobs": [-1.0], '
                                        '"advantage": 1.0}\n')
    before = sorted(tmp_path.iterdir())
    extra = ["--steps", "1", "--run-dir", "run", "--eval-prompts", "none"] \
        if argv[0] == "loop" else []
    result = run_cli(*argv, *extra, cwd=tmp_path)
    err = result.stderr.decode().strip()
    assert result.returncode == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert sorted(tmp_path.iterdir()) == before


def test_old_logprobs_default_follows_the_sampler_and_the_optimizer_steps():
    auto = config.default_old_logprobs
    base = config.UpdateSettings()
    assert auto(base) == "sampler"  # hf, float32, one step: they agree to ~1e-6
    assert auto(base, "vllm") == "trainer"
    assert auto(base, "hf", ("bfloat16",)) == "trainer"
    assert auto(base, "hf", ("float32", "bfloat16")) == "trainer"  # a bf16 vLLM engine
    assert auto(config.UpdateSettings(mini_batches=2)) == "trainer"
    assert auto(config.UpdateSettings(update_epochs=2)) == "trainer"
    assert auto(config.UpdateSettings(is_cap=2.0)) == "trainer"
    assert auto(config.UpdateSettings(old_logprobs="sampler"), "vllm") == "sampler"
    assert config.LoopConfig().resolved().old_logprobs == "sampler"
    assert config.LoopConfig(dtype="bfloat16").resolved().old_logprobs == "trainer"


def test_field_docstrings_are_read_as_python_reads_them():
    """flags.docstrings reads config.py with regular expressions (fast start-up); the same
    {(class, field): docstring} as parsing it, so no option loses its help."""
    from grpoctl import flags

    tree = ast.parse(Path(config.__file__).read_text(encoding="utf-8"))
    parsed = {(node.name, item.target.id): " ".join(after.value.value.split())
              for node in tree.body if isinstance(node, ast.ClassDef)
              for item, after in zip(node.body, node.body[1:])
              if isinstance(item, ast.AnnAssign) and isinstance(after, ast.Expr)
              and isinstance(after.value, ast.Constant)}
    assert flags.docstrings() == parsed
