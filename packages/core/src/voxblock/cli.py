"""The `voxblock` command: run a worker, list workers, try the demo.

Block sizes, context and ROIs are given in voxels here and converted with
the input's voxel size. `voxblock run WORKER --help` lists the worker's own
options, built from its dataclass fields.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import shlex
import sys
import types
import typing
from pathlib import Path
from typing import Any

import click
from funlib.geometry import Coordinate, Roi

from voxblock import arrays
from voxblock.compat import file_arrays
from voxblock.errors import VoxblockError
from voxblock.geometry import parse_coordinate, parse_roi
from voxblock.options import TaskOptions, cli_flag
from voxblock.workers import ArrayWorker, Worker, registered_workers, worker_class

COMMON = {"input", "output"}
WORKER_KEY = "worker__"  # a worker option whose flag a task option has: --worker-NAME
CLUSTER_KEYS = (
    "cluster",
    "cluster_config",
    "cpus",
    "gpus",
    "memory",
    "partition",
    "time_limit",
    "cluster_flags",
    "command_template",
)

ROI_OFFSET_HELP = (
    "OFFSET counts voxels from world 0, not from the input's first voxel: voxel i starts at "
    "i * voxel size + (the input's offset mod voxel size), so the input's first voxel is voxel "
    "floor(offset / voxel size)"
)

# the task options that have a flag (voxblock.options.TaskOptions), by field name
TASK_FLAGS = {f.name: f for f in dataclasses.fields(TaskOptions) if cli_flag(f) is not None}


def _task_options(
    overrides: dict[str, dict[str, Any]] | None = None, exclude: tuple[str, ...] = ()
) -> list[Any]:
    """The flags of the task options, declared once in TaskOptions: the flag (--NAME unless its
    metadata names another), help and default (the CLI's where it has one); `overrides` changes
    them for one command, which has none of `exclude`."""
    params = []
    for name, f in TASK_FLAGS.items():
        if name in exclude:
            continue
        cli = {**f.metadata["cli"], **(overrides or {}).get(name, {})}
        flag = cli_flag(f)
        default = cli.get("default", f.default)
        kind = cli.get("type", type(default) if default is not None else str)
        settings: dict[str, Any] = {"default": default, "help": cli.get("help", f.metadata["help"])}
        decls = [flag]
        if kind is bool and default is None:
            decls = [f"{flag}/--no-{flag[2:]}"]
        elif kind is bool:
            settings["is_flag"] = True
        elif "choices" in cli:
            settings.update(type=click.Choice(list(cli["choices"])), show_default=default is not None)
        elif kind == "voxels":  # parsed once the input's dimensions are known (_task_keywords)
            settings["metavar"] = "Z,Y,X"
        elif kind == "directory":
            settings["type"] = click.Path(file_okay=False)
        else:
            settings.update(type=kind, show_default=default is not None)
        params.append(click.option(*decls, name, **settings))
    return params


def _task_flags(values: dict[str, Any]) -> dict[str, Any]:
    """The values of the task options' flags, popped from `values` (see _task_keywords)."""
    return {name: values.pop(name) for name in TASK_FLAGS if name in values}


def _task_keywords(flags: dict[str, Any], ndim: int, compute: Any, host: str | None) -> dict[str, Any]:
    """The task options as keyword arguments, from their flags' values: sizes in voxels as
    shapes, and the compute and host that the cluster options and config decided."""
    given = dict(flags)
    for name, f in TASK_FLAGS.items():
        if name in given and f.metadata["cli"].get("type") == "voxels":
            given[name] = tuple(parse_coordinate(given[name], ndim)) if given[name] else None
    return {**given, "compute": compute, "host": host}


def _cluster_options(function: Any) -> Any:
    """Where workers run: --cluster and its resources (defaults from voxblock.toml [cluster])."""
    options = [
        click.option(
            "--cluster",
            type=click.Choice(["local", "slurm", "lsf", "command"]),
            default=None,
            help="where workers run [default: kind in the cluster config, else local]",
        ),
        click.option(
            "--cluster-config",
            type=click.Path(dir_okay=False),
            default=None,
            help="TOML file with a [cluster] section [default: $VOXBLOCK_CONFIG, else ./voxblock.toml]",
        ),
        click.option("--cpus", type=int, default=None, help="CPUs per cluster worker"),
        click.option("--gpus", type=int, default=None, help="GPUs per cluster worker"),
        click.option("--memory", default=None, metavar="SIZE", help="memory per cluster worker, e.g. 4G"),
        click.option("--partition", "--queue", "partition", default=None, help="SLURM partition / LSF queue"),
        click.option(
            "--time-limit",
            default=None,
            help="per worker job: SLURM --time (e.g. 2:00:00) / LSF -W ([HH:]MM)",
        ),
        click.option(
            "--cluster-flag",
            "cluster_flags",
            multiple=True,
            metavar="FLAG",
            help="extra flag for srun/bsub, repeatable, e.g. --cluster-flag=--account=lab",
        ),
        click.option(
            "--command-template",
            default=None,
            metavar="COMMAND",
            help="for --cluster command: the prefix that starts a worker, e.g. 'ssh node7'",
        ),
    ]
    for decorate in reversed(options):
        function = decorate(function)
    return function


def _compute(values: dict[str, Any], host: str | None) -> tuple[Any, str | None]:
    """(Compute, host) from the cluster options (popped from `values`) and --host over the config file."""
    from voxblock.cluster import compute_from_config

    given = {k: values.pop(k, None) for k in CLUSTER_KEYS}
    template = given["command_template"]
    return compute_from_config(
        given["cluster_config"],
        kind=given["cluster"],
        cpus=given["cpus"],
        gpus=given["gpus"],
        memory=given["memory"],
        partition=given["partition"],
        time_limit=given["time_limit"],
        flags=tuple(given["cluster_flags"] or ()),
        template=tuple(shlex.split(template)) if template else None,
        host=host,
    )


def _run_options(function: Any) -> Any:
    """The options every `voxblock run WORKER` command shares."""
    options = [
        click.option("--input", "input_", metavar="C/D", help="input array, CONTAINER/DATASET"),
        click.option("--output", metavar="C/D", help="output array, CONTAINER/DATASET (created)"),
        click.option(
            "--block-size",
            required=True,
            metavar="Z,Y,X",
            help="write block in voxels (one number for all axes); a multiple of the output chunk",
        ),
        click.option(
            "--context",
            default="0",
            show_default=True,
            metavar="Z,Y,X",
            help="voxels read around each block on each side",
        ),
        click.option(
            "--roi",
            metavar="OFFSET:SHAPE",
            help="region to write, in voxels, e.g. 0,0,0:256,256,256 [default: the whole input]; "
            + ROI_OFFSET_HELP,
        ),
    ]
    function = _shared_options(function)
    for decorate in reversed(options):
        function = decorate(function)
    return function


def _shared_options(
    function: Any = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    exclude: tuple[str, ...] = (),
) -> Any:
    """What `run`, `segment` and `agglomerate` share: the task options (but `exclude`),
    --no-progress, then the cluster options."""

    def decorate(function: Any) -> Any:
        function = _cluster_options(function)
        function = click.option("--no-progress", is_flag=True, help="no progress bar")(function)
        function = click.option(
            "--plan",
            is_flag=True,
            help="check everything, count blocks, bytes and files, time a few blocks in a scratch "
            "copy and estimate the run; write nothing",
        )(function)
        for option in reversed(_task_options(overrides, exclude)):
            function = option(function)
        return function

    return decorate if function is None else decorate(function)


def _call(command: str, call: Any) -> Any:
    return call()


def _plan(command: str, call: Any) -> typing.NoReturn:
    """--plan: print what `call` (a run) would cost, having checked what it checks; exit."""
    from voxblock.plan import plan_command, process_started

    click.echo(plan_command(command, call, started=process_started()).render())
    sys.exit(0)


def _field_option(field: dataclasses.Field, hint: Any, prefix: str = "") -> click.Option:
    """A worker option's flag: --NAME, or --worker-NAME (prefix) where a task option has --NAME."""
    name = "--" + prefix + field.name.replace("_", "-")
    key = WORKER_KEY + field.name if prefix else field.name
    help_text = field.metadata.get("help", "")
    default = (
        field.default
        if field.default is not dataclasses.MISSING
        else field.default_factory()  # type: ignore[misc]
        if field.default_factory is not dataclasses.MISSING
        else None
    )
    required = default is None and field.default is dataclasses.MISSING
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        hint, origin = args[0], typing.get_origin(args[0])
    if hint is bool:
        return click.Option(
            [f"{name}/--no-{prefix}{field.name.replace('_', '-')}", key],
            default=default,
            show_default=True,
            help=help_text,
        )
    if origin is typing.Literal:
        return click.Option(
            [name, key],
            type=click.Choice([str(a) for a in typing.get_args(hint)]),
            default=default,
            show_default=True,
            help=help_text,
        )
    if hint in (int, float, str):
        return click.Option(
            [name, key], type=hint, default=default, show_default=True, required=required, help=help_text
        )
    shown = json.dumps(default) if default not in (None, "") else None
    return click.Option(
        [name, key],
        type=_JSON(),
        default=shown,
        show_default=True,
        required=required,
        help=(help_text + " (JSON, e.g. [1,2] or [[0,0,1],[0,1,0]])").strip(),
    )


class _JSON(click.ParamType):
    name = "json"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            if "," in value:
                return [json.loads(v) if v.strip().lstrip("-").isdigit() else v for v in value.split(",")]
            return value


def _worker_command(name: str, cls: type[Worker] | None) -> click.Command:
    @_run_options
    def command(**values: Any) -> None:
        _run(name, cls, values)

    shared = command.__click_params__
    taken = {p.name for p in shared} | {flag for p in shared for flag in p.opts + p.secondary_opts}
    params: list[click.Parameter] = []
    if cls is not None:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name in COMMON:
                continue
            option = _field_option(field, hints.get(field.name, str))
            if {option.name, *option.opts, *option.secondary_opts} & taken:
                option = _field_option(field, hints.get(field.name, str), prefix="worker-")
            params.append(option)
        doc = (cls.__doc__ or "").strip()
    else:
        params.append(
            click.Option(
                ["--option", "-o", "extra"],
                multiple=True,
                metavar="KEY=VALUE",
                help="keyword argument for spawn_worker (VALUE parsed as JSON when it can be)",
            )
        )
        doc = f"Run the dacapo-style worker file {name}."

    if cls is not None and issubclass(cls, ArrayWorker):  # it reads --input and writes --output
        for param in command.__click_params__:
            if isinstance(param, click.Option) and param.name in ("input_", "output"):
                param.help = f"{param.help} [required]"

    return click.Command(name, params=params + command.__click_params__[::-1], callback=command, help=doc)


def _run(name: str, cls: type[Worker] | None, values: dict[str, Any]) -> None:
    from voxblock.compute import may_run_in_process
    from voxblock.run import run_tasks
    from voxblock.task import BlockwiseTask

    input_name = values.pop("input_")
    output_name = values.pop("output")
    flags = _task_flags(values)
    try:
        compute, host = _compute(values, flags.pop("host"))
    except VoxblockError as error:
        raise click.ClickException(str(error)) from None
    if (
        cls is not None
        and not values.get("plan")
        and not may_run_in_process(cls, compute, flags.get("timeout"), input_name, values["block_size"])
    ):
        # the fork server imports the worker's modules while this process opens the arrays
        compute.warm(cls)
    common = {k: values.pop(k) for k in ("block_size", "context", "roi", "no_progress", "plan")}
    voxel_size: Coordinate | None = None  # known once the input is open: errors then speak voxels
    origin: Coordinate | None = None
    try:
        if cls is None:
            options = key_values(values.pop("extra", ()))
            options.update(file_arrays(Path(name), input_name, output_name, options))
        else:
            options = {k.removeprefix(WORKER_KEY): v for k, v in values.items() if v is not None}
            given = (("input", input_name), ("output", output_name))
            options.update({k: v for k, v in given if v is not None})
        if cls is not None and issubclass(cls, ArrayWorker) and not input_name:
            raise VoxblockError(f"--input CONTAINER/DATASET is required: worker {name!r} reads it")
        if cls is not None and issubclass(cls, ArrayWorker) and not output_name:
            raise VoxblockError(f"--output CONTAINER/DATASET is required: worker {name!r} writes it")
        if not input_name:
            raise VoxblockError("--input is needed to know the voxel size and the ROI")
        source = arrays.open_input(input_name)
        voxel_size = source.voxel_size
        origin = source.offset
        total, read, write = rois_from_voxels(
            source.roi,
            source.voxel_size,
            common["block_size"],
            common["context"],
            common["roi"],
        )
        task = BlockwiseTask(
            name,
            total,
            read,
            write,
            worker_options=options,  # every worker option: never taken for a task option
            **_task_keywords(flags, source.voxel_size.dims, compute, host),
        )
        if common["plan"]:
            _plan(f"run {name}", lambda: run_tasks([task], progress=False, host=host))
        report = run_tasks([task], progress=not common["no_progress"], host=host)
    except VoxblockError as error:
        raise click.ClickException(cli_wording(str(error), voxel_size, origin)) from None
    _leave_now(0 if report.succeeded else 1)
    if not report.succeeded:
        sys.exit(1)


def _leave_now(code: int) -> None:
    """End the `voxblock` process itself, once its run is reported, without finalizing numpy's,
    zarr's and daisy's modules (~0.08 s, a fifth of a one-block run): exit handlers run (the
    fork server stops, logs flush), streams flush, then os._exit. Called in a test's runner, or
    from other Python code, it does nothing: only the command's own process, with its own
    streams, ends this way."""
    import os

    main_file = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    own = main_file.name == "voxblock" or main_file.parts[-2:] == ("voxblock", "__main__.py")
    if not own or sys.stdout is not sys.__stdout__ or sys.stderr is not sys.__stderr__:
        return
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            code = code or 1  # what could not be written is an error, as at a normal exit
    os._exit(code)


# the API's keyword arguments, as the `voxblock run` flags that set them (a shape in world
# units is no flag's value: those are rewritten in voxels, below)
API_FLAGS = {
    **{name: cli_flag(f) for name, f in TASK_FLAGS.items() if f.metadata["cli"].get("type") != "voxels"},
    "input": "--input",
    "output": "--output",
}
# the task options that are switches: `fresh=True` is --fresh, `halo=False` --no-halo
_SWITCHES = {
    name
    for name, f in TASK_FLAGS.items()
    if isinstance(f.default, bool) or f.metadata["cli"].get("type") is bool
}
_KEYWORD = re.compile(r"(?<![\w-])(" + "|".join(API_FLAGS) + r")=('[^']*'|\"[^\"]*\"|[^\s,;:)]+)")
_BARE = re.compile(r"(?<![\w-])(" + "|".join(k for k in API_FLAGS if "_" in k) + r")(?![\w=])")
_SAME_TWICE = re.compile(r"(--[\w-]+(?: [^\s,;/)]+)?)(?:, | / | or )\1(?![\w-])")
# a ROI as funlib prints it, with the label a message may give it
_ROI = re.compile(r"\[(-?\d+:-?\d+(?:, -?\d+:-?\d+)*)\] \((-?\d+(?:, -?\d+)*),?\)(?: \(world units\))?")
# a size tuple, but not a voxel size, one already in voxels, nor the shape of a printed ROI
_TUPLE = re.compile(r"(?<!voxel size )(?<!\] )\((-?\d+(?:, -?\d+)*),?\)(?! voxels)")


def cli_wording(message: str, voxel_size: Coordinate | None, origin: Coordinate | None = None) -> str:
    """An error of the API in the words of the command line: flags, and voxels.

    The API takes keyword arguments and world units, the CLI flags and
    voxels. Any error message is rewritten, so messages written anywhere
    need no CLI variant: `num_workers=1` becomes `--workers 1` (a flag the
    message already names beside it is not repeated), a ROI as funlib
    prints it (`[0:64, 0:32, 0:32] (64, 32, 32)`) becomes `--roi`'s
    OFFSET:SHAPE in voxels, and so do the sizes of a clause that says they
    are in "world units". Numbers off the voxel grid stay as they are.
    `origin` (the input's offset) places the grid as `--roi` does: a ROI's
    offset counts voxels from world 0 shifted by origin mod voxel size.
    """
    message = _KEYWORD.sub(lambda m: _flag(m.group(1), m.group(2)), message)
    message = _BARE.sub(lambda m: API_FLAGS[m.group(1)], message)
    message = _SAME_TWICE.sub(r"\1", message)
    if voxel_size is None:
        return message
    rois: list[str] = []  # each ROI says its own units: set aside while the clauses are rewritten

    def set_aside(match: re.Match) -> str:
        rois.append(_roi_in_voxels(match, voxel_size, origin))
        return f"\0{len(rois) - 1}\0"

    parts = re.split(r"((?:;|:|\.) )", _ROI.sub(set_aside, message))
    message = "".join(_clause_in_voxels(part, voxel_size) for part in parts)
    return re.sub(r"\0(\d+)\0", lambda m: rois[int(m.group(1))], message)


def _flag(name: str, value: str) -> str:
    flag, value = API_FLAGS[name], value.strip("'\"")
    if value in ("True", "False", "None") and name in _SWITCHES:
        if value == "True":
            return flag
        return f"--no-{flag[2:]}" if TASK_FLAGS[name].default is None else f"no {flag}"
    return f"{flag} {value}"


def _voxels(values: str, voxel_size: Coordinate) -> list[int] | None:
    """World-unit integers as voxels; None if they are not on the grid of `voxel_size`."""
    numbers = [int(v) for v in values.split(",") if v.strip()]
    if len(numbers) != len(voxel_size) or any(n % v for n, v in zip(numbers, voxel_size)):
        return None
    return [n // v for n, v in zip(numbers, voxel_size)]


def _roi_in_voxels(match: re.Match, voxel_size: Coordinate, origin: Coordinate | None = None) -> str:
    begins = [int(pair.split(":")[0]) for pair in match.group(1).split(", ")]
    if origin is not None and len(origin) == len(begins) == len(voxel_size):
        begins = [b - o % v for b, o, v in zip(begins, origin, voxel_size)]  # as --roi counts them
    offset = _voxels(",".join(map(str, begins)), voxel_size)
    shape = _voxels(match.group(2), voxel_size)
    if offset is None or shape is None:
        return f"[{match.group(1)}] ({match.group(2)}) (world units)"
    return f"{','.join(map(str, offset))}:{','.join(map(str, shape))} (voxels, OFFSET:SHAPE)"


def _clause_in_voxels(clause: str, voxel_size: Coordinate) -> str:
    """A clause that says its sizes are in world units, in voxels (or as it was, if one is off the grid)."""
    if "world units" not in clause:
        return clause
    converted = [_voxels(m.group(1), voxel_size) for m in _TUPLE.finditer(clause)]
    if any(c is None for c in converted):
        return clause
    voxels = iter(converted)
    clause = _TUPLE.sub(lambda m: "(" + ", ".join(map(str, next(voxels) or [])) + ")", clause)
    return clause.replace("(world units)", "(voxels)").replace("world units", "voxels")


def key_values(items: Any) -> dict[str, Any]:
    """KEY=VALUE options -> a dict; each VALUE is parsed as JSON when it can be."""
    result: dict[str, Any] = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        try:
            result[key] = json.loads(text)
        except json.JSONDecodeError:
            result[key] = text
    return result


def rois_from_voxels(
    input_roi: Roi,
    voxel_size: Coordinate,
    block_size: str,
    context: str,
    roi: str | None,
) -> tuple[Roi, Roi, Roi]:
    """CLI voxels -> (total read ROI, read ROI, write ROI) in world units.

    The total ROI is the region to write grown by the context, so border
    blocks get their full context (read as zeros past the input). `roi`'s
    OFFSET counts voxels of the input's grid from world 0 (not from the
    input's first voxel): voxel i starts at i * voxel size, shifted by the
    input's offset modulo the voxel size where that offset is off the
    world-0 grid (OME-NGFF levels at half-voxel translations), so that
    the region is always on the input's grid.
    """
    ndim = len(voxel_size)
    block = parse_coordinate(block_size, ndim) * voxel_size
    margin = parse_coordinate(context, ndim) * voxel_size
    if any(v < 0 for v in margin):
        raise VoxblockError(f"--context must be >= 0; got {context}")
    if any(v <= 0 for v in block):
        raise VoxblockError(f"--block-size must be > 0; got {block_size}")
    if roi is None:
        region = input_roi
    else:
        offset, shape = parse_roi(roi, ndim)
        if any(v <= 0 for v in shape):
            raise VoxblockError(f"--roi's shape must be positive on every axis; got {roi}")
        phase = Coordinate(b % v for b, v in zip(input_roi.begin, voxel_size))
        region = Roi(offset * voxel_size + phase, shape * voxel_size)
    write = Roi(margin, block)
    read = write.grow(margin, margin)
    return region.grow(margin, margin), read, write


class _WorkerGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(registered_workers())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name.endswith(".py") or Path(name).is_file():
            return _worker_command(name, None)
        try:
            return _worker_command(name, worker_class(name))
        except VoxblockError as error:
            raise click.UsageError(str(error)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="voxblock")
def main() -> None:
    """Run any worker block by block over volumes far larger than memory.

    \b
    Start with:
      voxblock demo                   make a small volume and process it
      voxblock workers                the workers installed
      voxblock run WORKER --help      one worker's options
      voxblock segment --help         one consistent segmentation, blockwise
      voxblock agglomerate --help     affinities -> fragments -> region graph -> segments
      voxblock evaluate --help        VOI and adapted Rand error against a ground truth
      voxblock downsample --help      a multiscale pyramid (OME-NGFF), blockwise
      voxblock status OUTPUT          where a run stands: blocks done, rate, ETA, failures
    \b
    Workers run here, or on a cluster: --cluster slurm|lsf with --cpus,
    --memory... on run, segment and agglomerate, or once for all in voxblock.toml:
      [cluster]
      kind = "slurm"
      cpus = 2
      memory = "4G"
    \b
    A run writes done markers, per-worker logs and a report beside the
    output container (volume.zarr.voxblock/DATASET); run the same command
    again to resume after a crash: finished blocks are skipped.
    """


main.add_command(
    _WorkerGroup(
        "run",
        help="Run a worker (a registered name, or a worker .py file) blockwise.\n\n"
        "Example: voxblock run threshold --input v.zarr/pred --output v.zarr/mask "
        "--block-size 64 --threshold 0.5 --workers 4",
    )
)


@main.command("segment")
@click.argument("function")
@click.option("--input", "input_", required=True, metavar="C/D", help="input array, CONTAINER/DATASET")
@click.option("--output", required=True, metavar="C/D", help="the segmentation, CONTAINER/DATASET (created)")
@click.option("--block-size", required=True, metavar="Z,Y,X", help="write block in voxels")
@click.option(
    "--context",
    default="1",
    show_default=True,
    metavar="Z,Y,X",
    help="voxels around each block where it is compared with its neighbours (>= 1)",
)
@click.option(
    "--roi",
    metavar="OFFSET:SHAPE",
    help="region to segment, in voxels [default: the whole input]; " + ROI_OFFSET_HELP,
)
@click.option(
    "--parameter",
    "-p",
    "parameters",
    multiple=True,
    metavar="KEY=VALUE",
    help="parameter of the segment function (VALUE parsed as JSON when it can be), e.g. -p threshold=0.4",
)
@click.option(
    "--merge",
    type=click.Choice(["any", "overlap", "iou"]),
    default="any",
    show_default=True,
    help="which overlaps in the context merge two fragments",
)
@click.option(
    "--merge-threshold",
    default=0.5,
    show_default=True,
    help="minimum overlap fraction or IoU for --merge overlap/iou",
)
@click.option(
    "--stitch",
    type=click.Choice(["auto", "context", "faces"]),
    default="auto",
    show_default=True,
    help="how blocks are joined: faces (connected components only: exact, no fragments stored), "
    "context (any function: overlaps in the context), auto (faces where it applies)",
)
@click.option("--drop-fragments", is_flag=True, help="delete the intermediate fragments when done")
@_shared_options(
    overrides={
        "fit": {"choices": ("overhang", "shrink"), "default": "overhang", "help": "blocks at the border"},
        "fresh": {"help": "forget every pass and start over"},
    },
    exclude=("batch",),  # its passes' blocks wait for their neighbours (read_write_conflict)
)
def segment(function: str, **values: Any) -> None:
    """Segment a volume blockwise into one consistent labelling.

    FUNCTION is threshold-label (threshold, then connected components),
    a worker that can segment (watershed), or a Python file defining
    segment_function(input_array, block, **parameters). Each block is labelled
    with its context; labels that meet in the context are merged; IDs end up
    consecutive from 1. Fragments, edges (OUTPUT_edges) and the lookup table
    (OUTPUT_lut) stay in the output container. threshold-label is joined at
    block faces instead (exact, and no fragments are stored: each block is
    labelled again in the last pass); --stitch context keeps the fragments.

    \b
    Example:
      voxblock segment threshold-label --input v.zarr/fg --output v.zarr/cells \\
          --block-size 64 --context 1 -p threshold=0.5 -p connectivity=26
    """
    from voxblock.segment import segment_blockwise

    parameters = key_values(values["parameters"])
    flags = _task_flags(values)
    voxel_size: Coordinate | None = None  # known once the input is open: errors then speak voxels
    origin: Coordinate | None = None
    try:
        compute, host = _compute(values, flags.pop("host"))
        source = arrays.open_input(values["input_"])
        voxel_size = source.voxel_size
        origin = source.offset
        region, _, _ = rois_from_voxels(
            source.roi, source.voxel_size, values["block_size"], "0", values["roi"]
        )
        context = parse_coordinate(values["context"], source.voxel_size.dims) * source.voxel_size
        block = parse_coordinate(values["block_size"], source.voxel_size.dims) * source.voxel_size
        write = Roi((0,) * len(block), block)
        ok = (_plan if values["plan"] else _call)(
            "segment",
            lambda: segment_blockwise(
                function,
                context,
                region,
                write,
                write,
                input=values["input_"],
                output=values["output"],
                parameters=parameters,
                merge=values["merge"],
                merge_threshold=values["merge_threshold"],
                stitch=values["stitch"],
                keep_fragments=not values["drop_fragments"],
                progress=not values["no_progress"],
                **_task_keywords(flags, source.voxel_size.dims, compute, host),
            ),
        )
    except VoxblockError as error:
        raise click.ClickException(cli_wording(str(error), voxel_size, origin)) from None
    sys.exit(0 if ok else 1)


def _segment_functions_help() -> str:
    """The built-in segment functions and their parameters, for `voxblock segment --help`."""
    from voxblock.segment.functions import built_in_help

    lines = ["Built-in segment functions (parameters with their defaults):", *built_in_help()]
    return "\n\n\b\n" + "\n".join(lines)


segment.help = inspect.cleandoc(segment.help or "") + _segment_functions_help()


@main.command("agglomerate")
@click.option(
    "--affinities",
    required=True,
    metavar="C/D",
    help="affinities, CONTAINER/DATASET: channels first, one per offset",
)
@click.option(
    "--fragments",
    required=True,
    metavar="C/D",
    help="fragments, CONTAINER/DATASET: made with mutex watershed if missing, else reused",
)
@click.option("--output", required=True, metavar="C/D", help="the segmentation, CONTAINER/DATASET (created)")
@click.option(
    "--db",
    required=True,
    metavar="PATH|URL",
    help="the region graph: an SQLite file (made if missing) or postgresql://USER:PASSWORD@HOST/DB "
    "(for workers on many machines); read it with funlib.persistence's graph databases",
)
@click.option(
    "--offsets",
    metavar="JSON",
    help="one voxel offset per affinity channel, e.g. '[[1,0,0],[0,1,0],[0,0,1]]' "
    "[default: the affinities' 'offsets' attribute]",
)
@click.option("--block-size", required=True, metavar="Z,Y,X", help="write block in voxels")
@click.option(
    "--context",
    metavar="Z,Y,X",
    help="voxels each fragments block reads around it [default: the largest offset on each axis]",
)
@click.option(
    "--method",
    type=click.Choice(["mws", "threshold"]),
    default="mws",
    show_default=True,
    help="mws: mutex watershed on the graph (attract above --threshold, repel below, strongest "
    "first, as volara's GraphMWS); threshold: join every edge above --threshold",
)
@click.option(
    "--threshold",
    type=float,
    default=0.5,
    show_default=True,
    help="mean affinity of an edge above which its fragments join, in [0, 1]",
)
@click.option(
    "--bias",
    default="-0.5",
    show_default=True,
    metavar="B|JSON",
    help="fragments: added to the affinities before mutex watershed (one number, or a JSON list per offset)",
)
@click.option("--strides", metavar="JSON", help="fragments: mwatershed strides, one list per offset")
@click.option(
    "--randomized-strides", is_flag=True, help="fragments: strides as probabilities of keeping an edge"
)
@click.option(
    "--min-size",
    type=int,
    default=0,
    show_default=True,
    help="fragments: fragments with fewer voxels become 0",
)
@click.option("--mask", metavar="C/D", help="fragments: a foreground mask (nonzero = foreground)")
@_shared_options(exclude=("fit", "run_dir", "fresh", "batch"))
def agglomerate(**values: Any) -> None:
    """Affinities to one segmentation: fragments, region graph, agglomeration.

    \b
    1. fragments  mutex watershed per block (the watershed worker), unless --fragments exists
    2. graph      one node per fragment (position, size), one edge per touching pair with the
                  mean affinity over every voxel pair between them, counted once across blocks
    3. solve      --method on the whole graph, into a lookup table
    4. relabel    the segmentation, written block by block
    Every pass resumes: run the same command again after a crash. Run it again with another
    --threshold or --method (and --output) to reuse the fragments and the graph: only the solve
    and the relabel run again. Pick the threshold with `voxblock evaluate`.

    \b
    Example:
      voxblock agglomerate --affinities v.zarr/affs --fragments v.zarr/frags \\
          --output v.zarr/seg --db rag.sqlite --offsets '[[1,0,0],[0,1,0],[0,0,1]]' \\
          --block-size 64 --context 8 --threshold 0.5 --method mws --workers 8
    """
    from voxblock.agglomerate.pipeline import agglomerate_blockwise

    flags = _task_flags(values)
    voxel_size: Coordinate | None = None  # known once the input is open: errors then speak voxels
    origin: Coordinate | None = None
    try:
        compute, host = _compute(values, flags.pop("host"))
        source = arrays.open_input(values["affinities"], role="affinities")
        voxel_size, origin = source.voxel_size, source.offset
        ndim = source.voxel_size.dims
        block = parse_coordinate(values["block_size"], ndim) * voxel_size
        context = parse_coordinate(values["context"], ndim) * voxel_size if values["context"] else None
        keywords = _task_keywords(flags, ndim, compute, host)
        report = (_plan if values["plan"] else _call)(
            "agglomerate",
            lambda: agglomerate_blockwise(
                values["affinities"],
                values["fragments"],
                values["output"],
                values["db"],
                tuple(block),
                context=tuple(context) if context is not None else None,
                offsets=_json_option("--offsets", values["offsets"], list) if values["offsets"] else None,
                method=values["method"],
                threshold=values["threshold"],
                bias=_json_option("--bias", values["bias"], (int, float, list)),
                strides=_json_option("--strides", values["strides"], list) if values["strides"] else None,
                randomized_strides=values["randomized_strides"],
                min_size=values["min_size"],
                mask=values["mask"],
                overwrite=keywords.pop("overwrite"),
                progress=not values["no_progress"],
                **keywords,
            ),
        )
    except VoxblockError as error:
        raise click.ClickException(cli_wording(str(error), voxel_size, origin)) from None
    click.echo(report.summary())


def _json_option(flag: str, text: str, kind: Any) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise VoxblockError(
            f"{flag} must be JSON, e.g. '[[1,0,0],[0,1,0],[0,0,1]]'; got {text!r} ({error})"
        ) from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise VoxblockError(
            f"{flag}: got {text!r}, which is not a {getattr(kind, '__name__', 'number or list')}"
        )
    return value


@main.command("workers")
def list_workers() -> None:
    """List the workers installed (the voxblock.workers entry points) and the segment functions."""
    from voxblock.segment.functions import built_in_help

    found = registered_workers()
    if not found:
        click.echo("no workers installed (pip install voxblock-workers)")
    segmenters = []
    for name in sorted(found):
        try:
            cls = worker_class(name)
            summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            where = found[name].value
            if callable(getattr(cls, "segment", None)):
                segmenters.append(name)
        except Exception as error:  # a broken plugin must not hide the others
            summary, where = f"(cannot load: {error})", found[name].value
        click.echo(f"{name:12s} {summary}  [{where}]")
    click.echo("\nSegment functions, for `voxblock segment FUNCTION` (not `voxblock run`):")
    for line in built_in_help():
        click.echo(f"  {line}")
    for name in segmenters:
        click.echo(f"  {name}: the {name} worker; its options are the parameters (run {name} --help)")
    click.echo("  a Python file defining segment_function(input_array, block, **parameters)")


@main.command()
@click.option(
    "--dir",
    "directory",
    default="voxblock_demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="where to write the demo volume",
)
@click.option("--size", default=128, show_default=True, help="edge of the cubic volume, voxels")
@click.option("--block-size", default=32, show_default=True, help="edge of a block, voxels")
@click.option("--workers", default=2, show_default=True, help="worker processes")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def demo(directory: str, size: int, block_size: int, workers: int, no_progress: bool) -> None:
    """Write a synthetic volume and process it blockwise, then check the result.

    With voxblock-workers installed it thresholds the volume, then segments it
    with segment_blockwise (threshold + connected components) and compares both
    with the whole-volume results; with core alone it runs the scale worker.
    Run it twice: the second run resumes (nothing to do).
    """
    from voxblock.demo import run_demo

    try:
        ok = run_demo(Path(directory), size, block_size, workers, progress=not no_progress)
    except VoxblockError as error:
        raise click.ClickException(str(error)) from None
    sys.exit(0 if ok else 1)


# -- voxblock evaluate -------------------------------------------------------------------------


@main.command("evaluate")
@click.option(
    "--segmentation",
    "-s",
    "segmentations",
    multiple=True,
    metavar="C/D",
    help="a segmentation, CONTAINER/DATASET; repeatable: one row each",
)
@click.option(
    "--ground-truth", "-g", required=True, metavar="C/D", help="the ground truth, CONTAINER/DATASET"
)
@click.option(
    "--fragments", metavar="C/D", help="fragments to agglomerate at each of --thresholds (with --db)"
)
@click.option(
    "--db", metavar="DB", help="the fragments' finalized region graph: SQLite file or postgresql:// URL"
)
@click.option(
    "--thresholds", metavar="T,T,...", help="agglomeration thresholds, e.g. 0.1,0.3,0.5: one row each"
)
@click.option(
    "--method",
    type=click.Choice(["mws", "threshold"]),
    default="mws",
    show_default=True,
    help="how the region graph is agglomerated at each threshold",
)
@click.option(
    "--roi",
    metavar="OFFSET:SHAPE",
    help="region to evaluate, in voxels [default: where all the arrays overlap]; " + ROI_OFFSET_HELP,
)
@click.option(
    "--count-unlabelled",
    is_flag=True,
    help="count voxels whose ground truth is 0 too [default: ignore them, the usual convention]",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="write the scores to this JSON file"
)
@click.option("--no-progress", is_flag=True, help="no progress bar")
def evaluate_command(
    segmentations: tuple[str, ...],
    ground_truth: str,
    fragments: str | None,
    db: str | None,
    thresholds: str | None,
    method: str,
    roi: str | None,
    count_unlabelled: bool,
    json_path: str | None,
    no_progress: bool,
) -> None:
    """Score segmentations against a ground truth: VOI split/merge and adapted Rand error.

    One pass over the arrays, slab by slab (memory grows with the number of
    distinct segment/ground-truth pairs, not the volume), over the region
    all of them cover, so that the rows compare. Scores are scikit-image's:
    voi_split = H(seg|gt), voi_merge = H(gt|seg) in bits, arand its adapted
    Rand error; precision = the fraction of voxel pairs joined in the
    segmentation that the ground truth joins, recall the reverse. Voxels
    whose ground truth is 0 (unlabelled) are not counted unless
    --count-unlabelled; segmentation label 0 is an ordinary label.

    A threshold sweep costs one pass too: --fragments with --db (their
    region graph) and --thresholds count the fragments once and score the
    agglomeration at each threshold from that count.

    \b
    Example:
      voxblock evaluate -g v.zarr/gt -s v.zarr/cells -s v.zarr/cells_v2 --json scores.json
      voxblock evaluate -g v.zarr/gt --fragments v.zarr/frags --db rag.sqlite \\
          --thresholds 0.1,0.3,0.5
    """
    import math

    from voxblock.evaluate import checked_scores, lut_table, tables_arrays

    sweep = [fragments, db, thresholds]
    if any(v is not None for v in sweep) and any(v is None for v in sweep):
        raise click.UsageError("a threshold sweep needs all of --fragments, --db and --thresholds")
    if not segmentations and fragments is None:
        raise click.UsageError("give --segmentation (repeatable), or --fragments, --db and --thresholds")
    levels: list[float] = []
    if thresholds is not None:
        try:
            levels = [float(t) for t in thresholds.split(",") if t.strip()]
        except ValueError:
            raise click.BadParameter(f"expected numbers separated by commas; got {thresholds!r}") from None
    ignore_gt = () if count_unlabelled else (0,)
    names = [*segmentations, *([fragments] if fragments else [])]
    rows: list[tuple[str, dict[str, Any], Any]] = []
    try:
        region = None
        if roi is not None:
            truth = arrays.open_input(ground_truth, role="ground truth")
            offset, shape = parse_roi(roi, truth.voxel_size.dims)
            if any(v <= 0 for v in shape):
                raise VoxblockError(f"--roi's shape must be positive on every axis; got {roi}")
            phase = Coordinate(b % v for b, v in zip(truth.roi.begin, truth.voxel_size))
            region = Roi(offset * truth.voxel_size + phase, shape * truth.voxel_size)
        tables, region = tables_arrays(names, ground_truth, region, progress=not no_progress)
        for name, table in zip(segmentations, tables):
            rows.append((name, {"segmentation": name}, checked_scores(table, ignore_gt, region)))
        if fragments is not None:
            from voxblock.agglomerate.solve import graph_lut

            for level in levels:
                agglomerated = lut_table(tables[-1], graph_lut(db, method, level))
                where = {"fragments": fragments, "db": db, "method": method, "threshold": level}
                rows.append((f"{method} {level:g}", where, checked_scores(agglomerated, ignore_gt, region)))
    except VoxblockError as error:
        raise click.ClickException(str(error)) from None

    voxel_size = arrays.open_input(ground_truth, role="ground truth").voxel_size
    begin = region.begin / voxel_size
    shown_roi = f"{','.join(map(str, begin))}:{','.join(map(str, region.shape / voxel_size))}"
    counted = rows[0][2].voxels
    what = "all voxels" if count_unlabelled else "ground truth 0 ignored"
    click.echo(f"ground truth {ground_truth}, ROI {shown_roi} (voxels), {counted} voxels counted ({what})")
    columns = ("voi_split", "voi_merge", "voi", "arand", "precision", "recall")
    width = max(12, *(len(name) for name, _, _ in rows))
    click.echo(f"{'segmentation':{width}s}  " + "  ".join(f"{c:>9s}" for c in columns))
    for name, _, result in rows:
        values = result.as_dict()
        click.echo(f"{name:{width}s}  " + "  ".join(f"{values[c]:9.6f}" for c in columns))
    if json_path is not None:

        def finite(value: Any) -> Any:  # JSON has no NaN: an undefined score is null
            return None if isinstance(value, float) and math.isnan(value) else value

        document = {
            "ground_truth": ground_truth,
            "roi": {"offset": list(region.begin), "shape": list(region.shape)},
            "voxel_size": list(voxel_size),
            "ignore_gt": list(ignore_gt),
            "rows": [
                {**where, **{k: finite(v) for k, v in result.as_dict().items()}} for _, where, result in rows
            ],
        }
        Path(json_path).write_text(json.dumps(document, indent=2) + "\n")


@main.command("status")
@click.argument("target", required=False, metavar="TARGET")
@click.option(
    "--watch",
    "watch",
    is_flag=False,
    flag_value="2",
    default=None,
    metavar="[SECONDS]",
    help="refresh in place every SECONDS (2) until the run ends, or Ctrl-C",
)
@click.option("--json", "as_json", is_flag=True, help="print a JSON snapshot (with --watch: one a line)")
def status_command(target: str | None, watch: str | None, as_json: bool) -> None:
    """Where a run stands, from its run directory alone (also while it runs, from another shell
    or node): per task, blocks done / failed / total, rate and ETA, failed blocks (ROI, last
    error), workers alive, and whether it is running, finished, failed or stopped (killed).

    TARGET: an output array (CONTAINER/DATASET), a run directory, or a directory holding several
    (every pass of segment or agglomerate: volume.zarr.voxblock).

    \b
    Example: voxblock status v.zarr/seg --watch
    """
    import time

    from voxblock.status import read_status, render

    interval = None
    if watch is not None:
        try:
            interval = float(watch)
        except ValueError:
            if target is not None:
                raise click.BadParameter(f"expected seconds; got {watch!r}", param_hint="--watch") from None
            target, interval = watch, 2.0  # `status --watch TARGET`: the target, not seconds
        if interval <= 0:
            raise click.BadParameter("must be positive", param_hint="--watch")
    if target is None:
        raise click.UsageError("give TARGET: an output array, a run directory or a directory of them")
    in_place = interval is not None and not as_json and sys.stdout.isatty()
    idle_since = None
    try:
        while True:
            try:
                snapshot = read_status(target)
            except VoxblockError as error:
                raise click.ClickException(str(error)) from None
            if as_json:
                click.echo(json.dumps(snapshot.to_json(), indent=None if interval else 2))
            elif in_place:
                heading = f"voxblock status {target}  {time.strftime('%H:%M:%S')}  (Ctrl-C to stop)"
                click.echo("\x1b[H\x1b[J" + heading + "\n" + render(snapshot))
            else:
                click.echo(render(snapshot) + ("\n" if interval else ""))
            if interval is None:
                return
            # between two passes no task runs for a moment: end once none has run for a while
            if snapshot.running:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= max(3.0, interval):
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


# -- voxblock downsample -----------------------------------------------------------------------


@main.command("downsample")
@click.argument("input_", metavar="INPUT")
@click.option("--levels", type=int, default=1, show_default=True, help="levels to add above INPUT")
@click.option(
    "--factors",
    default="auto",
    show_default=True,
    metavar="Z,Y,X|JSON",
    help="window per axis, for every level (1,2,2), or a JSON list per level "
    "('[[1,2,2],[1,2,2],[2,2,2]]'); auto: 2 on the axes under twice the finest voxel size, else 1 "
    "(towards isotropic voxels)",
)
@click.option(
    "--mode",
    type=click.Choice(["auto", "mean", "mode"]),
    default="auto",
    show_default=True,
    help="mean (intensities; integers rounded half to even, as np.rint) or mode (labels: the most "
    "frequent in each window, ties to the smallest); auto: mode for uint32/uint64 (any 32/64-bit "
    "integer, bool), mean for uint8/uint16 (8/16-bit integers) and floats",
)
@click.option(
    "--output",
    metavar="GROUP",
    help="write a new OME-NGFF image here (CONTAINER/GROUP, e.g. v.zarr/raw_pyramid): s0 a copy of "
    "INPUT, then s1... [default: INPUT must be a level of an OME-NGFF image; the levels go beside it]",
)
@click.option(
    "--block-size",
    metavar="Z,Y,X",
    help="each level's write block in its own voxels, also its chunk [default: INPUT's chunk]",
)
@_shared_options(exclude=("fit", "run_dir", "halo"))
def downsample_command(
    input_: str,
    levels: int,
    factors: str,
    mode: str,
    output: str | None,
    block_size: str | None,
    **values: Any,
) -> None:
    """Add a multiscale pyramid to INPUT, blockwise: OME-NGFF 0.4 (zarr v2) or 0.5 (zarr v3).

    Level k+1 is level k reduced over windows of --factors voxels; its shape is the floor of
    level k's over the factors (voxels past the last whole window are not used), its voxel
    size level k's times the factors, its translation level k's (the corner of voxel 0 stays:
    offset = translation, as voxblock and funlib read OME-NGFF). INPUT a level of an OME-NGFF
    image (image.zarr/s0): s1, s2... are written beside it and listed in the image's
    multiscales. Any other input needs --output. Each level is one task (level k+1 reads level
    k); run the same command again to resume.

    \b
    Example:
      voxblock downsample v.zarr/raw/s0 --levels 4 --factors 1,2,2 --workers 8
      voxblock downsample v.zarr/cells/s0 --levels 3 --mode mode
      voxblock downsample v.zarr/raw --output v.zarr/raw_pyramid --levels 3
    """
    try:
        from voxblock_workers.downsample import downsample_blockwise
    except ImportError:
        raise click.ClickException(
            "voxblock downsample needs voxblock-workers: pip install voxblock-workers"
        ) from None

    flags = _task_flags(values)
    voxel_size: Coordinate | None = None  # known once the input is open: errors then speak voxels
    origin: Coordinate | None = None
    try:
        compute, host = _compute(values, flags.pop("host"))
        source = arrays.open_input(input_)
        voxel_size, origin = source.voxel_size, source.offset
        ndim = source.voxel_size.dims
        pyramid = (_plan if values["plan"] else _call)(
            "downsample",
            lambda: downsample_blockwise(
                input_,
                levels=levels,
                factors=factors,
                mode=mode,
                output=output,
                block_size=tuple(parse_coordinate(block_size, ndim)) if block_size else None,
                progress=not values["no_progress"],
                **_task_keywords(flags, ndim, compute, host),
            ),
        )
    except VoxblockError as error:
        raise click.ClickException(cli_wording(str(error), voxel_size, origin)) from None
    shown = ", ".join("x".join(map(str, f)) for f in pyramid.factors)
    click.echo(f"levels ({pyramid.mode}, factors {shown}): " + " ".join(pyramid.levels))
    sys.exit(0 if pyramid.succeeded else 1)


# -- voxblock view -------------------------------------------------------------------------------


@main.command("view")
@click.argument("arrays", nargs=-1, required=True, metavar="ARRAY...")
@click.option(
    "--run-dir",
    "run_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="show the done (green) and failed (red) blocks of this run directory (or of every "
    "pass under it: volume.zarr.voxblock); repeatable",
)
@click.option("--blocks", is_flag=True, help="show the blocks of the run that wrote the first ARRAY")
@click.option("--port", type=int, default=0, show_default="any free port", help="the viewer's port")
@click.option("--bind", default="127.0.0.1", show_default=True, help="the address to listen on")
@click.option(
    "--screenshot",
    "screenshot_png",
    type=click.Path(dir_okay=False),
    default=None,
    help="save what the viewer shows as PNG (headless Chromium) and exit",
)
def view_command(
    arrays: tuple[str, ...],
    run_dirs: tuple[str, ...],
    blocks: bool,
    port: int,
    bind: str,
    screenshot_png: str | None,
) -> None:
    """Look at arrays in neuroglancer: zarr v2/v3 (sharded too), OME-NGFF images (all levels as
    one layer), N5. Label arrays (uint32/uint64) are segmentation layers, the others images.
    Voxel sizes and offsets are voxblock's (nm). Serves until Ctrl-C.

    ARRAY: CONTAINER/DATASET, or an OME-NGFF image group (v.zarr/raw holding s0, s1...).

    \b
    Example:
      voxblock view v.zarr/raw v.zarr/seg --blocks
      voxblock view v.zarr/raw --run-dir v.zarr.voxblock --screenshot run.png
    """
    import time

    from voxblock import view
    from voxblock.status import find_run_dirs

    try:
        import neuroglancer  # noqa: F401
    except ImportError:
        raise click.ClickException("voxblock view needs neuroglancer: pip install 'voxblock[view]'") from None
    if blocks and run_dirs:
        raise click.UsageError("give --blocks or --run-dir, not both")
    targets = list(run_dirs) or ([arrays[0]] if blocks else [])
    found = [path for target in targets for path in find_run_dirs(target)]
    if targets and not found:
        raise click.ClickException(f"no run directory (holding task.json) found for {', '.join(targets)}")
    try:
        served = view.serve(arrays, found, bind=bind, port=port)
        boxes = served.boxes
        for line in view.describe_boxes(boxes):
            click.echo(f"blocks {line}")
        if screenshot_png is not None:
            click.echo(f"screenshot: {view.screenshot(served, screenshot_png)}")
            return
    except VoxblockError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"neuroglancer: {served.url}")
    click.echo("serving until Ctrl-C")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return


if __name__ == "__main__":
    main()
