"""`downsample`: one level of a multiscale pyramid, and `downsample_blockwise`, the whole pyramid.

A level is the level above it reduced over windows of `factors` voxels (per spatial axis):

- `mean` (intensities): the window's mean. Integers: summed exactly (64-bit integers too: each
  voxel split into quotient and remainder by the window size) and rounded half to even, as
  `np.rint` / `np.round` round (2.5 -> 2, 3.5 -> 4); floats: summed in float64 in a fixed order,
  divided, then cast to the input's dtype.
- `mode` (labels): the most frequent label of the window; ties go to the smallest label (as
  `scipy.stats.mode`).
- `auto` (default): `mode` for bool and 32/64-bit integers (labels), `mean` for 8/16-bit integers
  and floats (intensities).

Border: a level's shape is the floor of the shape above it divided by the factors (as
ome-zarr-py's and most OME-NGFF pyramids): voxels past the last whole window are not used.

Where a level is: its voxel size is the one above it times the factors, and its offset (OME-NGFF
translation) is the one above it, unchanged: the corner of its voxel 0 is where the corner of
the window it averages is. That is how voxblock and funlib.persistence read an OME-NGFF level
(offset = translation) and what ome-zarr-py writes (a scale per level, no translation); a
viewer that puts translation at voxel centres (the half-voxel shift, translation0 +
(factor - 1) / 2 * voxel0) would draw such a pyramid half a coarse voxel off, and funlib.geometry
could not hold that shift on an odd grid (voxel size 1: a shift of 0.5).

`downsample_blockwise` runs one task per level as one pipeline (level k+1 reads level k,
`upstream_tasks`); every task resumes like any other voxblock task.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from voxblock import ArrayName, ArrayWorker, VoxblockError, option

if TYPE_CHECKING:
    from funlib.geometry import Coordinate

    from voxblock import Array, RunReport

MODES = ("auto", "mean", "mode")
LEVEL_NAME = re.compile(r"^(s?)(\d+)$")


def default_mode(dtype: Any) -> str:
    """`mode` for labels (bool, 32/64-bit integers), `mean` for intensities (8/16-bit integers, floats)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b" or (dtype.kind in "iu" and dtype.itemsize >= 4):
        return "mode"
    return "mean"


def resolved_mode(mode: str, dtype: Any) -> str:
    """The mode a run uses for `dtype` ('auto' resolved), or a VoxblockError where it cannot be used."""
    dtype = np.dtype(dtype)
    if mode not in MODES:
        raise VoxblockError(f"downsample: mode must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "auto":
        mode = default_mode(dtype)
    if dtype.kind not in "biuf":
        raise VoxblockError(f"downsample: the input's dtype {dtype} is not numeric")
    if mode == "mode" and dtype.kind == "f":
        raise VoxblockError(
            f"downsample: mode 'mode' (the most frequent label) needs integer labels; the input is {dtype}. "
            "Use mode 'mean' for intensities"
        )
    if mode == "mean" and dtype.kind == "b":
        raise VoxblockError("downsample: mode 'mean' on a bool input; use mode 'mode'")
    return mode


def check_factors(factors: Any, dims: int, where: str = "downsample: factors") -> tuple[int, ...]:
    """One positive integer per spatial axis, or a VoxblockError."""
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise VoxblockError(f"{where} must be {dims} positive integers, one per axis; got {factors!r}")
    values = list(factors)
    if len(values) != dims or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in values
    ):
        raise VoxblockError(f"{where} must be {dims} positive integers, one per axis; got {factors!r}")
    return tuple(int(v) for v in values)


# -- the reduction ----------------------------------------------------------------------------------


def downsample(data: np.ndarray, factors: Sequence[int], mode: str) -> np.ndarray:
    """`data` (channels first, then one axis per factor) reduced over windows of `factors` voxels.

    Whole windows only: the shape is floor(shape / factors). `mode` is 'mean' or 'mode' (see the
    module docstring for rounding and ties).
    """
    factors = tuple(int(f) for f in factors)
    lead = data.ndim - len(factors)
    out = tuple(s // f for s, f in zip(data.shape[lead:], factors))
    if all(f == 1 for f in factors):
        return data
    # the window's voxels, one strided view each, in a fixed (C) order
    parts = [
        data[(Ellipsis, *(slice(o, o + n * f, f) for o, n, f in zip(at, out, factors)))]
        for at in itertools.product(*(range(f) for f in factors))
    ]
    if mode == "mode":
        return _mode(parts, data.dtype)
    return _mean(parts, data.dtype)


def _mean(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    n = len(parts)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        total = parts[0].astype(np.float64)
        for part in parts[1:]:
            total += part
        total /= n
        return total.astype(dtype)
    signed = dtype.kind == "i"
    if dtype.itemsize <= 4:
        # the exact sum fits: int32 for 8/16-bit data in windows up to 2**15 voxels, else int64
        wide = np.int32 if dtype.itemsize <= 2 and n <= 2**15 else np.int64
        total = parts[0].astype(wide)
        for part in parts[1:]:
            total += part
        quotient = total // n
        remainder = total - quotient * n
    else:
        # 64-bit: sum x // n and x % n apart (sum(x) = n * sum(q) + sum(r)): nothing overflows
        wide = np.int64 if signed else np.uint64
        quotient = parts[0] // n
        rest = (parts[0] % n).astype(np.int64)
        quotient = quotient.astype(wide)
        for part in parts[1:]:
            quotient += part // n
            rest += (part % n).astype(np.int64)
        quotient += (rest // n).astype(wide)
        remainder = rest % n
    # round half to even, as np.rint: up above one half, and at one half where the quotient is odd
    twice = 2 * remainder
    up = (twice > n) | ((twice == n) & (quotient % 2 != 0))
    quotient += up.astype(quotient.dtype)
    return quotient.astype(dtype)


def _mode(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    shape = parts[0].shape
    windows = np.stack([p.reshape(-1) for p in parts], axis=1)  # (voxels, window)
    windows.sort(axis=1)
    n = windows.shape[1]
    index = np.arange(n)
    starts = np.zeros(windows.shape, dtype=np.int32)
    new = windows[:, 1:] != windows[:, :-1]
    starts[:, 1:] = np.where(new, index[1:], 0)
    starts = np.maximum.accumulate(starts, axis=1)
    # voxels so far in each run; the first longest run ends first, and sorted: the smallest label
    best = (index - starts).argmax(axis=1)
    return windows[np.arange(len(windows)), best].reshape(shape).astype(dtype, copy=False)


# -- the worker -----------------------------------------------------------------------------------


@dataclass
class Downsample(ArrayWorker):
    """One pyramid level: the input reduced over windows of `factors` voxels (mean or mode).

    The output's voxel size is the input's times the factors, from the same origin; blocks
    (a multiple of the output voxel size) write whole output voxels. Its shape is the floor
    of the input's over the factors.
    """

    name = "downsample"
    # border blocks keep their size (zeros past the input, writes clipped to the level): any block
    # size. Not "shrink": daisy 2 reports some shrunk border blocks of a task with upstream_tasks
    # as already done and never runs them (a pipeline of levels then leaves holes)
    fit = "overhang"
    new_level = True  # the output is a new level of the input's OME-NGFF image

    factors: list[int] = option([2, 2, 2], help="window in input voxels, one factor per spatial axis")
    mode: Literal["auto", "mean", "mode"] = option(
        "auto",
        help="mean (intensities: rounded half to even), mode (labels: most frequent, ties to the "
        "smallest); auto: mode for bool and 32/64-bit integers, mean for 8/16-bit integers and floats",
    )

    def check_input(self, source: Array) -> None:
        factors = check_factors(self.factors, source.voxel_size.dims)
        resolved_mode(self.mode, source.dtype)
        spatial = source.shape[source.channel_dims :]
        if any(s // f == 0 for s, f in zip(spatial, factors)):
            raise VoxblockError(
                f"downsample: input {self.input} of shape {tuple(spatial)} has fewer voxels than the "
                f"factors {factors} on an axis: the level would be empty"
            )

    def output_voxel_size(self, source: Array) -> Coordinate:
        return source.voxel_size * type(source.voxel_size)(
            check_factors(self.factors, source.voxel_size.dims)
        )

    def output_channels(self, source: Array) -> tuple[int, ...]:
        return tuple(source.shape[: source.channel_dims])

    def setup(self) -> None:
        super().setup()
        self._mode = resolved_mode(self.mode, self.source.dtype)

    def compute(self, data: np.ndarray, block: Any) -> np.ndarray:
        return downsample(data, self.factors, self._mode)


# -- a pyramid -------------------------------------------------------------------------------------


@dataclass
class Pyramid:
    """What `downsample_blockwise` did: the levels (array names, first = level 0) and its run."""

    levels: list[str]
    factors: list[tuple[int, ...]]
    mode: str
    report: RunReport | None = None

    @property
    def succeeded(self) -> bool:
        return self.report is not None and self.report.succeeded


def _group_multiscales(group: Path) -> list[dict[str, Any]] | None:
    """The OME-NGFF multiscales of a zarr group (0.5's `ome` namespace or 0.4's top level), or None."""
    for meta, key in ((group / "zarr.json", "attributes"), (group / ".zattrs", None)):
        if not meta.is_file():
            continue
        attrs = json.loads(meta.read_text())
        attrs = attrs.get(key) or {} if key else attrs
        ome = attrs.get("ome")
        found = ome.get("multiscales") if isinstance(ome, dict) else attrs.get("multiscales")
        return list(found) if found else None
    return None


def parse_factors(factors: Any, dims: int, levels: int, voxel_size: Sequence[int]) -> list[tuple[int, ...]]:
    """One tuple of factors per level, from one per axis (repeated), one list per level, or None.

    None ('auto'): per level, 2 on every axis whose voxel size is less than twice the smallest,
    else 1 (anisotropic EM, 8,4,4 nm: 1,2,2 then 2,2,2: towards isotropic voxels).
    """
    if levels < 1 or isinstance(levels, bool) or not isinstance(levels, (int, np.integer)):
        raise VoxblockError(f"downsample: levels must be a positive integer; got {levels!r}")
    if isinstance(factors, str):
        text = factors.strip()
        if text.lower() in ("", "auto"):
            factors = None
        else:
            try:
                factors = json.loads(text if text.startswith("[") else f"[{text}]")
            except json.JSONDecodeError:
                raise VoxblockError(
                    f"downsample: factors {text!r} are neither Z,Y,X (e.g. 1,2,2) nor a JSON list per "
                    "level (e.g. [[1,2,2],[1,2,2],[2,2,2]])"
                ) from None
    if factors is None:
        size = [int(v) for v in voxel_size]
        found = []
        for _ in range(levels):
            smallest = min(size)
            level = tuple(2 if v < 2 * smallest else 1 for v in size)
            found.append(level)
            size = [v * f for v, f in zip(size, level)]
        return found
    if (
        isinstance(factors, Sequence)
        and factors
        and all(isinstance(f, Sequence) and not isinstance(f, str) for f in factors)
    ):
        if len(factors) != levels:
            raise VoxblockError(
                f"downsample: {len(factors)} lists of factors for {levels} levels; give one per level, "
                "or one Z,Y,X for all"
            )
        found = [
            check_factors(f, dims, f"downsample: factors of level {k + 1}") for k, f in enumerate(factors)
        ]
    else:
        found = [check_factors(factors, dims)] * levels
    for k, level in enumerate(found):
        if all(f == 1 for f in level):
            raise VoxblockError(f"downsample: factors {level} of level {k + 1} do not downsample (all 1)")
    return found


def plan_levels(input: str, output: str | None, levels: int) -> tuple[list[str], bool]:
    """The array names of levels 0..levels, and whether level 0 must be copied (a new image group).

    An input that is a level of an OME-NGFF image (`image.zarr/s0`) gets the next levels beside
    it (`s1`, `s2`, ...: its own naming) unless `output` names a new image group; any other
    input needs `output`, whose `s0` is then a copy of it.
    """
    name = ArrayName.parse(input)
    parts = name.dataset.split("/")
    match = LEVEL_NAME.match(parts[-1])
    if output:
        out = str(output).rstrip("/")
        parsed = ArrayName.parse(out + "/s0")
        if parsed.path.resolve() == name.path.resolve():
            raise VoxblockError(f"downsample: output {out}/s0 is the input itself")
        if _group_multiscales(parsed.path.parent) and not parsed.path.exists():
            raise VoxblockError(
                f"downsample: output {out} is an OME-NGFF image already, without s0; choose a new group"
            )
        return [out + "/s0"] + [f"{out}/s{k}" for k in range(1, levels + 1)], True
    multiscales = _group_multiscales(name.path.parent)
    listed = multiscales and any(
        str(d.get("path", "")).strip("/") == parts[-1] for d in (multiscales[0].get("datasets") or [])
    )
    if match is None or not listed:
        raise VoxblockError(
            f"downsample: input {input} is not a level of an OME-NGFF multiscale image, so there is no "
            f"image to add levels to. Give --output GROUP (output=...) to write a new pyramid, e.g. "
            f"--output {name.container}/{'/'.join([*parts[:-1], parts[-1] + '_pyramid'])}: its s0 is a "
            "copy of the input made blockwise, s1... the levels"
        )
    assert multiscales is not None
    if len(multiscales) > 1:
        raise VoxblockError(
            f"downsample: {name.container}/{'/'.join(parts[:-1])} holds {len(multiscales)} multiscale "
            "images; voxblock adds levels to an image group with one. Give --output GROUP for a new pyramid"
        )
    if multiscales[0].get("coordinateTransformations"):
        raise VoxblockError(
            f"downsample: the multiscale image of {input} has coordinateTransformations of its own (for "
            "all levels); voxblock writes each level's scale and translation in full and does not "
            "extend such an image. Give --output GROUP for a new pyramid"
        )
    prefix, number = match.group(1), int(match.group(2))
    base = "/".join([str(name.container), *parts[:-1]])
    return [input] + [f"{base}/{prefix}{number + k}" for k in range(1, levels + 1)], False


def downsample_blockwise(
    input: str,
    levels: int = 1,
    factors: Any = None,
    mode: str = "auto",
    output: str | None = None,
    block_size: Sequence[int] | int | None = None,
    num_workers: int = 2,
    progress: bool = True,
    serial: bool = False,
    **task_options: Any,
) -> Pyramid:
    """Write `levels` levels of a multiscale pyramid of `input`, blockwise; resumable.

    `input` a level of an OME-NGFF image (`image.zarr/s0`): the levels are added beside it
    (`s1`, `s2`, ...) and the image's multiscales metadata lists them. Otherwise (or with
    `output`): a new OME-NGFF image group `output` (e.g. `v.zarr/raw_pyramid`) whose `s0` is a
    copy of `input`. `factors`: one per axis for every level (`(1, 2, 2)`), one list per level,
    or None (2 where an axis is under twice the finest voxel size: towards isotropic). `mode`:
    'mean', 'mode' or 'auto' (by dtype). `block_size`: each level's write block in its own
    voxels (default: the input's chunk), also its chunk shape. Other keywords are task options
    (`max_retries`, `compute`, `chunk_shape`, `overwrite`, ...). Every check runs before any
    array is made; then all levels run as one pipeline, level k+1 reading level k. `serial`: every
    block in this process, one at a time (`run_tasks(serial=True)`: debugging, tests).
    """
    from funlib.geometry import Coordinate, Roi

    from voxblock import BlockwiseTask, open_input, run_tasks

    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 1:
        raise VoxblockError(f"downsample: num_workers must be a positive integer; got {num_workers!r}")
    source = open_input(input)
    dims = source.voxel_size.dims
    per_level = parse_factors(factors, dims, levels, source.voxel_size)
    used = resolved_mode(mode, source.dtype)
    if block_size is None:
        block = Coordinate(source.chunk_shape[source.channel_dims :])
    else:
        values = [block_size] * dims if isinstance(block_size, (int, np.integer)) else list(block_size)
        if len(values) != dims or not all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
            raise VoxblockError(
                f"downsample: block_size must be {dims} positive integers; got {block_size!r}"
            )
        block = Coordinate(int(v) for v in values)
    shape = Coordinate(source.shape[source.channel_dims :])
    for k, level in enumerate(per_level):
        shape = shape / Coordinate(level)  # floor: whole windows only
        if any(s == 0 for s in shape):
            raise VoxblockError(
                f"downsample: level {k + 1} would have shape {tuple(shape)} (a zero-size axis): the input "
                f"{tuple(source.shape[source.channel_dims :])} is too small for the factors "
                f"{per_level[: k + 1]}; use fewer levels or smaller factors"
            )
    names, copy = plan_levels(input, output, levels)

    tasks: list[Any] = []
    reading, voxel_size = input, source.voxel_size
    shape = Coordinate(source.shape[source.channel_dims :])
    steps = ([(1,) * dims] if copy else []) + per_level
    targets = names if copy else names[1:]
    for k, (level, target) in enumerate(zip(steps, targets)):
        voxel_size = voxel_size * Coordinate(level)
        shape = shape / Coordinate(level)
        worker = Downsample(input=reading, output=target, factors=list(level), mode=used)
        write = Roi((0,) * dims, block * voxel_size)
        upstream = [tasks[-1]] if tasks and not (copy and k == 1) else []
        tasks.append(
            BlockwiseTask(
                worker,
                Roi(source.offset, shape * voxel_size),
                write,
                write,
                num_workers=num_workers,
                upstream_tasks=upstream,
                task_id=f"downsample_{target.rsplit('/', 1)[-1]}",
                **task_options,
            )
        )
        # the copy (s0) and s1 both read the input; the levels above read the level below
        reading = input if copy and k == 0 else target
    report = run_tasks(tasks, progress=progress, serial=serial)
    return Pyramid(names, per_level, used, report)
