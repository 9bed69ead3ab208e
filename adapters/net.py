"""Whether a host is this machine: what may skip what the network needs (a metrics token,
an SMTP login's TLS)."""

from ipaddress import ip_address


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address: traffic to it never crosses a network."""
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
