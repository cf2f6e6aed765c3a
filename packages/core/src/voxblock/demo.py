"""`voxblock demo`: a synthetic volume, processed blockwise and checked against memory."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from funlib.geometry import Roi

from voxblock import arrays
from voxblock.run import run_tasks
from voxblock.task import BlockwiseTask
from voxblock.workers import registered_workers


def smooth_noise(shape: tuple[int, ...], seed: int = 0, passes: int = 4) -> np.ndarray:
    """Blobby values in [0, 1]: box-filtered noise, so thresholds make objects."""
    data = np.random.default_rng(seed).random(shape, dtype=np.float32)
    for _ in range(passes):
        for axis in range(data.ndim):
            data = (np.roll(data, 1, axis) + data + np.roll(data, -1, axis)) / 3
    low, high = data.min(), data.max()
    return ((data - low) / (high - low + 1e-12)).astype(np.float32)


def run_demo(directory: Path, size: int, block_size: int, workers: int, progress: bool = True) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    container = directory / "demo.zarr"
    raw_name = f"{container}/raw"
    voxel_size = (4, 4, 4)
    shape = (size, size, size)
    raw = arrays.ArrayName.parse(raw_name)
    if not raw.path.exists():
        print(f"writing a {size}^3 float32 volume to {raw_name}")
        from funlib.persistence import prepare_ds

        volume = prepare_ds(
            str(raw.path),
            shape=shape,
            offset=(0, 0, 0),
            voxel_size=voxel_size,
            axis_names=["z", "y", "x"],
            units=["nm", "nm", "nm"],
            chunk_shape=(block_size,) * 3,
            dtype=np.float32,
        )
        volume._source_data[:] = smooth_noise(shape)
    data = arrays.read(arrays.open_input(raw_name), Roi((0, 0, 0), tuple(s * 4 for s in shape)))

    if "threshold" in registered_workers():
        worker, options, output = "threshold", {"threshold": 0.5}, f"{container}/mask"
        expected = (data > 0.5).astype(np.uint8)
    else:
        worker, options, output = "scale", {"factor": 2.0, "shift": 1.0}, f"{container}/scaled"
        expected = data * 2.0 + 1.0

    world = Roi((0, 0, 0), tuple(s * v for s, v in zip(shape, voxel_size)))
    block = Roi((0, 0, 0), tuple(block_size * v for v in voxel_size))
    task = BlockwiseTask(
        worker,
        world,
        block,
        block,
        num_workers=workers,
        max_retries=2,
        input=raw_name,
        output=output,
        **options,
    )
    print(
        f"running {worker} over {task.num_blocks} blocks of {block_size}^3 voxels "
        f"with {workers} workers -> {output}"
    )
    started = time.perf_counter()
    report = run_tasks([task], progress=progress)
    seconds = time.perf_counter() - started
    result = arrays.read(arrays.open_input(output), world)
    same = bool(np.array_equal(result, expected.astype(result.dtype)))
    voxels = float(np.prod(shape))
    print(
        f"{voxels / 1e6:.1f} Mvoxel in {seconds:.2f} s ({voxels / seconds / 1e6:.1f} Mvoxel/s); "
        f"blockwise result equals the whole-volume result: {'yes' if same else 'NO'}"
    )
    print(f"run directory (done markers, logs, report): {task.run_dir.path}")
    if worker == "threshold":
        same = segment_demo(container, raw_name, data, world, block, workers, progress) and same
    return report.succeeded and same


def segment_demo(
    container: Path, raw_name: str, data: np.ndarray, world: Roi, block: Roi, workers: int, progress: bool
) -> bool:
    """segment_blockwise (threshold + connected components) against the whole-volume labelling."""
    from scipy import ndimage

    from voxblock.segment import segment_blockwise

    output = f"{container}/cells"
    print(f"segmenting blockwise (threshold 0.5, connected components) -> {output}")
    started = time.perf_counter()
    ok = segment_blockwise(
        "threshold-label",
        (4, 4, 4),
        world,
        block,
        block,
        workers,
        input=raw_name,
        output=output,
        parameters={"threshold": 0.5, "connectivity": 6},
        progress=progress,
    )
    seconds = time.perf_counter() - started
    labels = arrays.read(arrays.open_input(output), world)
    expected, count = ndimage.label(data > 0.5)
    pairs = np.unique(np.stack([labels.ravel(), expected.ravel()]), axis=1)
    same = len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    print(
        f"{int(labels.max())} objects in {seconds:.2f} s; equal to the whole-volume labelling "
        f"({count} objects) up to a permutation of IDs: {'yes' if same else 'NO'}"
    )
    return ok and same
