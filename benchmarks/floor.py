"""The I/O floor: worker processes, a plain chunk loop, no scheduler.

Each of `workers` spawned processes opens the input and output zarr arrays
once, then takes block indices from a multiprocessing pool and reads the
block, applies the operation, writes the block (downsample: reads the
factors times larger input window of each output block). Nothing else: no done
markers, no retries, no logs. Two loops: through zarr (what a hand-written
script does), and `direct`: with voxblock's own chunk I/O
(`voxblock.chunks`) and allocator setting, so that voxblock's rows compare
with a loop that moves bytes exactly as fast as its workers do.
"""

from __future__ import annotations

import multiprocessing
import time
from itertools import product

import numpy as np

_STATE: dict = {}


def op_threshold(data: np.ndarray, state: dict) -> np.ndarray:
    return (data > state["threshold"]).astype(np.uint8)


def op_argmax(data: np.ndarray, state: dict) -> np.ndarray:
    return np.argmax(data, axis=0).astype(np.uint8)


def op_relabel(data: np.ndarray, state: dict) -> np.ndarray:
    """The relabel worker's own lookup (renumber the block, look up its few hundred IDs)."""
    from voxblock_workers.relabel import relabel_block

    return relabel_block(data, state["fragments"], state["segments"])


def op_downsample(data: np.ndarray, state: dict) -> np.ndarray:
    """The downsample worker's own reduction (a pure function) over the block's input window."""
    from voxblock_workers.downsample import downsample

    return downsample(data, state["factors"], state["mode"])


def op_noop(data: np.ndarray, state: dict) -> np.ndarray:
    return data


OPS = {
    "threshold": op_threshold,
    "argmax": op_argmax,
    "relabel": op_relabel,
    "downsample": op_downsample,
    "noop": op_noop,
}


def _init(input_path: str, output_path: str, op: str, channel_dims: int, options: dict, direct: bool) -> None:
    import zarr

    _STATE["input"] = zarr.open_array(input_path, mode="r")
    _STATE["output"] = zarr.open_array(output_path, mode="r+")
    if direct:
        from voxblock.chunks import DirectChunks
        from voxblock.job import keep_freed_memory

        keep_freed_memory()
        _STATE["input"] = DirectChunks.of(_STATE["input"])
        _STATE["output"] = DirectChunks.of(_STATE["output"])
    _STATE["op"] = OPS[op]
    _STATE["channel_dims"] = channel_dims
    _STATE.update(options)
    if "lut" in options:
        with np.load(options["lut"]) as npz:
            table = npz["fragment_segment_lut"]
        order = np.argsort(table[0])
        _STATE["fragments"], _STATE["segments"] = table[0][order], table[1][order]


def _block(slices: tuple[slice, ...]) -> int:
    # `factors` (downsample): the output block's slices, the input read over factors times them
    factors = _STATE.get("factors") or (1,) * len(slices)
    reads = tuple(slice(s.start * f, s.stop * f) for s, f in zip(slices, factors))
    data = _STATE["input"][(slice(None),) * _STATE["channel_dims"] + reads]
    _STATE["output"][slices] = _STATE["op"](data, _STATE)
    return 1


def block_slices(size: int, block: int) -> list[tuple[slice, ...]]:
    starts = range(0, size, block)
    return [tuple(slice(s, min(size, s + block)) for s in start) for start in product(starts, repeat=3)]


def run(
    input_path: str,
    output_path: str,
    op: str,
    size: int,
    block: int,
    workers: int,
    channel_dims: int = 0,
    options: dict | None = None,
    direct: bool = False,
) -> float:
    """Seconds to process every block with `workers` spawned processes (pool start included).

    `size` and `block` are the output's (edge, block edge); with `options["factors"]` each
    block reads the input over factors times its output slices (downsample)."""
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with context.Pool(
        workers,
        initializer=_init,
        initargs=(input_path, output_path, op, channel_dims, options or {}, direct),
    ) as pool:
        done = sum(pool.imap_unordered(_block, block_slices(size, block), chunksize=2))
    assert done == len(block_slices(size, block))
    return time.perf_counter() - started


def forward_loop(model_path: str, inputs: list[np.ndarray], threads: int) -> float:
    """Seconds of the model's forward passes alone over `inputs` (one warm-up pass first)."""
    import torch

    torch.set_num_threads(threads)
    model = torch.jit.load(model_path)
    with torch.inference_mode():
        model(torch.from_numpy(inputs[0])[None, None])
        started = time.perf_counter()
        for x in inputs:
            model(torch.from_numpy(x)[None, None])
        return time.perf_counter() - started
