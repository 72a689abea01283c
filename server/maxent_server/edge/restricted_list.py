"""ListRuns for a token limited to some runs.

TEMPORARY: this belongs in the store's listing (a listing filtered by the
token's run patterns); delete this module and its one use in chain.py when
that lands."""

from __future__ import annotations

import base64

from maxent_api import pb

from ..auth import Principal
from ..domain.validation import MAX_PAGE_SIZE

_DEFAULT_PAGE_SIZE = 100


def needs_filtering(principal: Principal | None, method: str) -> bool:
    return principal is not None and method == "ListRuns" and not principal.all_runs


async def list_visible_runs(inner, request, context, principal: Principal):
    """A ListRuns page holding only the runs `principal` may touch: pages
    filled from as many store pages as needed, the next-page token naming the
    last run returned, so the caller never learns the ids of other runs."""
    if not 0 <= request.page_size <= MAX_PAGE_SIZE:
        return await inner(request, context)  # the servicer says what is wrong
    size = request.page_size or _DEFAULT_PAGE_SIZE
    visible: list = []
    token = request.page_token
    while True:
        page = await inner(pb.ListRunsRequest(page_size=MAX_PAGE_SIZE, page_token=token), context)
        visible.extend(run for run in page.runs if principal.may_access(run.run_id))
        if len(visible) > size or not page.next_page_token:
            break
        token = page.next_page_token
    response = pb.ListRunsResponse(runs=visible[:size])
    if len(visible) > size:
        response.next_page_token = base64.urlsafe_b64encode(visible[size - 1].run_id.encode()).decode()
    return response
