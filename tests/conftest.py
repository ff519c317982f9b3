"""Fixtures shared by the runtime tests: one real azure-functions-runtime session per run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .functions_host import rpc
from .functions_host.session import RuntimeSession, dependencies, start_session
from .otel_capture import Captured, captured

#: An event type whose handler raises in the runtime session (registered by boundary.py).
FAILING_EVENT_TYPE = "RUNTIME_TEST_FAILING_HANDLER"


@pytest.fixture(scope="session")
def functions_cache(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Installed dependency trees, kept between runs in pytest's cache directory."""
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("functions-host") if cache is not None else tmp_path_factory.mktemp("c")


@pytest.fixture(scope="session")
def runtime_dependencies(functions_cache: Path) -> tuple[Path, Path]:
    """requirements.txt and the worker's gRPC packages, installed once (about 15 s, cold).
    Tests that use it bound their own run only (`timeout(..., func_only=True)`): the install
    has pip's own time limit."""
    return dependencies(functions_cache)


@pytest.fixture(scope="session")
def runtime_protos(tmp_path_factory: pytest.TempPathFactory) -> rpc.Protos:
    return rpc.generate(tmp_path_factory.mktemp("protos"))


@pytest.fixture(scope="session")
def runtime(tmp_path_factory: pytest.TempPathFactory, functions_cache: Path,
            runtime_dependencies: tuple[Path, Path],
            runtime_protos: rpc.Protos) -> Iterator[RuntimeSession]:
    session = start_session(tmp_path_factory.mktemp("runtime"), functions_cache,
                            protos=runtime_protos, failing_event_types=[FAILING_EVENT_TYPE])
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def otel() -> Captured:
    """A Telemetry whose spans and metrics stay in memory (tests/otel_capture.py)."""
    return captured()
