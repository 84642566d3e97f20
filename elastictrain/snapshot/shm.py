"""Shared-memory segments that belong to the agent, not to the worker that fills them.

Segments are plain files in a tmpfs (``/dev/shm`` unless ``ETRAIN_SHM_DIR`` says otherwise),
mapped with ``mmap``. We do not use ``multiprocessing.shared_memory`` on the worker side: in
Python < 3.13 attaching registers the segment with the worker's resource tracker, which
unlinks it when the worker dies, destroying exactly the data that must outlive the worker.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import uuid

import torch

logger = logging.getLogger(__name__)

ENV_SHM_DIR = "ETRAIN_SHM_DIR"
DEFAULT_SHM_DIR = "/dev/shm"


def shm_dir() -> str:
    return os.environ.get(ENV_SHM_DIR, DEFAULT_SHM_DIR)


class ShmSegment:
    """One mapped segment. The creator (the agent) unlinks it; attachers only unmap."""

    def __init__(self, name: str, size: int, create: bool) -> None:
        if "/" in name or not name:
            raise ValueError(f"invalid segment name {name!r}")
        self.name = name
        self.size = size
        self.path = os.path.join(shm_dir(), name)
        self.owner = create
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, max(size, 1))
            else:
                size = os.fstat(fd).st_size
                self.size = size
            # An attacher reads or writes the whole segment: fault its pages in at once.
            flags = mmap.MAP_SHARED | (0 if create else getattr(mmap, "MAP_POPULATE", 0))
            self._map = mmap.mmap(fd, max(size, 1), flags=flags)
        finally:
            os.close(fd)
        self._tensor: torch.Tensor | None = None
        self.pinned = False

    @classmethod
    def create(cls, prefix: str, size: int) -> ShmSegment:
        return cls(f"{prefix}-{uuid.uuid4().hex[:16]}", size, create=True)

    @classmethod
    def attach(cls, name: str) -> ShmSegment:
        return cls(name, 0, create=False)

    def tensor(self) -> torch.Tensor:
        """The whole segment as a uint8 tensor sharing its memory."""
        if self._tensor is None:
            self._tensor = (
                torch.frombuffer(self._map, dtype=torch.uint8, count=self.size)
                if self.size
                else torch.empty(0, dtype=torch.uint8)
            )
        return self._tensor

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        end = self.size if length is None else offset + length
        return memoryview(self._map)[offset:end]

    def pin(self) -> None:
        """Page-lock the mapping for CUDA (``cudaHostRegister``), so device-to-host copies into
        it run asynchronously on a copy engine at full PCIe speed. Once per mapping: the cost
        (locking every page) is paid when a segment is first used, not again when it is reused.
        """
        if self.pinned or not self.size:
            return
        error = int(torch.cuda.cudart().cudaHostRegister(self.tensor().data_ptr(), self.size, 1))
        if error:
            raise RuntimeError(f"cudaHostRegister of segment {self.name} failed: cudaError {error}")
        self.pinned = True

    def _unpin(self) -> None:
        if self.pinned:
            self.pinned = False
            error = int(torch.cuda.cudart().cudaHostUnregister(self.tensor().data_ptr()))
            if error:
                logger.warning("cudaHostUnregister of segment %s: cudaError %d", self.name, error)

    def close(self) -> None:
        self._unpin()
        self._tensor = None
        try:
            self._map.close()
        except BufferError:
            logger.debug("segment %s still has exported views; left mapped", self.name)
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
