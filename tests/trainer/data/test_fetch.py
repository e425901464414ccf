"""The guarded fetch of image URLs (``visionft.data.fetch``), through the image loader: address rules after
DNS, the byte limit and time-out, and redirects.

URL tests use a real HTTP server on this machine's own non-loopback address; a fixed resolver table maps
made-up host names to addresses, which also proves the fetch connects to the checked address (the names
do not exist in DNS, so any second resolution would fail).
"""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest
from visionft.data.errors import BadSampleError
from visionft.data.images import ImageLimits, ImageLoader

from tests.trainer.data.test_images import png_bytes

# ------------------------------------------------------------------------------------------------------
# Address rules, checked after resolution
# ------------------------------------------------------------------------------------------------------


def table_resolver(table: dict[str, list[str]]):
    def resolve(host, port, type=0, **_):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in table[host]
        ]

    return resolve


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.10.1", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("10.0.0.5", "private-network"),
        ("192.168.1.1", "private-network"),
        ("172.16.0.1", "private-network"),
        ("100.64.0.1", "private-network"),
        ("fd12:3456::1", "private-network"),
        ("240.0.0.1", "reserved"),
    ],
)
def test_urls_resolving_to_internal_addresses_are_refused(address, reason):
    loader = ImageLoader(resolver=table_resolver({"images.test": [address]}))
    with pytest.raises(BadSampleError, match=reason):
        loader.load("https://images.test/cat.png", index=1)


def test_one_bad_address_among_good_ones_fails_the_name():
    # A resolver may answer differently next time: any refused address refuses the name.
    loader = ImageLoader(resolver=table_resolver({"images.test": ["93.184.216.34", "169.254.169.254"]}))
    with pytest.raises(BadSampleError, match="metadata"):
        loader.load("https://images.test/cat.png")


def test_private_networks_need_the_allow_flag_but_metadata_never_passes():
    resolver = table_resolver({"lan.test": ["10.1.2.3"], "meta.test": ["169.254.169.254"]})
    loader = ImageLoader(limits=ImageLimits(allow_private_networks=True), resolver=resolver)
    assert loader.fetch.check_host("lan.test", 443) == "10.1.2.3"
    with pytest.raises(BadSampleError, match="metadata"):
        loader.fetch.check_host("meta.test", 443)


def test_unresolvable_host_is_a_bad_sample():
    with pytest.raises(BadSampleError, match="does not resolve"):
        ImageLoader(resolver=table_resolver({})).load("https://nowhere.test/a.png")


# ------------------------------------------------------------------------------------------------------
# Real fetches from a local server on this machine's non-loopback address
# ------------------------------------------------------------------------------------------------------


def _own_address() -> str | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it only picks the route
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


@pytest.fixture
def server():
    address = _own_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to serve from")
    body = png_bytes((40, 30))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.png":
                time.sleep(3)
            if self.path == "/redirect-to-metadata":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
                return
            payload = body * 50 if self.path == "/big.png" else body
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            if self.path != "/big.png":  # the big one hides its length: the streamed limit must catch it
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # clients that stop reading at the byte limit or time-out break the pipe on purpose

    httpd = Server((address, 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield address, httpd.server_address[1], len(body)
    httpd.shutdown()
    httpd.server_close()


def _loader(address, **limits):
    resolver = table_resolver({"img.test": [address], "meta.test": ["169.254.169.254"]})
    return ImageLoader(
        limits=ImageLimits(allow_http=True, allow_private_networks=True, **limits), resolver=resolver
    )


def test_fetch_connects_to_the_checked_address(server):
    address, port, _ = server
    # img.test exists only in the injected table, so this succeeds only if the connection goes to the
    # address checked there, with no second resolution.
    assert _loader(address).load(f"http://img.test:{port}/a.png").size == (40, 30)


def test_fetch_byte_limit_and_timeout(server):
    address, port, size = server
    with pytest.raises(BadSampleError, match="byte limit"):
        _loader(address, max_bytes=size * 10).load(f"http://img.test:{port}/big.png")
    started = time.perf_counter()
    with pytest.raises(BadSampleError, match="could not be fetched"):
        _loader(address, timeout_s=0.5).load(f"http://img.test:{port}/slow.png")
    assert time.perf_counter() - started < 2.5


def test_redirects_are_checked_like_the_first_url(server):
    address, port, _ = server
    with pytest.raises(BadSampleError, match="metadata"):
        _loader(address).load(f"http://img.test:{port}/redirect-to-metadata")
