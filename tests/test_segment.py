"""segment_blockwise equals the whole-volume labelling, up to a permutation of IDs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds, prepare_ds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

import voxblock
from voxblock.packfile import PackIndex
from voxblock.segment.edges import block_edges, select_edges
from voxblock.segment.ids import block_index, check_id_space, smallest_id_dtype, to_global
from voxblock.segment.solve import segment_lut
from voxblock_testing.volumes import write_array


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True if `a` and `b` are the same labelling up to a permutation that keeps 0."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    if np.any((pairs[0] == 0) != (pairs[1] == 0)):
        return False
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def whole_volume_labels(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """The reference: scipy's labelling of the whole volume (independent of cc3d)."""
    rank = {4: 1, 6: 1, 8: mask.ndim, 18: 2, 26: mask.ndim}[connectivity]
    return ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, rank))[0]


def write_volume(path: Path, data: np.ndarray, voxel: tuple[int, ...], chunks: int = 8) -> str:
    return write_array(f"{path}/v.zarr/raw", data, voxel_size=voxel, chunk_shape=(chunks,) * data.ndim)


@st.composite
def volumes(draw):
    """Blobs, thin snakes across many blocks, corner-only contacts, empty regions."""
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(5, 20 if ndim == 3 else 40)) for _ in range(ndim))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["blobs", "sparse", "snake", "empty"]))
    if kind == "blobs":
        data = ndimage.gaussian_filter(rng.random(shape), draw(st.floats(0.5, 2.0))) > 0.5
    elif kind == "sparse":
        data = rng.random(shape) > draw(st.floats(0.6, 0.95))  # corner and edge contacts
    elif kind == "snake":
        data = np.zeros(shape, dtype=bool)
        position = [int(rng.integers(0, s)) for s in shape]
        for _ in range(int(np.prod(shape)) // 2):
            data[tuple(position)] = True
            axis = int(rng.integers(0, ndim))
            position[axis] = int(np.clip(position[axis] + rng.choice([-1, 1]), 0, shape[axis] - 1))
    else:
        data = np.zeros(shape, dtype=bool)
    return data.astype(np.float32)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=volumes(),
    block=st.integers(2, 9),
    context=st.integers(1, 3),
    rank=st.integers(1, 3),
    fit=st.sampled_from(["overhang", "shrink"]),
    voxel=st.sampled_from([1, 2]),
    halo=st.sampled_from([None, True]),
    stitch=st.sampled_from(["context", "faces"]),
)
def test_threshold_label_blockwise_equals_whole_volume(
    tmp_path_factory, data, block, context, rank, fit, voxel, halo, stitch
):
    tmp = tmp_path_factory.mktemp("seg")
    ndim = data.ndim
    voxel_size = (voxel,) * ndim
    raw = write_volume(tmp, data, voxel_size, chunks=block)
    connectivity = {2: (4, 8, 8), 3: (6, 18, 26)}[ndim][rank - 1]
    world = Roi((0,) * ndim, tuple(s * voxel for s in data.shape))
    write = Roi((0,) * ndim, (block * voxel,) * ndim)
    ok = voxblock.segment_blockwise(
        "threshold-label",
        Coordinate((context * voxel,) * ndim),
        world,
        write,
        write,
        num_workers=1,
        input=raw,
        output=f"{tmp}/v.zarr/seg",
        parameters={"threshold": 0.5, "connectivity": connectivity},
        fit=fit,
        progress=False,
        serial=True,
        halo=halo,  # True: context from chunk face slabs wherever they are thinner than a chunk
        stitch=stitch,
    )
    assert ok
    result = open_ds(f"{tmp}/v.zarr/seg")[world]
    expected = whole_volume_labels(data > 0.5, connectivity)
    assert same_partition(result, expected)
    labels = np.unique(result[result > 0])
    assert list(labels) == list(range(1, len(labels) + 1))  # consecutive from 1


@pytest.mark.parametrize("stitch", ["context", "faces"])
@pytest.mark.parametrize("connectivity", [6, 26])
def test_real_scheduler_two_workers_matches_whole_volume(tmp_path, monkeypatch, connectivity, stitch):
    # small enough to run in the driver (test_small_jobs.py): here, a scheduler and worker processes
    monkeypatch.setenv("VOXBLOCK_IN_PROCESS", "0")
    rng = np.random.default_rng(7)
    data = ndimage.gaussian_filter(rng.random((30, 34, 26)), 1.5).astype(np.float32)
    data[:, 17, :] = 1.0  # a sheet crossing every block boundary in x and z
    data[5:25, 3, 3] = 1.0  # a thin rod
    data[6:10, 6:10, 6:10] = 0
    data[8, 8, 8] = data[7, 7, 7] = 1.0  # alone, in two blocks that touch only at a corner
    raw = write_volume(tmp_path, data, (1, 1, 1))
    threshold = float(np.quantile(data, 0.65))
    world = Roi((0, 0, 0), data.shape)
    write = Roi((0, 0, 0), (8, 8, 8))

    def segment() -> bool:
        return voxblock.segment_blockwise(
            "threshold-label",
            (1, 1, 1),
            world,
            write,
            write,
            num_workers=2,
            input=raw,
            output=f"{tmp_path}/v.zarr/seg",
            parameters={"threshold": threshold, "connectivity": connectivity},
            stitch=stitch,
            progress=False,
        )

    assert segment()
    result = open_ds(f"{tmp_path}/v.zarr/seg")[world]
    assert same_partition(result, whole_volume_labels(data > threshold, connectivity))
    assert (result[8, 8, 8] == result[7, 7, 7]) == (connectivity == 26)
    lut = zarr.open(f"{tmp_path}/v.zarr/seg_lut", mode="r")
    assert lut.shape[0] == 2 and lut.shape[1] > 0
    edges = zarr.open(f"{tmp_path}/v.zarr/seg_edges", mode="r")
    assert edges.shape[1] == 5 and edges.shape[0] > 0
    run_dir = tmp_path / "v.zarr.voxblock" / "seg"
    if stitch == "context":
        fragments = open_ds(f"{tmp_path}/v.zarr/seg_fragments")[world]
        assert len(np.unique(fragments)) >= len(np.unique(result))
        # fragment IDs of a volume this size fit in uint32; segment IDs are uint64 all the same
        assert fragments.dtype == np.uint32
    else:  # nothing per voxel but the segmentation: the outer layers of all 80 blocks, in packs
        assert not (tmp_path / "v.zarr" / "seg_fragments").exists()
        faces = PackIndex(run_dir / "faces", "faces")
        faces.refresh()
        assert len(faces) == 80
        # two files per worker process, not one per block
        assert 2 <= len(list((run_dir / "faces").iterdir())) <= 4
    assert result.dtype == np.uint64

    # a rerun resumes every pass and leaves the result as it is
    assert segment()
    report = json.loads((run_dir / "fragments" / "report.json").read_text())
    assert report["processed"] == 0 and report["skipped"] == report["total_blocks"]
    np.testing.assert_array_equal(open_ds(f"{tmp_path}/v.zarr/seg")[world], result)


SEGMENT_FILE = """
import numpy as np
from scipy import ndimage

default_parameters = {"threshold": 0.5}


def segment_function(input_array, block, threshold):
    data = input_array.to_ndarray(block.read_roi, fill_value=0)
    labels, _ = ndimage.label(data > threshold)
    return labels
"""


def test_dacapo_style_segment_function_file(tmp_path):
    data = (ndimage.gaussian_filter(np.random.default_rng(2).random((24, 24, 24)), 1.5) > 0.5).astype(
        np.float32
    )
    raw = write_volume(tmp_path, data, (2, 2, 2))
    function = tmp_path / "segment.py"
    function.write_text(SEGMENT_FILE)
    world = Roi((0, 0, 0), (48, 48, 48))
    write = Roi((0, 0, 0), (16, 16, 16))
    ok = voxblock.segment_blockwise(
        str(function),
        (2, 2, 2),
        world,
        write,
        write,
        num_workers=2,
        input=raw,
        output=f"{tmp_path}/v.zarr/seg",
        keep_fragments=False,
        progress=False,
    )
    assert ok
    result = open_ds(f"{tmp_path}/v.zarr/seg")[world]
    assert same_partition(result, ndimage.label(data > 0.5)[0])
    assert not (tmp_path / "v.zarr" / "seg_fragments").exists()


BAD_SHAPE = """
import numpy as np

def segment_function(input_array, block):
    return np.zeros((3, 3, 3), dtype=np.uint32)
"""

BAD_DTYPE = """
import numpy as np

def segment_function(input_array, block):
    return input_array.to_ndarray(block.read_roi, fill_value=0).astype(np.float32)
"""


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("source", "kwargs", "message"),
    [
        ("threshold-label", {"context": (0, 0, 0)}, "at least one voxel"),
        ("threshold-label", {"parameters": {"thresh": 1}}, "no parameter thresh"),
        ("threshold-label", {"merge": "most"}, "merge must be one of"),
        ("threshold-label", {"fit": "valid"}, "fit must be overhang or shrink"),
        ("threshold-label", {"stitch": "seams"}, "stitch must be one of"),
        ("threshold-label", {"stitch": "faces", "merge": "iou"}, "needs stitch='context'"),
        (SEGMENT_FILE, {"stitch": "faces"}, "may need context"),
        (BAD_SHAPE, {}, "returned shape (3, 3, 3)"),
        (BAD_DTYPE, {}, "labels must be integers"),
        ("scale", {}, "cannot segment blocks"),
    ],
)
def test_bad_segmentation_input_is_refused_before_writing(tmp_path, source, kwargs, message):
    data = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    raw = write_volume(tmp_path, data, (1, 1, 1))
    if source.startswith("\n"):
        path = tmp_path / "function.py"
        path.write_text(source)
        source = str(path)
    arguments = {"context": (1, 1, 1), **kwargs}
    context = arguments.pop("context")
    before = sorted(p.name for p in (tmp_path / "v.zarr").iterdir())
    with pytest.raises(voxblock.VoxblockError, match=message.replace("(", r"\(").replace(")", r"\)")):
        voxblock.segment_blockwise(
            source,
            context,
            Roi((0, 0, 0), (16, 16, 16)),
            Roi((0, 0, 0), (8, 8, 8)),
            Roi((0, 0, 0), (8, 8, 8)),
            num_workers=1,
            input=raw,
            output=f"{tmp_path}/v.zarr/seg",
            progress=False,
            serial=True,
            **arguments,
        )
    assert sorted(p.name for p in (tmp_path / "v.zarr").iterdir()) == before


@pytest.mark.bad_input
def test_an_output_holding_another_segmentation_is_refused(tmp_path):
    data = (np.random.default_rng(0).random((16, 16, 16)) > 0.7).astype(np.float32)
    raw = write_volume(tmp_path, data, (1, 1, 1))
    args = (
        "threshold-label",
        (1, 1, 1),
        Roi((0, 0, 0), (16, 16, 16)),
        Roi((0, 0, 0), (8, 8, 8)),
        Roi((0, 0, 0), (8, 8, 8)),
    )
    common = {
        "num_workers": 1,
        "input": raw,
        "output": f"{tmp_path}/v.zarr/seg",
        "progress": False,
        "serial": True,
    }
    assert voxblock.segment_blockwise(*args, parameters={"threshold": 0.5}, **common)
    before = open_ds(f"{tmp_path}/v.zarr/seg")._source_data[:]
    with pytest.raises(voxblock.VoxblockError, match="a different segmentation"):
        voxblock.segment_blockwise(*args, parameters={"threshold": 0.2}, **common)
    np.testing.assert_array_equal(open_ds(f"{tmp_path}/v.zarr/seg")._source_data[:], before)
    assert voxblock.segment_blockwise(*args, parameters={"threshold": 0.2}, overwrite=True, **common)
    after = open_ds(f"{tmp_path}/v.zarr/seg")._source_data[:]
    assert same_partition(after, whole_volume_labels(data > 0.2, 6))


# -- the pure pieces --------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    fragments=st.lists(st.integers(1, 60), max_size=40),
    merges=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60)), max_size=40),
)
def test_lut_is_union_find_with_consecutive_ids(fragments, merges):
    lut = segment_lut(np.array(fragments, dtype=np.uint64), np.array(merges, dtype=np.uint64).reshape(-1, 2))
    parent = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in merges:
        parent[find(a)] = find(b)
    nodes = sorted(set(fragments) | {x for pair in merges for x in pair})
    assert list(lut[0]) == nodes
    segment_of = dict(zip(lut[0].tolist(), lut[1].tolist()))
    for a in nodes:
        for b in nodes:
            assert (segment_of[a] == segment_of[b]) == (find(a) == find(b))
    assert sorted(set(segment_of.values())) == list(range(1, len(set(segment_of.values())) + 1))


def test_edges_carry_overlaps_and_thresholds_select_them():
    own = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    neighbours = np.array([[5, 5, 5, 6], [5, 5, 6, 6]])
    context = np.ones_like(own, dtype=bool)
    edges = block_edges(own, neighbours, context)
    as_dict = {(int(a), int(b)): (int(o), int(sa), int(sb)) for a, b, o, sa, sb in edges}
    assert as_dict == {(1, 5): (4, 4, 5), (2, 5): (1, 4, 5), (2, 6): (3, 4, 3)}
    assert {tuple(e) for e in select_edges(edges, "any").tolist()} == {(1, 5), (2, 5), (2, 6)}
    assert {tuple(e) for e in select_edges(edges, "overlap", 0.5).tolist()} == {(1, 5), (2, 6)}
    assert {tuple(e) for e in select_edges(edges, "iou", 0.78).tolist()} == {(1, 5)}


def test_block_ids_come_from_the_grid_position_and_never_collide():
    origin, stride, counts = Coordinate((0, 0)), Coordinate((4, 4)), (3, 2)
    seen = set()
    for i in range(3):
        for j in range(2):
            index = block_index(Roi((4 * i, 4 * j), (4, 4)), origin, stride, counts)
            ids = to_global(np.arange(0, 17).reshape(1, 17), index, 16)
            assert ids[0, 0] == 0
            assert not seen & set(ids[ids > 0].tolist())
            seen |= set(ids[ids > 0].tolist())
    with pytest.raises(ValueError, match="more than its ID range"):
        to_global(np.array([17]), 0, 16)
    with pytest.raises(voxblock.VoxblockError, match="do not fit in uint64"):
        check_id_space(2**40, 2**30)


def test_fragment_ids_take_the_smallest_unsigned_type_that_holds_them():
    largest_u32 = 2**32 - 1
    assert smallest_id_dtype(1, largest_u32) == np.uint32
    assert smallest_id_dtype(2, largest_u32 // 2 + 1) == np.uint64
    assert smallest_id_dtype(512, 66**3) == np.uint32
    ids = to_global(np.array([0, 1, 5], dtype=np.uint32), 3, 10, np.uint32)
    assert ids.dtype == np.uint32 and ids.tolist() == [0, 31, 35]
    with pytest.raises(ValueError, match="do not fit in uint32"):
        to_global(np.array([1]), 2**20, 2**12, np.uint32)


def test_smallest_unsigned_is_one_helper_for_label_dtypes():
    """voxblock.smallest_unsigned: argmax's class labels (any width) and fragment IDs (uint32 at least)."""
    assert [voxblock.smallest_unsigned(n) for n in (0, 255, 256, 2**16, 2**32)] == [
        np.uint8,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
    ]
    assert voxblock.smallest_unsigned(3, at_least=np.uint32) == np.uint32
    assert voxblock.smallest_unsigned(2**32, at_least=np.uint16) == np.uint64
    with pytest.raises(voxblock.VoxblockError, match="does not fit"):
        voxblock.smallest_unsigned(2**64)


def test_load_lut_reads_the_solves_table_and_users_tables(tmp_path):
    """voxblock.load_lut: one reader for the relabel worker and the faces relabel pass."""
    load_lut = voxblock.load_lut
    table = np.array([[7, 3, 9], [1, 2, 1]], dtype=np.uint64)
    expected = [[3, 7, 9], [2, 1, 1]]
    zarr.create_array(str(tmp_path / "v.zarr" / "lut"), data=table)
    assert load_lut(f"{tmp_path}/v.zarr/lut").tolist() == expected
    np.savez(tmp_path / "one.npz", table)  # a single array: whatever its name
    np.savez(tmp_path / "named.npz", fragment_segment_lut=table, other=np.zeros(3))
    for name in ("one.npz", "named.npz"):
        assert load_lut(str(tmp_path / name)).tolist() == expected
    solved = segment_lut(np.array([4, 2, 9], np.uint64), np.array([[2, 9]], np.uint64))
    zarr.create_array(str(tmp_path / "v.zarr" / "solved"), data=solved)
    np.testing.assert_array_equal(load_lut(f"{tmp_path}/v.zarr/solved", "segment"), solved)
    np.savez(tmp_path / "twice.npz", fragment_segment_lut=np.array([[7, 3, 7], [1, 2, 3]]))
    np.savez(tmp_path / "two.npz", a=table, b=table)
    refused = {
        "": "relabel needs a lookup table",
        str(tmp_path / "twice.npz"): "relabel: lookup table .* maps some fragment ID more than once",
        str(tmp_path / "two.npz"): "none is named 'fragment_segment_lut'",
        str(tmp_path / "none.npz"): "does not exist",
        str(tmp_path / "lut.txt"): "must be a .npz file or a zarr array",
    }
    for lut, message in refused.items():
        with pytest.raises(voxblock.VoxblockError, match=message):
            load_lut(lut)
    with pytest.raises(voxblock.VoxblockError, match=r"^segment: lookup table"):
        load_lut(str(tmp_path / "none.npz"), "segment")


def test_watershed_fragments_merge_into_whole_volume_objects(tmp_path):
    """Mutex watershed per block, merged by segment_blockwise: objects crossing blocks stay whole."""
    import mwatershed

    from voxblock_testing.volumes import affinities_from_labels

    rng = np.random.default_rng(5)
    labels = np.zeros((24, 28, 20), dtype=np.uint64)
    for index in range(1, 9):  # boxes that cross block borders, separated by background
        begin = [int(rng.integers(0, s - 6)) for s in labels.shape]
        size = [int(rng.integers(3, 9)) for _ in labels.shape]
        labels[tuple(slice(b, b + s) for b, s in zip(begin, size))] = index
    offsets = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    affs = affinities_from_labels(labels, offsets)
    array = prepare_ds(
        str(tmp_path / "v.zarr" / "affs"),
        shape=affs.shape,
        offset=(0, 0, 0),
        voxel_size=(1, 1, 1),
        chunk_shape=(3, 8, 8, 8),
        dtype=np.float32,
    )
    array._source_data[:] = affs
    world = Roi((0, 0, 0), labels.shape)
    write = Roi((0, 0, 0), (8, 8, 8))
    ok = voxblock.segment_blockwise(
        "watershed",
        (1, 1, 1),
        world,
        write,
        write,
        num_workers=2,
        input=f"{tmp_path}/v.zarr/affs",
        output=f"{tmp_path}/v.zarr/seg",
        parameters={"offsets": offsets, "bias": -0.5},
        progress=False,
    )
    assert ok
    result = open_ds(f"{tmp_path}/v.zarr/seg")[world]
    whole = mwatershed.agglom(affs.astype(np.float64) - 0.5, offsets)
    # mwatershed leaves unmerged voxels 0 or unique; compare on the objects
    foreground = labels > 0
    assert same_partition(np.where(foreground, result, 0), np.where(foreground, whole, 0))
    assert same_partition(np.where(foreground, result, 0), labels)  # one segment per object


@settings(max_examples=150, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=3).map(tuple),
    rank=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_touching_pairs_are_every_block_to_shell_contact(shape, rank, seed):
    """The pairs from faces and neighbours' facing layers equal a brute-force search of the padded volume."""
    from voxblock.segment import faces as stitching

    rank = min(rank, len(shape))
    rng = np.random.default_rng(seed)
    world = rng.integers(0, 4, tuple(s + 2 for s in shape)).astype(np.uint32) * (
        rng.random(tuple(s + 2 for s in shape)) > 0.3
    )
    inner = world[(slice(1, -1),) * len(shape)]
    # each neighbour's block, cut from the world, seen only through its faces
    neighbours = {}
    for direction in stitching.offsets(len(shape), rank):
        cut = tuple(
            slice(1, -1) if d == 0 else (slice(s + 1, s + 2) if d > 0 else slice(0, 1))
            for d, s in zip(direction, shape)
        )
        # a neighbour one voxel thick where it touches; its full extent elsewhere
        block = world[cut]
        neighbours[direction] = stitching.facing_layer(stitching.faces(block), direction)
    padded = stitching.padded_boundary(shape, stitching.faces(inner), neighbours, np.dtype(np.uint32))
    own, theirs = stitching.touching_pairs(padded, rank)
    found = set(zip(own.tolist(), theirs.tolist()))

    expected = set()
    for x in np.ndindex(*shape):
        for d in stitching.offsets(len(shape), rank):
            y = tuple(xi + 1 + di for xi, di in zip(x, d))
            if all(1 <= yi <= s for yi, s in zip(y, shape)):
                continue  # both inside the block: not a contact between blocks
            a, b = int(inner[x]), int(world[y])
            if a and b:
                expected.add((a, b))
    assert found == expected


def test_faces_round_trip_through_their_pack(tmp_path):
    from voxblock.segment import faces as stitching

    labels = np.arange(3 * 4 * 5, dtype=np.uint32).reshape(3, 4, 5)
    store = stitching.BlockFaces(tmp_path, np.dtype(np.uint32))
    store.save(0, stitching.faces(labels), labels.shape)
    # another process's view: its own index, refreshed when a block is missing
    found = stitching.BlockFaces(tmp_path, np.dtype(np.uint32)).look_up([0, 1])
    assert list(found) == [0]  # block 1 saved nothing: not done yet, or off the grid
    for got, want in zip(found[0], stitching.faces(labels)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="holds 6 values"):
        stitching.decode_faces(np.array([3, 3, 4, 5, 1, 2], np.uint32).tobytes(), np.dtype(np.uint32))


@settings(max_examples=150, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), max_size=60),
    big=st.booleans(),
)
def test_contact_edges_count_each_touching_pair(pairs, big):
    from collections import Counter

    from voxblock.segment.edges import contact_edges

    shift = 2**40 if big else 0  # IDs past 32 bits take the slower path
    own = np.array([a + shift for a, _ in pairs], dtype=np.uint64)
    theirs = np.array([b for _, b in pairs], dtype=np.uint64)
    edges = contact_edges(own, theirs)
    counted = Counter(zip(own.tolist(), theirs.tolist()))
    assert {(a, b): n for a, b, n in edges[:, :3].tolist()} == dict(counted)
    of_a = Counter(a for a, _ in counted.elements())
    of_b = Counter(b for _, b in counted.elements())
    assert [(s_a, s_b) for s_a, s_b in edges[:, 3:].tolist()] == [
        (of_a[a], of_b[b]) for a, b in edges[:, :2].tolist()
    ]


def test_a_block_labelled_again_must_have_its_first_pass_fragments():
    from voxblock.segment.passes import block_segments

    # block 0 owns IDs 1..10, block 1 IDs 11..20; block 1 had fragments 11, 12, 13
    fragments = np.array([1, 2, 11, 12, 13, 21], dtype=np.uint64)
    segments = np.array([1, 2, 1, 3, 4, 5], dtype=np.uint64)
    np.testing.assert_array_equal(block_segments(fragments, segments, 11, 3, 10), [0, 1, 3, 4])
    np.testing.assert_array_equal(block_segments(fragments, segments, 31, 0, 10), [0])  # an empty block
    for count in (2, 4):  # fewer labels than in pass 1, or more
        with pytest.raises(voxblock.VoxblockError, match="not deterministic"):
            block_segments(fragments, segments, 11, count, 10)
    with pytest.raises(voxblock.VoxblockError, match="not deterministic"):
        block_segments(fragments, segments, 41, 1, 10)  # a block with no fragments in the table
