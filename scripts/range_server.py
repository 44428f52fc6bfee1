#!/usr/bin/env python3
"""A local HTTP server for testing and measuring remote reads (Python standard library only).

It serves the files under ROOT the way the services ckpt reads from do:
  - GET /PATH with `Range: bytes=A-B` (or `A-`) answers 206 with Content-Range; without a
    Range, 200. Every reply carries a strong ETag and Last-Modified (from size and mtime).
  - Hub style: GET /ORG/REPO/resolve/REV/FILE answers 302 to /cdn/ORG/REPO/FILE on the host
    named by `cdn_host` (another name for this server, so a client's credential rule for
    redirects can be observed), as huggingface.co redirects LFS files to its CDN.
  - GCS style needs nothing special: gs://BUCKET/OBJECT is GET /BUCKET/OBJECT.

Faults for tests, set on `server.faults` (a `Faults`): cut the connection after N body bytes
for the next K replies, answer 503 with Retry-After, change a file's ETag after some replies.
`server.stats` counts requests and body bytes per path, and records each request's
Authorization header and Host, so tests can check what was fetched and what was sent where.

Run alone (`python3 scripts/range_server.py ROOT [PORT]`) it serves until interrupted.
"""
import email.utils
import http.server
import os
import re
import socketserver
import sys
import threading
import urllib.parse


class Faults:
    def __init__(self):
        self.lock = threading.Lock()
        self.cut = {}        # path -> [bytes to send before cutting, replies left]
        self.status = {}     # path -> [status, replies left, retry_after]
        self.change_after = {}  # path -> replies after which the ETag changes
        self.require_token = None  # (path prefix, token): 401 without it, 403 with another
        self.wrong_range = set()  # paths whose 206 replies claim a Content-Range one byte off
        self.claim_total = {}  # path -> the total size its Content-Range claims (a lying server)

    def take_cut(self, path):
        with self.lock:
            c = self.cut.get(path)
            if c and c[1] > 0:
                c[1] -= 1
                return c[0]
        return None

    def take_status(self, path):
        with self.lock:
            s = self.status.get(path)
            if s and s[1] > 0:
                s[1] -= 1
                return s[0], s[2]
        return None


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []  # (path, range header, authorization, host)
        self.bytes = {}     # path -> body bytes sent
        self.replies = {}   # path -> 2xx replies

    def record(self, path, rng, auth, host):
        with self.lock:
            self.requests.append((path, rng, auth, host))

    def sent(self, path, n):
        with self.lock:
            self.bytes[path] = self.bytes.get(path, 0) + n

    def total_bytes(self):
        with self.lock:
            return sum(self.bytes.values())

    def reset(self):
        with self.lock:
            self.requests.clear()
            self.bytes.clear()
            self.replies.clear()


RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        raw_path = urllib.parse.urlsplit(self.path).path
        path = urllib.parse.unquote(raw_path)
        srv.stats.record(path, self.headers.get("Range"), self.headers.get("Authorization"), self.headers.get("Host"))
        m = RESOLVE.match(path)
        if m:
            kind, org, repo, _rev, file = m.groups()
            target = f"http://{srv.cdn_host}:{srv.server_address[1]}/cdn/{(kind + '/') if kind else ''}{org}/{repo}/{urllib.parse.quote(file)}"
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path.startswith("/cdn/"):
            path = path[4:]
        token = srv.faults.require_token
        if token and path.startswith(token[0]):
            auth = self.headers.get("Authorization")
            if auth is None:
                return self.reply_status(401)
            if auth != "Bearer " + token[1]:
                return self.reply_status(403)
        status = srv.faults.take_status(path)
        if status:
            return self.reply_status(status[0], retry_after=status[1])
        local = os.path.normpath(os.path.join(srv.root, path.lstrip("/")))
        if not local.startswith(os.path.abspath(srv.root)) or not os.path.isfile(local):
            return self.reply_status(404)
        st = os.stat(local)
        size = st.st_size
        with srv.faults.lock:
            n = srv.stats.replies.get(path, 0)
            changed = path in srv.faults.change_after and n >= srv.faults.change_after[path]
        etag = f'"{st.st_mtime_ns:x}-{size:x}{"-changed" if changed else ""}"'
        first, last = 0, size - 1
        rng = self.headers.get("Range")
        partial = False
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m:
                return self.reply_status(416, size=size)
            first = int(m.group(1))
            last = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            if first >= size or last < first:
                return self.reply_status(416, size=size)
            partial = True
        with srv.stats.lock:
            srv.stats.replies[path] = srv.stats.replies.get(path, 0) + 1
        length = last - first + 1
        self.send_response(206 if partial else 200)
        if partial:
            off = 1 if path in srv.faults.wrong_range and first > 0 else 0
            total = srv.faults.claim_total.get(path, size)
            self.send_header("Content-Range", f"bytes {first + off}-{last + off}/{total}")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        self.end_headers()
        cut = srv.faults.take_cut(path)
        with open(local, "rb") as f:
            f.seek(first)
            left = length if cut is None else min(length, cut)
            while left > 0:
                block = f.read(min(left, 1 << 20))
                if not block:
                    break
                self.wfile.write(block)
                srv.stats.sent(path, len(block))
                left -= len(block)
        if cut is not None and cut < length:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)

    def reply_status(self, code, retry_after=None, size=None):
        body = f"status {code}\n".encode()
        self.send_response(code)
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        if size is not None:
            self.send_header("Content-Range", f"bytes */{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class RangeServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root, port=0, cdn_host="localhost"):
        super().__init__(("127.0.0.1", port), Handler)
        self.root = os.path.abspath(root)
        self.cdn_host = cdn_host
        self.faults = Faults()
        self.stats = Stats()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self):
        t = threading.Thread(target=self.serve_forever, daemon=True)
        t.start()
        return self


if __name__ == "__main__":
    server = RangeServer(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8000)
    print(f"serving {server.root} at {server.url}", flush=True)
    server.serve_forever()
