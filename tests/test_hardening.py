"""Denial-of-service and timing hardening: constant-time comparison, bounded reads, bounded work."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import signature
from shared.events import Event
from shared.handlers import HandlerContext, HandlerRegistry

from .support import (
    WEBHOOK,
    RunningHost,
    compare_digest_calls,
    encode,
    local_env,
    signed_headers,
    state_event,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]


class TestConstantTimeComparison:
    @pytest.mark.parametrize(("tokens", "signed_with"), [
        (("a", "b", "c"), "a"),   # first token matches
        (("a", "b", "c"), "c"),   # last token matches
        (("a", "b", "c"), "x"),   # none matches
        (("a",), "a"),
    ])
    def test_every_token_is_compared_with_compare_digest_whatever_matches(
        self, monkeypatch: pytest.MonkeyPatch, tokens: tuple[str, ...], signed_with: str
    ) -> None:
        calls = compare_digest_calls(monkeypatch, "shared.signature")
        body = b'{"eventId":"e"}'
        found = signature.matching_token(body, signature.sign(signed_with, body), tokens)
        assert found == (tokens.index(signed_with) if signed_with in tokens else None)
        # No short-circuit: the number of comparisons does not depend on which token matched.
        assert len(calls) == len(tokens)


def _chunks(size: int, total: int) -> Iterator[bytes]:
    chunk = b"x" * size
    for _ in range(total // size):
        yield b"%x\r\n%s\r\n" % (size, chunk)


class TestBoundedBodyReading:
    def test_huge_chunked_body_is_answered_413_long_before_it_ends(self, tmp_path: Path) -> None:
        total = 256 * 1024 * 1024  # far more than any socket buffer could absorb
        with RunningHost(local_env(tmp_path)) as host:
            limit = host.settings.max_body_bytes
            sock = socket.create_connection(("127.0.0.1", host.port), timeout=30)
            sock.sendall(
                f"POST {WEBHOOK} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Transfer-Encoding: chunked\r\nSC-Signature: 00\r\n\r\n".encode()
            )
            sent = 0
            response = b""
            try:
                for piece in _chunks(64 * 1024, total):
                    readable, _, _ = select.select([sock], [], [], 0)
                    if readable:
                        response = sock.recv(65536)
                        break
                    sock.sendall(piece)
                    sent += len(piece)
                else:
                    readable, _, _ = select.select([sock], [], [], 10)
                    response = sock.recv(65536) if readable else b""
            except (BrokenPipeError, ConnectionResetError):
                response = response or sock.recv(65536)
            finally:
                sock.close()
            assert response.startswith(b"HTTP/1.1 413"), response[:100]
            # The server answered after reading about `limit` bytes, not after the whole body.
            assert sent < total // 4
            assert sent >= limit
            # And it is still serving.
            body = encode(state_event())
            assert host.post(WEBHOOK, body, signed_headers(body)).status == 200


class TestBoundedConcurrency:
    def test_local_host_runs_at_most_workers_messages_at_once(self, tmp_path: Path) -> None:
        registry = HandlerRegistry()
        running = 0
        peak = 0

        @registry.on("VEHICLE_STATE")
        async def slow(event: Event, context: HandlerContext) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.02)
            running -= 1

        with RunningHost(local_env(tmp_path), registry=registry, workers=3) as host:
            for _ in range(15):
                body = encode(state_event())
                assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
            wait_until(lambda: len(host.handled()) == 15)
        assert 1 <= peak <= 3

    def test_the_local_host_processes_as_many_at_once_as_host_json_says(
        self, tmp_path: Path
    ) -> None:
        from shared.local.command import load_function_app
        from shared.local.host import LocalHost
        from shared.runtime import build_runtime
        from shared.settings import load_settings

        calls = json.loads((ROOT / "host.json").read_text())["extensions"]["serviceBus"][
            "maxConcurrentCalls"]
        runtime = build_runtime(load_settings(local_env(tmp_path)))
        try:
            assert LocalHost(load_function_app(), runtime).workers == calls
            assert LocalHost(load_function_app(), runtime, workers=2).workers == 2
        finally:
            assert runtime.queue is not None
            runtime.queue.close()

    @pytest.mark.parametrize("service_bus, found", [
        ({"maxConcurrentCalls": 0}, "got 0"),
        ({"maxConcurrentCalls": "16"}, "got '16'"),
        ({}, "KeyError"),
    ])
    def test_a_host_json_without_a_usable_max_concurrent_calls_is_named(
        self, tmp_path: Path, service_bus: dict[str, object], found: str
    ) -> None:
        from shared.local.app_functions import max_concurrent_calls_from_host_json

        path = tmp_path / "host.json"
        path.write_text(json.dumps({"extensions": {"serviceBus": service_bus}}))
        with pytest.raises(ValueError, match=r"extensions\.serviceBus\.maxConcurrentCalls") as err:
            max_concurrent_calls_from_host_json(path)
        assert str(path) in str(err.value) and found in str(err.value)

    def test_host_json_bounds_service_bus_concurrency_explicitly(self) -> None:
        host = json.loads((ROOT / "host.json").read_text())
        calls = host["extensions"]["serviceBus"]["maxConcurrentCalls"]
        assert isinstance(calls, int) and 1 <= calls <= 64
        assert host["extensions"]["serviceBus"]["prefetchCount"] == 0


class TestPersonalData:
    def test_payloads_never_reach_the_logs_above_debug(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        secret_vin = "5YJ3E1EA7KF000000-PERSONAL"
        event = state_event()
        event["data"]["vehicle"] = {**event["data"].get("vehicle", {}), "vin": secret_vin}
        body = encode(event)
        caplog.set_level("INFO")
        with RunningHost(local_env(tmp_path)) as host:
            assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
            wait_until(lambda: host.handled())
        assert event["eventId"] in caplog.text  # the receiver did log the event, at INFO
        assert secret_vin not in caplog.text

    def test_unauthenticated_ids_are_never_echoed_into_the_logs(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        # A forged eventId could inject fake log lines or flood the logs.
        forged_id = "x\nINFO shared.functions: webhook accepted (200, eventId=fake)" + "y" * 5000
        caplog.set_level("DEBUG")
        with RunningHost(local_env(tmp_path)) as host:
            unsigned = encode(state_event(eventId=forged_id))
            assert host.post(WEBHOOK, unsigned).status == 401
            assert host.post(WEBHOOK, unsigned, {"SC-Signature": "00"}).status == 401
            verify = encode({"eventId": forged_id, "eventType": "VERIFY",
                             "data": {"challenge": "abc"}})
            assert host.post(WEBHOOK, verify).status == 200
        assert "eventId=fake" not in caplog.text
        assert "y" * 100 not in caplog.text
        assert "unauthenticated" in caplog.text

    def test_spilled_records_are_private_to_the_app_user(self, tmp_path: Path) -> None:
        from shared.publisher import OutboundMessage
        from shared.spill import FileSpillStore

        store = FileSpillStore(tmp_path)
        asyncio.run(store.put(OutboundMessage(b"{}", "id")))
        (record,) = tmp_path.glob("*.json")
        assert record.stat().st_mode & 0o077 == 0

    def test_the_spill_directory_it_creates_is_private_whatever_the_umask(
        self, tmp_path: Path
    ) -> None:
        from shared.publisher import OutboundMessage
        from shared.spill import FileSpillStore

        store = FileSpillStore(tmp_path / "state" / "spill")
        old = os.umask(0o022)  # a usual login umask, not the local host's 077
        try:
            asyncio.run(store.put(OutboundMessage(b"{}", "id")))
        finally:
            os.umask(old)
        assert (tmp_path / "state" / "spill").stat().st_mode & 0o077 == 0


class TestFunctionKeys:
    def test_webhook_routes_require_the_function_key_in_azure(self) -> None:
        import ast

        tree = ast.parse((ROOT / "function_app.py").read_text())
        levels = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
                for deco in node.decorator_list:
                    if isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "route":
                        kw = {k.arg: ast.unparse(k.value) for k in deco.keywords}
                        levels[kw["route"]] = kw.get("auth_level")
        assert levels == {
            "'webhooks/smartcar'": "func.AuthLevel.FUNCTION",
            "'webhooks/smartcar/errors'": "func.AuthLevel.FUNCTION",
            "'health'": "func.AuthLevel.ANONYMOUS",
            # Vehicle data: never without a key (locally too, tests/test_vehicle_read.py).
            "'vehicles/{vehicleId}'": "func.AuthLevel.FUNCTION",
        }
