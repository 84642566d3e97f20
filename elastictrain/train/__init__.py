"""The training-loop API: a ``Job`` whose results do not depend on the world size."""

from elastictrain.train.job import Job
from elastictrain.train.stragglers import StragglerPolicy

__all__ = ["Job", "StragglerPolicy"]
