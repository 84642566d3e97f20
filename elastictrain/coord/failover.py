"""Which member of an etcd cluster a client talks to.

The client library keeps one channel per member and uses the first one not marked failed; it
marks a member failed only for the errors of its own wrapped calls. Our direct stub calls,
watches and the shared watch stream mark it here, so that every path moves to another member
when the one in use dies (and none keeps dialling a dead one). A member marked failed is
usable again after a second; the one in use stays in use while it answers.
"""

from __future__ import annotations

import time

import pyetcd

# A failed member is skipped for this long (then it may be chosen again).
FAILED_MEMBER_RETRY_S = 1.0


def in_use(raw: pyetcd.MultiEndpointEtcd3Client) -> str:
    """The member the client's next request goes to (``host:port``)."""
    endpoint = raw.endpoint_in_use
    return endpoint.netloc if endpoint is not None else ""


def fail_over(raw: pyetcd.MultiEndpointEtcd3Client, failed: str) -> bool:
    """Member ``failed`` (as :func:`in_use` named it before the request) did not answer: if
    the client still uses it, mark it failed, so that the next request goes to another. A
    late failure of a member already left changes nothing. True if another member is
    available; a client of one member is left as it is."""
    if len(raw.endpoints) < 2:
        return False
    endpoint = raw.endpoint_in_use
    if endpoint is not None and endpoint.netloc == failed and not endpoint.is_failed():
        endpoint.fail()
        raw._clear_old_stubs()
    return any(not e.is_failed() for e in raw.endpoints.values())


def retry_failed_members(raw: pyetcd.MultiEndpointEtcd3Client, after_s: float = 0.05) -> None:
    """When every member is marked failed (a single member that did not answer, or the whole
    cluster down), clear the marks older than ``after_s`` so that the retry loop's own backoff
    spaces the attempts; while one member is usable, the marks stand."""
    endpoints = list(raw.endpoints.values())
    if any(not e.is_failed() for e in endpoints):
        return
    now = time.time()
    for endpoint in endpoints:
        if now - endpoint.last_failed >= after_s:
            endpoint.last_failed = 0
