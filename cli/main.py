"""``etrain``: the command line. Subcommands are imported only when used, so ``--help`` is fast.

Exit codes: 0 success; 1 the training job failed (as torchrun); 2 bad input or configuration;
3 a service (etcd, an agent) could not be reached. Errors are one line plus a hint; the
traceback goes to the debug log only (``ETRAIN_DEBUG=1`` prints it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(EXIT_USAGE, f"etrain: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="etrain", description="Fault-tolerant, elastic training for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    from elastictrain.cli import chaos, credentials, drain, launch, snapshot, status

    launch.add_parser(sub)
    status.add_parser(sub)
    chaos.add_parser(sub)
    drain.add_parser(sub)
    snapshot.add_parser(sub)
    credentials.add_parser(sub)
    return parser


def _exit_code_for(exc: BaseException) -> int:
    from elastictrain.errors import (
        AgentUnavailableError,
        CoordinationUnavailableError,
        JobNotFoundError,
    )

    if isinstance(exc, CoordinationUnavailableError | AgentUnavailableError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, JobNotFoundError):
        return EXIT_USAGE
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from elastictrain.errors import ElasticTrainError

    try:
        return int(args.run(args) or 0)
    except ElasticTrainError as exc:
        logger.debug("etrain %s failed", args.command, exc_info=True)
        print(f"etrain {args.command}: error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        if os.environ.get("ETRAIN_DEBUG"):
            raise
        return _exit_code_for(exc)
    except KeyboardInterrupt:
        print(f"etrain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
