"""Array names: "CONTAINER/DATASET", e.g. `volume.zarr/predictions/fg`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from voxblock.errors import VoxblockError

CONTAINER_SUFFIXES = (".zarr", ".n5", ".zr")


@dataclass(frozen=True)
class ArrayName:
    """A dataset inside a container: `volume.zarr/predictions/fg`."""

    container: Path
    dataset: str

    @classmethod
    def parse(cls, name: str | ArrayName) -> ArrayName:
        if isinstance(name, ArrayName):
            return name
        text = str(name).rstrip("/")
        match = re.search(r"^(.*?\.(?:zarr|n5|zr))(?:/(.*))?$", text)
        if match is None or not match.group(2):
            raise VoxblockError(
                f"array name {text!r} must be CONTAINER/DATASET with a container ending in "
                f"{', '.join(CONTAINER_SUFFIXES)}, e.g. volume.zarr/predictions/fg"
            )
        return cls(Path(match.group(1)), match.group(2).strip("/"))

    @property
    def path(self) -> Path:
        return self.container / self.dataset

    def __str__(self) -> str:
        return f"{self.container}/{self.dataset}"
