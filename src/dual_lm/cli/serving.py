"""``dual-lm serve``: the OpenAI-compatible server (``dual_lm.serving``) over one model folder."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import socket
import sys
from pathlib import Path

from dual_lm.cli.options import Command, add_device_options, integer
from dual_lm.errors import UserError

SERVE_EXTRA = "pip install 'dual-lm[serve]' (make setup installs it)"


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=integer(0, 65535), default=8000, help="0 = any free port (the first line says)")
    p.add_argument("--max-batch", type=integer(1, 1024), default=32, help="causal/prefix requests per batch")
    p.add_argument("--name", help="the model's id in the API (default: the folder's name)")
    add_device_options(p)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``, or one line that says why not."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        raise UserError(f"--host must be an IP address (such as 127.0.0.1 or ::1), got {host!r}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        reason = "the address is in use" if err.errno == errno.EADDRINUSE else err.strerror
        raise UserError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def _serve(args) -> int:
    try:
        import uvicorn

        from dual_lm.serving.app import create_app
        from dual_lm.serving.engine import Engine
    except ImportError as err:
        raise UserError(f"serving needs {err.name}: {SERVE_EXTRA}") from None
    from dual_lm.folder import check_folder, load_folder

    name = args.name or Path(args.folder).resolve().name
    if not name.strip():
        raise UserError("--name must not be empty")
    check_folder(args.folder)  # a missing or broken folder is named first, whatever the port
    sock = bind(args.host, args.port)  # before the model loads: a taken port must not cost the load
    try:
        model, tokenizer = load_folder(args.folder, args.device, args.dtype)
    except BaseException:
        sock.close()  # a refused load must not leave the port held (the command may run in-process)
        raise
    engine = Engine(model.eval(), tokenizer, max_batch=args.max_batch).start()
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"dual-lm serve: {name} at http://{shown}:{port} (playground: /, API: /v1)", flush=True)
    if not ipaddress.ip_address(host).is_loopback:
        print(f"dual-lm serve: listening on {host}: anyone who can reach it can use the model", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, name), log_level="info", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    return 0


COMMANDS = (
    Command(
        "serve",
        _serve,
        _serve_args,
        dict(help="an OpenAI-compatible server for every mode, with a playground page"),
    ),
)
