"""Verifiable rewards: 1.0 when a completion's final answer matches the reference, else 0.0.

GSM8K: the number after the last '####' (commas, '$' and trailing '.' removed), compared as
numbers. MATH: the content of the last \\boxed{...} (balanced braces), compared with
math-verify when it is installed, else after a LaTeX normalization (DESIGN.md §7). A
malformed completion gets 0.0; no input raises.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_gsm8k(text: str) -> str | None:
    """The final answer after the last '####', as a plain number string, or None."""
    if not isinstance(text, str) or "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip().replace("$", "")
    m = _NUMBER.match(tail)
    if not m:
        return None
    return m.group(0).replace(",", "").rstrip(".")


def _as_number(s: str):
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_reward(completion: str, reference: str) -> float:
    """1.0 if the completion's '#### n' equals the reference's (as numbers)."""
    try:
        got, want = extract_gsm8k(completion), extract_gsm8k(reference)
        if got is None or want is None:
            return 0.0
        a, b = _as_number(got), _as_number(want)
        return float(a is not None and b is not None and a == b)
    except Exception:  # never let a completion crash training
        return 0.0


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} with balanced braces (also \\fbox), or None."""
    if not isinstance(text, str):
        return None
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    i = starts[-1]
    depth = 1
    j = i
    while j < len(text) and depth:
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
        j += 1
    if depth:
        return None
    return text[i:j - 1]


def normalize_math(s: str) -> str:
    """LaTeX answer normalization: spacing, \\left/\\right, \\dfrac, \\text{}, units of degrees,
    dollars, trailing dots, a leading 'x =' and redundant outer braces."""
    s = s.strip()
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""),
                 ("dfrac", "frac"), ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\$", ""),
                 ("$", ""), ("\\%", ""), ("%", "")):
        s = s.replace(a, b)
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"^[a-zA-Z]\s*=", "", s)
    s = s.replace(" ", "").rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    while s.startswith("{") and s.endswith("}") and _balanced(s[1:-1]):
        s = s[1:-1]
    m = re.fullmatch(r"\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m and int(m.group(2)) != 0:
        s = str(Fraction(int(m.group(1)), int(m.group(2))))
    num = _as_number(s.replace(",", "")) if re.fullmatch(r"-?[\d,]*\.?\d+(/\d+)?", s) else None
    return str(num) if num is not None else s


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += ch == "{"
        depth -= ch == "}"
        if depth < 0:
            return False
    return depth == 0


def math_reward(completion: str, reference: str) -> float:
    """1.0 if the last \\boxed{} of the completion matches the reference solution's."""
    try:
        got, want = extract_boxed(completion), extract_boxed(reference)
        if got is None or want is None:
            return 0.0
        try:
            from math_verify import parse, verify  # optional: HF math-verify

            return float(bool(verify(parse(f"${want}$"), parse(f"${got}$"))))
        except ImportError:
            return float(normalize_math(got) == normalize_math(want))
    except Exception:
        return 0.0


def reward(completion: str, reference: str, kind: str) -> float:
    return math_reward(completion, reference) if kind == "math" else gsm8k_reward(completion, reference)
