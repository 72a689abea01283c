"""Per-caller rate limits (edge/rates.py): the bucket's arithmetic against a
plain bound, then through a real server with tokens: a flooding caller is
slowed, refused when its wait outlasts its deadline or too many of its calls
wait, and another caller is not slowed at all."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from maxent_api._generated.maxent.v1 import maxent_pb2 as pb
from maxent_api._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc
from maxent_api import SERVICE_NAME
from maxent_server.edge.rates import CALL_BYTES, MAX_WAITING, CallerRates
from maxent_server.edge.refusal import Refusal
from ops_support import metadata, samples, scrape, value, write_tokens
from server_process import ServerProcess, free_port

MIB = 1024 * 1024
FLOODER = "rates-flooder-token-0123456789"
TRAINER = "rates-trainer-token-0123456789"
CONFIG = pb.WeightingConfig(tau=0.5, beta=0.05, target_entropy=1.0, tau_lr=0.2)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- the bucket ---------------------------------------------------------------------------


def _start(rates: CallerRates, caller: str, size: int) -> None:
    """A call that may start now: its turn taken (no wait) and its body counted."""
    turn = asyncio.run(rates.take_turn(caller, 0.0))
    assert turn.waited == 0.0
    rates.settle(turn, size)


@settings(max_examples=100, deadline=None)
@given(rate=st.floats(0.5, 64), burst=st.floats(1, 256),
       sizes=st.lists(st.integers(0, 8 * MIB), min_size=1, max_size=40))
def test_a_greedy_caller_gets_at_most_burst_plus_rate_times_time(rate, burst, sizes):
    """A caller that starts each call the moment it may: what it sent by time t
    is at most burst + rate * t plus its last call (the one that went into debt)."""
    clock = FakeClock()
    rates = CallerRates(rate, burst, clock=clock)
    sent = 0
    for size in sizes:
        clock.now += rates.wait_seconds("greedy")
        _start(rates, "greedy", size)
        sent += CALL_BYTES + size
        assert sent <= burst * MIB + rate * MIB * clock.now + CALL_BYTES + size + 1e-6 * sent


@settings(max_examples=100, deadline=None)
@given(rate=st.floats(1, 64), sizes=st.lists(st.integers(0, MIB), min_size=1, max_size=60))
def test_a_caller_below_its_rate_never_waits(rate, sizes):
    clock = FakeClock()
    rates = CallerRates(rate, 1.0 + 1e-9, clock=clock)  # a burst of one full-size call, no more
    for size in sizes:
        assert rates.wait_seconds("steady") == 0.0
        _start(rates, "steady", size)
        clock.now += (CALL_BYTES + size) / (rate * MIB) * 1.001  # a little slower than allowed


def test_callers_have_separate_buckets():
    clock = FakeClock()
    rates = CallerRates(1, 1, clock=clock)
    _start(rates, "a", 3 * MIB - CALL_BYTES)
    assert rates.wait_seconds("a") == pytest.approx(2.0)
    assert rates.wait_seconds("b") == 0.0
    clock.now = 2.5
    assert rates.wait_seconds("a") == 0.0


def test_take_turn_refuses_a_wait_past_the_deadline_and_changes_nothing():
    rates = CallerRates(1, 1)
    _start(rates, "a", 3 * MIB)
    before = rates.wait_seconds("a")
    with pytest.raises(Refusal) as refused:
        asyncio.run(rates.take_turn("a", 0.5))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in refused.value.message
    assert rates.wait_seconds("a") <= before  # not charged


def test_take_turn_waits_out_the_debt():
    rates = CallerRates(64, 1)
    _start(rates, "a", 7 * MIB - CALL_BYTES)  # 6 MiB of debt: about 0.1 s at 64 MiB/s
    turn = asyncio.run(rates.take_turn("a", None))
    assert turn.waited == pytest.approx(6 / 64, rel=0.05)


def test_calls_that_wake_together_do_not_all_start():
    """Eight calls of a caller in debt wait at once. Each start is charged the
    caller's last body size ahead, so they start one debt's worth apart instead
    of all together when the first debt is paid (time only adds to sleeps, so
    the bound is safe on a slow machine)."""
    rate, size = 64, 2 * MIB

    async def scenario() -> float:
        rates = CallerRates(rate, 1)
        turn = await rates.take_turn("a", None)
        rates.settle(turn, size)  # 1 MiB of debt, and the caller's bodies are 2 MiB
        started = time.monotonic()

        async def one() -> float:
            await rates.take_turn("a", None)
            return time.monotonic()

        starts = await asyncio.gather(*(one() for _ in range(8)))
        return max(starts) - started

    # The first waits for 1 MiB, each of the seven others for one call's cost.
    assert asyncio.run(scenario()) >= 0.95 * (MIB + 7 * (CALL_BYTES + size)) / (rate * MIB)


def test_too_many_waiting_calls_of_one_caller_are_refused():
    async def scenario() -> list[str]:
        rates = CallerRates(1, 1)
        rates.settle(await rates.take_turn("a", None), 3 * MIB)
        tasks = [asyncio.ensure_future(rates.take_turn("a", None)) for _ in range(MAX_WAITING + 3)]
        await asyncio.sleep(0.05)
        outcomes = ["waiting" if not t.done() else "refused" if isinstance(t.exception(), Refusal) else "ran"
                    for t in tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return outcomes

    assert sorted(asyncio.run(scenario())) == ["refused"] * 3 + ["waiting"] * MAX_WAITING


# -- through a server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A server allowing each caller 2 MiB/s with a 2 MiB burst."""
    folder = tmp_path_factory.mktemp("rates")
    tokens = write_tokens(folder / "tokens.json", [
        {"name": "flooder", "token": FLOODER, "role": "read", "runs": ["flood/*"]},
        {"name": "trainer", "token": TRAINER, "role": "write", "runs": ["train/*"]},
    ])
    port = free_port()
    proc = ServerProcess(folder / "data", extra_args=[
        "--auth-tokens", str(tokens), "--metrics-port", str(port), "--metrics-without-token",
        "--caller-rate-mb", "2", "--caller-burst-mb", "2"]).start()
    channel = grpc.insecure_channel(proc.target, options=[("grpc.max_send_message_length", 64 * MIB),
                                                       ("grpc.max_receive_message_length", 64 * MIB)])
    yield SimpleNamespace(proc=proc, stub=pb_grpc.MaxEntServiceStub(channel), url=f"http://127.0.0.1:{port}/metrics")
    channel.close()
    proc.stop()


def _half_mib_request() -> pb.ComputeRewardStatisticsRequest:
    utilities = np.random.default_rng(0).normal(size=65536)  # 512 KiB of doubles
    return pb.ComputeRewardStatisticsRequest(utilities=utilities.tolist(), group_sizes=[64] * 1024)


def _rate_limited(url: str, method: str) -> float:
    return value(samples(scrape(url)[1]), "maxent_rate_limited_calls_total", method=method)


def test_a_flooding_caller_is_held_to_its_rate_and_another_caller_is_not_slowed(limited):
    request = _half_mib_request()
    stop = threading.Event()
    sent: list[float] = []

    def flood() -> None:
        while not stop.is_set():
            limited.stub.ComputeRewardStatistics(request, metadata=metadata(FLOODER), timeout=60)
            sent.append(time.monotonic())

    limited.stub.CreateRun(pb.CreateRunRequest(run_id="train/a", config=CONFIG), metadata=metadata(TRAINER))
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        floods = [pool.submit(flood) for _ in range(2)]
        for step in range(1, 21):
            limited.stub.UpdateController(
                pb.UpdateControllerRequest(run_id="train/a", global_step=step, weight_entropy=0.8, measured_kl=0.01),
                metadata=metadata(TRAINER), timeout=30)
            time.sleep(0.1)
        stop.set()
        for f in floods:
            f.result()
    elapsed = time.monotonic() - started
    per_call = request.ByteSize() + CALL_BYTES
    # At 2 MiB/s after a 2 MiB burst, plus the calls that were already admitted.
    assert len(sent) * per_call <= 2 * MIB + 2 * MIB * elapsed + 2 * per_call
    assert len(sent) >= 4, "the flood made no progress at all"
    assert _rate_limited(limited.url, "ComputeRewardStatistics") > 0
    assert _rate_limited(limited.url, "UpdateController") == 0
    state = limited.stub.GetRun(pb.GetRunRequest(run_id="train/a"), metadata=metadata(TRAINER)).run.state
    assert state.version == 20


def test_a_wait_past_the_deadline_is_refused_before_the_body_is_read(limited):
    big = pb.ComputeRewardStatisticsRequest(utilities=[0.5] * 786432, group_sizes=[64] * 12288)  # 6 MiB
    limited.stub.ComputeRewardStatistics(big, metadata=metadata(FLOODER), timeout=60)  # about 4 MiB of debt
    received_before = _received(limited.url)
    with pytest.raises(grpc.RpcError) as refused:
        limited.stub.ComputeRewardStatistics(_half_mib_request(), metadata=metadata(FLOODER), timeout=0.3)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate limit" in refused.value.details()
    assert _received(limited.url) == received_before  # refused before its body was read
    # Once the debt is paid back (about 2 s at 2 MiB/s), the caller is served again.
    time.sleep(3.0)
    stats = limited.stub.ComputeRewardStatistics(_half_mib_request(), metadata=metadata(FLOODER), timeout=30)
    assert len(stats.advantages) == 65536


def _received(url: str) -> float:
    return value(samples(scrape(url)[1]), "maxent_rpc_received_bytes_total",
                 service=SERVICE_NAME, method="ComputeRewardStatistics")


@pytest.mark.parametrize("tokens", [True, False], ids=["rate-zero", "no-tokens"])
def test_no_limit_at_rate_zero_or_without_tokens(tmp_path, tokens):
    """--caller-rate-mb 0 turns the limit off; a server without tokens limits no one."""
    port = free_port()
    args = ["--metrics-port", str(port), "--caller-burst-mb", "1"]
    if tokens:
        path = write_tokens(tmp_path / "tokens.json", [{"name": "f", "token": FLOODER, "role": "read", "runs": ["*"]}])
        args += ["--auth-tokens", str(path), "--metrics-without-token", "--caller-rate-mb", "0"]
    else:
        args += ["--caller-rate-mb", "1"]
    proc = ServerProcess(tmp_path / "data", extra_args=args).start()
    try:
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.MaxEntServiceStub(channel)
            request = _half_mib_request()
            for _ in range(12):  # 6 MiB at once: far past a 1 MiB burst
                stub.ComputeRewardStatistics(request, metadata=metadata(FLOODER) if tokens else None, timeout=30)
        assert _rate_limited(f"http://127.0.0.1:{port}/metrics", "ComputeRewardStatistics") == 0
    finally:
        proc.stop()
