"""Load generator for `local_end_to_end`, run in its own process so its CPU is not the host's.

    python -m benchmarks.loadgen --url URL --events N --clients C --size BYTES

Sends N distinct signed VEHICLE_STATE events from C concurrent aiohttp clients (each sends
its next event when the previous one is answered). Prints `ready` on a line of its own once
the events are built and every connection is open, just before the first event is sent; then,
at the end, one JSON object: wall-clock start and end, the acknowledged eventIds, and each
acknowledgement's latency in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import aiohttp

from .common import signed_headers, state_payload


async def send_all(url: str, events: int, clients: int, size: int,
                   vehicles: int = 1) -> dict[str, Any]:
    # Events of `vehicles` vehicles in turn; one vehicle keeps the template's vehicleId.
    bodies = [state_payload(size, event_id=f"bench-{i:06d}", vehicle_id=(
                  None if vehicles == 1 else f"bench-vehicle-{i % vehicles:04d}"))
              for i in range(events)]
    headers = [signed_headers(body) for body in bodies]
    acked: list[str] = []
    ack_ms: list[float] = []
    failures: dict[str, int] = {}
    remaining = iter(range(events))
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        # One request per connection first, so connection setup is not in the figures.
        await asyncio.gather(*(session.get(url.rsplit("/webhooks", 1)[0] + "/health")
                               for _ in range(clients)))
        # The host counts its CPU from here: building the events takes seconds, and what an
        # idle host spends meanwhile is not a cost of the events.
        print("ready", flush=True)

        async def client() -> None:
            for i in remaining:
                start = time.perf_counter()
                try:
                    async with session.post(url, data=bodies[i], headers=headers[i]) as resp:
                        await resp.read()
                        status = resp.status
                except aiohttp.ClientError as exc:
                    failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                    continue
                if status == 200:
                    ack_ms.append((time.perf_counter() - start) * 1e3)
                    acked.append(f"bench-{i:06d}")
                else:
                    failures[str(status)] = failures.get(str(status), 0) + 1

        started = time.time()
        await asyncio.gather(*(client() for _ in range(clients)))
        finished = time.time()
    return {"start": started, "end": finished, "acked": acked, "ack_ms": ack_ms,
            "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    parser.add_argument("--url", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--vehicles", type=int, default=1)
    args = parser.parse_args(argv)
    result = asyncio.run(send_all(args.url, args.events, args.clients, args.size,
                                  args.vehicles))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
