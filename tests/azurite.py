"""Azurite (npm, pinned in package.json; `make test` runs `npm ci`) for the tests that run the
real Azure Storage SDKs: its Blob or Table service on a free loopback port, one per test module,
stopped at the end. The Blob spill tests and the Table vehicle state store tests start it here,
the same way, with the same well-known development account."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import pytest

from .support import free_port

ROOT = Path(__file__).resolve().parent.parent
# Azurite's well-known development account (published in its README; not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
# Generous: only a broken setup comes near this; it is not a performance target.
STARTUP_SECONDS = 60.0

Service = Literal["blob", "table"]
#: What each service's tests are, for the message when Azurite is not installed.
USED_BY: dict[Service, str] = {"blob": "the Blob spill tests", "table": "the Table store tests"}


#: Where `npm ci` puts the Azurite executables...
BIN_DIR = ROOT / "node_modules" / ".bin"
#: ... unless this names another folder: `make mutate` runs the tests in a copy of the
#: repository (mutants/) that has no node_modules of its own.
BIN_DIR_VARIABLE = "AZURITE_BIN_DIR"


def executable(service: Service) -> Path:
    return Path(os.environ.get(BIN_DIR_VARIABLE) or BIN_DIR) / f"azurite-{service}"


def connection_string(service: Service, port: int) -> str:
    endpoint = {"blob": "BlobEndpoint", "table": "TableEndpoint"}[service]
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"{endpoint}=http://127.0.0.1:{port}/{ACCOUNT};"
    )


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def running_azurite(service: Service, log_path: Path) -> Iterator[int]:
    """The service listening on a free loopback port (yielded), in memory; stopped on exit,
    also when it never started listening (the test then fails with Azurite's log)."""
    program = executable(service)
    if not os.access(program, os.X_OK):
        pytest.fail(
            f"{program.relative_to(ROOT)} is missing: {USED_BY[service]} run against "
            "Azurite from npm. Run `make test` (it runs `npm ci`) or `npm ci` first."
        )
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(program), f"--{service}Host", "127.0.0.1", f"--{service}Port", str(port),
             "--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck", "--loose"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"Azurite ({service}) did not start listening on 127.0.0.1:{port} "
                    f"(exit code {process.poll()}):\n{log_path.read_text(errors='replace')}"
                )
            time.sleep(0.1)
        yield port
    finally:
        stop(process)


@pytest.fixture(scope="module")
def azurite_blob_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with running_azurite("blob", tmp_path_factory.mktemp("azurite") / "azurite.log") as port:
        yield port


@pytest.fixture(scope="module")
def azurite_table_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with running_azurite("table", tmp_path_factory.mktemp("azurite") / "azurite.log") as port:
        yield port
