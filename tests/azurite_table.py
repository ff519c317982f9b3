"""Azurite's Table service for the vehicle state store tests, started like the Blob one in
tests/test_spill_azurite.py (same helpers, same well-known development account)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_spill_azurite import ACCOUNT, ACCOUNT_KEY, ROOT, STARTUP_SECONDS, free_port, listening

AZURITE_TABLE = ROOT / "node_modules" / ".bin" / "azurite-table"


def table_connection_string(port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"TableEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    )


def start_azurite_table(log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    if not os.access(AZURITE_TABLE, os.X_OK):
        pytest.fail(
            f"{AZURITE_TABLE.relative_to(ROOT)} is missing: the Table store tests run against "
            "Azurite from npm. Run `make test` (it runs `npm ci`) or `npm ci` first."
        )
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(AZURITE_TABLE), "--tableHost", "127.0.0.1", "--tablePort", str(port),
             "--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck", "--loose"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + STARTUP_SECONDS
    while not listening(port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            pytest.fail(
                f"Azurite (table) did not start listening on 127.0.0.1:{port} "
                f"(exit code {process.poll()}):\n{log_path.read_text(errors='replace')}"
            )
        time.sleep(0.1)
    return process, port


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def azurite_table_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    process, port = start_azurite_table(tmp_path_factory.mktemp("azurite") / "azurite.log")
    try:
        yield port
    finally:
        stop(process)
