"""A real HTTP server on 127.0.0.1 (port 0, in a thread) with fault modes, for the judge and remote tests.

Paths (POST):
  /score            a remote reward: [{prompt, completion, answer?}] -> 1.0 if the completion contains the
                    answer else 0.0; an item whose completion contains "NULL" gets null
  /fail/N/score     the first N requests answer HTTP 500, then as /score
  /always500        HTTP 500 forever
  /bad-item/score   HTTP 500 for a batch holding a completion with "BAD", else as /score
  /malformed        200 with a body that is not JSON
  /slow/S/score     sleeps S seconds, then as /score
  /drop/N/score     the first N requests: the connection is closed without an answer, then as /score
  /auth/score       as /score if Authorization is "Bearer s3cret", else HTTP 401
  /wronglen         a list one too short
  /v1/chat/completions   an LLM judge; the request's `model` picks the behaviour: "yes_no" (yes iff the
                    student's answer contains the reference), "score" ("Score: 9/10" or "2"), "garbage"
                    ("I cannot decide" for completions with "?", else as yes_no)
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeServer:
    def __init__(self) -> None:
        self.requests: list[str] = []  # path of every request received
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(n) or b"null")
                with server.lock:
                    server.requests.append(self.path)
                    server.counts[self.path] = server.counts.get(self.path, 0) + 1
                    count = server.counts[self.path]
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server.handle(self, body, count)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, status: int, obj=None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def rewards(items: list[dict]) -> list:
        out = []
        for it in items:
            c = it["completion"]
            out.append(None if "NULL" in c else float(str(it.get("answer", "")) in c and it.get("answer") not in (None, "")))
        return out

    def handle(self, h: BaseHTTPRequestHandler, body, count: int) -> None:
        path = h.path
        if path == "/score":
            return self.reply(h, 200, self.rewards(body))
        if m := re.fullmatch(r"/fail/(\d+)/score", path):
            return self.reply(h, 500, {"error": "boom"}) if count <= int(m[1]) else self.reply(h, 200, self.rewards(body))
        if path == "/always500":
            return self.reply(h, 500, {"error": "boom"})
        if path == "/bad-item/score":
            if any("BAD" in it["completion"] for it in body):
                return self.reply(h, 500, {"error": "bad item"})
            return self.reply(h, 200, {"rewards": self.rewards(body)})
        if path == "/malformed":
            return self.reply(h, 200, raw=b"[1.0, 0.0,,")
        if m := re.fullmatch(r"/slow/([\d.]+)/score", path):
            time.sleep(float(m[1]))
            return self.reply(h, 200, self.rewards(body))
        if m := re.fullmatch(r"/drop/(\d+)/score", path):
            if count <= int(m[1]):
                h.close_connection = True
                return  # nothing written: the client sees the connection closed without an answer
            return self.reply(h, 200, self.rewards(body))
        if path == "/auth/score":
            if h.headers.get("Authorization") != "Bearer s3cret":
                return self.reply(h, 401, {"error": "unauthorised"})
            return self.reply(h, 200, self.rewards(body))
        if path == "/wronglen":
            return self.reply(h, 200, self.rewards(body)[:-1])
        if path == "/v1/chat/completions":
            return self.reply(h, 200, self.judge(body))
        return self.reply(h, 404, {"error": path})

    @staticmethod
    def judge(body: dict) -> dict:
        text = body["messages"][-1]["content"]
        ref = re.search(r"Reference answer:\n(.*?)\n\n", text, re.S)
        ans = re.search(r"Student's answer:\n(.*?)\n\n", text, re.S)
        ok = bool(ref and ans and ref[1] and ref[1] in ans[1])
        mode = body["model"]
        if mode == "garbage" and ans and "?" in ans[1]:
            content = "I cannot decide"
        elif mode == "score":
            content = "Score: 9/10" if ok else "2"
        else:
            content = "Yes." if ok else "No, the final answer differs."
        return {"id": "x", "object": "chat.completion", "model": mode,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
