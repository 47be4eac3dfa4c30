"""The engine on a background thread, fed and drained by asyncio request handlers.

The engine is not thread-safe, and only its thread touches it. Handlers never wait for it on the event loop:
they post work (add requests, abort one, warm a prefix) to an inbox that the engine thread runs between steps,
and await the answer on a future; the engine's numbers for /metrics are a snapshot it publishes after each step.
So a long step (a prefill chunk) delays when a new request starts, never the HTTP handling of anyone else.
A request arriving during a background prefill is let in at the next step boundary (the engine preempts it).

Each request gets an asyncio queue that receives its StepOutputs; a handler that goes away (client disconnect)
aborts its request, which frees the slot and KV blocks at the next step boundary.

The waiting line is bounded: a submission that would put more than `max_waiting` engine requests in line
behind the running ones is refused (`Overloaded`, a 429 with Retry-After) before anything is queued.
The engine fails only the requests a failed step must fail (see Engine.step); should a step still raise,
the loop drops that step's requests and keeps serving.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import sys
import threading
import time
from dataclasses import dataclass

from ..engine import Engine, StepOutput
from ..sampling import SamplingParams
from ..stats import format_stats
from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("qwen36.server")


class Overloaded(APIError):
    """The server's line is full: a 429 with Retry-After (the client retries later)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, 429, type_="rate_limit_error", code="server_overloaded")
        self.headers = {"Retry-After": str(retry_after)}


@dataclass
class RequestTiming:
    """What the per-request log line reports (logged at info when the request ends)."""
    start: float
    prompt: int
    first: float | None = None
    generated: int = 0
    cached: int = 0

    def log(self, rid: str, finish: str | None) -> None:
        line = format_stats(self.prompt, self.generated, self.start, self.first, now(), self.cached)
        log.info("%s: %s | finish %s", rid, line.removeprefix("[stats] "), finish)


@dataclass
class Submission:
    """One engine request to add: its prompt, sampling, forced opening and media."""
    prompt_ids: list[int]
    params: SamplingParams
    force: tuple[int | None, list[int]] | None = None
    mm: object = None
    cache_salt: str = ""


class EngineRunner:
    def __init__(self, engine: Engine, max_waiting: int | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.capacity = len(engine.scheduler.free_slots)    # slots (all free at start): requests that run at once
        self.inbox: collections.deque = collections.deque()    # callables the engine thread runs between steps
        self.wake = threading.Event()
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}   # engine thread's
        self.active: set[str] = set()            # event loop's view: submitted, not finished nor aborted
        self.pending = 0                         # event loop's: engine requests posted, not yet answered
        self.timing: dict[str, RequestTiming] = {}          # per request: what its log line reports
        self.metrics = Metrics(self.load)
        self._snapshot = self._load()
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="qwen36-engine", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------- called on the event loop
    async def submit(self, subs: list[Submission], q: asyncio.Queue) -> list[str]:
        """Add every submission, or none (a ValueError from the engine, e.g. too long for the context, is
        raised before anything runs); their outputs go to `q`. Refused with Overloaded when the line is full.
        A handler cancelled while this waits still gets its requests aborted."""
        if self.max_waiting is not None:
            queued = len(self.active) + self.pending + len(subs) - self.capacity
            if queued > self.max_waiting:
                self.metrics.rejected.labels("queue_full").inc()
                raise Overloaded(f"the server has {max(0, queued - len(subs))} requests waiting (limit "
                                 f"{self.max_waiting}, --max-waiting-requests); retry shortly")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending += len(subs)

        def add():                                           # on the engine thread
            rids = []
            try:
                for s in subs:
                    rids.append(self.engine.add_request(s.prompt_ids, s.params, force=s.force, mm=s.mm,
                                                        cache_salt=s.cache_salt))
            except Exception as e:  # noqa: BLE001 - handed to the handler (ValueError: a 400)
                for rid in rids:
                    self.engine.abort(rid)
                loop.call_soon_threadsafe(_settle, future, None, e)
                return
            for rid, s in zip(rids, subs):
                self.queues[rid] = (loop, q)
                self.timing[rid] = RequestTiming(now(), len(s.prompt_ids))
                self.metrics.prompt_tokens.inc(len(s.prompt_ids))
            loop.call_soon_threadsafe(_settle, future, rids, None)

        self._post(add)
        try:
            rids = await asyncio.shield(future)
        except asyncio.CancelledError:                      # the handler went away: abort once they exist
            future.add_done_callback(lambda f: [self.abort(r) for r in (f.result() or [])]
                                     if not f.cancelled() and f.exception() is None else None)
            raise
        finally:
            self.pending -= len(subs)
        self.active.update(rids)
        return rids

    def finished(self, rid: str) -> None:
        """The handler saw this request's last output (event loop)."""
        self.active.discard(rid)

    def abort(self, rid: str) -> None:
        """Stop a request (its client left or its job ended early); safe to call on a finished one."""
        self.active.discard(rid)

        def drop():
            self.engine.abort(rid)
            self.queues.pop(rid, None)
            if (t := self.timing.pop(rid, None)) is not None:
                t.log(rid, "abort (client gone)")
        self._post(drop)

    def warm(self, prompt_ids: list[int], cache_salt: str = "") -> None:
        """Prefill prompt_ids in the background while the server is idle (see Engine.warm); any thread."""
        self._post(lambda: self.engine.warm(prompt_ids, cache_salt))

    def load(self) -> dict[str, float]:
        """The engine's numbers as of its last step (no waiting)."""
        return self._snapshot

    def close(self) -> None:
        self._stop = True
        self.wake.set()
        self.thread.join(timeout=5)

    def _post(self, op) -> None:
        self.inbox.append(op)
        self.wake.set()

    # ---------------------------------------------------------------- the engine thread
    def _load(self) -> dict[str, float]:
        e = self.engine
        s, p = e.scheduler, e.prefix
        out = {"running": sum(not q.background for q in s.running),
               "waiting": sum(not q.background for q in s.waiting),
               "cache_usage": 1 - s.num_available / s.num_blocks,
               "preemptions": s.num_preemptions,
               "prompt_tokens_computed": e.stats.prompt_tokens_computed,
               "background_started": e.stats.background_started,
               "background_finished": e.stats.background_finished,
               "background_preempted": e.stats.background_preempted,
               "failed_passes": e.stats.failed_passes, "failed_requests": e.stats.failed_requests}
        if e.spec_k:
            out.update(spec_steps=e.stats.spec_steps, spec_draft_tokens=e.stats.draft_tokens,
                       spec_accepted_tokens=e.stats.accepted_tokens)
        if p is not None:
            out.update(prefix_hits=p.stats.hits, prompt_tokens_cached=p.stats.tokens_reused,
                       snapshots=p.num_snapshots, snapshots_saved=p.stats.snapshots_saved,
                       evictions=p.stats.evictions,
                       prefix_cache_bytes=p.num_snapshots * e.snapshot_bytes
                       + p.cached_only_blocks * e.cache.bytes_per_block())
        return out

    def _drain(self) -> None:
        while self.inbox:
            op = self.inbox.popleft()
            try:
                op()
            except Exception as e:  # noqa: BLE001 - one bad operation must not stop the loop
                print(f"qwen36: a server operation failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def _loop(self) -> None:
        while not self._stop:
            if not self.inbox and not self.engine.has_work():
                self.wake.wait(timeout=0.5)
            self.wake.clear()
            self._drain()
            if not self.engine.has_work():
                self._snapshot = self._load()
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step must not stop the server
                outs = self._fail_running(e)
            deliveries = [(self.queues.get(o.request_id), o) for o in outs]
            for o in outs:
                if o.finished:
                    self.queues.pop(o.request_id, None)
            self._snapshot = self._load()
            for target, out in deliveries:
                self.metrics.generation_tokens.inc(len(out.token_ids))
                self._time(out)
                if target is not None:
                    loop, q = target
                    loop.call_soon_threadsafe(q.put_nowait, out)

    def _time(self, out: StepOutput) -> None:
        t = self.timing.get(out.request_id)
        if t is None:
            return
        if out.token_ids and t.first is None:
            t.first = now()
        t.generated += len(out.token_ids)
        t.cached = out.cached_tokens
        if out.finished and self.timing.pop(out.request_id, None) is not None:
            t.log(out.request_id, out.finish_reason)

    def _fail_running(self, error: Exception) -> list[StepOutput]:
        """Last resort when a step raised (the engine isolates failures it can attribute): every request
        the engine holds fails; the loop goes on serving new ones."""
        outs = [StepOutput(rid, [], "", True, "error") for rid in self.engine.abort_all()]
        print(f"qwen36: an engine step failed and its {len(outs)} request(s) were dropped: "
              f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return outs


def _settle(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def now() -> float:
    return time.perf_counter()
