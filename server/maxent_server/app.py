"""Server assembly: the MaxEnt service, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from maxent_client._generated.maxent.v1 import maxent_pb2 as pb
from maxent_client._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc

from .engine import Engine
from .service import MaxEntServicer
from .store import open_store

log = logging.getLogger("maxent_server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MaxEntService"].full_name


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: str = ""
    state_store: str = ""
    device: str = "auto"
    max_message_mb: int = 64
    grace_seconds: float = 10.0
    reward_workers: int | None = None
    reward_timeout_seconds: float = 5.0
    load_plugins: bool = True
    torch_threads: int = 1


class MaxEntServer:
    """One running server; `start()` then `wait()` (or `stop()`)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.port: int | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        s = self.settings
        self.store = open_store(s.state_store, s.data_dir)
        self.engine = Engine(s.device)
        if s.torch_threads > 0:
            # Small per-call tensors: intra-op threads mostly add contention
            # between concurrent calls on a busy CPU.
            torch.set_num_threads(s.torch_threads)
        self.rewards = _reward_runner(s)
        self.servicer = MaxEntServicer(self.store, self.engine, self.rewards)
        limit = s.max_message_mb * 1024 * 1024
        self.server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        )
        pb_grpc.add_MaxEntServiceServicer_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        address = f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}"
        self.port = self.server.add_insecure_port(address)
        await self.server.start()
        self.store.ping()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "maxent-server listening on %s:%d (device %s, store %s)",
            s.host,
            self.port,
            self.engine.device,
            getattr(self.store, "path", s.state_store),
        )

    async def stop(self) -> None:
        """Stop taking calls, finish those in flight within the grace period,
        close the store."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("draining: finishing calls in flight (grace %.1fs)", self.settings.grace_seconds)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_seconds)
        self.servicer.shutdown()
        if self.rewards is not None:
            self.rewards.close()
        self.store.close()
        log.info("maxent-server stopped")

    async def serve_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()


def _reward_runner(s: ServerSettings):
    try:
        from .rewards import RewardRunner
    except ImportError:  # TEMP-REWARDS
        return None

    return RewardRunner(workers=s.reward_workers, timeout_seconds=s.reward_timeout_seconds, load_plugins=s.load_plugins)
