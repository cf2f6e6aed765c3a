"""Storing a region adjacency graph (RAG) built block by block, read back with funlib's graph classes.

What funlib.persistence 0.7 (graphs/: SQLGraphDataBase, SQLiteGraphDataBase, PgSQLGraphDatabase)
does, and this module relies on:

- Creation: `mode="w"` with `node_attrs={"position": Vec(float, ndim), "size": int}` and
  `edge_attrs={"affinity": float, "count": int}` DROPS the nodes and edges tables and the meta,
  then creates them; `"r"`/`"r+"` need the meta and check given arguments against it. SQLite keeps a
  Vec as one untyped column per axis (`position_0`, ...), read back as a tuple; PostgreSQL as a
  `REAL[ndim]` array, and every `float` as REAL (float32). Node `id` and edge `u`, `v` are signed
  64-bit (INTEGER / BIGINT), so fragment ids >= 2**63 cannot be stored. The edge key is (u, v),
  written as (min, max) for an undirected graph.
- Writes: write_nodes/write_edges and bulk_write_* are INSERT OR IGNORE (SQLite) / ON CONFLICT DO
  NOTHING (PostgreSQL) on the key: when two writers write the same node or edge the first wins and
  the second is dropped silently, nothing is summed; `fail_if_exists=True` raises instead. Every call
  commits on its own, so a block's nodes and edges can't share one transaction through funlib; it
  sets no busy timeout (Python's 5 s default), and only `bulk_write_mode` turns on WAL.
- Reading: `read_graph(roi)` takes the nodes whose position lies in the ROI ([begin, end) per
  axis) and the edges whose u is one of them (v too with `fetch_on_v`); `roi=None` reads all.
- Meta: position attribute, directed, total ROI, table and endpoint names, node and edge attribute
  types, ndims: nothing says which volume a graph came from. SQLite keeps it in a JSON file next to
  the database (`<stem>-meta.json`), PostgreSQL in a `metadata` table.
- Opening on PostgreSQL: PgSQLGraphDatabase connects to the `postgres` database and runs
  `CREATE DATABASE <name>` with the name unquoted whenever it opens a graph, even one that exists
  (PostgreSQL checks the CREATEDB privilege first), and passes on host, port, user, password and
  name only. So `open_graph` refuses a role without CREATEDB, a name that is not a plain lowercase
  identifier and URL parameters (`?sslmode=...`: use libpq's PG* environment variables), before any
  block: such a run could write every block but neither finalize nor read the graph.

So the block-by-block sums live in voxblock's own tables in the same database: `voxblock_graph`
(where the graph comes from: fragments array, offset, voxel size; a database whose record differs,
or that holds funlib tables without one, is refused before any work), `voxblock_nodes` keyed by
(block, id), `voxblock_edges` keyed by (block, u, v), and `voxblock_blocks` (blocks written). A
block's partials and its done mark are one transaction that first deletes the block's rows: a killed
worker leaves nothing of its block, and a rerun replaces it. `finalize` creates funlib's tables with
funlib's own class and fills them in one SQL reduction (sums grouped by id, by (u, v)).

Concurrent SQLite writers share ONE file in WAL mode: each takes the write lock at BEGIN IMMEDIATE
(a deferred transaction that upgrades to writing can fail with SQLITE_BUSY, which the busy timeout
does not retry) and waits up to `timeout_s` for it. Writes are serialized, but a block's insert is
milliseconds against seconds of computing, and a killed writer's lock goes with its process. One
file per block was rejected: millions of small files on a cluster filesystem and a merge that reads
them all. WAL needs all writers on one host (its index is shared memory), so workers on several
machines should write to PostgreSQL, where concurrent transactions on different blocks just work.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import numpy as np

from voxblock.errors import VoxblockError

# rag.py's partials of a block: "ids" uint64 (n,), "sizes" int64 (n,), "index_sums" int64 (n, ndim)
# (global voxel indices), "u" < "v" uint64 (m,), "affinity_sum" float64 (m,), "count" int64 (m,)
Partials = Mapping[str, np.ndarray]

FORMAT = 1
MAX_ID = np.iinfo(np.int64).max
OWN_TABLES = ("voxblock_graph", "voxblock_nodes", "voxblock_edges", "voxblock_blocks")
FUNLIB_TABLES = ("nodes", "edges", "metadata")


@dataclass(frozen=True)
class GraphSource:
    """Where a RAG comes from: a database recording another source holds another graph."""

    fragments: str
    offset: tuple[int, ...]
    voxel_size: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.offset)

    def record(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True)


@dataclass
class GraphDB:
    """One process's connection to a RAG database (open one per worker process)."""

    url: str
    backend: Literal["sqlite", "postgresql"]
    connection: Any
    source: GraphSource

    def close(self) -> None:
        self.connection.close()


@dataclass(frozen=True)
class GraphSummary:
    """What `finalize` wrote."""

    nodes: int
    edges: int
    blocks: int


def open_graph(url_or_path: str | Path, source: GraphSource, timeout_s: float = 600.0) -> GraphDB:
    """Connect (a path is SQLite, `postgresql://...` PostgreSQL), create voxblock's tables or refuse.

    Refuses (VoxblockError) a database that can't be reached, records another source, or holds a
    funlib graph voxblock did not write, so a run fails before its first block.
    """
    url = str(url_or_path)
    if url.startswith(("postgresql://", "postgres://")):
        db = GraphDB(url, "postgresql", _connect_postgresql(url, timeout_s), source)
    else:
        db = GraphDB(url, "sqlite", _connect_sqlite(Path(url), timeout_s), source)
    try:
        _claim(db)
    except BaseException:
        db.close()
        raise
    return db


def _connect_sqlite(path: Path, timeout_s: float) -> sqlite3.Connection:
    """WAL so readers never block the writer; a busy timeout so writers wait for the lock."""
    if not path.parent.is_dir():
        raise VoxblockError(f"graph database {path}: folder {path.parent} does not exist")
    try:
        connection = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
        connection.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error as e:
        raise VoxblockError(f"graph database {path} cannot be opened: {e}") from None
    return connection


def _connect_postgresql(url: str, timeout_s: float) -> Any:
    _check_postgresql_url(url)
    try:
        import psycopg2
    except ImportError:
        raise VoxblockError(
            f"graph database {_without_password(url)}: PostgreSQL needs psycopg2 "
            "(pip install 'voxblock[postgresql]')"
        ) from None
    try:
        return psycopg2.connect(url, connect_timeout=max(1, int(min(timeout_s, 30))))
    except psycopg2.Error as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shown = _without_password(url)
        password = urlsplit(url).password or ""
        for secret in {password, unquote(password)} - {""}:
            if secret not in shown:  # libpq quotes a token it can't parse (a bad %-escape): masked
                message = message.replace(secret, "***")
        raise VoxblockError(f"graph database {shown} cannot be reached: {message}") from None


def _check_postgresql_url(url: str) -> None:
    """What funlib's PgSQLGraphDatabase (finalize, readers) can open: refused here, before any block.

    funlib connects with host, port, user, password and database name only (URL parameters such as
    `?sslmode=` would reach voxblock's connections but not funlib's), and writes the name into
    `CREATE DATABASE <name>` unquoted (a name needing quotes is an SQL error, or another database).
    """
    parts = urlsplit(url)
    shown = _without_password(url)
    if parts.query:
        raise VoxblockError(
            f"graph database {shown}: URL parameters ({parts.query}) are not passed on to funlib's "
            "PgSQLGraphDatabase, which finalizes and reads the graph; set them as libpq environment "
            "variables (PGSSLMODE, ...) instead"
        )
    name = unquote(parts.path.lstrip("/"))
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise VoxblockError(
            f"graph database {shown}: the database name must be lowercase letters, digits and "
            f"underscores ({name!r} is not), as funlib's PgSQLGraphDatabase writes it into SQL unquoted"
        )


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _claim(db: GraphDB) -> None:
    """Create voxblock's tables and source record, or check the ones there, under the write lock."""
    try:
        with _transaction(db, exclusive=True) as cursor:
            if db.backend == "postgresql":
                _check_createdb(db, cursor)
            tables = _tables(db, cursor)
            if "voxblock_graph" not in tables:
                foreign = sorted(tables & set(FUNLIB_TABLES))
                meta_file = _funlib_meta_file(db)
                if foreign or (meta_file is not None and meta_file.exists()):
                    raise VoxblockError(
                        f"graph database {_without_password(db.url)} already holds a graph voxblock did not "
                        f"write (tables {foreign or 'nodes/edges meta file'}): choose another database"
                    )
                _create_tables(db, cursor)
                cursor.execute(
                    f"INSERT INTO voxblock_graph (key, value) VALUES ('source', {_p(db)})",
                    (db.source.record(),),
                )
            cursor.execute("SELECT value FROM voxblock_graph WHERE key = 'source'")
            recorded = cursor.fetchone()
    except _database_errors(db) as e:
        raise VoxblockError(f"graph database {_without_password(db.url)} cannot be used: {e}") from None
    if recorded is None or json.loads(recorded[0]) != json.loads(db.source.record()):
        raise VoxblockError(
            f"graph database {_without_password(db.url)} already holds another graph: it records "
            f"{recorded[0] if recorded else 'no source'}, this run is {db.source.record()}; "
            f"choose another database"
        )


def _check_createdb(db: GraphDB, cursor: Any) -> None:
    """funlib's PgSQLGraphDatabase runs CREATE DATABASE whenever it opens a graph, even one that
    exists, and PostgreSQL checks the privilege first: a role without CREATEDB could write every
    block but neither finalize nor read the graph."""
    cursor.execute("SELECT rolcreatedb OR rolsuper, current_user FROM pg_roles WHERE rolname = current_user")
    row = cursor.fetchone()
    if row is not None and not row[0]:
        raise VoxblockError(
            f"graph database {_without_password(db.url)}: the role {row[1]} may not create databases, "
            "and funlib's PgSQLGraphDatabase, which finalizes and reads the graph, runs CREATE DATABASE "
            f"whenever it opens one; ALTER ROLE {row[1]} CREATEDB, or connect as a role that may"
        )


def _database_errors(db: GraphDB) -> tuple[type[Exception], ...]:
    """The driver's errors: what a database that can't be used raises."""
    if db.backend == "sqlite":
        return (sqlite3.Error,)
    import psycopg2

    return (psycopg2.Error,)


def _funlib_meta_file(db: GraphDB) -> Path | None:
    """funlib's SQLite meta JSON beside the database (PostgreSQL keeps it in a table)."""
    if db.backend != "sqlite":
        return None
    path = Path(db.url)
    return path.parent / f"{path.stem}-meta.json"


def _tables(db: GraphDB, cursor: Any) -> set[str]:
    if db.backend == "sqlite":
        cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        cursor.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
    return {row[0] for row in cursor.fetchall()}


def _create_tables(db: GraphDB, cursor: Any) -> None:
    integer, real = ("INTEGER", "REAL") if db.backend == "sqlite" else ("BIGINT", "DOUBLE PRECISION")
    sums = ", ".join(f"sum_{d} {integer} NOT NULL" for d in range(db.source.ndim))
    cursor.execute("CREATE TABLE voxblock_graph (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    cursor.execute(
        f"CREATE TABLE voxblock_nodes (block {integer} NOT NULL, id {integer} NOT NULL, "
        f"size {integer} NOT NULL, {sums}, PRIMARY KEY (block, id))"
    )
    cursor.execute(
        f"CREATE TABLE voxblock_edges (block {integer} NOT NULL, u {integer} NOT NULL, v {integer} NOT NULL, "
        f"affinity_sum {real} NOT NULL, count {integer} NOT NULL, PRIMARY KEY (block, u, v))"
    )
    cursor.execute(f"CREATE TABLE voxblock_blocks (block {integer} PRIMARY KEY)")


@contextlib.contextmanager
def _transaction(db: GraphDB, exclusive: bool = False) -> Iterator[Any]:
    """One all-or-nothing transaction; SQLite's holds the write lock from its start.

    `exclusive` also serializes PostgreSQL transactions (creating tables, finalizing), which
    otherwise run side by side: blocks write disjoint rows.
    """
    cursor = db.connection.cursor()
    if db.backend == "sqlite":
        cursor.execute("BEGIN IMMEDIATE")
    elif exclusive:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext('voxblock_graph'))")
    try:
        yield cursor
    except BaseException:
        db.connection.rollback()
        raise
    db.connection.commit()


def _p(db: GraphDB) -> str:
    """The driver's parameter placeholder."""
    return "?" if db.backend == "sqlite" else "%s"


def write_block_partials(db: GraphDB, block_id: int, partials: Partials) -> None:
    """Replace a block's partial sums and mark it done, in one transaction (all of it or none)."""
    missing = {"ids", "sizes", "index_sums", "u", "v", "affinity_sum", "count"} - set(partials)
    if missing:
        raise VoxblockError(f"block {block_id}: partials lack {sorted(missing)}")
    node_rows = _node_rows(block_id, partials, db.source.ndim)
    edge_rows = _edge_rows(block_id, partials)
    sums = [f"sum_{d}" for d in range(db.source.ndim)]
    with _transaction(db) as cursor:
        for table in ("voxblock_nodes", "voxblock_edges", "voxblock_blocks"):
            cursor.execute(f"DELETE FROM {table} WHERE block = {_p(db)}", (block_id,))
        cursor.execute("DELETE FROM voxblock_graph WHERE key = 'finalized'")  # funlib's tables are stale
        _insert_rows(db, cursor, "voxblock_nodes", ["block", "id", "size", *sums], node_rows)
        _insert_rows(db, cursor, "voxblock_edges", ["block", "u", "v", "affinity_sum", "count"], edge_rows)
        _insert_rows(db, cursor, "voxblock_blocks", ["block"], [(block_id,)])


def _node_rows(block_id: int, partials: Partials, ndim: int) -> list[tuple[Any, ...]]:
    """Integer index sums, so nodes merge exactly in any order of blocks."""
    ids, sizes, index_sums = (np.asarray(partials[key]) for key in ("ids", "sizes", "index_sums"))
    if index_sums.shape != (len(ids), ndim) or sizes.shape != ids.shape:
        raise VoxblockError(
            f"block {block_id}: node partials must be ids (n,), sizes (n,), index_sums (n, {ndim}), "
            f"got {ids.shape}, {sizes.shape}, {index_sums.shape}"
        )
    if len(ids) and not np.issubdtype(index_sums.dtype, np.integer):
        raise VoxblockError(f"block {block_id}: index_sums must be integers, got {index_sums.dtype}")
    _check_ids(block_id, ids)
    if len(sizes) and sizes.min() < 1:
        raise VoxblockError(f"block {block_id}: a node partial has size < 1")
    return [
        (block_id, i, s, *row)
        for i, s, row in zip(ids.tolist(), sizes.tolist(), index_sums.astype(np.int64).tolist())
    ]


def _edge_rows(block_id: int, partials: Partials) -> list[tuple[Any, ...]]:
    u, v, affinity_sums, counts = (np.asarray(partials[key]) for key in ("u", "v", "affinity_sum", "count"))
    if not (u.shape == v.shape == affinity_sums.shape == counts.shape) or u.ndim != 1:
        raise VoxblockError(f"block {block_id}: edge partials must be four arrays of one length E")
    _check_ids(block_id, u)
    _check_ids(block_id, v)
    if np.any(u >= v):
        raise VoxblockError(f"block {block_id}: an edge partial has u >= v (edges are stored with u < v)")
    if len(counts) and counts.min() < 1:
        raise VoxblockError(f"block {block_id}: an edge partial has count < 1")
    return list(
        zip(
            [block_id] * len(u),
            u.tolist(),
            v.tolist(),
            affinity_sums.astype(np.float64).tolist(),
            counts.tolist(),
        )
    )


def _check_ids(block_id: int, ids: np.ndarray) -> None:
    """funlib's id columns are signed 64-bit: refuse what they would store wrongly."""
    if len(ids) and (int(ids.max()) > MAX_ID or int(ids.min()) < 0):
        raise VoxblockError(
            f"block {block_id}: fragment ids must be in [0, 2**63), got up to {int(ids.max())}"
        )


def _insert_rows(
    db: GraphDB, cursor: Any, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]
) -> None:
    if not rows:
        return
    names = ", ".join(columns)
    if db.backend == "sqlite":
        cursor.executemany(f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))})", rows)
    else:
        from psycopg2.extras import execute_values

        execute_values(cursor, f"INSERT INTO {table} ({names}) VALUES %s", rows, page_size=10_000)


def block_done(db: GraphDB, block_id: int) -> bool:
    """Whether a block's partials are in the database (a daisy check function)."""
    cursor = db.connection.cursor()
    cursor.execute(f"SELECT 1 FROM voxblock_blocks WHERE block = {_p(db)}", (block_id,))
    found = cursor.fetchone() is not None
    if db.backend == "postgresql":
        db.connection.rollback()
    return found


def finalize(db: GraphDB) -> GraphSummary:
    """Reduce all blocks' partials into funlib's nodes and edges tables (rerunnable)."""
    funlib_db = _create_funlib_graph(db)
    funlib_db.close()
    ndim = db.source.ndim
    positions = [
        f"{float(db.source.offset[d])!r} + {float(db.source.voxel_size[d])!r} "
        f"* CAST(SUM(sum_{d}) AS DOUBLE PRECISION) / CAST(SUM(size) AS DOUBLE PRECISION)"
        for d in range(ndim)
    ]
    if db.backend == "sqlite":
        position_columns = [f"position_{d}" for d in range(ndim)]
    else:
        position_columns, positions = ["position"], [f"ARRAY[{', '.join(positions)}]"]
    with _transaction(db, exclusive=True) as cursor:
        cursor.execute("DELETE FROM nodes")
        cursor.execute("DELETE FROM edges")
        cursor.execute(
            f"INSERT INTO nodes (id, size, {', '.join(position_columns)}) "
            f"SELECT id, SUM(size), {', '.join(positions)} FROM voxblock_nodes GROUP BY id"
        )
        cursor.execute(
            "INSERT INTO edges (u, v, affinity, count) "
            "SELECT u, v, SUM(affinity_sum) / CAST(SUM(count) AS DOUBLE PRECISION), SUM(count) "
            "FROM voxblock_edges GROUP BY u, v"
        )
        summary = GraphSummary(*(_count(cursor, table) for table in ("nodes", "edges", "voxblock_blocks")))
        cursor.execute("DELETE FROM voxblock_graph WHERE key = 'finalized'")
        cursor.execute(
            f"INSERT INTO voxblock_graph (key, value) VALUES ('finalized', {_p(db)})",
            (json.dumps(asdict(summary)),),
        )
    if db.backend == "sqlite":
        db.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return summary


def finalized(db: GraphDB) -> GraphSummary | None:
    """What the last `finalize` wrote, if no block has been written since (else None)."""
    cursor = db.connection.cursor()
    cursor.execute("SELECT value FROM voxblock_graph WHERE key = 'finalized'")
    row = cursor.fetchone()
    if db.backend == "postgresql":
        db.connection.rollback()
    return GraphSummary(**json.loads(row[0])) if row else None


def check_graph(url_or_path: str | Path, source: GraphSource, build: Mapping[str, Any]) -> None:
    """Refuse, reading only (nothing created), a database `open_graph` would refuse, or one built
    from other affinities, offsets or blocks (`build`, the rag pass's record): before any pass."""
    url = str(url_or_path)
    if url.startswith(("postgresql://", "postgres://")):
        db = GraphDB(url, "postgresql", _connect_postgresql(url, 30.0), source)
    else:
        path = Path(url)
        if not path.parent.is_dir():
            raise VoxblockError(f"graph database {path}: folder {path.parent} does not exist")
        if path.exists() and not path.is_file():
            raise VoxblockError(f"graph database {path} is not a file")
        if not path.exists():
            meta_file = path.parent / f"{path.stem}-meta.json"
            if meta_file.exists():
                raise VoxblockError(
                    f"graph database {path}: {meta_file} is funlib's record of another graph; "
                    "choose another database"
                )
            return
        db = GraphDB(url, "sqlite", _connect_sqlite(path, 30.0), source)
    try:
        cursor = db.connection.cursor()
        if db.backend == "postgresql":
            _check_createdb(db, cursor)
        tables = _tables(db, cursor)
        records: dict[str, str] = {}
        if "voxblock_graph" in tables:
            cursor.execute("SELECT key, value FROM voxblock_graph WHERE key IN ('source', 'build')")
            records = dict(cursor.fetchall())
    except _database_errors(db) as e:
        raise VoxblockError(f"graph database {_without_password(url)} cannot be used: {e}") from None
    finally:
        db.close()
    shown = _without_password(url)
    if "voxblock_graph" not in tables:
        meta_file = _funlib_meta_file(db)
        foreign = sorted(tables & set(FUNLIB_TABLES))
        if foreign or (meta_file is not None and meta_file.exists()):
            raise VoxblockError(
                f"graph database {shown} already holds a graph voxblock did not write "
                f"(tables {foreign or 'nodes/edges meta file'}): choose another database"
            )
        return
    recorded = records.get("source")
    if recorded is None or json.loads(recorded) != json.loads(source.record()):
        raise VoxblockError(
            f"graph database {shown} already holds another graph: it records {recorded or 'no source'}, "
            f"this run is {source.record()}; choose another database"
        )
    built = records.get("build")
    if built is not None and json.loads(built) != json.loads(json.dumps(dict(build))):
        raise VoxblockError(
            f"graph database {shown} already holds another graph: it was built from {built}, this run is "
            f"{json.dumps(dict(build), sort_keys=True)}; choose another database"
        )


def read_graph_arrays(url_or_path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Node ids (sorted), and edges (u, v, mean affinity), of the finalized graph: for a solve.

    Refuses a database with no finalized voxblock graph, or one written to since it was finalized.
    """
    url = str(url_or_path)
    postgresql = url.startswith(("postgresql://", "postgres://"))
    if not postgresql and not Path(url).is_file():
        raise VoxblockError(f"graph database {url} does not exist: build the region graph first")
    connection = _connect_postgresql(url, 30.0) if postgresql else _connect_sqlite(Path(url), 30.0)
    db = GraphDB(url, "postgresql" if postgresql else "sqlite", connection, GraphSource("", (), ()))
    try:
        cursor = connection.cursor()
        tables = _tables(db, cursor)
        done = None
        if "voxblock_graph" in tables:
            cursor.execute("SELECT value FROM voxblock_graph WHERE key = 'finalized'")
            done = cursor.fetchone()
        if done is None or not {"nodes", "edges"} <= tables:
            raise VoxblockError(
                f"graph database {_without_password(url)} holds no finalized voxblock region graph "
                "(or blocks were written since it was finalized): build it first (voxblock agglomerate)"
            )
        cursor.execute("SELECT id FROM nodes ORDER BY id")
        nodes = np.array([row[0] for row in cursor.fetchall()], dtype=np.uint64)
        cursor.execute("SELECT u, v, affinity FROM edges")
        rows = cursor.fetchall()
    finally:
        connection.close()
    if not rows:
        empty = np.zeros(0, dtype=np.uint64)
        return nodes, empty, empty.copy(), np.zeros(0, dtype=np.float64)
    u, v, affinity = (np.array(column) for column in zip(*rows))
    return nodes, u.astype(np.uint64), v.astype(np.uint64), affinity.astype(np.float64)


def _count(cursor: Any, table: str) -> int:
    cursor.execute(f"SELECT COUNT(*) FROM {table}")
    return int(cursor.fetchone()[0])


def graph_attributes(ndim: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """funlib's node and edge attribute types of a voxblock RAG."""
    from funlib.persistence.types import Vec

    return {"position": Vec(float, ndim), "size": int}, {"affinity": float, "count": int}


def open_funlib_graph(db: GraphDB, mode: str = "r") -> Any:
    """The finalized graph through funlib's own class, as a user's code would open it."""
    node_attrs, edge_attrs = graph_attributes(db.source.ndim)
    kwargs: dict[str, Any] = {"mode": mode, "node_attrs": node_attrs, "edge_attrs": edge_attrs}
    if db.backend == "sqlite":
        from funlib.persistence.graphs import SQLiteGraphDataBase

        return SQLiteGraphDataBase(Path(db.url), "position", **kwargs)
    from funlib.persistence.graphs import PgSQLGraphDatabase

    return PgSQLGraphDatabase("position", **_postgresql_arguments(db.url), **kwargs)


def _create_funlib_graph(db: GraphDB) -> Any:
    """funlib drops and creates its nodes, edges and meta itself, so its schema is its own."""
    return open_funlib_graph(db, mode="w")


def _postgresql_arguments(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    return {
        "db_name": unquote(parts.path.lstrip("/")),
        "db_host": parts.hostname,  # none: libpq's default (a local socket), as voxblock's connections
        "db_user": unquote(parts.username) if parts.username else None,
        "db_password": unquote(parts.password) if parts.password else None,
        "db_port": parts.port,
    }


def partial_rows(db: GraphDB, block_id: int) -> int:
    """How many partial rows (nodes and edges) a block has stored: 0 for a block never committed."""
    cursor = db.connection.cursor()
    total = 0
    for table in ("voxblock_nodes", "voxblock_edges"):
        cursor.execute(f"SELECT COUNT(*) FROM {table} WHERE block = {_p(db)}", (block_id,))
        total += int(cursor.fetchone()[0])
    if db.backend == "postgresql":
        db.connection.rollback()
    return total
