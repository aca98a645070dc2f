"""TLS to the broker: the process's one verifying context, and pika parameters for a node's URL.

Data flow: the CLI calls ``use_tls`` once with the ``--tls-*`` files (forked workers inherit
the context); every connection takes its parameters from ``url_parameters``, which gives
``amqps://`` URLs that context with the host name to check.
"""

from __future__ import annotations

import ssl

import pika

from .errors import ConfigError

_tls_context: ssl.SSLContext | None = None  # set once per process by use_tls(); forked workers inherit it


def use_tls(ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None) -> None:
    """Verify ``amqps://`` brokers with ``ca_file`` (default: the system CAs) and present ``cert_file``.

    Called once by the CLI from the settings; every later ``connect`` in this process (and in
    the workers it forks) uses it. Raises ``ConfigError`` when a file is not usable PEM.
    """
    global _tls_context
    if key_file and not cert_file:
        raise ConfigError("--tls-key-file: needs --tls-cert-file (the certificate it belongs to)")
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"--tls-ca-file: {ca_file} is not a usable PEM CA bundle: {exc}") from None
    if cert_file:
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"--tls-cert-file/--tls-key-file: not a usable PEM certificate and key: {exc}") from None
    _tls_context = ctx


def url_parameters(url: str) -> pika.URLParameters:
    """pika parameters for one node's ``url``; ``amqps://`` verifies the broker's certificate and host name."""
    params = pika.URLParameters(url.strip())
    if params.ssl_options is not None:
        # pika's own default context has no server_hostname, so host-name checking cannot work
        params.ssl_options = pika.SSLOptions(_tls_context or ssl.create_default_context(), server_hostname=params.host)
    return params
