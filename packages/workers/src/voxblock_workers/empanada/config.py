"""The empanada model config (YAML or JSON, empanada's keys) and the worker's options, checked.

Every check raises VoxblockError saying what is wrong, so that a bad config,
option or block size stops the run in the driver, before any block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxblock import VoxblockError

PLANES = {"xy": 0, "xz": 1, "yz": 2}  # the (z, y, x) axis each kind of plane is stacked along


@dataclass(frozen=True)
class ModelConfig:
    """An empanada-style model config, checked."""

    path: str
    model: str
    mean: float
    std: float
    padding_factor: int
    labels: tuple[int, ...]
    thing_list: tuple[int, ...]


def _number(value: Any) -> float | None:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def read_config(path: str) -> ModelConfig:
    """Parse and check a model config (YAML or JSON): VoxblockError saying what is wrong."""
    if not path:
        raise VoxblockError("empanada needs a model config: config=PATH (a YAML or JSON file)")
    file = Path(path)
    if not file.is_file():
        raise VoxblockError(f"empanada: config {path} does not exist")
    text = file.read_text()
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:
        raise VoxblockError(f"empanada: config {path} is not valid YAML/JSON: {error}") from error
    if not isinstance(data, dict):
        raise VoxblockError(f"empanada: config {path} must be a mapping (model, norms, padding_factor, ...)")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise VoxblockError(f"empanada: config {path} has no 'model' (the path of a TorchScript file)")
    if "://" in model:
        raise VoxblockError(
            f"empanada: config {path} names the model by URL ({model}); voxblock downloads nothing: "
            "download the file and set model to its path"
        )
    model_path = Path(model) if Path(model).is_absolute() else file.resolve().parent / model
    if not model_path.is_file():
        raise VoxblockError(f"empanada: the model file {model_path} named in {path} does not exist")
    norms = data.get("norms")
    mean = _number(norms.get("mean")) if isinstance(norms, dict) else None
    std = _number(norms.get("std")) if isinstance(norms, dict) else None
    if mean is None or std is None or not std > 0:
        raise VoxblockError(
            f"empanada: config {path} needs norms: {{mean: NUMBER, std: NUMBER > 0}}; got {norms!r}"
        )
    padding = data.get("padding_factor", 16)
    if not is_int(padding) or padding < 1:
        raise VoxblockError(f"empanada: padding_factor in {path} must be an integer >= 1; got {padding!r}")
    labels = data.get("labels", [1])
    things = data.get("thing_list", labels)
    for key, value in (("labels", labels), ("thing_list", things)):
        if not isinstance(value, list) or not all(is_int(v) for v in value):
            raise VoxblockError(f"empanada: {key} in {path} must be a list of integers; got {value!r}")
    if len(labels) != 1 or list(things) != list(labels):
        raise VoxblockError(
            f"empanada: config {path} has labels {labels} and thing_list {things}; this worker "
            "segments instances of one foreground class (labels: [1], thing_list: [1])"
        )
    return ModelConfig(
        path=str(file.resolve()),
        model=str(model_path),
        mean=mean,
        std=std,
        padding_factor=int(padding),
        labels=tuple(labels),
        thing_list=tuple(things),
    )


def parse_axes(axes: str, ndim: int) -> list[str]:
    """The plane kinds of the `axes` option ("xy" or a subset of "xy,xz,yz"), checked for `ndim`."""
    names = [a.strip() for a in str(axes).split(",") if a.strip()]
    if not names or any(a not in PLANES for a in names) or len(set(names)) != len(names):
        raise VoxblockError(
            f"empanada: axes must be 'xy' or a comma-separated subset of xy, xz, yz; got {axes!r}"
        )
    if ndim == 2 and names != ["xy"]:
        raise VoxblockError(f"empanada: a 2-D input has only xy planes; got axes={axes!r}")
    return names


def check_options(options: Any) -> None:
    """The worker's numeric options (thresholds, kernel, filters, batch size), read off `options`."""
    for name in ("semantic_threshold", "link_iou", "link_ioa", "consensus_iou"):
        value = getattr(options, name)
        if not is_number(value) or not 0 <= value <= 1:
            raise VoxblockError(f"empanada: {name} must be a number in [0, 1]; got {value!r}")
    if not is_number(options.center_threshold):
        raise VoxblockError(f"empanada: center_threshold must be a number; got {options.center_threshold!r}")
    if not is_int(options.nms_kernel) or options.nms_kernel < 1 or options.nms_kernel % 2 == 0:
        raise VoxblockError(f"empanada: nms_kernel must be an odd integer >= 1; got {options.nms_kernel!r}")
    for name in ("min_size", "min_extent"):
        value = getattr(options, name)
        if not is_int(value) or value < 0:
            raise VoxblockError(f"empanada: {name} must be an integer >= 0; got {value!r}")
    if not is_int(options.batch_size) or options.batch_size < 1:
        raise VoxblockError(f"empanada: batch_size must be an integer >= 1; got {options.batch_size!r}")


def check_block(axes: str, read_shape: tuple[int, ...], config: ModelConfig) -> None:
    """Every plane of a block must be at least one padding factor wide on both axes."""
    for plane in parse_axes(axes, len(read_shape)):
        in_plane = [s for i, s in enumerate(read_shape) if len(read_shape) == 2 or i != PLANES[plane]]
        if min(in_plane) < config.padding_factor:
            raise VoxblockError(
                f"empanada: the {plane} planes of a block are {tuple(in_plane)} voxels, smaller than "
                f"the model's padding_factor {config.padding_factor}: the model would see mostly "
                f"padding. Use read blocks of at least {config.padding_factor} voxels on every "
                "axis the planes span"
            )
