"""A local stand-in of the Hugging Face hub's file endpoints, for tests (127.0.0.1 only).

It answers what `huggingface_hub.hf_hub_download` asks (huggingface_hub/file_download.py):
HEAD and GET of `/{repo}/resolve/{revision}/{file}` and `/spaces/{repo}/resolve/...`, with
`X-Repo-Commit` (40 hex digits), `ETag` and `Content-Length`; GET honours `Range: bytes=N-`
(206, `Content-Range`). A missing file is a 404 with `X-Error-Code: EntryNotFound`, as the hub
answers. With `cut_first_get`, the first GET of each file announces the whole length, sends all but
its last eighth (`cut_at`) and closes the connection (an interrupted download; the client keeps
what it has written, whole chunks of huggingface_hub's DOWNLOAD_CHUNK_SIZE). Every request is recorded.
"""
import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Tuple

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_PATH = re.compile(r"^/(?P<repo>(?:spaces/|datasets/)?[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>[^?]+)")


class HubStandIn:
    """`files`: {("OWNER/REPO" or "spaces/OWNER/REPO", "FILE"): bytes}. Use as a context manager."""

    def __init__(self, files: Dict[Tuple[str, str], bytes], cut_first_get: bool = False, timeout_s: float = 30):
        self.files = files
        self.cut_first_get = cut_first_get
        self.requests: List[Tuple[str, str, str]] = []  # (method, path, Range header)
        self._cut_done = set()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            timeout = timeout_s

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                stand_in._answer(self, body=False)

            def do_GET(self):
                stand_in._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @staticmethod
    def cut_at(data: bytes) -> int:
        return len(data) - len(data) // 8

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(10)
        self.server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        rng = handler.headers.get("Range", "")
        self.requests.append((handler.command, handler.path, rng))
        match = _PATH.match(handler.path)
        data = self.files.get((match["repo"], match["file"])) if match else None
        if data is None:
            handler.send_response(404)
            handler.send_header("X-Error-Code", "EntryNotFound")
            handler.send_header("X-Error-Message", "Entry not found")
            handler.send_header("X-Repo-Commit", COMMIT)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(len(data) - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        if not body:
            return
        key = handler.path
        if self.cut_first_get and key not in self._cut_done:
            self._cut_done.add(key)
            handler.wfile.write(data[start:self.cut_at(data)])
            handler.wfile.flush()
            handler.close_connection = True
            return
        handler.wfile.write(data[start:])
