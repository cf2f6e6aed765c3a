"""The global solve: merge edges -> a fragment -> segment lookup table.

Connected components of the graph whose nodes are fragments and whose
edges are merges (the same answer as union-find, computed by scipy's
compiled graph code). Memory grows with fragments and edges, not voxels.
segment_blockwise solves level by level instead (`segment.hierarchy`),
with this function's result (its tests compare the two); this one is the
reference, and what a single unit of the hierarchy does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from voxblock.errors import VoxblockError

# the name of the table in a .npz file, when it holds more than one array (dacapo's)
NPZ_KEY = "fragment_segment_lut"


def segment_lut(fragments: np.ndarray, merges: np.ndarray) -> np.ndarray:
    """2xN uint64 table (fragment row, segment row); segments consecutive from 1.

    Segments are numbered in the order of their smallest fragment ID, so the
    table does not depend on the order edges were found in.
    """
    merges = np.asarray(merges, dtype=np.uint64).reshape(-1, 2)
    nodes = np.unique(np.concatenate([np.asarray(fragments, dtype=np.uint64).ravel(), merges.ravel()]))
    nodes = nodes[nodes > 0]
    if nodes.size == 0:
        return np.zeros((2, 0), dtype=np.uint64)
    from scipy.sparse import coo_matrix  # only the solve needs scipy: fragment workers skip it
    from scipy.sparse.csgraph import connected_components

    rows = np.searchsorted(nodes, merges[:, 0])
    cols = np.searchsorted(nodes, merges[:, 1])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(nodes.size,) * 2)
    _, component = connected_components(graph, directed=False)
    # renumber components by their first (smallest) fragment: deterministic
    _, first = np.unique(component, return_index=True)
    order = np.empty_like(first)
    order[np.argsort(first)] = np.arange(first.size)
    segments = order[component].astype(np.uint64) + np.uint64(1)
    return np.stack([nodes, segments])


def load_lut(lut: str | Path, who: str = "relabel") -> np.ndarray:
    """The 2xN lookup table (row 0: fragments, row 1: segments) from a .npz file or a zarr array
    CONTAINER/DATASET (what the solve writes), checked and sorted by fragment. `who` begins its
    errors (the worker or pass that reads it)."""
    if not lut:
        raise VoxblockError(f"{who} needs a lookup table (lut=PATH.npz or lut=CONTAINER/DATASET)")
    text = str(lut).rstrip("/")
    if text.endswith(".npz"):
        path = Path(text)
        if not path.is_file():
            raise VoxblockError(f"{who}: lookup table {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as npz:
                if NPZ_KEY in npz.files:
                    table = npz[NPZ_KEY]
                elif len(npz.files) == 1:
                    table = npz[npz.files[0]]
                else:
                    raise VoxblockError(
                        f"{who}: {path} holds {len(npz.files)} arrays ({', '.join(npz.files)}) and "
                        f"none is named {NPZ_KEY!r}"
                    )
        except VoxblockError:
            raise
        except Exception as error:
            raise VoxblockError(f"{who}: cannot read lookup table {path}: {error}") from error
    elif any(suffix in text for suffix in (".zarr", ".n5", ".zr")):  # a container: CONTAINER/DATASET
        import zarr

        from voxblock.arrays import ArrayName

        name = ArrayName.parse(text)
        if not name.path.exists():
            raise VoxblockError(f"{who}: lookup table {name} does not exist")
        try:
            node = zarr.open(str(name.path), mode="r")
            table = np.asarray(node[...])
        except Exception as error:
            raise VoxblockError(f"{who}: cannot read lookup table {name}: {error}") from error
    else:
        raise VoxblockError(f"{who}: lut must be a .npz file or a zarr array CONTAINER/DATASET; got {text!r}")
    if table.ndim != 2 or table.shape[0] != 2:
        raise VoxblockError(
            f"{who}: lookup table {text} has shape {table.shape}; it must be 2xN "
            "(row 0: fragment IDs, row 1: segment IDs)"
        )
    if table.dtype.kind not in "iu":
        raise VoxblockError(f"{who}: lookup table {text} has dtype {table.dtype}; it must hold integers")
    if (table[0, 1:] > table[0, :-1]).all():
        return table  # sorted already, as the solve writes it: no duplicate either
    # sorted by fragment: what lookups need, and a duplicate is then next to its twin
    # (a sort, not np.unique: its hash table took 0.15 s for 262k fragments)
    table = table[:, np.argsort(table[0], kind="stable")]
    if (table[0, 1:] == table[0, :-1]).any():
        raise VoxblockError(f"{who}: lookup table {text} maps some fragment ID more than once")
    return table
