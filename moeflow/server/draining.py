"""uvicorn's Server, with a shutdown that drains the engine first, and a second signal that stops at once.

uvicorn on its own closes the listening socket at the first signal and cancels whatever is
still running after its grace period. Here the first SIGINT/SIGTERM instead makes the engine
client refuse new work (503) and lets running requests finish, up to a timeout after which
they are stopped with an error; only then does uvicorn shut down, and the exit status is 0.

A second signal stops at once, but not mid-sentence: every request still running is ended by
the engine client with an error its handler sends (a 503 body, or an error event then [DONE] in
a stream), the server waits a moment for those to go out, then exits with 128 + the signal
number, as a process killed by that signal would. A third signal exits without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn

from moeflow.server.engine_client import EngineClient

log = logging.getLogger("moeflow.server")
ABORT_GRACE_S = 3.0  # how long the errors of a stopped server may take to reach their clients


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, client: EngineClient, drain_timeout_s: float):
        super().__init__(config)
        self.client, self.drain_timeout_s = client, drain_timeout_s
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._abort_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        # Runs as a signal handler on the loop's thread; draining and stopping run as tasks. The signal is
        # not recorded for re-raising (as uvicorn does): the exit status says how the server ended.
        if self._loop is None:
            self.should_exit = self.force_exit = True
            self.exit_code = 128 + int(sig)
        elif self._drain_task is None:
            self._loop.call_soon_threadsafe(self._start, "_drain_task", self._drain)
        elif self._abort_task is None:
            self.exit_code = 128 + int(sig)
            self._loop.call_soon_threadsafe(self._start, "_abort_task", self._abort)
        else:
            self.should_exit = self.force_exit = True

    def _start(self, attr: str, work) -> None:
        if getattr(self, attr) is None:
            setattr(self, attr, asyncio.get_running_loop().create_task(work()))

    async def _drain(self) -> None:
        log.info("draining: refusing new requests, waiting up to %.0f s for %d running ones",
                 self.drain_timeout_s, self.client.num_live)
        if not await self.client.drain(self.drain_timeout_s):
            log.warning("drain timeout: stopped the requests still running")
            await self._responses_sent(ABORT_GRACE_S)
        self.should_exit = True

    async def _abort(self) -> None:
        running = self.client.num_live
        self.client.abort_all("the server was told to stop at once (a second signal): this request was stopped")
        await self.client.wait_idle(ABORT_GRACE_S)
        sent = await self._responses_sent(ABORT_GRACE_S)
        log.warning("stopped at once by a second signal: %d running requests ended with an error%s", running,
                    "" if sent else "; some responses were still being written")
        self.should_exit = True  # not force_exit: the app's lifespan still gets its shutdown

    async def _responses_sent(self, timeout: float) -> bool:
        """Wait until no request handler is running (their error responses are written), up to `timeout`."""
        deadline = time.monotonic() + timeout
        while self.server_state.tasks - {asyncio.current_task()}:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True
