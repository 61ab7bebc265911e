"""Dataset records kept as one byte buffer, so DataLoader workers do not copy them page by page.

A DataLoader worker is a fork of the main process: it shares the parent's memory until it writes to it.  Reading
a Python object writes to it (its reference count), so a worker that walks a list of 860k record objects
touches every page they live on and ends up with a private copy of all of them — per worker, growing with the
iterations (the "DataLoader memory leak" of PyTorch issue #13246).  :class:`SerializedList` pickles every
record once into a single ``numpy`` byte array plus an offsets array: two objects, whatever the number of records,
so reading record ``i`` unpickles a fresh copy and touches nothing shared.  detectron2 and TAO
(``dataset_type: serialized``) do the same.
"""
from __future__ import annotations

import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["SerializedList"]


class SerializedList(Sequence):
    """An immutable sequence of picklable records stored as one ``uint8`` buffer and ``int64`` end offsets.

    ``len``, indexing (negative indices too), iteration and truth value behave as for a list; every access
    returns a new copy of the record (mutating it does not change the list).
    """

    def __init__(self, records: Iterable[Any]):
        blobs = [np.frombuffer(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for r in records]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("SerializedList does not slice; index one record at a time")
        n = len(self._ends)
        i = int(index) + n if int(index) < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"record {index} out of range for {n} records")
        start = int(self._ends[i - 1]) if i else 0
        return pickle.loads(memoryview(self._buffer[start:int(self._ends[i])]))

    @property
    def nbytes(self) -> int:
        """Bytes held (buffer and offsets)."""
        return int(self._buffer.nbytes + self._ends.nbytes)

    def __repr__(self) -> str:
        return f"SerializedList({len(self)} records, {self.nbytes / 2**20:.1f} MiB)"

