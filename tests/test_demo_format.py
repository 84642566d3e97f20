"""The demo reads the agents' log lines: its pattern must match what the launcher writes."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_demo_reads_the_launchers_log_format():
    spec = importlib.util.spec_from_file_location("chaos_demo", EXAMPLES / "chaos_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    from elastictrain.cli import launch

    logger = logging.getLogger("elastictrain")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    try:
        launch._configure_logging()
        handler = logger.handlers[-1]
        record = logging.LogRecord("elastictrain.agent", logging.INFO, __file__, 1,
                                   "agent a: round 1 formed", None, None)  # fmt: skip
        line = handler.format(record)
    finally:
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
    found = demo.STAMP.findall(line)
    assert found and found[0][1] == "agent a: round 1 formed", line
