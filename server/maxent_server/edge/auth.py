"""Authentication on the call's metadata, before its body is read, and
authorisation of the decoded request (role and run patterns)."""

from __future__ import annotations

import grpc

from ..auth import Authorizer, Principal
from .refusal import Refusal


def authenticate(authorizer: Authorizer, metadata) -> Principal:
    """The caller's principal, or UNAUTHENTICATED. Needs only the metadata."""
    principal = authorizer.authenticate(metadata)
    if principal is None:
        raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
    return principal


def authorize(principal: Principal, method: str, request) -> None:
    """PERMISSION_DENIED unless `principal` may call `method` on the request's run."""
    run_id = "" if method == "ListRuns" else getattr(request, "run_id", "")
    denial = Authorizer.denial(principal, method, run_id)
    if denial is not None:
        raise Refusal(grpc.StatusCode.PERMISSION_DENIED, denial)
