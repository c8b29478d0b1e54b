"""A local HTTP server speaking the part of the HuggingFace Hub protocol that huggingface_hub downloads use.

It lets the download tests run the real huggingface_hub client and our download code over real HTTP,
offline: repo info with LFS metadata, the file tree, and /resolve/ with HEAD, GET and byte ranges.
Faults can be switched on per file: a connection cut halfway through the first GET, or served bytes
that differ from the published sha256; or for everything: an outage (503) for a while. Every request is
recorded for assertions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubRepo:
    def __init__(self, directory: str, commit: str, private: bool = False):
        self.directory, self.commit, self.private = directory, commit, private
        self.files = {}
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                data = f.read()
            lfs = name.endswith((".bin", ".safetensors", ".model"))
            self.files[name] = {
                "path": path,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "oid": hashlib.sha1(data).hexdigest(),
                "lfs": lfs,
            }


class FakeHub:
    def __init__(self, token: str | None = None):
        self.repos: dict[str, HubRepo] = {}
        self.token = token
        self.requests: list[tuple[str, str, dict]] = []
        self.cut_once: set[str] = set()
        self.corrupt: set[str] = set()
        self.down_until = 0.0  # time.monotonic() until which every request gets 503 (an outage)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_repo(self, repo_id: str, directory: str, commit: str, private: bool = False) -> HubRepo:
        self.repos[repo_id] = HubRepo(directory, commit, private)
        return self.repos[repo_id]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, obj, status=200):
                self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

            def _error(self, status: int, code: str):
                self._send(
                    status,
                    json.dumps({"error": code}).encode(),
                    {"Content-Type": "application/json", "X-Error-Code": code},
                )

            def _repo(self, repo_id: str, revision: str):
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound")
                    return None
                if repo.private and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self._error(401, "RepoNotFound")
                    return None
                if revision not in ("main", repo.commit):
                    self._error(404, "RevisionNotFound")
                    return None
                return repo

            def do_HEAD(self):
                self._route(head=True)

            def do_GET(self):
                self._route(head=False)

            def _route(self, head: bool):
                hub.requests.append((self.command, self.path, dict(self.headers)))
                if time.monotonic() < hub.down_until:
                    self._error(503, "ServiceUnavailable")
                    return
                path = self.path.split("?", 1)[0]
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
                if m:
                    repo = self._repo(m.group(1), m.group(2))
                    if repo:
                        siblings = [
                            {
                                "rfilename": n,
                                "size": f["size"],
                                "blobId": f["oid"],
                                **(
                                    {"lfs": {"sha256": f["sha256"], "size": f["size"], "pointerSize": 134}}
                                    if f["lfs"]
                                    else {}
                                ),
                            }
                            for n, f in repo.files.items()
                        ]
                        self._json(
                            {
                                "id": m.group(1),
                                "modelId": m.group(1),
                                "sha": repo.commit,
                                "private": repo.private,
                                "siblings": siblings,
                            }
                        )
                    return
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
                if m:
                    repo = self._repo(m.group(1), m.group(2))
                    if repo:
                        self._json(
                            [
                                {
                                    "type": "file",
                                    "path": n,
                                    "size": f["size"],
                                    "oid": f["oid"],
                                    **(
                                        {"lfs": {"oid": f["sha256"], "size": f["size"], "pointerSize": 134}}
                                        if f["lfs"]
                                        else {}
                                    ),
                                }
                                for n, f in repo.files.items()
                            ]
                        )
                    return
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m:
                    repo = self._repo(m.group(1), m.group(2))
                    if repo:
                        self._serve_file(repo, m.group(3), head)
                    return
                self._error(404, "EntryNotFound")

            def _serve_file(self, repo: HubRepo, name: str, head: bool):
                info = repo.files.get(name)
                if info is None:
                    self._error(404, "EntryNotFound")
                    return
                with open(info["path"], "rb") as f:
                    data = f.read()
                if name in hub.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                etag = info["sha256"] if info["lfs"] else info["oid"]
                headers = {
                    "X-Repo-Commit": repo.commit,
                    "ETag": f'"{etag}"',
                    "Accept-Ranges": "bytes",
                    "Content-Type": "application/octet-stream",
                }
                if info["lfs"]:
                    headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(info["size"])})
                start = 0
                rng = self.headers.get("Range")
                if rng and not head:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                body = data[start:]
                if not head and name in hub.cut_once:
                    hub.cut_once.discard(name)
                    self.send_response(206 if start else 200)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self._send(206 if start else 200, body, headers, head=head)

        return Handler
