"""`grpoctl show`: records as a reader wants them, group by group.

A records file (or one step of a run directory) is printed one prompt group at a
time: the prompt once, its gold answer, then each completion with its reward
components, advantage, length in tokens, whether it stopped or was cut at the token
limit, and the answer extracted from it against the gold.

Big files stream: records are read line by line and reading stops once --limit
groups have been shown, so the first groups of a 1 GB rollouts file appear at once.
grpoctl writes the records of a group on adjacent lines; a group whose records are
spread further apart is still gathered as long as no more than LOOKAHEAD records of
other groups stand between two of its records (see GroupStream).

This module also holds what `diff` and `report --html` share with it: finding the
file of a run's step (`resolve_source`), streaming validated records
(`stream_records`), and one definition of a right answer (`is_right`).
Nothing here imports torch; --tokens --policy does, inside `policy_token_stats`.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from grpoctl.answers import extract_answer, match_without_sympy
from grpoctl.errors import GrpoctlError
from grpoctl.records import STDIO, RecordError, check_record, iter_jsonl, source_name

# The files of a step, richest first: each stage's file holds the previous one's fields.
STEP_FILES = ("advantages.jsonl", "scored.jsonl", "rollouts.jsonl")

# How many records of other groups may stand between two records of one group before
# the group is considered complete (grpoctl's own files keep groups adjacent: 0).
LOOKAHEAD = 256


# --- where the records are ------------------------------------------------------------


def step_dir(run: Path, step: int) -> Path:
    return run / f"step-{step:06d}"  # the layout grpoctl/loop.py writes


def finished_steps(run: Path) -> list[int]:
    """The steps of a run directory that have a `done` file, in order."""
    steps = []
    for d in run.glob("step-*"):
        number = d.name[len("step-"):]
        if number.isdigit() and (d / "done").is_file():
            steps.append(int(number))
    return sorted(steps)


def check_run_dir(run: Path) -> None:
    """A directory `grpoctl loop` wrote, in the current layout, or a one-line error."""
    if not (run / "config.json").is_file():
        raise GrpoctlError(f"{run}: not a run directory (no config.json); give a records file "
                           "or a directory written by `grpoctl loop`")
    if not any(run.glob("step-[0-9][0-9][0-9][0-9][0-9][0-9]")):
        raise GrpoctlError(f"{run}: no step-NNNNNN/ directories: a run directory of an older "
                           "layout or one with no step yet; run it again with this grpoctl")


def step_file(run: Path, step: int) -> Path:
    """The richest records file of one step (advantages > scored > rollouts)."""
    directory = step_dir(run, step)
    if not directory.is_dir():
        steps = finished_steps(run)
        have = f"finished steps: {steps[0]}..{steps[-1]}" if steps else "no finished step"
        raise GrpoctlError(f"{directory}: missing; the run has no step {step} ({have})")
    for name in STEP_FILES:
        if (directory / name).is_file():
            return directory / name
    raise GrpoctlError(f"{directory}: holds no records file ({', '.join(STEP_FILES)})")


def last_step(run: Path) -> int:
    steps = finished_steps(run)
    if not steps:
        raise GrpoctlError(f"{run}: no finished step yet (no step-NNNNNN/done); give --step N "
                           "for an unfinished one")
    return steps[-1]


def resolve_source(path: str, step: int | None = None) -> str:
    """A records file as given, or the file of a run's step (default: the last finished)."""
    if path != STDIO and os.path.isdir(path):
        run = Path(path)
        check_run_dir(run)
        return str(step_file(run, step if step is not None else last_step(run)))
    if step is not None:
        raise GrpoctlError(f"{path}: --step applies to a run directory, not a records file")
    if path != STDIO and not os.path.exists(path):
        raise GrpoctlError(f"{path}: no such file or run directory")
    return path


# --- reading, line by line --------------------------------------------------------------


def stream_records(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each record of a JSONL file, validated one line at a time.

    The same checks as records.read_records (a known field that is present must be well
    formed; errors name the file, the line and the field), but the file is never read
    whole: reading stops when the caller stops asking.
    """
    source = source_name(path)
    try:
        f = sys.stdin.buffer if path == STDIO else open(path, "rb")
    except IsADirectoryError:
        raise GrpoctlError(f"{source}: is a directory, expected a JSONL file") from None
    except OSError as e:
        raise GrpoctlError(f"{source}: cannot read: {e.strerror}") from None
    try:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:  # records' own parser, on one line: its messages, this file's line numbers
                record = next(iter_jsonl(raw.rstrip(b"\n"), source))[1]
                check_record(record, ("prompt_id",), source, lineno)
            except RecordError as e:
                raise RecordError(source, lineno, e.field, e.reason) from None
            yield lineno, record
    finally:
        if f is not sys.stdin.buffer:
            f.close()


@dataclass
class Group:
    """The records of one prompt_id, in file order, and the line of the first."""

    prompt_id: str
    line: int
    records: list = field(default_factory=list)


def stream_groups(path: str, lookahead: int = LOOKAHEAD) -> Iterator[Group]:
    """Groups (same prompt_id) in the order their first record appears.

    A group is handed out once `lookahead` records of other groups have followed its
    last record, or at the end of the file: memory is bounded by the open groups. A
    record of a group already handed out (more than `lookahead` records away) is an
    error naming its line: the file does not keep its groups together.
    """
    open_groups: OrderedDict[str, Group] = OrderedDict()
    last_seen: dict[str, int] = {}
    closed: set[str] = set()
    count = 0
    source = source_name(path)
    for lineno, record in stream_records(path):
        pid = record["prompt_id"]
        if pid in closed:
            raise RecordError(source, lineno, "prompt_id",
                              f"{pid!r} continues a group that ended more than {lookahead} "
                              "records earlier; show reads groups whose records are near "
                              "each other (sort the file by prompt_id)")
        group = open_groups.get(pid)
        if group is None:
            group = open_groups[pid] = Group(pid, lineno)
        group.records.append(record)
        last_seen[pid] = count
        count += 1
        while open_groups:  # hand out the oldest groups nobody has added to lately
            oldest = next(iter(open_groups))
            if oldest == pid or count - last_seen[oldest] <= lookahead:
                break
            closed.add(oldest)
            del last_seen[oldest]
            yield open_groups.pop(oldest)
    yield from open_groups.values()


# --- what a record says ------------------------------------------------------------


def is_right(record: dict) -> bool | None:
    """Whether a completion's answer is right: rewards.math == 1 where scored with math,
    else reward > 0 where scored, else (a rollouts file) the extracted answer equal to
    the gold one by the math reward's exact fast path; None when that cannot tell (no
    gold answer, or a pair only math-verify could judge)."""
    components = record.get("rewards")
    if isinstance(components, dict) and "math" in components:
        return components["math"] >= 1.0
    if "reward" in record:
        return record["reward"] > 0
    gold = record.get("answer")
    if gold is None:
        return None
    found = extract_answer(record.get("completion", ""))
    return False if found is None else match_without_sympy(gold, found)


def tokens_of(record: dict) -> int | None:
    ids = record.get("completion_ids")
    return len(ids) if isinstance(ids, list) else None


def group_kind(group: Group) -> str | None:
    """"tied" when every completion got the same reward (zero advantage: no gradient),
    "contrastive" otherwise; None for unscored records."""
    rewards = [r.get("reward") for r in group.records]
    if any(v is None for v in rewards):
        return None
    return "tied" if max(rewards) - min(rewards) < 1e-9 else "contrastive"


def explain(record: dict) -> dict:
    """{"extracted", "rule", "why"}: the answer found in a completion, the rule that
    found it and what decided the verdict. Uses answers.judge_answer where this grpoctl
    has it: the checks of rewards.explain_math (final form, hedging, restating the
    prompt) without its in-process math-verify call, which has no time limit and would
    let one pathological completion stall a listing of thousands. Else extract_answer."""
    from grpoctl import answers

    completion, gold = record.get("completion", ""), record.get("answer")
    judge = getattr(answers, "judge_answer", None)
    if judge is not None and gold is not None:
        try:
            found = judge(completion, gold, record.get("prompt"))
            return {"extracted": found.get("answer"), "rule": found.get("rule"),
                    "why": found.get("source")}
        except Exception:  # a helper's bug must not hide the records
            pass
    return {"extracted": extract_answer(completion), "rule": None, "why": None}


# --- which groups ---------------------------------------------------------------------


@dataclass
class Filters:
    tied: bool = False
    contrastive: bool = False
    wrong: bool = False
    right: bool = False
    prompt_id: str | None = None
    grep: str | None = None

    def __post_init__(self):
        if self.tied and self.contrastive:
            raise GrpoctlError("--tied and --contrastive exclude each other; give one")
        try:
            self.pattern = re.compile(self.grep) if self.grep else None
        except re.error as e:
            raise GrpoctlError(f"--grep {self.grep!r}: not a regular expression ({e})") from None

    def keep(self, group: Group) -> bool:
        if self.prompt_id and not fnmatch.fnmatchcase(group.prompt_id, self.prompt_id):
            return False
        kind = group_kind(group)
        if (self.tied and kind != "tied") or (self.contrastive and kind != "contrastive"):
            return False
        verdicts = [is_right(r) for r in group.records]
        if self.wrong and False not in verdicts:
            return False
        if self.right and True not in verdicts:
            return False
        if self.pattern is not None:
            first = group.records[0]
            texts = [first.get("prompt") or "", first.get("answer") or "", group.prompt_id]
            texts += [r.get("completion") or "" for r in group.records]
            if not any(self.pattern.search(t) for t in texts):
                return False
        return True


def select_groups(path: str, filters: Filters, limit: int | None) -> Iterator[Group]:
    """The groups of a file that pass the filters, at most `limit` (None: all); reading
    stops at the limit."""
    shown = 0
    for group in stream_groups(path):
        if limit is not None and shown >= limit:
            return
        if filters.keep(group):
            shown += 1
            yield group


# --- per-token figures ---------------------------------------------------------------


def policy_token_stats(groups: list[Group], policy: str, device: str = "cpu") -> dict:
    """{(prompt_id, sample): (log-probs, entropies)} of each completion's tokens under
    `policy`, from one forward pass per group. Needs torch (imported here only)."""
    import torch

    from grpoctl.logprobs import completion_logprobs
    from grpoctl.models import check_model_dir, load_policy, resolve_model_dir

    path = check_model_dir(resolve_model_dir(policy))
    model = load_policy(path, device=device)
    stats = {}
    with torch.no_grad():
        for group in groups:
            rows = [r for r in group.records if r.get("prompt_ids") and "completion_ids" in r]
            if not rows:
                continue
            temperature = (rows[0].get("sampling") or {}).get("temperature", 1.0) or 1.0
            logprobs, entropies = completion_logprobs(
                model, [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows],
                temperature=temperature, with_entropy=True)
            for r, lp, ent in zip(rows, logprobs, entropies):
                stats[(r["prompt_id"], r.get("sample"))] = (lp.tolist(), ent.tolist())
    return stats


def token_texts(model: str | None, ids: set[int]) -> dict[int, str]:
    """Each token id decoded alone with the model's tokenizer; {} without a model."""
    if not model:
        return {}
    from grpoctl.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    return {i: tokenizer.decode([i]) for i in sorted(ids)}


def run_model(source: str) -> str | None:
    """The model a run directory's config.json names, for a step file inside a run."""
    if not Path(source).parent.name.startswith("step-"):
        return None
    config = Path(source).parent.parent / "config.json"
    try:
        model = json.loads(config.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


# --- printing --------------------------------------------------------------------------


# C0 controls but newline and tab, DEL, and C1: what a terminal acts on instead of showing.
# rich.text.Text drops only BEL, BS, VT, FF and CR; ESC would pass through.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text) -> str:
    """Model or record text made safe to print on a terminal: each control character
    (C0 but newline and tab, DEL, C1) becomes a visible escape, ESC -> `\\x1b`, so a
    completion cannot set the terminal's title, clear the screen or move the cursor."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def _fmt(x) -> str:
    if x is None:
        return "—"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.3g}"


def _shade(logprob: float) -> str:
    """A background from none (p ≈ 1) to red (p ≈ 0): where the sampler was unsure."""
    p = math.exp(min(0.0, logprob))
    if p > 0.9:
        return ""
    level = int(255 - 155 * (1 - p))
    return f"on rgb(255,{level},{level})" if p > 0.5 else f"on rgb(200,{int(60 + 80 * p)},0)"


def render_group(console, group: Group, tokens: bool = False, texts: dict | None = None,
                 policy_stats: dict | None = None) -> None:
    """Print one group. Model text goes through rich.text.Text, never markup: a
    completion holding `[bold]` prints literally, and through visible(): its control
    characters print as escapes and never reach the terminal."""
    from rich.text import Text

    first = group.records[0]
    kind = group_kind(group)
    rewards = [r.get("reward") for r in group.records]
    head = Text(f"── {visible(group.prompt_id)}", style="bold cyan")
    head.append(f"  line {group.line}, {len(group.records)} completions", style="dim")
    if kind:
        head.append(f", {kind}", style="yellow" if kind == "tied" else "green")
        head.append(" (rewards " + " | ".join(_fmt(v) for v in rewards) + ")", style="dim")
    console.print(head, soft_wrap=True)
    if "prompt" in first:
        console.print(Text("prompt: ", style="bold").append(Text(visible(first["prompt"]))),
                      soft_wrap=True)
    console.print(Text("gold:   ", style="bold").append(Text(visible(first.get("answer")))),
                  soft_wrap=True)
    for r in group.records:
        right = is_right(r)
        info = explain(r)
        line = Text(f"  #{r.get('sample', '?')}", style="bold")
        if "reward" in r:
            parts = ", ".join(f"{k} {_fmt(v)}" for k, v in (r.get("rewards") or {}).items())
            line.append(f"  reward {_fmt(r['reward'])}" + (f" ({parts})" if parts else ""))
        if "advantage" in r:
            adv = r["advantage"]
            line.append(f"  adv {adv:+.2f}", style="green" if adv > 0 else "red" if adv < 0 else "")
        n = tokens_of(r)
        if n is not None:
            line.append(f"  {n} tok")
        finish = r.get("finish_reason")
        if finish:
            line.append(f"  {'stop' if finish == 'stop' else 'cut at limit'}",
                        style="" if finish == "stop" else "magenta")
        line.append("  answer ")
        line.append(Text(visible(info["extracted"])))
        if info["rule"]:
            line.append(f" ({visible(info['rule'])}; {visible(info['why'])})", style="dim")
        mark = {True: " ✓ right", False: " ✗ wrong", None: " ? unjudged"}[right]
        line.append(mark, style={True: "green", False: "red", None: "dim"}[right])
        console.print(line, soft_wrap=True)
        if tokens and "logprobs" in r:
            stats = (policy_stats or {}).get((r["prompt_id"], r.get("sample")))
            console.print(token_line(r, texts or {}, console.is_terminal, stats), soft_wrap=True)
        else:
            console.print(Text("    ").append(Text(visible(r.get("completion", "")))),
                          soft_wrap=True)
    console.print()


def token_line(record: dict, texts: dict, colour: bool, stats=None):
    """The completion token by token. In colour: each token shaded by its log-prob (or,
    given a policy's stats, by the ratio to it). In plain text: tokens joined by `|`,
    each unlikely one (p < 0.5) followed by its log-prob in ⟨⟩."""
    from rich.text import Text

    line = Text("    ")
    ids, lps = record.get("completion_ids") or [], record["logprobs"]
    new_lps, entropies = stats if stats else (None, None)
    for i, lp in enumerate(lps):
        tid = ids[i] if i < len(ids) else None
        piece = visible(texts.get(tid, f"[{tid}]")) if texts else f"{tid}"
        note = ""
        if new_lps is not None:
            ratio = math.exp(new_lps[i] - lp)
            if abs(ratio - 1) > 0.2 or not colour:
                note = f"⟨r {ratio:.2f} H {entropies[i]:.2f}⟩"
            style = "" if abs(ratio - 1) <= 0.2 else ("on blue" if ratio > 1 else "on dark_orange")
        else:
            if lp < math.log(0.5) or (not texts and not colour):
                note = f"⟨{lp:.2f}⟩"
            style = _shade(lp)
        if colour:
            line.append(Text(piece, style=style))
            if note:
                line.append(note, style="dim")
        else:
            line.append(("|" if i else "") + piece + note)
    if new_lps is not None:
        mean_h = sum(entropies) / max(1, len(entropies))
        line.append(f"   (mean entropy {mean_h:.3f})", style="dim")
    return line


def show(path: str, step: int | None = None, filters: Filters | None = None,
         limit: int | None = 20, tokens: bool = False, model: str | None = None,
         policy: str | None = None, device: str = "cpu", console=None) -> int:
    """Print the groups of a records file or run step; returns how many were shown."""
    from rich.console import Console

    source = resolve_source(path, step)
    filters = filters or Filters()
    console = console or Console(highlight=False)
    if policy and not tokens:
        raise GrpoctlError("--policy shades the tokens: give it with --tokens")
    if not tokens:  # stream: each group is printed as soon as it is complete
        shown = 0
        for group in select_groups(source, filters, limit):
            render_group(console, group)
            shown += 1
    else:  # the tokenizer and the policy run once over the groups to show
        groups = list(select_groups(source, filters, limit))
        ids = {t for g in groups for r in g.records for t in r.get("completion_ids") or []}
        texts = token_texts(model or run_model(source), ids)
        stats = policy_token_stats(groups, policy, device) if policy else None
        for group in groups:
            render_group(console, group, True, texts, stats)
        shown = len(groups)
    if shown == 0:
        print(f"show: no group of {source_name(source)} matches the filters", file=sys.stderr)
    return shown
