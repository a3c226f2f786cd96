"""A stand-in for the Hugging Face Hub on 127.0.0.1: what ``hf_hub_download`` asks of it.

huggingface_hub 2.4 resolves a file with ``HEAD /{repo}/resolve/{revision}/{file}`` (reading the
``X-Repo-Commit``, ``ETag`` and ``Content-Length`` headers; ``X-Error-Code`` tells a missing repo
from a missing file, a missing revision and a gated repo), then fetches it with ``GET`` on the same
path. A private repo answers 401 without its token, as the Hub answers a missing one. Besides, once a day per
HF_HOME, its user-agent code asks ``GET /api/agent-harnesses`` for a registry of AI agents (served
empty here, as huggingface_hub itself falls back to).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hub:
    """Repos of files served over HTTP; ``requests`` records every (method, path) answered."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str]] = []
        self.cut_short: set[tuple[str, str]] = set()  # (repo, file) whose GET stops halfway
        self.revisions: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, revision) -> files
        self.gated: set[str] = set()  # repos whose conditions the caller has not accepted
        self.private: dict[str, str] = {}  # repo -> the token that reads it
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: the OS picks a free one
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, repo: str, files: dict[str, bytes]) -> None:
        """Serve ``files`` (name -> content) as Hub repo ``repo``."""
        self.repos[repo] = dict(files)

    def add_revision(self, repo: str, revision: str, files: dict[str, bytes]) -> None:
        """Serve ``files`` as ``repo`` at ``revision`` (a branch, tag or commit besides main)."""
        self.revisions[(repo, revision)] = dict(files)

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((handler.command, handler.path))
        if handler.path == "/api/agent-harnesses":
            return self._json(handler, json.dumps({"standardEnvVars": [], "harnesses": {}}).encode())
        parts = handler.path.split("/")
        # ['', org, name, 'resolve', revision, file]
        if len(parts) != 6 or parts[3] != "resolve":
            return self._error(handler, 404, "EntryNotFound")
        repo, revision, filename = f"{parts[1]}/{parts[2]}", parts[4], parts[5]
        if repo not in self.repos or (repo in self.private and handler.headers.get("Authorization")
                                      != f"Bearer {self.private[repo]}"):
            return self._error(handler, 401 if repo in self.private else 404, "RepoNotFound")
        if repo in self.gated:
            return self._error(handler, 403, "GatedRepo")
        files = self.repos[repo] if revision == "main" else self.revisions.get((repo, revision))
        if files is None:
            return self._error(handler, 404, "RevisionNotFound")
        commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
        if filename not in files:
            return self._error(handler, 404, "EntryNotFound", commit)
        content = files[filename]
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", commit)
        handler.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        if body:
            short = (repo, filename) in self.cut_short
            handler.wfile.write(content[:len(content) // 2] if short else content)
            if short:
                handler.close_connection = True

    @staticmethod
    def _json(handler, payload: bytes) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    @staticmethod
    def _error(handler, status: int, code: str, commit: str | None = None) -> None:
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        if commit:
            handler.send_header("X-Repo-Commit", commit)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
