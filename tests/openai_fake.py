"""A small OpenAI-compatible server on 127.0.0.1 for tests (stdlib ``http.server`` in a thread).

It answers ``GET /v1/models`` and ``POST /v1/completions`` (prompt as token ids) the way vLLM does,
from a tiny HF model's ``generate``: greedy at temperature 0, else sampled under the request's
seed; stopping at ``stop_token_ids``; the answer's ``token_ids`` when asked (``return_token_ids``)
unless ``return_ids=False`` (a text-only server). Faults for tests: ``fail_after`` (every
completion after the first N answers HTTP ``fail_status``), ``flaky_every`` (every k-th request
answers 503 once), ``delay`` (seconds before each answer). It stops by itself after ``lifetime``
seconds, so a failed test never leaves it running.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

# One generate at a time across every fake server: sampling seeds torch's global generator, which
# a straggling request of another server (one its client gave up on) must not draw from meanwhile.
_GENERATE = threading.Lock()


class FakeOpenAIServer:
    def __init__(self, verifier, *, model_id: str = "tiny", root: str | None = None, max_model_len: int | None = None,
                 return_ids: bool = True, fail_after: int | None = None, fail_status: int = 500,
                 flaky_every: int | None = None, delay: float = 0.0, lifetime: float = 120.0):
        self.verifier = verifier
        self.model_id, self.root, self.max_model_len = model_id, root, max_model_len
        self.return_ids, self.fail_after, self.fail_status = return_ids, fail_after, fail_status
        self.flaky_every, self.delay, self.lifetime = flaky_every, delay, lifetime
        self.count_lock = threading.Lock()
        self.posts = 0  # completion requests received
        self.answered = 0  # completions answered with 200
        self.in_flight = 0
        self.max_in_flight = 0
        self.seeds: list = []
        self.authorization = None  # the last request's Authorization header
        self.answers: list[tuple[list[int], str]] = []  # (ids, text) of every answer given
        self.httpd = None
        self.stopping = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                card = {"id": server.model_id, "object": "model", "root": server.root or server.model_id}
                if server.max_model_len is not None:
                    card["max_model_len"] = server.max_model_len
                self._send(200, {"object": "list", "data": [card]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.authorization = self.headers.get("Authorization")
                if self.path.rstrip("/") != "/v1/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                with server.count_lock:
                    server.posts += 1
                    n = server.posts
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server.delay:
                        time.sleep(server.delay)
                    if server.stopping:  # its client gave up and the test moved on
                        return self._send(503, {"error": {"message": "stopping"}})
                    if server.fail_after is not None and server.answered >= server.fail_after:
                        return self._send(server.fail_status, {"error": {"message": "engine died"}})
                    if server.flaky_every and n % server.flaky_every == 0:
                        return self._send(503, {"error": {"message": "busy"}})
                    status, payload = server.complete(body)
                    if status == 200:
                        with server.count_lock:
                            server.answered += 1
                    self._send(status, payload)
                finally:
                    with server.count_lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # Closing joins the handler threads: none may still be inside torch when the tests' process exits.
        self.httpd.daemon_threads = False
        self.httpd.block_on_close = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.timer = threading.Timer(self.lifetime, self.stop)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        self.stopping = True
        if self.httpd is not None:
            self.timer.cancel()
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def complete(self, body: dict) -> tuple[int, dict]:
        if body.get("model") != self.model_id:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}}
        prompt = body["prompt"]
        max_tokens = int(body.get("max_tokens", 16))
        if self.max_model_len is not None and len(prompt) + max_tokens > self.max_model_len:
            return 400, {"error": {"message": f"prompt + max_tokens > max_model_len {self.max_model_len}"}}
        stops = list(body.get("stop_token_ids") or [])
        tok = self.verifier.tokenizer
        eos = tok.eos_token_id
        temperature = float(body.get("temperature", 1.0))
        sample = temperature > 0
        self.seeds.append(body.get("seed"))
        x = torch.tensor([prompt])
        extra = dict(temperature=temperature, top_p=float(body.get("top_p", 1.0)), top_k=0) if sample else {}
        with _GENERATE, torch.random.fork_rng(), torch.inference_mode():
            if sample:
                torch.manual_seed(int(body["seed"]))
            out = self.verifier.model.generate(
                x, attention_mask=torch.ones_like(x), do_sample=sample, max_new_tokens=max_tokens, min_new_tokens=0,
                eos_token_id=sorted(set(stops + [eos])), pad_token_id=eos, repetition_penalty=1.0, num_beams=1, **extra)
        new = out[0, len(prompt):].tolist()
        stop = next((i for i, t in enumerate(new) if t in stops or t == eos), None)
        new = new if stop is None else new[: stop + 1]
        stopped = stop is not None
        choice = {
            "index": 0, "text": tok.decode(new, skip_special_tokens=True),
            "finish_reason": "stop" if stopped else "length",
            "stop_reason": new[-1] if stopped and new[-1] != eos else None,
        }
        self.answers.append((new, choice["text"]))
        if self.return_ids and body.get("return_token_ids"):
            choice["token_ids"] = new
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(new), "total_tokens": len(prompt) + len(new)}
        return 200, {"id": "cmpl-fake", "object": "text_completion", "model": self.model_id, "choices": [choice], "usage": usage}


def closed_port_url() -> str:
    """The URL of a local port nothing listens on (connections are refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
