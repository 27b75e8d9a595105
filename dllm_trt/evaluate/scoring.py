"""GSM8K-style answer extraction and scoring (no torch: usable by eval and by the training tools).

GSM8K's reference answers end in a line "#### <number>"; the rule is to take the number written after "####",
drop thousands separators (commas) and compare it with the reference number. Where a text has several "####"
markers the last one counts (the final answer of a completion that restated earlier ones).
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_MARK = "####"
# GSM8K's own pattern is r"#### (\-?[0-9\.\,]+)"; the space after the marker is optional here.
_NUMBER = re.compile(r"\s*(-?[0-9.,]+)")


def _normalise(raw: str) -> str | None:
    s = raw.replace(",", "").rstrip(".")
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
        return None
    return s


def extract_answer(text: str | None) -> str | None:
    """The number after the last '####' with commas removed (e.g. '-1,234.5'), or None if there is none."""
    if not text or _MARK not in text:
        return None
    m = _NUMBER.match(text.rsplit(_MARK, 1)[1])
    return _normalise(m.group(1)) if m else None


def _value(s: str | None) -> Decimal | None:
    if s is None:
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def is_correct(pred_text: str | None, gold_answer_text: str) -> bool:
    """True when the prediction's '####' number equals the gold one numerically ('7' == '7.0' == '007').
    gold_answer_text is a GSM8K answer field (worked solution ending in '#### N') or a bare number."""
    gold = extract_answer(gold_answer_text)
    if gold is None:
        gold = _normalise(gold_answer_text.strip())
    pred, want = _value(extract_answer(pred_text)), _value(gold)
    return pred is not None and want is not None and pred == want
