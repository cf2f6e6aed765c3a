"""Append-only pack files: many small records in a few files, one pair of files per writer.

A pass over 10^6-10^7 blocks that kept one file per block (its faces, its edges, a chunk's
halo slabs) would put millions of files in one folder: on a cluster filesystem that is the
metadata server's problem long before it is a bandwidth one. Instead every writer (one
worker process) appends its records to its own pack, so the files grow with the workers,
not the blocks:

    <dir>/<kind>-<host>-<pid>-<token>.bin   records: 40-byte header, then the payload
    <dir>/<kind>-<host>-<pid>-<token>.idx   one 48-byte entry per record, after it is whole

One writer per pack (the name holds the host, the pid and a random token, so neither a
forked child nor a later process with a reused pid appends to another's pack), hence no
locks, on any filesystem. A record is visible only once complete: its bytes are appended
to the .bin, then its entry to the .idx, and readers find records through the .idx only.
A writer killed mid-record leaves a tail with no entry (never read) or a torn entry (its
own checksum fails, or it is short: ignored, and re-examined on the next refresh, since a
live writer may still be writing it). A writer whose append fails (disk full) truncates the
pack back to its last whole record, so nothing it appends later sits behind a torn one.
The header also frames and checksums each record, so the .bin alone is readable (`scan`).

Each file is opened, appended to and closed per record: a close is what publishes data to
other hosts on NFS (close-to-open consistency), as the rename of a whole file did before.

Several records may share a key (a block retried after its record was written, a chunk
rewritten). Each carries a stamp (nanoseconds since the epoch, or later: a writer that knows
of an earlier record of the key stamps past it, a Lamport clock), and a reader takes the
record with the largest (stamp, pack, offset). A tombstone (an empty record so flagged)
hides the records before it.

Readers (`PackIndex`) read every pack's .idx incrementally (only the bytes added since the
last refresh, in one read per pack) into a table of the newest entry per key (numpy rows
sorted by key, 49 bytes a key; a dict for the few since it was last rebuilt), and a record's
payload with one read, checked against its checksum. A refresh costs a directory listing and
a stat per pack; bytes read grow by 48 bytes per record written. `newest_keys` lists the
keys alone, for a process that reads no record (the driver's check that every block has
edges).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"VXPK"
TOMBSTONE = 1
# magic, flags, key, stamp, payload length, payload crc32, header crc32 (of what precedes it)
HEADER = struct.Struct("<4sIqQQII")
# flags, payload crc32, key, stamp, offset of the header, payload length, entry crc32, padding
ENTRY = struct.Struct("<IIqQQQII")


class CorruptRecord(OSError):
    """A record its index calls whole does not match its checksum: the pack is damaged."""


@dataclass(frozen=True, slots=True)
class Entry:
    key: int
    stamp: int
    pack: str  # the .bin file's name
    offset: int  # of the header
    length: int  # of the payload
    crc: int
    tombstone: bool

    def order(self) -> tuple[int, str, int]:
        return (self.stamp, self.pack, self.offset)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _append(path: Path, data: bytes | memoryview) -> int:
    """Append `data` to `path` (one writer per file); return where it starts. A failed
    append is cut off again, so that the file ends with a whole record."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)
    return start


class PackWriter:
    """Appends records of one kind to this process's pack in `directory`."""

    def __init__(self, directory: str | os.PathLike[str], kind: str) -> None:
        self.directory = Path(directory)
        self.kind = kind
        self._pid = -1
        self._stem = ""
        self._appended = False

    @property
    def stem(self) -> str:
        if self._pid != os.getpid():  # a fresh pack in a forked child
            self._pid = os.getpid()
            self._stem = f"{self.kind}-{socket.gethostname()}-{self._pid}-{secrets.token_hex(4)}"
        return self._stem

    def _current(self) -> str:
        """The stem to append to: a new one if this writer's pack was removed (a fresh run in
        this process), so that no reader takes the new pack for the old one."""
        stem = self.stem
        if self._appended and not (self.directory / f"{stem}.idx").exists():
            self._pid = -1
            stem = self.stem
        self._appended = True
        return stem

    def append(
        self,
        key: int,
        payload: bytes | memoryview = b"",
        *,
        after: int = -1,
        tombstone: bool = False,
    ) -> int:
        """Append one record; return its stamp. `after`: the stamp of the newest record of
        `key` this writer knows of (the new one is stamped past it, whatever the clocks)."""
        payload = memoryview(payload).cast("B")
        stamp = max(time.time_ns(), after + 1)
        flags = TOMBSTONE if tombstone else 0
        crc = zlib.crc32(payload)
        head = struct.pack("<4sIqQQI", MAGIC, flags, key, stamp, len(payload), crc)
        header = head + struct.pack("<I", zlib.crc32(head))
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = self._current()
        offset = _append(self.directory / f"{stem}.bin", header + payload.tobytes())
        body = struct.pack("<IIqQQQ", flags, crc, key, stamp, offset, len(payload))
        _append(
            self.directory / f"{stem}.idx",
            body + struct.pack("<II", zlib.crc32(body), 0),
        )
        return stamp


# the newest entry of a key as a PackIndex keeps it: 41 bytes (an Entry in a dict: ~250)
ROW = np.dtype(
    [
        ("key", "<i8"),
        ("stamp", "<u8"),
        ("offset", "<u8"),
        ("length", "<u8"),
        ("pack", "<i4"),
        ("crc", "<u4"),
        ("flags", "u1"),
    ]
)
SMALL = 256  # a refresh taking at most this many entries takes them one by one, into a dict


class PackIndex:
    """The newest whole record of every key in a directory's packs of one kind, kept up to
    date by `refresh` (incremental: each pack's index is read from where the last refresh
    stopped).

    The entries live in a table of rows sorted by key (numpy, 49 bytes a key: an index of the
    edges of 10^7 blocks is 0.5 GB, not 2.5), plus the few taken since it was last rebuilt
    (a dict, newer than the table's); a large refresh is merged into the table at once."""

    def __init__(self, directory: str | os.PathLike[str], kind: str, small: int = SMALL) -> None:
        self.directory = Path(directory)
        self.kind = kind
        self.small = small  # see SMALL
        self._read: dict[str, int] = {}  # bytes of each .idx taken in
        self._clear()

    def _clear(self) -> None:
        self._packs: list[str] = []  # .bin names; a row's pack is its position here
        self._numbers: dict[str, int] = {}
        self._table = np.zeros(0, ROW)  # sorted by key, one row per key
        self._keys = np.zeros(0, np.int64)  # its keys, contiguous (searchsorted copies a strided view)
        self._recent: dict[int, Entry] = {}  # newer than the table's row of the key, if any

    def refresh(self) -> None:
        try:
            names = [
                n for n in os.listdir(self.directory) if n.startswith(f"{self.kind}-") and n.endswith(".idx")
            ]
        except FileNotFoundError:
            names = []
        sizes = {}
        for name in names:
            try:
                sizes[name] = os.stat(self.directory / name).st_size
            except FileNotFoundError:
                continue
        if any(sizes.get(name, -1) < done for name, done in self._read.items()):
            # a pack gone or shorter: the directory was emptied (a fresh run); start over
            self._read.clear()
            self._clear()
        taken: list[np.ndarray] = []  # the rows of each pack's new entries
        for name, size in sizes.items():
            done = self._read.get(name, 0)
            whole = (size - done) // ENTRY.size * ENTRY.size
            if whole <= 0:
                continue
            try:
                with open(self.directory / name, "rb") as file:
                    file.seek(done)
                    data = file.read(whole)
            except FileNotFoundError:
                continue
            entries = _whole_entries(data)  # up to a torn entry: not yet whole; looked at again later
            del data
            self._read[name] = done + entries.size * ENTRY.size
            if entries.size:
                rows = np.zeros(entries.size, ROW)
                for field in ("key", "stamp", "offset", "length", "crc", "flags"):
                    rows[field] = entries[field]
                rows["pack"] = self._number(name[: -len(".idx")] + ".bin")
                taken.append(rows)
        # few (against the table): one by one; many: merged at once (the table is rebuilt only
        # once an eighth as many keys again came in since, whatever the refreshes)
        if sum(rows.size for rows in taken) <= max(self.small, self._table.size // 8):
            for rows in taken:
                for row in rows:
                    self._offer(self._entry(int(row["pack"]), row))
        else:
            self._merge(taken)
        if len(self._recent) > max(4 * self.small, self._table.size // 8):
            self._merge([])

    def _number(self, pack: str) -> int:
        number = self._numbers.get(pack)
        if number is None:
            number = self._numbers[pack] = len(self._packs)
            self._packs.append(pack)
        return number

    def _entry(self, number: int, row: np.void) -> Entry:
        return Entry(
            int(row["key"]),
            int(row["stamp"]),
            self._packs[number],
            int(row["offset"]),
            int(row["length"]),
            int(row["crc"]),
            bool(int(row["flags"]) & TOMBSTONE),
        )

    def _offer(self, entry: Entry) -> None:
        old = self.newest(entry.key)
        if old is None or entry.order() > old.order():
            self._recent[entry.key] = entry

    def _merge(self, taken: list[np.ndarray]) -> None:
        """The table, the recent entries and the rows `taken` (emptied) as one table: each
        key's newest row."""
        parts = [self._table]
        if self._recent:
            recent = list(self._recent.values())
            rows = np.zeros(len(recent), ROW)
            rows["key"] = [e.key for e in recent]
            rows["stamp"] = [e.stamp for e in recent]
            rows["offset"] = [e.offset for e in recent]
            rows["length"] = [e.length for e in recent]
            rows["pack"] = [self._numbers[e.pack] for e in recent]
            rows["crc"] = [e.crc for e in recent]
            rows["flags"] = [TOMBSTONE if e.tombstone else 0 for e in recent]
            parts.append(rows)
        parts += taken
        taken.clear()
        table = np.concatenate(parts)
        del parts
        self._table, self._keys = np.zeros(0, ROW), np.zeros(0, np.int64)  # copied: let go of it
        rank = np.empty(len(self._packs), np.int64)  # a pack's order: its name's (Entry.order)
        rank[np.argsort(np.array(self._packs))] = np.arange(len(self._packs))
        order = np.lexsort((table["offset"], rank[table["pack"]], table["stamp"], table["key"]))
        keys = table["key"][order]
        last = np.ones(keys.size, bool)
        np.not_equal(keys[1:], keys[:-1], out=last[:-1])
        self._table = table[order[last]]
        del table, order
        self._keys = keys[last]
        self._recent = {}

    def newest(self, key: int) -> Entry | None:
        """The newest entry of `key` found by the last refresh (a tombstone included)."""
        entry = self._recent.get(key)
        if entry is not None or not self._table.size:
            return entry
        at = int(np.searchsorted(self._keys, key))
        if at == self._keys.size or self._keys[at] != key:
            return None
        row = self._table[at]
        return self._entry(int(row["pack"]), row)

    def get(self, key: int) -> bytes | None:
        """The payload of the newest record of `key`, or None (none, or a tombstone)."""
        entry = self.newest(key)
        if entry is None or entry.tombstone:
            return None
        return self.load(entry)

    def load(self, entry: Entry) -> bytes:
        with open(self.directory / entry.pack, "rb") as file:
            file.seek(entry.offset + HEADER.size)
            payload = file.read(entry.length)
        if len(payload) != entry.length or zlib.crc32(payload) != entry.crc:
            raise _damaged(self.directory, entry)
        return payload

    def entries(self) -> list[Entry]:
        """The newest entry of every key, tombstones included."""
        table = self._table
        if self._recent:
            keys = np.fromiter(self._recent, np.int64, len(self._recent))
            table = table[~np.isin(self._keys, keys)]
        return [self._entry(int(row["pack"]), row) for row in table] + list(self._recent.values())

    def items(self) -> Iterator[tuple[int, bytes]]:
        """(key, payload) of every key's newest record that is not a tombstone, by key, each
        pack read whole once."""
        by_pack: dict[str, list[Entry]] = {}
        for entry in self.entries():
            if not entry.tombstone:
                by_pack.setdefault(entry.pack, []).append(entry)
        found = []
        for pack, entries in sorted(by_pack.items()):
            data = (self.directory / pack).read_bytes()
            for entry in entries:
                start = entry.offset + HEADER.size
                payload = data[start : start + entry.length]
                if len(payload) != entry.length or zlib.crc32(payload) != entry.crc:
                    raise _damaged(self.directory, entry)
                found.append((entry.key, payload))
        found.sort(key=lambda item: item[0])
        return iter(found)

    def __len__(self) -> int:
        table = self._table
        if self._recent:
            keys = np.fromiter(self._recent, np.int64, len(self._recent))
            table = table[~np.isin(self._keys, keys)]
        alive = int(np.count_nonzero((table["flags"] & TOMBSTONE) == 0))
        return alive + sum(1 for entry in self._recent.values() if not entry.tombstone)


# one index entry as numpy reads it: ENTRY's fields
ENTRY_DTYPE = np.dtype(
    [
        ("flags", "<u4"),
        ("crc", "<u4"),
        ("key", "<i8"),
        ("stamp", "<u8"),
        ("offset", "<u8"),
        ("length", "<u8"),
        ("check", "<u4"),
        ("pad", "<u4"),
    ]
)
CHUNK_ENTRIES = 1 << 20  # entries read at a time by `newest_keys` (48 MiB)


def _whole_entries(data: bytes) -> np.ndarray:
    """The entries of `data` (a run of .idx bytes) up to the first torn one: those after it are
    not whole yet (or never: a killed writer's), and are looked at again by the next refresh."""
    entries = np.frombuffer(data, ENTRY_DTYPE, len(data) // ENTRY.size)
    view = memoryview(data)
    checks = entries["check"]
    for i in range(entries.size):
        at = i * ENTRY.size
        if zlib.crc32(view[at : at + 40]) != checks[i]:
            return entries[:i]
    return entries


def _columns(
    directory: Path, names: list[str], fields: tuple[str, ...], chunk: int
) -> list[list[np.ndarray]]:
    """`fields` of every whole entry of the .idx files `names`, in order, read in chunks; the
    field "pack" is the file's position in `names`."""
    columns: list[list[np.ndarray]] = [[] for _ in fields]
    for rank, name in enumerate(names):
        with contextlib.suppress(FileNotFoundError), open(directory / name, "rb") as file:
            while True:
                entries = _whole_entries(file.read(chunk * ENTRY.size))
                for column, field in zip(columns, fields):
                    if field == "pack":
                        column.append(np.full(entries.size, rank, np.int32))
                    elif field == "tombstone":
                        column.append((entries["flags"] & TOMBSTONE).astype(bool))
                    else:
                        column.append(entries[field].copy())
                if entries.size < chunk:
                    break  # the end, or a torn entry: nothing after it counts
    return columns


def newest_keys(directory: str | os.PathLike[str], kind: str, chunk: int = CHUNK_ENTRIES) -> np.ndarray:
    """The sorted keys whose newest whole record is not a tombstone: what a refreshed
    `PackIndex` holds, without holding it. The index keeps an entry object per key (~300 bytes,
    GBs at 10^7 blocks); this reads every .idx in chunks into arrays (9 bytes per record, about
    as much again to sort; 29 where a pack holds tombstones, so that which record is newest
    matters), for a check of which keys exist in a process that reads no record (the driver)."""
    directory = Path(directory)
    try:
        names = sorted(n for n in os.listdir(directory) if n.startswith(f"{kind}-") and n.endswith(".idx"))
    except FileNotFoundError:
        names = []
    keys, dead = _columns(directory, names, ("key", "tombstone"), chunk)
    if not keys:
        return np.zeros(0, np.int64)
    key = np.concatenate(keys)
    del keys
    if not any(d.any() for d in dead):  # no tombstones: which record is newest does not matter
        key.sort()
        return key[np.r_[True, key[1:] != key[:-1]]] if key.size else key
    # the order of PackIndex: (stamp, pack name, offset); names are sorted, so a rank is an order
    stamps, packs, offsets = (
        np.concatenate(c) for c in _columns(directory, names, ("stamp", "pack", "offset"), chunk)
    )
    if stamps.size != key.size:  # a pack grew or went between the two reads: read them again
        return newest_keys(directory, kind, chunk)
    order = np.lexsort((offsets, packs, stamps, key))
    del stamps, packs, offsets
    key, tombstone = key[order], np.concatenate(dead)[order]
    last = np.r_[key[1:] != key[:-1], True]  # each key's newest: the last in that order
    return key[last][~tombstone[last]]


def _damaged(directory: Path, entry: Entry) -> CorruptRecord:
    return CorruptRecord(
        f"{directory / entry.pack} at byte {entry.offset}: the record of key {entry.key} is damaged; "
        "rerun with fresh=True"
    )


def scan(path: str | os.PathLike[str]) -> Iterator[tuple[int, int, bool, bytes]]:
    """(key, stamp, tombstone, payload) of every whole record of one .bin, in order, without its
    .idx: stops at the first record that is torn (a killed writer's tail)."""
    data = Path(path).read_bytes()
    at = 0
    while at + HEADER.size <= len(data):
        magic, flags, key, stamp, length, crc, check = HEADER.unpack_from(data, at)
        if magic != MAGIC or zlib.crc32(data[at : at + HEADER.size - 4]) != check:
            return
        payload = data[at + HEADER.size : at + HEADER.size + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            return
        yield key, stamp, bool(flags & TOMBSTONE), payload
        at += HEADER.size + length


def pack_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Every pack file (.bin and .idx) in `directory`."""
    try:
        return sorted(p for p in Path(directory).iterdir() if p.suffix in (".bin", ".idx"))
    except FileNotFoundError:
        return []
