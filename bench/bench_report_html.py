"""Page weight, generation time and browser load time of `grpoctl report --html` at scale,
and how soon `grpoctl show` prints the first groups of a big rollouts file.

Builds a synthetic run directory of STEPS steps x RECORDS records by replicating the
records of a real tiny run (made here with `grpoctl loop`), each completion made
--repeat times longer (its text, token ids and log-probs repeated), then times:

    generation   `grpoctl report RUN --html -o OUT` (report.md and PNGs included)
    page weight  the run page, the step files (mean, largest) and the whole directory
    load         headless Chromium opening the run page at #step-N until it has rendered
                 (wall time, less Chromium's time for an empty page), and the page's own
                 render time of the step (performance.now, in the body's data-render-ms)
    show         `grpoctl show BIG --limit 5` on a rollouts file of --show-mb megabytes

    python bench/bench_report_html.py                       # 100 x 256, short completions
    python bench/bench_report_html.py --repeat 40           # ~1,000-token completions
    python bench/bench_report_html.py --show-mb 1024        # and a 1 GB file for show
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRPOCTL = [sys.executable, "-m", "grpoctl"]


def tiny_run(where: Path) -> Path:
    run = where / "tiny"
    subprocess.run([*GRPOCTL, "loop", "--group-size", "2", "--steps", "1", "--prompts-per-step",
                    "16", "--eval-prompts", "none", "--threads", "1", "-q", "--run-dir", str(run)],
                   check=True)
    return run


def longer(record: dict, repeat: int) -> dict:
    if repeat == 1:
        return record
    return dict(record, completion=record["completion"] * repeat,
                completion_ids=record["completion_ids"] * repeat,
                logprobs=record["logprobs"] * repeat)


def synthetic_run(source: Path, out: Path, steps: int, per_step: int, repeat: int) -> Path:
    """STEPS steps of PER_STEP records each, copied from source's step 1 under new prompt ids."""
    base = [json.loads(line) for line in open(source / "step-000001" / "advantages.jsonl")]
    metrics = json.loads((source / "step-000001" / "done").read_text())
    out.mkdir(parents=True)
    (out / "config.json").write_text((source / "config.json").read_text())
    lines = []
    for step in range(1, steps + 1):
        d = out / f"step-{step:06d}"
        d.mkdir()
        with open(d / "advantages.jsonl", "w") as f:
            for i in range(per_step):
                r = base[i % len(base)]
                copy = longer(dict(r, prompt_id=f"{r['prompt_id']}-s{step}-{i // len(base)}"),
                              repeat)
                f.write(json.dumps(copy) + "\n")
        m = dict(metrics, step=step, rollouts=step * per_step,
                 accuracy=min(1.0, 0.3 + 0.5 * step / steps), elapsed_s=step * 1.0)
        (d / "done").write_text(json.dumps(m))
        lines.append(json.dumps(m) + "\n")
    (out / "metrics.jsonl").write_text("".join(lines))
    return out


def chromium_seconds(url: str) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as profile:
        t0 = time.perf_counter()
        proc = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                               "--disable-background-networking", "--disable-component-update",
                               "--no-first-run", f"--user-data-dir={profile}", "--dump-dom", url],
                              capture_output=True, text=True, timeout=300)
        return time.perf_counter() - t0, proc.stdout


def big_rollouts(source: Path, path: Path, megabytes: int) -> None:
    base = [json.loads(line) for line in open(source / "step-000001" / "rollouts.jsonl")]
    lines = [json.dumps(longer(r, 40)) + "\n" for r in base]
    size, n = 0, 0
    with open(path, "w") as f:
        while size < megabytes * 1e6:
            for line in lines:
                r = json.loads(line)
                r["prompt_id"] += f"-{n}"
                text = json.dumps(r) + "\n"
                f.write(text)
                size += len(text)
            n += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1, help="make each completion N times longer")
    ap.add_argument("--show-mb", type=int, default=0, help="also time show on a file this big")
    ap.add_argument("--keep", help="keep the files in this directory")
    args = ap.parse_args()
    where = Path(args.keep or tempfile.mkdtemp(prefix="bench-html-"))
    where.mkdir(parents=True, exist_ok=True)
    source = tiny_run(where)
    run = synthetic_run(source, where / "run", args.steps, args.records, args.repeat)
    out = where / "out"
    t0 = time.perf_counter()
    subprocess.run([*GRPOCTL, "report", str(run), "--html", "-o", str(out)], check=True)
    generation = time.perf_counter() - t0
    page = out / "html" / "1-run" / "index.html"
    step_files = sorted(page.parent.glob("step-*.js"))
    sizes = [p.stat().st_size for p in step_files]
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    rows = [("run directory", f"{args.steps} steps x {args.records} records, "
             f"~{sum(len(json.loads(l)['completion_ids']) for l in open(run / 'step-000001' / 'advantages.jsonl')) // args.records} tokens each"),
            ("generation (report --html)", f"{generation:.1f} s"),
            ("run page (index.html)", f"{page.stat().st_size / 1e3:.0f} kB"),
            ("step file, mean / largest", f"{sum(sizes) / len(sizes) / 1e3:.0f} kB / "
                                          f"{max(sizes) / 1e3:.0f} kB"),
            ("whole output directory", f"{total / 1e6:.1f} MB")]
    if shutil.which("chromium"):
        empty = where / "empty.html"
        empty.write_text("<!doctype html><title>x</title>")
        base, _ = chromium_seconds(empty.as_uri())
        mid = args.steps // 2
        seconds, dom = chromium_seconds(page.as_uri() + f"#step-{mid}")
        rendered = re.search(r'data-render-ms="([\d.]+)"', dom)
        errors = re.search(r'<div id="errors" class="errors">(.*?)</div>', dom, re.S)
        rows.append((f"chromium load of #step-{mid}", f"{seconds - base:.2f} s over an empty "
                     f"page's {base:.2f} s"))
        rows.append(("in-page render of the step", f"{rendered.group(1) if rendered else '?'} ms"))
        rows.append(("script errors", repr(errors.group(1)) if errors else "page not rendered"))
    if args.show_mb:
        big = where / "big.jsonl"
        big_rollouts(source, big, args.show_mb)
        t0 = time.perf_counter()
        subprocess.run([*GRPOCTL, "show", str(big), "--limit", "5"], check=True,
                       stdout=subprocess.DEVNULL)
        rows.append((f"show --limit 5 on {big.stat().st_size / 1e9:.2f} GB",
                     f"{time.perf_counter() - t0:.2f} s"))
        t0 = time.perf_counter()
        subprocess.run([*GRPOCTL, "--help"], check=True, stdout=subprocess.DEVNULL)
        rows.append(("(grpoctl --help, the start-up cost)", f"{time.perf_counter() - t0:.2f} s"))
    width = max(len(k) for k, _ in rows)
    print(f"| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|---|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    if not args.keep:
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
