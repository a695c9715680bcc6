"""Verifiable rewards: math-style final-answer checking."""

from __future__ import annotations

import re
from fractions import Fraction

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_answer(text: str) -> str | None:
    """The final answer in a response: a \\boxed{} value if present, else the last number."""
    boxed = BOXED.findall(text)
    if boxed:
        return str(boxed[-1]).strip()
    numbers = NUMBER.findall(text.replace(",", ""))
    return str(numbers[-1]) if numbers else None


def _as_number(value: str) -> Fraction | None:
    try:
        return Fraction(value.strip().replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def math_reward(response: str, reference: str) -> float:
    """1.0 when the response's final answer equals the reference (numerically, else as text), else 0.0."""
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    expected = extract_answer(reference) or reference.strip()
    got, want = _as_number(answer), _as_number(expected)
    if got is not None and want is not None:
        return 1.0 if got == want else 0.0
    return 1.0 if answer.strip() == expected.strip() else 0.0
