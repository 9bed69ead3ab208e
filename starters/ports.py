"""Ports and the one error for a server that cannot start or be reached, shared by the
production servers (`refunds relay`, `refunds worker`) and the dev stack."""

import socket
from collections.abc import Mapping


class StackUnavailable(RuntimeError):
    """A server of the stack cannot start or be reached; the message is one line that names
    what failed and the variable that changes it (the CLI exits 3 with it)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (for tests and parallel stacks)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_ports_free(host: str, ports: Mapping[str, int]) -> None:
    """Fails before anything starts when a port we are about to serve on is taken, naming
    the variable that moves it (a bind failing later surfaces as tracebacks from uvicorn
    or a dev server that exits with only its log to tell why)."""
    for variable, port in ports.items():
        if not port:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise StackUnavailable(f"port {host}:{port} is in use ({exc.strerror}): "
                                       f"set {variable} to a free port") from None
