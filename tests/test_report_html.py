"""`grpoctl report --html`: pages made from a real run, loaded in headless Chromium.

The chromium tests skip where it is not installed (Debian: `apt-get install -y chromium`),
except in CI (CI=true), which installs it: there a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from conftest import run_cli

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None and os.environ.get("CI") == "true":
    raise RuntimeError("CI: chromium is not installed (.ci/run installs it with apt-get)")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                    "(apt-get install -y chromium)")
EVIL = "<script>alert(1)</script></script><b>bold?</b> [bold]x[/bold] \\boxed{7}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 2-step run of the embedded model, with one completion rewritten to hold
    markup that must be shown, never run."""
    path = tmp_path_factory.mktemp("html") / "run"
    run_cli("loop", "--group-size", "2", "--steps", "2", "--prompts-per-step", "8",
            "--eval-prompts", "none", "--threads", "1", "-q", "--run-dir", str(path), check=True)
    for name in ("rollouts", "scored", "advantages"):
        step_file = path / "step-000001" / f"{name}.jsonl"
        lines = step_file.read_text().splitlines()
        first = json.loads(lines[0])
        first["completion"] = EVIL
        step_file.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    return path


@pytest.fixture(scope="module")
def report(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    run_cli("report", str(run), "--html", "-o", str(out), check=True)
    return out


def chromium(url: str, *extra: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                               "--disable-background-networking", "--disable-component-update",
                               "--no-first-run", f"--user-data-dir={profile}",
                               "--virtual-time-budget=5000", *extra, url],
                              capture_output=True, text=True, timeout=120)
    return proc.stdout


def test_the_report_files(report, run):
    assert (report / "report.md").is_file() and (report / "training.png").is_file()
    page = (report / "html" / "1-run" / "index.html").read_text()
    assert (report / "html" / "1-run" / "step-000001.js").is_file()
    assert (report / "html" / "1-run" / "step-000002.js").is_file()
    assert 'href="#step-1"' in page and 'href="#step-2"' in page  # plot points link to steps
    assert 'src="../../training.png"' in page
    assert 'href="html/1-run/index.html"' in (report / "index.html").read_text()
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page  # nothing from the network


def test_model_text_is_escaped_in_the_files(report):
    step = (report / "html" / "1-run" / "step-000001.js").read_text()
    assert "</script>" not in step and "<\\/script>" in step
    assert json.loads(step[len("grpoctlStep("):-len(");\n")])["groups"][0]["recs"][0]["c"] == EVIL


@needs_chromium
def test_a_step_renders_in_chromium_with_no_script_error(report, run):
    url = (report / "html" / "1-run" / "index.html").as_uri() + "#step-1"
    dom = chromium(url, "--dump-dom")
    assert re.search(r'<div id="errors" class="errors"></div>', dom), dom[:2000]
    assert 'data-step="1"' in dom
    recs = [json.loads(line) for line in open(run / "step-000001" / "advantages.jsonl")]
    for r in recs:
        assert r["prompt_id"] in dom
    # shown as text: escaped in the DOM, and no <b> element or script made from it
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;/script&gt;&lt;b&gt;bold?&lt;/b&gt;" in dom
    assert "<b>bold?</b>" not in dom
    assert "gold: " + recs[1]["answer"] in dom
    assert "8 groups" in dom
    dom2 = chromium(url.replace("#step-1", "#step-2"), "--dump-dom")
    assert 'data-step="2"' in dom2


@needs_chromium
def test_screenshot_of_a_run_page(report, tmp_path):
    shot = tmp_path / "page.png"
    chromium((report / "html" / "1-run" / "index.html").as_uri() + "#step-1",
             f"--screenshot={shot}", "--window-size=1280,900")
    assert shot.is_file() and shot.stat().st_size > 20_000  # a rendered page, not a blank one


@needs_chromium
def test_the_index_page_renders(report):
    dom = chromium((report / "index.html").as_uri(), "--dump-dom")
    assert "grpoctl report" in dom and "1-run/index.html" in dom


def test_an_earlier_report_is_replaced_and_other_directories_refused(run, report, tmp_path):
    run_cli("report", str(run), "--html", "-o", str(report), check=True)
    assert (report / "html" / "1-run" / "step-000002.js").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    proc = run_cli("report", str(run), "--html", "-o", str(mine))
    assert proc.returncode == 2 and b"holds files a report does not write" in proc.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # A plain report into the HTML report's directory replaces only its own files.
    run_cli("report", str(run), "-o", str(report), check=True)
    assert (report / "index.html").is_file() and (report / "html" / "1-run").is_dir()
    # An index.html that grpoctl did not write is the user's: refused, untouched.
    (mine / "notes.txt").unlink()
    (mine / "index.html").write_text("<p>my page</p>")
    proc = run_cli("report", str(run), "-o", str(mine))
    assert proc.returncode == 2 and b"index.html (not one grpoctl wrote)" in proc.stderr
    assert (mine / "index.html").read_text() == "<p>my page</p>"


@pytest.mark.parametrize("case", ["damaged", "missing step", "old layout"])
def test_bad_runs_are_one_line_exit_2_and_nothing_written(run, tmp_path, case):
    target = tmp_path / "run"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints"))
    step_file = target / "step-000002" / "advantages.jsonl"
    if case == "damaged":
        lines = step_file.read_text().splitlines(keepends=True)
        lines[2] = lines[2][:30] + "\n"
        step_file.write_text("".join(lines))
        expected = f"{step_file}:3: invalid JSON"
    elif case == "missing step":
        shutil.rmtree(target / "step-000002")
        expected = f"{target / 'step-000002'}: missing"
    else:
        for d in target.glob("step-*"):
            shutil.rmtree(d)
        expected = f"{target}: no step-NNNNNN/ directories"
    out = tmp_path / "out"
    proc = run_cli("report", str(target), "--html", "-o", str(out))
    err = proc.stderr.decode()
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
