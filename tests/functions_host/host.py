"""A minimal Functions host: the gRPC server end of `FunctionRpc.EventStream`.

It does what the Functions host does with a Python app, in the same order and with the same
messages: start a gRPC server, start the worker process (worker.py) with the host's arguments,
wait for `StartStream`, send `WorkerInitRequest` (the worker indexes the app), ask for the
function metadata (`FunctionsMetadataRequest`), resolve the `%SETTING%` expressions in the
bindings against the app settings as the host does before it starts listeners (an expression
that names no setting fails the start, as in Azure), load each function
(`FunctionLoadRequest`), and then invoke them (`InvocationRequest`) with input data and trigger
metadata shaped by the host's conventions: an HTTP request as `RpcHttp` with the raw body bytes,
Service Bus metadata with numbers and times as JSON (the host's `ToRpcDefault`) and both
`ApplicationProperties` and `UserProperties`, a timer's `TimerInfo` as JSON.

Settlement follows the Service Bus extension's default (`autoCompleteMessages`): a successful
invocation completes the message, a failed one abandons it. HTTP auth levels are enforced as
the host does: `function` routes need the function key (`?code=` or `x-functions-key`).
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import grpc

from ..support import Response
from .rpc import Protos

WORKER = Path(__file__).resolve().parent / "worker.py"
#: The host's capabilities sent in WorkerInitRequest (names as in the host's RpcWorkerConstants).
HOST_CAPABILITIES = {"HandlesWorkerTerminateMessage": "1", "HandlesInvocationCancelMessage": "1"}
HOST_VERSION = "4.1040.0"
START_SECONDS = 60.0
FUNCTION_KEY = "test-function-key"
_SETTING = re.compile(r"%([^%]+)%")


class HostStartError(RuntimeError):
    """The worker did not start, index or load the app; the message carries its output."""


@dataclass(frozen=True)
class Function:
    """One indexed function as the host sees it: its metadata and its parsed raw bindings."""

    name: str
    function_id: str
    bindings: list[dict[str, Any]]
    metadata: Any

    @property
    def trigger(self) -> dict[str, Any]:
        (binding,) = [b for b in self.bindings if b["type"].endswith("Trigger")]
        return binding


@dataclass
class Invocation:
    """What the worker answered to one InvocationRequest."""

    response: Any
    succeeded: bool
    error: str = ""


@dataclass
class _Stream:
    """The one EventStream with the worker: what goes out, and the answers awaited."""

    outbox: queue.Queue[Any] = field(default_factory=queue.Queue)
    started: futures.Future[str] = field(default_factory=futures.Future)
    pending: dict[str, futures.Future[Any]] = field(default_factory=dict)
    logs: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def expect(self, key: str) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        with self.lock:
            self.pending[key] = future
        return future

    def answer(self, key: str, value: Any) -> None:
        with self.lock:
            future = self.pending.pop(key, None)
        if future is not None:
            future.set_result(value)


class FunctionsHost:
    """Start with `start()` (or `with`); then `http`, `deliver` and `fire_timer` invoke."""

    def __init__(self, protos: Protos, *, app_dir: Path, settings: Mapping[str, str],
                 worker_path: list[Path], fakes_dir: Path | None = None,
                 log_file: Path) -> None:
        self.protos = protos
        self.pb = protos.messages
        self.app_dir = app_dir
        self.settings = dict(settings)
        self.worker_path = worker_path
        self.fakes_dir = fakes_dir
        self.log_file = log_file
        self.functions: dict[str, Function] = {}
        #: Each function's trigger with its %SETTING% expressions resolved (what listens).
        self.listeners: dict[str, dict[str, Any]] = {}
        self.init_response: Any = None
        self.metadata_response: Any = None
        self._stream = _Stream()
        self._server: grpc.Server | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._request_id = str(uuid.uuid4())

    # --- start and stop -------------------------------------------------------------------

    def __enter__(self) -> FunctionsHost:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        pb = self.pb
        stream = self._stream
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.protos.services.add_FunctionRpcServicer_to_server(_Servicer(stream), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        worker_id = str(uuid.uuid4())
        env = {
            **self.settings,
            # What the host sets for its worker process.
            "AzureWebJobsScriptRoot": str(self.app_dir),
            "FUNCTIONS_WORKER_RUNTIME": "python",
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }
        command = [sys.executable, "-I", "-S", str(WORKER), "--host", "127.0.0.1",
                   "--port", str(port), "--workerId", worker_id, "--requestId", self._request_id,
                   "--grpcMaxMessageLength", str(2**31 - 1),
                   "--worker-path", os.pathsep.join(str(p) for p in self.worker_path)]
        if self.fakes_dir is not None:
            command += ["--fakes", str(self.fakes_dir)]
        with self.log_file.open("wb") as log:
            self._process = subprocess.Popen(command, cwd=self.app_dir, env=env, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started = self._wait(stream.started, "StartStream")
        if started != worker_id:
            raise HostStartError(f"StartStream named worker {started!r}, expected {worker_id!r}")

        init = self._call("worker_init_response", pb.StreamingMessage(
            worker_init_request=pb.WorkerInitRequest(
                host_version=HOST_VERSION, capabilities=HOST_CAPABILITIES,
                worker_directory=str(WORKER.parent),
                function_app_directory=str(self.app_dir))))
        self.init_response = init
        self._check(init.result, "WorkerInitRequest (indexing the app)")
        metadata = self._call("function_metadata_response", pb.StreamingMessage(
            functions_metadata_request=pb.FunctionsMetadataRequest(
                function_app_directory=str(self.app_dir))))
        self.metadata_response = metadata
        self._check(metadata.result, "FunctionsMetadataRequest")
        for item in metadata.function_metadata_results:
            bindings = [json.loads(raw) for raw in item.raw_bindings]
            self.functions[item.name] = Function(item.name, item.function_id, bindings, item)
        self.listeners = {name: self._resolve(fn) for name, fn in self.functions.items()}
        for fn in self.functions.values():
            loaded = self._call(f"load:{fn.function_id}", pb.StreamingMessage(
                function_load_request=pb.FunctionLoadRequest(
                    function_id=fn.function_id, metadata=fn.metadata)))
            self._check(loaded.result, f"FunctionLoadRequest for {fn.name}")

    def stop(self) -> None:
        self._stream.outbox.put(None)
        if self._process is not None:
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        if self._server is not None:
            self._server.stop(grace=1).wait(5)

    def worker_output(self) -> str:
        return self.log_file.read_text(encoding="utf-8", errors="replace")

    @property
    def logs(self) -> list[Any]:
        """The RpcLog messages the worker sent (the app's and the runtime's log records)."""
        with self._stream.lock:
            return list(self._stream.logs)

    # --- invocations ------------------------------------------------------------------------

    def invoke(self, name: str, inputs: Mapping[str, Any],
               trigger_metadata: Mapping[str, Any], *,
               trace_parent: str | None = None) -> Invocation:
        """One InvocationRequest; `trace_parent` is the host's W3C trace context for it (a
        new one by default, as the host starts an activity per invocation)."""
        pb = self.pb
        fn = self.functions[name]
        invocation_id = str(uuid.uuid4())
        request = pb.InvocationRequest(
            invocation_id=invocation_id, function_id=fn.function_id,
            input_data=[pb.ParameterBinding(name=k, data=v) for k, v in inputs.items()],
            trigger_metadata={**trigger_metadata, "sys": self._json({
                "MethodName": name, "UtcNow": _dotnet_time(datetime.now(UTC)),
                "RandGuid": str(uuid.uuid4())})},
            trace_context=pb.RpcTraceContext(
                trace_parent=trace_parent or f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
                attributes={"ProcessId": str(os.getpid())}),
        )
        response = self._call(f"invocation:{invocation_id}",
                              pb.StreamingMessage(invocation_request=request))
        ok = response.result.status == pb.StatusResult.Success
        return Invocation(response, ok, "" if ok else response.result.exception.message)

    def http(self, method: str, path: str, body: bytes = b"",
             headers: Mapping[str, str] | None = None, *,
             trace_parent: str | None = None) -> Response:
        """One HTTP request as the host's front door hands it over: routed by the functions'
        routes and methods under the `api` prefix, the key checked for `function` routes, the
        request sent as `RpcHttp` (raw body bytes, lower-case header names), the function's
        `$return` turned back into a response; a failed invocation is the host's 500."""
        parts = urlsplit(path)
        query = dict(parse_qsl(parts.query))
        headers = {k.lower(): v for k, v in (headers or {}).items()}
        route = parts.path.removeprefix("/api/")
        params: dict[str, str] = {}
        matches = []
        for candidate in self.functions.values():
            if candidate.trigger["type"] != "httpTrigger":
                continue
            found = route_values(candidate.trigger.get("route", ""), route)
            if found is not None:
                matches.append(candidate)
                params = params or found
        if not matches:
            return Response(404, {}, b"")
        allowed = [fn for fn in matches
                   if method.upper() in [m.upper() for m in fn.trigger.get("methods", [])]]
        if not allowed:
            return Response(405, {}, b"")
        fn = allowed[0]
        if fn.trigger.get("authLevel", "FUNCTION").upper() != "ANONYMOUS" and FUNCTION_KEY not in (
            query.get("code"), headers.get("x-functions-key")
        ):
            return Response(401, {}, b"")
        if body:
            headers.setdefault("content-length", str(len(body)))
        http = self.pb.RpcHttp(
            method=method.upper(), url=f"http://127.0.0.1{path}", headers=headers, query=query,
            params=params, body=self.pb.TypedData(bytes=body) if body else None)
        result = self.invoke(fn.name, {fn.trigger["name"]: self.pb.TypedData(http=http)}, {},
                             trace_parent=trace_parent)
        if not result.succeeded:
            return Response(500, {}, b"")
        returned = result.response.return_value.http
        kind = returned.body.WhichOneof("data")
        payload = (returned.body.bytes if kind in ("bytes", "stream") else
                   getattr(returned.body, kind).encode("utf-8") if kind else b"")
        return Response(int(returned.status_code or 200),
                        {k.lower(): v for k, v in returned.headers.items()}, payload)

    def deliver(self, body: bytes, *, message_id: str, delivery_count: int = 1,
                properties: Mapping[str, Any] | None = None, sequence_number: int = 1,
                content_type: str = "application/json") -> Invocation:
        """One Service Bus delivery to the queue-triggered function. `succeeded` is what the
        host settles by: True completes the message, False abandons it."""
        (fn,) = [f for f in self.functions.values() if f.trigger["type"] == "serviceBusTrigger"]
        props = dict(properties or {})
        now = datetime.now(UTC)
        metadata = {
            "MessageId": self.pb.TypedData(string=message_id),
            "ContentType": self.pb.TypedData(string=content_type),
            "LockToken": self.pb.TypedData(string=str(uuid.uuid4())),
            "DeliveryCount": self._json(delivery_count),
            "SequenceNumber": self._json(sequence_number),
            "EnqueuedTimeUtc": self._json(_dotnet_time(now)),
            "ExpiresAtUtc": self._json(_dotnet_time(now + timedelta(days=14))),
            "ApplicationProperties": self._json(props),
            "UserProperties": self._json(props),
        }
        return self.invoke(fn.name, {fn.trigger["name"]: self.pb.TypedData(bytes=body)}, metadata)

    def fire_timer(self, name: str, *, past_due: bool = False) -> Invocation:
        fn = self.functions[name]
        now = _dotnet_time(datetime.now(UTC))
        timer = {"Schedule": {"AdjustForDST": True},
                 "ScheduleStatus": {"Last": now, "Next": now, "LastUpdated": now},
                 "IsPastDue": past_due}
        return self.invoke(name, {fn.trigger["name"]: self._json(timer)}, {})

    # --- plumbing ---------------------------------------------------------------------------

    def _json(self, value: Any) -> Any:
        return self.pb.TypedData(json=json.dumps(value))

    def _resolve(self, fn: Function) -> dict[str, Any]:
        """The trigger's properties with `%NAME%` replaced by app settings; a name with no
        setting stops the host, as the Functions host refuses to start such a listener."""
        resolved: dict[str, Any] = {}
        for key, value in fn.trigger.items():
            if isinstance(value, str):
                missing = [m for m in _SETTING.findall(value) if not self.settings.get(m)]
                if missing:
                    raise HostStartError(
                        f"{fn.name}: '{value}' in binding property {key!r} does not resolve to "
                        f"a value: app setting {missing[0]!r} is not set")
                value = _SETTING.sub(lambda m: self.settings[m.group(1)], value)
            resolved[key] = value
        return resolved

    def _wait(self, future: futures.Future[Any], what: str) -> Any:
        try:
            return future.result(timeout=START_SECONDS)
        except futures.TimeoutError:
            alive = self._process is not None and self._process.poll() is None
            raise HostStartError(
                f"no {what} from the worker within {START_SECONDS:.0f} s "
                f"({'still running' if alive else 'exited'}); its output:\n"
                f"{self.worker_output()}") from None

    def _call(self, key: str, message: Any) -> Any:
        """Send `message` and wait for the answer `key` names: the response kind, or
        `load:<function id>` / `invocation:<invocation id>`."""
        future = self._stream.expect(key)
        message.request_id = self._request_id
        self._stream.outbox.put(message)
        return self._wait(future, key)

    def _check(self, result: Any, what: str) -> None:
        if result.status != self.pb.StatusResult.Success:
            raise HostStartError(f"{what} failed: {result.exception.message}\n"
                                 f"{result.exception.stack_trace}\nworker output:\n"
                                 f"{self.worker_output()}")


class _Servicer:
    """FunctionRpc's one method: the stream the worker opens."""

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream

    def EventStream(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        stream = self._stream
        threading.Thread(target=self._read, args=(requests,), daemon=True).start()
        while (message := stream.outbox.get()) is not None:
            yield message

    def _read(self, requests: Iterator[Any]) -> None:
        stream = self._stream
        try:
            for message in requests:
                kind = message.WhichOneof("content")
                if kind == "start_stream":
                    stream.started.set_result(message.start_stream.worker_id)
                elif kind == "rpc_log":
                    with stream.lock:
                        stream.logs.append(message.rpc_log)
                elif kind == "function_load_response":
                    stream.answer(f"load:{message.function_load_response.function_id}",
                                  message.function_load_response)
                elif kind == "invocation_response":
                    stream.answer(f"invocation:{message.invocation_response.invocation_id}",
                                  message.invocation_response)
                elif kind is not None:
                    stream.answer(kind, getattr(message, kind))
        except grpc.RpcError:
            return  # the stream closed: the host is stopping


def _dotnet_time(moment: datetime) -> str:
    """A UTC time as Json.NET writes a DateTime: seven fractional digits and a Z."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def route_values(template: str, path: str) -> dict[str, str] | None:
    """The route values of `path` under a route template such as `vehicles/{vehicleId}`, as
    the host's router gives them (each segment percent-decoded, `{name}` matching one
    segment); None when the path does not match."""
    wanted, given = template.split("/"), path.split("/")
    if len(wanted) != len(given):
        return None
    values: dict[str, str] = {}
    for pattern, segment in zip(wanted, given, strict=True):
        if pattern.startswith("{") and pattern.endswith("}"):
            if not segment:
                return None
            values[pattern[1:-1].split(":")[0]] = unquote(segment)
        elif pattern != segment:
            return None
    return values
