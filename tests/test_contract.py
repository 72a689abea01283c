"""The service descriptor is the one list of methods: every RPC it declares
has a role and metrics series on the server, and no Python module outside the
contract package spells the service name by hand."""

from __future__ import annotations

from pathlib import Path

from maxent_api import METHODS, SERVICE_NAME
from maxent_server.auth import METHOD_ROLES
from maxent_server.edge.admission import BATCH_METHODS
from maxent_server.metrics import Metrics
from ops_support import samples

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("server", "client", "tests", "bench", "examples", "scripts")


def test_every_method_of_the_descriptor_has_a_role():
    assert set(METHOD_ROLES) == set(METHODS)


def test_the_batch_methods_are_methods_of_the_descriptor():
    assert BATCH_METHODS <= set(METHODS)


def test_every_method_of_the_descriptor_has_request_and_in_flight_series():
    parsed = samples(Metrics(process_metrics=False).render()[0])
    for name in ("maxent_rpc_requests_total", "maxent_rpc_in_flight_requests"):
        labelled = {dict(labels)["method"] for sample, labels in parsed
                    if sample == name and dict(labels).get("service") == SERVICE_NAME}
        assert labelled == set(METHODS), name


def test_the_service_name_is_spelled_only_by_the_contract_package():
    spelled = [str(path.relative_to(ROOT))
               for folder in SCANNED for path in sorted((ROOT / folder).rglob("*.py"))
               if "_generated" not in path.parts and SERVICE_NAME in path.read_text(encoding="utf-8")]
    assert spelled == []
