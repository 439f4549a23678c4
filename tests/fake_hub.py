"""A local HTTP server answering the few Hub endpoints huggingface_hub downloads through.

Tests point HF_ENDPOINT at it so huggingface_hub's own snapshot_download fills a
real Hugging Face cache (blobs named by sha256 for LFS files, snapshots by
commit, refs by branch); pulls are then run with HF_HUB_OFFLINE=1 from that cache.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"branches": {name: commit}, "commits": {commit: {file: bytes}}}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo_id: str, folder: Path, branch: str = "main") -> str:
        """Publish a folder's files as a new commit on `branch`; returns the commit id."""
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        commit = hashlib.sha1(json.dumps({k: git_blob_sha1(v) for k, v in files.items()}).encode() + branch.encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, {"branches": {}, "commits": {}})
        repo["commits"][commit] = files
        repo["branches"][branch] = commit
        return commit

    def close(self) -> None:
        self.server.shutdown()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _resolve(self, repo_id: str, revision: str):
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return None, None
                commit = repo["branches"].get(revision, revision)
                return commit, repo["commits"].get(commit)

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, doc) -> None:
                self._send(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})

            def _not_found(self, kind: str, head: bool = False) -> None:
                self._send(404, b'{"error": "not found"}', {"X-Error-Code": kind, "Content-Type": "application/json"}, head)

            def _route(self, head: bool) -> None:
                parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                    repo_id, kind, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                    commit, files = self._resolve(repo_id, revision)
                    if files is None:
                        return self._not_found("RepoNotFound" if repo_id not in hub.repos else "RevisionNotFound")
                    if kind == "revision":
                        return self._json({"id": repo_id, "sha": commit, "siblings": [{"rfilename": f} for f in files]})
                    return self._json([
                        {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name,
                         **({"lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}
                            if name.endswith(".safetensors") else {})}
                        for name, data in files.items()])
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, revision, name = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
                    commit, files = self._resolve(repo_id, revision)
                    if files is None or name not in files:
                        return self._not_found("EntryNotFound", head)
                    data = files[name]
                    headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"'}
                    if name.endswith(".safetensors"):  # stored with LFS on the Hub: the etag is the sha256
                        headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
                    return self._send(200, data, headers, head)
                self._not_found("Unknown", head)

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

        return Handler
