"""`moeflow serve`: load a model and serve it behind an OpenAI-compatible HTTP API.

Ctrl-C or SIGTERM drains: new requests get 503 while running ones finish (for up to
--drain-timeout seconds, after which they are stopped), then the server exits with status 0.
A second signal stops at once: every request still running ends with an error (a 503, or an
error event and [DONE] in a stream) and the server exits with 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import os

from moeflow.commands.common import add_engine_arguments, engine_kwargs
from moeflow.server.settings import DEFAULT_MAX_REQUEST_BYTES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL_DIR",
                   help="model directory (default: the bundled tiny model)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    s.add_argument("--api-key", default=os.environ.get("MOEFLOW_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and /metrics "
                        "(default: $MOEFLOW_API_KEY, else none); an empty key is refused")
    s.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the model directory's name)")
    s.add_argument("--max-queue", type=int, default=512,
                   help="requests allowed to wait for a slot; beyond it new ones get 503 (default: %(default)s)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running requests may take to finish on shutdown (default: %(default)s)")
    s.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="largest request body accepted; larger ones get 413 (default: %(default)s)")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client may take to send a request's headers, else 408 (default: %(default)s)")
    s.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client may take to send a request's body, else 408 (default: %(default)s)")
    s.add_argument("--default-routing", default="exact", choices=["exact", "lynx"],
                   help="routing for requests that name none: exact (the model's own), or lynx (batch-aware expert "
                        "reduction, approximate; needs lynx in --routing-modes); default: %(default)s")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_arguments(p)


def main(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from moeflow.assets import default_model_dir
    from moeflow.llm import LLM
    from moeflow.server.app import create_app
    from moeflow.server.draining import DrainingServer
    from moeflow.server.engine_client import EngineClient
    from moeflow.server.gc_pauses import freeze_start_up_heap
    from moeflow.server.http import uvicorn_config
    from moeflow.server.metrics import ServerMetrics
    from moeflow.server.settings import ServerSettings

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    model_dir = Path(args.model) if args.model else default_model_dir()
    kwargs = engine_kwargs(args)
    settings = ServerSettings(served_model_name=args.served_model_name or model_dir.resolve().name,
                              model_dir=str(model_dir), api_key=args.api_key, max_queue=args.max_queue,
                              drain_timeout_s=args.drain_timeout, max_request_bytes=args.max_request_bytes,
                              header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                              default_routing=args.default_routing)
    engine = LLM(str(model_dir), **kwargs).engine
    freeze_start_up_heap()  # the engine and everything built with it live as long as the process
    client = EngineClient(engine, max_queue=settings.max_queue, metrics=ServerMetrics(settings.served_model_name))
    client.start()
    try:
        config = uvicorn_config(create_app(client, settings), settings, host=args.host, port=args.port,
                                log_level=args.log_level)
        server = DrainingServer(config, client, settings.drain_timeout_s)
        server.run()
    finally:
        client.stop()
    return server.exit_code
