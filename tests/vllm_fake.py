"""A stand-in for vLLM's OpenAI server, for tests of `bench --engine vllm` without vLLM.

Run as the "vLLM Python" (a wrapper script execs ``python vllm_fake.py "$@"``):
- ``-c CODE`` (specheads' probe) prints what the probe prints: version, device, and the suffix
  method's import error unless FAKE_VLLM_SUFFIX=1;
- ``-m MODULE --port P [--speculative-config JSON] ...`` serves on 127.0.0.1:P ``/health``,
  ``/v1/completions`` (prompt token ids -> ``fake_tokens``, ``delay`` seconds per request) and
  ``/metrics`` (vLLM 0.32's spec-decode counters, counted by ``fake_counts`` per request).
  Test-only flags: ``--crash-at-start`` exits 1 at once; ``--fail-after N`` answers HTTP 500 from
  the (N+1)-th completion on; ``--delay S``.
In-process, ``FakeServer(...)`` serves the same on a thread and records the most requests in flight.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "0.32.0+fake"


def fake_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    """The deterministic 'greedy output' of a prompt."""
    return [(sum(prompt) + 7 * j) % 40 + 3 for j in range(max_tokens)]


def fake_counts(max_tokens: int, k: int) -> tuple[int, list[int]]:
    """(drafts, accepted per position) of one request: a draft per two tokens, position 1 always
    accepted, position 2 every other draft, later positions never."""
    drafts = math.ceil(max_tokens / 2)
    return drafts, [drafts if i == 0 else drafts // 2 if i == 1 else 0 for i in range(k)]


class FakeServer:
    def __init__(self, port: int = 0, *, speculative_config: dict | None = None, delay: float = 0.0, fail_after: int | None = None):
        self.spec = speculative_config
        self.k = (speculative_config or {}).get("num_speculative_tokens") or (24 if speculative_config else 0)
        self.delay, self.fail_after = delay, fail_after
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = self.completions = 0
        self.drafts, self.accepted = 0, [0] * self.k
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]

    def metrics(self) -> str:
        labels = 'engine="0",model_name="verifier"'
        lines = ["# HELP python_gc_objects_collected_total Objects collected during gc",
                 "# TYPE python_gc_objects_collected_total counter", 'python_gc_objects_collected_total{generation="0"} 14662.0']
        if self.spec:
            with self.lock:
                drafts, accepted = self.drafts, list(self.accepted)
            lines += [f"vllm:spec_decode_num_drafts_total{{{labels}}} {float(drafts)}",
                      f"vllm:spec_decode_num_drafts_created{{{labels}}} 1.7965382581261866e+09",
                      f"vllm:spec_decode_num_draft_tokens_total{{{labels}}} {float(drafts * self.k)}",
                      f"vllm:spec_decode_num_accepted_tokens_total{{{labels}}} {float(sum(accepted))}"]
            lines += [f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{labels},position="{i}"}} {float(a)}'
                      for i, a in enumerate(accepted)]
        return "\n".join(lines) + "\n"

    def complete(self, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.completions += 1
            n = self.completions
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            if self.fail_after is not None and n > self.fail_after:
                return 500, {"error": {"message": "fake engine failure", "code": 500}}
            tokens = fake_tokens(body["prompt"], body["max_tokens"])
            if self.spec:
                drafts, accepted = fake_counts(body["max_tokens"], self.k)
                with self.lock:
                    self.drafts += drafts
                    self.accepted = [a + b for a, b in zip(self.accepted, accepted)]
            choice = {"index": 0, "text": "", "finish_reason": "length"}
            if body.get("return_token_ids"):
                choice["token_ids"] = tokens
            return 200, {"choices": [choice], "usage": {"completion_tokens": len(tokens)}}
        finally:
            with self.lock:
                self.in_flight -= 1

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, text: str, kind: str = "application/json"):
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, "")
                elif self.path == "/metrics":
                    self._send(200, server.metrics(), "text/plain")
                else:
                    self._send(404, "{}")

            def do_POST(self):
                if self.path != "/v1/completions":
                    return self._send(404, "{}")
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, reply = server.complete(body)
                self._send(status, json.dumps(reply))

        return Handler

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["-c"]:
        suffix = None if os.environ.get("FAKE_VLLM_SUFFIX") == "1" else "ModuleNotFoundError: No module named 'arctic_inference'"
        print(json.dumps({"version": VERSION, "device": "cpu", "suffix_error": suffix}))
        return 0
    p = argparse.ArgumentParser()
    p.add_argument("-m")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--speculative-config", default=None)
    p.add_argument("--crash-at-start", action="store_true")
    p.add_argument("--fail-after", type=int, default=None)
    p.add_argument("--delay", type=float, default=0.0)
    args, _ = p.parse_known_args(argv)
    print(f"fake vLLM pid {os.getpid()} argv {json.dumps(argv)}", flush=True)
    if args.crash_at_start:
        print("fake crash: the engine failed to start", flush=True)
        return 1
    spec = json.loads(args.speculative_config) if args.speculative_config else None
    server = FakeServer(args.port, speculative_config=spec, delay=args.delay, fail_after=args.fail_after)
    server.httpd.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
