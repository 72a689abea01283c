"""Logs: one INFO line per RPC with method, run, status, duration and sizes, in
text or JSON, and never a completion text, an answer or a token."""

from __future__ import annotations

import io
import json
import logging

import grpc
import pytest

from maxent_api import SERVICE_NAME
from maxent_api._generated.maxent.v1 import maxent_pb2 as pb
from maxent_api._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc
from maxent_server.logs import RPC_LOGGER, JsonFormatter, configure_logging, log_rpc
from ops_support import metadata, write_tokens
from server_process import ServerProcess

TOKEN = "log-test-token-SECRET-0123456789"
COMPLETION = "<think>COMPLETION-SECRET-TEXT</think> <answer>42</answer>"
ANSWER = "ANSWER-SECRET-GOLD"
KEYWORD = "KEYWORD-SECRET-PARAM"


def test_json_formatter_puts_rpc_fields_at_the_top():
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    try:
        log_rpc(logging.INFO, method="GetRun", service="s", run="r/1", code="OK", duration_seconds=0.5,
                request_bytes=3, response_bytes=9, completions=None, principal="", peer="ipv4:127.0.0.1:1")
        logging.getLogger(RPC_LOGGER).debug("hidden")
        logging.getLogger("maxent_server").warning("plain %s", "message")
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    rpc, plain = lines
    assert rpc["message"] == "rpc" and rpc["level"] == "INFO" and rpc["logger"] == RPC_LOGGER
    assert {k: rpc[k] for k in ("method", "run", "code", "duration_seconds", "request_bytes", "response_bytes")} == {
        "method": "GetRun", "run": "r/1", "code": "OK", "duration_seconds": 0.5, "request_bytes": 3,
        "response_bytes": 9}
    assert "completions" not in rpc and rpc["time"].endswith("Z")
    assert plain["message"] == "plain message" and plain["level"] == "WARNING"
    assert json.loads(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})))["message"] == "x"


def _calls(target: str, token: str | None) -> int:
    """A mix of calls (one failing); returns how many were made."""
    md = metadata(token) if token else None
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.MaxEntServiceStub(channel)
        stub.CreateRun(pb.CreateRunRequest(run_id="logs/r1", config=pb.WeightingConfig(tau=0.5, beta=0.1)),
                       timeout=60, metadata=md)
        stub.ComputeRewardStatistics(pb.ComputeRewardStatisticsRequest(
            run_id="logs/r1", group_sizes=[2], completions=[COMPLETION, COMPLETION + " more"], answers=[ANSWER],
            rewards=[pb.RewardTerm(name="format", weight=1.0),
                     pb.RewardTerm(name="keyword_match", weight=1.0, params={"keyword": KEYWORD})]),
            timeout=60, metadata=md)
        with pytest.raises(grpc.RpcError):
            stub.GetRun(pb.GetRunRequest(run_id="logs/missing"), timeout=60, metadata=md)
        stub.UpdateController(pb.UpdateControllerRequest(run_id="logs/r1", global_step=1, weight_entropy=0.3),
                              timeout=60, metadata=md)
    return 4


def _assert_no_secrets(log: str) -> None:
    for secret in ("COMPLETION-SECRET", ANSWER, KEYWORD, TOKEN):
        assert secret not in log


def test_json_access_log(tmp_path):
    tokens = write_tokens(tmp_path / "tokens.json", [{"name": "trainer", "token": TOKEN, "role": "write",
                                                      "runs": ["logs/*"]}])
    server = ServerProcess(tmp_path / "data", extra_args=["--log-format", "json", "--auth-tokens", str(tokens)])
    server.start()
    try:
        calls = _calls(server.target, TOKEN)
    finally:
        server.stop()
    log = server.log()
    _assert_no_secrets(log)
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any("listening on" in r["message"] for r in records)
    rpc = [r for r in records if r["message"] == "rpc"]
    assert [r["method"] for r in rpc] == ["CreateRun", "ComputeRewardStatistics", "GetRun", "UpdateController"]
    assert len(rpc) == calls
    for r in rpc:
        assert r["level"] == "INFO" and r["service"] == SERVICE_NAME and r["principal"] == "trainer"
        assert r["duration_seconds"] >= 0 and r["request_bytes"] > 0 and r["peer"].startswith("ipv")
    assert [r["code"] for r in rpc] == ["OK", "OK", "NOT_FOUND", "OK"]
    assert [r["run"] for r in rpc] == ["logs/r1", "logs/r1", "logs/missing", "logs/r1"]
    assert rpc[1]["completions"] == 2 and rpc[1]["response_bytes"] > 0
    assert rpc[2]["response_bytes"] == 0


def test_text_access_log_is_the_default(tmp_path):
    server = ServerProcess(tmp_path / "data")
    server.start()
    try:
        calls = _calls(server.target, None)
    finally:
        server.stop()
    log = server.log()
    _assert_no_secrets(log)
    lines = [line for line in log.splitlines() if " INFO maxent_server.rpc: rpc " in line]
    assert len(lines) == calls
    assert "method=GetRun" in lines[2] and "run=logs/missing" in lines[2] and "code=NOT_FOUND" in lines[2]
    assert "completions=2" in lines[1] and "duration_seconds=" in lines[1] and "request_bytes=" in lines[1]
    assert "Check" not in log  # the start-up health checks are DEBUG
