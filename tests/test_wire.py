"""The numpy wire encoder must produce exactly what protobuf itself writes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from maxent_api._generated.maxent.v1 import maxent_pb2 as pb
from maxent_api.wire import array, decode, encode, fill

int64s = st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=50)
doubles = st.lists(st.floats(allow_nan=False), max_size=50)


@settings(max_examples=300, deadline=None)
@given(sizes=int64s, counts=int64s, utilities=doubles, flags=st.lists(st.booleans(), max_size=50))
def test_fill_matches_protobuf_encoding(sizes, counts, utilities, flags):
    fast = fill(pb.ComputeRewardStatisticsRequest(run_id="r"), group_sizes=np.array(sizes, dtype=np.int64),
                token_counts=np.array(counts, dtype=np.int64), utilities=np.array(utilities, dtype=np.float64),
                truncated=np.array(flags, dtype=bool))
    slow = pb.ComputeRewardStatisticsRequest(run_id="r", group_sizes=sizes, token_counts=counts, utilities=utilities,
                                             truncated=flags)
    assert fast == slow
    assert fast.SerializeToString() == slow.SerializeToString()
    np.testing.assert_array_equal(array(fast.token_counts, np.int64), np.array(counts, dtype=np.int64))


def test_nan_and_infinities_survive():
    values = np.array([np.nan, np.inf, -np.inf, -0.0, 5e-324])
    message = fill(pb.ComputeWeightStatsRequest(), q_values=values)
    np.testing.assert_array_equal(array(message.q_values), values)


def test_none_and_empty_leave_fields_unset():
    message = fill(pb.ComputeWeightStatsRequest(), q_values=None, ref_logp_sum=np.empty(0))
    assert len(message.q_values) == 0 and len(message.ref_logp_sum) == 0
    assert message.SerializeToString() == b""


@settings(max_examples=300, deadline=None)
@given(counts=int64s, utilities=doubles, flags=st.lists(st.booleans(), max_size=50),
       run_id=st.text(max_size=20), temperature=st.one_of(st.none(), st.floats(allow_nan=False)))
def test_encode_appends_arrays_to_the_message_bytes(counts, utilities, flags, run_id, temperature):
    """encode() writes the arrays after the message's own fields; a parser
    must read back exactly the message protobuf itself would have built."""
    message = pb.ComputeRewardStatisticsRequest(run_id=run_id)
    if temperature is not None:
        message.q_temperature = temperature
    payload = encode(message, token_counts=np.array(counts, dtype=np.int64),
                     utilities=np.array(utilities, dtype=np.float64), truncated=np.array(flags, dtype=bool),
                     gen_logp_sum=None)
    expected = pb.ComputeRewardStatisticsRequest(run_id=run_id, token_counts=counts, utilities=utilities,
                                                 truncated=flags)
    if temperature is not None:
        expected.q_temperature = temperature
    assert pb.ComputeRewardStatisticsRequest.FromString(payload) == expected
    assert len(payload) == len(expected.SerializeToString())


def _same(decoded, message, names):
    for name in names:
        got = getattr(decoded, name)
        assert isinstance(got, np.ndarray) or len(got) == 0, name  # present arrays are numpy's
        np.testing.assert_array_equal(np.asarray(got), np.array(getattr(message, name)), err_msg=name)


@settings(max_examples=300, deadline=None)
@given(utilities=doubles, flags=st.lists(st.booleans(), max_size=50), mean=st.floats(allow_nan=False),
       names=st.lists(st.text(max_size=5), max_size=3), version=st.integers(0, 2**62), split=st.integers(0, 50))
def test_decode_reads_what_protobuf_reads(utilities, flags, mean, names, version, split):
    message = pb.ComputeStepStatisticsResponse(
        total_utils=utilities, weights=utilities[::-1], zero_variance_groups=flags, reward_mean=mean,
        controller_version=version, tau=0.25,
    )
    for name in names:
        message.per_reward.add(name=name, values=utilities[:3], failed=flags[:3], failure_count=len(name))
    data = message.SerializeToString()
    decoded = decode(pb.ComputeStepStatisticsResponse, data)
    assert decoded.message == pb.ComputeStepStatisticsResponse(
        reward_mean=mean, controller_version=version, tau=0.25, per_reward=message.per_reward)
    _same(decoded, message, ["total_utils", "weights", "zero_variance_groups", "advantages", "q_values"])
    assert decoded.reward_mean == message.reward_mean and list(decoded.per_reward) == list(message.per_reward)
    # a packed field split in two chunks (legal on the wire) is joined again
    head, tail = utilities[:split], utilities[split:]
    chunked = (pb.ComputeStepStatisticsResponse(total_utils=head).SerializeToString()
               + pb.ComputeStepStatisticsResponse(total_utils=tail, tau=0.5).SerializeToString())
    again = decode(pb.ComputeStepStatisticsResponse, chunked)
    np.testing.assert_array_equal(again.total_utils, np.array(utilities, dtype=np.float64))
    assert again.tau == 0.5


def test_decode_varints_and_fallbacks():
    sizes = [0, 1, 127, 128, 300, 2**40, -1, -(2**63), 2**63 - 1]
    message = pb.ComputeRewardStatisticsRequest(group_sizes=sizes, run_id="r")
    decoded = decode(pb.ComputeRewardStatisticsRequest, message.SerializeToString())
    assert decoded.group_sizes.tolist() == sizes and decoded.run_id == "r"
    # an unpacked repeated double (field 1, wire type 1) is still read, by the runtime
    unpacked = bytes([0x09]) + np.float64(2.5).tobytes() + bytes([0x09]) + np.float64(-1.0).tobytes()
    assert list(decode(pb.ComputeStepStatisticsResponse, unpacked).total_utils) == [2.5, -1.0]
    assert len(decode(pb.ComputeStepStatisticsResponse, b"").weights) == 0
