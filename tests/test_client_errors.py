"""Every error detail the server attaches reaches the caller, on the sync and
the asyncio client: field violations, reward failures, the run a call was
about, and the raw google.rpc.Status."""

from __future__ import annotations

import asyncio
import pickle

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2

from maxent_client import (
    AlreadyExistsError,
    AsyncMaxEntClient,
    InvalidArgumentError,
    MaxEntClient,
    NotFoundError,
    ResourceInfo,
    RewardFailedError,
    RewardFailure,
    RewardFailurePolicy,
    RewardTerm,
    VersionConflictError,
    WeightingConfig,
)


@pytest.fixture(params=["sync", "asyncio"])
def call(request, server):
    """Calls one client method by name on a MaxEntClient or, in a fresh
    event loop, on an AsyncMaxEntClient."""
    if request.param == "sync":
        with MaxEntClient(server.target, timeout=60) as client:
            yield lambda method, *args, **kwargs: getattr(client, method)(*args, **kwargs)
        return

    def run(method, *args, **kwargs):
        async def once():
            async with AsyncMaxEntClient(server.target, timeout=60) as client:
                return await getattr(client, method)(*args, **kwargs)

        return asyncio.run(once())

    yield run


def _failing_batch():
    """Six completions in two groups; the flaky plugin raises on index 1
    and gives NaN on index 4."""
    return dict(completions=["fine", "RAISE here", "fine too", "also fine", "NAN", "ok"], group_sizes=[4, 2],
                answers=["", ""], rewards=[RewardTerm("keyword_match", 1.0, {"keyword": "ok"}),
                                           RewardTerm("flaky", 2.0)])


def test_reward_failures_arrive_one_per_failed_evaluation(call):
    with pytest.raises(RewardFailedError) as info:
        call("compute_reward_statistics", **_failing_batch(), on_failure=RewardFailurePolicy.ERROR)
    error = info.value
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert len(error.failures) == 2 and all(isinstance(f, RewardFailure) for f in error.failures)
    assert {(f.reward_index, f.reward_name, f.completion_index) for f in error.failures} == {
        (1, "flaky", 1), (1, "flaky", 4)}
    assert all(f.type == "REWARD_FAILED" and f.description.startswith("reward function ") for f in error.failures)
    assert error.violations == () and error.resource is None
    assert error.status.code == code_pb2.FAILED_PRECONDITION and error.status.message == error.message
    assert [d.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR) for d in error.status.details] == [True]


def test_step_statistics_carry_reward_failures_too(call, client, run_id):
    client.create_run(run_id, WeightingConfig(tau=0.5, beta=0.1))
    with pytest.raises(RewardFailedError) as info:
        call("compute_step_statistics", run_id, **_failing_batch(), on_failure=RewardFailurePolicy.ERROR,
             ref_logp_sum=[-1.0] * 6, ref_token_counts=[1] * 6)
    assert sorted(f.completion_index for f in info.value.failures) == [1, 4]


def test_field_violations_arrive_with_the_raw_status(call):
    with pytest.raises(InvalidArgumentError) as info:
        call("compute_reward_statistics", utilities=[1.0, 2.0], group_sizes=[1, 2])
    error = info.value
    assert [v.field for v in error.violations] == ["utilities"] and error.violations[0].description
    assert error.failures == () and error.resource is None
    assert error.status.code == code_pb2.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert error.status.details[0].Unpack(bad) and [v.field for v in bad.field_violations] == ["utilities"]


def test_a_missing_run_names_itself(call, run_id):
    for method in ("get_run", "delete_run"):
        with pytest.raises(NotFoundError) as info:
            call(method, run_id + "-missing")
        assert info.value.resource == ResourceInfo("maxent.v1.Run", run_id + "-missing")
        assert info.value.status.code == code_pb2.NOT_FOUND and info.value.violations == ()


def test_a_conflicting_run_names_itself_and_stays_as_it_was(call, client, run_id):
    client.create_run(run_id, WeightingConfig(tau=0.5, beta=0.1))
    with pytest.raises(AlreadyExistsError) as info:
        call("create_run", run_id, WeightingConfig(tau=0.7, beta=0.1))
    assert info.value.resource == ResourceInfo("maxent.v1.Run", run_id)
    assert info.value.status.code == code_pb2.ALREADY_EXISTS
    assert client.get_run(run_id).config.tau == 0.5


def test_a_status_without_details_still_has_its_raw_status(call, client, run_id):
    client.create_run(run_id, WeightingConfig(tau=0.5, beta=0.1))
    with pytest.raises(VersionConflictError) as info:
        call("update_controller", run_id, global_step=1, weight_entropy=0.5, expected_version=7)
    error = info.value
    assert error.status.code == code_pb2.ABORTED and error.status.message == error.message
    assert list(error.status.details) == []
    assert (error.violations, error.failures, error.resource) == ((), (), None)
    assert client.get_run(run_id).state.version == 0


def test_a_watch_of_a_missing_run_names_it(server, run_id):
    missing = run_id + "-missing"
    with MaxEntClient(server.target) as client, pytest.raises(NotFoundError) as sync_info:
        next(client.watch_run(missing, timeout=30))

    async def watch():
        async with AsyncMaxEntClient(server.target) as aclient:
            async for _ in aclient.watch_run(missing, timeout=30):
                pass

    with pytest.raises(NotFoundError) as async_info:
        asyncio.run(watch())
    for info in (sync_info, async_info):
        assert info.value.resource == ResourceInfo("maxent.v1.Run", missing)


def test_details_survive_pickling(client):
    with pytest.raises(RewardFailedError) as info:
        client.compute_reward_statistics(**_failing_batch(), on_failure=RewardFailurePolicy.ERROR)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is RewardFailedError and str(copy) == str(info.value)
    assert copy.failures == info.value.failures and copy.status == info.value.status


def test_a_wrong_argument_names_the_method_called(server):
    async def wrong_async_call():
        async with AsyncMaxEntClient(server.target) as aclient:
            await aclient.compute_weight_stats("r", q_value=[0.5])

    with MaxEntClient(server.target) as client:
        with pytest.raises(TypeError, match=r"^compute_reward_statistics\(\) got an unexpected keyword .*'utilitys'"):
            client.compute_reward_statistics(utilitys=[1.0])
        with pytest.raises(TypeError, match=r"^update_controller\(\) missing 1 required keyword-only .*'global_step'"):
            client.update_controller("r")
    with pytest.raises(TypeError, match=r"^compute_weight_stats\(\) got an unexpected keyword .*'q_value'"):
        asyncio.run(wrong_async_call())
