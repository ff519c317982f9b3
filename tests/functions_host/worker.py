"""The Python worker process, as the Functions host starts it: gRPC to the host, the app's
`azure-functions-runtime` for everything else.

In Azure, the host starts the Python worker that ships with it (not on PyPI) with
`--host --port --workerId --requestId --grpcMaxMessageLength`. That worker opens the host's
`FunctionRpc.EventStream`, says `StartStream`, and hands each request to the runtime library,
`azure_functions_runtime`, imported from the app's own `.python_packages` when requirements.txt
lists it (runtime version control). This script is that worker's thin part, written for the
tests: it sets `sys.path` as the worker does on a dedicated Linux instance (app directory, then
the app's packages, then the worker's own), relays messages, and forwards log records as
`RpcLog`. Everything between a request and its response is the runtime's and the app's.

Run with `python -I -S`, so nothing but those paths and the standard library is importable.
`--fakes DIR` installs the tests' Service Bus and Key Vault fakes (boundary.py) first.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@dataclass
class WorkerRequest:
    """What the runtime's handlers take: the host's message and, for init, the protos and host."""

    name: str
    request: Any
    properties: dict[str, Any] | None = None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Python worker for the tests' Functions host")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workerId", dest="worker_id", required=True)
    parser.add_argument("--requestId", dest="request_id", required=True)
    parser.add_argument("--grpcMaxMessageLength", dest="max_message", type=int, default=-1)
    parser.add_argument("--worker-path", required=True,
                        help="the worker's own import path (gRPC, protobuf, generated messages)")
    parser.add_argument("--fakes", help="directory the boundary fakes record into")
    return parser.parse_args()


def use_app_paths(script_root: Path) -> None:
    """The app first, then its packages: the order on a dedicated Linux instance."""
    sys.path[:0] = [str(script_root), str(script_root / ".python_packages/lib/site-packages")]


class RpcLogHandler(logging.Handler):
    """Log records to the host as `RpcLog`, as the worker sends them once the stream is up."""

    def __init__(self, send: Any, pb: Any) -> None:
        super().__init__()
        self._send = send
        self._pb = pb

    def emit(self, record: logging.LogRecord) -> None:
        levels = self._pb.RpcLog
        level = (levels.Critical if record.levelno >= logging.CRITICAL else
                 levels.Error if record.levelno >= logging.ERROR else
                 levels.Warning if record.levelno >= logging.WARNING else
                 levels.Information if record.levelno >= logging.INFO else levels.Debug)
        self._send(self._pb.StreamingMessage(rpc_log=self._pb.RpcLog(
            level=level, category=record.name, message=self.format(record))))


async def serve(args: argparse.Namespace, pb: Any, pb_grpc: Any) -> None:
    import grpc

    loop = asyncio.get_running_loop()
    outbox: asyncio.Queue[Any] = asyncio.Queue()
    options = ([("grpc.max_receive_message_length", args.max_message),
                ("grpc.max_send_message_length", args.max_message)]
               if args.max_message > 0 else [])
    async with grpc.aio.insecure_channel(f"{args.host}:{args.port}", options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)

        async def outgoing() -> Any:
            while (message := await outbox.get()) is not None:
                yield message

        stream = pb_grpc.FunctionRpcStub(channel).EventStream(outgoing())
        outbox.put_nowait(pb.StreamingMessage(
            request_id=args.request_id, start_stream=pb.StartStream(worker_id=args.worker_id)))
        handler = RpcLogHandler(lambda m: loop.call_soon_threadsafe(outbox.put_nowait, m), pb)
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
        runtime: Any = None
        tasks: set[asyncio.Task[None]] = set()

        async def answer(message: Any) -> None:
            nonlocal runtime
            kind = message.WhichOneof("content")
            if kind == "worker_init_request":
                import azure_functions_runtime  # from the app's packages, as in Azure

                runtime = azure_functions_runtime
                runtime.start_threadpool_executor()
                response = await runtime.worker_init_request(WorkerRequest(
                    "WorkerInitRequest", message, {"protos": pb, "host": args.host}))
                reply = pb.StreamingMessage(worker_init_response=response)
            elif kind == "functions_metadata_request":
                response = await runtime.functions_metadata_request(
                    WorkerRequest("WorkerMetadataRequest", message))
                reply = pb.StreamingMessage(function_metadata_response=response)
            elif kind == "function_load_request":
                response = await runtime.function_load_request(
                    WorkerRequest("FunctionLoadRequest", message))
                reply = pb.StreamingMessage(function_load_response=response)
            elif kind == "invocation_request":
                response = await runtime.invocation_request(
                    WorkerRequest("FunctionInvocationRequest", message))
                reply = pb.StreamingMessage(invocation_response=response)
            else:
                logging.getLogger(__name__).error("unexpected message from the host: %s", kind)
                return
            reply.request_id = args.request_id
            outbox.put_nowait(reply)

        async for message in stream:
            task = asyncio.create_task(answer(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        logging.getLogger().removeHandler(handler)
        outbox.put_nowait(None)
        if runtime is not None:
            runtime.stop_threadpool_executor()


def main() -> None:
    args = parse_args()
    sys.path[:0] = [*args.worker_path.split(os.pathsep), str(HERE)]
    import function_rpc_pb2 as pb
    import function_rpc_pb2_grpc as pb_grpc

    use_app_paths(Path(os.environ["AzureWebJobsScriptRoot"]))
    if args.fakes:
        import boundary

        boundary.install(Path(args.fakes))
    asyncio.run(serve(args, pb, pb_grpc))


if __name__ == "__main__":
    main()
