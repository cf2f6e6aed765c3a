"""voxblock: run a worker, or a whole segmentation, block by block over huge volumes.

The public names are imported on first use: a worker process unpickles its
job through `voxblock.compute` and should pay only for the modules its loop
needs (not zarr's, scipy's or the CLI's start-up).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from voxblock.arrays import ArrayName
    from voxblock.cluster import Lsf, Slurm
    from voxblock.compute import Command, Compute, Local
    from voxblock.errors import VoxblockError
    from voxblock.geometry import Blocking
    from voxblock.run import RunReport, TaskReport, run_blockwise, run_tasks
    from voxblock.segment import segment_blockwise
    from voxblock.task import BlockwiseTask
    from voxblock.workers import ArrayWorker, Preparation, Worker, option

_WHERE = {
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
    "option": "voxblock.workers",
    "run_blockwise": "voxblock.run",
    "run_tasks": "voxblock.run",
    "segment_blockwise": "voxblock.segment",
}

__all__ = [
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
    "option",
    "run_blockwise",
    "run_tasks",
    "segment_blockwise",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'voxblock' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
