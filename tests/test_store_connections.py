"""The store's pool hands out only live connections, though it no longer pings each one:
a connection the server closed (a restart, a terminate, an idle timeout) is noticed and
replaced before a transaction gets it."""

import asyncio

import pytest
from psycopg_pool import AsyncConnectionPool

from adapters.db import Conn, Store


async def backend_pid(store: Store) -> int:
    async with store.database.transaction() as conn:
        row = await (await conn.execute("SELECT pg_backend_pid() AS pid")).fetchone()
    assert row is not None
    return int(row["pid"])


async def test_a_connection_the_server_closed_is_replaced_not_handed_out(
        postgres_dsn: str, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    probes: list[Conn] = []
    probe = AsyncConnectionPool.check_connection

    async def counted(conn: Conn) -> None:
        probes.append(conn)
        await probe(conn)

    monkeypatch.setattr(AsyncConnectionPool, "check_connection", staticmethod(counted))
    single = await Store.open(postgres_dsn, min_size=1, max_size=1)
    try:
        first = await backend_pid(single)
        assert await backend_pid(single) == first  # reused while alive: no reconnect per use
        assert probes == []  # and no ping round trip per checkout
        async with store.database.transaction() as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        await asyncio.sleep(0.2)  # the server's goodbye reaches the idle socket
        replaced = await backend_pid(single)  # would raise if the dead connection were handed out
        assert replaced != first
        assert len(probes) == 1  # the closed one was probed, and found dead
        assert await backend_pid(single) == replaced
    finally:
        await single.close()
