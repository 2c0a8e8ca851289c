"""Whether a remote service refused a request itself (it is wrong: sending it again fails the
same way) or could not answer it (an outage, a server error: a retry may work).

Used where the service talks to MLflow and Ray's Jobs API: the API process when it launches
studies and closes their MLflow parent runs, the job driver when it writes trials' child runs.
"""

from __future__ import annotations

import re

REFUSED = frozenset({400, 413, 422})  # the request itself is wrong: sending it again fails


def refused(error: Exception) -> bool:
    """True if MLflow (an ``MlflowException``'s HTTP status) or Ray's Jobs API (its "status
    code N" text) refused the request itself; a server error or an outage is not."""
    status = getattr(error, "get_http_status_code", None)
    if callable(status):
        return status() in REFUSED
    found = re.search(r"status code (\d{3})", str(error))
    return found is not None and int(found.group(1)) in REFUSED


NOT_FOUND = 404  # MLflow's answer for a run or experiment that does not exist (any more)


def refused_for_good(error: Exception) -> bool:
    """:func:`refused`, or MLflow answered that the run or experiment written to is gone
    (deleted in its UI, say): a write to it fails the same way however often it is sent.
    An outage, a server error or a rate limit is neither."""
    status = getattr(error, "get_http_status_code", None)
    return refused(error) or (callable(status) and status() == NOT_FOUND)
