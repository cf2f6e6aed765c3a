"""segment_blockwise: one consistent segmentation of the whole volume, block by block."""

from voxblock.segment.pipeline import segment_blockwise

__all__ = ["segment_blockwise"]
