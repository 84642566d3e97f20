"""How the dispatch's tensors travel: one all-to-all of rows, launched now and waited for
later, and the hook (``around``) through which every wait of the attention exchanges runs (a
compute clock can leave the waiting out)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from elastictrain.train.collectives import Collectives

T = TypeVar("T")
Exchange = Callable[[Callable[[], T]], T]  # runs a collective (a clock can leave it out)


def direct(exchange: Callable[[], T]) -> T:
    """An ``around`` that only runs the exchange."""
    return exchange()


class AllToAll:
    """An all-to-all under way: ``send`` (rows of ``width`` values: each other rank's
    ``send_rows[r]`` rows, in rank order) out; from each rank, ``incoming_rows`` rows to
    come. :meth:`wait` gives other rank -> the rows it sent (``[rows, width]``), views of
    :attr:`received`, one buffer in rank order."""

    def __init__(self, coll: Collectives, send: torch.Tensor, send_rows: dict[int, int],
                 incoming_rows: dict[int, int], width: int) -> None:  # fmt: skip
        ranks = range(coll.size)
        self._coll, self._width = coll, width
        self._splits = [incoming_rows.get(r, 0) * width for r in ranks]
        self.received = send.new_empty(sum(self._splits))
        self._sent = send.reshape(-1)  # kept alive until the wait
        self._work = coll.all_to_all_async(self.received, self._sent, self._splits,
                                           [send_rows.get(r, 0) * width for r in ranks])

    @classmethod
    def of(cls, coll: Collectives, outgoing: dict[int, list[torch.Tensor]],
           incoming_rows: dict[int, int], width: int, like: torch.Tensor) -> AllToAll:
        """To each other rank, its tensors (rows of ``width`` values) in order."""
        parts = [p.reshape(-1, width) for r in range(coll.size) for p in outgoing.get(r, [])]
        send = torch.cat(parts) if parts else like.new_empty(0, width)
        rows = {r: sum(p.numel() // width for p in outgoing.get(r, [])) for r in range(coll.size)}
        return cls(coll, send, rows, incoming_rows, width)

    def wait(self, around: Exchange) -> dict[int, torch.Tensor]:
        around(lambda: self._coll.wait(self._work))
        pieces, at = {}, 0
        for r, n in enumerate(self._splits):
            if r != self._coll.rank:
                pieces[r] = self.received[at: at + n].view(-1, self._width)
            at += n
        return pieces


def cut(block: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """``block``'s leading rows cut into consecutive views of ``sizes`` rows."""
    out, at = [], 0
    for n in sizes:
        out.append(block[at: at + n])
        at += n
    return out
