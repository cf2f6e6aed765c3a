"""segment_blockwise: one consistent segmentation of the whole volume, block by block."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from voxblock.segment.pipeline import segment_blockwise

__all__ = ["segment_blockwise"]


def __getattr__(name: str) -> Any:
    # imported on first use: the CLI reads segment.functions' help without zarr and the passes
    if name == "segment_blockwise":
        from voxblock.segment.pipeline import segment_blockwise

        return segment_blockwise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
