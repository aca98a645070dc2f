"""The example controllers' state: deployments and their instances, in SQLite or PostgreSQL.

Data flow: ``open_store(url)`` returns one ``Store`` per process and URL (the pool builds
controllers in every worker, each calls it in ``setup()``); reconcile threads borrow a
connection from its small pool for each statement. Rows come back as frozen dataclasses.

Every write is optimistic: ``update(row, ...)`` and ``delete(row)`` match on the
``version`` the caller read and bump it, so a writer holding a stale row gets
``Conflict`` instead of overwriting a newer one (a reconcile that raises it is retried
by the pool, reads again, and decides again). ``insert`` raises ``Conflict`` when the key
exists. The same SQL runs on both backends (``?`` placeholders, rewritten for psycopg).

URLs: ``sqlite:///abs/path.db`` or ``sqlite://relative.db`` (WAL, busy timeout: several
processes share it), ``postgresql://user@host:port/db`` (needs ``ctlpool[postgres]``).
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator, Sequence, TypeVar

ENV_STORE = "CTLPOOL_STORE"
DEFAULT_URL = "sqlite://ctlpool-demo.db"  # in the working directory, like any SQLite default

BUSY_TIMEOUT_S = 30.0  # SQLite writers queue on one lock; a worker's 64 threads may wait a while
POOL_SIZE = 8  # connections per process: PostgreSQL allows 100 by default, a host runs a few workers

PENDING, READY, TERMINATING = "pending", "ready", "terminating"
PROGRESSING, AVAILABLE = "Progressing", "Available"


class Conflict(Exception):
    """The row changed (or appeared, or vanished) since it was read; read it again."""


@dataclass(frozen=True, slots=True)
class Deployment:
    """Desired spec (``image``, ``replicas``; the user's) and rolled-up status (the controller's)."""

    name: str
    image: str
    replicas: int
    generation: int = 1
    """Bumped by every spec change; status describes ``observed_generation``."""
    observed_generation: int = 0
    instances: int = 0
    """Instance rows that exist, terminating ones included."""
    ready: int = 0
    """Instances ready at the desired image."""
    status: str = PROGRESSING
    version: int = 1
    updated_at: float = 0.0

    @property
    def converged(self) -> bool:
        return self.status == AVAILABLE and self.observed_generation == self.generation


@dataclass(frozen=True, slots=True)
class Instance:
    """One replica, ``<deployment>-<ordinal>``: what should run (``image``) and what does (``running``)."""

    key: str
    deployment: str
    ordinal: int
    image: str
    state: str = PENDING
    """pending (provision ``image``), ready (``running == image``), terminating (deprovision, delete)."""
    running: str | None = None
    attempts: int = 0
    """Provider failures since the instance was last asked to change."""
    version: int = 1
    updated_at: float = 0.0


Row = TypeVar("Row", Deployment, Instance)
_TABLES: dict[type, tuple[str, str]] = {Deployment: ("deployments", "name"), Instance: ("instances", "key")}

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS deployments (
        name TEXT PRIMARY KEY, image TEXT NOT NULL, replicas INTEGER NOT NULL,
        generation INTEGER NOT NULL, observed_generation INTEGER NOT NULL,
        instances INTEGER NOT NULL, ready INTEGER NOT NULL, status TEXT NOT NULL,
        version INTEGER NOT NULL, updated_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS instances (
        key TEXT PRIMARY KEY, deployment TEXT NOT NULL, ordinal INTEGER NOT NULL,
        image TEXT NOT NULL, state TEXT NOT NULL, running TEXT, attempts INTEGER NOT NULL,
        version INTEGER NOT NULL, updated_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS instances_by_deployment ON instances (deployment)",
)


class _Backend:
    """A driver: how to connect, how to run one statement, how to create the schema safely."""

    integrity_error: type[Exception] = Exception

    def connect(self) -> Any:
        raise NotImplementedError

    def execute(self, conn: Any, sql: str, params: Sequence[Any]) -> Any:
        return conn.execute(sql, params)

    def usable(self, conn: Any) -> bool:
        return True

    def create_schema(self, conn: Any) -> None:
        raise NotImplementedError


class _Sqlite(_Backend):
    integrity_error = sqlite3.IntegrityError

    def __init__(self, path: str) -> None:
        self.path = path

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, across processes
        conn.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints; WAL keeps it consistent
        return conn

    def create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in SCHEMA:
                conn.execute(stmt)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


class _Postgres(_Backend):
    SCHEMA_LOCK = 0x6374_6C70  # "ctlp": concurrent CREATE ... IF NOT EXISTS can still collide in PostgreSQL

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise RuntimeError("a postgresql:// store needs psycopg: pip install 'ctlpool[postgres]'") from None
        self.psycopg = psycopg
        self.integrity_error = psycopg.IntegrityError
        self.url = url

    def connect(self) -> Any:
        return self.psycopg.connect(self.url, autocommit=True)

    def execute(self, conn: Any, sql: str, params: Sequence[Any]) -> Any:
        return conn.execute(sql.replace("?", "%s"), params)

    def usable(self, conn: Any) -> bool:
        return not conn.closed and not conn.broken

    def create_schema(self, conn: Any) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.SCHEMA_LOCK,))
            for stmt in SCHEMA:
                conn.execute(stmt)


def _backend(url: str) -> _Backend:
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path:
            raise ValueError(f"store URL {url!r}: no file path (sqlite:///abs/path.db)")
        return _Sqlite(path)
    if url.startswith(("postgresql://", "postgres://")):
        return _Postgres(url)
    raise ValueError(f"store URL {url!r}: expected sqlite:///path.db or postgresql://user@host:port/db")


class Store:
    """Rows of deployments and instances with version-checked writes; safe to share between threads."""

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._backend = _backend(url)
        self.clock = clock
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        with self._conn() as conn:
            self._backend.create_schema(conn)

    @contextmanager
    def _conn(self) -> Iterator[Any]:
        with self._slots:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._backend.connect()
            try:
                yield conn
            except BaseException:
                if not self._backend.usable(conn):
                    conn.close()
                    raise
                self._idle.put(conn)
                raise
            self._idle.put(conn)

    def _run(self, sql: str, params: Sequence[Any] = ()) -> tuple[int, list[tuple[Any, ...]]]:
        """One statement in its own transaction: (rows affected, rows returned)."""
        with self._conn() as conn:
            cur = self._backend.execute(conn, sql, params)
            rows = cur.fetchall() if cur.description is not None else []
            return cur.rowcount, rows

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    # ---------------------------------------------------------------- reads

    def get(self, cls: type[Row], pk: str) -> Row | None:
        table, pk_col = _TABLES[cls]
        _, rows = self._run(f"SELECT {_columns(cls)} FROM {table} WHERE {pk_col} = ?", (pk,))
        return cls(*rows[0]) if rows else None

    def deployments(self) -> list[Deployment]:
        _, rows = self._run(f"SELECT {_columns(Deployment)} FROM deployments ORDER BY name")
        return [Deployment(*r) for r in rows]

    def instances(self, deployment: str | None = None) -> list[Instance]:
        """Instances of one deployment (by ordinal), or all of them."""
        if deployment is None:
            _, rows = self._run(f"SELECT {_columns(Instance)} FROM instances ORDER BY deployment, ordinal")
        else:
            _, rows = self._run(f"SELECT {_columns(Instance)} FROM instances WHERE deployment = ? ORDER BY ordinal",
                                (deployment,))
        return [Instance(*r) for r in rows]

    # ---------------------------------------------------------------- version-checked writes

    def insert(self, row: Row) -> Row:
        """Create ``row`` at version 1; ``Conflict`` if its key exists."""
        table, pk_col = _TABLES[type(row)]
        row = replace(row, version=1, updated_at=self.clock())
        names = [f.name for f in fields(row)]
        sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        try:
            self._run(sql, [getattr(row, n) for n in names])
        except self._backend.integrity_error:
            raise Conflict(f"{table} {getattr(row, pk_col)!r} already exists") from None
        return row

    def update(self, row: Row, **changes: Any) -> Row:
        """Write ``changes`` if the stored version is still ``row.version``; returns the new row."""
        table, pk_col = _TABLES[type(row)]
        new = replace(row, **changes, version=row.version + 1, updated_at=self.clock())
        names = [*changes, "version", "updated_at"]
        sql = f"UPDATE {table} SET {', '.join(f'{n} = ?' for n in names)} WHERE {pk_col} = ? AND version = ?"
        count, _ = self._run(sql, [*(getattr(new, n) for n in names), getattr(row, pk_col), row.version])
        if count != 1:
            raise Conflict(f"{table} {getattr(row, pk_col)!r}: version {row.version} is stale")
        return new

    def delete(self, row: Deployment | Instance) -> None:
        """Delete ``row`` if the stored version is still ``row.version``."""
        table, pk_col = _TABLES[type(row)]
        count, _ = self._run(f"DELETE FROM {table} WHERE {pk_col} = ? AND version = ?",
                             (getattr(row, pk_col), row.version))
        if count != 1:
            raise Conflict(f"{table} {getattr(row, pk_col)!r}: version {row.version} is stale")

    def purge(self, deployment: str) -> None:
        """Remove a deployment and its instances unconditionally (the demo's reset, not for controllers)."""
        self._run("DELETE FROM instances WHERE deployment = ?", (deployment,))
        self._run("DELETE FROM deployments WHERE name = ?", (deployment,))


def _columns(cls: type) -> str:
    return ", ".join(f.name for f in fields(cls))


_stores: dict[tuple[int, str], Store] = {}
_stores_lock = threading.Lock()


def open_store(url: str | None = None) -> Store:
    """This process's store for ``url`` (default: ``$CTLPOOL_STORE``, else a SQLite file here)."""
    url = url or os.environ.get(ENV_STORE) or DEFAULT_URL
    key = (os.getpid(), url)  # a forked worker opens its own connections
    with _stores_lock:
        if key not in _stores:
            _stores[key] = Store(url)
        return _stores[key]
