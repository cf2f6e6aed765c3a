"""Files written whole or not at all.

Whole files voxblock writes beside the arrays (chunk files, the run
directory's records, the pickled worker, lookup tables) go through a
temporary file in the same folder that is renamed over the target: a reader
sees the old file or the whole new one, and a worker killed mid-write leaves
at most a hidden `.NAME.PID.THREAD.partial`, which no reader's pattern
matches. Records written block by block (halo slabs, block faces and edges)
are appended to per-worker pack files instead (voxblock.packfile), so their
number of files does not grow with the blocks.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def replace_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Call `write` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        with open(tmp, "wb") as file:
            write(file)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
