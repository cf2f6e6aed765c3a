"""The blockwise RAG pass through the real scheduler, 2 worker processes and real zarr arrays.

The graph funlib's SQLiteGraphDataBase reads back equals `merge_partials` of ONE `rag_partials`
call over the whole volume (no blocks): exact sizes and counts, float-close means and positions.
A rerun runs no block; a driver SIGKILLed mid-run and rerun gives the same graph; bad inputs are
refused before any block with nothing created. The same volume built into PostgreSQL (a real server,
the `postgres_url` fixture of conftest.py) gives the SQLite build's graph, its floats rounded to
float32 (funlib's REAL columns).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from funlib.persistence.graphs import SQLiteGraphDataBase

from voxblock import VoxblockError
from voxblock.agglomerate.build import build_rag, rag_task
from voxblock.agglomerate.graphdb import GraphSource, graph_attributes, open_graph, write_block_partials
from voxblock.agglomerate.rag import merge_partials, rag_context, rag_partials
from voxblock.run import run_tasks
from voxblock_testing.volumes import affinities_from_labels, labels_data, random_labels, write_array

SHAPE = (12, 30, 33)  # voxels: no block shape below divides it (overhanging border blocks)
VOXEL_SIZE = (2, 1, 1)
OFFSET = (4, 0, 3)  # world units
OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0], [0, -3, 0], [0, 0, 7]]  # negative, long range
BLOCK = (8, 8, 10)  # world units: 4 x 8 x 10 voxels
F32_EPS = float(np.finfo(np.float32).eps)  # funlib's PostgreSQL floats are REAL (float32)


@pytest.fixture
def volume(tmp_path: Path) -> tuple[str, str]:
    """Random fragments (uint32, some background) and noisy affinities of other random labels."""
    fragments = random_labels(
        f"{tmp_path}/in.zarr/fragments",
        SHAPE,
        num_labels=60,
        cell=(2, 3, 3),
        background=0.1,
        seed=3,
        dtype="uint32",
        voxel_size=VOXEL_SIZE,
        offset=OFFSET,
        chunk_shape=(4, 8, 8),
    )
    labels = labels_data(SHAPE, num_labels=6, cell=(3, 5, 5), seed=4)
    rng = np.random.default_rng(5)
    affs = affinities_from_labels(labels, OFFSETS) * 0.7 + rng.uniform(0, 0.3, (len(OFFSETS), *SHAPE))
    affinities = write_array(
        f"{tmp_path}/in.zarr/affs",
        affs.astype(np.float32),
        voxel_size=VOXEL_SIZE,
        offset=OFFSET,
        chunk_shape=(4, 8, 8),
        channel_dims=1,
        attrs={"offsets": OFFSETS},
    )
    return fragments, affinities


def whole_volume_graph(fragments: str, affinities: str):
    """merge_partials of one rag_partials call over the whole volume, padded with 0 by the context."""
    from voxblock_testing.volumes import read_array

    frags, affs = read_array(fragments), read_array(affinities)
    context = rag_context(OFFSETS)
    pad = [(c, c) for c in context]
    write = tuple(slice(c, c + n) for c, n in zip(context, SHAPE))
    partials = rag_partials(np.pad(frags, pad), np.pad(affs, [(0, 0), *pad]), OFFSETS, write, (0, 0, 0))
    return merge_partials([partials], VOXEL_SIZE, OFFSET)


def read_graph(db: Path | str):
    """The whole graph through funlib's own class: nodes {id: (size, position)}, edges {(u, v): ...}.

    `db` is an SQLite file or a postgresql:// URL (PgSQLGraphDatabase, as a user would open it).
    """
    node_attrs, edge_attrs = graph_attributes(3)
    if str(db).startswith("postgresql://"):
        from funlib.persistence.graphs import PgSQLGraphDatabase

        url = urlsplit(str(db))
        funlib_db = PgSQLGraphDatabase(
            "position",
            db_name=url.path.lstrip("/"),
            db_host=url.hostname,
            db_user=url.username,
            db_password=url.password,
            db_port=url.port,
            mode="r",
            node_attrs=node_attrs,
            edge_attrs=edge_attrs,
        )
    else:
        funlib_db = SQLiteGraphDataBase(
            db, "position", mode="r", node_attrs=node_attrs, edge_attrs=edge_attrs
        )
    graph = funlib_db.read_graph(None)
    funlib_db.close()
    nodes = {int(i): (d["size"], np.asarray(d["position"], float)) for i, d in graph.nodes(data=True)}
    edges = {
        tuple(sorted((int(u), int(v)))): (d["count"], d["affinity"]) for u, v, d in graph.edges(data=True)
    }
    return nodes, edges


def assert_graph_equals_whole_volume(
    db: Path | str, fragments: str, affinities: str, float32: bool = False
) -> None:
    """Exact sizes, counts, ids and pairs; float64-close positions and affinities, or, with
    `float32`, close to float32 precision (funlib's REAL columns on PostgreSQL)."""
    position_rtol, affinity_rtol = (F32_EPS, F32_EPS) if float32 else (1e-12, 1e-9)
    expected_nodes, expected_edges = whole_volume_graph(fragments, affinities)
    nodes, edges = read_graph(db)
    assert sorted(nodes) == expected_nodes["id"].tolist()
    for i, size, position in zip(
        expected_nodes["id"].tolist(), expected_nodes["size"].tolist(), expected_nodes["position"]
    ):
        assert nodes[i][0] == size
        np.testing.assert_allclose(nodes[i][1], position, rtol=position_rtol)
    expected = {
        (u, v): (c, a)
        for u, v, c, a in zip(
            expected_edges["u"].tolist(),
            expected_edges["v"].tolist(),
            expected_edges["count"].tolist(),
            expected_edges["affinity"].tolist(),
        )
    }
    assert set(edges) == set(expected)
    for edge, (count, affinity) in expected.items():
        assert edges[edge][0] == count
        assert edges[edge][1] == pytest.approx(affinity, rel=affinity_rtol)


def blocks_in(db: Path) -> int:
    connection = sqlite3.connect(db, timeout=30)
    try:
        return int(connection.execute("SELECT COUNT(*) FROM voxblock_blocks").fetchone()[0])
    finally:
        connection.close()


def test_the_blockwise_graph_equals_the_whole_volume_graph_and_a_rerun_runs_nothing(tmp_path, volume):
    fragments, affinities = volume
    db = tmp_path / "rag.db"
    summary = build_rag(fragments, affinities, db, BLOCK, num_workers=2)  # offsets from the attribute
    expected_nodes, expected_edges = whole_volume_graph(fragments, affinities)
    assert len(expected_edges["u"]) > 100 and len(expected_nodes["id"]) > 50
    assert (summary.nodes, summary.edges) == (len(expected_nodes["id"]), len(expected_edges["u"]))
    assert summary.blocks == 3 * 4 * 4 == blocks_in(db)  # write blocks of (4, 8, 10) voxels over SHAPE
    assert_graph_equals_whole_volume(db, fragments, affinities)
    before = read_graph(db)

    task = rag_task(fragments, affinities, db, BLOCK, offsets=OFFSETS, num_workers=2)
    report = run_tasks([task], progress=False).tasks[0]
    assert report.succeeded and report.processed == 0 and report.skipped == summary.blocks
    assert build_rag(fragments, affinities, db, BLOCK, offsets=OFFSETS) == summary
    after = read_graph(db)
    assert after[0].keys() == before[0].keys() and after[1] == before[1]
    for i, (size, position) in before[0].items():
        assert after[0][i][0] == size and np.array_equal(after[0][i][1], position)


def test_the_graph_built_on_postgresql_is_the_sqlite_build(tmp_path, volume, postgres_url):
    """The same volume built into SQLite and PostgreSQL, 2 daisy workers each: the same graph.

    funlib keeps PostgreSQL's floats as REAL: positions and affinities are the SQLite build's
    rounded to float32 (positions exactly: both backends sum integers; affinities within one float32
    step: the sums of float64 affinities may add up in another order).
    """
    fragments, affinities = volume
    expected = build_rag(fragments, affinities, tmp_path / "rag.db", BLOCK, num_workers=2)
    summary = build_rag(fragments, affinities, postgres_url, BLOCK, num_workers=2, run_dir=tmp_path / "pg")
    assert summary == expected and summary.blocks == 3 * 4 * 4
    sqlite_nodes, sqlite_edges = read_graph(tmp_path / "rag.db")
    nodes, edges = read_graph(postgres_url)
    assert nodes.keys() == sqlite_nodes.keys() and edges.keys() == sqlite_edges.keys()
    for i, (size, position) in sqlite_nodes.items():
        assert nodes[i][0] == size
        np.testing.assert_array_equal(nodes[i][1].astype(np.float32), position.astype(np.float32))
    for edge, (count, affinity) in sqlite_edges.items():
        assert edges[edge][0] == count
        assert np.float32(edges[edge][1]) == pytest.approx(np.float32(affinity), rel=F32_EPS, abs=0)
    assert_graph_equals_whole_volume(postgres_url, fragments, affinities, float32=True)

    task = rag_task(fragments, affinities, postgres_url, BLOCK, num_workers=2, run_dir=tmp_path / "pg")
    report = run_tasks([task], progress=False).tasks[0]  # the database says every block is done
    assert report.succeeded and report.processed == 0 and report.skipped == summary.blocks


DRIVER = """
import sys
from voxblock.agglomerate.build import build_rag

fragments, affinities, db = sys.argv[1:4]
build_rag(fragments, affinities, db, (2, 3, 3), num_workers=2)
"""


def test_a_driver_killed_mid_run_then_rerun_gives_the_same_graph(tmp_path, volume):
    fragments, affinities = volume
    db = tmp_path / "rag.db"
    total = 12 * 10 * 11  # write blocks of (1, 3, 3) voxels
    process = subprocess.Popen(
        [sys.executable, "-c", DRIVER, fragments, affinities, str(db)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (db.exists() and _has_blocks(db)):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no block was written"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = blocks_in(db)
    assert 0 < done < total, f"the run was not killed mid-run ({done} of {total} blocks)"

    summary = build_rag(fragments, affinities, db, (2, 3, 3), num_workers=2)
    assert summary.blocks == total
    assert_graph_equals_whole_volume(db, fragments, affinities)


def _has_blocks(db: Path) -> bool:
    try:
        return blocks_in(db) > 0
    except sqlite3.Error:  # the tables are not there yet
        return False


def _files(root: Path) -> set[Path]:
    """Every file and folder, but SQLite's write-ahead log and its index: they come and go as
    connections open and close (the database's own bytes are compared separately)."""
    return {path for path in root.rglob("*") if not path.name.endswith(("-wal", "-shm"))}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", ["no channel axis", "offsets not channels", "signed fragments"])
def test_bad_inputs_are_refused_before_any_work(tmp_path, volume, case):
    fragments, affinities = volume
    offsets = None
    if case == "no channel axis":
        affinities = random_labels(
            f"{tmp_path}/in.zarr/flat", SHAPE, voxel_size=VOXEL_SIZE, offset=OFFSET, dtype="float32"
        )
        offsets = OFFSETS
        match = "one channel axis"
    elif case == "offsets not channels":
        offsets = OFFSETS[:-1]
        match = "5 offsets for 6 affinity channels"
    else:
        fragments = random_labels(
            f"{tmp_path}/in.zarr/signed", SHAPE, voxel_size=VOXEL_SIZE, offset=OFFSET, dtype="int64"
        )
        match = "unsigned"
    files = _files(tmp_path)
    with pytest.raises(VoxblockError, match=match):
        build_rag(fragments, affinities, tmp_path / "rag.db", BLOCK, offsets=offsets)
    assert _files(tmp_path) == files


@pytest.mark.bad_input
@pytest.mark.parametrize("other", ["source", "offsets"])
def test_a_database_holding_another_graph_is_refused(tmp_path, volume, other):
    fragments, affinities = volume
    db = tmp_path / "rag.db"
    if other == "source":
        graph = open_graph(db, GraphSource("/elsewhere.zarr/fragments", OFFSET, VOXEL_SIZE))
        partials = rag_partials(
            np.ones((3, 3, 3), np.uint64), np.zeros((1, 3, 3, 3)), [[0, 0, 0]], [slice(0, 3)] * 3, (0, 0, 0)
        )
        partials["ids"] = partials["ids"] + np.uint64(7)
        write_block_partials(graph, 0, partials)
        graph.close()
    else:  # the same fragments, built with other offsets
        build_rag(fragments, affinities, db, BLOCK, offsets=OFFSETS)
        affinities = write_array(
            f"{tmp_path}/in.zarr/affs2",
            np.zeros((1, *SHAPE), np.float32),
            voxel_size=VOXEL_SIZE,
            offset=OFFSET,
            channel_dims=1,
        )
    rows = db.read_bytes()
    files = _files(tmp_path)
    with pytest.raises(VoxblockError, match="already holds another graph"):
        build_rag(fragments, affinities, db, BLOCK, offsets=[[0, 0, 1]] if other == "offsets" else None)
    assert db.read_bytes() == rows
    assert _files(tmp_path) == files
