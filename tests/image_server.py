"""A loopback HTTP server for image URLs (127.0.0.1, a free port, a daemon thread).

/missing.png               404
/bytes?n=N[&declare=1]     N bytes, with a Content-Length only when `declare` (else the body ends at close)
/drip?seconds=S            one byte every 0.1 s for S seconds: each read is quick, the whole transfer is not
any other path             the image given at start (so a public image's URL keeps its path here)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


def handler_class(image: bytes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the connection closes after each answer: a body may end without a length

        def do_GET(self) -> None:
            url = urlparse(self.path)
            query = {key: values[0] for key, values in parse_qs(url.query).items()}
            if url.path == "/missing.png":
                self.send_error(404)
            elif url.path == "/bytes":
                self.answer(b"\0" * int(query["n"]), declare="declare" in query)
            elif url.path == "/drip":
                self.drip(float(query["seconds"]))
            else:
                self.answer(image, declare=True)

        def answer(self, body: bytes, declare: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if declare:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def drip(self, seconds: float) -> None:
            self.send_response(200)
            self.end_headers()
            deadline = time.monotonic() + seconds
            try:
                while time.monotonic() < deadline:
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:  # the client gave up
                pass

        def log_message(self, *args) -> None:  # quiet
            pass

    return Handler


@contextmanager
def image_server(image: bytes) -> Iterator[str]:
    """Serve `image` (and the test routes above); yields the base URL, "http://127.0.0.1:PORT"."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class(image))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
