"""voxblock: run a worker, or a whole segmentation, block by block over huge volumes.

The public names are imported on first use: a worker process unpickles its
job through `voxblock.compute` and should pay only for the modules its loop
needs (not zarr's, scipy's or the CLI's start-up).

Everything a worker author needs is here (packages/core/README.md):
`Worker`, `ArrayWorker` (its hooks `check_input`, `check_blocking`,
`output_dtype`, `output_channels`, `setup`, `compute`; `block_ids` and
`global_ids` for labels unique across blocks), `option` (a worker's options),
`Preparation` and `Blocking` (what the driver knows when it prepares a worker),
`Array` (the type of `source`, for annotations), `ArrayName` (a
"CONTAINER/DATASET" name), `affinity_offsets` (an affinities array's channel
offsets, checked), `check_affinities` (channels first, float or uint8),
`crop_to` (a read-ROI result cropped to the write ROI),
`VoxblockError` (what a check raises), `open_input` and `read` (another
array a worker reads, e.g. a mask: opened by name, read block by block with
its halo), `load_lut` (a fragment -> segment
lookup table, as the relabel worker reads it), `smallest_unsigned` (the
narrowest unsigned dtype for labels up to a value), `contact_edges` (label
pairs of paired voxels, counted) and `segment_lut` (labels joined along merge
pairs), the code segment_blockwise merges fragments with. Worker modules import
voxblock in no other way: the rest is internal and may change.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from voxblock.agglomerate.pipeline import AgglomerateReport, agglomerate_blockwise
    from voxblock.arrays import Array, ArrayName
    from voxblock.blockio import read
    from voxblock.cluster import Lsf, Slurm
    from voxblock.compute import Command, Compute, Local
    from voxblock.errors import VoxblockError
    from voxblock.geometry import Blocking, affinity_offsets, check_affinities
    from voxblock.metadata import open_input
    from voxblock.run import RunReport, TaskReport, run_blockwise, run_tasks
    from voxblock.segment import segment_blockwise
    from voxblock.segment.edges import contact_edges
    from voxblock.segment.ids import smallest_unsigned
    from voxblock.segment.solve import load_lut, segment_lut
    from voxblock.task import BlockwiseTask
    from voxblock.workers import ArrayWorker, Preparation, Worker, crop_to, option

_WHERE = {
    "AgglomerateReport": "voxblock.agglomerate.pipeline",
    "agglomerate_blockwise": "voxblock.agglomerate.pipeline",
    "Array": "voxblock.arrays",
    "ArrayName": "voxblock.arrays",
    "ArrayWorker": "voxblock.workers",
    "Blocking": "voxblock.geometry",
    "BlockwiseTask": "voxblock.task",
    "Command": "voxblock.compute",
    "Compute": "voxblock.compute",
    "Local": "voxblock.compute",
    "Lsf": "voxblock.cluster",
    "Preparation": "voxblock.workers",
    "RunReport": "voxblock.run",
    "Slurm": "voxblock.cluster",
    "TaskReport": "voxblock.run",
    "VoxblockError": "voxblock.errors",
    "Worker": "voxblock.workers",
    "contact_edges": "voxblock.segment.edges",
    "affinity_offsets": "voxblock.geometry",
    "check_affinities": "voxblock.geometry",
    "crop_to": "voxblock.workers",
    "evaluate_arrays": "voxblock.evaluate",
    "load_lut": "voxblock.segment.solve",
    "open_input": "voxblock.metadata",
    "option": "voxblock.workers",
    "read": "voxblock.blockio",
    "run_blockwise": "voxblock.run",
    "run_tasks": "voxblock.run",
    "segment_blockwise": "voxblock.segment",
    "segment_lut": "voxblock.segment.solve",
    "smallest_unsigned": "voxblock.segment.ids",
}

__all__ = [
    "AgglomerateReport",
    "agglomerate_blockwise",
    "Array",
    "ArrayName",
    "ArrayWorker",
    "Blocking",
    "BlockwiseTask",
    "Command",
    "Compute",
    "Local",
    "Lsf",
    "Preparation",
    "RunReport",
    "Slurm",
    "TaskReport",
    "VoxblockError",
    "Worker",
    "contact_edges",
    "affinity_offsets",
    "check_affinities",
    "crop_to",
    "evaluate_arrays",
    "load_lut",
    "open_input",
    "option",
    "read",
    "run_blockwise",
    "run_tasks",
    "segment_blockwise",
    "segment_lut",
    "smallest_unsigned",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'voxblock' has no attribute {name!r}")
    if name == "Array":
        # a type alias (what open_input returns: voxblock's ZarrArray, or a funlib.persistence
        # Array); at run time forward references, so that using it imports neither
        from typing import ForwardRef

        value = ForwardRef("voxblock.arrays.ZarrArray") | ForwardRef("funlib.persistence.Array")
        globals()[name] = value
        return value
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
