"""`grpoctl diff`: what changed between two sets of records, prompt by prompt.

Each side is a records file, a run directory (its last finished step) or `RUN:STEP`;
`--step` gives the steps instead (`diff RUN --step 1 --step 16`, or `diff RUN_A RUN_B
--step 16` for the same step of two runs). On the prompts the two sides have in common
(same prompt_id), per prompt:

    accuracy   the share of the group's completions that are right (show.is_right:
               rewards.math == 1 where scored with math, else reward > 0, else the
               extracted answer against the gold);
    flip       the prompt counts as solved when at least half its completions are
               right; wrong→right and right→wrong are the prompts that changed side;
    length     the mean completion length in tokens (characters where a record has
               no completion_ids), and its change.
"""

from __future__ import annotations

import os
import statistics
import sys

from grpoctl.errors import GrpoctlError
from grpoctl.records import read_records, source_name
from grpoctl.show import is_right, resolve_source, visible


def parse_side(text: str) -> tuple[str, int | None]:
    """`RUN:STEP` -> (RUN, STEP); anything else -> (text, None). A file name that itself
    ends in `:digits` is taken as a file when it exists."""
    head, sep, tail = text.rpartition(":")
    if sep and tail.isdigit() and head and not os.path.exists(text):
        return head, int(tail)
    return text, None


def sides(inputs: list[str], steps: list[int]) -> list[str]:
    """The two records files to compare, from the arguments and --step flags."""
    parsed = [parse_side(t) for t in inputs]
    if len(steps) > 2:
        raise GrpoctlError("--step given more than twice; diff compares two steps")
    if any(step is not None for _, step in parsed) and steps:
        raise GrpoctlError("give the steps either as RUN:STEP or with --step, not both")
    if len(parsed) == 1:
        if len(steps) != 2:
            raise GrpoctlError("one run directory needs two steps: diff RUN --step 1 --step 16 "
                               "(or diff RUN:1 RUN:16)")
        return [resolve_source(parsed[0][0], s) for s in steps]
    if len(parsed) != 2:
        raise GrpoctlError(f"diff compares two sides, got {len(parsed)}")
    if len(steps) == 2:
        return [resolve_source(p, s) for (p, _), s in zip(parsed, steps)]
    if len(steps) == 1:
        return [resolve_source(p, steps[0]) for p, _ in parsed]
    return [resolve_source(p, s) for p, s in parsed]


def per_prompt(records: list[dict]) -> dict[str, dict]:
    """{prompt_id: {"n", "right", "accuracy", "length", "judged"}} of one side."""
    out: dict[str, dict] = {}
    for r in records:
        entry = out.setdefault(r["prompt_id"], {"n": 0, "right": 0, "judged": 0, "lengths": []})
        verdict = is_right(r)
        entry["n"] += 1
        entry["judged"] += verdict is not None
        entry["right"] += verdict is True
        ids = r.get("completion_ids")
        entry["lengths"].append(len(ids) if isinstance(ids, list) else len(r.get("completion", "")))
    for entry in out.values():
        entry["accuracy"] = entry["right"] / entry["judged"] if entry["judged"] else None
        entry["length"] = statistics.fmean(entry.pop("lengths"))
    return out


def compare(a_path: str, b_path: str) -> dict:
    """The per-prompt comparison of two records files, and its summary."""
    a, b = per_prompt(read_records(a_path, ("prompt_id",))), \
        per_prompt(read_records(b_path, ("prompt_id",)))
    common = [p for p in a if p in b]
    rows = []
    for pid in common:
        acc_a, acc_b = a[pid]["accuracy"], b[pid]["accuracy"]
        flip = None
        if acc_a is not None and acc_b is not None and (acc_a >= 0.5) != (acc_b >= 0.5):
            flip = "wrong→right" if acc_b >= 0.5 else "right→wrong"
        rows.append({"prompt_id": pid, "n_a": a[pid]["n"], "n_b": b[pid]["n"],
                     "accuracy_a": acc_a, "accuracy_b": acc_b,
                     "accuracy_change": None if acc_a is None or acc_b is None else acc_b - acc_a,
                     "flip": flip, "length_a": a[pid]["length"], "length_b": b[pid]["length"],
                     "length_change": b[pid]["length"] - a[pid]["length"]})

    def mean(key):
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.fmean(values) if values else None

    summary = {"a": source_name(a_path), "b": source_name(b_path), "prompts_a": len(a),
               "prompts_b": len(b), "common": len(common),
               "accuracy_a": mean("accuracy_a"), "accuracy_b": mean("accuracy_b"),
               "wrong_to_right": sum(r["flip"] == "wrong→right" for r in rows),
               "right_to_wrong": sum(r["flip"] == "right→wrong" for r in rows),
               "length_a": mean("length_a"), "length_b": mean("length_b"),
               "length_change": mean("length_change")}
    return {"summary": summary, "prompts": rows}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def print_diff(result: dict, limit: int | None = 20, console=None) -> None:
    """The summary and the prompts that changed most, as rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # A pipe gets no terminal width: 120 columns keep the tables on one line per row.
    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    s = result["summary"]
    console.print(Text(f"A: {visible(s['a'])}\nB: {visible(s['b'])}"))
    summary = Table(show_header=True, header_style="bold")
    for name in ("", "A", "B", "change"):
        summary.add_column(name, justify="left" if not name else "right")
    summary.add_row("prompts", str(s["prompts_a"]), str(s["prompts_b"]), f"{s['common']} in common")
    change = None if s["accuracy_a"] is None or s["accuracy_b"] is None \
        else s["accuracy_b"] - s["accuracy_a"]
    summary.add_row("accuracy", _pct(s["accuracy_a"]), _pct(s["accuracy_b"]),
                    "—" if change is None else f"{100 * change:+.0f} pts")
    summary.add_row("flips", "", "", f"{s['wrong_to_right']} wrong→right, "
                    f"{s['right_to_wrong']} right→wrong")
    if s["length_a"] is not None:
        summary.add_row("mean length (tokens)", f"{s['length_a']:.1f}", f"{s['length_b']:.1f}",
                        f"{s['length_change']:+.1f}")
    console.print(summary)
    if not result["prompts"]:
        print("diff: the two sides have no prompt_id in common (a run samples new prompts "
              "every step: compare the same step of two runs, or a run whose prompts repeat)",
              file=sys.stderr)
        return
    rows = sorted(result["prompts"], key=lambda r: (r["flip"] is None,
                                                    -abs(r["accuracy_change"] or 0),
                                                    -abs(r["length_change"])))
    if limit is not None:
        rows = rows[:limit]
    table = Table(title=f"prompts, most changed first ({len(rows)} of {len(result['prompts'])})",
                  header_style="bold")
    for name in ("prompt_id", "acc A", "acc B", "flip", "len A", "len B", "Δ len"):
        table.add_column(name, justify="left" if name in ("prompt_id", "flip") else "right")
    for r in rows:
        table.add_row(Text(visible(r["prompt_id"])), _pct(r["accuracy_a"]), _pct(r["accuracy_b"]),
                      r["flip"] or "", f"{r['length_a']:.1f}", f"{r['length_b']:.1f}",
                      f"{r['length_change']:+.1f}")
    console.print(table)
