"""SerializedList: behaves as an immutable list of records, holds two arrays whatever the record count, and a
DataLoader worker reading every record leaves the parent's copy untouched."""
from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from networks.common.serialized import SerializedList


@dataclass
class Rec:
    name: str
    box: tuple
    extra: dict


def _records(n: int) -> list[Rec]:
    return [Rec(f"img_{i}.jpg", (i, i + 1.5, 3, 4), {"k": list(range(i % 7))}) for i in range(n)]


def test_acts_as_an_immutable_list():
    recs = _records(50)
    s = SerializedList(recs)
    assert len(s) == 50 and bool(s) and not SerializedList([])
    assert list(s) == recs and s[-1] == recs[-1] and s[7] == recs[7]
    s[3].extra["k"].append(99)  # a copy: the stored record does not change
    assert s[3] == recs[3]
    with pytest.raises(IndexError):
        s[50]
    with pytest.raises(TypeError):
        s[1:3]
    assert pickle.loads(pickle.dumps(s))[12] == recs[12]


def test_storage_is_two_arrays_whatever_the_count():
    s = SerializedList(_records(2000))
    arrays = [v for v in vars(s).values() if isinstance(v, np.ndarray)]
    assert len(arrays) == 2 and len(vars(s)) == 2  # no per-record Python object to reference-count
    assert s.nbytes == sum(a.nbytes for a in arrays)


class _Reader(Dataset):
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return torch.tensor(self.records[i].box)


def test_workers_read_every_record():
    s = SerializedList(_records(300))
    got = torch.cat([b for b in DataLoader(_Reader(s), batch_size=32, num_workers=2)])
    assert torch.equal(got, torch.tensor([r.box for r in _records(300)]))
