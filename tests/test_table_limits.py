"""tests/table_limits.py, the Table limits Azurite does not enforce: what `Limited` refuses,
and that Azurite indeed lets it through (so the wrapper is what checks it)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.data.tables.aio import TableClient

from .azurite import azurite_table_port, connection_string
from .table_limits import ENTITY_BYTES, Limited, check_transaction, size_of

__all__ = ["azurite_table_port"]  # the fixture, used by name


def entity(row: str, **properties: Any) -> dict[str, Any]:
    return {"PartitionKey": "p", "RowKey": row, **properties}


def test_sizes_follow_the_published_accounting() -> None:
    # 4 + keys ("p", "r": 2 bytes each) + per property 8 + name in UTF-16 + value.
    assert size_of(entity("r")) == 4 + 2 + 2
    assert size_of(entity("r", Address="Mountain View")) == 8 + 8 + 14 + 4 + 26
    assert size_of(entity("r", a=True, b=1, c=2**40, d=1.5)) == 8 + 4 * (8 + 2) + 1 + 4 + 8 + 8
    assert size_of(entity("r", s="\U0001f697")) == 8 + 8 + 2 + 4 + 4  # two UTF-16 units


def test_what_azure_refuses_is_refused() -> None:
    with pytest.raises(HttpResponseError, match="EntityTooLarge"):
        check_transaction([("create", entity("r", **{f"p{i}": "x" * 30_000
                                                    for i in range(18)}))])
    with pytest.raises(HttpResponseError, match="TooManyProperties"):
        check_transaction([("create", entity("r", **{f"p{i}": 1 for i in range(253)}))])
    with pytest.raises(HttpResponseError, match="InvalidInput"):
        check_transaction([("create", entity(f"r{i}")) for i in range(101)])
    with pytest.raises(HttpResponseError, match="RequestBodyTooLarge"):
        check_transaction([("create", entity(f"r{i}", **{f"p{j}": "x" * 30_000
                                                         for j in range(16)}))
                           for i in range(5)])
    # At the limits: 252 properties, 100 operations, an entity of exactly 1 MiB.
    check_transaction([("create", entity("r", **{f"p{i}": 1 for i in range(252)}))])
    check_transaction([("create", entity(f"r{i:03d}")) for i in range(100)])
    filler = ENTITY_BYTES - size_of(entity("r", s=""))
    check_transaction([("create", entity("r", s="x" * (filler // 2)))])


def test_azurite_takes_what_limited_refuses(azurite_table_port: int) -> None:
    big = entity("big", **{f"p{i}": "x" * 30_000 for i in range(18)})

    async def main() -> int:
        client = TableClient.from_connection_string(
            connection_string("table", azurite_table_port), "limits")
        async with client:
            await client.create_table()
            await client.upsert_entity(big)  # Azurite: accepted
            with pytest.raises(HttpResponseError, match="EntityTooLarge"):
                await Limited(client).upsert_entity(big)
            return len([e async for e in client.list_entities()])

    assert asyncio.run(main()) == 1
