"""Finding the final answer in a completion, and comparing answers without sympy.

`extract_answer(text)` returns the string a math reward should judge:

    1. the content of the LAST complete `\\boxed{...}` (or `\\fbox{...}`), found by
       matching braces (not a regex), so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`;
       an empty last box means "no answer" (None), and so does a box left unclosed
       with no complete box before it (a completion cut off inside its answer), and
       a box command without its brace after the last complete box (`\\boxed3}`,
       which LaTeX renders as a box around 3: the stated answer is unreadable);
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
from fractions import Fraction
from functools import lru_cache
from math import gcd, isqrt

# A final answer sits at the end of a completion; a 20k-character tail holds it even
# for long chains of thought, and keeps a 100 kB pathological completion cheap.
MAX_SCAN_CHARS = 20_000

# One token stream for brace matching: a box opener, an escaped brace (ignored), a brace.
_BRACE_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A box command without its brace (`\boxed3}`, `\boxed 12`, a trailing `\boxed`): LaTeX
# would box one token of it; the model's stated answer is unreadable.
_BARE_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])(?!\s*\{)")
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
    return _scan_all_boxes(text[-MAX_SCAN_CHARS:])[0]


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
    return find_answer(text)[0]


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


# Pure functions of short strings that a step calls many times on the same golds and
# answers (a group's samples often agree): cached.
@lru_cache(maxsize=1 << 16)
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


# --- the final-answer rule of the `math` reward (docs/rewards.md, "What counts as an answer")
#
# One implementation, used by the reward (rewards._judge_math, math_reward), by
# rewards.explain_math and by the hack-rate metric (hacks.py).


# What a completion's answer was found by, as explain_math reports it.
RULE_BOX, RULE_HASHES, RULE_ANSWER_IS, RULE_LAST_NUMBER, RULE_NONE = (
    "last \\boxed{}", "####", "answer is", "last number", "none")

# A second candidate right after the first ("12 or 13", "12, 13", "$12$ and $13$", "12 \pm 1").
_PM = r"\\(?:pm|mp)(?![A-Za-z])"  # \pm, \mp (not \pmod)
_HEDGE_AFTER = re.compile(r"^\s*\$?\s*(?:,\s*)?(?:(?:or|and)\b|,|;|/|" + _PM + r"|\\text\{\s*or\s*\})"
                          r"\s*(?:(?:maybe|perhaps|possibly|probably)\s+)?\$?\s*[-+]?(?:\d|\.\d|\\frac)",
                          re.IGNORECASE)
# (a list of bare numbers, "... 998 999 1000", is candidates too)
_HEDGE_BEFORE = re.compile(r"(?:\d|\$)\s*\$?\s*(?:or|,|and|" + _PM + r")\s*\$?\s*$|\d\s+$",
                           re.IGNORECASE)
# ... or further along the same line, after a word that offers an alternative
# ("12, or maybe 13", "I think 12, perhaps 13").
_HEDGE_WORD = r"(?:\b(?:or|maybe|perhaps|possibly|probably|alternatively|otherwise|either)\b|" + _PM + ")"
_HEDGE_WORD_AFTER = re.compile(_HEDGE_WORD + r".*?\d", re.IGNORECASE)
_HEDGE_WORD_BEFORE = re.compile(r"\d.*?" + _HEDGE_WORD, re.IGNORECASE)
# ... within the answer's own sentence: "12. This is probably right, since 3 x 4 is 12"
# offers no second answer.
_SENTENCE_END = re.compile(r"[.;!?](?:\s|$)")


def _hedged_after(rest: str) -> bool:
    """A second candidate in `rest`, the text after an answer, up to its sentence's end."""
    sentence = _SENTENCE_END.split(rest, maxsplit=1)[0]
    return bool(_HEDGE_AFTER.search(rest) or _HEDGE_WORD_AFTER.search(sentence))


def find_answer(text: str) -> tuple[str | None, str, bool]:
    """(answer, the rule that found it, hedged): extract_answer's rules, and whether the
    completion offers more than one candidate (two boxes with different answers, or
    "12 or 13" where the answer is read)."""
    tail = text[-MAX_SCAN_CHARS:]
    boxed, still_open, contents, box_end = _scan_all_boxes(tail)
    bare = _last_match(_BARE_BOX, tail)
    if bare is not None and bare.start() >= box_end:  # the last box has no brace: no answer
        return None, RULE_NONE, False
    if boxed is not None:
        if not boxed:
            return None, RULE_NONE, False
        keys = {_same_answer_key(c) for c in contents if c}
        # A second candidate right after the box ("\boxed{12}, or maybe 13"); prose further
        # on ("... has a remainder of 1 when divided by 2, 3, 4, or 6") is no hedge.
        after = bool(_HEDGE_AFTER.search(tail[box_end:]))
        return boxed, RULE_BOX, len(keys) > 1 or after
    if still_open:
        return None, RULE_NONE, False
    hashes = tail.rfind("####")
    if hashes >= 0:
        line = tail[hashes + 4:].split("\n", 1)[0]
        return _answer_on_line(line, RULE_HASHES, inline_math=False)
    answer_is = _last_match(_ANSWER_IS, tail)
    if answer_is is not None:
        line = tail[answer_is.end():].split("\n", 1)[0]
        return _answer_on_line(line, RULE_ANSWER_IS, inline_math=True)
    number = _last_match(_NUMBER_RE, tail)
    if number is None:
        return None, RULE_NONE, False
    before = tail[:number.start()].rsplit("\n", 1)[-1]
    sentence = _SENTENCE_END.split(before)[-1]
    hedged = bool(_HEDGE_BEFORE.search(before) or _HEDGE_WORD_BEFORE.search(sentence))
    return _clean_number(number.group()), RULE_LAST_NUMBER, hedged


def _answer_on_line(line: str, rule: str, inline_math: bool) -> tuple[str | None, str, bool]:
    math = _INLINE_MATH.search(line) if inline_math else None
    if math:
        answer, rest = (math.group(1) or math.group(2)).strip() or None, line[math.end():]
    else:
        number = _NUMBER_RE.search(line)
        if number is None:
            answer = _strip_sentence(line)
            return answer, (rule if answer else RULE_NONE), False
        answer, rest = _clean_number(number.group()), line[number.end():]
    return answer, (rule if answer else RULE_NONE), _hedged_after(rest)


def _scan_all_boxes(tail: str) -> tuple[str | None, bool, list[str], int]:
    """(last box's unwrapped content, a box still open at the end, the unwrapped contents
    of every outermost box, where the last box ends), one linear scan."""
    stack: list[tuple[bool, int]] = []
    open_boxes = 0
    spans: list[tuple[int, int]] = []
    for m in _BRACE_TOKENS.finditer(tail):
        tok = m.group()
        if tok == "{":
            stack.append((False, m.end()))
        elif tok == "}":
            if stack:
                is_box, start = stack.pop()
                if is_box:
                    open_boxes -= 1
                    if open_boxes == 0:  # an outermost box: one stated answer
                        spans.append((start, m.start()))
        elif len(tok) > 2:
            stack.append((True, m.end()))
            open_boxes += 1
    contents = [_unwrap_boxes(tail[a:b].strip()) for a, b in spans]
    end = spans[-1][1] + 1 if spans else 0
    return (contents[-1] if contents else None), open_boxes > 0, contents, end


def _unwrap_boxes(content: str) -> str:
    while inner := _BOX_OPEN.match(content):  # \boxed{\boxed{x}} -> x
        if _group_end(content, inner.end()) != len(content) - 1:
            break
        content = content[inner.end():-1].strip()
    return content


def _same_answer_key(s: str):
    """Two boxes hold the same answer when their numbers are equal or their texts match."""
    number = parse_number(s)
    return ("number", number[0]) if number else ("text", _canonical(s))


# --- numbers in final form ----------------------------------------------------------

# Invisible or blank material: \phantom{..} takes space and shows nothing; \hspace, \quad,
# \text{ } are spaces. They are read as a space (so `1\phantom{0}2` is two numbers).
_BLANK = re.compile(r"\\(?:h|v)?phantom\s*\{[^{}]*\}|\\[hv]space\*?\s*\{[^{}]*\}|\\q?quad(?![A-Za-z])"
                    r"|\\(?:text|mbox|mathrm|textrm)\s*\{\s*\}|\\[,;: ]|~|\\(?:thinspace|enspace)")
_SPACED_DIGITS = re.compile(r"\d+(?:\s+\d+)+")
_THOUSANDS_BY_SPACE = re.compile(r"\d{1,3}(?:\s+\d{3})+")
_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathbf|mathrm|mbox|boxed|fbox|bf)?\s*\{")
_NAME_IS = re.compile(r"^\\?[A-Za-z]+(?:_\{?[A-Za-z0-9]+\}?)?'*=(?!=)")
_DECORATION_END = re.compile(
    r"(?:\\%|%|\^\{?\\circ\}?|\\circ|\\degree|"
    r"\\(?:text|mbox|mathrm|textrm)\{([A-Za-z. ]*)\}(?:\^\{?[23]\}?)?|([A-Za-z]{2,})(?:\^\{?[23]\}?)?)$")
# Words that join two candidates are not units: `12 \text{ or }` is not "12 (unit: or)".
_NOT_UNITS = {"or", "and", "to", "nor", "plus", "minus", "times", "but", "not", "maybe",
              "either", "over", "than", "approximately", "about"}
_INT = r"[-+]?\d+"
_FRAC_ARG = r"\{\s*([-+]?\d+)\s*\}|(\d)"
_FRACTION = re.compile(rf"\\frac(?:{_FRAC_ARG})(?:{_FRAC_ARG})")
_SLASH = re.compile(rf"({_INT})/(\d+)")
_MIXED = re.compile(rf"(\d+)(\\frac.*)")
_DECIMAL = re.compile(r"(?:\d{1,3}(?:(?:,|\{,\})\d{3})+|\d+)(?:\.\d+)?|\.\d+")


def _blank_to_space(s: str) -> str:
    s = _BLANK.sub(" ", s).replace("\\!", "")  # \! is a negative space: it joins
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


@lru_cache(maxsize=1 << 16)
def parse_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, in final form) when `s` is one number, else None.

    A number: an integer or decimal (thousands separated by `,`, `{,}` or a space in
    groups of three), `\\frac{p}{q}` or `p/q` of integers, a mixed number `1\\frac{4}{5}`;
    with an optional sign, a leading `x =`, a leading `\\$` and trailing units, `\\%` or
    degrees. Final form: any integer or decimal; a fraction only in lowest terms with a
    denominator above 1 (`\\frac{6}{8}`, `\\frac{24}{2}` are divisions left undone).
    """
    s = _blank_to_space(s.strip())
    if len(s) > 200:
        return None
    for run in _SPACED_DIGITS.findall(s):  # `1 000` is a number; `1 2` is two
        if not _THOUSANDS_BY_SPACE.fullmatch(run):
            return None
    s = normalize_answer(s)
    s = _unwrap(s)
    s = _NAME_IS.sub("", s, count=1)
    s = _unwrap(s.removeprefix("\\$").removeprefix("$"))
    while (m := _DECORATION_END.search(s)) and m.start() > 0:
        word = m.group(1) if m.group(1) is not None else m.group(2)
        if word is not None and _NOT_UNITS.intersection(word.lower().replace(".", " ").split()):
            return None
        s = s[:m.start()].rstrip().rstrip(".").rstrip()
    s = _unwrap(s.removeprefix("\\$").removeprefix("$"))
    sign = -1 if s.startswith("-") else 1
    body = s[1:] if s[:1] in "+-" else s
    if _DECIMAL.fullmatch(body):
        return sign * Fraction(_clean_number(body)), True
    value = _fraction(body)
    if value is None:
        mixed = _MIXED.fullmatch(body)
        part = _fraction(mixed.group(2)) if mixed else None
        if part is None or not 0 < part[0] < 1:
            return None
        value = (int(mixed.group(1)) + part[0], part[1])
    return sign * value[0], value[1]


def _fraction(s: str) -> tuple[Fraction, bool] | None:
    m = _FRACTION.fullmatch(s)
    if m:
        p, q = int(m.group(1) or m.group(2)), int(m.group(3) or m.group(4))
    elif m := _SLASH.fullmatch(s):
        p, q = int(m.group(1)), int(m.group(2))
    else:
        return None
    if q == 0:
        return None
    return Fraction(p, q), q > 1 and gcd(p, q) == 1


def _unwrap(s: str) -> str:
    """`{12}`, `\\text{12}`, `\\mathbf{12}` -> `12` (a wrapper around the whole answer)."""
    while (m := _WRAPPER.match(s)) and _group_end(s, m.end()) == len(s) - 1:
        s = s[m.end():-1].strip()
    return s


# --- expressions that are not final, and expressions copied from the prompt ---------

_NUM = r"\d+(?:\.\d+)?"
_OP = r"(?:[-+*/]|\\times|\\cdot|\\div|\\ast)"
# Arithmetic between two literal numbers, left undone: `8+4`, `7\times8`, `3!`. (A power
# like `2^{3}` is no number either, so a numeric gold refuses it; against a symbolic gold
# it goes to math-verify, where towers like `9^{9^{9}}` meet the pool's time limits.)
_UNDONE = re.compile(rf"(?<![\w.^_}}])({_NUM})\s*({_OP})\s*({_NUM})(?![\w.^{{(\\])"
                     r"|(?<![\w.])\d+!")
_FRACTION_ANYWHERE = re.compile(r"\\frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_SQRT = re.compile(r"\\sqrt\s*\{\s*(\d+)\s*\}")
_OR_WORD = re.compile(r"\\(?:lor|vee)(?![A-Za-z])|(?<![A-Za-z])or(?![A-Za-z])", re.IGNORECASE)


def undone_arithmetic(answer: str) -> set[str]:
    """The pieces of `answer` that are arithmetic on literal numbers left undone: `8+4`,
    `98-73`, `7\\times 8`, `5!`, a slash fraction or `\\frac` not in lowest terms
    (`24/2`, `\\frac{6}{8}`), the square root of a perfect square (`\\sqrt{144}`)."""
    s = normalize_answer(_blank_to_space(answer))
    found = set()
    for m in _UNDONE.finditer(s):
        if m.group(2) == "/":  # a fraction: undone only when it reduces
            p, q = m.group(1), m.group(3)
            if "." not in p + q and int(q) > 1 and gcd(int(p), int(q)) == 1:
                continue
        found.add(m.group())
    for m in _FRACTION_ANYWHERE.finditer(s):
        p, q = int(m.group(1)), int(m.group(2))
        if q <= 1 or gcd(p, q) != 1:
            found.add(m.group())
    for m in _SQRT.finditer(s):
        n = int(m.group(1)) if len(m.group(1)) < 40 else 2
        if isqrt(n) ** 2 == n:
            found.add(m.group())
    return found


# Two numbers offered side by side: `12, 13`, `12 \text{ or } 13`, `12 \pm 1` (not `2^{3}`,
# which is one number left unevaluated).
_CANDIDATES = re.compile(r"\d\s*(?:,|;|\\pm|\\mp|\\text\{\s*(?:or|and)\s*\}|\b(?:or|and)\b)\s*"
                         r"[-+]?(?:\d|\.\d|\\frac)", re.IGNORECASE)


def _assigned_name(answer: str) -> str | None:
    """`x` of `x = 2` (an answer written as an assignment), else None."""
    m = _NAME_IS.match(_canonical(answer))
    return m.group()[:-1] if m else None


def _top_level_commas(s: str) -> int:
    depth = count = 0
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth <= 1:  # a tuple's own commas count (depth 1)
            count += 1
    return count


def answer_form(answer: str, gold: str | None = None,
                prompt: str | None = None) -> dict:
    """How an extracted answer stands against the final-answer rule (no sympy).

    Returns {"number": the gold is a number, "final": in final form, "hedged": offers two
    candidates, "restates_prompt": an expression copied from the prompt}. Without a gold,
    "final" means "no arithmetic on literal numbers left undone".
    """
    gold_number = parse_number(gold) if gold else None
    same_as_gold = gold is not None and _canonical(answer) == _canonical(gold)
    restated = not same_as_gold and restates_prompt(answer, prompt)
    if gold_number is not None:
        pred = parse_number(answer)
        final = pred is not None and (pred[1] or same_as_gold)
        hedged = pred is None and bool(_CANDIDATES.search(normalize_answer(answer)))
        return {"number": True, "final": final, "hedged": hedged, "restates_prompt": restated}
    undone = undone_arithmetic(answer) - (undone_arithmetic(gold) if gold else set())
    # Without a gold only a word that joins two answers ("12 or 13") is sure to be a hedge
    # (commas and \\pm may be the answer's own).
    hedged = gold is None and bool(_OR_WORD.search(normalize_answer(answer)))
    if gold is not None and not same_as_gold:
        g, p = normalize_answer(gold), normalize_answer(answer)
        plus_minus = ("\\pm" in p or "\\mp" in p) and not ("\\pm" in g or "\\mp" in g)
        hedged = (plus_minus or (bool(_OR_WORD.search(p)) and not _OR_WORD.search(g))
                  or (_top_level_commas(p) > _top_level_commas(g) and "\\pm" not in g))
    return {"number": False, "final": same_as_gold or not undone, "hedged": hedged,
            "restates_prompt": restated}


_OPERATOR = re.compile(r"[-+*/^=!]|\\frac|\\sqrt|\\binom")
_TOKEN = re.compile(r"\\[A-Za-z]+|\d+(?:\.\d+)?|[A-Za-z]")
_MATH_SEGMENT = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_PLAIN_EXPRESSION = re.compile(r"[\w.\\{}()^]+(?:\s*(?:[-+*/^=]|\\times|\\cdot|\\div)\s*"
                               r"[\w.\\{}()^]+)+")


def _canonical(s: str) -> str:
    """A spelling for comparing expressions as text: normalised, one symbol per operator,
    no grouping braces."""
    s = normalize_answer(_blank_to_space(s))
    for a, b in (("\\times", "*"), ("\\cdot", "*"), ("\\ast", "*"), ("\\div", "/")):
        s = s.replace(a, b)
    return s.replace("{", "").replace("}", "")


def _operands(s: str) -> tuple[str, ...]:
    """The sorted numbers, letters and commands of an expression: the same for `8+4`
    and `4+8`, for `(x+1)^2-1` and `-1+(x+1)^2`."""
    return tuple(sorted(_TOKEN.findall(_canonical(s))))


@lru_cache(maxsize=4096)
def _prompt_expressions(prompt: str) -> tuple[str, frozenset]:
    """(the prompt as _canonical text, the operand lists of its expressions): each math
    segment, each plain-text expression, and each side of an `=` in them."""
    pieces = [next(g for g in m.groups() if g is not None) for m in _MATH_SEGMENT.finditer(prompt)]
    pieces += _PLAIN_EXPRESSION.findall(_MATH_SEGMENT.sub(" ", prompt))
    expressions = set()
    for piece in pieces:
        for side in [piece, *piece.split("=")]:
            if _OPERATOR.search(_canonical(side).lstrip("+-")):
                expressions.add(_operands(side))
    return _canonical(prompt), frozenset(expressions)


def restates_prompt(answer: str, prompt: str | None) -> bool:
    """Whether the answer is an expression (it has an operator) copied from the prompt: its
    text appears there, or it has the same numbers, letters and commands as one of the
    prompt's expressions (`4 + 8` for "What is 8 + 4?"). A bare number never is."""
    if not prompt or not isinstance(prompt, str):
        return False
    a = _canonical(answer)
    if len(a) < 3 or not _OPERATOR.search(a.lstrip("+-")):
        return False
    text, expressions = _prompt_expressions(prompt)
    return a in text or _operands(answer) in expressions


def judge_answer(completion: str, gold: str, prompt: str | None = None) -> dict:
    """The `math` reward's verdict where it needs no sympy, and why.

    Returns explain_math's fields (rewards.explain_math): answer, rule, gold (normalised),
    final, hedged, restates_prompt, verdict (True/False, or None: ask math-verify) and
    source ("no answer", "hedged", "not final", "restates the prompt", "fast path", or
    "math-verify" when verdict is None).
    """
    answer, rule, hedged = find_answer(completion)
    out = {"answer": answer, "rule": rule, "gold": normalize_answer(gold), "final": None,
           "hedged": hedged, "restates_prompt": False, "verdict": False, "source": "no answer"}
    if answer is None:
        return out
    form = answer_form(answer, gold, prompt)
    out.update(final=form["final"], restates_prompt=form["restates_prompt"],
               hedged=hedged or form["hedged"])
    if out["hedged"]:
        out["source"] = "hedged"
    elif not form["final"]:
        out["source"] = "not final"
    elif form["restates_prompt"]:
        out["source"] = "restates the prompt"
    elif form["number"]:  # a final number against a numeric gold: exact arithmetic decides
        pred = parse_number(answer)
        names = {_assigned_name(answer), _assigned_name(gold)} - {None}
        out["verdict"] = (pred[0] == parse_number(gold)[0] and len(names) < 2 if pred
                          else _canonical(answer) == _canonical(gold))
        out["source"] = "fast path"
    else:
        fast = match_without_sympy(gold, answer)
        out["verdict"], out["source"] = ((fast, "fast path") if fast is not None
                                         else (None, "math-verify"))
    # What math-verify judges when asked: the answer without invisible material.
    out["pred"] = _blank_to_space(answer).strip()
    return out
