"""Arrays named "CONTAINER/DATASET": the names voxblock's callers have always used, in one place.

What was one module is four, along its seams:

- `voxblock.names`: `ArrayName` ("CONTAINER/DATASET"), `CONTAINER_SUFFIXES`
- `voxblock.metadata`: opening arrays (`open_array`, `open_input`, `open_output`) as `ZarrArray`,
  funlib.persistence's metadata read without dask; the shape questions about an array
- `voxblock.blockio`: block reads and writes (`read`, `write`, `BlockIOError`), and the read
  strategy an array may carry (`BlockIO`: a voxblock.halo.Halo)
- `voxblock.outputs`: `OutputSpec`, checking and creating outputs, their provenance

`from voxblock import arrays` and `arrays.NAME` keep working for all of them (workers, segment,
the CLI and the tests use them so); new code may import from the module that holds a name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from voxblock.blockio import BlockIO, BlockIOError, read, write
from voxblock.chunks import chunk_io
from voxblock.metadata import (
    ZarrArray,
    channel_shape,
    is_sharded,
    open_array,
    open_input,
    open_output,
    spatial_chunk_shape,
    spatial_write_unit,
)
from voxblock.names import CONTAINER_SUFFIXES, ArrayName
from voxblock.nodes import container_format, make_groups
from voxblock.outputs import (
    PROVENANCE_KEY,
    OutputSpec,
    check_output,
    create_output,
    no_chunk_written,
    record_provenance,
)

if TYPE_CHECKING:
    from voxblock.metadata import Array as Array

__all__ = [
    "CONTAINER_SUFFIXES",
    "PROVENANCE_KEY",
    "ArrayName",
    "BlockIO",
    "BlockIOError",
    "OutputSpec",
    "ZarrArray",
    "channel_shape",
    "check_output",
    "chunk_io",
    "container_format",
    "create_output",
    "is_sharded",
    "make_groups",
    "no_chunk_written",
    "open_array",
    "open_input",
    "open_output",
    "read",
    "record_provenance",
    "spatial_chunk_shape",
    "spatial_write_unit",
    "write",
]
