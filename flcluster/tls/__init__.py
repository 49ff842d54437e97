"""TLS for every connection of the cluster (spec/cluster-protocol.md §7).

- :mod:`flcluster.tls.certificates`: reading and checking certificate files (PKCS#12, PEM, CA bundle, CRL)
  with ``cryptography``; validity periods.
- :mod:`flcluster.tls.contexts`: the SSL contexts built from them (cluster listener and connector, HTTPS
  server, HTTPS client), TLS 1.2 or newer, the original's cipher list.
- :mod:`flcluster.tls.node`: what a role loads at start-up (:func:`load_node_tls`) and the watcher of
  expiring certificates.

Streams are wrapped in :mod:`flcluster.runtime.links` (cluster links) and :mod:`flcluster.http.serving`
(Hypercorn); this package opens no socket.
"""

from flcluster.tls.contexts import ALLOWED_CIPHERS, DEFAULT_CIPHERS, https_client_context, parse_cipher_list
from flcluster.tls.node import NodeTls, TlsRole, load_node_tls, watch_certificates

__all__ = [
    "ALLOWED_CIPHERS",
    "DEFAULT_CIPHERS",
    "NodeTls",
    "TlsRole",
    "https_client_context",
    "load_node_tls",
    "parse_cipher_list",
    "watch_certificates",
]
