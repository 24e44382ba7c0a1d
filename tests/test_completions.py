"""completions/ holds the scripts the app generates, and they complete real flags."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_completions import SHELLS, completion_script  # noqa: E402


@pytest.mark.parametrize("shell", SHELLS)
def test_committed_completion_scripts_are_up_to_date(shell):
    committed = (ROOT / "completions" / f"grpoctl.{shell}").read_text()
    assert committed == completion_script(shell), "run: python scripts/make_completions.py"


def test_bash_completion_offers_the_apps_flags():
    # What the committed bash script runs when the user presses TAB after `grpoctl loop --grou`.
    env = dict(os.environ, COMP_WORDS="grpoctl loop --grou", COMP_CWORD="2",
               _GRPOCTL_COMPLETE="complete_bash")
    proc = subprocess.run([sys.executable, "-m", "grpoctl"], env=env, capture_output=True, text=True)
    assert proc.stdout.split() == ["--group-size"]
    env.update(COMP_WORDS="grpoctl adv", COMP_CWORD="1")
    proc = subprocess.run([sys.executable, "-m", "grpoctl"], env=env, capture_output=True, text=True)
    assert proc.stdout.split() == ["advantage"]
