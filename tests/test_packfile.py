"""Pack files (voxblock.packfile): a record is read whole or not at all, whatever a killed
writer left, and the newest record of a key wins across writers."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxblock.packfile import (
    ENTRY,
    HEADER,
    CorruptRecord,
    Entry,
    PackIndex,
    PackWriter,
    newest_keys,
    scan,
)

records = st.lists(
    st.tuples(st.integers(0, 5), st.binary(max_size=40), st.booleans()), min_size=1, max_size=6
)


def _expected(written: list[tuple[int, bytes, bool]]) -> dict[int, bytes]:
    newest: dict[int, bytes | None] = {}
    for key, payload, tombstone in written:
        newest[key] = None if tombstone else payload
    return {k: v for k, v in newest.items() if v is not None}


def _read(directory: Path, kind: str = "t") -> dict[int, bytes]:
    index = PackIndex(directory, kind)
    index.refresh()
    return dict(index.items())


@settings(max_examples=25, deadline=None)
@given(written=records)
def test_every_truncation_of_a_pack_reads_as_a_prefix_of_its_records(tmp_path_factory, written):
    """Cut the records, or the index, at every byte (a writer killed there): a reader sees the
    records whose entries are whole, newest per key, and nothing torn."""
    directory = tmp_path_factory.mktemp("pack")
    writer = PackWriter(directory, "t")
    bin_ends, idx_ends = [0], [0]
    for key, payload, tombstone in written:
        writer.append(key, payload, tombstone=tombstone)
        bin_ends.append((directory / f"{writer.stem}.bin").stat().st_size)
        idx_ends.append((directory / f"{writer.stem}.idx").stat().st_size)
    assert idx_ends[-1] == ENTRY.size * len(written)
    data = (directory / f"{writer.stem}.bin").read_bytes()
    index = (directory / f"{writer.stem}.idx").read_bytes()
    cut = tmp_path_factory.mktemp("cut")
    for at in range(len(data) + 1):  # the records cut at `at`, the index whole up to them
        (cut / "t-x.bin").write_bytes(data[:at])
        whole = sum(1 for end in bin_ends[1:] if end <= at)
        (cut / "t-x.idx").write_bytes(index[: whole * ENTRY.size])
        assert _read(cut) == _expected(written[:whole])
        assert [(k, p) for k, _, t, p in scan(cut / "t-x.bin") if not t] == [
            (k, p) for k, p, t in written[:whole] if not t
        ]
    for at in range(len(index) + 1):  # the index cut at `at` (its last entry torn)
        (cut / "t-x.bin").write_bytes(data)
        (cut / "t-x.idx").write_bytes(index[:at])
        assert _read(cut) == _expected(written[: at // ENTRY.size])
        assert newest_keys(cut, "t", chunk=2).tolist() == sorted(_expected(written[: at // ENTRY.size]))


@settings(max_examples=20, deadline=None)
@given(written=records, at=st.integers(0, 10_000))
def test_an_index_read_while_its_pack_grows_catches_up(tmp_path_factory, written, at):
    """Refreshed at any moment (here: with a torn last entry), an index takes the whole
    entries, and the rest once they are whole."""
    directory = tmp_path_factory.mktemp("pack")
    writer = PackWriter(directory, "t")
    for key, payload, tombstone in written:
        writer.append(key, payload, tombstone=tombstone)
    path = directory / f"{writer.stem}.idx"
    whole = path.read_bytes()
    path.write_bytes(whole[: at % (len(whole) + 1)])
    indexes = [PackIndex(directory, "t"), PackIndex(directory, "t", small=0)]
    for index in indexes:
        index.refresh()
    path.write_bytes(whole)
    for index in indexes:
        index.refresh()
        assert dict(index.items()) == _expected(written)


def test_a_damaged_record_is_an_error_not_a_missing_one(tmp_path):
    writer = PackWriter(tmp_path, "t")
    writer.append(7, b"faces of block 7")
    path = tmp_path / f"{writer.stem}.bin"
    data = bytearray(path.read_bytes())
    data[HEADER.size + 2] ^= 0xFF
    path.write_bytes(bytes(data))
    index = PackIndex(tmp_path, "t")
    index.refresh()
    with pytest.raises(CorruptRecord, match="key 7 is damaged"):
        index.get(7)


def test_a_failed_append_leaves_the_pack_whole(tmp_path, monkeypatch):
    """A write that fails half way (disk full) is cut off: what is appended later is read."""
    writer = PackWriter(tmp_path, "t")
    writer.append(1, b"one")
    real = os.write
    calls = []

    def half(fd: int, data) -> int:
        calls.append(1)
        if len(calls) == 1:
            real(fd, bytes(data)[:5])
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", half)
    with pytest.raises(OSError, match="No space"):
        writer.append(2, b"two")
    monkeypatch.setattr(os, "write", real)
    writer.append(3, b"three")
    assert _read(tmp_path) == {1: b"one", 3: b"three"}
    assert [k for k, *_ in scan(tmp_path / f"{writer.stem}.bin")] == [1, 3]


def test_a_stamp_past_a_known_record_wins_whatever_the_clocks(tmp_path):
    """The writer that knows of a record stamps past it (a clock behind the other's)."""
    first, second = PackWriter(tmp_path, "t"), PackWriter(tmp_path, "t")
    second._pid = first._pid = os.getpid()
    first._stem, second._stem = "t-a", "t-b"
    ahead = first.append(5, b"old", after=time.time_ns() + 10**12)  # a clock 1000 s ahead
    second.append(5, b"new", after=ahead)
    assert _read(tmp_path) == {5: b"new"}
    second.append(5, tombstone=True, after=ahead + 1)
    assert _read(tmp_path) == {}


def _append_many(directory: str, worker: int, count: int) -> None:
    writer = PackWriter(directory, "t")
    for i in range(count):
        writer.append(worker * 1000 + i, bytes([worker]) * (i % 300))


def test_concurrent_appenders_and_a_reader(tmp_path):
    """Four processes append while this one reads: each refresh sees whole records only, and
    the last sees them all, in a pair of files per process."""
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(tmp_path), w, 300)) for w in range(4)]
    for process in workers:
        process.start()
    index = PackIndex(tmp_path, "t")
    while any(process.is_alive() for process in workers):
        index.refresh()
        for key, payload in index.items():
            assert payload == bytes([key // 1000]) * (key % 1000 % 300)
    for process in workers:
        process.join()
        assert process.exitcode == 0
    index.refresh()
    assert len(index) == 1200
    assert len(list(tmp_path.iterdir())) == 8


def test_a_directory_emptied_between_refreshes_is_read_again(tmp_path):
    writer = PackWriter(tmp_path, "t")
    writer.append(1, b"before")
    writer.append(2, b"before")
    index = PackIndex(tmp_path, "t")
    index.refresh()
    for path in tmp_path.iterdir():
        path.unlink()
    writer.append(3, b"after")  # the same process, a fresh run: a new pack
    writer.append(4, b"after")
    writer.append(5, b"after")
    index.refresh()
    assert dict(index.items()) == {3: b"after", 4: b"after", 5: b"after"}


@settings(max_examples=30, deadline=None)
@given(
    written=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 6), st.booleans(), st.integers(-2, 2)),
        min_size=1,
        max_size=20,
    ),
    chunk=st.integers(1, 4),
)
def test_newest_keys_are_the_keys_an_index_holds(tmp_path_factory, written, chunk):
    """An index's newest entries, taken one by one or merged into its table at once, and
    newest_keys (arrays, for the driver): the same, across writers, stamps out of order and
    ties, tombstones, and any chunk of reading."""
    directory = tmp_path_factory.mktemp("pack")
    writers = [PackWriter(directory, "t") for _ in range(3)]
    for number, writer in enumerate(writers):
        writer._pid, writer._stem = os.getpid(), f"t-{number}"
    base = time.time_ns() + 10**12
    for writer, key, tombstone, shift in written:
        writers[writer].append(key, b"x", after=base + shift * 10**9 - 1, tombstone=tombstone)
    one_by_one, merged = PackIndex(directory, "t", small=10**6), PackIndex(directory, "t", small=0)
    one_by_one.refresh()
    merged.refresh()
    assert sorted(one_by_one.entries(), key=Entry.order) == sorted(merged.entries(), key=Entry.order)
    assert len(one_by_one) == len(merged)
    expected = sorted(key for key, _ in one_by_one.items())
    assert newest_keys(directory, "t", chunk).tolist() == expected == [key for key, _ in merged.items()]
    assert [merged.newest(key) for key in range(7)] == [one_by_one.newest(key) for key in range(7)]


@settings(max_examples=40, deadline=None)
@given(
    edges=st.lists(st.lists(st.integers(0, 2**64 - 1), min_size=5, max_size=5), max_size=6),
    fragments=st.lists(st.integers(0, 2**64 - 1), max_size=6),
    scale=st.sampled_from([1, 2**8, 2**16, 2**32, 2**64]),
)
def test_an_edge_record_reads_back_as_written_in_either_form(tmp_path_factory, edges, fragments, scale):
    """Pass 1's edge record (compact: each column as narrow as its values allow) through a pack,
    and the form before it (all uint64, earlier run directories): the same arrays back; a cut
    record is an error."""
    import numpy as np

    from voxblock.errors import VoxblockError
    from voxblock.segment.storage import EdgeWriter, edge_record, read_edge_record

    wanted = np.array(edges, dtype=object).reshape(-1, 5) % scale
    wanted, ids = wanted.astype(np.uint64), (np.array(fragments, dtype=object) % scale).astype(np.uint64)
    directory = tmp_path_factory.mktemp("edges")
    EdgeWriter(directory).save(3, wanted, ids)
    index = PackIndex(directory, "edges")
    index.refresh()
    payload = index.get(3)
    legacy = np.concatenate([np.array([len(wanted), len(ids)], np.uint64), wanted.ravel(), ids]).tobytes()
    for record in (payload, legacy):
        got_edges, got_ids = read_edge_record(record)
        assert got_edges.dtype == got_ids.dtype == np.uint64
        assert np.array_equal(got_edges, wanted) and np.array_equal(got_ids, ids)
        with pytest.raises(VoxblockError, match="not the edges of one block"):
            read_edge_record(record[:-8] if len(record) > 32 else record + b"\0" * 8)
    assert len(payload) <= len(edge_record(wanted, ids)) <= len(legacy) + 16
