"""`grpoctl report RUN... --html -o DIR`: a static HTML view of runs.

Written into DIR beside report.md and the PNGs of `grpoctl report` (report.py):

    index.html                      the runs, their final figures and the plots
    html/<run>/index.html           one page per run: an SVG plot of accuracy, reward and
                                    tied groups against step (each point links to its
                                    step), the PNGs, and a viewer of each step's groups
    html/<run>/step-NNNNNN.js       one file per step, loaded when that step is opened

Pages work from file:// with no server and no network: the stylesheet and the script
(grpoctl/report_assets/) are inlined, and a step's data is a script that calls
`grpoctlStep({...})`, since fetch() is refused on file://. Model text is escaped on
the way in (html.escape in the HTML, `</` written `<\\/` inside scripts) and rendered
with textContent in the browser, so a completion holding <script> is shown, never run.

Everything is read and checked before anything is written, and written into a
temporary directory renamed into place at the end: a bad run (a damaged line, a
missing step, an older layout) is one line naming the file and line, exit 2, and no
DIR.
"""

from __future__ import annotations

import html
import json
import os
import re
import sys
from pathlib import Path

from grpoctl.errors import GrpoctlError
from grpoctl.records import atomic_open, read_records
from grpoctl.report import (HTML_MARKER as MARKER, final_figures, load_run, staged_report_dir,
                            write_report)
from grpoctl.show import (check_run_dir, explain, finished_steps, group_kind, is_right,
                          step_file, Group)

ASSETS = Path(__file__).parent / "report_assets"


# --- escaping -------------------------------------------------------------------------


def script_json(value) -> str:
    """JSON safe inside a <script> element or a .js file: `</` cannot close the element
    (`<\\/` is the same string to JSON), and U+2028/U+2029 are escaped for older parsers."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("</", "<\\/").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def esc(value) -> str:
    return html.escape(str(value), quote=True)


# --- one step's data ----------------------------------------------------------------


def step_payload(records: list[dict], step: int, file_name: str, metrics: dict) -> tuple[dict, set]:
    """What the page shows of one step, in short keys (a step of 256 long completions is
    a few MB), and the token ids it uses. Log-probs are kept as hundredths of a nat
    (`q`: 339 is -3.39), enough to shade a token."""
    groups: dict[str, Group] = {}
    for r in records:
        groups.setdefault(r["prompt_id"], Group(r["prompt_id"], 0)).records.append(r)
    ids: set[int] = set()
    out = []
    for group in groups.values():
        first = group.records[0]
        recs = []
        for r in group.records:
            rec = {"s": r.get("sample"), "c": r.get("completion", ""), "r": r.get("reward"),
                   "rc": r.get("rewards"), "a": r.get("advantage"),
                   "n": len(r["completion_ids"]) if "completion_ids" in r else None,
                   "f": r.get("finish_reason"), "ok": is_right(r)}
            found = explain(r)
            rec["x"], rec["rule"] = found["extracted"], found["rule"]
            if "logprobs" in r and "completion_ids" in r:
                rec["t"] = r["completion_ids"]
                rec["q"] = [round(-lp * 100) for lp in r["logprobs"]]
                ids.update(r["completion_ids"])
            recs.append(rec)
        out.append({"id": group.prompt_id, "p": first.get("prompt"), "g": first.get("answer"),
                    "kind": group_kind(group), "recs": recs})
    return {"step": step, "file": file_name, "metrics": metrics, "groups": out}, ids


def load_vocab(model: str | None) -> tuple[object | None, str | None]:
    """The tokenizer of a run's model, or (None, why not): the page then shows token ids."""
    if not model:
        return None, "config.json names no model"
    try:
        from grpoctl.models import load_tokenizer, resolve_model_dir

        if not resolve_model_dir(model).is_dir():
            return None, f"model {model} not found here"
        return load_tokenizer(model), None
    except (GrpoctlError, ImportError) as e:
        return None, str(e)


# --- the accuracy plot, drawn here so that each point can link to its step -----------------

SERIES = (("accuracy", "metrics", "training accuracy", "#1f77b4"),
          ("zero_adv_frac", "metrics", "tied groups (no gradient)", "#999999"),
          ("mean_at_k", "evals", "held-out Mean@k", "#ff7f0e"))


def svg_plot(run: dict, steps_with_page: set[int], width: int = 760, height: int = 260) -> str:
    """An SVG line plot of the run's training accuracy, tied share and held-out Mean@k
    (all in [0, 1]) against step; each point is an <a href="#step-N">."""
    left, right, top, bottom = 48, 16, 14, 38
    last = max([m["step"] for m in run["metrics"]] + [1])
    first = 0 if run["evals"] else min(m["step"] for m in run["metrics"])

    def x(step):
        return left + (width - left - right) * (step - first) / max(1, last - first)

    def y(v):
        return top + (height - top - bottom) * (1 - max(0.0, min(1.0, v)))

    parts = [f'<svg class="curve" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="accuracy against step">']
    for v in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                     f'stroke="#e3e3e3"/><text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{int(v * 100)}%</text>')
    for s in _ticks(first, last):
        parts.append(f'<text x="{x(s):.1f}" y="{height - bottom + 16}" font-size="11" '
                     f'text-anchor="middle">{s}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 4}" font-size="12" '
                 f'text-anchor="middle">training step (click a point for its groups)</text>')
    legend_x = left + 8
    for key, source, name, colour in SERIES:
        points = [(line["step"], line[key]) for line in run[source] if line.get(key) is not None]
        if not points:
            continue
        path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        for s, v in points:
            dot = (f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3.5" fill="{colour}">'
                   f'<title>step {s}: {esc(name)} {100 * v:.1f}%</title></circle>')
            parts.append(f'<a href="#step-{s}">{dot}</a>' if s in steps_with_page else dot)
        parts.append(f'<rect x="{legend_x}" y="{top + 2}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{legend_x + 14}" y="{top + 11}" font-size="11">{esc(name)}</text>')
        legend_x += 24 + 7 * len(name)
    parts.append("</svg>")
    return "".join(parts)


def _ticks(first: int, last: int, most: int = 10) -> list[int]:
    span = max(1, last - first)
    step = next(s for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 10**9)
                if span / s <= most)
    return list(range(first - first % step + (step if first % step else 0), last + 1, step))


# --- pages ------------------------------------------------------------------------------


def _page(title: str, body: str, script: str = "") -> str:
    css = (ASSETS / "page.css").read_text(encoding="utf-8")
    return (f"<!doctype html>\n{MARKER}\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{css}</style></head>\n<body>\n"
            f"<div id=\"errors\" class=\"errors\"></div>\n{body}\n{script}</body></html>\n")


def run_page(run: dict, label: str, steps: list[dict], plots: list[str], note: str | None) -> str:
    figures = final_figures(run)
    last_metrics = run["metrics"][-1]
    summary = (f"{figures['steps']} steps, {figures['rollouts'] or '—'} rollouts, "
               f"G = {run['config'].get('group_size')}, model {run['config'].get('model')}, "
               f"final training accuracy {_pct(last_metrics.get('accuracy'))}")
    pngs = "".join(f'<img src="../../{esc(p)}" alt="{esc(p)}">' for p in plots)
    nav = "".join(f'<a href="#step-{s["step"]}">{s["step"]}</a>' for s in steps)
    body = f"""<p><a href="../../index.html">← all runs</a></p>
<h1>{esc(label)}</h1>
<p class="muted">{esc(run['path'])} · {esc(summary)}</p>
<h2>Accuracy against step</h2>
{svg_plot(run, {s["step"] for s in steps})}
<details class="plots"><summary>report plots (PNG)</summary>{pngs or esc(note or "no plots")}</details>
<h2>Steps</h2>
<nav class="steps">{nav}</nav>
<h2 id="step-title">Step</h2>
<div class="controls">
<label>show <select id="filter"><option value="all">all groups</option>
<option value="tied">tied</option><option value="contrastive">contrastive</option>
<option value="right">with a right answer</option><option value="wrong">with a wrong answer</option>
</select></label>
<label>search <input id="search" type="search" placeholder="text in prompt or completion"></label>
<label><input id="tokens" type="checkbox" checked> shade tokens by log-prob</label>
<span id="status" class="muted"></span>
</div>
<div id="groups"></div>
<button id="more" class="more" hidden></button>"""
    data = {"label": label, "steps": steps}
    js = (ASSETS / "page.js").read_text(encoding="utf-8")
    script = (f'<script type="application/json" id="run-data">{script_json(data)}</script>\n'
              f"<script>\n{js}</script>\n")
    return _page(f"grpoctl run: {label}", body, script)


def index_page(runs: list[dict], labels: list[str], slugs: list[str], plots: list[str]) -> str:
    rows = []
    for run, label, slug in zip(runs, labels, slugs):
        f, m = final_figures(run), run["metrics"][-1]
        rows.append(f'<tr><td><a href="html/{esc(slug)}/index.html">{esc(label)}</a></td>'
                    f"<td>{f['steps']}</td><td>{f['rollouts'] or '—'}</td>"
                    f"<td>{_pct(m.get('accuracy'))}</td><td>{_pct(f['mean_at_k_final'])}</td></tr>")
    imgs = "".join(f'<p><img src="{esc(p)}" alt="{esc(p)}"></p>' for p in plots)
    body = f"""<h1>grpoctl report</h1>
<p class="muted">The table and plots of <a href="report.md">report.md</a>; each run links to its
steps, groups and completions.</p>
<table class="figures"><tr><th>run</th><th>steps</th><th>rollouts</th>
<th>last training accuracy</th><th>final held-out Mean@k</th></tr>
{''.join(rows)}</table>
<div class="plots">{imgs}</div>"""
    return _page("grpoctl report", body)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _slug(i: int, path: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(os.path.normpath(path))).strip("-.")
    return f"{i + 1}-{name or 'run'}"


# --- the report -------------------------------------------------------------------------


def write_html_report(run_dirs: list[str], out_dir: str, labels: list[str] | None = None,
                      baseline: str | None = None, tokens: bool = True) -> dict:
    """report.md and the PNGs (report.write_report), plus index.html and one page per run.

    tokens: decode token ids with the run's model tokenizer (config.json `model`) where
    it loads; otherwise, or with tokens=False, the pages show token ids.
    Returns {"index": path, "pages": [paths], "steps": count, "bytes": total size}.
    """
    out = Path(out_dir)
    runs = []
    for d in run_dirs:
        check_run_dir(Path(d))
        runs.append(load_run(d))
    for run in runs:  # every step the metrics name must have its records
        for line in run["metrics"]:
            step_file(Path(run["path"]), line["step"])
    with staged_report_dir(out) as tmp:
        result = write_report(run_dirs, str(tmp), labels, baseline)
        plots = [os.path.basename(p) for p in result["plots"]]
        label_of = {path: row["label"] for row in result["rows"] for path in row["runs"]}
        slugs, page_labels, pages, n_steps = [], [], [], 0
        for i, run in enumerate(runs):
            slug = _slug(i, run["path"])
            label = label_of.get(run["path"], slug)
            if len(result["rows"]) < len(runs):  # seeds of one setting share a row label
                label = f"{label} ({os.path.basename(os.path.normpath(run['path']))})"
            steps = _write_steps(run, tmp / "html" / slug, tokens)
            n_steps += len(steps)
            with atomic_open(tmp / "html" / slug / "index.html") as f:
                f.write(run_page(run, label, steps, plots, result["note"]))
            slugs.append(slug)
            page_labels.append(label)
            pages.append(out / "html" / slug / "index.html")
        with atomic_open(tmp / "index.html") as f:
            f.write(index_page(runs, page_labels, slugs, plots))
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    return {"index": str(out / "index.html"), "pages": [str(p) for p in pages],
            "steps": n_steps, "bytes": size, "report": str(out / "report.md")}


def _write_steps(run: dict, directory: Path, tokens: bool) -> list[dict]:
    """One step-NNNNNN.js per step of the run; returns the run page's list of steps."""
    directory.mkdir(parents=True)
    path = Path(run["path"])
    tokenizer, why = load_vocab(run["config"].get("model")) if tokens else (None, "off")
    if tokens and tokenizer is None:
        print(f"note: {path}: tokens shown as ids ({why})", file=sys.stderr)
    decoded: dict[int, str] = {}
    steps = []
    metrics_of = {line["step"]: line for line in run["metrics"]}
    for step in sorted(set(metrics_of) | set(finished_steps(path))):
        source = step_file(path, step)
        payload, ids = step_payload(read_records(str(source)), step, source.name,
                                    metrics_of.get(step, {}))
        if tokenizer is not None:
            for i in ids - decoded.keys():
                decoded[i] = tokenizer.decode([i])
            payload["vocab"] = {str(i): decoded[i] for i in sorted(ids)}
        name = f"step-{step:06d}.js"
        with atomic_open(directory / name) as f:
            f.write(f"grpoctlStep({script_json(payload)});\n")
        steps.append({"step": step, "script": name})
    return steps


