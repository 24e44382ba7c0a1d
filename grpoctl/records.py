"""The record format: one JSON object per line, one line per completion.

This module owns the schema (see docs/records.md), reading JSONL from a path or
stdin with `file:line: field` errors, and atomic writing. It imports no torch.

Fields, by the stage that writes them:
    rollout    prompt_id, sample, prompt, completion, answer, prompt_ids,
               completion_ids, logprobs, finish_reason, policy, sampling
    score      reward, rewards
    advantage  advantage
Every stage keeps fields it does not know, unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

from grpoctl import process
from grpoctl.errors import GrpoctlError
from grpoctl.errors import first_line as first_line_of

STDIO = "-"


class RecordError(GrpoctlError):
    """A bad record: names the file, the line (1-based) and the field."""

    def __init__(self, source: str, line: int | None, field: str | None, message: str):
        where = source if line is None else f"{source}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")
        self.source, self.line, self.field, self.reason = source, line, field, message


# --- the schema -------------------------------------------------------------
# One checker per known field. Each returns None when the value is fine, or a
# short reason. Fields are checked whenever present; `read_records(require=)`
# says which must be present for the stage at hand.


# Limits that make every record that can be read also writable, and every number
# safe to compute with: a record nested deeper than MAX_DEPTH is refused on reading
# (json.loads accepts about 990 levels, but json.dumps deeper in the call stack fails
# on fewer); rewards and advantages are at most MAX_MAGNITUDE in size, so sums of
# millions of them, group means and deviations stay finite (1.5e308 + 1.5e308 is inf).
MAX_DEPTH = 100
MAX_MAGNITUDE = 1e100
MAX_TOKEN_ID = 2**31 - 1  # no vocabulary is larger; torch and the samplers hold ids in int32/64


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite int or float (an int of hundreds of digits has no float: not a number here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if isinstance(v, int):
        return v.bit_length() <= 1023  # converts to a finite float
    return math.isfinite(v)


def shown(v: Any, limit: int = 60) -> str:
    """repr(v) for a message, kept short: an int of 5,000 digits has no repr at all
    (Python's 4,300-digit limit), and a long list or string would make a page."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 200:
        return f"an integer of {len(str(abs(v))) if v.bit_length() < 14000 else 'over 4300'} digits"
    try:
        text = repr(v)
    except Exception:  # a user object whose repr fails
        return f"a {type(v).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unbounded(v: Any) -> str | None:
    """What keeps v from being a reward or an advantage, or None."""
    if not _is_number(v):
        return "expected a finite number"
    return f"too large (at most {MAX_MAGNITUDE:g} in size)" if abs(v) > MAX_MAGNITUDE else None


def _check_bounded(v: Any) -> str | None:
    problem = _unbounded(v)
    if problem is None:
        return None
    return f"{shown(v)} is {problem}" if _is_number(v) else f"{problem}, got {shown(v)}"


def _check_str(v: Any) -> str | None:
    return None if isinstance(v, str) else f"expected a string, got {_kind(v)}"


def _check_optional_str(v: Any) -> str | None:
    return None if v is None or isinstance(v, str) else f"expected a string or null, got {_kind(v)}"


def _check_sample(v: Any) -> str | None:
    return None if _is_int(v) and v >= 0 else f"expected an integer >= 0, got {shown(v)}"


def _check_token_ids(v: Any) -> str | None:
    if not isinstance(v, list):
        return f"expected a list of token ids, got {_kind(v)}"
    for i, t in enumerate(v):
        if not (_is_int(t) and 0 <= t <= MAX_TOKEN_ID):
            return f"item {i} is {shown(t)}, expected an integer token id >= 0 (and < 2**31)"
    return None


def _check_logprobs(v: Any) -> str | None:
    if not isinstance(v, list):
        return f"expected a list of floats, got {_kind(v)}"
    for i, x in enumerate(v):
        if not _is_number(x):
            return f"item {i} is {shown(x)}, expected a finite float"
        if x > 1e-4:  # a log-probability is <= 0; allow float noise
            return f"item {i} is {shown(x)}, a log-probability must be <= 0"
    return None


def _check_reward_components(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f"expected an object of named rewards, got {_kind(v)}"
    for name, x in v.items():
        if problem := _unbounded(x):
            return f"component '{name}' is {shown(x)}, {problem}"
    return None


def _check_finish_reason(v: Any) -> str | None:
    return None if v in ("stop", "length") else f"expected 'stop' or 'length', got {shown(v)}"


def _check_dict(v: Any) -> str | None:
    return None if isinstance(v, dict) else f"expected an object, got {_kind(v)}"


def _check_sampling(v: Any) -> str | None:
    # Only the keys `update` reads are checked; others pass through.
    if not isinstance(v, dict):
        return f"expected an object, got {_kind(v)}"
    t, m = v.get("temperature"), v.get("max_new_tokens")
    if t is not None and not (_is_number(t) and t >= 0):
        return f"temperature is {shown(t)}, expected a number >= 0"
    if m is not None and not (_is_int(m) and m >= 1):
        return f"max_new_tokens is {shown(m)}, expected an integer >= 1"
    return None


FIELD_CHECKS = {
    "prompt_id": _check_str,
    "sample": _check_sample,
    "prompt": _check_str,
    "completion": _check_str,
    "answer": _check_optional_str,
    "prompt_ids": _check_token_ids,
    "completion_ids": _check_token_ids,
    "logprobs": _check_logprobs,
    "finish_reason": _check_finish_reason,
    "policy": _check_dict,
    "sampling": _check_sampling,
    "reward": _check_bounded,
    "rewards": _check_reward_components,
    "advantage": _check_bounded,
}

# What each consuming stage needs to find in every record.
NEEDS_SCORE = ("prompt_id", "completion")
NEEDS_ADVANTAGE = ("prompt_id", "sample", "reward")
NEEDS_UPDATE = ("prompt_id", "sample", "prompt_ids", "completion_ids", "logprobs", "advantage")


# Fields whose checker above already proves every number in them finite.
_NUMBERS_CHECKED = frozenset({"prompt_ids", "completion_ids", "logprobs", "reward", "rewards",
                              "advantage"})


def _child_path(path: str, key: Any) -> str:
    return f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"


def first_unwritable(value: Any, path: str, max_depth: int = MAX_DEPTH) -> tuple[str, str] | None:
    """(dotted path, reason) of the first value inside `value` that JSON output cannot hold
    (NaN, infinity, nesting more than max_depth levels below `path`), or None.

    Iterative, so a value nested 100,000 deep costs no recursion. json.loads accepts
    NaN, Infinity and 1e999, and nesting of about 990 levels that json.dumps, called
    deeper in the stack, can fail on.
    """
    stack = [(value, path, 0)]
    while stack:
        v, where, depth = stack.pop()
        if isinstance(v, float):
            if not math.isfinite(v):
                return where, "NaN or infinity"
            continue
        if isinstance(v, dict):
            items = list(v.items())
        elif isinstance(v, list):
            items = list(enumerate(v))
        else:
            continue
        if depth >= max_depth:
            return where, f"nested more than {max_depth} levels deep"
        for key, child in reversed(items):  # reversed: the first problem in file order
            if isinstance(child, (dict, list, float)):
                stack.append((child, _child_path(where, key), depth + 1))
    return None


def non_finite_path(value: Any, path: str) -> str | None:
    """The dotted path of the first NaN or infinity inside value (json.loads accepts
    NaN, Infinity and 1e999), or None. JSON output cannot hold them."""
    found = first_unwritable(value, path, max_depth=10**9)
    return found[0] if found else None


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(v), type(v).__name__)


def check_record(record: dict, require: Iterable[str] = (), source: str = "<records>",
                 line: int | None = None) -> None:
    """Raise RecordError if a required field is missing or a known field is malformed."""
    for field in require:
        if field not in record:
            raise RecordError(source, line, field, "missing")
    for field, check in FIELD_CHECKS.items():
        if field in record:
            reason = check(record[field])
            if reason:
                raise RecordError(source, line, field, reason)
    if "logprobs" in record and "completion_ids" in record:
        n_ids, n_lp = len(record["completion_ids"]), len(record["logprobs"])
        if n_ids != n_lp:
            raise RecordError(source, line, "logprobs",
                              f"has {n_lp} values but completion_ids has {n_ids} tokens")
    for field, value in record.items():  # unknown fields too: they are written back out
        if field in _NUMBERS_CHECKED:
            continue
        bad = first_unwritable(value, field, MAX_DEPTH - 1)  # the record is the first level
        if bad and bad[1] == "NaN or infinity":
            raise RecordError(source, line, bad[0], "NaN or infinity; records hold finite numbers only")
        if bad:  # named by its top field: the path of the innermost value would be a page
            raise RecordError(source, line, field, f"JSON nested too deeply (more than "
                              f"{MAX_DEPTH} levels, counting the record)")


# --- reading -----------------------------------------------------------------


def source_name(path: str) -> str:
    return "<stdin>" if path == STDIO else str(path)


def read_records(path: str, require: Iterable[str] = ()) -> list[dict]:
    """Read and validate a JSONL record file (`-` is stdin).

    Blank lines are skipped. Every problem raises RecordError naming the file,
    the line and the field. (prompt_id, sample) pairs must be unique.
    """
    source = source_name(path)
    require = tuple(require)
    if path == STDIO:
        data = sys.stdin.buffer.read()
    else:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise GrpoctlError(f"{source}: no such file") from None
        except IsADirectoryError:
            raise GrpoctlError(f"{source}: is a directory, expected a JSONL file") from None
        except OSError as e:
            raise GrpoctlError(f"{source}: cannot read: {e.strerror}") from None
    return parse_records(data, source, require)


DAMAGED = ("raise", "last", "skip")


def iter_jsonl(data: bytes | str, source: str, damaged: str = "raise"
               ) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of JSONL: the one JSONL parser.

    Lines end at "\n" only (str.splitlines would also split at U+2028, U+0085 and
    others, which JSON allows raw inside strings); numbers count from 1, blank lines
    included. Bytes are decoded as UTF-8 line by line; text is taken as decoded.
    What is not one JSON object per line is a RecordError naming `source`:line:
    invalid UTF-8, invalid JSON, a JSON array (the first line opening with `[`),
    nesting too deep for Python, an integer of more than 4,300 digits, or a value
    that is not an object. `damaged` says what to do with such a line instead:
        "raise"  raise (record files, prompt files);
        "last"   skip it when it is the last line and no newline follows it: an
                 append that a crash cut short (metrics.jsonl, eval.jsonl);
        "skip"   skip every such line (a reader that rewrites the file without them).
    """
    if damaged not in DAMAGED:
        raise ValueError(f"damaged: expected one of {DAMAGED}, got {damaged!r}")
    raws = data.split(b"\n" if isinstance(data, bytes) else "\n")
    first = True
    for lineno, raw in enumerate(raws, start=1):
        if not raw.strip():
            continue
        try:
            value = _json_line(raw, source, lineno, first)
        except _CutShort as e:
            if damaged == "skip" or (damaged == "last" and lineno == len(raws)):
                continue
            raise e.error from None
        except RecordError:
            if damaged == "skip":
                continue
            raise
        first = False
        yield lineno, value


class _CutShort(Exception):
    """A line that is not JSON at all (what a write cut short leaves); carries its error."""

    def __init__(self, error: RecordError):
        super().__init__(str(error))
        self.error = error


def _json_line(raw: bytes | str, source: str, lineno: int, first: bool) -> dict:
    """One line of JSONL as an object; _CutShort when it is not JSON, RecordError when it
    is JSON but not one object (see iter_jsonl)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _CutShort(RecordError(source, lineno, None,
                                        f"not valid UTF-8 (byte {e.start})")) from None
    if first and raw.lstrip().startswith("["):
        raise RecordError(source, lineno, None,
                          "looks like a JSON array; expected JSONL, one object per line "
                          "(convert with: jq -c '.[]')")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise _CutShort(RecordError(source, lineno, None,
                                    f"invalid JSON ({e.msg}, column {e.colno})")) from None
    except RecursionError:
        raise RecordError(source, lineno, None, "JSON nested too deeply") from None
    except ValueError as e:  # an integer of more than 4,300 digits (Python's limit)
        raise RecordError(source, lineno, None, f"a number JSON cannot hold here: "
                          f"{first_line_of(e)}") from None
    if not isinstance(value, dict):
        raise RecordError(source, lineno, None, f"expected a JSON object, got {_kind(value)}")
    return value


class Records(list):
    """The records of a file, and `lines`: the line each is on (blank lines are skipped,
    so record i is not always on line i + 1). Errors found after reading name the line
    with `line_of`."""

    def __init__(self):
        super().__init__()
        self.lines: list[int] = []


def line_of(records: Sequence[dict], i: int) -> int:
    """The line record i was read from (i + 1 for records that were not read from a file)."""
    lines = getattr(records, "lines", None)
    return lines[i] if lines is not None and i < len(lines) else i + 1


class _FileChecks:
    """What must hold across the records of one file: (prompt_id, sample) pairs unique,
    and the records of one prompt_id agree on GROUP_FIELDS."""

    def __init__(self, source: str):
        self.source = source
        self.first_line: dict[tuple[str, int], int] = {}
        self.group_first: dict[tuple[str, str], tuple[Any, int]] = {}

    def add(self, record: dict, lineno: int) -> None:
        if "prompt_id" in record and "sample" in record:
            key = (record["prompt_id"], record["sample"])
            if key in self.first_line:
                raise RecordError(self.source, lineno, "sample",
                                  f"duplicate (prompt_id, sample) = ({shown(key[0])}, "
                                  f"{shown(key[1])}), first on line {self.first_line[key]}")
            self.first_line[key] = lineno
        if isinstance(record.get("prompt_id"), str):
            _check_group_agrees(record, lineno, self.group_first, self.source)


def parse_records(data: bytes, source: str, require: Iterable[str] = ()) -> Records:
    """Parse JSONL bytes into validated records (see read_records)."""
    require = tuple(require)
    records = Records()
    checks = _FileChecks(source)
    for lineno, record in iter_jsonl(data, source):
        try:
            check_record(record, require, source, lineno)
        except RecursionError:
            raise RecordError(source, lineno, None, "JSON nested too deeply") from None
        except ValueError as e:
            raise RecordError(source, lineno, None, f"a number JSON cannot hold here: "
                              f"{first_line_of(e)}") from None
        checks.add(record, lineno)
        records.append(record)
        records.lines.append(lineno)
    if not records:
        raise RecordError(source, None, None, "is empty: no records")
    return records


# Fields every record of one group (one prompt_id) shares: a group is G samples of one
# prompt, so records that disagree on them are two prompts under one id.
GROUP_FIELDS = ("prompt", "answer")


def _check_group_agrees(record: dict, lineno: int, group_first: dict, source: str) -> None:
    for field in GROUP_FIELDS:
        if field not in record:
            continue
        key = (record["prompt_id"], field)
        if key not in group_first:
            group_first[key] = (record[field], lineno)
        elif record[field] != group_first[key][0]:
            value, line = group_first[key]
            raise RecordError(source, lineno, field,
                              f"{shown(record[field])} differs from {shown(value)} on line {line}, "
                              f"in the same group (prompt_id {shown(record['prompt_id'])}); "
                              "records of one prompt_id must share prompt and answer")


def group_by_prompt(records: list[dict]) -> dict[str, list[int]]:
    """Indices of the records of each prompt_id, in file order (groups may interleave)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r["prompt_id"], []).append(i)
    return groups


# --- writing -----------------------------------------------------------------


class UnwritableError(GrpoctlError):
    """A computed value that JSON output cannot hold (NaN, infinity, an int of more than
    4,300 digits, nesting too deep for json.dumps): raised before anything is written."""


def _short_path(path: str, limit: int = 60) -> str:
    return path if len(path) <= limit else path[: limit - 3] + "..."


def _why_unwritable(obj: Any, error: BaseException) -> str:
    fields = obj.items() if isinstance(obj, dict) else [("value", obj)]
    for field, value in fields:
        found = first_unwritable(value, str(field), max_depth=MAX_DEPTH)
        if found:
            return f"field '{_short_path(found[0])}' is {found[1]}"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return first_line_of(error)


def _json_text(obj: Any, **kwargs) -> str:
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except (ValueError, RecursionError) as e:  # NaN/inf, an int over 4,300 digits, depth
        raise UnwritableError(f"cannot write it: {_why_unwritable(obj, e)}; "
                              "JSON cannot hold it") from None


def dumps(record: dict) -> str:
    """One record as one line. NaN, inf and other values JSON cannot hold raise
    UnwritableError (a GrpoctlError, one line) rather than being written."""
    text = _json_text(record, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (read as "\ud800") has no UTF-8 form:
        text = _json_text(record, separators=(",", ":"))  # keep it escaped
    return text


def umask_mode(mode: int = 0o666) -> int:
    """`mode` less the process umask: what open() or mkdir() would have given.
    mkstemp/mkdtemp create 0600/0700 entries; users sharing a run directory expect 0644/0755."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _is_special_file(path: str) -> bool:
    """A device or FIFO (`-o /dev/null`): renaming a temporary file over it would replace
    the device with a plain file (as root) or fail."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


@contextlib.contextmanager
def _open_special(path: str, mode: str) -> Iterator[IO]:
    try:
        with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
    except OSError as e:
        if isinstance(e, GrpoctlError):
            raise
        raise GrpoctlError(f"{path}: cannot write: {e.strerror or e}") from None


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync and rename it to `path`.

    On any exception the temporary file is removed, so readers see either the
    old file or the complete new one, never a partial one.
    """
    path = os.fspath(path)
    if _is_special_file(path):  # /dev/null, /dev/full, a FIFO: written in place, never replaced
        with _open_special(path, mode) as f:
            yield f
        return
    if os.path.islink(path):  # the file it points to is replaced; the link stays a link
        path = os.path.realpath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        kept_mode = stat.S_IMODE(os.stat(path).st_mode)  # a replaced file keeps its mode
    except OSError:
        kept_mode = umask_mode()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise GrpoctlError(f"{path}: cannot write: {e.strerror}") from None
    try:
        os.chmod(fd, kept_mode)  # inside the try: a Ctrl-C here still removes tmp
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        with process.committing(path):  # a signal now is raised once path is replaced
            os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, GrpoctlError):
            raise GrpoctlError(f"{path}: cannot write: {e.strerror or e}") from None
        raise


def check_output(path: str, inputs: Iterable[str | None] = ()) -> None:
    """Refuse, before any work, an output path (`-o`) whose writing would lose a file:
    one of the command's `inputs`, a directory, a file in a missing directory, or an
    existing file that is not JSONL records (its first line not an object with a
    prompt_id and a sample, as every record grpoctl writes; an empty file is fine). A
    records file is replaced, as a re-run expects."""
    if path == STDIO or _is_special_file(path):
        return
    where = os.path.abspath(path)
    if os.path.isdir(where):
        raise GrpoctlError(f"{path}: is a directory; give the output a file name")
    if not os.path.isdir(os.path.dirname(where)):
        raise GrpoctlError(f"{path}: cannot write: no such directory {os.path.dirname(where)}")
    if not os.path.exists(where):
        return
    for given in inputs:
        if given and given != STDIO and os.path.exists(given) and os.path.samefile(given, where):
            raise GrpoctlError(f"{path}: is the input {given}; an input is never replaced: "
                               "write to another file")
    if not _is_records_file(where):
        raise GrpoctlError(f"{path}: exists and is not a JSONL records file; it is not "
                           "replaced: remove it or choose another output")


def _is_records_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            first = f.readline()
    except OSError:
        return False  # unreadable: not knowingly ours
    if not first.strip():
        return True
    try:
        record = json.loads(first)
    except (ValueError, RecursionError):
        return False
    return isinstance(record, dict) and "prompt_id" in record and "sample" in record


def _check_depth(record: dict) -> None:
    """What a stage writes, the next can read: nesting within MAX_DEPTH (a prompt file's
    column nested deeper would otherwise reach a rollout file that `score` refuses)."""
    for field, value in record.items():
        if field in _NUMBERS_CHECKED or not isinstance(value, (dict, list)):
            continue
        found = first_unwritable(value, field, MAX_DEPTH - 1)
        if found and found[1] != "NaN or infinity":
            raise UnwritableError(f"cannot write it: field '{field}' is nested more than "
                                  f"{MAX_DEPTH} levels deep (counting the record); records "
                                  "may not nest deeper")


def write_records(records: Iterable[dict], path: str) -> None:
    """Write records as JSONL to `path` atomically, or to stdout when path is `-`.

    Every record is serialised before a byte is written, so a record that cannot be
    written (UnwritableError, naming the destination, the record and the field) leaves
    no output at all.
    """
    lines = []
    checks = _FileChecks(source_name(path))
    for i, r in enumerate(records):
        try:
            _check_depth(r)
            lines.append(dumps(r) + "\n")
            check_record(r, line=i + 1)  # what a stage writes, the next one can read
            checks.add(r, i + 1)
        except UnwritableError as e:
            raise UnwritableError(f"{source_name(path)}: record {i + 1}: {e}") from None
        except RecordError as e:
            field = f"field '{e.field}': " if e.field else ""
            raise UnwritableError(f"{source_name(path)}: record {i + 1}: cannot write it: "
                                  f"{field}{e.reason}") from None
    if path == STDIO:
        try:
            sys.stdout.writelines(lines)
            sys.stdout.flush()
        except BrokenPipeError:
            raise  # the reader went away (`| head`): cli.main ends quietly
        except OSError as e:  # `> /dev/full`, a closed stdout
            raise GrpoctlError(f"<stdout>: cannot write: {e.strerror or e}") from None
        return
    with atomic_open(path) as f:
        f.writelines(lines)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write one JSON document atomically (config.json, trainer_state.json)."""
    try:
        text = _json_text(obj, indent=2, ensure_ascii=False) + "\n"
    except UnwritableError as e:
        raise UnwritableError(f"{path}: {e}") from None
    with atomic_open(path) as f:
        f.write(text)


# --- a stage's output against its input -------------------------------------------

# What makes a record the sample it is: a stage that scores or weighs samples
# (`--score-cmd`, `--advantage-cmd`) adds fields and may change its own, never these.
IDENTITY_FIELDS = ("prompt_id", "sample", "prompt", "completion", "answer", "prompt_ids",
                   "completion_ids", "logprobs", "finish_reason", "policy", "policy_step",
                   "sampling")


def check_same_records(before: list[dict], after: list[dict], source: str,
                       input_name: str = "its input") -> None:
    """Raise RecordError unless `after` holds exactly the samples of `before`: the same
    (prompt_id, sample) pairs, none dropped, added or duplicated (parse_records refuses
    duplicates), and every IDENTITY_FIELDS field of the input kept and unchanged.
    Lines of `after` are its lines when read from a file (`source` names it)."""
    by_key = {(r.get("prompt_id"), r.get("sample")): r for r in before}
    seen = set()
    for i, r in enumerate(after):
        line = line_of(after, i)
        key = (r.get("prompt_id"), r.get("sample"))
        original = by_key.get(key)
        if original is None:
            raise RecordError(source, line, "prompt_id",
                              f"(prompt_id, sample) = ({shown(key[0])}, {shown(key[1])}) is not "
                              f"in {input_name}; a stage may not add or rename samples")
        seen.add(key)
        for field in IDENTITY_FIELDS:
            if field in original and field not in r:
                raise RecordError(source, line, field, f"missing; {input_name} has it, and a "
                                  "stage must keep every field it does not own")
            if field in original and r[field] != original[field]:
                raise RecordError(source, line, field,
                                  f"changed from {shown(original[field])} in {input_name} to "
                                  f"{shown(r[field])}; a stage may not change a sample's identity")
    missing = [k for k in by_key if k not in seen]
    if missing:
        k = missing[0]
        raise RecordError(source, None, None,
                          f"{len(missing)} of the {len(before)} samples of {input_name} are "
                          f"missing, first (prompt_id, sample) = ({shown(k[0])}, {shown(k[1])}); "
                          "a stage must return every record it was given")
