"""Streaming on top of ``Engine``: one background thread runs ``Engine.step()`` while there is work, and hands each
request's outputs to its own ``asyncio.Queue`` on the caller's event loop. A consumer that stops iterating (a client
disconnect: ``GeneratorExit`` / ``CancelledError``) aborts its request, which frees its KV blocks at the next step."""
from __future__ import annotations

import asyncio
import threading
import uuid
import warnings
from typing import AsyncIterator, Optional

from .engine import Engine, RequestOutput
from .request import SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine, idle_wait_s: float = 0.05):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._queues: dict = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.error: Optional[BaseException] = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="spear-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    def _deliver(self, out: RequestOutput) -> None:
        q = self._queues.get(out.request_id)
        if q is not None:
            q.put_nowait(out)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_unfinished():
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # noqa: BLE001  (keep serving; the step's own requests were failed by step())
                self.error = e
                warnings.warn(f"AsyncEngine: step raised {type(e).__name__}: {e}")
                continue
            if outs and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._deliver_all, outs)

    def _deliver_all(self, outs) -> None:
        for out in outs:
            self._deliver(out)

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._wake.set()

    async def generate(self, prompt, sampling: Optional[SamplingParams] = None, request_id: Optional[str] = None,
                       ttft_slo_s: Optional[float] = None,
                       tpot_slo_s: Optional[float] = None) -> AsyncIterator[RequestOutput]:
        """Yields a RequestOutput each time the request gets tokens; the last one has ``finished=True``. Bad input
        raises ``SpearError`` at the first iteration, before anything is queued."""
        await self.start()
        request_id = str(request_id) if request_id is not None else uuid.uuid4().hex
        if request_id in self._queues:
            from ..errors import SpearError
            raise SpearError(f"AsyncEngine: request id {request_id!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        finished = False
        try:
            self.engine.add_request(prompt, sampling, request_id=request_id, ttft_slo_s=ttft_slo_s,
                                    tpot_slo_s=tpot_slo_s)
        except Exception:
            self._queues.pop(request_id, None)
            raise
        self._wake.set()
        try:
            while True:
                out = await q.get()
                finished = out.finished
                yield out
                if finished:
                    break
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)
