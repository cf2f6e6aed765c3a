"""The empanada model: loaded once per process (TorchScript), checked, run on stacks of planes.

The contract (see the worker's docstring): float32 (N, 1, H, W) in, padded to
a multiple of `padding_factor`; out a dict with `sem_logits`, `ctr_hmp` and
`offsets`, or a tuple of those three, at full resolution.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from voxblock import VoxblockError
from voxblock_workers.empanada.config import ModelConfig
from voxblock_workers.torch_runtime import import_torch

HEADS = ("sem_logits", "ctr_hmp", "offsets")
HEAD_CHANNELS = {"sem_logits": 1, "ctr_hmp": 1, "offsets": 2}
PROBE_SIZE = 64


def round_up(value: int, factor: int) -> int:
    return -(-value // factor) * factor


def load_model(config: ModelConfig, device: str) -> Any:
    """The config's TorchScript model on `device`, in eval mode."""
    torch = import_torch("empanada")
    try:
        model = torch.jit.load(config.model, map_location=device)
    except Exception as error:
        raise VoxblockError(f"empanada: {config.model} is not a TorchScript model ({error})") from error
    model.eval()
    return model


def heads_of(output: Any, shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
    """(semantic logits, centre heatmap, offsets) from a model's output, checked against `shape`."""
    if isinstance(output, dict):
        missing = [h for h in HEADS if h not in output]
        if missing:
            raise VoxblockError(
                f"empanada: the model returned a dict with keys {sorted(output)}; it needs "
                f"{', '.join(HEADS)} (missing {', '.join(missing)})"
            )
        heads = tuple(output[h] for h in HEADS)
    elif isinstance(output, (tuple, list)) and len(output) == 3:
        heads = tuple(output)
    else:
        raise VoxblockError(
            "empanada: the model must return a dict with sem_logits, ctr_hmp and offsets, or a tuple "
            f"of those three tensors; it returned {type(output).__name__}"
        )
    n, _, h, w = shape
    for name, head in zip(HEADS, heads):
        expected = (n, HEAD_CHANNELS[name], h, w)
        found = tuple(getattr(head, "shape", ()))
        if found != expected:
            raise VoxblockError(
                f"empanada: the model's {name} head has shape {found} for an input of shape {tuple(shape)}; "
                f"it must be {expected} (full resolution, {HEAD_CHANNELS[name]} channel(s))"
            )
    return heads


def probe(model: Any, config: ModelConfig, device: str, read_shape: tuple[int, ...]) -> None:
    """Run the model once on a small zero plane: the heads must have the contract's shapes."""
    torch = import_torch("empanada")
    size = [round_up(min(s, PROBE_SIZE), config.padding_factor) for s in read_shape[-2:]]
    shape = (1, 1, *size)
    try:
        with torch.inference_mode():
            output = model(torch.zeros(shape, dtype=torch.float32, device=device))
    except Exception as error:
        raise VoxblockError(f"empanada: the model fails on an input of shape {shape}: {error}") from error
    heads_of(output, shape)


def normalized(data: np.ndarray, config: ModelConfig) -> np.ndarray:
    """0..1 (integers divided by their dtype's maximum), then (x - mean) / std, float32."""
    data = np.asarray(data)
    if data.dtype.kind in "iu":
        scaled = data.astype(np.float32) / np.float32(np.iinfo(data.dtype).max)
    else:
        scaled = data.astype(np.float32)
    return (scaled - np.float32(config.mean)) / np.float32(config.std)


def predict(
    model: Any, planes: np.ndarray, padding_factor: int, batch_size: int, device: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's heads (logits (P, H, W), heatmap (P, H, W), offsets (P, 2, H, W)) for a stack
    of normalised planes (P, H, W), `batch_size` planes per call, padded and cropped back."""
    torch = import_torch("empanada")
    count, height, width = planes.shape
    padded = np.zeros(
        (count, 1, round_up(height, padding_factor), round_up(width, padding_factor)), np.float32
    )
    padded[:, 0, :height, :width] = planes
    semantic = np.empty((count, height, width), np.float32)
    centers = np.empty((count, height, width), np.float32)
    offsets = np.empty((count, 2, height, width), np.float32)
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            batch = torch.from_numpy(padded[start : start + batch_size]).to(device)
            heads = heads_of(model(batch), tuple(batch.shape))
            sem, ctr, off = (h[..., :height, :width].float().cpu().numpy() for h in heads)
            end = start + batch.shape[0]
            semantic[start:end], centers[start:end], offsets[start:end] = sem[:, 0], ctr[:, 0], off
    return semantic, centers, offsets
