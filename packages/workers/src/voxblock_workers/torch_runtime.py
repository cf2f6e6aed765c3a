"""What the torch workers (predict, empanada) share: importing torch, the device, CPU threads.

torch is an extra (`voxblock-workers[torch]`), so it is imported only when a
torch worker runs, with a clear error when it is missing.
"""

from __future__ import annotations

import os
from typing import Any

from voxblock import VoxblockError


def import_torch(worker: str) -> Any:
    try:
        import torch
    except ImportError:
        raise VoxblockError(
            f"{worker} needs PyTorch: pip install 'voxblock-workers[torch]' (or a torch build for your GPU)"
        ) from None
    return torch


def resolve_device(device: str, worker: str) -> str:
    """'auto' -> cuda when available, else cpu; anything else must be a torch device."""
    torch = import_torch(worker)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise VoxblockError(f"{worker}: unknown device {device!r}: {error}") from error
    return device


def share_cpu_threads(worker: str, num_workers: int) -> None:
    """Split the cores between the worker processes instead of each taking all of them."""
    import_torch(worker).set_num_threads(max(1, (os.cpu_count() or 1) // max(1, num_workers)))
