"""`predict`: run a PyTorch model block by block.

The model sees the block's read ROI and must return the block's write ROI:
the context of the task (read shape - write shape) is the model's input
shape minus its output shape. torch is imported only when the worker runs,
so this module imports without it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from voxblock import ArrayWorker, VoxblockError, option
from voxblock_workers.torch_runtime import import_torch, resolve_device, share_cpu_threads

if TYPE_CHECKING:
    from voxblock import Array, Blocking

NORMALIZE = ("none", "minmax", "scale")
ACTIVATIONS = ("none", "sigmoid", "softmax")
OUTPUT_DTYPES = ("float32", "uint8")


def load_model(model: str, checkpoint: str, device: str) -> Any:
    """A model on `device`, ready for inference.

    `model` is a TorchScript file (torch.jit.save), a torch.export file
    (`.pt2`, torch.export.save; exported for the block's input shape), or
    "module:callable" returning a torch.nn.Module, with `checkpoint` a
    state_dict file for it.
    """
    torch = import_torch("predict")
    if not model:
        raise VoxblockError("predict needs a model: a TorchScript file, or module:callable with checkpoint=")
    path = Path(model)
    if path.is_file():
        if checkpoint:
            raise VoxblockError("predict: checkpoint= is only for module:callable models, not model files")
        if path.suffix == ".pt2":
            try:
                exported = torch.export.load(str(path))
            except Exception as error:
                raise VoxblockError(f"predict: {path} is not a torch.export model ({error})") from error
            return exported.module().to(device)  # exported modules refuse .eval()
        try:
            loaded = torch.jit.load(str(path), map_location=device)
        except Exception as error:
            raise VoxblockError(f"predict: {path} is not a TorchScript model ({error})") from error
    elif ":" in model and not model.endswith((".pt", ".pth", ".ts")):
        module_name, _, attribute = model.partition(":")
        try:
            factory = importlib.import_module(module_name)
            for part in attribute.split("."):
                factory = getattr(factory, part)
        except (ImportError, AttributeError) as error:
            raise VoxblockError(f"predict: cannot import model {model!r}: {error}") from error
        if not callable(factory):
            raise VoxblockError(f"predict: {model!r} is not callable")
        loaded = factory()
        if checkpoint:
            if not Path(checkpoint).is_file():
                raise VoxblockError(f"predict: checkpoint {checkpoint} does not exist")
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if (
                isinstance(state, dict)
                and "model_state_dict" in state
                and isinstance(state["model_state_dict"], dict)
            ):
                state = state["model_state_dict"]
            try:
                loaded.load_state_dict(state)
            except Exception as error:
                raise VoxblockError(
                    f"predict: checkpoint {checkpoint} does not fit {model}: {error}"
                ) from error
        loaded = loaded.to(device)
    else:
        raise VoxblockError(
            f"predict: model {model!r} is neither an existing TorchScript file nor module:callable"
        )
    loaded.eval()
    return loaded


@dataclass
class Predict(ArrayWorker):
    """Apply a PyTorch model to every block: read ROI in, write ROI out."""

    name = "predict"
    fit = "overhang"  # blocks keep the model's shape; reads past the volume are 0, writes are clipped

    model: str = option(
        "", help="TorchScript file (torch.jit.save), or module:callable that builds the model"
    )
    checkpoint: str = option("", help="state_dict file for a module:callable model")
    in_shape: list = option([], help="model input shape in voxels (default: the read block)")
    out_shape: list = option(
        [], help="model output shape in voxels (default: found by running the model once)"
    )
    normalize: str = option("none", help="none, minmax (with min, max) or scale (with scale, shift)")
    min: float = option(0.0, help="minmax: this input value becomes 0")
    max: float = option(255.0, help="minmax: this input value becomes 1")
    scale: float = option(1.0, help="scale: multiply the input by this")
    shift: float = option(0.0, help="scale: then add this")
    activation: str = option("none", help="none, sigmoid or softmax (over channels)")
    dtype: str = option("float32", help="float32, or uint8 (0..1 scaled to 0..255)")
    device: str = option("auto", help="torch device; auto: cuda if available, else cpu")

    def _check_options(self) -> None:
        if self.normalize not in NORMALIZE:
            raise VoxblockError(
                f"predict: normalize must be one of {', '.join(NORMALIZE)}; got {self.normalize!r}"
            )
        if self.normalize == "minmax" and self.max == self.min:
            raise VoxblockError("predict: normalize='minmax' needs max != min")
        if self.activation not in ACTIVATIONS:
            raise VoxblockError(
                f"predict: activation must be one of {', '.join(ACTIVATIONS)}; got {self.activation!r}"
            )
        if self.dtype not in OUTPUT_DTYPES:
            raise VoxblockError(
                f"predict: dtype must be one of {', '.join(OUTPUT_DTYPES)}; got {self.dtype!r}"
            )

    def _input_channels(self, source: Array) -> int:
        if source.channel_dims > 1:
            raise VoxblockError(f"predict: input {self.input} has more than one channel axis")
        return int(source.shape[0]) if source.channel_dims else 1

    def check_input(self, source: Array) -> None:
        self._check_options()
        if np.dtype(source.dtype).kind not in "biuf":
            raise VoxblockError(f"predict: input {self.input} has dtype {source.dtype}; it must be numeric")
        self._input_channels(source)

    def check_blocking(self, blocking: Blocking, source: Array) -> None:
        """The blocks must be the model's shapes: read ROI = its input, write ROI = its output,
        centred. Loads the model once in the driver to find its output (kept for output_channels)."""
        if blocking.fit == "shrink":
            raise VoxblockError(
                "predict needs blocks of one size (the model's input shape); use fit='overhang' or 'valid'"
            )
        read_shape = blocking.read_roi.shape / source.voxel_size
        write_shape = blocking.write_roi.shape / source.voxel_size
        ndim = len(read_shape)
        for what, value in (("in_shape", self.in_shape), ("out_shape", self.out_shape)):
            if value and (len(value) != ndim or not all(isinstance(v, int) and v > 0 for v in value)):
                raise VoxblockError(f"predict: {what} must be {ndim} positive integers; got {value!r}")
        in_shape = tuple(self.in_shape) if self.in_shape else tuple(read_shape)
        device = resolve_device(self.device, "predict")
        model = load_model(self.model, self.checkpoint, device)
        channels, out_shape = self._probe(model, self._input_channels(source), in_shape, device)
        if self.out_shape and tuple(self.out_shape) != out_shape:
            raise VoxblockError(
                f"predict: out_shape={tuple(self.out_shape)} but the model returns {out_shape} "
                f"for an input of {in_shape} voxels"
            )
        context = tuple(i - o for i, o in zip(in_shape, out_shape))
        task_context = tuple(r - w for r, w in zip(read_shape, write_shape))
        if tuple(read_shape) != in_shape or context != task_context:
            raise VoxblockError(
                f"predict: the model maps {in_shape} voxels to {out_shape} (context {context}), but the "
                f"task's blocks read {tuple(read_shape)} and write {tuple(write_shape)} voxels (context "
                f"{task_context}); use read_roi of shape {in_shape} and write_roi of shape {out_shape} "
                "(times the voxel size), centered"
            )
        below, above = blocking.context
        if below != above:
            raise VoxblockError(
                f"predict: the write ROI must be centered in the read ROI (context below {tuple(below)}, "
                f"above {tuple(above)})"
            )
        self._out_channels = channels

    def output_dtype(self, source: Array) -> np.dtype:
        return np.dtype(self.dtype)

    def output_channels(self, source: Array) -> tuple[int, ...]:
        return (self._out_channels,)  # the model's, found by check_blocking

    def _probe(
        self, model: Any, in_channels: int, in_shape: tuple[int, ...], device: str
    ) -> tuple[int, tuple]:
        """Run the model once on zeros: its output channels and spatial shape."""
        torch = import_torch("predict")
        try:
            with torch.inference_mode():
                out = model(torch.zeros((1, in_channels, *in_shape), dtype=torch.float32, device=device))
        except Exception as error:
            raise VoxblockError(
                f"predict: the model fails on an input of shape {(1, in_channels, *in_shape)}: {error}"
            ) from error
        if not hasattr(out, "shape") or out.ndim != len(in_shape) + 2:
            raise VoxblockError(
                f"predict: the model must return (batch, channels, *spatial); it returned shape "
                f"{tuple(getattr(out, 'shape', ()))} for an input of {(1, in_channels, *in_shape)}"
            )
        return int(out.shape[1]), tuple(int(s) for s in out.shape[2:])

    def setup(self) -> None:
        super().setup()
        self._device = resolve_device(self.device, "predict")
        if self._device == "cpu":
            # share the cores between the worker processes instead of each taking all of them
            share_cpu_threads("predict", self.preparation.num_workers if self.preparation else 1)
        self._model = load_model(self.model, self.checkpoint, self._device)

    def normalized(self, data: np.ndarray) -> np.ndarray:
        if self.normalize == "none":
            return data.astype(np.float32, copy=False)
        data = data.astype(np.float32)  # a copy, normalised in place: no temporaries per block
        if self.normalize == "minmax":
            np.subtract(data, np.float32(self.min), out=data)
            np.divide(data, np.float32(self.max - self.min), out=data)
        elif self.normalize == "scale":
            np.multiply(data, np.float32(self.scale), out=data)
            np.add(data, np.float32(self.shift), out=data)
        return data

    def compute(self, data: np.ndarray, block: Any) -> np.ndarray:
        torch = import_torch("predict")
        data = self.normalized(data)
        if self.source.channel_dims == 0:
            data = data[np.newaxis]
        with torch.inference_mode():
            out = self._model(torch.from_numpy(np.ascontiguousarray(data[np.newaxis])).to(self._device))
            if self.activation == "sigmoid":
                out = torch.sigmoid(out)
            elif self.activation == "softmax":
                out = torch.softmax(out, dim=1)
            result = out[0].float().cpu().numpy()
        if self.dtype == "uint8":
            result = np.round(np.clip(result, 0.0, 1.0) * 255.0).astype(np.uint8)
        return result
