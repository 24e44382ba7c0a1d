#!/usr/bin/env bash
# grpoctl with the NEWEST releases of its dependencies that pyproject.toml allows (no
# constraints.txt), in a virtual environment of its own, and a smoke run of the CLI:
# every command's --help, a rollout | score | advantage | update pipeline on the
# embedded model, an eval of the result, a one-step loop resumed for a second step,
# and the one-line errors of a bad flag. Any failure stops the script with status 1.
#
#   scripts/newest-deps-smoke.sh DIR      # DIR: a new path (CI: .venv-newest)
#
# constraints.txt pins what the README install needs to be fast and reproducible; this
# checks that lifting those pins breaks nothing (e.g. typer 0.29, which vendors click
# differently). torch==2.13.0 goes in first: it satisfies pyproject's torch bound, so pip
# keeps this CPU build instead of fetching a newer multi-GB CUDA one (pyproject.toml).
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dir=$1
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -e "$dir" ]; then
    echo "error: $dir exists; choose a new path" >&2
    exit 2
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
trap 'echo "newest-deps smoke: FAILED (line $LINENO: $BASH_COMMAND)" >&2; exit 1' ERR

python3 -m venv "$dir"
py="$dir/bin/python"
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q -e "$root"
"$py" -m pip freeze | grep -i -E '^(torch|transformers|typer|rich|datasets|safetensors|math-verify)==' \
    | tr '\n' ' ' | sed 's/^/newest-deps smoke: /; s/ $/\n/'
export PATH="$dir/bin:$PATH"
cd "$work"  # run like a user, outside the checkout

grpoctl --help > /dev/null
grpoctl --version
for command in $("$py" -c 'import typer; from grpoctl.cli import app
print(*typer.main.get_command(app).commands)'); do
    grpoctl "$command" --help > /dev/null
done

grpoctl rollout --prompts arith:test -G 4 --limit 4 --max-new-tokens 32 --threads 1 -q \
    | grpoctl score --workers 1 -q \
    | grpoctl advantage \
    > adv.jsonl
test "$(wc -l < adv.jsonl)" -eq 16
grpoctl update adv.jsonl --policy default --out ckpt-1 --lr 1e-4 --threads 1
test -f ckpt-1/model.safetensors
grpoctl eval -m ckpt-1 --prompts arith:test --limit 2 -k 1 --max-new-tokens 8 -q > eval.json
"$py" -c 'import json, sys; s = json.load(open("eval.json")); sys.exit(s["prompts"] != 2)'
grpoctl loop --prompts arith:train --limit 4 --prompts-per-step 2 -G 2 --steps 1 \
    --max-new-tokens 4 --eval-prompts none --workers 1 --run-dir run -q
grpoctl loop --resume --run-dir run --steps 2 -q  # --resume reads which flags were given
test "$(wc -l < run/metrics.jsonl)" -eq 2

# a bad flag value: one line `error: ...`, status 2 (the CLI's error handling)
status=0
grpoctl update adv.jsonl --out ckpt-2 --lr nan 2> err.txt || status=$?
test "$status" -eq 2
test "$(wc -l < err.txt)" -eq 1
grep -q "^error: grpoctl update: Invalid value for '--lr'" err.txt
status=0
grpoctl rollout --no-such-flag 2> err.txt || status=$?
test "$status" -eq 2
grep -q "^error: grpoctl rollout: No such option: --no-such-flag" err.txt

echo "newest-deps smoke: passed"
