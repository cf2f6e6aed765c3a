"""What a segmentation keeps on disk: its run directory, the intermediate arrays beside its
output, one edge file per block, the tables the solve writes, and the rules by which an
existing output or intermediate is known to be its own (for `outputs.check_output`).
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
from voxblock.files import replace_atomically

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


def save_block_edges(path: Path, edges: np.ndarray, fragments: np.ndarray) -> None:
    """One block's edges (E x 5) and fragment IDs in one flat uint64 .npy: [E, N, edges, ids].

    A plain .npy, not an .npz: a zip archive per block cost more than the edges did.
    """
    flat = np.concatenate(
        [np.array([len(edges), len(fragments)], np.uint64), edges.astype(np.uint64).ravel(), fragments]
    ).astype(np.uint64, copy=False)
    replace_atomically(path, lambda file: np.save(file, flat))


def load_block_edges(path: Path) -> tuple[np.ndarray, np.ndarray]:
    flat = np.load(path)
    num_edges, num_fragments = (int(n) for n in flat[:2])
    edges = flat[2 : 2 + 5 * num_edges].reshape(num_edges, 5)
    fragments = flat[2 + 5 * num_edges : 2 + 5 * num_edges + num_fragments]
    if len(fragments) != num_fragments:
        raise VoxblockError(f"{path} is truncated: rerun segment_blockwise with fresh=True")
    return edges, fragments


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
