"""Running the app under uvicorn: one process, or a supervisor and N worker processes sharing one socket.

With several workers uvicorn binds the listening socket itself with protocol 0, so asyncio does not switch
Nagle's algorithm off on the connections it accepts (it only does for sockets marked IPPROTO_TCP), and each
answer written in two pieces (head, then body) waited for the client's delayed ACK: 40 ms on every request
(measured: /health 44 ms with 2 workers against 1.1 ms with 1). The listening socket here gets TCP_NODELAY,
which Linux passes on to every accepted connection.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

import uvicorn
from uvicorn.supervisors import Multiprocess

from .config import ServiceSettings
from .logs import uvicorn_log_config

#: prometheus_client's variable (metrics.MULTIPROC_ENV; not imported from there: the supervisor needs no
#: prometheus_client)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

APP = "facedb.service.app:app_from_env"
PROTOCOL = "facedb.service.protocol:BoundedHttpToolsProtocol"


def run(settings: ServiceSettings, log_level: str = "info") -> None:
    """Serve the database in ``settings`` until interrupted; the workers read their settings from ``FACEDB_*``."""
    os.environ.update(settings.to_env())
    log_config = uvicorn_log_config(settings.log_format, log_level)
    config = uvicorn.Config(APP, factory=True, host=settings.host, port=settings.port, workers=settings.workers,
                            log_level=log_level, server_header=False, timeout_graceful_shutdown=10,
                            # httptools with bounded heads and connections per address (protocol.py)
                            http=PROTOCOL,
                            # X-Forwarded-For only from the proxies the admin names: uvicorn trusts 127.0.0.1 by
                            # default, which let any local process pose as any client address
                            proxy_headers=bool(settings.forwarded_allow_ips),
                            forwarded_allow_ips=settings.forwarded_allow_ips or None,
                            # json: the app writes one line per request itself (route template, key id)
                            access_log=settings.log_format != "json",
                            **({"log_config": log_config} if log_config is not None else {}))
    if settings.workers == 1:
        # one process: metrics in its memory. A PROMETHEUS_MULTIPROC_DIR left in the environment would put
        # them in files that nothing cleans (prometheus_client reads it when first imported: in the worker).
        os.environ.pop(MULTIPROC_ENV, None)
        uvicorn.Server(config).run()
        return
    # Several processes: each worker's metrics go to files in a directory of this run's own, which a scrape of
    # any worker adds up (facedb/service/metrics.py). Fresh each run, as prometheus_client requires: files of
    # an earlier run would add its counters to this one's. Made and removed here, never shared.
    metrics_dir = tempfile.mkdtemp(prefix="facedb-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        sock = config.bind_socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        Multiprocess(config, sockets=[sock]).run()
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
