"""The ``etrain`` command (installed as ``elastictrain.cli``)."""
