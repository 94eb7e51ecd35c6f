"""Small shared helpers: "not estimable" entries and JSON-safe numbers.

Every statistic of the harness is a plain dict. A statistic the data cannot support is
the same dict with ``None`` in place of its numbers and a ``not_estimable`` reason, so a
report never carries NaN or a silent number.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["round_half_up", "not_estimable", "is_estimable", "finite_or_none", "json_safe",
           "collect_not_estimable"]


def round_half_up(x: float, digits: int) -> str:
    """Decimal text of ``x`` rounded half away from zero, as papers round (81.25 -> 81.3).

    Python's ``round`` and ``format`` round half to even on the binary value, which turns
    26/32 = 81.25 % into 81.2.

    Examples
    --------
    >>> round_half_up(81.25, 1), round_half_up(0.125, 2), round_half_up(-2.5, 0)
    ('81.3', '0.13', '-3')
    """
    from decimal import ROUND_HALF_UP, Decimal

    q = Decimal(1).scaleb(-digits)
    return str(Decimal(repr(float(x))).quantize(q, rounding=ROUND_HALF_UP))


def not_estimable(reason: str, **fields: Any) -> dict:
    """A statistic that could not be computed, with the reason.

    Parameters
    ----------
    reason : str
        Why (e.g. "no positive lesions by consensus").
    **fields
        Extra context kept in the entry (e.g. ``n=0``).

    Examples
    --------
    >>> not_estimable("single class")["estimate"] is None
    True
    """
    out = {"estimate": None, "ci_low": None, "ci_high": None, "not_estimable": str(reason)}
    out.update(fields)
    return out


def is_estimable(entry: Any) -> bool:
    """True when ``entry`` is a dict with a finite estimate and no ``not_estimable`` key."""
    return (isinstance(entry, dict) and "not_estimable" not in entry
            and finite_or_none(entry.get("estimate")) is not None)


def finite_or_none(x: Any) -> float | None:
    """``float(x)`` if it is a finite number, else ``None``."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def json_safe(obj: Any, *, path: str = "", problems: list | None = None) -> Any:
    """Convert numpy types to Python ones and non-finite floats to ``None``.

    Parameters
    ----------
    obj : any
        Nested dicts/lists/tuples of numbers, strings, numpy scalars and arrays.
    path : str
        JSON path of ``obj`` (used in ``problems``).
    problems : list, optional
        Receives ``(path, reason)`` for every non-finite number replaced by ``None``.

    Examples
    --------
    >>> json_safe({"a": float("nan"), "b": np.int64(3)})
    {'a': None, 'b': 3}
    """
    if isinstance(obj, dict):
        return {str(k): json_safe(v, path=f"{path}/{k}", problems=problems) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, path=f"{path}/{i}", problems=problems) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist(), path=path, problems=problems)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        if not math.isfinite(v):
            if problems is not None:
                problems.append((path, f"non-finite number {v!r} replaced by null"))
            return None
        return v
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "item"):
        return json_safe(obj.item(), path=path, problems=problems)
    return str(obj)


def collect_not_estimable(obj: Any, path: str = "") -> list[dict]:
    """List every ``not_estimable`` entry in a nested result as ``{"path", "reason"}``."""
    out: list[dict] = []
    if isinstance(obj, dict):
        if "not_estimable" in obj:
            out.append({"path": path or "/", "reason": obj["not_estimable"]})
        for k, v in obj.items():
            if k != "not_estimable":
                out.extend(collect_not_estimable(v, f"{path}/{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(collect_not_estimable(v, f"{path}/{i}"))
    return out
