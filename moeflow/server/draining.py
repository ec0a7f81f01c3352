"""uvicorn's Server, with a shutdown that drains the engine first.

uvicorn on its own closes the listening socket at the first signal and cancels whatever is
still running after its grace period. Here the first SIGINT/SIGTERM instead makes the engine
client refuse new work (503) and lets running requests finish, up to a timeout after which
they are stopped with an error; only then does uvicorn shut down. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from moeflow.server.engine_client import EngineClient

log = logging.getLogger("moeflow.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, client: EngineClient, drain_timeout_s: float):
        super().__init__(config)
        self.client, self.drain_timeout_s = client, drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        # Runs as a signal handler on the loop's thread; the drain itself runs as a task.
        # The signal is not recorded for re-raising (as uvicorn does), so a drained exit is status 0.
        if self._drain_task is not None or self._loop is None:
            self.should_exit = self.force_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        log.info("draining: refusing new requests, waiting up to %.0f s for %d running ones",
                 self.drain_timeout_s, self.client.num_live)
        if not await self.client.drain(self.drain_timeout_s):
            log.warning("drain timeout: stopped the requests still running")
            await asyncio.sleep(0.2)  # let the stopped requests send their error responses
        self.should_exit = True
