"""Leases alone: a report is cut to the jobs of its lease, and the id-range helpers."""

from __future__ import annotations

import itertools
import pickle
import random

import pytest

from taskmaster.feeder import Chunk
from taskmaster.leases import Lease, chunk_of, ids_within, merged, runs


def _lease(chunk: Chunk) -> Lease:
    return Lease(7, b"w", chunk, 0.0, len(chunk), suspect=False)


def test_a_range_lease_keeps_only_its_ids() -> None:
    lease = _lease(Chunk(100, [b"x"] * 10))  # ids 100 … 109
    assert lease.within([(95, 103)]) == range(100, 103)
    assert lease.within([(108, 10**9)]) == range(108, 110)
    assert len(lease.within([(0, 50)])) == 0
    assert lease.within([(101, 103), (102, 105), (109, 200)]) == [101, 102, 103, 104, 109]


def test_an_explicit_lease_keeps_only_its_ids_each_once() -> None:
    ids = [40, 3, 17, 9]  # explicit ids need not be sorted
    lease = _lease(Chunk(40, [pickle.dumps(i) for i in ids], ids))
    assert lease.within([(0, 10)]) == [3, 9]
    assert lease.within([(0, 2**62), (5, 20), (0, 2**62)]) == [3, 9, 17, 40]
    assert lease.within([(10, 17)]) == []


def test_report_counts_what_is_new() -> None:
    lease = _lease(Chunk(0, [b"x"] * 10))
    assert lease.report(0, 4) == 4
    assert lease.report(2, 4) == 2
    assert lease.report(0, 6) == 0


def test_chunk_of_consecutive_ids_is_a_range_chunk() -> None:
    jobs = [(i, pickle.dumps(i)) for i in range(5, 9)]
    assert chunk_of(jobs, consecutive=True).ids is None
    assert chunk_of(jobs).ids == [5, 6, 7, 8]
    assert chunk_of([(5, b"a"), (7, b"b")], consecutive=True).ids == [5, 7]


@pytest.mark.parametrize("seed", range(20))
def test_the_helpers_agree_with_sets(seed: int) -> None:
    rng = random.Random(seed)
    ids = sorted(rng.sample(range(200), rng.randrange(0, 60)))
    ranges = [(a, a + rng.randrange(0, 40)) for a in (rng.randrange(-10, 200) for _ in range(6))]
    covered = {i for start, end in ranges for i in range(start, end)}
    assert list(ids_within(ids, ranges)) == [i for i in ids if i in covered]
    spans = merged(ranges)
    assert {i for start, end in spans for i in range(start, end)} == covered
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans)), "sorted, apart"
    found = list(runs(ids))
    assert [i for start, n in found for i in range(start, start + n)] == ids
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(found)), "maximal runs"
