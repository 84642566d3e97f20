"""The training-loop API: a ``Job`` whose results do not depend on the world size."""

from elastictrain.train.job import Job

__all__ = ["Job"]
