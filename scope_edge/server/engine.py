"""The engine behind the HTTP layer: one BatchRunner over the model, its
admission (a free slot, else a queue of queue_size, else 429) and the bridge
from its worker threads to asyncio."""
from __future__ import annotations

import asyncio
from typing import Any

from ..runtime.batch import BatchRunner, Item, NoFreeSlot, Request as Run
from ..runtime.model import Model
from .request import APIError, Job
from .settings import ServerSettings


class Engine:
    """The BatchRunner behind the HTTP layer: admission (a queue of
    queue_size, then 429) and the bridge from worker threads to asyncio."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.model = Model(settings.engine.path(), devices=settings.engine.devices)
        try:
            self.model.check_supported()
            self.runner = BatchRunner(self.model, settings.batch_settings())
        except BaseException:
            self.model.close()
            raise
        self.runner.on_free = self._slot_freed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._freed: asyncio.Event | None = None
        self.waiting = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on loop (at startup)."""
        self._loop, self._freed = loop, asyncio.Event()

    def _slot_freed(self) -> None:
        if self._loop is not None and self._freed is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._freed.set)

    async def start(self, job: Job) -> tuple[int, asyncio.Queue[Item], Run]:
        """(slot, the queue of the job's items, its run) once a slot is free."""
        assert self._loop is not None and self._freed is not None  # bind() ran at startup
        loop, items = self._loop, asyncio.Queue[Item]()

        def sink(item: Item) -> None:
            loop.call_soon_threadsafe(items.put_nowait, item)

        while True:
            self._freed.clear()
            try:
                req = await asyncio.to_thread(self.runner.start, job.prompt, policy=job.policy, limits=job.limits,
                                              sampling=job.sampling, sink=sink)
                return req.slot, items, req
            except NoFreeSlot:
                if self.waiting >= self.settings.queue_size:
                    raise APIError(429, f"all {self.settings.slots} slots are busy and {self.waiting} requests "
                                   "wait; retry later", kind="rate_limit_error", code="queue_full") from None
            except ValueError as why:
                raise APIError(400, f"{why}; raise --slot-cells or ask for smaller budgets", param="scope",
                               code="invalid_budget") from None
            self.waiting += 1
            try:
                await self._freed.wait()
            finally:
                self.waiting -= 1

    def health(self) -> dict[str, Any]:
        devices = self.settings.engine.devices
        return {"status": "ok", "model": self.settings.model_name, "slots": self.settings.slots,
                "free_slots": self.runner.free_slots(), "queued": self.waiting,
                "slot_cells": self.runner.settings.slot_cells,
                "devices": {"n_gpu_layers": devices.n_gpu_layers, "rpc_servers": list(devices.rpc_servers),
                            "offloaded": devices.offloads(), "capture_layers": self.runner.capture_layers}}

    def cancel_all(self) -> None:
        self.runner.cancel_all()

    def close(self) -> None:
        self.runner.close()
        self.model.close()
