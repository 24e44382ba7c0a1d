"""Write completions/grpoctl.{bash,zsh,fish} from the Typer app.

The scripts are Typer's: they ask `grpoctl` itself for candidates at completion
time, so they stay right as flags change; tests/test_completions.py checks that
the committed files equal what this script writes.

    python scripts/make_completions.py
"""

from pathlib import Path

from typer._completion_shared import get_completion_script

SHELLS = ("bash", "zsh", "fish")
OUT = Path(__file__).resolve().parent.parent / "completions"


def completion_script(shell: str) -> str:
    return get_completion_script(prog_name="grpoctl", complete_var="_GRPOCTL_COMPLETE", shell=shell)


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for shell in SHELLS:
        (OUT / f"grpoctl.{shell}").write_text(completion_script(shell))
        print(OUT / f"grpoctl.{shell}")
