"""What a segmentation keeps on disk: its run directory, the intermediate arrays beside its
output, every block's edges, the tables the solve writes, and the rules by which an
existing output or intermediate is known to be its own (for `outputs.check_output`).

Pass 1 keeps each block's edges and fragment IDs as one record of a pack (`voxblock.packfile`):
each worker process appends to its own `edges-*.bin`, so the edge directory holds two files
per worker process, not one per block. The solve reads every pack's index, takes the newest
whole record of each block and reads each pack once.

Which record of a retried block counts: the newest, and any would do. A record is whole
before its block's process returns, so a block may leave a record from an attempt that
failed afterwards (killed, or its post-check failed) besides that of the attempt that
completed. A block's fragment IDs are a function of its input (the segment function is
deterministic: the faces method's last pass refuses one that is not), and so are its
neighbours' fragments. Its edges are not: they depend on which neighbours had run when it
did (with context, also their overlap sizes). But each attempt's record is exactly what the
block would have recorded had it completed then, and every neighbour that ran between two
attempts saw the block's fragments (faces) from the first and recorded the edges between
them itself. So the record of any one attempt, with the others' records, finds every edge
once a run completes; one record per block is used (not the union of attempts), so that no
pair is counted twice when merges are thresholded on overlap sizes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from voxblock import arrays
from voxblock.errors import VoxblockError
from voxblock.packfile import PackIndex, PackWriter, newest_keys

SEGMENT_KEY = "voxblock_segment"  # the output's attribute: the key of the segmentation it holds


@dataclass
class Segmentation:
    """Names and places of one segment_blockwise run, derived from its output.

    The intermediate arrays sit next to the output, named after it: OUTPUT_fragments,
    OUTPUT_lut, OUTPUT_edges (`image.zarr/labels/cells/0_lut` for `image.zarr/labels/cells/0`).
    Inside a label's multiscale group they are not levels: OME-NGFF readers (ome-zarr-py,
    napari) list only the multiscale's datasets, and ome-zarr-models validates the group.
    """

    output: arrays.ArrayName
    run_dir: Path
    key: str
    fragments: str = field(init=False)
    lut: str = field(init=False)
    edges: str = field(init=False)

    def __post_init__(self) -> None:
        base = f"{self.output.container}/{self.output.dataset}"
        self.fragments = f"{base}_fragments"
        self.lut = f"{base}_lut"
        self.edges = f"{base}_edges"

    @property
    def edge_dir(self) -> Path:
        return self.run_dir / "edges"

    @property
    def table_dir(self) -> Path:
        """The solve's records (`segment.hierarchy`): trees, down tables, every block's table."""
        return self.run_dir / "solve" / "tables"

    @property
    def face_dir(self) -> Path:
        return self.run_dir / "faces"

    def recorded_key(self) -> str | None:
        try:
            return json.loads((self.run_dir / "segment.json").read_text()).get("key")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def record(self, identity: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "segment.json").write_text(
            json.dumps({"key": self.key, "identity": identity}, indent=2)
        )

    def owns(self, attrs: Mapping[str, Any]) -> bool | None:
        """Whether an existing output holds this segmentation (`outputs.check_output`'s `ours`):
        its key, or an earlier, unfinished run's relabel pass (its run directory); None: no record."""
        recorded = attrs.get(SEGMENT_KEY)
        if recorded == self.key:
            return True
        if recorded is None and attrs.get(arrays.PROVENANCE_KEY, {}).get("run_dir", "").startswith(
            str(self.run_dir.resolve())
        ):
            return True
        if recorded is None and arrays.PROVENANCE_KEY not in attrs:
            return None
        return False

    @staticmethod
    def holds(attrs: Mapping[str, Any]) -> str:
        if attrs.get(SEGMENT_KEY):
            return "a different segmentation"
        return "data this segmentation did not write"

    def intermediates(self) -> list[str]:
        return [self.fragments, self.lut, self.edges]

    def clear(self) -> None:
        """Forget every pass: intermediate arrays, edges and the passes' run directories."""
        for name in self.intermediates():
            shutil.rmtree(arrays.ArrayName.parse(name).path, ignore_errors=True)
        for sub in ("edges", "faces", "fragments", "solve", "relabel"):
            shutil.rmtree(self.run_dir / sub, ignore_errors=True)


EDGES = "edges"  # the kind of pack the edges are kept in


COMPACT = 0xC0_7A_C7 << 40  # a compact record's first word (an edge count is never this large)
WIDTHS = (1, 2, 4, 8)


def _narrow(column: np.ndarray) -> tuple[int, bytes]:
    """The column in the narrowest unsigned type holding it, padded to 8 bytes; its width."""
    top = int(column.max()) if column.size else 0
    width = next(w for w in WIDTHS if top < 1 << (8 * w))
    data = column.astype(f"<u{width}").tobytes()
    return width, data + bytes(-len(data) % 8)


def edge_record(edges: np.ndarray, fragments: np.ndarray) -> bytes:
    """One block's edges (E x 5) and fragment IDs as one record: [COMPACT, E, N, widths], then
    each of the six columns (a, b, overlap, size_a, size_b; the IDs) in the narrowest unsigned
    type that holds it. IDs below 2^32 and voxel counts take 4 bytes, not 8: a record of 3 edges
    per fragment is ~60 bytes per fragment instead of ~130 (3*10^9 edges: 60 GB, not 120)."""
    edges = np.asarray(edges, np.uint64).reshape(-1, 5)
    columns = [edges[:, i] for i in range(5)] + [np.asarray(fragments, np.uint64)]
    narrowed = [_narrow(c) for c in columns]
    widths = sum(w << (8 * i) for i, (w, _) in enumerate(narrowed))
    head = np.array([COMPACT, len(edges), len(columns[-1]), widths], np.uint64).tobytes()
    return head + b"".join(data for _, data in narrowed)


def read_edge_record(payload: bytes, where: str = "an edge record") -> tuple[np.ndarray, np.ndarray]:
    """A record's edges (E x 5) and fragment IDs, as uint64; the compact form or the one before
    it ([E, N, edges, IDs], all uint64: run directories of earlier versions)."""
    damaged = VoxblockError(f"{where} is not the edges of one block: rerun segment_blockwise with fresh=True")
    flat = np.frombuffer(payload, np.uint64, len(payload) // 8)
    if len(payload) % 8:
        raise damaged
    if flat.size >= 4 and flat[0] == COMPACT:
        num_edges, num_fragments, widths = (int(n) for n in flat[1:4])
        at, columns = 32, []
        for i, length in enumerate([num_edges] * 5 + [num_fragments]):
            width = (widths >> (8 * i)) & 0xFF
            if width not in WIDTHS:
                raise damaged
            size = length * width
            if at + size > len(payload):
                raise damaged
            columns.append(np.frombuffer(payload, f"<u{width}", length, at).astype(np.uint64))
            at += size + (-size % 8)
        if at != len(payload):
            raise damaged
        return np.stack(columns[:5], axis=1), columns[5]
    num_edges, num_fragments = (int(n) for n in flat[:2]) if flat.size >= 2 else (0, -1)
    if num_fragments < 0 or flat.size != 2 + 5 * num_edges + num_fragments:
        raise damaged
    return flat[2 : 2 + 5 * num_edges].reshape(-1, 5), flat[2 + 5 * num_edges :]


class EdgeWriter:
    """Appends the edges of this process's blocks to its own pack in the edge directory."""

    def __init__(self, directory: str | Path) -> None:
        self._writer = PackWriter(directory, EDGES)

    def save(self, block: int, edges: np.ndarray, fragments: np.ndarray) -> None:
        self._writer.append(block, edge_record(edges, fragments))


def blocks_with_edges(directory: str | Path) -> int:
    """How many blocks have an edge record: the driver's check before the solve, from the
    packs' indexes read as arrays (`packfile.newest_keys`), not a whole `PackIndex`."""
    return len(newest_keys(directory, EDGES))


def load_edges(directory: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Every block's edges and fragment IDs (one record per block: its newest), and the blocks."""
    index = PackIndex(directory, EDGES)
    index.refresh()
    all_edges, all_fragments = [], []
    for block, payload in index.items():
        edges, fragments = read_edge_record(payload, f"the edge record of block {block} in {directory}")
        all_edges.append(edges)
        all_fragments.append(fragments)
    edges = np.concatenate(all_edges) if all_edges else np.zeros((0, 5), np.uint64)
    fragments = np.concatenate(all_fragments) if all_fragments else np.zeros(0, np.uint64)
    return edges, fragments, len(all_edges)


def write_table(name: str, data: np.ndarray, attrs: dict[str, Any]) -> None:
    array_name = arrays.ArrayName.parse(name)
    chunks = tuple(
        max(1, min(s, 1 << 20)) if i == data.ndim - 1 else max(1, s) for i, s in enumerate(data.shape)
    )
    zarr_format = arrays.container_format(array_name)  # a table in a zarr v2 container is v2 too
    arrays.make_groups(array_name, zarr_format)
    table = zarr.create_array(
        store=str(array_name.path),
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        overwrite=True,
        zarr_format=zarr_format,  # type: ignore[arg-type]
    )
    if data.size:
        table[...] = data
    table.attrs.update(attrs)


def written_by_voxblock(attrs: Mapping[str, Any]) -> bool | None:
    """An intermediate array or table is the segmentation's to reuse if voxblock wrote it."""
    return True if arrays.PROVENANCE_KEY in attrs or "rows" in attrs or "columns" in attrs else None


def holds_foreign_intermediate(attrs: Mapping[str, Any]) -> str:
    return "data voxblock did not write (segment_blockwise keeps its fragments, edges and table there)"
