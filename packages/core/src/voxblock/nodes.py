"""What kind of zarr or N5 node a folder is: one answer for arrays, formats and task.

A folder is a zarr v3 node if it holds `zarr.json`, a zarr v2 node if it holds
`.zgroup`, `.zarray` or `.zattrs` (v2 attributes without `.zgroup`, as some
tools leave at a container's root), and an N5 node if it holds
`attributes.json`. It is a *group* only where zarr itself opens one:
`zarr.json` with node_type "group", or `.zgroup`.

New nodes (an output's groups, the output array) take the format of the
group nearest above them; where there is none (funlib writes arrays without
root metadata), the format of the arrays already in the container: zarr v2
where it holds v2 arrays and no v3 node, else zarr v3.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

Format = Literal[2, 3, "n5"]

# files that mark a directory as a zarr (v3, v2) or N5 node
NODE_METADATA = ("zarr.json", ".zgroup", ".zarray", ".zattrs", "attributes.json")
_V2 = (".zgroup", ".zarray", ".zattrs")

# how far below a container to look for the format of its arrays (arrays are not entered: chunks)
_SCAN_DEPTH = 4


def node_format(folder: str | Path) -> Format | None:
    """3, 2 or "n5" for a zarr v3, zarr v2 or N5 node (group or array), None for anything else."""
    folder = Path(folder)
    if (folder / "zarr.json").is_file():
        return 3
    if any((folder / name).is_file() for name in _V2):
        return 2
    if (folder / "attributes.json").is_file():
        return "n5"
    return None


def group_format(folder: str | Path) -> Literal[2, 3] | None:
    """3 or 2 where `folder` is a zarr group that zarr opens as one, else None."""
    folder = Path(folder)
    meta = folder / "zarr.json"
    if meta.is_file():
        try:
            node_type = json.loads(meta.read_text()).get("node_type")
        except (OSError, ValueError, AttributeError):
            return None
        return 3 if node_type == "group" else None
    return 2 if (folder / ".zgroup").is_file() else None


def _is_array(folder: Path) -> bool:
    if (folder / ".zarray").is_file():
        return True
    meta = folder / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("node_type") == "array"
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: do not walk into what may be chunks


def formats_below(container: str | Path, depth: int = _SCAN_DEPTH) -> set[Format]:
    """The node formats in `container` and the folders below it, not entering arrays (breadth first)."""
    found: set[Format] = set()
    level = [Path(container)]
    for _ in range(depth + 1):
        below = []
        for folder in level:
            kind = node_format(folder)
            if kind is not None:
                found.add(kind)
            if _is_array(folder):
                continue
            try:
                below.extend(sub for sub in folder.iterdir() if sub.is_dir())
            except OSError:
                continue
        if not below:
            break
        level = below
    return found


def container_format(name: Any) -> Literal[2, 3]:
    """The zarr format for new nodes at `name` (an ArrayName: `.container`, `.path`).

    That of the nearest zarr node above it, up to the container; where there
    is none, 2 if the container already holds zarr v2 nodes and no v3 one,
    else 3.
    """
    container = Path(name.container)
    folder = Path(name.path).parent
    while True:
        kind = node_format(folder)
        if kind in (2, 3):
            return kind  # type: ignore[return-value]
        if folder == container or folder.parent == folder or container not in folder.parents:
            break
        folder = folder.parent
    if not container.is_dir():
        return 3
    found = formats_below(container)
    return 2 if 2 in found and 3 not in found else 3


def make_groups(name: Any, zarr_format: int) -> None:
    """Make the container and every folder between it and the array `name` a zarr group, where none is."""
    import zarr

    parts = str(name.dataset).split("/")
    container = Path(name.container)
    for depth in range(len(parts)):
        folder = container.joinpath(*parts[:depth])
        if group_format(folder) is None:
            zarr.open_group(str(folder), mode="a", zarr_format=zarr_format)  # type: ignore[arg-type]


def check_output_container(name: str) -> None:
    """Refuse an output whose container exists but is not one: a file, or a directory of other things.

    zarr would turn any directory into a group and write beside what is in
    it, or fail half-way where the container path is a file. An empty
    directory is fine (nothing to mix with), and so is a container without
    root metadata whose arrays have theirs (funlib writes those).
    """
    from voxblock.errors import VoxblockError
    from voxblock.names import ArrayName

    container = ArrayName.parse(name).container
    if not container.exists():
        return
    if not container.is_dir():
        raise VoxblockError(
            f"output {name}: {container} is a file, not a zarr container; choose another output name"
        )
    if is_empty(container) or has_node_metadata(container):
        return
    raise VoxblockError(
        f"output {name}: {container} is a directory but not a zarr container (no zarr.json or .zgroup "
        "in it or in its datasets), so arrays would be mixed with what it holds; choose another output name"
    )


def is_empty(directory: Path) -> bool:
    """No entry but hidden ones (.DS_Store...)."""
    return not any(not p.name.startswith(".") for p in directory.iterdir())


def has_node_metadata(directory: Path, depth: int = 3) -> bool:
    """zarr or N5 metadata in `directory` or a subdirectory at most `depth` levels down (breadth first)."""
    level = [directory]
    for _ in range(depth + 1):
        if any(node_format(d) is not None for d in level):
            return True
        level = [s for d in level for s in d.iterdir() if s.is_dir()]
        if not level:
            return False
    return False
