"""What one worker process runs: its `Job`, and the block loop every path shares.

`serve_blocks(job)` is the loop of a worker process, however it was started:
by daisy on this machine (`compute.Local`), forked from the fork server
(`voxblock.forkserver`), or by a command on another host or a cluster
(`python -m voxblock.compute RUN_DIR`, `voxblock.cluster`). A serial run
(`compute.ServeInProcess`) runs the same set-up and the same per-block step,
`process_block`, in the driver.
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cloudpickle

from voxblock.files import replace_atomically
from voxblock.rundir import RunDirectory

if TYPE_CHECKING:
    from voxblock.geometry import Batching, Blocking
    from voxblock.halo import Halo
    from voxblock.workers import Worker

WORKER_FILE = "worker.pkl"


class BlockCheckFailed(RuntimeError):
    """The task's post-check said a processed block is not done."""


@dataclass(frozen=True)
class Job:
    """Everything one worker process needs: picklable, and saved in the run directory."""

    worker: Worker
    run_dir: Path
    post_check: Callable[[Any], bool] | None = None
    # unique per run of a task ("TASK-TOKEN"): names the cluster jobs this run starts
    name: str = ""
    # voxblock.halo.Halo by array name: context read from thin slabs, not whole chunks
    halos: dict[str, Halo] = field(default_factory=dict)
    # a shrink task that daisy runs as overhang (`BlockwiseTask.daisy_fit`): blocks are
    # clipped here to what fit="shrink" hands out
    shrink: Blocking | None = None
    # a batched task (`BlockwiseTask.batching`): each daisy block is a batch of blocks
    batch: Batching | None = None

    def save(self) -> Path:
        path = Path(self.run_dir) / WORKER_FILE
        replace_atomically(path, lambda file: file.write(cloudpickle.dumps(self)))
        return path

    @staticmethod
    def load(run_dir: str | Path) -> Job:
        """The job `save` left in a run directory (a worker started elsewhere, or forked)."""
        return cloudpickle.loads((Path(run_dir) / WORKER_FILE).read_bytes())  # type: ignore[no-any-return]

    def setup(self) -> None:
        """Once per process: the worker's `setup()`, then the arrays it opened that the job keeps
        a halo for read and write through that halo (their read strategy, `block_io`)."""
        self.worker.setup()
        if self.halos:  # no array module (nor numpy) for a worker that has none
            from voxblock.halo import use_halos

            use_halos(vars(self.worker).values(), self.halos)


def shrunk_block(block: Any, blocking: Blocking | None) -> Any:
    """`block` as fit="shrink" of `blocking` hands it out (itself where nothing is clipped)."""
    if blocking is None:
        return block
    read_roi, write_roi = blocking.clip(block.read_roi, block.write_roi)
    if read_roi == block.read_roi and write_roi == block.write_roi:
        return block
    import daisy.v2 as daisy

    clipped = daisy.Block(
        blocking.total_roi, read_roi, write_roi, task_id=block.task_id, block_id=block.block_id[1]
    )
    clipped.status = block.status
    return clipped


@dataclass(frozen=True)
class ShrunkCheck:
    """A pre-check (run by daisy's server) that sees blocks clipped as fit="shrink" clips them."""

    check: Callable[[Any], bool]
    blocking: Blocking

    def __call__(self, block: Any) -> bool:
        return self.check(shrunk_block(block, self.blocking))


def batch_blocks(block: Any, batching: Batching) -> list[Any]:
    """The blocks of a batch (a daisy block of a batched task), as the unbatched run would hand
    them out: ROIs, ids and task; each with the batch's status."""
    import daisy.v2 as daisy

    total = batching.blocking.total_roi
    blocks = []
    for inside in batching.blocks_in(block.write_roi):
        one = daisy.Block(total, inside.read, inside.write, task_id=block.task_id, block_id=inside.block_id)
        one.status = block.status
        blocks.append(one)
    return blocks


@dataclass(frozen=True)
class BatchCheck:
    """A pre-check (run by daisy's server) of a batch: done when it says each of its blocks is.
    `skipped` counts the blocks of the batches it calls done (the run report's)."""

    check: Callable[[Any], bool]
    batching: Batching
    skipped: list[int] = field(default_factory=list)

    def __call__(self, block: Any) -> bool:
        blocks = batch_blocks(block, self.batching)
        done = all(self.check(one) for one in blocks)
        if done:
            self.skipped.append(len(blocks))
        return done


def process_block(job: Job, block: Any, run_dir: RunDirectory) -> None:
    """One block: the worker's `process`, then the task's post-check. A failure is recorded
    (ROI, error) before it is raised: after the last attempt the run may end as soon as daisy
    hears of it. A batch is its blocks one after another (memory stays a block's); the first
    that fails fails the batch, which daisy retries whole (its done blocks are rewritten the
    same)."""
    if job.batch is not None:
        for one in batch_blocks(block, job.batch):
            _process_one(job, one, run_dir)
            if one.status != block.status:  # failed by its status, without raising
                block.status = one.status
                return
        return
    _process_one(job, block, run_dir)


def _process_one(job: Job, block: Any, run_dir: RunDirectory) -> None:
    given = block
    block = shrunk_block(block, job.shrink)
    try:
        job.worker.process(block)
        if job.post_check is not None and not job.post_check(block):
            raise BlockCheckFailed(
                f"check_function says block {block.block_id[1]} "
                f"(write ROI {block.write_roi}) is not done after processing"
            )
    except Exception as error:
        run_dir.record_failure(block, error)
        raise
    if block is not given and block.status != given.status:
        given.status = block.status  # a worker may fail a block by its status, without raising


def serve_blocks(job: Job) -> None:
    """The worker loop: set up once, then process blocks until none are left.

    A block that raises is recorded (ROI, error) and reported to the
    scheduler as failed, which retries it; this process carries on with the
    next block, so one bad block does not cost a model reload.
    """
    import daisy.v2 as daisy

    started = time.monotonic()
    keep_freed_memory()
    run_dir = RunDirectory(Path(job.run_dir))
    client = daisy.Client()
    _beat(run_dir, "setting up", 0)
    job.setup()
    ready = time.monotonic()
    blocks, last = _serve(client, job, run_dir)
    run_dir.record_worker(
        {
            "state": "ended",
            "setup_seconds": ready - started,
            "blocks": blocks,
            "serving_seconds": max(0.0, last - ready),
        }
    )


# a serving worker says so (`voxblock status`) at most this often: after a block, never in one
HEARTBEAT_SECONDS = 5.0


def _beat(run_dir: RunDirectory, state: str, blocks: int) -> None:
    try:
        run_dir.record_worker({"state": state, "blocks": blocks})
    except OSError:
        pass  # what status shows must never fail a worker


def _serve(client: Any, job: Job, run_dir: RunDirectory) -> tuple[int, float]:
    """Serve blocks until none are left: (blocks done, when the last one ended)."""
    blocks, last = 0, time.monotonic()
    _beat(run_dir, "serving", 0)
    next_beat = last + HEARTBEAT_SECONDS
    while True:
        current = None
        try:
            with client.acquire_block() as block:
                if block is None:
                    return blocks, last
                current = block
                process_block(job, block, run_dir)
            blocks += 1
            last = time.monotonic()
            if last >= next_beat:
                next_beat = last + HEARTBEAT_SECONDS
                _beat(run_dir, "serving", blocks)
        except Exception:
            if current is None:
                raise


# glibc's mallopt parameters, and the largest mmap threshold it accepts on 64-bit
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MAX_MMAP_THRESHOLD = 32 << 20


def keep_freed_memory() -> None:
    """Reuse freed block buffers instead of handing them back to the kernel (Linux, glibc).

    glibc serves an allocation above its mmap threshold with fresh pages and
    unmaps them when it is freed, so every block's megabyte-sized arrays
    page-fault in anew; on a VM that costs about as much as decoding the
    chunk. With higher thresholds they come from the heap, which keeps what
    one block needs: memory still follows the block size.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, 8 * _MAX_MMAP_THRESHOLD)
