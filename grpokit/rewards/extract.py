"""Answer extraction from model text: the last `\\boxed{...}`, the last number, `<answer>` tags.

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
