"""Before/after pairs on a shared, noisy machine: run the two alternately (A B, B A, A B, ...) and keep each one's
median, so that a burst of someone else's load lands on both sides instead of on one."""
from __future__ import annotations

import statistics


def alternate(n: int, labels: tuple[str, str]) -> list[str]:
    """The run order for n repeats of a pair: A B B A A B ..."""
    order: list[str] = []
    for i in range(n):
        order += labels if i % 2 == 0 else labels[::-1]
    return order


def median_of(results: list):
    """Field-wise median of equally shaped results (numbers: median, the lower middle one for integers; dicts
    and lists: per key and index; anything else: the first one's). One result comes back unchanged."""
    first = results[0]
    if len(results) == 1:
        return first
    if isinstance(first, bool) or not all(type(r) is type(first) for r in results):
        return first
    if isinstance(first, int):
        return statistics.median_low(results)   # counts stay whole
    if isinstance(first, float):
        return statistics.median(results)
    if isinstance(first, dict):
        return {k: median_of([r[k] for r in results]) if all(k in r for r in results) else v
                for k, v in first.items()}
    if isinstance(first, list) and all(len(r) == len(first) for r in results):
        return [median_of(list(items)) for items in zip(*results)]
    return first
