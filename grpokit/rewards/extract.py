"""Answer extraction from model text: the last `\\boxed{...}`, the last number, `<answer>` tags.

One extractor serves both the reward and the evaluation: `numeric_match` compares `extract_number` of the
completion and of the reference, and cons@k votes on `answer_key`, which is that same number written
canonically (so two completions vote together exactly when `numeric_match` reads the same number in them).

Numbers are returned as `fractions.Fraction` so "3", "3.0" and "3.00" compare equal exactly, and
"1,234" (comma thousands separators) reads as 1234. A leading minus (ASCII or U+2212) counts as a sign
only when it is not glued to a preceding word or digit: "5-3" ends in the number 3, "x = -3" in -3.
"""
from __future__ import annotations

import re
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(
    r"(?<![\w.])"  # not glued to a word, digit or decimal point
    r"(?P<sign>[-\u2212])?"
    r"(?P<body>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
_FRAC = re.compile(r"^\\[dt]?frac\s*\{\s*([-\u2212]?\d+)\s*\}\s*\{\s*([-\u2212]?\d+)\s*\}$")
_ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces, else None."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


def last_answer_tag(text: str) -> str | None:
    """The stripped content of the last `<answer>...</answer>`, else None."""
    matches = _ANSWER_TAG.findall(text)
    return matches[-1].strip() if matches else None


def _to_fraction(sign: str | None, body: str) -> Fraction:
    value = Fraction(body.replace(",", ""))
    return -value if sign else value


def parse_number(text: str) -> Fraction | None:
    """`text` read as exactly one number ("-1,234.5", "\\frac{1}{2}", "$42$", "42."), else None."""
    s = text.strip().strip("$").strip()
    s = s[:-1].rstrip() if s.endswith(".") else s
    frac = _FRAC.match(s)
    if frac:
        num, den = (int(x.replace("\u2212", "-")) for x in frac.groups())
        return Fraction(num, den) if den != 0 else None
    match = _NUMBER.fullmatch(s)
    return _to_fraction(match["sign"], match["body"]) if match else None


def last_number(text: str) -> Fraction | None:
    """The last number anywhere in `text`, else None."""
    matches = list(_NUMBER.finditer(text))
    return _to_fraction(matches[-1]["sign"], matches[-1]["body"]) if matches else None


def extract_number(text: str) -> Fraction | None:
    """The answer number of a completion or a reference answer.

    If `text` has a `\\boxed{...}`, its content (read whole, e.g. `\\frac{1}{2}`, else its last number);
    otherwise `text` read whole as one number, else the last number in it (so "#### 72" gives 72).
    """
    boxed = last_boxed(text)
    if boxed is not None:
        whole = parse_number(boxed)
        return whole if whole is not None else last_number(boxed)
    whole = parse_number(text)
    return whole if whole is not None else last_number(text)


def format_number(value: Fraction) -> str:
    """`value` written canonically: "3", "-3", "1000.5" (a terminating decimal), else "p/q" ("1/3")."""
    den = value.denominator
    twos = fives = 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    if places == 0:
        return str(value.numerator)
    scaled = value * 10**places  # an integer: the decimal digits
    sign, digits = ("-" if scaled < 0 else ""), str(abs(int(scaled))).rjust(places + 1, "0")
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def answer_key(text: str) -> str | None:
    """The answer of a completion as a vote key for cons@k (`grpokit.report.evaluate`).

    The number `extract_number` reads (the one `numeric_match` grades), written by `format_number`, so
    "4", "4.0" and "\\boxed{4}" vote together and "5-3" votes 3. A completion without any number votes with
    the stripped content of its last `\\boxed{...}` if it has one (e.g. "\\pi"), else does not vote (None).
    """
    number = extract_number(text)
    if number is not None:
        return format_number(number)
    boxed = last_boxed(text)
    return (boxed.strip() or None) if boxed is not None else None
