"""The call edge: what every call passes through around the servicer, one
module per concern: authentication (auth), per-caller rate limits (rates),
admission (admission), request and response bytes (codec), metrics
(metrics) and the access log (access_log), run in order by
:class:`EdgeInterceptor` (chain)."""

from .admission import MAX_GROUPS_PER_REQUEST, Admission
from .chain import EdgeInterceptor
from .rates import CallerRates

__all__ = ["MAX_GROUPS_PER_REQUEST", "Admission", "CallerRates", "EdgeInterceptor"]
