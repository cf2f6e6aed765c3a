"""A RAG stored block by block: what funlib's own class reads back equals the reduction in memory.

Real SQLite files, a real PostgreSQL server (ci/postgres.sh, a fresh database per test: the
`postgres_url` fixture of conftest.py) and real worker processes: two processes write different
blocks' partials at once, one is SIGKILLed inside its block's transaction (nothing of that block
stays) and the block is rerun. The tests taking the `store` fixture run on both backends; the
PostgreSQL-only refusals are in test_graphdb_postgresql.py. funlib keeps PostgreSQL's floats as REAL
(float32): positions and affinities read back from it are compared to float32 precision.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from funlib.geometry import Roi

from voxblock import VoxblockError
from voxblock.agglomerate import graphdb
from voxblock.agglomerate.graphdb import (
    GraphSource,
    block_done,
    finalize,
    open_funlib_graph,
    open_graph,
    partial_rows,
    write_block_partials,
)

SOURCE = GraphSource(fragments="/data/volume.zarr/fragments", offset=(40, 8, 8), voxel_size=(40, 4, 4))
SHAPE = (30, 40, 50)  # voxels
BLOCKS = 6
FRAGMENTS = 60


def block_partials(block_id: int) -> graphdb.Partials:
    """A block's random partials: some fragments (also in other blocks) and touching pairs u < v."""
    rng = np.random.default_rng(block_id)
    ids = np.sort(rng.choice(np.arange(1, FRAGMENTS + 1, dtype=np.uint64), size=25, replace=False))
    sizes = rng.integers(1, 500, size=len(ids)).astype(np.int64)
    index_sums = rng.integers(0, np.array(SHAPE), size=(len(ids), 3)) * sizes[:, None]
    pairs = {tuple(sorted(rng.choice(ids, size=2, replace=False).tolist())) for _ in range(40)}
    u, v = (np.array(side, dtype=np.uint64) for side in zip(*sorted(pairs)))
    counts = rng.integers(1, 100, size=len(u)).astype(np.int64)
    affinity_sums = rng.uniform(0, 1, size=len(u)) * counts
    return {
        "ids": ids,
        "sizes": sizes,
        "index_sums": index_sums,
        "u": u,
        "v": v,
        "affinity_sum": affinity_sums,
        "count": counts,
    }


def reduced_in_memory(block_ids: list[int]) -> tuple[dict[int, tuple], dict[tuple[int, int], tuple]]:
    """Nodes {id: (size, position)} and edges {(u, v): (count, affinity)} summed over blocks."""
    sizes: dict[int, int] = {}
    sums: dict[int, np.ndarray] = {}
    counts: dict[tuple[int, int], int] = {}
    affinity_sums: dict[tuple[int, int], float] = {}
    for block_id in block_ids:
        p = block_partials(block_id)
        for i, size, index_sum in zip(p["ids"].tolist(), p["sizes"].tolist(), p["index_sums"].tolist()):
            sizes[i] = sizes.get(i, 0) + size
            sums[i] = sums.get(i, 0) + np.array(index_sum)
        for edge in zip(p["u"].tolist(), p["v"].tolist(), p["affinity_sum"].tolist(), p["count"].tolist()):
            counts[edge[:2]] = counts.get(edge[:2], 0) + edge[3]
            affinity_sums[edge[:2]] = affinity_sums.get(edge[:2], 0.0) + edge[2]
    offset, voxel_size = np.array(SOURCE.offset), np.array(SOURCE.voxel_size)
    nodes = {i: (sizes[i], offset + voxel_size * sums[i] / sizes[i]) for i in sizes}
    edges = {e: (counts[e], affinity_sums[e] / counts[e]) for e in counts}
    return nodes, edges


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new graph database: an SQLite file path, or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return str(tmp_path / "rag.db")
    return request.getfixturevalue("postgres_url")


def float_rtol(db: graphdb.GraphDB) -> float:
    """SQLite keeps float64; funlib's PostgreSQL columns are REAL: one float32 rounding."""
    return 1e-12 if db.backend == "sqlite" else float(np.finfo(np.float32).eps)


def assert_graph_is(db: graphdb.GraphDB, block_ids: list[int]) -> None:
    """funlib's own class (SQLite's or PostgreSQL's), reading the whole ROI, gives the reduction."""
    nodes, edges = reduced_in_memory(block_ids)
    rtol = float_rtol(db)
    funlib_db = open_funlib_graph(db, mode="r")
    whole = Roi(SOURCE.offset, tuple(s * v for s, v in zip(SHAPE, SOURCE.voxel_size)))
    graph = funlib_db.read_graph(whole)
    funlib_db.close()
    assert set(graph.nodes) == set(nodes)
    for i, (size, position) in nodes.items():
        assert graph.nodes[i]["size"] == size
        np.testing.assert_allclose(graph.nodes[i]["position"], position, rtol=rtol)
    assert {tuple(sorted(e)) for e in graph.edges} == set(edges)
    for (u, v), (count, affinity) in edges.items():
        assert graph.edges[u, v]["count"] == count
        assert graph.edges[u, v]["affinity"] == pytest.approx(affinity, rel=rtol)


def write_blocks(path: str, block_ids: list[int], stall_on: int | None, marker: str) -> None:
    """A worker process: writes blocks; on `stall_on` it stops inside the transaction, rows written."""
    if stall_on is not None:
        insert = graphdb._insert_rows

        def insert_then_stall(db, cursor, table, columns, rows):
            insert(db, cursor, table, columns, rows)
            if table == "voxblock_edges" and rows[0][0] == stall_on:
                Path(marker).touch()
                time.sleep(600)

        graphdb._insert_rows = insert_then_stall
    db = open_graph(path, SOURCE, timeout_s=120)
    for block_id in block_ids:
        write_block_partials(db, block_id, block_partials(block_id))
    db.close()


def test_two_workers_one_killed_mid_transaction_then_rerun(tmp_path, store):
    path = store
    marker = tmp_path / "stalled"
    open_graph(path, SOURCE).close()  # the driver's check creates the tables before workers start

    context = multiprocessing.get_context("spawn")
    killed = context.Process(target=write_blocks, args=(path, [0, 2, 4], 4, str(marker)))
    other = context.Process(target=write_blocks, args=(path, [1, 3, 5], None, str(marker)))
    killed.start()
    other.start()
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline and killed.is_alive(), "worker never reached block 4's transaction"
        time.sleep(0.05)
    if store.startswith("postgresql://"):
        # transactions on different blocks run side by side: the other worker writes all its
        # blocks while block 4's transaction stays open (SQLite's would wait for the write lock)
        other.join(60)
        assert other.exitcode == 0 and killed.is_alive()
    os.kill(killed.pid, signal.SIGKILL)
    killed.join(30)
    other.join(120)
    assert killed.exitcode == -signal.SIGKILL
    assert other.exitcode == 0

    db = open_graph(path, SOURCE)
    assert [block_done(db, b) for b in range(BLOCKS)] == [True, True, True, True, False, True]
    assert partial_rows(db, 4) == 0  # the killed transaction left nothing
    assert partial_rows(db, 0) > 0

    write_block_partials(db, 4, block_partials(4))  # the rerun
    summary = finalize(db)
    nodes, edges = reduced_in_memory(list(range(BLOCKS)))
    assert summary == graphdb.GraphSummary(nodes=len(nodes), edges=len(edges), blocks=BLOCKS)
    assert_graph_is(db, list(range(BLOCKS)))
    db.close()


def test_rewriting_a_block_replaces_it(store):
    db = open_graph(store, SOURCE)
    for block_id in range(3):
        write_block_partials(db, block_id, block_partials(block_id))
    write_block_partials(db, 1, block_partials(7))  # another block's rows under id 1 ...
    write_block_partials(db, 1, block_partials(1))  # ... replaced by the rerun
    write_block_partials(db, 2, block_partials(2))  # same rows twice
    finalize(db)
    assert_graph_is(db, [0, 1, 2])
    assert finalize(db).blocks == 3  # finalize reruns too
    assert_graph_is(db, [0, 1, 2])
    db.close()


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "other",
    [
        GraphSource("/data/other.zarr/fragments", SOURCE.offset, SOURCE.voxel_size),
        GraphSource(SOURCE.fragments, (0, 0, 0), SOURCE.voxel_size),
        GraphSource(SOURCE.fragments, SOURCE.offset, (8, 8, 8)),
    ],
)
def test_a_database_with_another_graph_is_refused(store, other):
    db = open_graph(store, SOURCE)
    write_block_partials(db, 0, block_partials(0))
    rows = partial_rows(db, 0)
    db.close()
    with pytest.raises(VoxblockError, match="already holds another graph"):
        open_graph(store, other)
    db = open_graph(store, SOURCE)
    assert block_done(db, 0) and partial_rows(db, 0) == rows
    db.close()


@pytest.mark.bad_input
def test_a_funlib_graph_voxblock_did_not_write_is_refused(tmp_path):
    from funlib.persistence.graphs import SQLiteGraphDataBase

    node_attrs, edge_attrs = graphdb.graph_attributes(3)
    SQLiteGraphDataBase(
        tmp_path / "theirs.db", "position", mode="w", node_attrs=node_attrs, edge_attrs=edge_attrs
    ).close()
    with pytest.raises(VoxblockError, match="did not write"):
        open_graph(tmp_path / "theirs.db", SOURCE)
    assert "voxblock_graph" not in {
        name for (name,) in sqlite3.connect(tmp_path / "theirs.db").execute("SELECT name FROM sqlite_master")
    }


@pytest.mark.bad_input
def test_an_unreachable_database_is_refused(tmp_path):
    with pytest.raises(VoxblockError, match="does not exist"):
        open_graph(tmp_path / "missing" / "rag.db", SOURCE)
    (tmp_path / "text.db").write_text("not a database, just text " * 100)
    with pytest.raises(VoxblockError, match=r"text\.db"):
        open_graph(tmp_path / "text.db", SOURCE)
    with pytest.raises(VoxblockError, match="cannot be reached"):
        open_graph("postgresql://voxblock:secret@127.0.0.1:9/rag", SOURCE, timeout_s=2)


@pytest.mark.bad_input
def test_bad_partials_are_refused_before_writing(tmp_path):
    db = open_graph(tmp_path / "rag.db", SOURCE)
    partials = block_partials(0)
    with pytest.raises(VoxblockError, match="u >= v"):
        write_block_partials(db, 0, {**partials, "u": partials["v"], "v": partials["u"]})
    big = {**partials, "ids": partials["ids"] + np.uint64(2**63 - 10)}
    with pytest.raises(VoxblockError, match=r"2\*\*63"):
        write_block_partials(db, 0, big)
    with pytest.raises(VoxblockError, match="integers"):
        write_block_partials(db, 0, {**partials, "index_sums": partials["index_sums"] / 2})
    with pytest.raises(VoxblockError, match="lack"):
        write_block_partials(db, 0, {k: a for k, a in partials.items() if k != "count"})
    assert not block_done(db, 0) and partial_rows(db, 0) == 0
    db.close()
