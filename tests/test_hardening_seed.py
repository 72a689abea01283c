"""SEED-GRPO answer extraction cannot pin the compute pool (docs/math.md §5).

Completions of many unclosed ``\\boxed{`` openings once took quadratic time
to extract (about 1.5 s per 4 000 openings, minutes for the texts below) on
the compute threads; extraction is now linear, and a completion longer than
MAX_ANSWER_TEXT_CHARS is refused with INVALID_ARGUMENT naming it.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from maxent_client import SeedGrpo
from maxent_api._generated.maxent.v1 import maxent_pb2 as pb
from maxent_api._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc
from maxent_server.domain.answers import MAX_ANSWER_TEXT_CHARS, final_answer, last_boxed

UNCLOSED = "\\boxed{" * 60000  # 420 000 characters

# Degenerate shapes of 240 000 characters; each extracts in milliseconds.
# The bound is about 100x the expected cost, so that a slow machine passes.
SHAPES = {
    "unclosed boxes": "\\boxed{" * (240_000 // 7),
    "unclosed boxes, blank payloads": "\\boxed{ " * (240_000 // 8),
    "brace-less boxes": "\\boxed" * (240_000 // 6),
    "empty boxes": "\\boxed{}" * (240_000 // 8),
    "nested boxes": "\\boxed{" * (120_000 // 7) + "}" * (120_000 // 7),
    "unclosed answer tags": "<answer>" * (240_000 // 8),
    "opening braces": "{" * 240_000,
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_extraction_is_fast_on_degenerate_texts(shape):
    text = SHAPES[shape]
    start = time.perf_counter()
    final_answer(text)
    last_boxed(text)
    assert time.perf_counter() - start < 0.5, shape


def _seed_call(client, completions, timeout):
    n = len(completions)
    return client.compute_reward_statistics(
        utilities=[float(i % 2) for i in range(n)], completions=completions, group_sizes=[n],
        gen_logp_sum=[-1.0] * n, token_counts=[10] * n,
        seed_grpo=SeedGrpo(num_generations=n), timeout=timeout)


def test_unclosed_boxes_do_not_pin_the_compute_pool(client):
    # One attack call per compute thread (the server has 2), then a small
    # SEED-GRPO call, which also needs a compute thread, within its deadline.
    with ThreadPoolExecutor(2) as pool:
        started = threading.Barrier(3)

        def attack():
            started.wait()
            return _seed_call(client, [UNCLOSED] * 4, timeout=30)

        attacks = [pool.submit(attack) for _ in range(2)]
        started.wait()
        time.sleep(0.2)
        begun = time.monotonic()
        small = _seed_call(client, ["\\boxed{1}", "\\boxed 1", "<answer>2</answer>", "no"], timeout=5)
        assert time.monotonic() - begun < 5
        # "1", "1", "2", none: clusters {0, 1}, {2}, {3} of equal likelihoods.
        expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
        assert small.seed_semantic_entropies[0] == pytest.approx(expected, rel=1e-5)
        for future in attacks:
            stats = future.result(timeout=30)
            # No completion has an answer: four singleton clusters.
            assert stats.seed_semantic_entropies[0] == pytest.approx(math.log(4), rel=1e-5)


@pytest.fixture()
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.MaxEntServiceStub(channel)
    channel.close()


def test_overlong_completion_is_refused_with_seed_grpo(stub):
    completions = ["\\boxed{1}", "x" * (MAX_ANSWER_TEXT_CHARS + 1)]
    request = pb.ComputeRewardStatisticsRequest(group_sizes=[2], utilities=[0.0, 1.0], completions=completions,
                                                gen_logp_sum=[-1.0, -2.0], token_counts=[1, 1])
    request.seed_grpo.enabled = True
    with pytest.raises(grpc.RpcError) as info:
        stub.ComputeRewardStatistics(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = set()
    for detail in rpc_status.from_call(info.value).details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields.update(v.field for v in bad.field_violations)
    assert fields == {"completions[1]"}
    # At the limit it is read.
    request.completions[1] = "x" * MAX_ANSWER_TEXT_CHARS
    assert len(stub.ComputeRewardStatistics(request, timeout=30).seed_semantic_entropies) == 1


def test_seed_answers_of_long_texts_come_from_the_reward_workers():
    """SEED-GRPO's answer extraction of degenerate texts runs in the worker
    processes (out of the server's interpreter) and agrees with the plain
    extraction, short texts included."""
    from maxent_server.rewards import RewardRunner

    texts = [*SHAPES.values(), "\\boxed{12}", "<answer> 5 </answer>", "no answer at all", UNCLOSED + "\\boxed{9}"]
    with RewardRunner(workers=1, timeout_seconds=10.0) as runner:
        before = runner.stats()
        got = runner.final_answers(texts)
        after = runner.stats()
    assert got == [final_answer(text) for text in texts]
    assert sum(after.values()) > sum(before.values()), "no work reached the workers"
