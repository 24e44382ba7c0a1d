"""The flag tables in docs/ are generated from the settings declarations, and the
estimator registry is what --estimator offers."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_flag_tables_are_up_to_date():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_docs.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + "run: python scripts/make_docs.py"


def test_a_registered_estimator_is_a_choice_of_advantage_and_runs(tmp_path):
    # A plugin: one function and its registry entry, imported before the CLI is built.
    plugin = textwrap.dedent("""
        import sys
        from grpoctl.advantages import register_estimator

        @register_estimator("sign")
        def sign(rewards, settings, batch_std):
            mean = sum(rewards) / len(rewards)
            return [float((r > mean) - (r < mean)) for r in rewards]

        from grpoctl.cli import main
        main()
    """)
    script = tmp_path / "with_plugin.py"
    script.write_text(plugin)
    help_text = subprocess.run([sys.executable, str(script), "advantage", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "group|pairwise|rloo|sign" in help_text.replace(" ", "").replace("\n", "")
    records = "".join('{"prompt_id": "a", "sample": %d, "reward": %d}\n' % (s, s)
                      for s in range(3))
    out = subprocess.run([sys.executable, str(script), "advantage", "--estimator", "sign"],
                         input=records, capture_output=True, text=True, check=True).stdout
    assert [json.loads(line)["advantage"] for line in out.splitlines()] == [-1.0, 0.0, 1.0]
    # without the plugin, the name is refused in one line naming the flag
    plain = subprocess.run([sys.executable, "-m", "grpoctl", "advantage", "--estimator", "sign"],
                           input=records, capture_output=True, text=True)
    assert plain.returncode == 2 and "--estimator" in plain.stderr


def test_score_explain_reuses_the_verdicts(tmp_path):
    record = ('{"prompt_id":"a","sample":0,"prompt":"What is 8 + 4?",'
              '"completion":"\\\\boxed{8 + 4}","answer":"12"}\n')
    path = tmp_path / "r.jsonl"
    path.write_text(record)
    proc = subprocess.run([sys.executable, "-m", "grpoctl", "score", str(path), "--explain"],
                          capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout)
    assert out["reward"] == 0 and out["explain"]["source"] == "not final"
    assert out["explain"]["reward"] == 0.0
    plain = subprocess.run([sys.executable, "-m", "grpoctl", "score", str(path)],
                           capture_output=True, text=True, check=True)
    assert "explain" not in json.loads(plain.stdout)
