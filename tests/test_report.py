"""`report`: run directories written by hand (known numbers) -> table, PNGs, errors; and the
live display's log lines (grpoctl/display.py)."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from grpoctl.errors import GrpoctlError
from grpoctl.report import (final_figures, group_curve, group_runs, load_run, markdown_table,
                            mean_std, moving_average, table_rows, write_report)

ROOT = Path(__file__).resolve().parent.parent


def make_run(path: Path, config: dict, metrics: list[dict], evals: list[dict] | None) -> str:
    """A run directory as `grpoctl loop` writes it (config.json, metrics.jsonl, eval.jsonl)."""
    path.mkdir(parents=True)
    full = {"model": "default", "group_size": 2, "prompts_per_step": 64, "steps": len(metrics),
            "lr": 3e-4, "estimator": "group", "seed": 0, "eval_samples": 4,
            "run_dir": str(path), **config}
    (path / "config.json").write_text(json.dumps(full, indent=2))
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if evals is not None:
        (path / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    return str(path)


def simple_run(path: Path, group_size: int, prompts: int, seed: int, steps: int,
               seconds_per_step: float, final_mean: float, final_pass: float,
               start_mean: float = 0.2, start_pass: float = 0.4, **config) -> str:
    """`steps` steps of prompts x G rollouts each, evaluated at step 0 and at the end."""
    per_step = group_size * prompts
    metrics = [{"step": s, "reward_mean": 0.1 * s, "zero_adv_frac": 0.5, "rollouts": s * per_step,
                "elapsed_s": s * seconds_per_step, "step_s": seconds_per_step}
               for s in range(1, steps + 1)]
    evals = [{"step": 0, "mean_at_k": start_mean, "pass_at_k": start_pass, "k": 4, "prompts": 10,
              "rollouts": 0, "elapsed_s": 0.0},
             {"step": steps, "mean_at_k": final_mean, "pass_at_k": final_pass, "k": 4,
              "prompts": 10, "rollouts": steps * per_step, "elapsed_s": steps * seconds_per_step}]
    return make_run(path, {"group_size": group_size, "prompts_per_step": prompts, "seed": seed,
                           **config}, metrics, evals)


@pytest.fixture
def paper_like(tmp_path) -> dict:
    """16-GRPO (2 seeds) and 2-GRPO (3 seeds), 10 steps each, numbers chosen by hand."""
    runs = {
        "g16-s0": simple_run(tmp_path / "g16-s0", 16, 32, 0, 10, 50.0, 0.70, 0.90),
        "g16-s1": simple_run(tmp_path / "g16-s1", 16, 32, 1, 10, 60.0, 0.74, 0.94),
        "g2-s0": simple_run(tmp_path / "g2-s0", 2, 64, 0, 10, 10.0, 0.60, 0.80, lr=8e-6),
        "g2-s1": simple_run(tmp_path / "g2-s1", 2, 64, 1, 10, 11.0, 0.70, 0.85, lr=8e-6),
        "g2-s2": simple_run(tmp_path / "g2-s2", 2, 64, 2, 10, 12.0, 0.80, 0.90, lr=8e-6),
    }
    return runs


# --- reading ------------------------------------------------------------------------


def test_load_run_sorts_keeps_last_of_a_step_and_skips_a_cut_short_last_line(tmp_path):
    run = make_run(tmp_path / "r", {}, [], None)
    lines = ['{"step": 2, "reward_mean": 0.5, "rollouts": 256}',
             '{"step": 1, "rollouts": 128}',  # a skipped update: fewer keys, still fine
             '{"step": 2, "reward_mean": 0.25, "rollouts": 256}',  # repeated step: last wins
             '{"step": 3, "rew']  # a crash cut the final write short (no newline)
    (Path(run) / "metrics.jsonl").write_text("\n".join(lines))
    loaded = load_run(run)
    assert [m["step"] for m in loaded["metrics"]] == [1, 2]
    assert loaded["metrics"][1]["reward_mean"] == 0.25
    assert loaded["evals"] == []
    assert loaded["config"]["group_size"] == 2


def test_metrics_lines_are_read_by_the_record_files_jsonl_reader(tmp_path):
    # records.iter_jsonl: only a last line with no newline after it (a cut-short append)
    # is skipped; the same text with a newline after it, or a last line that is JSON
    # but not an object, is an error naming file:line.
    from grpoctl.records import iter_jsonl

    text = '{"step": 1}\n\n{"step": 2}\n{"step": 3, "rew'
    assert [n for n, _ in iter_jsonl(text, "m.jsonl", damaged="last")] == [1, 3]
    with pytest.raises(GrpoctlError, match=r"^m\.jsonl:4: invalid JSON"):
        list(iter_jsonl(text + "\n", "m.jsonl", damaged="last"))
    with pytest.raises(GrpoctlError, match=r"^m\.jsonl:2: expected a JSON object, got a list"):
        list(iter_jsonl('{"step": 1}\n[2]', "m.jsonl", damaged="last"))
    assert [n for n, _ in iter_jsonl('{"step": 1}\n{bad\n[2]\n{"step": 4}\n', "e.jsonl",
                                     damaged="skip")] == [1, 4]
    run = make_run(tmp_path / "r", {}, [{"step": 1}], None)
    (Path(run) / "metrics.jsonl").write_text('{"step": 1}\n"step 2"\n')
    with pytest.raises(GrpoctlError, match=r"metrics\.jsonl:2: expected a JSON object"):
        load_run(run)


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "not a run directory (no such directory)"),
    (lambda d: d.mkdir(), "config.json: missing"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{oops")), "config.json: not valid JSON"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), "metrics.jsonl: missing"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}"),
                (d / "metrics.jsonl").write_text("\n")), "metrics.jsonl: empty"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}"),
                (d / "metrics.jsonl").write_text('{"step": 1}\n{bad\n{"step": 3}\n')),
     "metrics.jsonl:2: invalid JSON"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}"),
                (d / "metrics.jsonl").write_text('{"step": 1, "elapsed_s": "10s"}\n')),
     "metrics.jsonl:1: field 'elapsed_s': expected a number"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}"),
                (d / "metrics.jsonl").write_text('{"reward_mean": 1}\n')),
     "metrics.jsonl:1: field 'step': missing"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}"),
                (d / "metrics.jsonl").write_text('{"step": true}\n')),
     "metrics.jsonl:1: field 'step': expected an integer >= 0"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}"),
                (d / "metrics.jsonl").write_text('{"step": 1, "rollouts": 1' + "0" * 400 + '}\n')),
     "metrics.jsonl:1: field 'rollouts': expected a number"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"group_size": "two"}'),
                (d / "metrics.jsonl").write_text('{"step": 1}\n')),
     "config.json: field 'group_size': expected int, got 'two'"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}"),
                (d / "metrics.jsonl").write_text('{"step": 1}\n'),
                (d / "eval.jsonl").write_text('{"step": 0, "mean_at_k": 0.5, "k": 4}\n')),
     "eval.jsonl:1: field 'pass_at_k': missing"),
])
def test_bad_run_directories_name_the_file(tmp_path, setup, message):
    d = tmp_path / "run"
    setup(d)
    with pytest.raises(GrpoctlError) as e:
        write_report([str(d)], str(tmp_path / "out"))
    assert message in str(e.value)
    assert str(d) in str(e.value)
    assert "\n" not in str(e.value)


def test_final_figures_of_one_run(tmp_path):
    run = load_run(simple_run(tmp_path / "r", 2, 64, 0, 10, 12.5, 0.6, 0.8, start_mean=0.25))
    assert final_figures(run) == {
        "steps": 10, "rollouts": 10 * 2 * 64, "seconds": 125.0, "k": 4, "final_eval_step": 10,
        "mean_at_k_initial": 0.25, "pass_at_k_initial": 0.4,
        "mean_at_k_final": 0.6, "pass_at_k_final": 0.8, "hack_rate": None}


def test_hack_rate_is_the_worst_step(tmp_path):
    metrics = [{"step": 1, "rollouts": 4, "elapsed_s": 1.0, "hack_rate": 0.0},
               {"step": 2, "rollouts": 8, "elapsed_s": 2.0, "hack_rate": 0.25},
               {"step": 3, "rollouts": 12, "elapsed_s": 3.0, "hack_rate": 0.125}]
    run = load_run(make_run(tmp_path / "r", {}, metrics, evals=None))
    assert final_figures(run)["hack_rate"] == 0.25
    cells = markdown_table(table_rows(group_runs([run]), 0)).splitlines()[2].split(" | ")
    assert cells[-1] == "25.0 |"


# --- grouping, labels and the table ------------------------------------------------------


def test_mean_std_is_the_sample_std_across_seeds():
    # 0.6, 0.7, 0.8: mean 0.7; deviations -0.1, 0, 0.1; sum of squares 0.02 / (3 - 1) = 0.01
    s = mean_std([0.6, 0.7, 0.8])
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.1) and s["n"] == 3
    assert mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    assert mean_std([None, 2.0, 4.0])["mean"] == 3.0  # a run without the figure is left out
    assert mean_std([None]) is None


def test_seeds_of_one_setting_form_one_labelled_group(paper_like):
    runs = [load_run(paper_like[name]) for name in ("g16-s0", "g2-s0", "g16-s1", "g2-s1")]
    groups = group_runs(runs)
    assert [g["seeds"] for g in groups] == [[0, 1], [0, 1]]
    # group size, prompts/step, then what else differs (lr), then the seeds
    assert [g["label"] for g in groups] == ["G=16, 32 prompts/step, lr 0.0003, seeds 0, 1",
                                            "G=2, 64 prompts/step, lr 8e-06, seeds 0, 1"]
    # one run: "seed 0"; nothing but G and prompts differ: nothing else named
    single = group_runs([load_run(paper_like["g16-s0"])])
    assert single[0]["label"] == "G=16, 32 prompts/step, seed 0"
    # --label replaces the automatic label; runs with different labels stay apart
    labelled = group_runs(runs, ["16-GRPO", "2-GRPO", "16-GRPO", "2-GRPO b"])
    assert [(g["label"], g["seeds"]) for g in labelled] == [("16-GRPO", [0, 1]), ("2-GRPO", [0]),
                                                            ("2-GRPO b", [1])]
    with pytest.raises(GrpoctlError, match="--label given 1 times for 4 runs"):
        group_runs(runs, ["one"])


def test_a_setting_missing_from_an_older_config_counts_as_its_default(tmp_path):
    # An older grpoctl wrote no warmup_steps; its run used the default (0), so it groups
    # with a newer run that wrote 0, and neither label mentions the setting.
    old = simple_run(tmp_path / "old", 2, 64, 0, 3, 1.0, 0.5, 0.6)
    new = simple_run(tmp_path / "new", 2, 64, 1, 3, 1.0, 0.5, 0.6, warmup_steps=0)
    other = simple_run(tmp_path / "other", 2, 64, 0, 3, 1.0, 0.5, 0.6, warmup_steps=10)
    assert "warmup_steps" not in json.loads((tmp_path / "old" / "config.json").read_text())
    groups = group_runs([load_run(p) for p in (old, new, other)])
    assert [(g["label"], g["seeds"]) for g in groups] == [
        ("G=2, 64 prompts/step, warmup-steps 0, seeds 0, 1", [0, 1]),
        ("G=2, 64 prompts/step, warmup-steps 10, seed 0", [0])]


def test_table_numbers_by_hand(paper_like):
    result = write_report(list(paper_like.values()), str(Path(paper_like["g2-s0"]).parent / "out"))
    g16, g2 = result["rows"]
    assert g16["baseline"] and not g2["baseline"]  # default baseline: the largest group size
    # 16-GRPO: 10 steps x 32 prompts x 16 = 5120 rollouts; seconds 500 and 600
    assert g16["rollouts"] == {"mean": 5120, "std": 0.0, "n": 2}
    assert g16["seconds"]["mean"] == 550.0
    assert g16["seconds"]["std"] == pytest.approx(math.sqrt((50**2 + 50**2) / 1))  # 70.71
    assert g16["mean_at_k_final"]["mean"] == pytest.approx(0.72)
    # 2-GRPO: 10 x 64 x 2 = 1280 rollouts; seconds 100, 110, 120; Mean@4 0.6, 0.7, 0.8
    assert g2["rollouts"]["mean"] == 1280
    assert g2["seconds"]["mean"] == pytest.approx(110.0)
    assert g2["seconds"]["std"] == pytest.approx(10.0)
    assert g2["mean_at_k_final"]["mean"] == pytest.approx(0.7)
    assert g2["mean_at_k_final"]["std"] == pytest.approx(0.1)
    assert g2["pass_at_k_final"]["mean"] == pytest.approx(0.85)
    assert g2["pass_at_k_final"]["std"] == pytest.approx(0.05)
    # ratios of the means to the baseline
    assert g2["rollouts_ratio"] == pytest.approx(1280 / 5120)  # 0.25
    assert g2["seconds_ratio"] == pytest.approx(110 / 550)  # 0.2
    assert g2["mean_at_k_ratio"] == pytest.approx(0.70 / 0.72)  # 0.9722
    assert g16["rollouts_ratio"] == g16["seconds_ratio"] == 1.0

    text = Path(result["report"]).read_text()
    table = [line for line in text.splitlines() if line.startswith("| G=")]
    assert table[0].split(" | ")[1:] == [
        "0, 1", "10", "5,120", "1×", "550 ± 71", "1×", "20.0", "72.0 ± 2.8", "1×", "40.0",
        "92.0 ± 2.8", "— |"]
    assert table[1].split(" | ")[1:] == [
        "0, 1, 2", "10", "1,280", "0.25×", "110 ± 10", "0.2×", "20.0", "70.0 ± 10.0", "0.972×",
        "40.0", "85.0 ± 5.0", "— |"]
    assert "| run | seeds | steps | rollouts | rollouts vs baseline | train seconds" in text
    assert "Mean@4 final (%)" in text and "**(baseline)**" in table[0]


def test_baseline_option(paper_like, tmp_path):
    dirs = [paper_like["g16-s0"], paper_like["g2-s0"], paper_like["g2-s1"]]
    rows = write_report(dirs, str(tmp_path / "out"), baseline=paper_like["g2-s1"])["rows"]
    g16, g2 = rows
    assert g2["baseline"] and g2["rollouts_ratio"] == 1.0
    # 16-GRPO over 2-GRPO: 5120 / 1280 rollouts, 500 / mean(100, 110) seconds
    assert g16["rollouts_ratio"] == pytest.approx(4.0)
    assert g16["seconds_ratio"] == pytest.approx(500 / 105)
    with pytest.raises(GrpoctlError, match="--baseline .*: not one of the run directories"):
        write_report(dirs[:2], str(tmp_path / "out"), baseline=paper_like["g2-s2"])
    with pytest.raises(GrpoctlError, match="given twice"):
        write_report([dirs[0], dirs[0] + "/"], str(tmp_path / "out"))


def test_report_names_the_runs_relative_to_its_directory(paper_like, tmp_path, monkeypatch):
    from grpoctl import report

    monkeypatch.setattr(report, "_matplotlib_missing", lambda: "no plots")
    # Absolute run paths, the output directory beside them.
    text = Path(write_report(list(paper_like.values()), str(tmp_path / "out"))["report"]).read_text()
    runs = text.split("## Runs")[1]
    assert "`../g16-s0`, `../g16-s1`" in runs and "`../g2-s0`, `../g2-s1`, `../g2-s2`" in runs
    assert str(tmp_path) not in text
    # Relative run paths from another directory, the output two levels down.
    monkeypatch.chdir(tmp_path)
    result = write_report(["g16-s0", "./g2-s0/"], "reports/today")
    text = (tmp_path / "reports" / "today" / "report.md").read_text()
    assert "`../../g16-s0`" in text and "`../../g2-s0`" in text and str(tmp_path) not in text
    assert result["rows"][0]["runs"] == ["g16-s0"]  # the API keeps the paths as given


def test_the_live_display_prints_plain_lines_without_a_source_column():
    import io

    from rich.console import Console

    from grpoctl.display import RichDisplay

    console = Console(file=io.StringIO(), width=100, record=True, force_terminal=True)
    display = RichDisplay(console=console)
    display.log("run directory: runs/[g2]")
    display.eval_done({"step": 3, "k": 4, "mean_at_k": 0.5, "pass_at_k": 0.75, "prompts": 2})
    lines = console.export_text().splitlines()
    assert len(lines) == 2, lines
    assert all("display.py" not in line and line == line.rstrip() for line in lines), lines
    # "HH:MM:SS message": the time, then the message as given (no markup read in it)
    assert lines[0][:9].replace(":", "").strip().isdigit() and lines[0][8] == " "
    assert lines[0][9:] == "run directory: runs/[g2]"
    assert lines[1][9:] == "eval step 3: mean@4 0.500  pass@4 0.750  (2 prompts)"


def test_runs_without_evaluations_show_dashes(tmp_path):
    metrics = [{"step": 1, "reward_mean": 0.5, "rollouts": 4, "elapsed_s": 2.5}]
    run = make_run(tmp_path / "r", {}, metrics, evals=None)
    rows = table_rows(group_runs([load_run(run)]), 0)
    cells = markdown_table(rows).splitlines()[2].split(" | ")
    assert cells[1:] == ["0", "1", "4", "1×", "2.5", "1×", "—", "—", "—", "—", "—", "— |"]


# --- curves ---------------------------------------------------------------------------------


def test_group_curve_keeps_steps_every_seed_reached(tmp_path):
    a = make_run(tmp_path / "a", {"seed": 0}, [
        {"step": 1, "reward_mean": 0.2, "rollouts": 4, "elapsed_s": 1.0},
        {"step": 2, "reward_mean": 0.4, "rollouts": 8, "elapsed_s": 3.0},
        {"step": 3, "reward_mean": 0.6, "rollouts": 12, "elapsed_s": 4.0}], None)
    b = make_run(tmp_path / "b", {"seed": 1}, [  # unfinished: two steps so far
        {"step": 1, "reward_mean": 0.4, "rollouts": 4, "elapsed_s": 2.0},
        {"step": 2, "reward_mean": 0.8, "rollouts": 8, "elapsed_s": 4.0}], None)
    curve = group_curve([load_run(a), load_run(b)], "metrics", "reward_mean")
    assert curve["step"] == [1, 2]
    assert curve["mean"] == pytest.approx([0.3, 0.6])
    # sample std of (0.2, 0.4) = |0.2 - 0.4| / sqrt(2)
    assert curve["std"] == pytest.approx([0.2 / math.sqrt(2), 0.4 / math.sqrt(2)])
    assert curve["rollouts"] == [4, 8] and curve["seconds"] == [1.5, 3.5]


def test_moving_average_is_a_trailing_mean():
    assert moving_average([1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([3, 1, 2], 5) == [3, 2, 2]
    assert moving_average([1, 2], 1) == [1, 2]


# --- the files --------------------------------------------------------------------------------


def png_size(path: str) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plots_are_written(paper_like, tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install 'grpoctl[plot]'")
    out = tmp_path / "out"
    labels = ["16-GRPO", "16-GRPO", "2-GRPO", "2-GRPO", "2-GRPO"]
    result = write_report(list(paper_like.values()), str(out), labels=labels)
    assert result["note"] is None
    assert result["plots"] == [str(out / "accuracy.png"), str(out / "training.png")]
    for path in result["plots"]:
        width, height = png_size(path)
        assert 1200 <= width <= 2400 and 900 <= height <= 1600  # ~120 dpi, a screen's worth
        assert Path(path).stat().st_size > 30_000  # drawn, not blank
    text = (out / "report.md").read_text()
    assert "![Held-out accuracy](accuracy.png)" in text and "![Training](training.png)" in text


def test_without_evaluations_only_the_training_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install 'grpoctl[plot]'")
    metrics = [{"step": s, "reward_mean": s / 3, "zero_adv_frac": 0.5, "rollouts": 4 * s,
                "elapsed_s": 2.0 * s} for s in (1, 2, 3)]
    run = make_run(tmp_path / "r", {}, metrics, evals=None)
    result = write_report([run], str(tmp_path / "out"))
    assert result["plots"] == [str(tmp_path / "out" / "training.png")]
    png_size(result["plots"][0])


def test_without_matplotlib_the_table_is_written_and_a_note_printed(paper_like, tmp_path):
    out = tmp_path / "out"
    script = ("import sys; sys.modules['matplotlib'] = None\n"  # `import matplotlib` now fails
              "from grpoctl.report import write_report\n"
              f"r = write_report({list(paper_like.values())!r}, {str(out)!r})\n"
              "assert r['plots'] == [], r")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    note = proc.stderr.strip()
    assert "\n" not in note and "matplotlib is not installed" in note
    assert "pip install 'grpoctl[plot]'" in note
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    text = (out / "report.md").read_text()
    assert "| G=2, 64 prompts/step, lr 8e-06, seeds 0, 1, 2 |" in text
    assert "pip install 'grpoctl[plot]'" in text


def test_an_existing_output_directory_must_be_an_earlier_report(paper_like, tmp_path):
    runs = list(paper_like.values())[:2]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("# my notes\n")
    for out in (mine, Path(runs[0])):  # a user's report.md; a run directory
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        with pytest.raises(GrpoctlError, match="holds files a report does not write"):
            write_report(runs, str(out))
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    out = tmp_path / "out"
    write_report(runs, str(out))
    first = (out / "report.md").read_text()
    write_report(runs, str(out), labels=["a", "b"])  # an earlier report: replaced
    assert (out / "report.md").read_text() != first
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # a report of its own inside (results/ablation/) is left alone; any other folder is not
    write_report(runs[:1], str(out / "ablation"))
    nested = (out / "ablation" / "report.md").read_bytes()
    write_report(runs, str(out))
    assert (out / "ablation" / "report.md").read_bytes() == nested
    (out / "notes").mkdir()
    with pytest.raises(GrpoctlError, match=r"holds files a report does not write \(notes\)"):
        write_report(runs, str(out))


def test_labels_name_settings_by_their_flag_and_leave_out_unset_ones():
    from grpoctl.report import auto_label

    config = {"group_size": 2, "prompts_per_step": 64, "async_steps": 1, "sampler_threads": None,
              "lr": 1e-4}
    assert auto_label(config, ["async_steps", "sampler_threads", "lr"]) == \
        "G=2, 64 prompts/step, async 1, lr 0.0001"
