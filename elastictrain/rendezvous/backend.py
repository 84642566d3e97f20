"""torch's ``RendezvousBackend`` on plain etcd v3.

The whole rendezvous state is one etcd key. Its fencing token is the key's ``mod_revision``:
``set_state`` writes only if the key was not modified since the caller read it (an etcd
transaction comparing ``mod_revision``), and creation is guarded by ``create_revision == 0``.
On a lost race the caller gets the winner's state and token back, as torch's contract asks.
torch's ``DynamicRendezvousHandler`` runs the membership algorithm on top.
"""

from __future__ import annotations

import logging

from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousStateError
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend, Token

from elastictrain import safe_pickle
from elastictrain.coord.etcd import EtcdClient
from elastictrain.errors import CoordinationUnavailableError, SnapshotFormatError

logger = logging.getLogger(__name__)

BACKEND_NAME = "etcd-v3"


class EtcdV3RendezvousBackend(RendezvousBackend):
    """Holds one rendezvous state under ``key`` in etcd v3."""

    def __init__(self, client: EtcdClient, key: str) -> None:
        if not key:
            raise ValueError("the rendezvous key must be a non-empty string")
        self._client = client
        self._key = key

    @property
    def name(self) -> str:
        return BACKEND_NAME

    @property
    def key(self) -> str:
        return self._key

    def get_state(self) -> tuple[bytes, Token] | None:
        try:
            kv = self._client.get(self._key)
        except CoordinationUnavailableError as exc:
            raise RendezvousConnectionError(str(exc)) from exc
        if kv is None:
            return None
        return kv.value, kv.mod_revision

    def set_state(
        self, state: bytes, token: Token | None = None
    ) -> tuple[bytes, Token, bool] | None:
        expected = self._parse_token(token)
        if expected is None:
            current = self.get_state()
            return None if current is None else (*current, False)
        try:
            written, kv = self._client.compare_and_swap(self._key, state, expected)
        except CoordinationUnavailableError as exc:
            raise RendezvousConnectionError(str(exc)) from exc
        if kv is None:
            return None
        return kv.value, kv.mod_revision, written

    @staticmethod
    def _parse_token(token: Token | None) -> int | None:
        """0 for "create"; the revision for a compare; None for a token that is not ours.

        Like torch's ``C10dRendezvousBackend``, a token this backend cannot have issued is not an
        error: ``set_state`` then writes nothing and returns the current state (``has_set``
        False). Our tokens are non-negative ``int`` revisions (decimal text is accepted too);
        anything else -- bools, floats, negative numbers, other objects -- is foreign.
        """
        if token is None:
            return 0
        if isinstance(token, bool):
            return None
        if isinstance(token, int):
            value = token
        elif isinstance(token, (str, bytes, bytearray)):
            try:
                value = int(token)
            except ValueError:
                return None
        else:
            return None
        return value if value >= 0 else None



class CheckedBackend(RendezvousBackend):
    """A backend whose states reach torch's handler (which unpickles them) only once our
    allow-list reads them as torch's rendezvous state: a crafted value in etcd is a
    ``RendezvousStateError``, never code run. The wrapped backend stays a plain byte store."""

    def __init__(self, inner: RendezvousBackend) -> None:
        self._inner = inner

    @property
    def name(self) -> str:
        return self._inner.name

    def get_state(self) -> tuple[bytes, Token] | None:
        current = self._inner.get_state()
        return None if current is None else (_checked(current[0]), current[1])

    def set_state(self, state: bytes, token: Token | None = None
                  ) -> tuple[bytes, Token, bool] | None:  # fmt: skip
        result = self._inner.set_state(state, token)
        return None if result is None else (_checked(result[0]), result[1], result[2])


def _checked(state: bytes) -> bytes:
    try:
        safe_pickle.check(state, profile="rendezvous")
    except SnapshotFormatError as exc:
        raise RendezvousStateError(f"the rendezvous state in etcd is not torch's: {exc}") from exc
    return state
