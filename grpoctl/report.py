"""`grpoctl report`: compare runs in a markdown table and a few PNG plots.

Reads the run directories that `grpoctl loop` writes (config.json, metrics.jsonl,
eval.jsonl; see grpoctl/loop.py) and writes to an output directory:

    report.md      one row per setting: steps, rollouts, seconds, Mean@k and
                   Pass@k before and after training, ratios to a baseline run
    accuracy.png   held-out Mean@k (top) and Pass@k (bottom) against training
                   steps, rollouts consumed and wall-clock time
    training.png   training reward against the same three axes, and the share
                   of groups whose rewards all tied (zero advantage, no gradient)

The x axes follow the paper's point ("It Takes Two", arXiv 2510.00977): a run
with G = 2 takes more steps but far fewer rollouts and seconds than G = 16, so
accuracy is shown against all three.

Runs whose settings differ only in the seed are one setting: the table gives
mean ± sample standard deviation across seeds, and the plots draw the mean
with a shaded ± 1 std band. Plotting needs matplotlib, an optional extra
(`pip install 'grpoctl[plot]'`); without it the table is still written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from grpoctl import process
from grpoctl.config import LoopConfig
from grpoctl.errors import GrpoctlError
from grpoctl.records import RecordError, atomic_open, iter_jsonl, umask_mode

# Settings that do not change what a run learns: runs that differ only in these
# are seeds (or reruns) of one setting.
NOT_A_SETTING = ("seed", "run_dir", "save_every", "keep_last")

# Numbers a line of metrics.jsonl / eval.jsonl may hold; a present one must be a number.
METRIC_FIELDS = ("reward_mean", "accuracy", "zero_adv_frac", "response_length", "loss",
                 "policy_loss", "kl", "clip_fraction", "entropy", "grad_norm", "tokens",
                 "rollout_s", "score_s", "advantage_s", "update_s", "step_s", "rollouts",
                 "elapsed_s", "trained_sequences")
EVAL_FIELDS = ("mean_at_k", "pass_at_k", "k", "prompts", "rollouts", "elapsed_s")

PLOT_HINT = "pip install 'grpoctl[plot]'"

# --- reading a run directory ---------------------------------------------------


def load_run(run_dir: str | os.PathLike) -> dict:
    """Read one run directory: {"path", "config", "metrics", "evals"}.

    metrics and evals are lists of dicts sorted by step (a repeated step keeps
    its last line). eval.jsonl is optional (a run without --eval-prompts has
    none); config.json and a non-empty metrics.jsonl are required.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise GrpoctlError(f"{path}: not a run directory (no such directory)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise GrpoctlError(f"{config_path}: missing; {path} is not a run directory written by "
                           "`grpoctl loop`")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise GrpoctlError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise GrpoctlError(f"{config_path}: expected a JSON object of settings")
    # A run written before a setting existed ran with its default (as --resume reads it),
    # so it compares equal to a newer run that kept that default.
    config = {**_default_settings(), **config}
    for key, default in _default_settings().items():
        if not _same_kind(config[key], default):
            raise GrpoctlError(f"{config_path}: field '{key}': expected "
                               f"{type(default).__name__}, got {config[key]!r}")

    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise GrpoctlError(f"{metrics_path}: missing; the run has no finished step yet")
    metrics = _read_lines(metrics_path, ("step",), METRIC_FIELDS)
    if not metrics:
        raise GrpoctlError(f"{metrics_path}: empty; the run has no finished step yet")
    eval_path = path / "eval.jsonl"
    evals = _read_lines(eval_path, ("step", "mean_at_k", "pass_at_k", "k"), EVAL_FIELDS) \
        if eval_path.is_file() else []
    return {"path": str(path), "config": config, "metrics": metrics, "evals": evals}


def _default_settings() -> dict:
    return dataclasses.asdict(LoopConfig())


def _same_kind(value, default) -> bool:
    """A setting of the type its default has (None: any; a number for a float)."""
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return _is_number(value) and (isinstance(value, int) or isinstance(default, float))
    return isinstance(value, type(default))


def _read_lines(path: Path, required: tuple, numbers: tuple) -> list[dict]:
    """JSON lines sorted by step; a last line cut short by a crash is ignored."""
    text = path.read_text(encoding="utf-8", errors="replace")
    by_step: dict[int, dict] = {}
    for lineno, record in iter_jsonl(text, str(path), damaged="last"):
        for field in required:
            if field not in record:
                raise RecordError(str(path), lineno, field, "missing")
        step = record["step"]
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
            raise RecordError(str(path), lineno, "step", f"expected an integer >= 0, got "
                              f"{record['step']!r}")
        for field in numbers:
            value = record.get(field)
            if value is not None and not _is_number(value):
                raise RecordError(str(path), lineno, field, f"expected a number, got {value!r}")
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def _is_number(v) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int no float holds
        return False


# --- the figures of one run ----------------------------------------------------


def final_figures(run: dict) -> dict:
    """What the table reports for one run (None where the run lacks it).

    steps, rollouts and seconds come from the last line of metrics.jsonl
    (`rollouts` and `elapsed_s` are cumulative; seconds are training time, the
    evaluations excluded). Initial Mean@k/Pass@k come from the step-0 evaluation,
    final ones from the last evaluation. hack_rate is the largest of the steps' (runs
    made before it was measured have none).
    """
    metrics, evals = run["metrics"], run["evals"]
    first = evals[0] if evals and evals[0]["step"] == 0 else None
    last = evals[-1] if evals and evals[-1]["step"] > 0 else None
    return {
        "steps": metrics[-1]["step"],
        "rollouts": _last_value(metrics, "rollouts"),
        "seconds": _last_value(metrics, "elapsed_s"),
        "k": (last or first or {}).get("k"),
        "final_eval_step": last["step"] if last else None,
        "mean_at_k_initial": first["mean_at_k"] if first else None,
        "pass_at_k_initial": first["pass_at_k"] if first else None,
        "mean_at_k_final": last["mean_at_k"] if last else None,
        "pass_at_k_final": last["pass_at_k"] if last else None,
        # the worst step: a reward being gamed shows there before it shows in a mean
        "hack_rate": max((m["hack_rate"] for m in metrics if "hack_rate" in m), default=None),
    }


def _last_value(lines: list[dict], key: str):
    for line in reversed(lines):
        if line.get(key) is not None:
            return line[key]
    return None


# --- settings, labels and seeds ------------------------------------------------


def setting_of(config: dict) -> str:
    """The run's settings without the seed, as a comparable string."""
    kept = {k: v for k, v in config.items() if k not in NOT_A_SETTING}
    return json.dumps(kept, sort_keys=True, default=str)


def auto_label(config: dict, differing: list[str]) -> str:
    """Group size and prompts per step, then every other setting in `differing` that
    the run sets, named by its flag.

    e.g. "G=2, 256 prompts/step, lr 8e-06"; the seed is added by group_runs.
    """
    from grpoctl.config import flag_of

    parts = [f"G={config.get('group_size')}", f"{config.get('prompts_per_step')} prompts/step"]
    for key in differing:
        value = config.get(key)
        if key in ("group_size", "prompts_per_step") or value is None:  # None: left unset
            continue
        name = flag_of(key).lstrip("-")  # as the user typed it: async, not async_steps
        parts.append(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}")
    return ", ".join(parts)


def _seeds_text(seeds: list) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds))


def group_runs(runs: list[dict], labels: list[str] | None = None) -> list[dict]:
    """Runs that share all settings but the seed (and the --label, if given) -> one group.

    Each group: {"label", "runs", "seeds", "config"}, in the order the runs were
    given. The automatic label names the group size, prompts per step, every
    other setting that differs between the runs, and the seed(s); an empty
    --label keeps the automatic one.
    """
    if labels is not None and len(labels) != len(runs):
        raise GrpoctlError(f"--label given {len(labels)} times for {len(runs)} runs; "
                           "give one label per run directory, in the same order")
    keys = []
    for run in runs:
        for key in run["config"]:
            if key not in keys and key not in NOT_A_SETTING:
                keys.append(key)
    differing = [k for k in keys
                 if len({json.dumps(r["config"].get(k), default=str) for r in runs}) > 1]
    groups: dict[tuple, dict] = {}
    for i, run in enumerate(runs):
        user_label = labels[i] if labels is not None else None
        group = groups.setdefault((setting_of(run["config"]), user_label),
                                  {"user_label": user_label, "runs": [], "config": run["config"]})
        group["runs"].append(run)
    result = []
    for group in groups.values():
        seeds = [r["config"].get("seed") for r in group["runs"]]
        label = group["user_label"] or \
            f"{auto_label(group['config'], differing)}, {_seeds_text(seeds)}"
        result.append({"label": label, "runs": group["runs"], "seeds": seeds,
                       "config": group["config"]})
    return result


# --- the table -------------------------------------------------------------------


def mean_std(values: list) -> dict | None:
    """{"mean", "std", "n"} over the values that are not None; std is the sample
    (n - 1) standard deviation across seeds, 0 for a single run. None if no value."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


FIGURES = ("steps", "rollouts", "seconds", "mean_at_k_initial", "mean_at_k_final",
           "pass_at_k_initial", "pass_at_k_final", "hack_rate")


def table_rows(groups: list[dict], baseline: int) -> list[dict]:
    """One row per group: mean_std of each final figure, and ratios to groups[baseline].

    Ratios are of the means: rollouts_ratio = mean rollouts / baseline's mean
    rollouts (likewise seconds); mean_at_k_ratio = final Mean@k / baseline's
    final Mean@k (the paper's "share of performance kept").
    """
    rows = []
    for group in groups:
        per_run = [final_figures(r) for r in group["runs"]]
        row = {"label": group["label"], "runs": [r["path"] for r in group["runs"]],
               "seeds": group["seeds"], "k": sorted({f["k"] for f in per_run if f["k"]})}
        for name in FIGURES:
            row[name] = mean_std([f[name] for f in per_run])
        rows.append(row)
    base = rows[baseline]
    for i, row in enumerate(rows):
        row["baseline"] = i == baseline
        for name in ("rollouts", "seconds", "mean_at_k_final"):
            ratio_name = name.replace("_final", "") + "_ratio"
            row[ratio_name] = _ratio(row[name], base[name])
    return rows


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if a is None or b is None or b["mean"] == 0:
        return None
    return a["mean"] / b["mean"]


def markdown_table(rows: list[dict]) -> str:
    """The rows of `table_rows` as a GitHub markdown table (accuracies in %)."""
    ks = sorted({k for row in rows for k in row["k"]})
    at = f"@{ks[0]}" if len(ks) == 1 else "@k"
    header = ["run", "seeds", "steps", "rollouts", "rollouts vs baseline", "train seconds",
              "seconds vs baseline", f"Mean{at} start (%)", f"Mean{at} final (%)",
              f"Mean{at} vs baseline", f"Pass{at} start (%)", f"Pass{at} final (%)",
              "hack rate, worst step (%)"]
    if len(ks) > 1:
        header.insert(2, "k")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        label = row["label"] + (" **(baseline)**" if row["baseline"] else "")
        cells = [label.replace("|", "\\|"), ", ".join(map(str, row["seeds"])),
                 _fmt(row["steps"], "count"), _fmt(row["rollouts"], "count"),
                 _fmt_ratio(row["rollouts_ratio"]), _fmt(row["seconds"], "count"),
                 _fmt_ratio(row["seconds_ratio"]),
                 _fmt(row["mean_at_k_initial"], "percent"), _fmt(row["mean_at_k_final"], "percent"),
                 _fmt_ratio(row["mean_at_k_ratio"]),
                 _fmt(row["pass_at_k_initial"], "percent"), _fmt(row["pass_at_k_final"], "percent"),
                 _fmt(row["hack_rate"], "percent")]
        if len(ks) > 1:
            cells.insert(2, ", ".join(map(str, row["k"])) or "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(stat: dict | None, kind: str) -> str:
    """"mean ± std" with both at the mean's precision; ± only when several runs disagree."""
    if stat is None:
        return "—"
    scale = 100.0 if kind == "percent" else 1.0
    mean, std = stat["mean"] * scale, stat["std"] * scale
    decimals = 1 if kind == "percent" or abs(mean) < 100 and not float(mean).is_integer() else 0
    text = f"{mean:,.{decimals}f}"
    if stat["n"] > 1 and stat["std"] > 0:
        text += f" ± {std:,.{max(decimals, 1) if std < 1 else decimals}f}"
    return text


def _fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.3g}×"


# --- curves for the plots ------------------------------------------------------------


def group_curve(runs: list[dict], source: str, key: str) -> dict:
    """Mean and std across a group's runs of `key`, step by step.

    source is "metrics" or "evals". Only steps every run has reached (and has
    `key` at) are kept, so an unfinished seed shortens the curve rather than
    bending it. x positions (rollouts, seconds) are averaged across runs too.
    """
    per_run = [{line["step"]: line for line in run[source] if line.get(key) is not None}
               for run in runs]
    steps = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    curve = {"step": steps, "rollouts": [], "seconds": [], "mean": [], "std": []}
    for step in steps:
        lines = [d[step] for d in per_run]
        y = mean_std([line[key] for line in lines])
        curve["mean"].append(y["mean"])
        curve["std"].append(y["std"])
        for x_name, x_key in (("rollouts", "rollouts"), ("seconds", "elapsed_s")):
            x = mean_std([line.get(x_key) for line in lines])
            curve[x_name].append(x["mean"] if x else math.nan)
    return curve


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# --- plots ------------------------------------------------------------------------------

STYLE = {"font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12, "legend.fontsize": 12,
         "xtick.labelsize": 11, "ytick.labelsize": 11, "axes.grid": True, "grid.alpha": 0.35,
         "axes.spines.top": False, "axes.spines.right": False, "lines.linewidth": 2.0}
DPI = 120


def _time_unit(max_seconds: float) -> tuple[str, float]:
    if max_seconds >= 3 * 3600:
        return "h", 3600.0
    if max_seconds >= 600:
        return "min", 60.0
    return "s", 1.0


def _x_axes(groups: list[dict], source: str) -> list[tuple]:
    """(curve field, axis label, scale) for the step, rollouts and time axes."""
    seconds = [line.get("elapsed_s") or 0.0 for g in groups for r in g["runs"]
               for line in r[source]]
    unit, scale = _time_unit(max(seconds, default=0.0))
    return [("step", "training step", 1.0),
            ("rollouts", "rollouts consumed (completions sampled)", 1.0),
            ("seconds", f"training wall-clock ({unit})", scale)]


def _panel(ax, groups: list[dict], source: str, key: str, x_field: str, x_scale: float,
           y_scale: float, handles: dict, smooth: int = 1, marker: str | None = None) -> None:
    """One axes: each group's mean curve of `key` (and its ± std band), colour by group."""
    for i, group in enumerate(groups):
        curve = group_curve(group["runs"], source, key)
        if not curve["step"]:
            continue  # this group has no such data (e.g. no eval.jsonl)
        color = _color(i)
        x = [v / x_scale for v in curve[x_field]]
        mean = [v * y_scale for v in curve["mean"]]
        std = [v * y_scale for v in curve["std"]]
        if smooth > 1:  # per-step values are noisy: faint raw line, smoothed line on top
            ax.plot(x, mean, color=color, alpha=0.2, linewidth=1.0)
            mean, std = moving_average(mean, smooth), moving_average(std, smooth)
        handles[group["label"]], = ax.plot(x, mean, color=color, marker=marker, markersize=6)
        if any(s > 0 for s in std):
            ax.fill_between(x, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], color=color, alpha=0.18,
                            linewidth=0)
    if x_field == "rollouts":
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 20k, not 20000


def _finish(fig, groups: list[dict], handles: dict, title: str) -> None:
    fig.suptitle(title, fontsize=15, fontweight="bold")
    seeds = any(len(g["runs"]) > 1 for g in groups)
    # As many columns as fit the figure's width (~0.1 inch per character at 12 pt).
    entry_inches = 0.1 * max((len(label) for label in handles), default=1) + 0.8
    ncol = max(1, min(len(handles), 3, int(0.95 * fig.get_figwidth() / entry_inches)))
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=ncol,
               frameon=False,
               title="line: mean over seeds; band: ± 1 std across seeds" if seeds else None,
               title_fontsize=11)


def plot_accuracy(groups: list[dict], path: str) -> None:
    """Held-out Mean@k (top row) and Pass@k (bottom row) against step, rollouts, time."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    ks = sorted({line["k"] for g in groups for r in g["runs"] for line in r["evals"]})
    at = f"@{ks[0]}" if len(ks) == 1 else "@k"
    fig = Figure(figsize=(16, 9.5), layout="constrained")
    axes = fig.subplots(2, 3, sharey="row")
    handles: dict = {}
    rows = (("mean_at_k", f"Mean{at}", f"Mean{at} (% of held-out prompts)"),
            ("pass_at_k", f"Pass{at}", f"Pass{at} (% of prompts solved in {at[1:]} tries)"))
    for row, (key, name, y_label) in enumerate(rows):
        for col, (x_field, x_label, x_scale) in enumerate(_x_axes(groups, "evals")):
            ax = axes[row][col]
            _panel(ax, groups, "evals", key, x_field, x_scale, 100.0, handles, marker="o")
            ax.set_title(f"held-out {name} vs {x_label.split(' (')[0]}")
            ax.set_xlabel(x_label)
            ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
            if col == 0:
                ax.set_ylabel(y_label)
    _finish(fig, groups, handles, "Held-out accuracy")
    _save(fig, path)


def plot_training(groups: list[dict], path: str) -> None:
    """Training reward against step, rollouts and time, and the zero-advantage share.

    Per-step values are smoothed by a trailing mean over ~1/20 of the run."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    steps = max(len(r["metrics"]) for g in groups for r in g["runs"])
    smooth = max(1, round(steps / 20))
    avg = f" (mean of last {smooth} steps)" if smooth > 1 else ""
    step_axis, rollout_axis, time_axis = _x_axes(groups, "metrics")
    fig = Figure(figsize=(14, 10), layout="constrained")
    axes = fig.subplots(2, 2).flatten()
    handles: dict = {}
    for ax, x_axis in zip(axes, (step_axis, rollout_axis, time_axis)):
        x_field, x_label, x_scale = x_axis
        _panel(ax, groups, "metrics", "reward_mean", x_field, x_scale, 1.0, handles, smooth)
        ax.set_title(f"training reward vs {x_label.split(' (')[0]}{avg}", fontsize=12)
        ax.set_xlabel(x_label)
        ax.set_ylabel("mean reward of the step's rollouts")
    ax = axes[3]
    _panel(ax, groups, "metrics", "zero_adv_frac", "step", 1.0, 100.0, handles, smooth)
    ax.set_title(f"zero-advantage groups (no gradient){avg}", fontsize=12)
    ax.set_xlabel(step_axis[1])
    ax.set_ylabel("groups with all rewards tied (%)")
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    _finish(fig, groups, handles, "Training")
    _save(fig, path)


def _color(i: int):
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def _save(fig, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # render with Agg: files only, no window, no pyplot state
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)


def _matplotlib_missing() -> str | None:
    """None when matplotlib imports; otherwise the note to print."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"note: plots skipped: matplotlib is not installed (install it with: {PLOT_HINT})"
    return None


# --- the report -------------------------------------------------------------------------


def write_report(run_dirs: list[str], out_dir: str, labels: list[str] | None = None,
                 baseline: str | None = None) -> dict:
    """Compare run directories; write OUT/report.md and, with matplotlib, the PNG plots.

    Writes out_dir/report.md, out_dir/training.png and (when any run has an
    eval.jsonl) out_dir/accuracy.png; out_dir is created if needed. Without
    matplotlib the PNGs are skipped and a one-line note goes to stderr.
    labels: one per run dir (--label), replacing the automatic label. baseline:
    the run the ratio columns divide by (--baseline); default the run with the
    largest group size (the paper's 16-GRPO), the first such if several.
    Returns {"report": path, "plots": [paths], "rows": table rows, "note": str | None}.
    """
    if not run_dirs:
        raise GrpoctlError("report: give at least one run directory")
    resolved = [os.path.realpath(d) for d in run_dirs]
    for i, r in enumerate(resolved):
        if r in resolved[:i]:
            raise GrpoctlError(f"{run_dirs[i]}: run directory given twice")
    runs = [load_run(d) for d in run_dirs]
    groups = group_runs(runs, labels)
    base_index = _baseline_group(groups, runs, resolved, baseline)
    rows = table_rows(groups, base_index)

    out = Path(out_dir)
    with staged_report_dir(out) as tmp:
        note = _matplotlib_missing()
        plots = []
        if note is None:
            import matplotlib

            with matplotlib.rc_context(STYLE):
                if any(r["evals"] for r in runs):
                    plot_accuracy(groups, str(tmp / "accuracy.png"))
                    plots.append("accuracy.png")
                plot_training(groups, str(tmp / "training.png"))
                plots.append("training.png")
        else:
            print(note, file=sys.stderr)
        with atomic_open(tmp / "report.md") as f:
            f.write(report_markdown(rows, groups[base_index]["label"], baseline is None,
                                    plots, note, out_dir=out))
    return {"report": str(out / "report.md"), "plots": [str(out / p) for p in plots],
            "rows": rows, "note": note}


# What `report` writes (with --html: index.html and html/): an existing output directory
# may hold these and nothing else.
REPORT_FILES = ("report.md", "accuracy.png", "training.png", "index.html", "html")
HTML_MARKER = "<!-- grpoctl report --html -->"  # in the first line of an index.html grpoctl wrote


def report_command(run_dirs: list[str], out_dir: str, labels: list[str] | None = None,
                   baseline: str | None = None, html: bool = False) -> str:
    """`grpoctl report`: write_report's files, or with `html` report_html's pages (which
    hold them too); return what was written, as one line for stderr."""
    if html:
        from grpoctl.report_html import write_html_report  # it imports this module

        result = write_html_report(run_dirs, out_dir, labels=labels, baseline=baseline)
        return (f"wrote {result['index']} and {len(result['pages'])} run page(s), "
                f"{result['steps']} steps, {result['bytes'] / 1e6:.1f} MB")
    result = write_report(run_dirs, out_dir, labels=labels, baseline=baseline)
    return "wrote " + ", ".join([result["report"], *result["plots"]])


@contextlib.contextmanager
def staged_report_dir(out: Path):
    """Yields an empty temporary sibling of `out` to write the report in, then puts it in
    place: an earlier report's files are replaced one by one, each whole (html/ as one
    rename). On any error or interrupt the temporary is removed and `out` is unchanged."""
    _check_report_dir(out)
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.absolute().name}.", suffix=".tmp",
                                    dir=out.absolute().parent))
    except OSError as e:
        raise GrpoctlError(f"{out}: cannot create output directory: {e.strerror}") from None
    try:
        tmp.chmod(umask_mode(0o777))
        yield tmp
        with process.committing(out):  # an interrupt now is raised once the report is in place
            if out.exists():
                for name in sorted(os.listdir(tmp)):
                    if (tmp / name).is_dir() and (out / name).is_dir():  # html/: moved aside whole
                        aside = out / f".{name}.old.tmp"
                        os.rename(out / name, aside)
                        os.rename(tmp / name, out / name)
                        shutil.rmtree(aside, ignore_errors=True)
                    else:
                        os.replace(tmp / name, out / name)
                tmp.rmdir()
            else:
                os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, GrpoctlError):
            raise GrpoctlError(f"{out}: cannot write the report: {e.strerror or e}") from None
        raise


REPORT_MARK = b"# grpoctl report\n"


def _written_by_report(path: Path, mark: bytes) -> bool:
    """`path` is a file that begins with a grpoctl report's mark."""
    try:
        with open(path, "rb") as f:
            return mark in f.read(200)
    except OSError:
        return False


def _check_report_dir(out: Path) -> None:
    """An existing -o must be an earlier report (or empty): never a run directory or a
    directory of the user's own files, whose same-named files would be replaced."""
    if not out.exists():
        return
    if not out.is_dir():
        raise GrpoctlError(f"{out}: exists and is not a directory; -o takes a directory")
    # a report of its own inside (results/ablation/ beside results/report.md) is left alone
    others = sorted(name for name in set(os.listdir(out)) - set(REPORT_FILES)
                    if not _written_by_report(out / name / "report.md", REPORT_MARK))
    for name, mark in (("report.md", REPORT_MARK), ("index.html", HTML_MARKER.encode())):
        if (out / name).is_file() and not _written_by_report(out / name, mark):
            others.append(f"{name} (not one grpoctl wrote)")
    if others:
        raise GrpoctlError(f"{out}: holds files a report does not write ({', '.join(others[:3])}"
                           f"{', ...' if len(others) > 3 else ''}); choose a new -o")


def _baseline_group(groups: list[dict], runs: list[dict], resolved: list[str],
                    baseline: str | None) -> int:
    if baseline is None:
        sizes = [g["config"].get("group_size") or 0 for g in groups]
        return sizes.index(max(sizes))
    wanted = os.path.realpath(baseline)
    if wanted not in resolved:
        raise GrpoctlError(f"--baseline {baseline}: not one of the run directories given; "
                           "add it to them")
    run = runs[resolved.index(wanted)]
    return next(i for i, g in enumerate(groups) if any(r is run for r in g["runs"]))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def relative_to(path: str, directory: str | os.PathLike) -> str:
    """`path` as seen from `directory` (e.g. ../runs/g2-s0), so that report.md, moved or
    copied with the runs beside it, still names them; the absolute path only where no
    relative one exists (another drive on Windows)."""
    try:
        return os.path.relpath(os.path.realpath(path), os.path.realpath(directory))
    except ValueError:
        return os.path.realpath(path)


def report_markdown(rows: list[dict], baseline_label: str, default_baseline: bool,
                    plots: list[str], note: str | None,
                    out_dir: str | os.PathLike | None = None) -> str:
    """The text of report.md: the table, what its columns mean, the plots, the runs.

    out_dir: where report.md goes; the run directories are written relative to it.
    """
    why = " (the largest group size; choose another with --baseline)" if default_baseline else ""
    parts = ["# grpoctl report\n",
             f"{_plural(sum(len(r['runs']) for r in rows), 'run')} in "
             f"{_plural(len(rows), 'setting')}. "
             f"Baseline: **{baseline_label}**{why}.\n",
             markdown_table(rows),
             "- **steps**: training steps finished; **rollouts**: completions sampled for "
             "training; **train seconds**: training wall-clock, evaluations excluded.",
             "- **vs baseline**: this row's mean divided by the baseline's (rollouts, seconds, "
             "final Mean@k).",
             "- **start / final**: held-out accuracy before training (step 0) and at the last "
             "evaluation; — where a run has no such evaluation.",
             "- **hack rate, worst step**: the largest share, over the training steps, of "
             "credited completions whose answer looks gamed (hedged, unfinished or copied from "
             "the prompt; docs/rewards.md).",
             "- Several seeds of one setting: mean ± sample standard deviation across seeds.\n"]
    titles = {"accuracy.png": "Held-out accuracy", "training.png": "Training"}
    for name in plots:
        parts.append(f"## {titles.get(name, name)}\n\n![{titles.get(name, name)}]({name})\n")
    if note:
        parts.append(f"_{note}_\n")
    parts.append("## Runs\n")
    if out_dir is not None:
        parts.append("Run directories, relative to this report's directory:\n")
    for row in rows:
        paths = [relative_to(p, out_dir) if out_dir is not None else p for p in row["runs"]]
        parts.append(f"- {row['label']}: " + ", ".join(f"`{p}`" for p in paths))
    return "\n".join(parts) + "\n"
