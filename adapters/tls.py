"""One TLS client context per process for the short-lived HTTP clients (notices, advisor,
sandbox deliveries): building one loads the CA bundle, milliseconds of CPU per call."""

import functools
import ssl

import httpx


@functools.cache
def client_tls() -> ssl.SSLContext:
    """httpx's own default context (certifi's bundle, SSL_CERT_* honoured), built once."""
    return httpx.create_ssl_context()
