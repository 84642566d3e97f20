"""elastictrain: fault-tolerant, elastic training for PyTorch."""

__version__ = "0.1.0"

__all__ = ["Job"]


def __getattr__(name: str):
    # ``elastictrain.Job`` without importing torch for every user of the package (the CLI)
    if name == "Job":
        from elastictrain.train import Job

        return Job
    raise AttributeError(f"module 'elastictrain' has no attribute {name!r}")
