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
import sys
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

from grpoctl.errors import GrpoctlError

STDIO = "-"


class RecordError(GrpoctlError):
    """A bad record: names the file, the line (1-based) and the field."""

    def __init__(self, source: str, line: int | None, field: str | None, message: str):
        where = source if line is None else f"{source}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")
        self.source, self.line, self.field = source, line, field


# --- the schema -------------------------------------------------------------
# One checker per known field. Each returns None when the value is fine, or a
# short reason. Fields are checked whenever present; `read_records(require=)`
# says which must be present for the stage at hand.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_str(v: Any) -> str | None:
    return None if isinstance(v, str) else f"expected a string, got {_kind(v)}"


def _check_optional_str(v: Any) -> str | None:
    return None if v is None or isinstance(v, str) else f"expected a string or null, got {_kind(v)}"


def _check_sample(v: Any) -> str | None:
    return None if _is_int(v) and v >= 0 else f"expected an integer >= 0, got {v!r}"


def _check_token_ids(v: Any) -> str | None:
    if not isinstance(v, list):
        return f"expected a list of token ids, got {_kind(v)}"
    for i, t in enumerate(v):
        if not (_is_int(t) and t >= 0):
            return f"item {i} is {t!r}, expected an integer token id >= 0"
    return None


def _check_logprobs(v: Any) -> str | None:
    if not isinstance(v, list):
        return f"expected a list of floats, got {_kind(v)}"
    for i, x in enumerate(v):
        if not _is_number(x):
            return f"item {i} is {x!r}, expected a finite float"
        if x > 1e-4:  # a log-probability is <= 0; allow float noise
            return f"item {i} is {x!r}, a log-probability must be <= 0"
    return None


def _check_finite(v: Any) -> str | None:
    return None if _is_number(v) else f"expected a finite number, got {v!r}"


def _check_reward_components(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f"expected an object of named rewards, got {_kind(v)}"
    for name, x in v.items():
        if not _is_number(x):
            return f"component '{name}' is {x!r}, expected a finite number"
    return None


def _check_finish_reason(v: Any) -> str | None:
    return None if v in ("stop", "length") else f"expected 'stop' or 'length', got {v!r}"


def _check_dict(v: Any) -> str | None:
    return None if isinstance(v, dict) else f"expected an object, got {_kind(v)}"


def _check_sampling(v: Any) -> str | None:
    # Only the keys `update` reads are checked; others pass through.
    if not isinstance(v, dict):
        return f"expected an object, got {_kind(v)}"
    t, m = v.get("temperature"), v.get("max_new_tokens")
    if t is not None and not (_is_number(t) and t >= 0):
        return f"temperature is {t!r}, expected a number >= 0"
    if m is not None and not (_is_int(m) and m >= 1):
        return f"max_new_tokens is {m!r}, expected an integer >= 1"
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
    "reward": _check_finite,
    "rewards": _check_reward_components,
    "advantage": _check_finite,
}

# What each consuming stage needs to find in every record.
NEEDS_SCORE = ("prompt_id", "completion")
NEEDS_ADVANTAGE = ("prompt_id", "sample", "reward")
NEEDS_UPDATE = ("prompt_id", "sample", "prompt_ids", "completion_ids", "logprobs", "advantage")


# Fields whose checker above already proves every number in them finite.
_NUMBERS_CHECKED = frozenset({"prompt_ids", "completion_ids", "logprobs", "reward", "rewards",
                              "advantage"})


def non_finite_path(value: Any, path: str) -> str | None:
    """The dotted path of the first NaN or infinity inside value (json.loads accepts
    NaN, Infinity and 1e999), or None. JSON output cannot hold them."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, v in items:
        found = non_finite_path(v, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]")
        if found:
            return found
    return None


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
        bad = None if field in _NUMBERS_CHECKED else non_finite_path(value, field)
        if bad:
            raise RecordError(source, line, bad, "NaN or infinity; records hold finite numbers only")


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


def parse_records(data: bytes, source: str, require: Iterable[str] = ()) -> list[dict]:
    """Parse JSONL bytes into validated records (see read_records)."""
    require = tuple(require)
    records: list[dict] = []
    first_line: dict[tuple[str, int], int] = {}
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(source, lineno, None, f"not valid UTF-8 (byte {e.start})") from None
        if not records and text.lstrip().startswith("["):
            raise RecordError(source, lineno, None,
                              "looks like a JSON array; expected JSONL, one object per line "
                              "(convert with: jq -c '.[]')")
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise RecordError(source, lineno, None,
                                  f"expected a JSON object, got {_kind(record)}")
            check_record(record, require, source, lineno)
        except json.JSONDecodeError as e:
            raise RecordError(source, lineno, None,
                              f"invalid JSON ({e.msg}, column {e.colno})") from None
        except RecursionError:
            raise RecordError(source, lineno, None, "JSON nested too deeply") from None
        if "prompt_id" in record and "sample" in record:
            key = (record["prompt_id"], record["sample"])
            if key in first_line:
                raise RecordError(source, lineno, "sample",
                                  f"duplicate (prompt_id, sample) = ({key[0]!r}, {key[1]}), "
                                  f"first on line {first_line[key]}")
            first_line[key] = lineno
        records.append(record)
    if not records:
        raise RecordError(source, None, None, "is empty: no records")
    return records


def group_by_prompt(records: list[dict]) -> dict[str, list[int]]:
    """Indices of the records of each prompt_id, in file order (groups may interleave)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r["prompt_id"], []).append(i)
    return groups


# --- writing -----------------------------------------------------------------


def dumps(record: dict) -> str:
    """One record as one line. NaN and inf are refused rather than written."""
    text = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (read as "\\ud800") has no UTF-8 form:
        text = json.dumps(record, allow_nan=False, separators=(",", ":"))  # keep it escaped
    return text


def umask_mode(mode: int = 0o666) -> int:
    """`mode` less the process umask: what open() or mkdir() would have given.
    mkstemp/mkdtemp create 0600/0700 entries; users sharing a run directory expect 0644/0755."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync and rename it to `path`.

    On any exception the temporary file is removed, so readers see either the
    old file or the complete new one, never a partial one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        os.chmod(fd, umask_mode())
    except OSError as e:
        raise GrpoctlError(f"{path}: cannot write: {e.strerror}") from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, GrpoctlError):
            raise GrpoctlError(f"{path}: cannot write: {e.strerror or e}") from None
        raise


def write_records(records: Iterable[dict], path: str) -> None:
    """Write records as JSONL to `path` atomically, or to stdout when path is `-`."""
    lines = [dumps(r) + "\n" for r in records]  # serialise first: a bad value writes nothing
    if path == STDIO:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
        return
    with atomic_open(path) as f:
        f.writelines(lines)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write one JSON document atomically (config.json, trainer_state.json)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    with atomic_open(path) as f:
        f.write(text)
