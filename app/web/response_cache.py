"""Serialized bodies about finished jobs, kept per process: a finished run never changes."""

from __future__ import annotations

import threading
from collections import OrderedDict


class FinishedCache:
    """A small LRU of serialized bodies about finished evaluations (those never change).

    Bounded by entry count and by total bytes: comparison bodies can weigh megabytes.
    """

    def __init__(self, size: int = 2048, max_bytes: int = 64 << 20) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes // 4:
            return  # one huge body must not flush everything else
        with self._lock:
            if (old := self._items.pop(key, None)) is not None:
                self._bytes -= len(old)
            self._items[key] = value
            self._bytes += len(value)
            while len(self._items) > self.size or self._bytes > self.max_bytes:
                self._bytes -= len(self._items.popitem(last=False)[1])
