"""The local host: `LocalHost` runs `function_app.py`'s functions without Azure tools.

It serves the app's HTTP routes under `/api` and drives its Service Bus queue trigger from the
embedded SQLite queue, with the host's built-in settlement: return completes, raise abandons,
`maxDeliveryCount` dead-letters. It also runs the app's timer functions every
`timer_interval` seconds. The functions come from shared/local/app_functions.py; the command
line that starts the host (`python -m shared.local`) is shared/local/command.py.

Keys: the webhook routes take none, like `func start` (contract.md). Every other route whose
auth level is not anonymous (the vehicle state, `GET /api/vehicles/{vehicleId}`) needs this
run's key, as `?code=` or `x-functions-key`: the port may be tunnelled to the internet for
Smartcar's deliveries, and vehicle data must not go out through that tunnel to whoever finds
it. The key is random per run and printed in the banner; anything else gets 401.

Why one module past ~800 lines: it is one class, `LocalHost`, and its jobs (fetching,
settling, completing once the vehicle state store has committed, renewing locks, stopping)
all read and write the same in-flight lock state (`_held`, `_running`, `_to_complete`,
`_awaiting_commit`, `_interrupted`). `stop` must see all of it at once to hand every message
back, so a settlement or completion class split off would share that state through the host
rather than own it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import azure.functions as func
from azure.functions.timer import TimerRequest

from ..handlers import HANDLER_ERROR, HANDLER_SECONDS, RUNNING_HANDLER
from ..handlers.pool import CURRENT_DELIVERY, DeliveryJobs
from ..processor import DeadLetterer, InboundMessage, Outcome, outcome_record, retry_delay
from ..publisher import OutboundMessage, Publisher
from ..runtime import Runtime
from ..settings import FUNCTION_TIMEOUT_SECONDS
from .adapters import LocalQueuePublisher
from .app_functions import (
    HttpFunction,
    QueueFunction,
    TimerFunction,
    _call,
    has_key,
    index_functions,
    invocation_context,
    max_concurrent_calls_from_host_json,
    needs_local_key,
    to_function_message,
)
from .batching import on_loop_unless_busy
from .connections import (
    BODY_TIMEOUT_SECONDS,
    HEADER_TIMEOUT_SECONDS,
    IDLE_TIMEOUT_SECONDS,
    connection_limit,
)
from .http import Handler, HttpServer, Request, Response, json_response
from .queue import LocalQueue
from .queue_rows import (
    MAX_DELIVERY_COUNT_EXCEEDED,
    LockLostError,
    QueuedMessage,
    QueueUnavailableError,
)
from .vehicle_state import SqliteVehicleStateStore

logger = logging.getLogger(__name__)

ROUTE_PREFIX = "/api"
DEFAULT_PORT = 7071
#: Seconds `stop` waits for cancelled tasks and open requests; the whole stop stays well
#: inside the 10 s a supervisor (or Ctrl-C) may wait before killing.
STOP_GRACE_SECONDS = 3.0
#: Longest a successful delivery waits for a send's transaction to complete it (one commit for
#: both) before the fetcher completes it alone. Bounds the window in which a crash makes the
#: event be handled twice (well under 10 ms with the commit).
COMPLETION_DELAY_SECONDS = 0.002
#: A settlement (abandon) the queue could not write (a full disk) is tried again after these,
#: doubling, until the message's lock expires.
SETTLE_RETRY_FIRST_SECONDS = 0.05
SETTLE_RETRY_MAX_SECONDS = 1.0
#: How often, at most, an idle host checkpoints the queue's write-ahead log (see
#: `LocalHost._checkpoint_when_idle`).
IDLE_CHECKPOINT_SECONDS = 5.0


#: Told of each HTTP request (route, method, headers, body) as it arrives; returns the callback
#: told of its answer (status, body). The inspector (shared/local/inspector.py) is one.
RequestObserver = Callable[[str, str, Mapping[str, str], bytes], Callable[[int, bytes], None]]
#: (messageId, deliveryCount, handler milliseconds or None, the exception or None), after each
#: attempt: what the inspector shows beside the processing span.
AttemptObserver = Callable[[str, int, float | None, BaseException | None], None]


def _ignore_answer(status: int, response: bytes) -> None:
    return None


def _unobserved(route: str, method: str, headers: Mapping[str, str], body: bytes,
                ) -> Callable[[int, bytes], None]:
    return _ignore_answer


class NotifyingPublisher:
    """Wakes the queue workers as soon as a message is stored in this process."""

    def __init__(self, inner: Publisher, wake: asyncio.Event) -> None:
        self._inner = inner
        self._wake = wake

    async def publish(self, message: OutboundMessage) -> bool:
        stored = await self._inner.publish(message)
        self._wake.set()
        return stored

    async def close(self) -> None:
        await self._inner.close()



class _CommitFirst:
    """A dead-letterer that commits the vehicle state store's deferred writes before each
    dead-letter (`sqlite3.Error` when it cannot: the delivery fails and is redelivered)."""

    def __init__(self, inner: DeadLetterer, store: SqliteVehicleStateStore) -> None:
        self.inner = inner
        self._store = store

    async def dead_letter(self, message: InboundMessage, *, reason: str,
                          description: str) -> None:
        self._store.flush()
        await self.inner.dead_letter(message, reason=reason, description=description)


class LocalHost:
    """Serves the app's functions. Start with `await start()`, stop with `await stop()`."""

    def __init__(
        self,
        app: func.FunctionApp,
        runtime: Runtime,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        workers: int | None = None,
        poll_interval: float = 0.25,
        lock_duration: float = 60.0,
        timer_interval: float = 60.0,
        header_timeout: float = HEADER_TIMEOUT_SECONDS,
        idle_timeout: float = IDLE_TIMEOUT_SECONDS,
        body_timeout: float = BODY_TIMEOUT_SECONDS,
        observer: RequestObserver | None = None,
        function_key: str | None = None,
        attempt_observer: AttemptObserver | None = None,
    ) -> None:
        if runtime.queue is None:
            raise ValueError("the local host needs the embedded queue (no Service Bus namespace)")
        self.runtime = runtime
        self.queue: LocalQueue = runtime.queue
        self.host = host
        self.port = port
        # As many messages at once as the Functions host would (host.json).
        self.workers = max_concurrent_calls_from_host_json() if workers is None else workers
        self.poll_interval = poll_interval
        self.lock_duration = lock_duration
        # Timer functions run every `timer_interval` seconds, whatever their schedule says:
        # locally the point is that they run, tests make it short.
        self.timer_interval = timer_interval
        # Slow and idle clients are dropped (see connections.py).
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        self.observer: RequestObserver = observer or _unobserved
        #: This run's key for the routes that need one (`needs_local_key`), in the banner.
        self.function_key = function_key or secrets.token_urlsafe(24)
        self.attempt_observer = attempt_observer
        self.http_functions, self.queue_functions, self.timer_functions = index_functions(app)
        self._wake = asyncio.Event()
        # The queue's own publisher (the one re-drive also sends to) hands this host what it
        # stores while workers are free, completes what the host finished with each send, and
        # wakes the fetcher for the rest; its consumer is set in `start`, cleared in `stop`.
        # Any other publisher is wrapped to wake the fetcher after each publish.
        self._queue_publisher = (
            runtime.redrive_publisher
            if isinstance(runtime.redrive_publisher, LocalQueuePublisher)
            and runtime.redrive_publisher.queue is self.queue else None
        )
        if self._queue_publisher is None:
            runtime.publisher = NotifyingPublisher(runtime.publisher, self._wake)
        self._http: HttpServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._running: set[asyncio.Task[None]] = set()
        # Each delivery's task until its first step, with its lock: a task the stop cancels
        # before then never runs `_run_one`, whose own handler releases the lock.
        self._unstarted: dict[asyncio.Task[None], str] = {}
        self._slot_free = asyncio.Event()
        # Locks of messages processed successfully, completed by the queue publisher's next
        # send (`completions`) or else by the fetcher's next receive, in the same transaction.
        self._to_complete: list[str] = []
        # Wakes the fetcher to complete what no send completed within COMPLETION_DELAY_SECONDS.
        self._completion_timer: asyncio.TimerHandle | None = None
        # Locks held by running functions -> loop time they were taken or last renewed.
        self._held: dict[str, float] = {}
        self._stopping = False
        self._stopped = False
        # Set by `stop`: a receive still waiting in a thread for another process's write lock
        # (which cannot be cancelled) then takes nothing. `_receiving` holds those receives
        # (one per queue function's fetcher), whose messages `stop` releases when they took
        # them before they were told.
        self._receives_cancelled = threading.Event()
        self._receiving: set[asyncio.Task[
            tuple[list[LockLostError | None], list[QueuedMessage]]]] = set()
        # Locks of deliveries cancelled by `stop`, released there for a prompt redelivery.
        self._interrupted: list[str] = []
        self._last_checkpoint = float("-inf")
        # The last receive's failure, until one succeeds: `/api/health` reports it.
        self._queue_error: str | None = None
        runtime.health_problem = self._health_problem
        runtime.health_warnings = self._health_warnings
        self._exhausted_logged = False
        # The vehicle state store whose commits the completions wait for (set in `start`), and
        # its failed commits as of the last look (`_store_commit_failed`).
        self._store: SqliteVehicleStateStore | None = None
        self._store_failures = 0
        # Locks of deliveries processed successfully whose store writes wait in the store's
        # open transaction, with its number: moved to `_to_complete` once it is committed.
        self._awaiting_commit: list[tuple[int, str]] = []

    @property
    def base_url(self) -> str:
        return http_origin(self.host, self.port)

    async def start(self) -> None:
        """Checks the queue file (`QueueDamagedError` if damaged), then serves."""
        await asyncio.to_thread(self.queue.check_integrity)
        settings = self.runtime.settings
        await asyncio.to_thread(self.queue.clamp_future_times, lock_seconds=self.lock_duration,
                                backoff_seconds=settings.retry_backoff_max_seconds)
        routes = {
            (method, f"{ROUTE_PREFIX}/{fn.route}"): self._http_handler(fn)
            for fn in self.http_functions for method in fn.methods
        }
        # One byte over the body limit is read, enough for the function to answer 413 (through
        # the receiver, so it is counted and logged); the rest of a large body never is.
        self._http = HttpServer(routes, body_limit=self.runtime.settings.max_body_bytes,
                                header_timeout=self.header_timeout,
                                idle_timeout=self.idle_timeout, body_timeout=self.body_timeout,
                                max_connections=connection_limit(
                                    self.runtime.settings.local_max_connections))
        self.port = await self._http.start(self.host, self.port)
        self._last_checkpoint = asyncio.get_running_loop().time()  # idle a while first
        store = self.runtime.vehicle_state
        if isinstance(store, SqliteVehicleStateStore):
            # The deliveries finished within its FLUSH_SECONDS share a commit, and a message
            # is completed only once its delivery's writes are committed
            # (`_store_flushed`): never a completed delivery whose state or inbox record
            # is not on disk.
            store.defer_commits()
            self._store = store
            self._store_failures = store.failed_commits
            store.on_flushed = self._store_flushed
            # A dead-lettered event is not redelivered either: its writes are committed first.
            self.runtime.dead_letterer = _CommitFirst(self.runtime.dead_letterer, store)
        for qfn in self.queue_functions:
            self._tasks.append(asyncio.create_task(self._fetch(qfn), name=qfn.name))
        if self._queue_publisher is not None:
            self._queue_publisher.consumer = self
        if self.queue_functions:
            self._tasks.append(asyncio.create_task(self._renew_locks(), name="lock renewal"))
        for tfn in self.timer_functions:
            self._tasks.append(asyncio.create_task(self._timer(tfn), name=tfn.name))

    async def stop(self) -> None:
        """Stops in bounded time whatever the handlers do.

        Deliveries in progress are cancelled and their locks released, so they are redelivered
        on the next start. Such a delivery does not count: its function neither returned nor
        failed (the stop cancelled it), so it never uses up the message's deliveries, and a
        message stopped on its last one is redelivered, not dead-lettered. A blocking handler's
        thread cannot be interrupted: it is abandoned (a daemon thread).
        """
        if self._stopped:
            return
        self._stopped = True
        self._receives_cancelled.set()
        self._stopping = True
        if self._queue_publisher is not None and self._queue_publisher.consumer is self:
            self._queue_publisher.consumer = None
        self._wake.set()
        tasks = [*self._tasks, *self._running]
        for task in tasks:
            task.cancel()
        # Not cancelled (its thread would go on): waited for with the tasks, and what it
        # received is released below.
        receiving = list(self._receiving)
        waited: list[asyncio.Task[Any]] = [*tasks, *receiving]
        if waited:
            _, stuck = await asyncio.wait(waited, timeout=STOP_GRACE_SECONDS)
            for left in stuck:
                if left not in receiving:
                    logger.warning("task %s ignored cancellation; abandoning it",
                                   left.get_name())
        self._tasks.clear()
        for received in receiving:
            if received.done() and not received.cancelled() and received.exception() is None:
                self._interrupted.extend(qm.lock_token for qm in received.result()[1]
                                         if qm.lock_token is not None)
        if self._store is not None and self._awaiting_commit:
            # Commit what the finished deliveries wrote, so they are completed below.
            with contextlib.suppress(sqlite3.Error):  # counted in `failed_commits`
                self._store.flush()
        if self._to_complete:
            tokens = self.completions()
            try:
                await asyncio.to_thread(self.queue.complete_many, tokens)
            except QueueUnavailableError as exc:
                logger.warning("could not complete %d processed message(s) at stop (%s); "
                               "they are redelivered when their locks expire", len(tokens), exc)
        if self._store is not None:
            # Whatever ran since the last completion (a delivery cancelled above is
            # redelivered and applied again either way).
            if isinstance(self.runtime.dead_letterer, _CommitFirst):
                self.runtime.dead_letterer = self.runtime.dead_letterer.inner
            self._store.on_flushed = None
            try:
                self._store.commit_each_call()
            except sqlite3.Error as exc:
                logger.warning("the vehicle state store could not commit at stop (%s); the "
                               "deliveries that wrote are redelivered", exc)
            self._store = None
        if self._interrupted:
            tokens, self._interrupted = self._interrupted, []
            try:
                await asyncio.to_thread(self._release, tokens)
            except QueueUnavailableError as exc:
                logger.warning("could not release %d lock(s) at stop (%s); they expire",
                               len(tokens), exc)
        if self._http is not None:
            # Requests being answered get a short grace (STOP_GRACE_SECONDS).
            await self._http.stop(STOP_GRACE_SECONDS)
            self._http = None
        await self.runtime.close()

    def _release(self, lock_tokens: list[str]) -> None:
        """Release the locks of deliveries the stop interrupted, without counting them."""
        for token in lock_tokens:
            with contextlib.suppress(LockLostError):
                self.queue.abandon(token, uncount=True)

    def _http_handler(self, fn: HttpFunction) -> Handler:
        keyed = needs_local_key(fn)

        async def handle(request: Request) -> Response:
            if keyed and not has_key(self.function_key, request.query, request.headers):
                return json_response(401, {"error": (
                    "this route needs the local host's key, printed at start-up (it changes on "
                    "every run): pass it as ?code=KEY or in an x-functions-key header")})
            authority = request.headers.get("Host") or f"{self.host}:{self.port}"
            req = func.HttpRequest(
                method=request.method,
                url=f"http://{authority}{request.target}",
                headers=dict(request.headers),
                params=request.query,
                route_params=dict(request.route_params),
                body=request.body,
            )
            extra = (
                {"context": invocation_context(fn.name, request.headers)}
                if fn.wants_context else {}
            )
            answered = self.observer(fn.route, request.method, request.headers, request.body)
            try:
                resp = await _call(fn.handler, req, **extra)
            except Exception:
                logger.exception("function %s failed", fn.name)
                answered(500, b"")
                return json_response(500, {"error": "internal error"})
            body = resp.get_body()
            answered(resp.status_code, body)
            headers = dict(resp.headers)
            if resp.mimetype and "Content-Type" not in headers:
                headers["Content-Type"] = resp.mimetype
            return Response(resp.status_code, body, headers)

        return handle

    async def _fetch(self, fn: QueueFunction) -> None:
        """Locks as many messages as there are free workers, in one receive, and runs each.

        At most `workers` messages are processed at once (like the host's
        `maxConcurrentCalls`), and none is locked without a worker ready for it.
        """
        while not self._stopping:
            # With every handler thread stuck, messages stay in the queue (not received, not
            # counted) until a thread returns: receiving them would only fail them.
            free = 0 if self._pool_exhausted() else self.workers - len(self._running)
            if free <= 0:
                # Nothing to receive for, but what finishes meanwhile is completed: its lock is
                # no longer renewed, and would expire (redelivered, or dead-lettered after its
                # last delivery) before a worker is free.
                self._slot_free.clear()
                self._wake.clear()
                await self._complete_finished()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):
                        await _until_either(self._slot_free, self._wake)
                continue
            completing = self.completions()
            try:
                completed, received = await self._complete_and_receive(completing, free)
            except asyncio.CancelledError:
                # Stopping: the call may never have started in its thread, so `stop` completes
                # them (a second completion of one that was completed is a harmless no-op).
                self.not_completed(completing)
                raise
            except Exception as exc:
                self.not_completed(completing)  # the next try takes them
                self._queue_failed("receive", exc)
                await asyncio.sleep(self.poll_interval)
                continue
            self._queue_error = None
            _log_lost(completing, completed)
            if not received:
                if self._to_complete:
                    continue  # finished meanwhile: complete them now, not after a poll
                await self._checkpoint_when_idle()

                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
                continue
            for qm in received:
                self._start_one(fn, qm)

    async def _complete_and_receive(
        self, completing: list[str], free: int,
    ) -> tuple[list[LockLostError | None], list[QueuedMessage]]:
        """`complete_and_receive` on the loop, or in a thread when the queue is busy. The
        thread cannot be interrupted: `stop` tells it to receive nothing
        (`_receives_cancelled`), and releases what it received before then (`_receiving`)."""
        return await on_loop_unless_busy(
            self.queue.complete_and_receive, completing, max_messages=free,
            lock_duration=self.lock_duration,
            in_thread={"cancelled": self._receives_cancelled}, track=self._receiving)

    async def _complete_finished(self) -> None:
        """Complete the finished messages (`completions`) in a transaction of their own, for
        when no receive comes to carry them. A failure leaves them for the next try."""
        completing = self.completions()
        if not completing:
            return
        try:
            completed = await on_loop_unless_busy(self.queue.complete_many, completing)
        except asyncio.CancelledError:
            self.not_completed(completing)  # stopping: `stop` completes them
            raise
        except Exception as exc:
            self.not_completed(completing)
            self._queue_failed("completion", exc)
            return
        self._queue_error = None
        _log_lost(completing, completed)

    def _queue_failed(self, operation: str, exc: Exception) -> None:
        """A queue call of the fetcher failed: logged once until one succeeds, and reported
        by `/api/health` meanwhile."""
        if self._queue_error is None:
            logger.exception("local queue %s failed; retrying", operation)
        self._queue_error = f"local queue {operation} failed: {exc}"

    async def _checkpoint_when_idle(self) -> None:
        """With nothing to receive, every IDLE_CHECKPOINT_SECONDS: the write-ahead log is
        copied into the database file and cut to nothing, so it never keeps a small disk full
        (SQLite's automatic checkpoint waits for 1,000 pages, 4 MB)."""
        now = asyncio.get_running_loop().time()
        if now - self._last_checkpoint < IDLE_CHECKPOINT_SECONDS:
            return
        self._last_checkpoint = now
        try:
            await asyncio.to_thread(self.queue.checkpoint)
        except QueueUnavailableError as exc:
            logger.warning("idle checkpoint of the local queue failed: %s", exc)

    def _start_one(self, fn: QueueFunction, qm: QueuedMessage) -> None:
        assert qm.lock_token is not None
        task = asyncio.create_task(self._run_one(fn, qm))
        self._running.add(task)
        self._unstarted[task] = qm.lock_token
        task.add_done_callback(self._finished)

    # The queue publisher's consumer (`LocalQueuePublisher.consumer`): events stored while
    # workers are free are locked in the send's own transaction and start here at once.

    def _pool_exhausted(self) -> bool:
        exhausted = self.runtime.registry.pool.exhausted
        if exhausted != self._exhausted_logged:
            self._exhausted_logged = exhausted
            if exhausted:
                logger.error("%s", self._exhausted_message())
            else:
                logger.warning("a stuck handler thread returned; taking messages again")
        return exhausted

    def _exhausted_message(self) -> str:
        pool = self.runtime.registry.pool
        return (f"all {pool.limit} handler threads are stuck in handlers that timed out: not "
                "taking messages (they stay in the queue) until one returns or the host "
                "restarts; find the hanging handler in the timeout warnings")

    def _health_warnings(self) -> list[str]:
        return [self._exhausted_message()] if self.runtime.registry.pool.exhausted else []

    def free_workers(self) -> int:
        if self._stopping or len(self.queue_functions) != 1 or self._pool_exhausted():
            return 0
        return self.workers - len(self._running)

    def deliver(self, messages: list[QueuedMessage]) -> None:
        (fn,) = self.queue_functions
        for qm in messages:
            self._start_one(fn, qm)

    def _completion_due(self) -> None:
        self._completion_timer = None
        if self._to_complete:
            self._wake.set()

    def completions(self) -> list[str]:
        """The finished messages to complete now: those whose vehicle state store writes are
        committed (a message completed before its state and inbox record are on disk would
        never be redelivered to write them). When a commit failed since these deliveries
        ran, their writes may be lost: they are not completed, and are redelivered when their
        locks expire."""
        if self._store_commit_failed() or not self._to_complete:
            return []
        tokens, self._to_complete = self._to_complete, []
        return tokens

    def _store_commit_failed(self) -> bool:
        """Whether a commit of the store failed since the last look: then every finished
        delivery not yet completed is left to be redelivered (its writes may be lost)."""
        store = self._store
        if store is None or store.failed_commits == self._store_failures:
            return False
        self._store_failures = store.failed_commits
        lost = len(self._to_complete) + len(self._awaiting_commit)
        self._to_complete, self._awaiting_commit = [], []
        if lost:
            logger.warning("%d processed message(s) are left to be redelivered when their locks "
                           "expire: the vehicle state store could not commit their writes (%s)",
                           lost, store.commit_error)
        return True

    def _store_flushed(self) -> None:
        """The store committed, or failed to (`on_flushed`): the deliveries whose writes it
        committed are ready to complete."""
        store = self._store
        if store is None or not self._awaiting_commit or self._store_commit_failed():
            return
        committed = store.last_committed
        waiting = self._awaiting_commit
        self._awaiting_commit = [entry for entry in waiting if entry[0] > committed]
        for number, token in waiting:
            if number <= committed:
                self._ready(token)

    def _ready(self, lock_token: str) -> None:
        """A delivery is done with (its store writes committed): complete its message with
        the next send's transaction (the queue publisher takes it) when one comes within
        COMPLETION_DELAY_SECONDS, else by the fetcher, woken for it then: a crash between
        handling and completion hands the event to a handler again, so that window stays a
        few milliseconds past the commit even when no event arrives."""
        self._to_complete.append(lock_token)
        if self._queue_publisher is None:
            self._wake.set()
        elif self._completion_timer is None:
            self._completion_timer = asyncio.get_running_loop().call_later(
                COMPLETION_DELAY_SECONDS, self._completion_due)

    def completions_waiting(self) -> int:
        """Finished messages not completed yet, whose store writes are committed."""
        return len(self._to_complete)

    def not_completed(self, lock_tokens: list[str]) -> None:
        self._to_complete[:0] = lock_tokens

    def wake(self) -> None:
        self._wake.set()

    async def _health_problem(self) -> str | None:
        if self.queue.store_failure is not None:  # webhooks are answered 503 meanwhile
            return f"events cannot be stored: {self.queue.store_failure}"
        if self._queue_error is not None:
            return self._queue_error
        if self._store is not None and self._store.commit_error is not None:
            return f"the vehicle state store cannot commit: {self._store.commit_error}"
        try:
            await asyncio.to_thread(self.queue.check_readable)
        except QueueUnavailableError as exc:
            return str(exc)
        return None

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        token = self._unstarted.pop(task, None)
        if token is not None:  # cancelled by the stop before it ran: released uncounted
            self._interrupted.append(token)
        self._slot_free.set()

    async def _timer(self, fn: TimerFunction) -> None:
        """Like the host's timer trigger: one run at a time, never overlapping itself."""
        while not self._stopping:
            await asyncio.sleep(self.timer_interval)
            try:
                await _call(fn.handler, TimerRequest(past_due=False))
            except Exception:
                logger.exception("timer function %s failed; it runs again next interval", fn.name)

    async def _run_one(self, fn: QueueFunction, qm: QueuedMessage) -> None:
        assert qm.lock_token is not None
        task = asyncio.current_task()
        if task is not None:
            self._unstarted.pop(task, None)
        message = to_function_message(qm)
        self._held[qm.lock_token] = asyncio.get_running_loop().time()
        timeout = self.runtime.settings.function_timeout_seconds
        HANDLER_SECONDS.set(None)  # this task's own measure, not its creator's
        HANDLER_ERROR.set(None)
        jobs = DeliveryJobs()  # this task's context only: its calls into the handler pool
        CURRENT_DELIVERY.set(jobs)
        store_failures = None if self._store is None else self._store.failed_commits
        try:
            # The function timeout, as host.json's functionTimeout in Azure: the function
            # (and whatever handler it is in) is cancelled and the delivery fails.
            async with asyncio.timeout(timeout) as deadline:
                await _call(fn.handler, message)
        except asyncio.CancelledError:
            if self._stopping:
                self._interrupted.append(qm.lock_token)
            raise
        except TimeoutError as exc:
            if deadline.expired():
                self._held.pop(qm.lock_token, None)  # no longer renewed
                error = TimeoutError(f"the function timeout ({timeout:g} s) expired in handler "
                                     f"{RUNNING_HANDLER.get() or '(none)'}")
                self._observe_attempt(qm, error)
                if jobs.waiting:
                    await self._never_started(fn, qm, timeout)
                else:
                    await self._timed_out(fn, qm, timeout)
            else:  # the function's own TimeoutError: a failure like any other
                self._observe_attempt(qm, exc)
                await self._failed(fn, qm, exc)
        except Exception as exc:
            self._observe_attempt(qm, exc)
            await self._failed(fn, qm, exc)
        else:
            # Returned: handled, or a handler failed and its retry is scheduled on the queue.
            self._observe_attempt(qm, HANDLER_ERROR.get())
            if self._store is not None and self._store.failed_commits != store_failures:
                logger.warning("message %s is left to be redelivered when its lock expires: "
                               "the vehicle state store could not commit its writes",
                               qm.message_id)
                return
            # Its store writes, if they wait in the store's open transaction, are committed
            # within FLUSH_SECONDS; the message is completed after that.
            transaction = None if self._store is None else self._store.writing_in()
            if transaction is not None:
                self._awaiting_commit.append((transaction, qm.lock_token))
            else:
                self._ready(qm.lock_token)
        finally:
            self._held.pop(qm.lock_token, None)

    def _observe_attempt(self, qm: QueuedMessage, error: BaseException | None) -> None:
        """Tell the inspector how long this attempt's handlers ran and, when it failed, what
        they raised (the processor wraps a handler's exception: its cause is the one)."""
        if self.attempt_observer is None:
            return
        seconds = HANDLER_SECONDS.get()
        cause = None if error is None else (error.__cause__ or error)
        try:
            self.attempt_observer(qm.message_id, qm.delivery_count,
                                  None if seconds is None else seconds * 1000.0, cause)
        except Exception:  # the page is a development aid: it never fails a delivery
            logger.exception("inspector: cannot record the attempt of message %s", qm.message_id)

    async def _failed(self, fn: QueueFunction, qm: QueuedMessage, exc: Exception) -> None:
        assert qm.lock_token is not None
        logger.info(
            "function %s raised %s for message %s (delivery %d); abandoning",
            fn.name, type(exc).__name__, qm.message_id, qm.delivery_count,
            exc_info=logger.isEnabledFor(logging.DEBUG),
        )
        last = qm.delivery_count >= self.queue.max_delivery_count
        if last and not self._committed_before_dead_letter(qm):
            return
        if await self._settle(self._abandon, qm.lock_token) and last:
            self._record_dead_lettered(qm, exc)

    async def _never_started(self, fn: QueueFunction, qm: QueuedMessage, after: float) -> None:
        """The delivery timed out waiting for a handler thread (all busy or stuck): its
        handler never ran, so the delivery does not count; released after the backoff."""
        assert qm.lock_token is not None
        delay = retry_delay(1, self.runtime.settings)
        logger.warning(
            "function %s timed out after %gs on event %s before its handler %s could start "
            "(every handler thread busy or stuck, %d stuck); released without counting the "
            "delivery, retrying in %gs", fn.name, after, qm.message_id,
            RUNNING_HANDLER.get() or "(none)", self.runtime.registry.pool.stuck, delay,
        )
        await self._settle(functools.partial(self._abandon, retry_after=delay, uncount=True),
                           qm.lock_token)

    async def _timed_out(self, fn: QueueFunction, qm: QueuedMessage, after: float) -> None:
        """A failed delivery: warn, then release the message after the processor's backoff
        (dead-letter it after its last delivery), without holding a worker meanwhile."""
        assert qm.lock_token is not None
        settings = self.runtime.settings
        last = qm.delivery_count >= settings.max_delivery_count
        delay = retry_delay(qm.delivery_count, settings)
        # The handler is code we ship; the message id is the eventId (or a hash of the body).
        logger.warning(
            "function %s timed out after %gs (%s) on event %s (eventType %s, delivery %d of "
            "%d) in handler %s; cancelled, %s", fn.name, after, FUNCTION_TIMEOUT_SECONDS,
            qm.message_id, qm.application_properties.get("eventType"), qm.delivery_count,
            settings.max_delivery_count, RUNNING_HANDLER.get() or "(none)",
            "it will be dead-lettered" if last else f"retrying in {delay:g}s",
        )
        pool = self.runtime.registry.pool
        if pool.stuck:
            logger.warning(
                "%d handler thread(s) stuck in handlers that timed out; replaced up to %d "
                "threads in all", pool.stuck, pool.limit,
            )
        if last and not self._committed_before_dead_letter(qm):
            return
        settled = await self._settle(functools.partial(self._abandon, retry_after=delay),
                                     qm.lock_token)
        if settled and last:
            self._record_dead_lettered(qm, TimeoutError(f"{FUNCTION_TIMEOUT_SECONDS}={after:g}"))

    def _committed_before_dead_letter(self, qm: QueuedMessage) -> bool:
        """The last delivery failed, and its abandon dead-letters the message: commit the
        store's deferred writes first (as `_CommitFirst` does for the processor's own
        dead-letters), so no event is dead-lettered before what it wrote is on disk. False
        when the commit fails: the message is then left to be redelivered when its lock
        expires."""
        if self._store is None:
            return True
        try:
            self._store.flush()
        except sqlite3.Error as exc:
            logger.warning("message %s is left to be redelivered when its lock expires: the "
                           "vehicle state store could not commit its writes (%s)",
                           qm.message_id, exc)
            return False
        return True

    def _record_dead_lettered(self, qm: QueuedMessage, exc: BaseException) -> None:
        """The last delivery failed, and its abandon dead-lettered the message: that is its
        final outcome, and handled.jsonl records every final outcome (once: not when the
        queue's sweep dead-lettered it, see `_settle`)."""
        if self.runtime.handled_log is None:
            return
        try:
            self._append_dead_lettered(qm, exc)
        except OSError as error:  # a full disk: the dead letter itself is in the queue
            logger.warning("cannot record dead-lettered message %s in handled.jsonl: %s",
                           qm.message_id, error)

    def _append_dead_lettered(self, qm: QueuedMessage, exc: BaseException) -> None:
        assert self.runtime.handled_log is not None
        self.runtime.handled_log.append(outcome_record(
            InboundMessage(body=qm.body, message_id=qm.message_id,
                           delivery_count=qm.delivery_count),
            str(Outcome.DEAD_LETTERED),
            reason=MAX_DELIVERY_COUNT_EXCEEDED,
            description=f"{type(exc.__cause__ or exc).__name__} on the last of "
                        f"{self.queue.max_delivery_count} deliveries",
        ))

    async def _abandon(self, lock_token: str, **options: Any) -> None:
        await asyncio.to_thread(self.queue.abandon, lock_token, **options)

    async def _settle(self, action: Callable[[str], Awaitable[None]], lock_token: str) -> bool:
        """Settle a delivery, trying again while the queue cannot be written (a full disk):
        given up, the message would stay locked until its lock expires (a minute by
        default) before anyone could handle it again. Tries until the lock has expired,
        when the queue owns the message again anyway.

        True when this settled it. False when the queue settles it instead: the lock was
        gone, or is left to expire; a last delivery's message is then dead-lettered by the
        queue's lock-expiry sweep, which records it in handled.jsonl itself."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_duration
        delay = SETTLE_RETRY_FIRST_SECONDS
        while True:
            try:
                await action(lock_token)
                return True
            except LockLostError:
                # Already settled by the function (dead-lettered) or the lock expired: in
                # both cases the queue owns the message again, as Service Bus would.
                logger.debug("lock %s no longer held at settlement", lock_token)
                return False
            except QueueUnavailableError as exc:
                if self._stopping or loop.time() + delay > deadline:
                    logger.warning("cannot settle a delivery (%s); its message is delivered "
                                   "again when its lock expires", exc)
                    return False
                logger.warning("cannot settle a delivery (%s); trying again in %gs", exc,
                               delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, SETTLE_RETRY_MAX_SECONDS)

    async def _renew_locks(self) -> None:
        """Like the Functions host's auto lock renewal: the lock of every running function is
        renewed once a third of its duration has passed, by one task for all of them."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.lock_duration / 6)
            due = [token for token, at in self._held.items()
                   if loop.time() - at >= self.lock_duration / 3]
            if not due:
                continue
            started = loop.time()
            try:
                lost = await asyncio.to_thread(self._renew_many, due)
            except QueueUnavailableError as exc:
                logger.warning("could not renew %d lock(s) (%s); retrying", len(due), exc)
                continue
            for token in due:
                if token in self._held:
                    if token in lost:
                        del self._held[token]  # settled meanwhile, or expired
                    else:
                        self._held[token] = started

    def _renew_many(self, lock_tokens: list[str]) -> set[str]:
        lost: set[str] = set()
        for token in lock_tokens:
            try:
                self.queue.renew_lock(token, lock_duration=self.lock_duration)
            except LockLostError:
                lost.add(token)
        return lost


def _log_lost(lock_tokens: list[str], completed: list[LockLostError | None]) -> None:
    for token, lost in zip(lock_tokens, completed, strict=True):
        if lost is not None:
            # The lock expired while the function ran: the queue owns the message again, as
            # Service Bus would, and redelivers it.
            logger.debug("lock %s no longer held at settlement", token)


async def _until_either(first: asyncio.Event, second: asyncio.Event) -> None:
    """Wait until `first` or `second` is set."""
    if first.is_set() or second.is_set():
        return
    waits = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def http_origin(host: str, port: int) -> str:
    """`http://host:port`, an IPv6 address in brackets (`HOST=::1`)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
