"""The engine on a background thread, fed and drained by asyncio request handlers.

One lock guards the engine (it is not thread-safe): handlers add and abort under it, the loop thread
runs one step under it. A lock is not fair: the loop would take it back between steps before a waiting
handler wakes, and a request arriving during a background prefill waited for all of it. So handlers take it
through `_handler_lock`, and the loop lets them in first. Each request gets an asyncio queue that receives its StepOutputs; a handler
that goes away (client disconnect) aborts its request, which frees the slot and KV blocks at once.
An exception inside a step fails the requests of that step only; the loop keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..engine import Engine, StepOutput
from ..sampling import SamplingParams
from ..stats import format_stats


@dataclass
class Stats:
    """Counters and histograms for /metrics."""
    requests: dict[tuple[str, int], int] = field(default_factory=dict)    # (route, status) -> count
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)


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


log = logging.getLogger("qwen36.server")


class EngineRunner:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.stats = Stats()
        self.timing: dict[str, RequestTiming] = {}          # per request: what its log line reports
        self._stop = False
        self._waiting = 0                  # handlers waiting for the lock (the loop lets them go first)
        self._count = threading.Lock()     # guards _waiting
        self.thread = threading.Thread(target=self._loop, name="qwen36-engine", daemon=True)
        self.thread.start()

    @contextmanager
    def _handler_lock(self):
        with self._count:
            self._waiting += 1
        try:
            self.lock.acquire()
        finally:
            with self._count:
                self._waiting -= 1
        try:
            yield
        finally:
            self.lock.release()

    def submit(self, prompt_ids: list[int], params: SamplingParams, q: asyncio.Queue | None = None,
               force: tuple[int | None, list[int]] | None = None, mm=None) -> tuple[str, asyncio.Queue]:
        """Queue a request whose outputs go to `q` (new if None); raises ValueError (e.g. too long for the
        context) before anything runs."""
        loop = asyncio.get_running_loop()
        q = q if q is not None else asyncio.Queue()
        with self._handler_lock():
            rid = self.engine.add_request(prompt_ids, params, force=force, mm=mm)
            self.queues[rid] = (loop, q)
        self.stats.prompt_tokens += len(prompt_ids)
        self.timing[rid] = RequestTiming(now(), len(prompt_ids))
        self.wake.set()
        return rid, q

    def warm(self, prompt_ids: list[int]) -> None:
        """Prefill prompt_ids in the background while the server is idle (see Engine.warm)."""
        with self._handler_lock():
            rid = self.engine.warm(prompt_ids)
        if rid is not None:
            self.wake.set()

    def abort(self, rid: str) -> None:
        with self._handler_lock():
            self.engine.abort(rid)
            self.queues.pop(rid, None)
        if (t := self.timing.pop(rid, None)) is not None:
            t.log(rid, "abort (client gone)")

    def close(self) -> None:
        self._stop = True
        self.wake.set()
        self.thread.join(timeout=5)

    def load(self) -> dict[str, float]:
        with self._handler_lock():                     # the engine thread changes these between steps
            return self._load()

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
               "background_preempted": e.stats.background_preempted}
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

    def _loop(self) -> None:
        while not self._stop:
            self.wake.wait(timeout=0.5)
            deadline = time.monotonic() + 0.05
            while self._waiting > 0 and time.monotonic() < deadline:   # handlers first (see the docstring)
                time.sleep(0.0002)
            with self.lock:
                if not self.engine.has_work():
                    self.wake.clear()
                    continue
                try:
                    outs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - a failed step must not stop the server
                    outs = self._fail_running(e)
                deliveries = [(self.queues.get(o.request_id), o) for o in outs]
                for o in outs:
                    if o.finished:
                        self.queues.pop(o.request_id, None)
            for target, out in deliveries:
                self.stats.generation_tokens += len(out.token_ids)
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
        outs = [StepOutput(rid, [], "", True, "error") for rid in self.engine.abort_all()]
        print(f"qwen36: an engine step failed and its {len(outs)} request(s) were dropped: "
              f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return outs


def now() -> float:
    return time.perf_counter()
