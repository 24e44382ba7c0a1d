"""Finding the final answer in a completion, and comparing answers without sympy.

`extract_answer(text)` returns the string a math reward should judge:

    1. the content of the LAST complete `\\boxed{...}` (or `\\fbox{...}`), found by
       matching braces (not a regex), so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`;
       an empty last box means "no answer" (None), and so does a box left unclosed
       with no complete box before it (a completion cut off inside its answer);
    2. else, after the last `####` (GSM8K's convention): the first number on that line;
    3. else, after the last "answer is" / "answer:" (any case): the first inline math
       `$...$` / `\\(...\\)` on that line, else its first number, else the rest of the line;
    4. else the last number in the text;
    5. else None.
Numbers written with thousands separators (`1,000`, `1{,}000`) lose their commas.

Work is bounded for huge inputs: only the last MAX_SCAN_CHARS characters are searched,
and every step is a linear scan.

`match_without_sympy(gold, pred)` is the fast path of the `math` reward: it answers
True/False only where that is certainly right (the same text after a
meaning-preserving normalisation, or two plain numbers), and None otherwise, which
sends the pair to math-verify.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A final answer sits at the end of a completion; a 20k-character tail holds it even
# for long chains of thought, and keeps a 100 kB pathological completion cheap.
MAX_SCAN_CHARS = 20_000

# One token stream for brace matching: a box opener, an escaped brace (ignored), a brace.
_BRACE_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = r"\d{1,3}(?:(?:,|\{,\})\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])-?(?:{_NUMBER})")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?", re.IGNORECASE)
_INLINE_MATH = re.compile(r"\$([^$]+)\$|\\\((.+?)\\\)")


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` in the text's tail, else None.

    "Last" is the box that closes last, so `\\boxed{\\boxed{5}}` gives `\\boxed{5}`'s
    content after unwrapping: "5". An unclosed box (a truncated completion) is skipped.
    Returns "" for an empty last box.
    """
    return _scan_boxes(text)[0]


def _scan_boxes(text: str) -> tuple[str | None, bool]:
    """(last_boxed's answer, whether a box is still open at the end of the text)."""
    tail = text[-MAX_SCAN_CHARS:]
    stack: list[tuple[bool, int]] = []  # (is a box, where its content starts)
    last: tuple[int, int] | None = None
    for m in _BRACE_TOKENS.finditer(tail):
        tok = m.group()
        if tok == "{":
            stack.append((False, m.end()))
        elif tok == "}":
            if stack:  # an unmatched "}" (the tail began mid-group) is ignored
                is_box, start = stack.pop()
                if is_box:
                    last = (start, m.start())
        elif len(tok) > 2:  # \boxed{ or \fbox{
            stack.append((True, m.end()))
    still_open = any(is_box for is_box, _ in stack)
    if last is None:
        return None, still_open
    content = tail[last[0]:last[1]].strip()
    while inner := _BOX_OPEN.match(content):  # \boxed{\boxed{x}} -> x
        if _group_end(content, inner.end()) != len(content) - 1:
            break  # \boxed{a} + \boxed{b}: not one box
        content = content[inner.end():-1].strip()
    return content, still_open


def _group_end(s: str, start: int) -> int:
    """Index of the "}" closing the group whose content starts at `start`, or -1."""
    depth = 1
    for m in _BRACE_TOKENS.finditer(s, start):
        tok = m.group()
        if tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
        elif tok == "{" or len(tok) > 2:
            depth += 1
    return -1


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    last = None
    for last in pattern.finditer(text):
        pass
    return last


def _clean_number(s: str) -> str:
    """'1,000' / '1{,}000' -> '1000'; other text unchanged."""
    return s.replace("{,}", "").replace(",", "") if _PLAIN_NUMBER.fullmatch(s) else s


def _first_number(s: str) -> str | None:
    m = _NUMBER_RE.search(s)
    return _clean_number(m.group()) if m else None


def extract_answer(text: str) -> str | None:
    """The final answer in a completion (see the module docstring for the rules), or None."""
    boxed, still_open = _scan_boxes(text)
    if boxed is not None:
        return boxed or None
    if still_open:  # cut off inside its box: `\\boxed{3` of 35 is not the answer 3
        return None
    tail = text[-MAX_SCAN_CHARS:]
    hashes = tail.rfind("####")
    if hashes >= 0:
        line = tail[hashes + 4:].split("\n", 1)[0]
        return _first_number(line) or _strip_sentence(line)
    answer_is = _last_match(_ANSWER_IS, tail)
    if answer_is is not None:
        line = tail[answer_is.end():].split("\n", 1)[0]
        math = _INLINE_MATH.search(line)
        if math:
            return (math.group(1) or math.group(2)).strip() or None
        return _first_number(line) or _strip_sentence(line)
    number = _last_match(_NUMBER_RE, tail)
    return _clean_number(number.group()) if number else None


def _strip_sentence(s: str) -> str | None:
    s = s.strip().rstrip(".").strip().strip("$").strip()
    return s or None


# --- comparing without sympy -----------------------------------------------------

_PLAIN_NUMBER = re.compile(rf"[-+]?(?:{_NUMBER})")
_PLAIN_INTEGER = re.compile(r"[-+]?(?:\d{1,3}(?:(?:,|\{,\})\d{3})+|\d+)")
# Spacing commands and \left / \right change how LaTeX looks, never what it means.
_SPACING = re.compile(r"\\[,;:! ]|\\(?:left|right)(?![A-Za-z])|~")
_TEXT_COMMANDS = re.compile(r"\\(?:text|mbox|mathrm|textbf|operatorname)")
# Whitespace is insignificant in math mode, except that `\pi r` must not become `\pir`.
_WHITESPACE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])|\s+")


def normalize_answer(s: str) -> str:
    """A canonical spelling of a LaTeX answer that keeps its meaning.

    Strips outer `$`, `\\(..\\)`, `\\[..\\]`, a trailing period, spacing commands
    (`\\,` `\\!` `~` ...), `\\left`/`\\right`; maps `\\dfrac`/`\\tfrac` to `\\frac`; drops
    whitespace (kept as one space after a command word before a letter, and inside
    `\\text{...}`-like answers only collapsed, since there spaces are words).
    """
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left):len(s) - len(right)].strip()
            break
    s = _SPACING.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    if _TEXT_COMMANDS.search(s):
        s = " ".join(s.split())
    else:
        s = _WHITESPACE.sub(lambda m: m.group(1) + " " if m.group(1) else "", s)
    return s.rstrip(".").strip()


def _canonical_integer(s: str) -> str:
    digits = s.lstrip("+-").replace("{,}", "").replace(",", "").lstrip("0") or "0"
    return "-" + digits if s.startswith("-") and digits != "0" else digits


def match_without_sympy(gold: str, pred: str) -> bool | None:
    """True/False where the answer is certain without sympy, else None (ask math-verify).

    - same text after normalize_answer -> True;
    - two plain integers (thousands commas allowed) -> compared exactly, as digit strings
      (no int() conversion, so 10,000-digit answers cost nothing);
    - two plain decimals that are equal as exact decimals -> True (unequal ones go to
      math-verify, which rounds floats to 6 places).
    """
    g, p = normalize_answer(gold), normalize_answer(pred)
    if not g:
        return None
    if g == p:
        return True
    if _PLAIN_INTEGER.fullmatch(g) and _PLAIN_INTEGER.fullmatch(p):
        return _canonical_integer(g) == _canonical_integer(p)
    if len(g) < 100 and len(p) < 100 and _PLAIN_NUMBER.fullmatch(g) and _PLAIN_NUMBER.fullmatch(p):
        try:
            if Decimal(_clean_number(g.lstrip("+"))) == Decimal(_clean_number(p.lstrip("+"))):
                return True
        except InvalidOperation:
            pass
    return None
