"""A worker file in the style of dacapo's blockwise workers (unchanged shape)."""

import daisy
import numpy as np
from funlib.persistence import open_ds

read_write_conflict: bool = False
fit: str = "valid"
path = __file__


def start_worker_fn(input_path, output_path, threshold=0.5, return_io_loop=False):
    def io_loop():
        source = open_ds(input_path)
        target = open_ds(output_path, mode="r+")
        client = daisy.Client()
        while True:
            with client.acquire_block() as block:
                if block is None:
                    break
                target[block.write_roi] = (source[block.write_roi] > threshold).astype(np.uint8)

    if return_io_loop:
        return io_loop
    io_loop()


def spawn_worker(input_path, output_path, threshold=0.5):
    return start_worker_fn(input_path, output_path, threshold, return_io_loop=True)
