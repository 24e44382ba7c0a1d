"""The score stage: reward functions, and scoring a list of records with them.

A reward spec names one reward and, optionally, its weight: `NAME[=WEIGHT]` (weight 1).

    math            1.0 if the completion's final answer equals the record's gold `answer`,
                    else 0.0 (the verifiable reward of the paper, DeepSeek-R1 and TRL's
                    accuracy_reward), credited only to a final answer: not hedged, no
                    arithmetic left undone, not the prompt's expression (answers.judge_answer;
                    math-verify decides what the exact checks cannot).
    format          1.0 if the completion's answer is one \\boxed{...} holding a final
                    answer (the same form rule, without the gold), else 0.0.
    format:REGEX    1.0 if re.search(REGEX, completion, re.DOTALL) matches, else 0.0
                    (^ and $ anchor the whole completion; e.g. 'format:^<think>.*</think>').
    path/to/f.py:fn a user function, loaded from a file (a name ending in .py or containing /)
    module:fn       ... or from an importable module. Called by keyword with the arguments
                    it names among completion, answer, record and prompt (all four to a
                    **kwargs), so TRL-style `def fn(completion, **kwargs)` works; a function
                    whose parameters have other names gets (completion, answer, record) by
                    position. Returns a finite number, or a dict of named components, each
                    weighted by the spec's weight. What it prints goes to stderr.
A target that itself ends in `=<number>` (a regex) needs an explicit weight: `format:a=1=1`.

Each record gets `rewards` = {component name: unweighted value} and `reward` =
sum of weight x value (default specs: ["math"]). Other fields are kept unchanged.

How `math` stays fast and safe (see docs/rewards.md):
  1. extract the final answer first (never hand a whole completion to sympy);
  2. answers.match_without_sympy decides identical/plain-number pairs at once;
  3. the rest are deduplicated as (gold, answer) pairs, cached for the life of the process,
     sorted by gold (each distinct gold is parsed once per worker) and verified by
     math-verify in forked workers (scoring_pool), each pair with its own time limit,
     counted in the worker's CPU time (so a loaded machine gives the same verdicts).
     math-verify's own signal.alarm timeouts are off (parsing_timeout=None,
     timeout_seconds=None): they fail outside the main thread, and the pool's limits
     replace them. A pair over the limit, or one that crashes, scores 0 and is reported.
User rewards and `format` run in the calling process, without a time limit.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from grpoctl import process, scoring_pool
from grpoctl.answers import RULE_BOX, answer_form, find_answer, judge_answer
from grpoctl.config import ScoreSettings
from grpoctl.errors import GrpoctlError
from grpoctl.hacks import hack_rate
from grpoctl.records import (MAX_MAGNITUDE, NEEDS_SCORE, RecordError, check_output, line_of,
                             read_records, shown, source_name, write_records)

DEFAULT_SPECS = ("math",)
DEFAULT_TIMEOUT_S = ScoreSettings.score_timeout  # declared in config.py
SPEC_HELP = "math, format, format:REGEX, path/to/file.py:fn or module:fn, each optionally =WEIGHT"
MAX_WARNINGS = 20  # per-item warnings printed on stderr before summarising the rest


# --- reward specs --------------------------------------------------------------


@dataclass
class RewardSpec:
    """One weighted reward: `kind` is "math", "format" or "user"."""

    text: str  # as the user wrote it, for messages
    name: str  # the key in `rewards` (for a user function: the function's name)
    weight: float
    kind: str
    pattern: re.Pattern | None = None  # format:REGEX
    fn: Callable | None = field(default=None, repr=False)  # user function
    # The user function's keyword arguments (of USER_ARGUMENTS); None: (completion, answer,
    # record) by position
    keywords: tuple[str, ...] | None = None


def parse_reward_spec(text: str) -> RewardSpec:
    """Parse one `NAME[=WEIGHT]` spec (see the module docstring); user code is imported here."""
    target, weight = text.strip(), 1.0
    head, eq, tail = target.rpartition("=")
    if eq:
        try:
            weight = float(tail)
            target = head.strip()
        except ValueError:
            pass  # no weight: the "=" belongs to the target (a regex)
    if not math.isfinite(weight):
        raise GrpoctlError(f"reward '{text}': weight must be a finite number, got {tail!r}")
    if target == "math":
        return RewardSpec(text, "math", weight, "math")
    if target == "format":
        return RewardSpec(text, "format", weight, "format")
    if target.startswith("format:"):
        try:
            pattern = re.compile(target[len("format:"):], re.DOTALL)
        except re.error as e:
            raise GrpoctlError(f"reward '{text}': invalid regular expression: {e}") from None
        return RewardSpec(text, "format", weight, "format", pattern=pattern)
    if ":" in target:
        fn = load_user_reward(target)
        return RewardSpec(text, getattr(fn, "__name__", target.rpartition(":")[2]), weight,
                          "user", fn=fn, keywords=reward_keywords(fn, target))
    raise GrpoctlError(f"unknown reward '{text}'; expected {SPEC_HELP}")


def parse_reward_specs(texts: Iterable[str | RewardSpec] | None = None) -> list[RewardSpec]:
    """Parse specs like ["math=1", "format=0.1", "my.py:fn=0.5"]; None or [] -> ["math"].

    Items that are already RewardSpec objects pass through. Two specs writing the same
    component name are an error.
    """
    specs = [t if isinstance(t, RewardSpec) else parse_reward_spec(t)
             for t in (list(texts or []) or DEFAULT_SPECS)]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise GrpoctlError(f"rewards '{seen[spec.name]}' and '{spec.text}' both write the "
                               f"component '{spec.name}'; give one reward per name")
        seen[spec.name] = spec.text
    return specs


def load_user_reward(target: str) -> Callable:
    """Import `path/to/file.py:fn` or `module:fn`; check it takes (completion, answer, record)."""
    import importlib
    import importlib.util
    import os

    where, _, fn_name = target.rpartition(":")
    if not where or not fn_name:
        raise GrpoctlError(f"reward '{target}': expected path/to/file.py:fn or module:fn")
    try:
        with stdout_to_stderr():  # what the module prints as it loads is not a record
            if where.endswith(".py") or "/" in where or os.sep in where:
                if not os.path.isfile(where):
                    raise GrpoctlError(f"reward '{target}': no such file {where}")
                module_name = f"grpoctl_user_reward_{abs(hash(os.path.abspath(where)))}"
                spec = importlib.util.spec_from_file_location(module_name, where)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module  # so dataclasses/pickle inside it work
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(where)
    except (GrpoctlError, KeyboardInterrupt):
        raise
    except BaseException as e:  # sys.exit() at import time too: one line, not a silent exit
        what = (f"called sys.exit({shown(e.code)})" if isinstance(e, SystemExit)
                else f"failed: {type(e).__name__}: {_message(e)}")
        raise GrpoctlError(f"reward '{target}': importing {where} {what}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise GrpoctlError(f"reward '{target}': {where} has no function '{fn_name}'")
    reward_keywords(fn, target)  # refuses a signature it cannot be called with
    return fn


# What a user reward can ask for, by name.
USER_ARGUMENTS = ("completion", "answer", "record", "prompt")


def reward_keywords(fn: Callable, target: str = "") -> tuple[str, ...] | None:
    """How to call a user reward: the USER_ARGUMENTS it takes by keyword (all four when it
    has **kwargs), or None for (completion, answer, record) by position, the form for
    functions whose parameters have other names (and builtins without a signature).
    Raises GrpoctlError when neither fits."""
    import inspect

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # a builtin without a signature: trust it
    params = list(signature.parameters.values())
    by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    required = [p for p in params if p.default is p.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if any(p.kind == p.VAR_KEYWORD for p in params):
        names = USER_ARGUMENTS
    else:
        names = tuple(n for n in USER_ARGUMENTS
                      if n in signature.parameters and signature.parameters[n].kind in by_keyword)
    if names and all(p.name in names and p.kind in by_keyword for p in required):
        return names
    try:
        signature.bind("completion", "answer", {})
        return None
    except TypeError:
        name = getattr(fn, "__name__", "the function")
        raise GrpoctlError(f"reward '{target}': {name} must accept (completion, answer, record), "
                           f"or keyword arguments among {', '.join(USER_ARGUMENTS)} "
                           f"(e.g. def {name}(completion, **kwargs))") from None


# --- the built-in rewards, one completion at a time -----------------------------


def format_reward(completion: str, pattern: re.Pattern | None = None,
                  prompt: str | None = None) -> float:
    """1.0 if the completion's answer is one non-empty \\boxed{} holding a final answer,
    or if it matches `pattern`; else 0.0.

    A final answer, without looking at the gold: one candidate (boxes that disagree are
    not one answer), no arithmetic on literal numbers left undone (`8 + 4`), not an
    expression copied from the prompt. A box of the question's own sum earned `format`
    while every honest wrong answer earned nothing, and a SmolLM2 run learned to write it.
    A regex (`format:REGEX`) sees text only, as written.
    """
    if pattern is not None:
        return 1.0 if pattern.search(completion) else 0.0
    answer, rule, hedged = find_answer(completion)
    if rule != RULE_BOX or hedged:
        return 0.0
    form = answer_form(answer, None, prompt)
    return 1.0 if form["final"] and not form["hedged"] and not form["restates_prompt"] else 0.0


def _text_or_none(value) -> str | None:
    return value if isinstance(value, str) else None


def explain_math(completion: str, gold: str, prompt: str | None = None) -> dict:
    """Why the `math` reward gives what it gives (for `score --explain`): the extracted
    answer, the rule that found it, the normalised gold, whether the answer is in final
    form, hedged, or restates the prompt, the verdict's source ("fast path",
    "math-verify", "not final", "hedged", "restates the prompt", "no answer") and the
    reward. The reward itself uses the same answers.judge_answer; only math-verify runs
    here in-process, without a time limit.
    """
    out = judge_answer(completion, gold, prompt)
    if out["verdict"] is None:
        out["verdict"] = verify_answer((gold, out["pred"]))
    out.pop("pred", None)
    out["reward"] = float(out["verdict"])
    return out


def math_reward(completion: str, answer: str, prompt: str | None = None) -> float:
    """1.0 if the completion's final answer equals the gold `answer`, else 0.0 (a hedged
    answer, one not in final form, or an expression copied from `prompt` gets 0).

    In-process and without a time limit: for one-off use. score_records scores many
    records with caching, parallel workers and per-item limits.
    """
    return explain_math(completion, answer, prompt)["reward"]


_math_verify = None
_gold_cache: dict[str, list] = {}  # per process: a worker parses each distinct gold once
_GOLD_CACHE_MAX = 4096


def _load_math_verify():
    """Import math-verify (about 0.7 s, so only when `math` is used) and warm it up, so
    that forked workers inherit compiled regexes and a loaded sympy."""
    global _math_verify
    if _math_verify is None:
        import logging

        import math_verify

        # Its per-call warnings ("timeout disabled", "timeout during parsing") are noise
        # here: the pool enforces the limits and reports timeouts itself.
        logging.getLogger("math_verify").setLevel(logging.CRITICAL)
        _math_verify = math_verify
        verify_answer(("1", "1"))
    return _math_verify


def _boxed(latex: str) -> str:
    # Gold and prediction are both bare LaTeX; wrapping them the same way sends both
    # through the same extraction path of math-verify.
    return "\\boxed{" + latex + "}"


def verify_answer(pair: tuple[str, str]) -> bool:
    """math-verify's verdict on (gold, predicted answer), both bare LaTeX. No time limit."""
    mv = _load_math_verify()
    gold, pred = pair
    parsed_gold = _gold_cache.get(gold)
    if parsed_gold is None:
        parsed_gold = mv.parse(_boxed(gold), parsing_timeout=None)
        if len(_gold_cache) >= _GOLD_CACHE_MAX:
            _gold_cache.clear()
        _gold_cache[gold] = parsed_gold
    parsed_pred = mv.parse(_boxed(pred), parsing_timeout=None)
    return bool(mv.verify(parsed_gold, parsed_pred, timeout_seconds=None))


# Verdicts of math-verify, kept for the life of the process (loop.py scores every step
# in one process, and the same (gold, answer) pairs recur). Timeouts are not cached, nor
# long pairs, so the cache stays under about 100 MB.
_verdict_cache: dict[tuple[str, str], bool] = {}
_VERDICT_CACHE_MAX = 100_000
_VERDICT_CACHE_MAX_CHARS = 1_000  # per pair


# --- scoring records ----------------------------------------------------------------


class _SigintWatch:
    """Tells a real Ctrl-C from a KeyboardInterrupt a user reward raised itself: while
    user code runs on the main thread, SIGINT also sets `received`."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if callable(previous):  # Python's handler or the caller's own; not SIG_IGN/SIG_DFL
                def handler(signum, frame):
                    self.received = True
                    previous(signum, frame)

                self._previous = previous
                signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


@contextlib.contextmanager
def stdout_to_stderr():
    """While user code runs, what it prints goes to stderr: stdout may be carrying the
    records (`grpoctl score | grpoctl advantage`). Both sys.stdout and file descriptor 1
    (what C code and subprocesses write to) are redirected."""
    with contextlib.suppress(Exception):  # a closed or broken stdout: flushed later, or not
        sys.stdout.flush()
    saved = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no fd 1 or 2: only the Python-level redirection
        if saved is not None:
            os.close(saved)
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _user_value(spec: RewardSpec, record: dict, source: str, line: int,
                sigint: _SigintWatch | None = None) -> dict[str, float]:
    """Call a user reward on one record; return its components, all finite floats of at
    most MAX_MAGNITUDE. Anything else, and any exception or exit, is a RecordError naming
    the reward and the record."""
    field_name = f"rewards.{spec.name}"
    where = f"reward '{spec.text}'"
    if spec.keywords is None or "record" in spec.keywords:
        record = copy.deepcopy(record)  # what the reward changes in it is not written
    try:
        if spec.keywords is None:
            out = spec.fn(record["completion"], record.get("answer"), record)
        else:
            available = {"completion": record["completion"], "answer": record.get("answer"),
                         "record": record, "prompt": record.get("prompt")}
            out = spec.fn(**{k: available[k] for k in spec.keywords})
    except Exception as e:
        raise RecordError(source, line, field_name,
                          f"{where} raised {type(e).__name__}: {_message(e)}") from None
    except BaseException as e:  # sys.exit(), KeyboardInterrupt, GeneratorExit ... from user code
        if isinstance(e, KeyboardInterrupt) and (sigint is None or sigint.received
                                                 or process.terminated_by):
            raise  # a real Ctrl-C (or SIGTERM/SIGHUP): the CLI says "interrupted"
        what = (f"called sys.exit({shown(e.code)})" if isinstance(e, SystemExit)
                else f"raised {type(e).__name__}" + (f": {_message(e)}" if str(e) else ""))
        raise RecordError(source, line, field_name,
                          f"{where} {what}; a reward must return a number") from None
    values = out if isinstance(out, dict) else {spec.name: out}
    components = {}
    for name, v in values.items():
        problem = None
        if not _is_number(v):
            problem = "a reward must be a finite number"
        else:
            try:
                value = float(v)
            except (OverflowError, ValueError, TypeError):
                value = math.inf
            if not math.isfinite(value):
                problem = "a reward must be a finite number"
            elif abs(value) > MAX_MAGNITUDE:
                problem = f"a reward must be at most {MAX_MAGNITUDE:g} in size"
        if problem:
            returned = f"{{{shown(name)}: {shown(v)}}}" if isinstance(out, dict) else shown(v)
            raise RecordError(source, line, field_name, f"{where} returned {returned}; {problem}")
        components[str(name)] = value
    return components


def _is_number(v) -> bool:
    """int, float, bool and numpy's real scalars, numpy.bool_ included (not numbers.Real)."""
    if isinstance(v, numbers.Real):
        return True
    numpy = sys.modules.get("numpy")  # never imported here: a numpy value means it is loaded
    return numpy is not None and isinstance(v, (numpy.bool_, numpy.integer, numpy.floating))


def _message(e: BaseException) -> str:
    """An exception's message on one line, kept short."""
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _check_gold_answers(records: Sequence[dict], source: str) -> None:
    for i, r in enumerate(records):
        answer = r.get("answer")
        if answer is None:
            raise RecordError(source, line_of(records, i), "answer",
                              "is missing or null; the 'math' reward needs a gold answer "
                              "(score unlabeled prompts with a user reward instead)")
        if not isinstance(answer, str) or not answer.strip():
            raise RecordError(source, line_of(records, i), "answer",
                              f"expected a non-empty string, got {answer!r}")


class _Reporter:
    """stderr output: a progress bar while workers run, one line per problem item."""

    def __init__(self, show_progress: bool):
        self.show_progress = show_progress
        self.warnings = 0
        self._console = None

    @property
    def console(self):
        if self._console is None:  # rich is imported only when there is something to show
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False, soft_wrap=True)  # one line each
        return self._console

    def warn(self, text: str) -> None:
        self.warnings += 1
        if self.warnings <= MAX_WARNINGS:
            self.console.print(f"warning: {text}", markup=False)

    def finish(self) -> None:
        if self.warnings > MAX_WARNINGS:
            self.console.print(f"warning: ... and {self.warnings - MAX_WARNINGS} more "
                               "(counted in the stats)", markup=False)


def _judge_math(records: Sequence[dict], workers: int | None, timeout: float,
                reporter: _Reporter, source: str, stats: dict,
                judgements: list) -> list[float]:
    """The `math` component of every record (the slow part of scoring). judgements[i]
    gets record i's answers.judge_answer dict: `--explain` and the hack rate read the
    same verdicts (math-verify runs once, in the pool, under its time limit)."""
    values = [0.0] * len(records)
    waiting: dict[tuple[str, str], list[int]] = {}  # pairs math-verify must judge -> records
    for i, r in enumerate(records):
        gold = r["answer"]
        prompt = r.get("prompt")
        # The prompt-dependent checks (restated expressions) are decided here, before the
        # (gold, answer) cache, whose verdicts hold for any prompt.
        judged = judge_answer(r["completion"], gold, _text_or_none(prompt))
        judgements[i] = judged
        if judged["answer"] is None:
            stats["no_answer"] += 1
            continue
        if judged["verdict"] is not None:
            stats["fast_path" if judged["source"] == "fast path" else "refused"] += 1
            values[i] = float(judged["verdict"])
            continue
        pred = judged["pred"]
        if (gold, pred) in _verdict_cache:
            stats["cached"] += 1
            values[i] = float(_verdict_cache[(gold, pred)])
        else:
            waiting.setdefault((gold, pred), []).append(i)
    if not waiting:
        return values

    pairs = sorted(waiting)  # by gold: each worker's chunk shares golds, parsed once
    stats["verified"] = len(pairs)
    _load_math_verify()  # import and warm up before forking

    progress = task = None
    if reporter.show_progress and len(pairs) >= 64:
        from rich.progress import Progress

        # auto_refresh=False: no display thread while workers are forked
        progress = Progress(console=reporter.console, transient=True, auto_refresh=False)
        task = progress.add_task("math-verify", total=len(pairs))
        progress.start()
    last_refresh = 0.0

    def on_result(index: int, outcome: scoring_pool.Outcome) -> None:
        nonlocal last_refresh
        rows = waiting[pairs[index]]
        if outcome.status == scoring_pool.OK:
            gold, pred = pairs[index]
            if len(gold) + len(pred) <= _VERDICT_CACHE_MAX_CHARS:
                if len(_verdict_cache) >= _VERDICT_CACHE_MAX:
                    _verdict_cache.clear()
                _verdict_cache[gold, pred] = bool(outcome.value)
            for i in rows:
                values[i] = float(outcome.value)
        else:
            key = "timeouts" if outcome.status == scoring_pool.TIMEOUT else "errors"
            stats[key] += len(rows)
            what = "timed out" if key == "timeouts" else "failed"
            more = (f" (and {len(rows) - 1} more records with the same answer)"
                    if len(rows) > 1 else "")
            reporter.warn(f"{source}:{line_of(records, rows[0])}: math reward {what} "
                          f"({outcome.message}); reward 0{more}")
        if progress is not None:
            progress.advance(task)
            now = time.monotonic()
            if now - last_refresh > 0.1:
                progress.refresh()
                last_refresh = now

    try:
        scoring_pool.run_pool(verify_answer, pairs, workers=workers, timeout=timeout,
                              on_result=on_result)
    finally:
        if progress is not None:
            progress.stop()
    return values


def _explained(judged: dict, value: float) -> dict:
    """explain_math's dict from judge_answer's and the reward the pool gave (a time-out
    or an error gives 0, as the reward)."""
    out = {k: v for k, v in judged.items() if k != "pred"}
    if out["verdict"] is None:
        out["verdict"] = bool(value)
    out["reward"] = float(value)
    return out


def score_records(records: Sequence[dict], score: ScoreSettings | None = None, *,
                  progress: bool = True, source: str = "<records>",
                  explain: bool = False) -> tuple[list[dict], dict]:
    """Score records; return (new records with `rewards` and `reward`, stats).

    score: the `score` stage's settings [default: ScoreSettings(), the `math` reward]:
        rewards: RewardSpec objects or spec strings.
        score_workers: math-verify processes (None = os.cpu_count(); 0 = in this process,
            no hard limit).
        score_timeout: CPU seconds allowed per distinct (gold, answer) pair; over it -> 0
            (CPU time, not wall time: the verdict does not depend on the machine's load;
            scoring_pool).
    progress: show a progress bar on stderr when many pairs go to math-verify.
    source: the file name used in error messages (lines as records.line_of finds them).
    explain: add `explain` to each record, why `math` gave its reward (explain_math's
        dict, from the verdicts scored here; needs the `math` reward).
    stats: n, reward_mean, component_means, hack_rate (hacks.hack_rate: the share of
        credited records whose answer looks gamed), and for `math`: fast_path (decided
        without sympy), refused (hedged, not in final form, or restating the prompt: 0
        without sympy), cached, verified (distinct pairs sent to math-verify), no_answer,
        timeouts, errors (records), workers, seconds, records_per_s.
    """
    start = time.perf_counter()
    score = score or ScoreSettings()
    score.check()
    specs = parse_reward_specs(score.rewards)
    workers, timeout = score.score_workers, score.score_timeout
    for i, r in enumerate(records):
        if not isinstance(r.get("completion"), str):
            raise RecordError(source, line_of(records, i), "completion", "missing or not a string")
    if any(spec.kind == "math" for spec in specs):
        _check_gold_answers(records, source)
    elif explain:
        raise GrpoctlError("--explain tells why the `math` reward gave its value: add "
                           "--reward math")
    judgements = [None] * len(records)  # the math reward's, per record (_judge_math)
    stats = {"n": len(records), "fast_path": 0, "refused": 0, "cached": 0, "verified": 0, "no_answer": 0,
             "timeouts": 0, "errors": 0,
             "workers": scoring_pool.default_workers() if workers is None else workers}
    reporter = _Reporter(progress)

    # The cheap rewards first, so a broken user reward fails before the slow math.
    per_spec: dict[int, list[dict[str, float]]] = {}
    for k, spec in enumerate(specs):
        if spec.kind == "format":
            per_spec[k] = [{spec.name: format_reward(r["completion"], spec.pattern,
                                                     _text_or_none(r.get("prompt")))}
                           for r in records]
        elif spec.kind == "user":
            with stdout_to_stderr(), _SigintWatch() as sigint:
                per_spec[k] = [_user_value(spec, r, source, line_of(records, i), sigint)
                               for i, r in enumerate(records)]
            if sigint.received:  # a Ctrl-C the reward caught and carried on from
                raise KeyboardInterrupt
    for k, spec in enumerate(specs):
        if spec.kind == "math":
            math_values = _judge_math(records, workers, timeout, reporter, source, stats,
                                      judgements)
            per_spec[k] = [{"math": v} for v in math_values]
    reporter.finish()

    out = []
    for i, r in enumerate(records):
        components: dict[str, float] = {}
        total = 0.0  # sum of weight x component
        for k, spec in enumerate(specs):
            for name, v in per_spec[k][i].items():
                if name in components:
                    raise RecordError(source, line_of(records, i), f"rewards.{name}",
                                      f"reward '{spec.text}' writes component '{name}', "
                                      "which another reward also writes")
                components[name] = v
                total += spec.weight * v
        if not (math.isfinite(total) and abs(total) <= MAX_MAGNITUDE):
            terms = " + ".join(f"{spec.weight:g} x {spec.name}" for spec in specs)
            raise RecordError(source, line_of(records, i), "reward",
                              f"the weighted sum of the rewards ({terms}) is {total:g}; a reward "
                              f"must be a finite number of at most {MAX_MAGNITUDE:g} in size")
        out.append({**r, "rewards": components, "reward": total})
        if explain:
            out[-1]["explain"] = _explained(judgements[i], components["math"])

    n = max(len(out), 1)
    names = list(dict.fromkeys(name for r in out for name in r["rewards"]))
    stats["reward_mean"] = sum(r["reward"] for r in out) / n
    stats["component_means"] = {k: sum(r["rewards"].get(k, 0.0) for r in out) / n for k in names}
    stats["hack_rate"] = hack_rate(out, judgements)
    stats["seconds"] = time.perf_counter() - start
    stats["records_per_s"] = len(out) / stats["seconds"] if stats["seconds"] > 0 else 0.0
    return out, stats


def score_file(records: str, output: str, score: ScoreSettings | None = None, *,
               explain: bool = False, progress: bool = True) -> dict:
    """`grpoctl score`: the records of the file `records` (`-` = stdin) scored into
    `output` (`-` = stdout), as score_records; return its stats."""
    check_output(output, [records])
    scored, stats = score_records(read_records(records, NEEDS_SCORE), score, progress=progress,
                                  source=source_name(records), explain=explain)
    write_records(scored, output)
    return stats
