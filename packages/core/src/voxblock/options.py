"""Task options: how a task runs, one typed set for every way in.

`TaskOptions` holds what `BlockwiseTask`, `run_blockwise`, `segment_blockwise`
and the `voxblock run` / `voxblock segment` commands take besides a worker
and its ROIs. Each field carries its default, a one-line help (for `--help`
and the README's table) and how the command line sets it (`cli`: the flag,
a CLI default or help where they differ; no `cli`: Python only). Every
value is checked here, once, when the options are made.

The API takes them as keyword arguments beside the worker's own options
(dacapo's `run_blockwise(..., **kwargs)`): `split_keywords` sorts them out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from funlib.geometry import Coordinate

from voxblock.compat import split_check
from voxblock.errors import VoxblockError
from voxblock.geometry import FITS, Fit, check_batch, check_fit

if TYPE_CHECKING:
    from voxblock.compute import Compute

DEFAULT_MAX_WORKER_RESTARTS = 10

HALO_HELP = (
    "read each block's context from thin copies of chunk faces kept in the run directory "
    "instead of decoding whole neighbouring chunks [default: where the context is thin next "
    "to the chunks]"
)


def about(help: str, *, default_doc: str | None = None, cli: Mapping[str, Any] | None = None) -> dict:
    """A task option's metadata: one line of help, how the README shows its default
    (`default_doc`; else the value), and how the command line sets it (`cli`: `flag` if not
    --NAME, a CLI `default`, `type`, `choices`, `help` where they differ; None: Python only)."""
    return {"help": help, "default_doc": default_doc, "cli": cli}


@dataclass(frozen=True)
class TaskOptions:
    """How a task runs (not what it computes: that is the worker's). Checked when made."""

    num_workers: int = field(
        default=16,
        metadata=about("worker processes running blocks at once", cli={"flag": "--workers", "default": 2}),
    )
    max_retries: int = field(
        default=2, metadata=about("retries of a failing block (it is tried 1 + this many times)", cli={})
    )
    timeout: float | None = field(
        default=None,
        metadata=about(
            "seconds a block may take before its worker is killed and the block retried",
            default_doc="none",
            cli={"type": float},
        ),
    )
    fit: Fit | None = field(
        default=None,
        metadata=about(
            "border blocks: `valid` skips blocks whose read ROI leaves the total ROI; `overhang` keeps "
            "them full size (reads past the input are zeros, writes are clipped to the output); "
            "`shrink` clips them",
            default_doc="the worker's (`shrink` for threshold, argmax, relabel, watershed; `overhang` for "
            "predict and other `ArrayWorker`s)",
            cli={
                "choices": FITS,
                "help": "blocks at the border: valid (skip every border block whose read ROI leaves the "
                "region grown by --context, i.e. whose write block does not fit whole in the region: "
                "those voxels are not written), overhang (full size, clipped writes), shrink (clipped) "
                "[default: the worker's]",
            },
        ),
    )
    read_write_conflict: bool | None = field(
        default=None,
        metadata=about(
            "whether a block may not run while a neighbour writes what it reads", default_doc="the worker's"
        ),
    )
    check_function: (
        Callable[[Any], bool] | tuple[Callable[[Any], bool] | None, Callable[[Any], bool] | None] | None
    ) = field(
        default=None,
        metadata=about(
            "`f(block) -> bool`, or a `(pre, post)` pair: `pre` skips blocks it calls done, `post` fails "
            "blocks it calls not done",
            default_doc="the worker's",
        ),
    )
    init_callback_fn: Callable[[Any], None] | None = field(
        default=None,
        metadata=about(
            "`f(context)`, called once in the driver when the task starts, before any block runs, with a "
            "daisy `Context` (hostname, port, task_id)",
            default_doc="the worker's",
        ),
    )
    task_id: str | None = field(
        default=None,
        metadata=about(
            "the task's name in reports, logs and the default run directory", default_doc="the worker's name"
        ),
    )
    run_dir: str | Path | None = field(
        default=None,
        metadata=about(
            "where done markers, logs and the report go",
            default_doc="`OUTPUT_CONTAINER.voxblock/DATASET`",
            cli={
                "type": "directory",
                "help": "where done markers, logs and the report go "
                "[default: OUTPUT_CONTAINER.voxblock/DATASET]",
            },
        ),
    )
    fresh: bool = field(default=False, metadata=about("forget done blocks and start over", cli={}))
    overwrite: bool = field(
        default=False,
        metadata=about(
            "replace an output that holds data voxblock did not write for this task",
            cli={"help": "replace an output that holds other data"},
        ),
    )
    compute: Compute | None = field(
        default=None,
        metadata=about(
            "where workers run: `Local()`, `Slurm(...)`, `Lsf(...)` (see Running on a cluster) or "
            '`Command(template=("ssh", "node7"))`; on the command line `--cluster` and its options',
            default_doc="`voxblock.Local()`",
        ),
    )
    host: str | None = field(
        default=None,
        metadata=about(
            "the address workers connect to (also `DAISY_HOST`)",
            default_doc="detected",
            cli={"help": "address cluster workers connect to [default: $DAISY_HOST, else detected]"},
        ),
    )
    max_worker_restarts: int | None = field(
        default=None,
        metadata=about(
            "worker processes that may die before the task is abandoned",
            default_doc="`max(10, 2 * num_workers * (max_retries + 1))`",
        ),
    )
    halo: bool | None = field(
        default=None,
        metadata=about(
            "read each block's context from thin copies of chunk faces instead of whole neighbouring "
            "chunks (see Resuming, and what a run leaves on disk); False turns it off",
            default_doc="None: where it pays",
            cli={"type": bool, "help": HALO_HELP},
        ),
    )
    chunk_shape: tuple[int, ...] | None = field(
        default=None,
        metadata=about(
            "chunk of an output this task creates, voxels",
            default_doc="the write block",
            cli={
                "flag": "--chunk-size",
                "type": "voxels",
                "help": "chunk of a new output, voxels [default: the block; 64 per axis inside shards]",
            },
        ),
    )
    shard_shape: tuple[int, ...] | None = field(
        default=None,
        metadata=about(
            "shard of an output this task creates, voxels; must divide the write block, so each block "
            "owns whole shards (zarr v3 only)",
            default_doc="None: unsharded",
            cli={
                "flag": "--shard-size",
                "type": "voxels",
                "help": "write a new output sharded (zarr v3): one file per shard instead of per chunk; "
                "the shard must divide the block size, so that each block owns whole shards "
                "[default: unsharded]",
            },
        ),
    )

    batch: int | tuple[int, ...] = field(
        default=1,
        metadata=about(
            "blocks per side that the scheduler hands out as one (k^d blocks, run one after another: "
            "memory stays a block's); for runs of more than 10^5 blocks, where handing out blocks "
            "bounds the run; the output is the same, a failure or a kill redoes the whole batch",
            cli={
                "help": "hand out K x K x K blocks at a time, run one after another in a worker "
                "(memory stays a block's). For more than ~10^5 blocks, where the scheduler (about "
                "8,000 blocks/s) bounds the run; the output is the same. A failing block, a kill or "
                "a timeout redoes up to K^3 blocks, and the timeout is per block",
            },
        ),
    )

    def __post_init__(self) -> None:
        def integer(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not integer(self.num_workers) or self.num_workers < 1:
            raise VoxblockError(f"num_workers must be an integer >= 1; got {self.num_workers!r}")
        if not integer(self.max_retries) or self.max_retries < 0:
            raise VoxblockError(f"max_retries must be an integer >= 0; got {self.max_retries!r}")
        timeout = self.timeout
        if timeout is not None and not (
            isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0
        ):
            raise VoxblockError(f"timeout must be a number of seconds > 0, or None; got {timeout!r}")
        if self.fit is not None:
            check_fit(self.fit)
        split_check(self.check_function)
        if self.init_callback_fn is not None and not callable(self.init_callback_fn):
            raise VoxblockError(f"init_callback_fn must be callable; got {self.init_callback_fn!r}")
        if self.task_id is not None and not (isinstance(self.task_id, str) and self.task_id):
            raise VoxblockError(f"task_id must be a non-empty string; got {self.task_id!r}")
        for name in ("fresh", "overwrite"):
            if getattr(self, name) not in (True, False):
                raise VoxblockError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if self.compute is not None:
            from voxblock.compute import Compute

            if not isinstance(self.compute, Compute):
                raise VoxblockError(
                    f"compute must be a voxblock Compute (Local(), Slurm(...), ...); got {self.compute!r}"
                )
        if self.max_worker_restarts is not None and not (
            integer(self.max_worker_restarts) and self.max_worker_restarts >= 0
        ):
            raise VoxblockError(f"max_worker_restarts must be >= 0; got {self.max_worker_restarts!r}")
        if self.halo not in (None, True, False):
            raise VoxblockError(f"halo must be True, False or None (decide per array); got {self.halo!r}")
        batch = self.batch
        if isinstance(batch, Sequence) and not isinstance(batch, str):
            object.__setattr__(self, "batch", tuple(batch))
        check_batch(self.batch, max(1, len(self.batch)) if isinstance(self.batch, tuple) else 1)
        for name in ("chunk_shape", "shard_shape"):
            shape = getattr(self, name)
            if shape is None:
                continue
            values = tuple(shape) if isinstance(shape, Sequence) and not isinstance(shape, str) else None
            if not values or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
            ):
                raise VoxblockError(f"{name} must be positive integers (voxels); got {shape!r}")
            object.__setattr__(self, name, values)

    @classmethod
    def of(cls, values: Mapping[str, Any], what: str = "a task") -> TaskOptions:
        """Options from keyword arguments; a name that is no task option is refused, with the list."""
        unknown = sorted(set(values) - set(NAMES))
        if unknown:
            raise VoxblockError(
                f"{what} has no option {', '.join(unknown)}; its task options are: {', '.join(NAMES)}"
            )
        return cls(**values)

    def values(self) -> dict[str, Any]:
        """The options by name (not copied: a compute or callable is passed on as it is)."""
        return {name: getattr(self, name) for name in NAMES}

    def worker_restarts(self) -> int:
        """max_worker_restarts, or by default enough for every block to kill its worker twice over."""
        if self.max_worker_restarts is not None:
            return self.max_worker_restarts
        return max(DEFAULT_MAX_WORKER_RESTARTS, 2 * self.num_workers * (self.max_retries + 1))

    def voxels(self, name: str, dims: int) -> Coordinate | None:
        """chunk_shape or shard_shape as a Coordinate of `dims` axes (None if not given)."""
        shape = getattr(self, name)
        if shape is None:
            return None
        if len(shape) != dims:
            raise VoxblockError(f"{name} must be {dims} positive integers (voxels); got {shape!r}")
        return Coordinate(shape)


NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TaskOptions))


# dacapo's positional arguments after the ROIs; any further ones are the worker's
POSITIONAL = ("num_workers", "max_retries", "timeout", "upstream_tasks")


def split_positional(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], tuple]:
    """(num_workers, max_retries, timeout, upstream_tasks, *worker args) -> (those given, worker args).

    Given positionally they are the task's whatever the worker takes; given by keyword they are
    sorted out with the other keywords (`split_keywords`).
    """
    given = dict(zip(POSITIONAL, args))
    for name in given:
        if name in kwargs:
            raise TypeError(f"got multiple values for argument {name!r}")
    return given, tuple(args[len(POSITIONAL) :])


def split_keywords(
    kwargs: Mapping[str, Any],
    worker_options: Mapping[str, Any] | None,
    worker_takes: Callable[[], Collection[str]],
    worker: str = "the worker",
    positional: Mapping[str, Any] | None = None,
) -> tuple[TaskOptions, dict[str, Any]]:
    """Keyword arguments -> (task options, the worker's options).

    A keyword named like a task option is the task's; every other one is the
    worker's, and so is all of `worker_options`. Without `worker_options`
    (dacapo's calls), a task option's keyword that the worker takes too
    (`worker_takes()`, asked only then) is refused: nothing is silently
    taken by the wrong one. With it, the caller has said whose each is.
    `positional`: task options given by position (`split_positional`), never in doubt.
    """
    task = {k: v for k, v in kwargs.items() if k in NAMES}
    rest = {k: v for k, v in kwargs.items() if k not in NAMES}
    explicit = dict(worker_options or {})
    twice = sorted(set(rest) & set(explicit))
    if twice:
        raise VoxblockError(f"{', '.join(twice)} given both as a keyword and in worker_options: give it once")
    # with worker_options the caller says whose each keyword is; without, ask the worker only if needed
    ambiguous = sorted(task) if worker_options is None else []
    if ambiguous:
        ambiguous = sorted(set(ambiguous) & set(worker_takes()))
    if ambiguous:
        name = ambiguous[0]
        raise VoxblockError(
            f"{', '.join(ambiguous)} is both a task option and an option of {worker}: say whose it is. "
            f"worker_options={{{name!r}: ...}} gives the worker's (keywords outside it are then the "
            f"task's), or pass a configured worker instance (all keywords are then task options)"
        )
    return TaskOptions.of({**(positional or {}), **task}), {**rest, **explicit}


def cli_flag(f: dataclasses.Field) -> str | None:
    """The command-line flag that sets a task option; None if it is set from Python only."""
    cli = f.metadata.get("cli")
    if cli is None:
        return None
    return cli.get("flag", "--" + f.name.replace("_", "-"))


def markdown_table() -> str:
    """The task options as the README's table (tests/test_options.py checks that it is there)."""
    rows = ["| option | default | flag | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(TaskOptions):
        default = f.metadata["default_doc"] or f"`{f.default!r}`"
        flag = cli_flag(f)
        cli = f.metadata.get("cli") or {}
        if flag is not None and cli.get("type") is bool:
            flag = f"{flag}/--no-{flag[2:]}"
        shown = "" if flag is None else f"`{flag}`"
        if "default" in cli:
            shown += f" (default {cli['default']})"
        rows.append(f"| `{f.name}` | {default} | {shown} | {f.metadata['help']} |")
    return "\n".join(rows)
