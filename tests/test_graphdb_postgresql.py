"""Graph databases on PostgreSQL: what is refused before any block, on a real server.

The server is started by ci/postgres.sh (the `postgres_server` fixture of conftest.py; skipped where
it cannot start, failed under CI=true); each test has a fresh database of its own (`postgres_url`).
What PostgreSQL shares with SQLite (partials of several blocks, a block rewritten, two worker
processes, one SIGKILLed in its transaction, another graph refused) is tested on both backends in
test_graphdb.py, the blockwise pass with daisy workers in test_rag_build.py.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from funlib.persistence.graphs import PgSQLGraphDatabase

from voxblock import VoxblockError
from voxblock.agglomerate import graphdb
from voxblock.agglomerate.graphdb import open_graph

SOURCE = graphdb.GraphSource(fragments="/data/volume.zarr/fragments", offset=(0, 0, 0), voxel_size=(8, 4, 4))
PASSWORD = "voxblock"  # ci/postgres.sh's test roles'


def tables(url: str) -> set[str]:
    connection = psycopg2.connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
            return {name for (name,) in cursor.fetchall()}
    finally:
        connection.close()


def with_parts(url: str, **parts: str) -> str:
    """The URL with another netloc, path or query."""
    return urlunsplit(urlsplit(url)._replace(**parts))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.bad_input
def test_a_funlib_graph_voxblock_did_not_write_is_refused(postgres_url):
    url = urlsplit(postgres_url)
    node_attrs, edge_attrs = graphdb.graph_attributes(3)
    PgSQLGraphDatabase(
        "position",
        db_name=url.path.lstrip("/"),
        db_host=url.hostname,
        db_user=url.username,
        db_password=url.password,
        db_port=url.port,
        mode="w",
        node_attrs=node_attrs,
        edge_attrs=edge_attrs,
    ).close()
    before = tables(postgres_url)
    assert {"nodes", "edges", "metadata"} <= before
    with pytest.raises(VoxblockError, match="did not write"):
        open_graph(postgres_url, SOURCE)
    assert tables(postgres_url) == before  # no voxblock table was created


@pytest.mark.bad_input
def test_an_unreachable_server_or_a_wrong_password_is_refused_without_the_password(postgres_url):
    """Refused with the URL (password masked) and the driver's reason; the password never shown."""
    parts = urlsplit(postgres_url)
    user, server, closed = parts.username, f"{parts.hostname}:{parts.port}", free_port()
    secret = "pw-Never-Shown"
    cases = {
        "closed port": (f"{user}:{secret}@127.0.0.1:{closed}", f"port {closed} failed"),
        "wrong password": (f"{user}:{secret}@{server}", "password authentication failed"),
        # libpq quotes the token it cannot parse: the password itself
        "bad %-escape": (f"{user}:%zz{secret}@{server}", "invalid percent-encoded token"),
    }
    for what, (netloc, reason) in cases.items():
        url = with_parts(postgres_url, netloc=netloc)
        with pytest.raises(VoxblockError, match="cannot be reached") as refused:
            open_graph(url, SOURCE, timeout_s=5)
        message = str(refused.value)
        assert reason in message, what
        assert secret not in message and ":***@" in message, what
    missing = with_parts(postgres_url, path="/voxblock_no_such_database")
    with pytest.raises(VoxblockError, match='database "voxblock_no_such_database" does not exist') as refused:
        open_graph(missing, SOURCE, timeout_s=5)
    assert f":{PASSWORD}@" not in str(refused.value)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("path", "query", "match"),
    [
        ("/rag-1", "", "lowercase letters, digits and underscores"),
        ("/Rag", "", "lowercase letters, digits and underscores"),
        ("", "", "lowercase letters, digits and underscores"),
        (None, "sslmode=disable", "URL parameters"),
    ],
)
def test_a_url_funlib_cannot_open_is_refused_before_connecting(postgres_url, path, query, match):
    """funlib's PgSQLGraphDatabase (finalize, readers) writes the name into SQL unquoted and takes
    no URL parameters: a run that could write every block but not finalize is refused at once."""
    url = with_parts(postgres_url, query=query, **({} if path is None else {"path": path}))
    with pytest.raises(VoxblockError, match=match) as refused:
        open_graph(url, SOURCE, timeout_s=5)
    assert f":{PASSWORD}@" not in str(refused.value)
    assert tables(postgres_url) == set()


@pytest.mark.bad_input
def test_a_role_that_may_not_create_databases_is_refused(postgres_url):
    """funlib runs CREATE DATABASE whenever it opens a graph: without CREATEDB, no finalize."""
    parts = urlsplit(postgres_url)
    netloc = f"{parts.username}_nocreatedb:{PASSWORD}@{parts.hostname}:{parts.port}"
    with pytest.raises(VoxblockError, match=f"the role {parts.username}_nocreatedb may not create databases"):
        open_graph(with_parts(postgres_url, netloc=netloc), SOURCE)
    assert tables(postgres_url) == set()
    open_graph(postgres_url, SOURCE).close()  # the test role, which may
    assert {"voxblock_graph", "voxblock_nodes", "voxblock_edges", "voxblock_blocks"} == tables(postgres_url)
