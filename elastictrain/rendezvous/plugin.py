"""torch's out-of-tree rendezvous entry point (``torchrun.handlers``: ``etcd-v3``).

torch loads this while its rendezvous package is still initialising, so nothing here may
import torch's rendezvous modules (or ours, which do) until a handler is actually created.
"""

from __future__ import annotations


def _create_handler(params):
    from elastictrain.rendezvous.registration import create_handler

    return create_handler(params)


def torchrun_handler_creator():
    """Called by torch's registry: returns the handler factory for ``etcd-v3``."""
    return _create_handler
