"""A local stand-in for the parts of the Hugging Face Hub API an upload uses (no network).

It answers huggingface_hub's calls for a git-LFS upload: repo creation, the "preupload" check,
the LFS batch API (which says which objects it already has: that is what makes a second run
resume instead of starting over), the LFS object PUTs and the commit. ``fail_commits`` makes the
next N commits answer 503 (a transient server error), so a test can interrupt an upload after
its files were sent and check that the retry, or a second run, sends none of them again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStandIn:
    def __init__(self):
        self.objects: dict[str, bytes] = {}      # LFS oid -> content
        self.puts: list[str] = []                # oids uploaded, in order (a resumed upload adds none twice)
        self.commits: list[dict] = []            # committed {path: oid or sha256 of regular content}
        self.requests: list[str] = []
        self.fail_commits = 0
        self.unknown: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):   # quiet
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reply(self, code: int, payload=None, raw: bytes | None = None):
                data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                stand_in.requests.append(f"POST {self.path}")
                body = self._body()
                if self.path == "/api/repos/create":
                    name = json.loads(body)
                    repo = f"{name.get('organization') or 'me'}/{name['name']}"
                    return self._reply(200, {"url": f"{stand_in.url}/{repo}", "name": repo})
                if self.path == "/api/validate-yaml":     # the client checks the card's front matter
                    return self._reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["size"] > 1024 else "regular",
                         "shouldIgnore": False} for f in files]})
                if self.path.endswith(".git/info/lfs/objects/batch"):
                    objects = []
                    for obj in json.loads(body)["objects"]:
                        entry = {"oid": obj["oid"], "size": obj["size"]}
                        if obj["oid"] not in stand_in.objects:     # only what we lack is asked for
                            entry["actions"] = {"upload": {"href": f"{stand_in.url}/lfs-upload/{obj['oid']}"}}
                        objects.append(entry)
                    return self._reply(200, {"transfer": "basic", "objects": objects})
                if "/commit/" in self.path:
                    if stand_in.fail_commits > 0:
                        stand_in.fail_commits -= 1
                        return self._reply(503, {"error": "Service temporarily unavailable"})
                    files = {}
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "lfsFile":
                            if item["value"]["oid"] not in stand_in.objects:
                                return self._reply(400, {"error": f"missing LFS object {item['value']['oid']}"})
                            files[item["value"]["path"]] = item["value"]["oid"]
                        elif item["key"] == "file":
                            content = base64.b64decode(item["value"]["content"])
                            files[item["value"]["path"]] = hashlib.sha256(content).hexdigest()
                    stand_in.commits.append(files)
                    oid = f"{len(stand_in.commits):040x}"
                    repo = self.path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
                    return self._reply(200, {"commitUrl": f"{stand_in.url}/{repo}/commit/{oid}", "commitOid": oid})
                stand_in.unknown.append(f"POST {self.path}")
                return self._reply(404, {"error": "not in the stand-in"})

            def do_PUT(self):
                stand_in.requests.append(f"PUT {self.path}")
                body = self._body()
                if self.path.startswith("/lfs-upload/"):
                    oid = self.path.rsplit("/", 1)[1]
                    if hashlib.sha256(body).hexdigest() != oid:
                        return self._reply(400, {"error": "content does not match its oid"})
                    stand_in.objects[oid] = body
                    stand_in.puts.append(oid)
                    return self._reply(200, raw=b"")
                stand_in.unknown.append(f"PUT {self.path}")
                return self._reply(404, {"error": "not in the stand-in"})

            def do_GET(self):
                stand_in.requests.append(f"GET {self.path}")
                stand_in.unknown.append(f"GET {self.path}")
                return self._reply(404, {"error": "not in the stand-in"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
