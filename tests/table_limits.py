"""Azure Table Storage's documented limits that Azurite does not enforce.

Azurite refuses a string property over 64 KiB, as the service does, but accepts an entity over
1 MiB (tests/test_table_limits.py shows it), more than 252 properties, and a transaction over
4 MiB. `Limited` wraps an `azure.data.tables.aio.TableClient` on Azurite
and refuses such writes as the service would (an `HttpResponseError`), so every Table test
that writes through it also checks that what the store writes fits Azure.

Sizes follow Microsoft's published accounting for an entity: 4 bytes, the PartitionKey and
RowKey in UTF-16, and for each property 8 bytes, its name in UTF-16 and its value (a string:
4 bytes and its UTF-16; a bool 1 byte; a 32-bit int 4; a 64-bit int or a double 8).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from azure.core.exceptions import HttpResponseError

ENTITY_BYTES = 1024 * 1024
PROPERTIES = 252
TRANSACTION_BYTES = 4 * 1024 * 1024
TRANSACTION_OPERATIONS = 100
KEYS = ("PartitionKey", "RowKey")


def _utf16_bytes(text: str) -> int:
    return len(text.encode("utf-16-le"))


def _value_bytes(value: Any) -> int:
    if isinstance(value, str):
        return 4 + _utf16_bytes(value)
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return 4 if -(2**31) <= value < 2**31 else 8
    if isinstance(value, float):
        return 8
    raise TypeError(f"no size for a {type(value).__name__} property")


def size_of(entity: Mapping[str, Any]) -> int:
    """The entity's size as the service counts it against its 1 MiB."""
    size = 4 + sum(_utf16_bytes(str(entity.get(key, ""))) for key in KEYS)
    for name, value in entity.items():
        if name not in KEYS:
            size += 8 + _utf16_bytes(name) + _value_bytes(value)
    return size


def check_entity(entity: Mapping[str, Any]) -> int:
    """The entity's size; HttpResponseError if the service would refuse it."""
    properties = sum(1 for name in entity if name not in KEYS)
    if properties > PROPERTIES:
        raise HttpResponseError(
            message=f"TooManyProperties: {entity.get('RowKey')!r} has {properties}")
    size = size_of(entity)
    if size > ENTITY_BYTES:
        raise HttpResponseError(
            message=f"EntityTooLarge: {entity.get('RowKey')!r} is {size} bytes")
    return size


def check_transaction(operations: Sequence[Sequence[Any]]) -> None:
    if len(operations) > TRANSACTION_OPERATIONS:
        raise HttpResponseError(
            message=f"InvalidInput: {len(operations)} operations in one transaction")
    total = sum(check_entity(op[1]) for op in operations)
    if total > TRANSACTION_BYTES:
        raise HttpResponseError(message=f"RequestBodyTooLarge: a transaction of {total} bytes")


class Limited:
    """A TableClient whose writes are checked against the limits above first."""

    def __init__(self, client: Any) -> None:
        self._client = client
        #: The largest entity written so far (bytes), for tests that want to see it.
        self.largest = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def submit_transaction(self, operations: Sequence[Sequence[Any]], **kwargs: Any) -> Any:
        check_transaction(operations)
        self.largest = max([self.largest, *(size_of(op[1]) for op in operations)])
        return await self._client.submit_transaction(operations, **kwargs)

    async def upsert_entity(self, entity: Mapping[str, Any], **kwargs: Any) -> Any:
        self.largest = max(self.largest, check_entity(entity))
        return await self._client.upsert_entity(entity, **kwargs)

    async def create_entity(self, entity: Mapping[str, Any], **kwargs: Any) -> Any:
        self.largest = max(self.largest, check_entity(entity))
        return await self._client.create_entity(entity, **kwargs)

    async def update_entity(self, entity: Mapping[str, Any], **kwargs: Any) -> Any:
        self.largest = max(self.largest, check_entity(entity))
        return await self._client.update_entity(entity, **kwargs)
