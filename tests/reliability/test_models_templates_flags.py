"""Bad models, chat templates, prompt files and flag values: one line, exit 2, nothing written.

- A model whose weights hold NaN or infinity (models.check_finite_weights): `rollout`,
  `eval`, `update` and `loop` stop in one line naming the model directory and the first
  bad tensor, before sampling: not a traceback from the sampler, not garbage output.
- A chat template that raises (jinja's raise_exception, as some templates do for a
  system message), that the sandbox blocks, that is not valid jinja or that fails in
  any other way (prompts.render_prompt): one line naming the model directory and the
  template's message, before anything is written.
- Prompt files: a parquet file that `datasets` cannot read gives exactly one line (its
  own "Failed to read schema" log line used to come first); a CSV written with a UTF-8
  byte-order mark (Excel) has its first column named without it.
- NaN and infinite flag values: every float option of every command that `rollout`,
  `score`, `advantage` and `eval` refuse before any work (the flags of `update` and
  `loop` are tested in test_bad_input.py).

Rows run through the CLI's entry point in this process, as test_bad_input.py does; a
few run as real `python -m grpoctl` processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_in_process

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PROMPTS = [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "What is 3 + 4?", "answer": "7"}]


def write_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


def run_here(argv: list[str], cwd: Path, monkeypatch, capfd) -> tuple[int, str, str]:
    """`grpoctl ARGV` in this process: (status, stdout, stderr)."""
    return run_in_process(argv, cwd, monkeypatch, capfd)


def assert_one_line(code, out: str, err: str, *fragments: str) -> str:
    err = err.strip()
    assert code == 2, err[-2000:]
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err[-2000:]
    assert "Traceback" not in err and out == ""
    for fragment in fragments:
        assert fragment in err, err
    return err


# --- models with NaN or infinite weights ------------------------------------------------------


def damaged_copy(tiny_model: Path, root: Path, name: str, tensor: str, value: float) -> Path:
    """A copy of tiny_model with one value of one weight set to `value`."""
    from safetensors.torch import load_file, save_file

    target = root / name
    shutil.copytree(tiny_model, target)
    weights = load_file(str(target / "model.safetensors"))
    weights[tensor] = weights[tensor].clone()
    weights[tensor].view(-1)[3] = value
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def bad_models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-models")
    return {"nan": damaged_copy(tiny_model, root, "nan", "model.layers.1.mlp.down_proj.weight",
                                float("nan")),
            "inf": damaged_copy(tiny_model, root, "inf", "model.norm.weight", float("-inf"))}


NAN_ROWS = [
    ("rollout", ["rollout", "-m", "{model}", "--prompts", "{prompts}", "-G", "1",
                 "--max-new-tokens", "2", "-o", "{dir}/out.jsonl"]),
    ("eval", ["eval", "-m", "{model}", "--prompts", "{prompts}", "-k", "1",
              "--max-new-tokens", "2", "--save", "{dir}/out.jsonl"]),
    ("loop", ["loop", "--model", "{model}", "--prompts", "{prompts}", "--eval-prompts", "none",
              "-G", "2", "--prompts-per-step", "2", "--steps", "1", "--max-new-tokens", "2",
              "--run-dir", "{dir}/run", "-q"]),
]


@pytest.mark.parametrize("kind, tensor, what", [
    ("nan", "model.layers.1.mlp.down_proj.weight", "NaN"),
    ("inf", "model.norm.weight", "infinity"),
])
@pytest.mark.parametrize("command, argv", NAN_ROWS, ids=[r[0] for r in NAN_ROWS])
def test_non_finite_weights_are_one_line_before_sampling(command, argv, kind, tensor, what,
                                                         bad_models, tmp_path, monkeypatch,
                                                         capfd):
    model = bad_models[kind]
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    argv = [a.replace("{model}", str(model)).replace("{prompts}", str(prompts))
            .replace("{dir}", str(tmp_path)) for a in argv]
    code, out, err = run_here(argv, tmp_path, monkeypatch, capfd)
    assert_one_line(code, out, err, f"{model}: weight '{tensor}' holds {what} (1 of ")
    assert not (tmp_path / "out.jsonl").exists()
    if command == "loop":  # no step was started, no checkpoint written
        assert not list((tmp_path / "run").glob("step-*"))
        assert not (tmp_path / "run" / "checkpoints").exists() or \
            not any((tmp_path / "run" / "checkpoints").iterdir())


def test_non_finite_weights_in_update_and_a_real_process(bad_models, tmp_path):
    """`update` (the policy) as a real process, as a user runs it; the weights are left as
    they were."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_bad_input import ADVANTAGES, lines

    model = bad_models["nan"]
    before = (model / "model.safetensors").read_bytes()
    (tmp_path / "adv.jsonl").write_bytes(lines(ADVANTAGES))
    proc = subprocess.run([sys.executable, "-m", "grpoctl", "update", str(tmp_path / "adv.jsonl"),
                           "--policy", str(model), "-o", str(tmp_path / "ck")],
                          capture_output=True, env=ENV, timeout=300)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err[-2000:]
    assert err.startswith(f"error: {model}: weight 'model.layers.1.mlp.down_proj.weight' "
                          f"holds NaN")
    assert not (tmp_path / "ck").exists() and proc.stdout == b""
    assert (model / "model.safetensors").read_bytes() == before


def test_finite_weights_and_an_infinite_mask_buffer_pass(tiny_model):
    """Buffers may hold infinity (an attention mask does); NaN in a buffer is refused."""
    import torch

    from grpoctl.errors import GrpoctlError
    from grpoctl.models import check_finite_weights, load_policy

    model = load_policy(tiny_model)
    check_finite_weights(tiny_model, model)
    model.register_buffer("causal_mask", torch.full((2, 2), float("-inf")))
    check_finite_weights(tiny_model, model)
    model.register_buffer("causal_mask", torch.tensor([0.0, float("nan")]))
    with pytest.raises(GrpoctlError, match="weight 'causal_mask' holds NaN"):
        check_finite_weights(tiny_model, model)


# --- chat templates that fail --------------------------------------------------------------

TEMPLATES = {
    # Gemma's and Mistral's templates raise like this for a role they do not support.
    "raises-on-system": ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}",
                         "the chat template failed: System role not supported (with a system "
                         "message; it renders without one: put the instruction in --template "
                         "instead of --system)"),
    "sandbox": ("{{ messages.__class__.__mro__ }}{% for m in messages %}{{ m['content'] }}"
                "{% endfor %}",
                "the chat template failed: the sandbox blocked it: access to attribute "
                "'__class__' of 'list' object is unsafe"),
    "not-jinja": ("{% for m in messages %}{{ m['content'] }",
                  "the chat template failed: it is not valid jinja: "),
    "huge-range": ("{% for i in range(10**9) %}x{% endfor %}",
                   "the chat template failed: OverflowError: Range too big"),
    "type-error": ("{{ messages[0]['content'] + 1 }}",
                   "the chat template failed: TypeError: "),
}


@pytest.fixture(scope="module")
def template_models(tmp_path_factory) -> dict[str, Path]:
    from grpoctl.models import make_tiny_model

    root = tmp_path_factory.mktemp("templates")
    return {name: make_tiny_model(root / name, chat_template=template)
            for name, (template, _) in TEMPLATES.items()}


TEMPLATE_ROWS = [
    ("rollout", ["rollout", "-m", "{model}", "--prompts", "{prompts}", "-G", "1",
                 "--max-new-tokens", "2", "--system", "Be brief.", "-o", "{dir}/out.jsonl"]),
    ("eval", ["eval", "-m", "{model}", "--prompts", "{prompts}", "-k", "1", "--max-new-tokens",
              "2", "--system", "Be brief.", "--save", "{dir}/out.jsonl"]),
]


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("command, argv", TEMPLATE_ROWS, ids=[r[0] for r in TEMPLATE_ROWS])
def test_a_failing_chat_template_is_one_line_naming_the_model(command, argv, template,
                                                              template_models, tmp_path,
                                                              monkeypatch, capfd):
    model = template_models[template]
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    argv = [a.replace("{model}", str(model)).replace("{prompts}", str(prompts))
            .replace("{dir}", str(tmp_path)) for a in argv]
    code, out, err = run_here(argv, tmp_path, monkeypatch, capfd)
    assert_one_line(code, out, err, f"error: {model}: {TEMPLATES[template][1]}")
    assert sorted(os.listdir(tmp_path)) == ["prompts.jsonl"]  # nothing written


def test_a_template_refusing_system_works_without_it(template_models, tmp_path, monkeypatch,
                                                    capfd):
    """The same model without --system samples normally."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    code, out, err = run_here(["rollout", "-m", str(template_models["raises-on-system"]),
                               "--prompts", str(prompts), "-G", "1", "--max-new-tokens", "2",
                               "-q"], tmp_path, monkeypatch, capfd)
    assert code == 0, err[-2000:]
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == [f"<user>{p['prompt']}<assistant>" for p in PROMPTS]


def test_a_failing_template_in_loop_is_one_line(template_models, tmp_path, monkeypatch, capfd):
    """loop: the same one line, and nothing written: it renders every prompt once before
    config.json, and removes the run directory it made."""
    model = template_models["sandbox"]
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    code, out, err = run_here(["loop", "--model", str(model), "--prompts", str(prompts),
                               "--eval-prompts", "none", "-G", "2", "--prompts-per-step", "2",
                               "--steps", "1", "--max-new-tokens", "2", "--run-dir",
                               str(tmp_path / "run"), "-q"], tmp_path, monkeypatch, capfd)
    assert_one_line(code, out, err, f"{model}: {TEMPLATES['sandbox'][1]}")
    assert not (tmp_path / "run").exists()


# --- prompt files ------------------------------------------------------------------------------


def parquet_files(root: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = root / "good.parquet"
    pq.write_table(pa.table({"prompt": [p["prompt"] for p in PROMPTS] * 20,
                             "answer": [p["answer"] for p in PROMPTS] * 20}), good)
    data = good.read_bytes()
    files = {"garbage": b"PAR1 not a parquet file at all PAR1", "empty": b"",
             "truncated": data[: len(data) // 2], "no-footer": data[:-8],
             "random": bytes(range(256)) * 4}
    out = {}
    for name, content in files.items():
        out[name] = root / f"{name}.parquet"
        out[name].write_bytes(content)
    return out


def test_a_bad_parquet_file_is_exactly_one_line(tmp_path, monkeypatch, capfd):
    """`datasets` logs "Failed to read schema ..." at ERROR level before raising; nothing of
    it may reach stderr besides grpoctl's one line (in-process and as a real process)."""
    files = parquet_files(tmp_path)
    for name, path in files.items():
        code, out, err = run_here(["rollout", "--prompts", str(path), "-o",
                                   str(tmp_path / "out.jsonl")], tmp_path, monkeypatch, capfd)
        assert_one_line(code, out, err, f"error: {path}: cannot read parquet: ")
        assert "Failed to read schema" not in err
    proc = subprocess.run([sys.executable, "-m", "grpoctl", "rollout", "--prompts",
                           str(files["truncated"])], capture_output=True, env=ENV, timeout=300)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_good_parquet_file_still_reads_and_datasets_is_left_as_it_was(tmp_path):
    import datasets

    from grpoctl.prompts import load_prompts

    parquet_files(tmp_path)
    verbosity = datasets.logging.get_verbosity()
    prompts = load_prompts(str(tmp_path / "good.parquet"))
    assert [p["text"] for p in prompts[:2]] == [p["prompt"] for p in PROMPTS]
    assert [p["answer"] for p in prompts[:2]] == ["4", "7"]
    assert datasets.logging.get_verbosity() == verbosity


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_csv_with_a_byte_order_mark(tmp_path, newline):
    """Excel writes UTF-8 CSV with a BOM: the first column is `prompt`, not `\\ufeffprompt`
    (which used to give "no prompt field ... (columns: \\ufeffprompt, answer)")."""
    from grpoctl.prompts import load_prompts

    path = tmp_path / "p.csv"
    text = newline.join(["prompt,answer", '"What is 2 + 2?",4', "What is 3 + 4?,7", ""])
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    prompts = load_prompts(str(path))
    assert [(p["text"], p["answer"], p["meta"]) for p in prompts] == \
        [("What is 2 + 2?", "4", {}), ("What is 3 + 4?", "7", {})]
    # the BOM named as a column: it is found under its plain name too
    path.write_bytes(b"\xef\xbb\xbf" + "question,solution\nWhy?,because\n".encode("utf-8"))
    assert load_prompts(str(path), answer_field="solution")[0]["answer"] == "because"


# --- NaN and infinite flag values -------------------------------------------------------------


def float_options() -> list[tuple[str, str]]:
    """(command, --option) for every float option of every command, read from the CLI."""
    import typer.main

    from grpoctl.cli import app

    root = typer.main.get_command(app)
    found = []
    for name, command in sorted(root.commands.items()):
        for param in command.params:  # (by name: typer may bring its own copy of click)
            if type(param).__name__ == "TyperOption" or hasattr(param, "opts"):
                if type(param.type).__name__ in ("FloatParamType", "FloatRange"):
                    found.append((name, param.opts[0]))
    return found


def flag_argv(command: str, tmp_path: Path) -> list[str]:
    """A command line of `command` that would run (on tiny inputs) if its flags were good."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_bad_input import ADVANTAGES, ROLLOUTS, SCORED, lines

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    for name, rows in (("roll.jsonl", ROLLOUTS), ("scored.jsonl", SCORED),
                       ("adv.jsonl", ADVANTAGES)):
        (tmp_path / name).write_bytes(lines(rows))
    return {"rollout": ["rollout", "--prompts", str(prompts), "-G", "1", "--max-new-tokens", "2",
                        "-o", "out.jsonl"],
            "score": ["score", "roll.jsonl", "-o", "out.jsonl"],
            "advantage": ["advantage", "scored.jsonl", "-o", "out.jsonl"],
            "eval": ["eval", "-m", "default", "--prompts", str(prompts), "-k", "1",
                     "--max-new-tokens", "2",
                     "--save", "out.jsonl"],
            "update": ["update", "adv.jsonl", "--policy", "default", "-o", "out"],
            "loop": ["loop", "--prompts", str(prompts), "--eval-prompts", "none", "-G", "2",
                     "--prompts-per-step", "2", "--steps", "1", "--max-new-tokens", "2",
                     "--run-dir", "out", "-q"]}[command]


# What is not refused yet, and the values that pass. click's FloatRange lets NaN through
# (every comparison with NaN is false) and these flags have no check of their own;
# --lora-alpha is checked only with --lora-r > 0. The fixes belong in cli.py (a float
# type that refuses NaN/inf) and UpdateConfig.check: see tests/reliability/README.md.
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_flag_value_is_a_flag_error(value, tmp_path, monkeypatch, capfd):
    """Every float option of every command (read from the CLI, so a new one is covered):
    NaN and infinity are refused in one line naming the flag, before any work, never
    blamed on a record or an output file. (--timeout inf and --epochs inf would mean "no
    limit" and "for ever": refused too, a finite number says the same.)"""
    options = float_options()
    assert {c for c, _ in options} >= {"rollout", "score", "advantage", "eval", "update", "loop"}
    failures = []
    for command, option in options:
        workdir = tmp_path / f"{command}{option}"
        workdir.mkdir()
        argv = [*flag_argv(command, workdir), option, value]
        code, out, err = run_here(argv, workdir, monkeypatch, capfd)
        err = err.strip()
        ok = (code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
              and option in err and "out.jsonl" not in err and "record" not in err
              and out == "" and not (workdir / "out.jsonl").exists()
              and not (workdir / "out").exists())
        if not ok:
            failures.append(f"{command} {option} {value}: exit {code}: {err[:200]}")
    assert failures == []


@pytest.mark.parametrize("kind, tensor, what", [
    ("nan", "model.layers.1.mlp.down_proj.weight", "NaN"),
    ("inf", "model.norm.weight", "infinity"),
])
def test_non_finite_weights_in_the_files_an_engine_loads_itself(kind, tensor, what, bad_models,
                                                                tiny_model):
    """models.check_finite_files: what `rollout --backend vllm` checks before its engine
    starts (vLLM reads the safetensors files itself, not through load_policy)."""
    from grpoctl.errors import GrpoctlError
    from grpoctl.models import check_finite_files

    with pytest.raises(GrpoctlError) as error:
        check_finite_files(bad_models[kind])
    assert str(error.value).startswith(f"{bad_models[kind]}: weight '{tensor}' holds {what} (1 of ")
    check_finite_files(tiny_model)  # a sound model passes
