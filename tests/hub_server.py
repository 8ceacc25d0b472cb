"""A stand-in for the Hugging Face Hub HTTP API on 127.0.0.1, for testing pushes offline.

It serves just what `HfApi.create_repo`, `HfApi.create_branch` and `HfApi.create_commit` (huggingface_hub 1.x/2.x)
send, and records everything it receives:

  POST /api/repos/create                          create a model (or dataset) repo (409 when it exists)
  POST /api/validate-yaml                         README.md front matter check (parses it with yaml.safe_load)
  POST /api/models/{ns}/{name}/branch/{branch}    create a branch from main (409 when it exists)
  POST /api/models/{ns}/{name}/preupload/{rev}    upload mode of each file: "regular" (base64 in the commit) or
                                                  "lfs" for paths matching `lfs_patterns`; `oid` of the file already
                                                  there, so that unchanged files are left out of the commit
  POST /{ns}/{name}.git/info/lfs/objects/batch    LFS batch API, "basic" transfer: one PUT per object to
  PUT  /__lfs/{oid}                               this upload URL (checked against its sha256)
  POST /api/models/{ns}/{name}/commit/{rev}       the ndjson commit: header, file (base64), lfsFile, deletedFile
  GET  /api/models/{ns}/{name}[/revision/{rev}]   repo info (sha, private, siblings)
  HEAD|GET /{ns}/{name}/resolve/{rev}/{path}      a file, as `hf_hub_download` (and so `ModelCard.load`) fetches it:
                                                  X-Repo-Commit, ETag (git blob sha1), Content-Length; an LFS file
                                                  answers 302 to the stand-in CDN with X-Linked-Etag (sha256) and
                                                  X-Linked-Size, as the Hub does
  GET  /__lfs/{oid}                               the stand-in CDN, reached as `localhost` (another host than the
                                                  Hub's 127.0.0.1, so the client sends it no token)

Dataset repos (`"type": "dataset"` at creation) answer the same routes under /api/datasets/... and /datasets/...
(`dataset_repos`; `uploaded(..., repo_type="dataset")`).

Large files go through Xet when `hf_xet` is installed and the Hub answers "lfs"; this server has no Xet storage, so a
test that asks for LFS must disable Xet (`huggingface_hub.constants.HF_HUB_DISABLE_XET = True`).

Every request body is kept (`bodies`), as is every Authorization header value (`authorizations`), so that a test can
check that a token went only where it should.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool | None
    branches: dict[str, str] = field(default_factory=dict)  # branch -> head commit sha
    trees: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: content}
    lfs_paths: dict[str, set[str]] = field(default_factory=dict)  # commit sha -> paths committed as LFS pointers
    commits: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "model"  # or "dataset"

    @property
    def url_path(self) -> str:
        """The repo's place in URLs: `org/name` for a model, `datasets/org/name` for a dataset."""
        return self.repo_id if self.kind == "model" else f"datasets/{self.repo_id}"

    def files(self, revision: str = "main") -> dict[str, bytes]:
        sha = self.branches.get(revision, revision)
        return dict(self.trees.get(sha, {}))


class HubServer:
    """Run with `with HubServer() as hub:`; `hub.url` is the endpoint to point HF_ENDPOINT at."""

    def __init__(self, token: str | None = None, lfs_patterns: tuple[str, ...] = ()):
        self.token = token  # when set, requests to /api and the LFS batch API must carry `Bearer <token>`
        self.lfs_patterns = lfs_patterns
        self.repos: dict[str, Repo] = {}
        self.dataset_repos: dict[str, Repo] = {}  # dataset repos (`rlhf push` of a labelling run)
        self.created: list[dict[str, Any]] = []  # create-repo payloads, also those answered 409
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.bodies: list[bytes] = []
        self.authorizations: list[str | None] = []
        self.lfs_objects: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def uploaded(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of the repo at `revision` (a branch or commit): path -> bytes."""
        return (self.repos if repo_type == "model" else self.dataset_repos)[repo_id].files(revision)

    # ---------------------------------------------------------------------------------------------------------
    # handlers: each returns (status, body: JSON data or the bytes of a file, extra headers)
    # ---------------------------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes):
        with self._lock:
            self.requests.append((method, path))
            self.bodies.append(body)
            self.authorizations.append(headers.get("authorization"))
        if path.startswith("/__lfs/") and method == "PUT":  # a pre-signed storage URL: no Authorization header
            return self._lfs_put(path.removeprefix("/__lfs/"), body)
        if path.startswith("/__lfs/") and method == "GET":  # the CDN: likewise
            data = self.lfs_objects.get(path.removeprefix("/__lfs/"))
            return (200, data, {}) if data is not None else (404, {"error": "no such object"}, {})
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}, {}
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body))
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body))
        store = self.repos
        if parts[0] == "datasets" and len(parts) >= 3:  # /datasets/org/name/...: a dataset repo's git and files
            store, parts = self.dataset_repos, parts[1:]
        if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") \
                and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1].removesuffix('.git')}", json.loads(body), store)
        if len(parts) >= 5 and parts[0] != "api" and parts[2] == "resolve" and method in ("HEAD", "GET"):
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), store)
        if len(parts) >= 4 and parts[:2] in (["api", "models"], ["api", "datasets"]):
            repo = (self.repos if parts[1] == "models" else self.dataset_repos).get(f"{parts[2]}/{parts[3]}")
            if repo is None:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            rest = parts[4:]
            if method == "GET" and not rest:
                return self._info(repo, "main")
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self._info(repo, rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                return self._create_branch(repo, rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(repo, rest[1], json.loads(body))
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(repo, rest[1], body)
        return 404, {"error": f"stand-in Hub: no route for {method} {path}"}, {}

    def _create_repo(self, payload: dict[str, Any]):
        self.created.append(payload)
        kind = payload.get("type") or "model"
        if kind not in ("model", "dataset"):
            return 400, {"error": "the stand-in Hub only holds model and dataset repos"}, {}
        store = self.repos if kind == "model" else self.dataset_repos
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.url}/{repo_id if kind == 'model' else 'datasets/' + repo_id}"
        with self._lock:
            if repo_id in store:
                return 409, {"error": f"You already created this {kind} repo", "url": url}, {}
            visibility = payload.get("visibility")
            private = payload.get("private") if visibility is None else visibility == "private"
            repo = Repo(repo_id, private, kind=kind)
            sha = self._new_sha()
            gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            repo.trees[sha] = {".gitattributes": gitattributes}
            repo.lfs_paths[sha] = set()
            repo.branches["main"] = sha
            repo.commits.append({"sha": sha, "summary": "initial commit", "revision": "main"})
            store[repo_id] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _validate_yaml(self, payload: dict[str, Any]):
        content = payload.get("content", "")
        if not content.startswith("---\n"):
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}, {}
        head = content[4:].split("\n---\n", 1)
        try:
            data = yaml.safe_load(head[0]) if len(head) == 2 else None
        except yaml.YAMLError as exc:
            return 400, {"errors": [{"message": f"invalid YAML: {exc}"}]}, {}
        if not isinstance(data, dict):
            return 400, {"errors": [{"message": "metadata is not a mapping"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _create_branch(self, repo: Repo, branch: str):
        with self._lock:
            if branch in repo.branches:
                return 409, {"error": "Reference already exists"}, {}
            repo.branches[branch] = repo.branches["main"]
        return 200, {}, {}

    def _preupload(self, repo: Repo, revision: str, payload: dict[str, Any]):
        if revision not in repo.branches:
            return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
        head = repo.branches[revision]
        tree, lfs = repo.trees[head], repo.lfs_paths[head]
        files = []
        for item in payload["files"]:
            path = item["path"]
            mode = "lfs" if any(fnmatch.fnmatch(path, p) for p in self.lfs_patterns) else "regular"
            oid = None
            if path in tree:
                oid = hashlib.sha256(tree[path]).hexdigest() if path in lfs else git_blob_sha1(tree[path])
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return 200, {"files": files, "commitOid": head}, {}

    def _lfs_batch(self, repo_id: str, payload: dict[str, Any], store: dict[str, Repo]):
        if repo_id not in store:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.url}/__lfs/{obj['oid']}"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _lfs_put(self, oid: str, body: bytes):
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "sha256 mismatch"}, {}
        with self._lock:
            self.lfs_objects[oid] = body
        return 200, {}, {}

    def _commit(self, repo: Repo, revision: str, body: bytes):
        if revision not in repo.branches:
            return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return 400, {"error": "the commit must start with a header line"}, {}
        with self._lock:
            parent = repo.branches[revision]
            tree, lfs = dict(repo.trees[parent]), set(repo.lfs_paths[parent])
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        return 400, {"error": "expected base64 content"}, {}
                    tree[value["path"]] = base64.b64decode(value["content"])
                    lfs.discard(value["path"])
                elif key == "lfsFile":
                    if value["oid"] not in self.lfs_objects:
                        return 400, {"error": f"LFS object {value['oid']} was never uploaded"}, {}
                    tree[value["path"]] = self.lfs_objects[value["oid"]]
                    lfs.add(value["path"])
                elif key in ("deletedFile", "deletedFolder"):
                    prefix = value["path"].rstrip("/") + "/"
                    for path in [p for p in tree if p == value["path"] or p.startswith(prefix)]:
                        tree.pop(path)
                        lfs.discard(path)
                else:
                    return 400, {"error": f"unknown commit operation {key!r}"}, {}
            sha = self._new_sha()
            repo.trees[sha], repo.lfs_paths[sha] = tree, lfs
            repo.branches[revision] = sha
            repo.commits.append({"sha": sha, "summary": lines[0]["value"].get("summary"), "revision": revision})
        return 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo.url_path}/commit/{sha}",
                     "pullRequestUrl": None}, {}

    def _info(self, repo: Repo, revision: str):
        sha = repo.branches.get(revision, revision)
        if sha not in repo.trees:
            return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
        return 200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": bool(repo.private),
                     "siblings": [{"rfilename": p} for p in sorted(repo.trees[sha])]}, {}

    def _resolve(self, repo_id: str, revision: str, path: str, store: dict[str, Repo]):
        repo = store.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        sha = repo.branches.get(revision, revision)
        if sha not in repo.trees:
            return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
        headers = {"X-Repo-Commit": sha}
        if path not in repo.trees[sha]:
            return 404, {"error": f"Entry not found: {path}"}, {**headers, "X-Error-Code": "EntryNotFound"}
        data = repo.trees[sha][path]
        if path in repo.lfs_paths[sha]:
            oid = hashlib.sha256(data).hexdigest()
            cdn = self.url.replace("127.0.0.1", "localhost")
            return 302, {}, {**headers, "Location": f"{cdn}/__lfs/{oid}", "X-Linked-Etag": f'"{oid}"',
                             "X-Linked-Size": str(len(data))}
        return 200, data, {**headers, "ETag": f'"{git_blob_sha1(data)}"'}

    def _new_sha(self) -> str:
        self._counter += 1
        return hashlib.sha1(f"stand-in commit {self._counter}".encode()).hexdigest()


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            body = self._body()
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                status, payload, extra = hub.handle(self.command, urlsplit(self.path).path, headers, body)
            except Exception as exc:  # noqa: BLE001 - a bug in the stand-in: answer 500 with the reason, not hang
                status, payload, extra = 500, {"error": f"stand-in Hub error: {exc!r}"}, {}
            raw = isinstance(payload, bytes)
            data = payload if raw else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if raw else "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in extra.items():
                self.send_header(key, value)
            if status >= 400 and "error" in payload:
                self.send_header("X-Error-Message", payload["error"])
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _body(self) -> bytes:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()  # CRLF after each chunk
            length = int(self.headers.get("content-length") or 0)
            return self.rfile.read(length) if length else b""

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    return Handler
