"""``--metrics-port``: serves :func:`~elastictrain.agent.metrics.render_metrics` over HTTP
(``GET /metrics``) for Prometheus to scrape. Read-only, on the agent's address; a thin
executor: the text comes from a callable the agent provides."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from elastictrain.errors import ConfigError

from .metrics import CONTENT_TYPE

logger = logging.getLogger(__name__)


class MetricsServer:
    """An HTTP server on ``host:port`` (0: any free port; see :attr:`port`) whose
    ``/metrics`` is ``render()``."""

    def __init__(self, host: str, port: int, render: Callable[[], str]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served")
                    return
                try:
                    body = render().encode()
                except Exception:  # a scrape must never take the agent down
                    logger.exception("rendering the metrics failed")
                    self.send_error(500, "rendering the metrics failed")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:  # noqa: A002 (stdlib's name)
                logger.debug("metrics: " + format, *args)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {port}: cannot listen on {host}: "
                              f"{exc.strerror}") from exc  # fmt: skip
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="agent-metrics",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
