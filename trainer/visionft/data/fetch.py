"""A guarded HTTP(S) GET for the URLs a dataset names: it reaches public servers only, within limits.

- Schemes: ``https://``, and ``http://`` only with ``allow_http=True``; redirects are held to the same rule.
- The host is resolved first and every address is checked. Loopback, link-local (which covers the cloud
  metadata service 169.254.169.254), the AWS IPv6 metadata address fd00:ec2::254, unspecified, multicast
  and reserved addresses are always refused. Private ranges (RFC 1918, IPv6 ULA, carrier-grade NAT) are
  refused too unless ``allow_private_networks=True``: a dataset URL pointing into the cluster network is how
  server-side request forgery reaches internal services, so reaching it is an explicit opt-in. The
  connection then goes to the checked address itself (TLS still verifies the host name), so a second DNS
  answer cannot swap in another address between check and use. Redirects are followed at most three
  times, each target checked the same way.
- Every fetch has a time-out (connect and each read) and a byte limit, read in chunks, so a slow or endless
  response cannot hang or exhaust the trainer.

Every refusal or failure is a ``BadSampleError`` that says what to fix.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

from visionft.data.errors import BadSampleError

_METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
_MAX_REDIRECTS = 3
_CHUNK = 64 * 1024


class GuardedFetch:
    """Fetches URL bodies under the rules in the module docstring.

    Args:
        max_bytes (int): the largest body accepted.
        timeout_s (float): time-out for connecting and for each read.
        allow_http (bool): allow plain ``http://`` URLs. Default: False.
        allow_private_networks (bool): allow hosts that resolve to RFC 1918 / ULA / CGNAT addresses.
            Default: False.
        resolver (Callable | None): ``socket.getaddrinfo``-compatible resolver (tests inject a fixed table
            to check the address rules without a network). Default: ``socket.getaddrinfo``.
    """

    def __init__(
        self,
        max_bytes: int,
        timeout_s: float,
        allow_http: bool = False,
        allow_private_networks: bool = False,
        resolver: Callable[..., list] | None = None,
    ):
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.allow_http = allow_http
        self.allow_private_networks = allow_private_networks
        self._resolve = resolver or socket.getaddrinfo

    def check_host(self, host: str, port: int) -> str:
        """Resolves ``host`` and returns one address that passes the rules (the one to connect to).

        Raises:
            BadSampleError: the name does not resolve, or any of its addresses is refused. Any refused
                address fails the whole name, since a resolver may hand out a different one next time.
        """
        try:
            # An address literal needs no resolver (and must not be sent to one as a name).
            literal = ipaddress.ip_address(host.strip("[]"))
            infos = [(0, socket.SOCK_STREAM, 0, "", (str(literal), port))]
        except ValueError:
            infos = None
        try:
            infos = infos or self._resolve(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as err:
            raise BadSampleError(f"host {host!r} does not resolve ({err}); check the URL") from err
        addresses = []
        for info in infos:
            addr = ipaddress.ip_address(info[4][0].split("%")[0])
            reason = self.refusal(addr)
            if reason:
                raise BadSampleError(
                    f"host {host!r} resolves to {addr}, {reason}; image URLs must reach public servers "
                    "(private networks need an explicit allow)"
                )
            addresses.append(str(addr))
        if not addresses:
            raise BadSampleError(f"host {host!r} resolves to no address; check the URL")
        return addresses[0]

    def refusal(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """Why ``addr`` may not be fetched from, or None when it may."""
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if addr in _METADATA_ADDRESSES:
            return "the cloud metadata service"
        for test, name in (
            (addr.is_loopback, "a loopback address"),
            (addr.is_link_local, "a link-local address"),
            (addr.is_unspecified, "the unspecified address"),
            (addr.is_multicast, "a multicast address"),
        ):
            if test:
                return name
        if addr.is_global:
            return None
        if addr.is_reserved:
            return "a reserved address"
        if addr.is_private or addr in ipaddress.ip_network("100.64.0.0/10"):
            return None if self.allow_private_networks else "a private-network address"
        return "a reserved address"

    def get(self, url: str) -> bytes:
        """The body of ``url`` (``https://``, or ``http://`` when allowed), under the rules above.

        Raises:
            BadSampleError: the URL, its host or a redirect is refused, or the fetch fails or is too large.
        """
        for _ in range(_MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme not in ("https", "http") or (scheme == "http" and not self.allow_http):
                raise BadSampleError(f"{short_url(url)}: redirect to a refused scheme {scheme}://")
            if not parts.hostname:
                raise BadSampleError(f"{short_url(url)} has no host name; fix the URL")
            port = parts.port or (443 if scheme == "https" else 80)
            ip = self.check_host(parts.hostname, port)
            conn: http.client.HTTPConnection
            if scheme == "https":
                conn = _PinnedHTTPSConnection(parts.hostname, ip, port, timeout=self.timeout_s)
            else:
                conn = _PinnedHTTPConnection(parts.hostname, ip, port, timeout=self.timeout_s)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request("GET", target, headers={"Host": parts.netloc, "User-Agent": "visionft-trainer"})
                response = conn.getresponse()
                if response.status in (301, 302, 303, 307, 308):
                    location = response.getheader("Location")
                    if not location:
                        raise BadSampleError(f"{short_url(url)} redirects without a Location header")
                    url = urljoin(url, location)
                    continue
                if response.status != 200:
                    raise BadSampleError(f"{short_url(url)} answered HTTP {response.status}; check the URL")
                length = response.getheader("Content-Length")
                if length and length.isdigit() and int(length) > self.max_bytes:
                    raise BadSampleError(
                        f"{short_url(url)} is {length} bytes, over the {self.max_bytes}-byte limit"
                    )
                return self._read_body(response, url)
            except (OSError, http.client.HTTPException) as err:
                raise BadSampleError(
                    f"{short_url(url)} could not be fetched ({type(err).__name__}: {err}); check the URL and "
                    "that the server answers within the time-out"
                ) from err
            finally:
                conn.close()
        raise BadSampleError(f"{short_url(url)} redirects more than {_MAX_REDIRECTS} times")

    def _read_body(self, response: http.client.HTTPResponse, url: str) -> bytes:
        chunks, total = [], 0
        while True:
            chunk = response.read(_CHUNK)
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > self.max_bytes:
                raise BadSampleError(f"{short_url(url)} sends more than the {self.max_bytes}-byte limit")
            chunks.append(chunk)


def short_url(url: str) -> str:
    """The URL without its query string, which may carry signatures (presigned URLs)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else url[:200]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an already checked address instead of resolving the host name again."""

    def __init__(self, host: str, ip: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), timeout=self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an already checked address; the certificate is still verified against the host name."""

    def __init__(self, host: str, ip: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), timeout=self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]
