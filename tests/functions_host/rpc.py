"""The FunctionRpc message and service classes, generated from function_rpc.proto at test time.

grpcio-tools' `protoc` writes `function_rpc_pb2.py` and `function_rpc_pb2_grpc.py` into a
directory of the caller's (a pytest temporary directory); the test host imports them from
there, and the worker process gets the same directory on its path.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROTO = Path(__file__).resolve().parent / "function_rpc.proto"


@dataclass(frozen=True)
class Protos:
    directory: Path
    messages: Any  # function_rpc_pb2
    services: Any  # function_rpc_pb2_grpc


_generated: Protos | None = None


def generate(directory: Path) -> Protos:
    """Generate into `directory` and import; once per process (a module imports once), so a
    later call returns the first call's classes."""
    global _generated
    if _generated is not None:
        return _generated
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    status = protoc.main([
        "grpc_tools.protoc", f"-I{PROTO.parent}", f"-I{well_known}",
        f"--python_out={directory}", f"--grpc_python_out={directory}", str(PROTO),
    ])
    if status != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {status})")
    if str(directory) not in sys.path:
        sys.path.append(str(directory))
    messages = importlib.import_module("function_rpc_pb2")
    services = importlib.import_module("function_rpc_pb2_grpc")
    assert messages.__file__ is not None
    assert Path(messages.__file__).parent == directory, "another function_rpc_pb2 was imported"
    _generated = Protos(directory, messages, services)
    return _generated
