"""`RecentResults`: an in-process memo of the last few results of an expensive computation, by a key that names
everything the result depends on (digests of weights and inputs, settings)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class RecentResults(Generic[V]):
    """The results of the last `kept` distinct keys, the least recently used dropped first.

    `get(key, compute)` returns the result stored under `key`, or stores and returns `compute()`. The key must fix
    the result: two computations with equal keys would give the same result.
    """

    def __init__(self, kept: int):
        if kept < 1:
            raise ValueError(f"kept must be >= 1, got {kept}")
        self.kept = kept
        self._results: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable, compute: Callable[[], V]) -> V:
        if key not in self._results:
            self._results[key] = compute()
            while len(self._results) > self.kept:
                self._results.popitem(last=False)
        self._results.move_to_end(key)
        return self._results[key]

    def __len__(self) -> int:
        return len(self._results)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._results
