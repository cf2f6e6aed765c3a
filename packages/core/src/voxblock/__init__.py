"""voxblock: run a worker, or a whole segmentation, block by block over huge volumes."""

from voxblock.arrays import ArrayName
from voxblock.cluster import Lsf, Slurm
from voxblock.compute import Command, Compute, Local
from voxblock.errors import VoxblockError
from voxblock.geometry import Blocking
from voxblock.run import RunReport, TaskReport, run_blockwise, run_tasks
from voxblock.segment import segment_blockwise
from voxblock.task import BlockwiseTask
from voxblock.workers import ArrayWorker, Preparation, Worker, option

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
