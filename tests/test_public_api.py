"""The public worker API: workers use `from voxblock import ...` only, and it is enough.

The standard workers and the third-party example are parsed: none may import a
voxblock submodule. Then new workers written against the public names only (the
examples of packages/core/README.md: pointwise, with context, fragments with
block-position IDs) run through the real scheduler and equal the whole-volume
computation.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import types
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from funlib.geometry import Roi

import voxblock
from voxblock import VoxblockError
from voxblock_testing.volumes import random_raw, read_array

ROOT = Path(__file__).resolve().parents[1]
WORKER_MODULES = sorted((ROOT / "packages" / "workers" / "src" / "voxblock_workers").rglob("*.py")) + sorted(
    (ROOT / "tests" / "thirdparty").glob("*.py")
)
README = ROOT / "packages" / "core" / "README.md"
VOXEL = (2, 2, 2)
SHAPE = (24, 24, 24)
WORLD = Roi((0, 0, 0), tuple(s * v for s, v in zip(SHAPE, VOXEL)))
BLOCK = Roi((0, 0, 0), (16, 16, 16))


def private_imports(path: Path) -> list[str]:
    """Every use of voxblock other than its public names, as 'line: what'."""
    public = set(voxblock.__all__)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.startswith("voxblock.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("voxblock."):
                found.append(f"{node.lineno}: from {node.module} import ...")
            elif node.module == "voxblock":
                private = [a.name for a in node.names if a.name not in public]
                found += [f"{node.lineno}: from voxblock import {name}" for name in private]
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "voxblock"
            and node.attr not in public
        ):
            found.append(f"{node.lineno}: voxblock.{node.attr}")
    return found


@pytest.mark.parametrize("path", WORKER_MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_workers_import_voxblock_only_through_its_public_names(path):
    assert private_imports(path) == [], f"{path} uses voxblock internals"


def test_the_check_finds_private_imports(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text(
        "import voxblock\nimport voxblock.arrays\nfrom voxblock.workers import crop_to\n"
        "from voxblock import arrays, option\nx = voxblock.geometry\ny = voxblock.ArrayWorker\n"
    )
    assert private_imports(module) == [
        "2: import voxblock.arrays",
        "3: from voxblock.workers import ...",
        "4: from voxblock import arrays",
        "5: voxblock.geometry",
    ]


def test_a_worker_module_importing_the_public_names_loads_no_array_library():
    """What a worker module imports from voxblock costs a worker process no zarr or funlib."""
    code = (
        "import sys\nfrom voxblock import Array, ArrayName, ArrayWorker, Blocking, Preparation, "
        "VoxblockError, Worker, crop_to, option\n"
        "print(sorted(m for m in ('zarr', 'funlib.persistence') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_every_public_name_resolves():
    for name in voxblock.__all__:
        assert getattr(voxblock, name) is not None, name


# -- workers written against the public API only: the examples of packages/core/README.md -------


def readme_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def load_examples() -> types.ModuleType:
    """The README's example workers, as one module shipped to worker processes by value."""
    module = types.ModuleType("voxblock_readme_examples")
    sys.modules[module.__name__] = module
    for code in readme_examples():
        exec(compile(code, str(README), "exec"), module.__dict__)
    cloudpickle.register_pickle_by_value(module)
    return module


examples = load_examples()


def test_the_readme_has_one_example_per_kind_of_worker_using_public_names_only(tmp_path):
    assert [name for name in ("Clip", "Smooth", "Components", "Net") if hasattr(examples, name)] == [
        "Clip",
        "Smooth",
        "Components",
        "Net",
    ]
    for i, code in enumerate(readme_examples()):
        (tmp_path / f"example{i}.py").write_text(code)
        assert private_imports(tmp_path / f"example{i}.py") == []
    assert examples.Components.block_ids and not examples.Clip.block_ids
    assert "prepare" not in vars(examples.Net)  # hooks, not prepare


@pytest.fixture
def volume(tmp_path: Path) -> tuple[str, np.ndarray]:
    name = random_raw(f"{tmp_path}/v.zarr/raw", SHAPE, seed=3, voxel_size=VOXEL, chunk_shape=(8, 8, 8))
    return name, read_array(name)


def test_a_new_pointwise_worker_equals_the_whole_volume(volume, tmp_path):
    raw, data = volume
    worker = examples.Clip(input=raw, output=f"{tmp_path}/v.zarr/clip", low=0.25, high=0.75)
    assert voxblock.run_blockwise(worker, WORLD, BLOCK, BLOCK, 2, progress=False)
    np.testing.assert_array_equal(read_array(f"{tmp_path}/v.zarr/clip"), np.clip(data, 0.25, 0.75))


def test_a_new_worker_with_context_equals_the_whole_volume(volume, tmp_path):
    from scipy import ndimage

    raw, data = volume
    context = (4, 4, 4)  # 2 voxels: the radius of sigma 0.5
    worker = examples.Smooth(input=raw, output=f"{tmp_path}/v.zarr/smooth", sigma=0.5)
    ok = voxblock.run_blockwise(
        worker, WORLD.grow(context, context), BLOCK.grow(context, context), BLOCK, 2, progress=False
    )
    assert ok
    whole = ndimage.gaussian_filter(data.astype(np.float32), 0.5, mode="constant")
    np.testing.assert_allclose(read_array(f"{tmp_path}/v.zarr/smooth"), whole, rtol=1e-6, atol=1e-6)


def test_check_blocking_refuses_before_the_output_is_made(volume, tmp_path):
    raw, _ = volume
    worker = examples.Smooth(input=raw, output=f"{tmp_path}/v.zarr/smooth", sigma=2.0)
    with pytest.raises(VoxblockError, match="context must be at least"):
        voxblock.run_blockwise(worker, WORLD, BLOCK, BLOCK, 1, progress=False)
    assert not (tmp_path / "v.zarr" / "smooth").exists()


def test_block_ids_are_unique_across_blocks_and_come_from_the_grid(volume, tmp_path):
    from scipy import ndimage

    raw, data = volume
    worker = examples.Components(input=raw, output=f"{tmp_path}/v.zarr/labels", threshold=0.7)
    assert voxblock.run_blockwise(worker, WORLD, BLOCK, BLOCK, 2, progress=False)
    labels = read_array(f"{tmp_path}/v.zarr/labels")
    assert labels.dtype == np.uint64
    np.testing.assert_array_equal(labels > 0, data > 0.7)
    step = BLOCK.shape[0] // VOXEL[0]
    per_block = step**3  # each block owns IDs k * V + 1 .. (k + 1) * V
    seen: set[int] = set()
    for k, corner in enumerate(np.ndindex(*(-(-s // step) for s in SHAPE))):
        where = tuple(slice(c * step, (c + 1) * step) for c in corner)
        block = labels[where]
        expected, count = ndimage.label(data[where] > 0.7)
        ids = set(np.unique(block[block > 0]).tolist())
        assert len(ids) == count and not ids & seen
        assert all(k * per_block < i <= (k + 1) * per_block for i in ids)
        np.testing.assert_array_equal(block, np.where(expected > 0, expected + k * per_block, 0))
        seen |= ids
