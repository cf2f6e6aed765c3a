"""Affinities -> fragments -> region graph -> segmentation, through the real scheduler.

The solves are checked against plain reference code (scipy's components, a mutex watershed
written out with union-find) on random graphs; the whole chain recovers the ground truth its
affinities were made from (noisy affinities, VOI under 0.1) for two block sizes and both methods;
a second run with another threshold only solves and relabels; fragments from elsewhere are used
as they are; the CLI gives the API's result; the graph is read back by funlib's own class.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cc3d
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.metrics import adapted_rand_error, variation_of_information

from voxblock import VoxblockError, agglomerate_blockwise, load_lut
from voxblock.agglomerate.solve import mws_lut, solve, threshold_lut
from voxblock_testing.volumes import affinities_from_labels, labels_data, write_array

OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 0], [0, 3, 0], [0, 0, 3]]
SHAPE = (24, 40, 40)


# -- the solves, against reference code ---------------------------------------------------------


@st.composite
def graphs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random node ids (sparse, large) and edges u < v with affinities from a few values (ties)."""
    n = draw(st.integers(1, 25))
    ids = np.array(sorted(draw(st.sets(st.integers(1, 2**40), min_size=n, max_size=n))), dtype=np.uint64)
    pairs = draw(st.sets(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=60))
    pairs = sorted((a, b) for a, b in pairs if a < b)
    u = ids[[a for a, _ in pairs]] if pairs else np.zeros(0, np.uint64)
    v = ids[[b for _, b in pairs]] if pairs else np.zeros(0, np.uint64)
    values = draw(
        st.lists(
            st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]), min_size=len(pairs), max_size=len(pairs)
        )
    )
    return ids, u, v, np.array(values, dtype=np.float64)


def components(ids: np.ndarray, u: np.ndarray, v: np.ndarray) -> dict[int, int]:
    rows, cols = np.searchsorted(ids, u), np.searchsorted(ids, v)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(ids),) * 2)
    _, labels = connected_components(graph, directed=False)
    return dict(zip(ids.tolist(), labels.tolist()))


def reference_mws(
    ids: np.ndarray, u: np.ndarray, v: np.ndarray, affinity: np.ndarray, threshold: float
) -> dict:
    """Mutex watershed on a graph, written out: strongest |affinity - threshold| first, ties by (u, v)."""
    parent = {int(i): int(i) for i in ids}
    mutex: dict[int, set[int]] = {int(i): set() for i in ids}

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    edges = sorted(
        zip(u.tolist(), v.tolist(), affinity.tolist()), key=lambda e: (-abs(e[2] - threshold), e[0], e[1])
    )
    for a, b, value in edges:
        ra, rb = find(a), find(b)
        if ra == rb:
            continue
        if value - threshold > 0:
            if rb in mutex[ra]:
                continue
            parent[rb] = ra
            mutex[ra] |= mutex.pop(rb)
            for other in mutex[ra]:
                mutex[other].discard(rb)
                mutex[other].add(ra)
        else:
            mutex[ra].add(rb)
            mutex[rb].add(ra)
    return {i: find(i) for i in parent}


def same_partition(lut: np.ndarray, labels: dict[int, int]) -> bool:
    """The LUT's segments are the reference's groups (a bijection between their labels)."""
    assert sorted(lut[0].tolist()) == sorted(labels)
    pairs = {(labels[int(f)], int(s)) for f, s in zip(lut[0], lut[1])}
    return len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


@settings(max_examples=150, deadline=None)
@given(graphs(), st.sampled_from([0.0, 0.2, 0.5, 0.7, 1.0]))
def test_threshold_is_the_components_of_the_edges_above_it(graph, threshold: float) -> None:
    ids, u, v, affinity = graph
    lut = threshold_lut(ids, u, v, affinity, threshold)
    above = affinity > threshold
    assert same_partition(lut, components(ids, u[above], v[above]))
    assert lut[1].min() == 1 and set(lut[1].tolist()) == set(range(1, int(lut[1].max()) + 1))


@settings(max_examples=150, deadline=None)
@given(graphs(), st.sampled_from([0.0, 0.3, 0.5, 0.8]), st.randoms(use_true_random=False))
def test_mws_is_mutex_watershed_and_ignores_edge_order(graph, threshold: float, random) -> None:
    ids, u, v, affinity = graph
    lut = mws_lut(ids, u, v, affinity, threshold)
    assert same_partition(lut, reference_mws(ids, u, v, affinity, threshold))
    order = list(range(len(u)))
    random.shuffle(order)
    shuffled = mws_lut(ids, u[order], v[order], affinity[order], threshold)
    assert np.array_equal(shuffled, lut)  # same numbering too: segments in order of their smallest fragment


def test_solve_refuses_bad_methods_and_thresholds() -> None:
    ids = np.array([1, 2], dtype=np.uint64)
    edge = (np.array([1], np.uint64), np.array([2], np.uint64), np.array([0.5]))
    for method, threshold in [("mws", 1.5), ("mws", -0.1), ("threshold", float("nan")), ("rw", 0.5)]:
        with pytest.raises(VoxblockError, match=r"threshold|method"):
            solve(ids, *edge, method, threshold)


# -- the whole chain -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """Noisy affinities of random cells, and the cells' connected pieces (what they describe)."""
    directory = tmp_path_factory.mktemp("agglomerate")
    labels = labels_data(SHAPE, num_labels=30, cell=(8, 10, 10), seed=11)
    truth = cc3d.connected_components(labels.astype(np.uint32), connectivity=6).astype(np.uint64)
    rng = np.random.default_rng(12)
    affs = affinities_from_labels(labels, OFFSETS) * 0.8 + rng.normal(0.1, 0.12, (len(OFFSETS), *SHAPE))
    write_array(
        f"{directory}/v.zarr/affs",
        np.clip(affs, 0, 1).astype(np.float32),
        voxel_size=(4, 2, 2),
        offset=(8, 0, 4),
        chunk_shape=(8, 16, 16),
        channel_dims=1,
        attrs={"offsets": OFFSETS},
    )
    return directory, truth


def scores(truth: np.ndarray, segmentation: np.ndarray) -> tuple[float, float]:
    split, merge = variation_of_information(truth, segmentation)
    return split + merge, adapted_rand_error(truth, segmentation)[0]


@pytest.mark.parametrize(("method", "block"), [("mws", (32, 32, 32)), ("threshold", (48, 40, 80))])
def test_the_chain_recovers_the_cells(volume, tmp_path: Path, method: str, block) -> None:
    directory, truth = volume
    affs = f"{directory}/v.zarr/affs"
    out = f"{tmp_path}/out.zarr"
    report = agglomerate_blockwise(
        affs, f"{out}/frags", f"{out}/seg", tmp_path / "rag.sqlite", block, method=method, progress=False
    )
    segmentation = zarr.open(f"{out}/seg", mode="r")[...]
    voi, arand = scores(truth, segmentation)
    assert voi < 0.1 and arand < 0.05, (voi, arand)
    fragments = zarr.open(f"{out}/frags", mode="r")[...]
    assert len(np.unique(fragments)) > len(np.unique(truth))  # the graph did the joining
    assert report.fragments == "made" and report.segments == len(np.unique(segmentation[segmentation > 0]))
    lut = load_lut(str(report.lut))
    assert np.array_equal(np.unique(fragments[fragments > 0]), lut[0])  # every fragment is a node
    relabelled = np.zeros_like(fragments)
    relabelled[fragments > 0] = lut[1][np.searchsorted(lut[0], fragments[fragments > 0])]
    assert np.array_equal(relabelled, segmentation)


def test_another_threshold_reuses_fragments_and_graph(volume, tmp_path: Path) -> None:
    directory, truth = volume
    affs, out, db = f"{directory}/v.zarr/affs", f"{tmp_path}/out.zarr", tmp_path / "rag.sqlite"
    first = agglomerate_blockwise(affs, f"{out}/frags", f"{out}/seg", db, (32, 32, 32), progress=False)
    graph_report = json.loads((Path(f"{db}.voxblock") / "report.json").read_text())
    assert graph_report["processed"] > 0
    frags_before = zarr.open(f"{out}/frags", mode="r")[...]
    second = agglomerate_blockwise(
        affs,
        f"{out}/frags",
        f"{out}/seg",
        db,
        (32, 32, 32),
        method="threshold",
        threshold=0.3,
        progress=False,
    )
    assert second.fragments == "resumed" and second.lut != first.lut
    for report in (Path(f"{out}.voxblock/frags/report.json"), Path(f"{db}.voxblock/report.json")):
        assert json.loads(report.read_text())["processed"] == 0, report  # nothing recomputed
    assert np.array_equal(zarr.open(f"{out}/frags", mode="r")[...], frags_before)
    assert second.graph == first.graph
    # the output was rewritten with the new table: at 0.3 more fragments join
    segmentation = zarr.open(f"{out}/seg", mode="r")[...]
    assert len(np.unique(segmentation)) <= len(np.unique(truth))
    assert zarr.open(f"{out}/seg", mode="r").attrs["voxblock_agglomerate"]["threshold"] == 0.3


def test_fragments_from_elsewhere_are_used_as_they_are(volume, tmp_path: Path) -> None:
    directory, truth = volume
    # the truth's pieces, each cut in two along y: a graph must join the halves back
    cut = truth.copy()
    cut[:, SHAPE[1] // 2 :] += np.uint64(truth.max()) * (cut[:, SHAPE[1] // 2 :] > 0)
    frags = write_array(
        f"{tmp_path}/given.zarr/frags", cut, voxel_size=(4, 2, 2), offset=(8, 0, 4), chunk_shape=(8, 16, 16)
    )
    report = agglomerate_blockwise(
        f"{directory}/v.zarr/affs",
        frags,
        f"{tmp_path}/given.zarr/seg",
        tmp_path / "rag.sqlite",
        (32, 40, 40),
        method="threshold",
        progress=False,
    )
    assert report.fragments == "given"
    assert not Path(f"{tmp_path}/given.zarr.voxblock/frags").exists()  # no fragments pass ran
    segmentation = zarr.open(f"{tmp_path}/given.zarr/seg", mode="r")[...]
    assert scores(truth, segmentation)[0] < 0.05


def test_the_graph_is_funlibs_and_the_cli_gives_the_apis_result(volume, tmp_path: Path) -> None:
    from funlib.persistence.graphs import SQLiteGraphDataBase

    from voxblock.agglomerate.graphdb import graph_attributes

    directory, _ = volume
    affs = f"{directory}/v.zarr/affs"
    report = agglomerate_blockwise(
        affs,
        f"{tmp_path}/a.zarr/frags",
        f"{tmp_path}/a.zarr/seg",
        tmp_path / "a.sqlite",
        (32, 32, 32),
        progress=False,
    )
    nodes, edges = graph_attributes(3)
    graph = SQLiteGraphDataBase(
        tmp_path / "a.sqlite", "position", mode="r", node_attrs=nodes, edge_attrs=edges
    )
    read = graph.read_graph()
    assert read.number_of_nodes() == report.graph.nodes and read.number_of_edges() == report.graph.edges
    assert all(0 <= data["affinity"] <= 1 and data["count"] >= 1 for _, _, data in read.edges(data=True))
    command = [
        sys.executable, "-m", "voxblock.cli", "agglomerate",
        "--affinities", affs, "--fragments", f"{tmp_path}/b.zarr/frags", "--output", f"{tmp_path}/b.zarr/seg",
        "--db", str(tmp_path / "b.sqlite"), "--block-size", "8,16,16", "--workers", "2", "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "segments" in done.stdout
    for name in ("frags", "seg"):
        assert np.array_equal(
            zarr.open(f"{tmp_path}/a.zarr/{name}", mode="r")[...],
            zarr.open(f"{tmp_path}/b.zarr/{name}", mode="r")[...],
        )


def test_postgresql_graph_gives_the_sqlite_result(volume, tmp_path: Path, postgres_url: str) -> None:
    """Two workers writing one PostgreSQL database concurrently: the same segmentation as SQLite."""
    directory, _ = volume
    affs = f"{directory}/v.zarr/affs"
    runs = {}
    for name, db in (("sqlite", tmp_path / "rag.sqlite"), ("postgresql", postgres_url)):
        runs[name] = agglomerate_blockwise(
            affs,
            f"{tmp_path}/{name}.zarr/frags",
            f"{tmp_path}/{name}.zarr/seg",
            db,
            (32, 32, 32),
            progress=False,
        )
    assert runs["postgresql"].graph == runs["sqlite"].graph
    assert runs["postgresql"].segments == runs["sqlite"].segments
    sqlite_seg = zarr.open(f"{tmp_path}/sqlite.zarr/seg", mode="r")[...]
    postgresql_seg = zarr.open(f"{tmp_path}/postgresql.zarr/seg", mode="r")[...]
    # fragment ids differ only by the fragments' path in the graph; the partition is the same
    assert variation_of_information(sqlite_seg, postgresql_seg) == pytest.approx((0, 0), abs=1e-12)
    recorded = zarr.open(f"{tmp_path}/postgresql.zarr/seg", mode="r").attrs["voxblock_agglomerate"]["db"]
    assert ":***@" in recorded and ":voxblock@" not in recorded  # no password kept with the output


def test_a_mask_keeps_every_segment_inside_it(volume, tmp_path: Path) -> None:
    directory, truth = volume
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[:, 4:-4, 6:] = 1  # a slab of tissue: the rest is background
    write_array(
        f"{tmp_path}/m.zarr/mask", mask, voxel_size=(4, 2, 2), offset=(8, 0, 4), chunk_shape=(8, 16, 16)
    )
    report = agglomerate_blockwise(
        f"{directory}/v.zarr/affs",
        f"{tmp_path}/m.zarr/frags",
        f"{tmp_path}/m.zarr/seg",
        tmp_path / "rag.sqlite",
        (32, 32, 32),
        mask=f"{tmp_path}/m.zarr/mask",
        progress=False,
    )
    segmentation = zarr.open(f"{tmp_path}/m.zarr/seg", mode="r")[...]
    assert not segmentation[mask == 0].any() and segmentation[mask > 0].all()
    inside = mask > 0
    split, merge = variation_of_information(truth[inside], segmentation[inside])
    assert split + merge < 0.1 and report.segments == len(np.unique(segmentation[inside]))
