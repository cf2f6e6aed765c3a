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
last refresh, in one read per pack) into a dict of the newest entry per key, and a record's
payload with one read, checked against its checksum. A refresh costs a directory listing
and a stat per pack; memory and bytes read grow by 48 bytes per record written.
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

MAGIC = b"VXPK"
TOMBSTONE = 1
# magic, flags, key, stamp, payload length, payload crc32, header crc32 (of what precedes it)
HEADER = struct.Struct("<4sIqQQII")
# flags, payload crc32, key, stamp, offset of the header, payload length, entry crc32, padding
ENTRY = struct.Struct("<IIqQQQII")


class CorruptRecord(OSError):
    """A record its index calls whole does not match its checksum: the pack is damaged."""


@dataclass(frozen=True)
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
        self, key: int, payload: bytes | memoryview = b"", *, after: int = -1, tombstone: bool = False
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
        _append(self.directory / f"{stem}.idx", body + struct.pack("<II", zlib.crc32(body), 0))
        return stamp


class PackIndex:
    """The newest whole record of every key in a directory's packs of one kind, kept up to
    date by `refresh` (incremental: each pack's index is read from where the last refresh
    stopped)."""

    def __init__(self, directory: str | os.PathLike[str], kind: str) -> None:
        self.directory = Path(directory)
        self.kind = kind
        self._read: dict[str, int] = {}  # bytes of each .idx taken in
        self._newest: dict[int, Entry] = {}

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
            self._newest.clear()
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
            self._take(name[: -len(".idx")] + ".bin", name, done, data)

    def _take(self, pack: str, name: str, done: int, data: bytes) -> None:
        taken = 0
        for at in range(0, len(data) - ENTRY.size + 1, ENTRY.size):
            raw = data[at : at + ENTRY.size]
            flags, crc, key, stamp, offset, length, check, _ = ENTRY.unpack(raw)
            if zlib.crc32(raw[:40]) != check:
                break  # a torn entry: not yet whole (or never: a killed writer); look again later
            entry = Entry(key, stamp, pack, offset, length, crc, bool(flags & TOMBSTONE))
            old = self._newest.get(key)
            if old is None or entry.order() > old.order():
                self._newest[key] = entry
            taken += ENTRY.size
        self._read[name] = done + taken

    def newest(self, key: int) -> Entry | None:
        """The newest entry of `key` found by the last refresh (a tombstone included)."""
        return self._newest.get(key)

    def get(self, key: int) -> bytes | None:
        """The payload of the newest record of `key`, or None (none, or a tombstone)."""
        entry = self._newest.get(key)
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
        return list(self._newest.values())

    def items(self) -> Iterator[tuple[int, bytes]]:
        """(key, payload) of every key's newest record that is not a tombstone, by key, each
        pack read whole once."""
        by_pack: dict[str, list[Entry]] = {}
        for entry in self._newest.values():
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
        return sum(1 for entry in self._newest.values() if not entry.tombstone)


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
