"""Who writes the verifier's answers for self-distillation: an answer engine.

``generate_self_distillation`` (``training.data``) applies the chat template, sorts, shards and
stores; an engine only turns prompt token ids into answer token ids. Three engines, chosen by
``data.self_distill.engine``:

* ``hf`` (default): ``model.generate`` in this process, in left-padded batches (``training.data``);
  the only engine that can store EAGLE-3 features from the generation pass itself.
* ``openai``: OpenAI-compatible servers (``vllm serve``, SGLang) through ``/v1/completions``, the
  prompt sent as token ids (the chat template applied here, as for ``hf``, so multi-turn records
  have the same form), ``concurrency`` requests in flight over all endpoints, each sent to the
  endpoint with the fewest in flight. The answer ids are the ones the server generated
  (``return_token_ids``, a vLLM and SGLang extension); a server that returns only text has its
  text re-tokenised here, and how often that round trip is exact is counted (``token_ids`` in
  the run's stats). Each endpoint's ``/v1/models`` must name the verifier (its name, its local
  folder, or ``served_model``) before any answer is asked for.
* ``vllm``: ``vllm.LLM`` in this process, ids taken from its outputs.

Every engine answers with the same sampling: greedy at temperature 0, else temperature then
top-p with nothing else (no top-k, repetition penalty or server-side generation defaults), at
most ``max_new_tokens`` tokens, stopping at the verifier's eos ids. An answer is returned as the
``hf`` path stores it: its ids up to and including the first eos, when one was produced. Sampled
requests carry a seed fixed by the run's seed, the prompt and the turn, so a rerun or a resumed
run draws the same answers from the same engine.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

from ..errors import SpecHeadsError

logger = logging.getLogger(__name__)

ENGINES = ("hf", "openai", "vllm")
# HTTP answers worth another try: the server is busy, restarting or timed out (others are the request's fault)
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 60.0


class Request(NamedTuple):
    """One answer to write: the prompt's id, which user turn of it is answered, its token ids, and
    whether this turn is the conversation's last (the ``hf`` engine stores features of those)."""

    pid: str
    turn: int
    ids: list[int]
    final: bool = True


@dataclass
class Sampling:
    """What defines the answers; the same for every engine."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    eos_ids: list[int]

    def request_seed(self, request: Request) -> int | None:
        """Seed of one sampled answer: depends on the run's seed, the prompt and the turn only."""
        import hashlib

        if self.temperature <= 0:
            return None
        digest = hashlib.sha1(f"{self.seed}\x00{request.pid}\x00{request.turn}".encode()).hexdigest()
        return int(digest[:15], 16)


@dataclass
class EngineOptions:
    """The ``data.self_distill`` keys of the ``openai`` and ``vllm`` engines."""

    endpoints: list[str] = field(default_factory=list)
    concurrency: int = 32
    request_timeout: float = 600.0
    max_retries: int = 5
    retry_backoff: float = 1.0  # seconds before the first retry; doubled each time (at most MAX_BACKOFF_S)
    api_key_env: str | None = None
    served_model: str | None = None
    vllm_args: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- checks


def endpoint_url(value: Any, where: str = "data.self_distill.endpoints") -> str:
    """``value`` as the base URL of an OpenAI-compatible API (``http(s)://host[:port]/v1``); a URL
    with no path gets ``/v1``. Anything else is refused, naming ``where`` and the value."""
    bad = SpecHeadsError(f"recipe value {where}={value!r} is not an http(s) URL of an OpenAI-compatible server, "
                         f"such as http://127.0.0.1:8000/v1")
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value.strip()):
        raise bad
    parts = urllib.parse.urlsplit(value.strip())
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or parts.query or parts.fragment:
        raise bad
    path = parts.path.rstrip("/") or "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def check_options(engine: Any, options: EngineOptions, key: str = "data.self_distill") -> list[str]:
    """Refuse an unknown engine, or options it cannot use, naming key and value; returns the
    endpoints as base URLs (``endpoint_url``)."""
    if engine not in ENGINES:
        raise SpecHeadsError(f"recipe value {key}.engine={engine!r} is not an answer engine (choose {', '.join(ENGINES)})")
    endpoints = options.endpoints
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if endpoints is not None and not isinstance(endpoints, list):
        raise SpecHeadsError(f"recipe value {key}.endpoints={endpoints!r} is not a list of URLs")
    endpoints = list(endpoints or [])
    if engine == "openai" and not endpoints:
        raise SpecHeadsError(f"recipe value {key}.endpoints={options.endpoints!r}: engine openai needs at least one "
                             f"endpoint URL, such as [http://127.0.0.1:8000/v1]")
    urls = [endpoint_url(e, f"{key}.endpoints[{i}]") for i, e in enumerate(endpoints)]
    if len(set(urls)) != len(urls):
        raise SpecHeadsError(f"recipe value {key}.endpoints={endpoints!r} names an endpoint twice")

    def whole(name, value, low):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SpecHeadsError(f"recipe value {key}.{name}={value!r} must be an integer >= {low}")

    def positive(name, value, low_ok=False):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not low_ok):
            raise SpecHeadsError(f"recipe value {key}.{name}={value!r} must be a number > 0")

    whole("concurrency", options.concurrency, 1)
    whole("max_retries", options.max_retries, 0)
    positive("request_timeout", options.request_timeout)
    positive("retry_backoff", options.retry_backoff, low_ok=True)
    for name in ("api_key_env", "served_model"):
        value = getattr(options, name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise SpecHeadsError(f"recipe value {key}.{name}={value!r} must be a non-empty string")
    if options.vllm_args is not None and not isinstance(options.vllm_args, dict):
        raise SpecHeadsError(f"recipe value {key}.vllm_args={options.vllm_args!r} must be a mapping of vllm.LLM arguments")
    # Settings another engine would read are refused rather than silently ignored.
    owned = {"endpoints": ("openai", bool(endpoints)), "api_key_env": ("openai", options.api_key_env is not None),
             "served_model": ("openai", options.served_model is not None), "vllm_args": ("vllm", bool(options.vllm_args))}
    for name, (owner, is_set) in owned.items():
        if is_set and engine != owner:
            raise SpecHeadsError(f"recipe value {key}.{name}={getattr(options, name)!r} is for engine {owner}, not {engine}")
    return urls


# ----------------------------------------------------------------------------- engines


class _Counts:
    """Where the answer ids came from, and how often text -> ids round-trips exactly (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.from_engine = self.from_text = self.round_trip_same = 0

    def add(self, from_engine: bool, same: bool) -> None:
        with self.lock:
            if from_engine:
                self.from_engine += 1
            else:
                self.from_text += 1
            self.round_trip_same += bool(same)

    def stats(self) -> dict:
        checked = self.from_engine + self.from_text
        return {"from_engine": self.from_engine, "from_text": self.from_text,
                "round_trip_same": self.round_trip_same, "round_trip_checked": checked}


def _answer_body(ids: list[int], eos: set[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos else ids


def _cut(ids: list[int], sampling: Sampling) -> list[int]:
    """After the first eos, at most max_new_tokens: the form the hf path stores."""
    ids = [int(t) for t in ids][: sampling.max_new_tokens]
    stop = next((i for i, t in enumerate(ids) if t in set(sampling.eos_ids)), None)
    return ids if stop is None else ids[: stop + 1]


def _ids_round_trip(tokenizer, ids: list[int], eos: set[int]) -> bool:
    """Would a text-only engine have given these ids back? encode(decode(answer)) == answer, eos aside."""
    body = _answer_body(ids, eos)
    text = tokenizer.decode(body, skip_special_tokens=True)
    return list(tokenizer.encode(text, add_special_tokens=False)) == body


class EngineBase:
    """What every engine has: a name, ``answer``, stats for the manifest and ``close``."""

    name = "?"
    max_context: int | None = None  # the engine's own context limit, when below the verifier's

    def answer(self, requests: Sequence[Request], done: Callable[[int], None]) -> list[list[int]]:
        raise NotImplementedError

    def stats(self) -> dict:
        return {"engine": self.name}

    def summary(self) -> str:
        return ""

    def close(self) -> None:
        pass


def _ids_summary(counts: dict) -> str:
    n = counts["round_trip_checked"]
    if not n:
        return ""
    share = 100.0 * counts["round_trip_same"] / n
    if counts["from_text"]:
        return (f"; answer ids: {counts['from_engine']} from the engine, {counts['from_text']} re-tokenised from its text "
                f"(round trip exact for {counts['round_trip_same']}/{n} = {share:.1f}%)")
    return (f"; answer ids from the engine ({n}); a text-only engine would have kept "
            f"{counts['round_trip_same']}/{n} = {share:.1f}% of them (encode(decode(ids)) == ids)")


class HFEngine(EngineBase):
    """``model.generate`` here, in left-padded batches of ``batch_size``, longest prompts first (so
    batches pad little and the largest runs first); see ``training.data``."""

    name = "hf"

    def __init__(self, gen):
        self.gen = gen

    def answer(self, requests, done):
        order = sorted(range(len(requests)), key=lambda j: -len(requests[j].ids))
        out: list[list[int] | None] = [None] * len(requests)
        for b in range(0, len(order), self.gen.batch_size):
            rows = order[b: b + self.gen.batch_size]
            for j, ans in zip(rows, self.gen.answer_batch([requests[j] for j in rows])):
                out[j] = ans
                done(j)
        return out


class _Failure(Exception):
    """One request failed; ``retry``: worth another try."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


class OpenAIEngine(EngineBase):
    """OpenAI-compatible ``/v1/completions`` endpoints, ``concurrency`` requests in flight."""

    name = "openai"

    def __init__(self, verifier, sampling: Sampling, options: EngineOptions, *, say: Callable[[str], None] | None = None):
        self.tokenizer = verifier.tokenizer
        self.sampling = sampling
        self.options = options
        self.endpoints = check_options("openai", options)
        self.api_key = None
        if options.api_key_env:
            self.api_key = os.environ.get(options.api_key_env)
            if not self.api_key:
                raise SpecHeadsError(f"data.self_distill.api_key_env names the environment variable {options.api_key_env}, "
                                     f"which is not set: export it with the endpoints' API key")
        self.counts = _Counts()
        self.retries = 0
        self.in_flight = {e: 0 for e in self.endpoints}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.model, limits = self._check_models(verifier)
        self.max_context = min(limits) if limits else None
        say = say or (lambda m: None)
        say(f"answer engine openai: model '{self.model}' on {', '.join(self.endpoints)}, {options.concurrency} requests in flight")

    # -- HTTP
    def _call(self, endpoint: str, path: str, body: dict | None) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(endpoint + path, data=data, headers=headers, method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=self.options.request_timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300].strip() if exc.fp is not None else ""
            raise _Failure(f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else ""), exc.code in RETRY_STATUS) from None
        except urllib.error.URLError as exc:
            raise _Failure(f"cannot connect ({exc.reason})", True) from None
        except (TimeoutError, OSError) as exc:  # a read timeout, a reset connection
            what = f"no answer within request_timeout={self.options.request_timeout} s" if isinstance(exc, TimeoutError) else repr(exc)
            raise _Failure(what, True) from None
        except Exception as exc:  # http.client.IncompleteRead and friends
            raise _Failure(repr(exc), True) from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Failure(f"the answer is not JSON: {raw[:200]!r}", True) from None

    def _with_retries(self, endpoint: str, path: str, body: dict | None) -> dict:
        for attempt in range(self.options.max_retries + 1):
            try:
                return self._call(endpoint, path, body)
            except _Failure as failure:
                if not failure.retry or attempt == self.options.max_retries or self.stop.is_set():
                    tries = f" after {attempt + 1} tries" if attempt else ""
                    raise SpecHeadsError(
                        f"endpoint {endpoint}: {path.lstrip('/')} failed{tries}: {failure}. Shards already written are "
                        f"kept; a rerun resumes after them (check the server, or data.self_distill.request_timeout, "
                        f"max_retries)") from None
                with self.lock:
                    self.retries += 1
                delay = min(MAX_BACKOFF_S, self.options.retry_backoff * 2 ** attempt)
                logger.warning("endpoint %s: %s failed (%s); retry %d of %d in %.1f s", endpoint, path, failure,
                               attempt + 1, self.options.max_retries, delay)
                if self.stop.wait(delay):  # another request failed for good: give up now
                    raise SpecHeadsError(f"endpoint {endpoint}: stopped retrying {path} after another request failed") from None
        raise AssertionError("unreachable")

    # -- the model check
    def _check_models(self, verifier) -> tuple[str, list[int]]:
        """The model name to ask for, and each endpoint's max_model_len; an endpoint that does not
        serve the verifier is refused before any completion is asked for."""
        names = {str(verifier.name)}
        local = _local_dir(verifier)
        if local:
            names.add(local)
        wanted = self.options.served_model
        chosen, limits = None, []
        for endpoint in self.endpoints:
            cards = self._with_retries(endpoint, "/models", None).get("data")
            if not isinstance(cards, list) or not cards:
                raise SpecHeadsError(f"endpoint {endpoint}: /models lists no model ({cards!r})")
            served = [(str(c.get("id")), c.get("root")) for c in cards if isinstance(c, dict)]
            if wanted is not None:
                match = next((c for c in cards if isinstance(c, dict) and c.get("id") == wanted), None)
            else:
                match = next((c for c in cards if isinstance(c, dict)
                              and ({_norm(c.get("id")), _norm(c.get("root"))} & {_norm(n) for n in names})), None)
            if match is None:
                listed = ", ".join(f"'{i}'" + (f" (from {r})" if r and r != i else "") for i, r in served)
                raise SpecHeadsError(
                    f"endpoint {endpoint} serves {listed}, not the recipe's verifier '{verifier.name}'"
                    + (f" (local folder {local})" if local and local != verifier.name else "")
                    + (f" under the name data.self_distill.served_model='{wanted}'" if wanted else "")
                    + ": serve the verifier there, or set data.self_distill.served_model to the name it is served under "
                      "when the served weights are the verifier's")
            if chosen is not None and match["id"] != chosen:
                raise SpecHeadsError(f"endpoints serve the verifier under different names ('{chosen}', '{match['id']}'): "
                                     f"set data.self_distill.served_model")
            chosen = match["id"]
            if isinstance(match.get("max_model_len"), int):
                limits.append(int(match["max_model_len"]))
        return chosen, limits

    # -- answers
    def _body(self, request: Request) -> dict:
        s = self.sampling
        greedy = s.temperature <= 0
        body = {
            "model": self.model, "prompt": list(request.ids), "max_tokens": s.max_new_tokens, "n": 1, "stream": False,
            "temperature": 0.0 if greedy else float(s.temperature), "top_p": 1.0 if greedy else float(s.top_p),
            # set, so that neither the server's defaults nor the model's generation_config apply
            "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "min_tokens": 0, "ignore_eos": False, "stop_token_ids": list(s.eos_ids), "skip_special_tokens": True,
            "return_token_ids": True,
        }
        seed = s.request_seed(request)
        if seed is not None:
            body["seed"] = seed
        return body

    def _pick(self) -> str:
        with self.lock:
            endpoint = min(self.endpoints, key=lambda e: self.in_flight[e])
            self.in_flight[endpoint] += 1
            return endpoint

    def _answer_one(self, request: Request) -> list[int]:
        if self.stop.is_set():
            raise SpecHeadsError("stopped: another request failed")
        endpoint = self._pick()
        try:
            response = self._with_retries(endpoint, "/completions", self._body(request))
        finally:
            with self.lock:
                self.in_flight[endpoint] -= 1
        return self._read(endpoint, response)

    def _read(self, endpoint: str, response: dict) -> list[int]:
        try:
            choice = response["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise SpecHeadsError(f"endpoint {endpoint}: a completion without choices: {str(response)[:300]}") from None
        eos = set(self.sampling.eos_ids)
        ids = choice.get("token_ids")
        if ids is None:
            ids = _ids_from_logprobs(choice.get("logprobs"))
        if ids is not None:
            ids = _cut(ids, self.sampling)
            self.counts.add(True, _ids_round_trip(self.tokenizer, ids, eos))
            return ids
        # Text only: re-tokenised here; exact only if the text round-trips.
        text = choice.get("text")
        if not isinstance(text, str):
            raise SpecHeadsError(f"endpoint {endpoint}: a completion with neither token ids nor text: {str(choice)[:300]}")
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if choice.get("finish_reason") == "stop":
            ids.append(self._stop_id(choice))
        ids = _cut(ids, self.sampling)
        count = (response.get("usage") or {}).get("completion_tokens")
        same = (self.tokenizer.decode(_answer_body(ids, eos), skip_special_tokens=True) == text
                and (not isinstance(count, int) or count == len(ids)))
        self.counts.add(False, same)
        return ids

    def _stop_id(self, choice: dict) -> int:
        """The eos that ended a text-only answer: vLLM's stop_reason, SGLang's matched_stop, else the tokenizer's eos."""
        for key in ("stop_reason", "matched_stop"):
            if choice.get(key) in self.sampling.eos_ids:
                return int(choice[key])
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        return int(tok_eos) if tok_eos in self.sampling.eos_ids else int(self.sampling.eos_ids[0])

    def answer(self, requests, done):
        if not requests:
            return []
        self.stop.clear()
        out: list[list[int] | None] = [None] * len(requests)
        pool = ThreadPoolExecutor(max_workers=min(self.options.concurrency, len(requests)), thread_name_prefix="specheads-openai")
        futures = {pool.submit(self._answer_one, r): j for j, r in enumerate(requests)}
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in finished:
                    if future.exception() is None:
                        j = futures[future]
                        out[j] = future.result()
                        done(j)
                failed = [f for f in finished if f.exception() is not None]
                if failed:
                    raise failed[0].exception()
        except BaseException as exc:
            # Requests not started are dropped and retries end; those in flight end by their answer
            # or timeout (waited for, unless the user interrupts: then they end in the background).
            self.stop.set()
            pool.shutdown(wait=not isinstance(exc, KeyboardInterrupt), cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return out

    def stats(self) -> dict:
        return {"engine": self.name, "endpoints": self.endpoints, "served_model": self.model,
                "concurrency": self.options.concurrency, "retries": self.retries, "token_ids": self.counts.stats()}

    def summary(self) -> str:
        return (f" ({self.retries} retried requests)" if self.retries else "") + _ids_summary(self.counts.stats())


def _ids_from_logprobs(logprobs) -> list[int] | None:
    """vLLM's ``return_tokens_as_token_ids`` form: every logprobs token written "token_id:N"."""
    tokens = (logprobs or {}).get("tokens") if isinstance(logprobs, dict) else None
    if not tokens or not all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
        return None
    try:
        return [int(t.split(":", 1)[1]) for t in tokens]
    except ValueError:
        return None


def _norm(name) -> str | None:
    """A served model name or path as comparable text (paths resolved where they exist here)."""
    if not isinstance(name, str) or not name:
        return None
    path = os.path.expanduser(name)
    return os.path.realpath(path) if os.path.exists(path) else name.rstrip("/")


def _local_dir(verifier) -> str | None:
    """The folder the verifier was loaded from, where it has one (what ``vllm serve DIR`` reports as root)."""
    for name in (getattr(verifier.model.config, "_name_or_path", None), str(verifier.name)):
        if name and os.path.isdir(os.path.expanduser(str(name))):
            return os.path.realpath(os.path.expanduser(str(name)))
    return None


class VLLMEngine(EngineBase):
    """``vllm.LLM`` in this process: all of a round's prompts in one ``generate`` call (vLLM
    schedules them itself), per-request seeds, ids from its outputs."""

    name = "vllm"

    def __init__(self, verifier, sampling: Sampling, options: EngineOptions, *, say: Callable[[str], None] | None = None):
        try:
            import vllm
        except ImportError as exc:
            raise SpecHeadsError(
                f"data.self_distill.engine=vllm needs vLLM in this Python environment, and `import vllm` fails ({exc}). "
                f"Serve the verifier from an environment that has it instead (e.g. `.venv-vllm/bin/vllm serve MODEL` "
                f"or `python -m vllm.entrypoints.openai.api_server --model MODEL`) and use engine: openai with "
                f"endpoints: [http://HOST:PORT/v1]") from exc
        self.vllm = vllm
        self.sampling = sampling
        self.tokenizer = verifier.tokenizer
        self.counts = _Counts()
        model = _local_dir(verifier) or str(verifier.name)
        dtype = str(verifier.dtype).replace("torch.", "")
        args = {"model": model, "dtype": dtype, "seed": 0, **(options.vllm_args or {})}
        (say or (lambda m: None))(f"answer engine vllm: vllm.LLM({', '.join(f'{k}={v!r}' for k, v in args.items())})")
        self.llm = vllm.LLM(**args)
        self.max_context = getattr(getattr(self.llm.llm_engine, "model_config", None), "max_model_len", None)

    def answer(self, requests, done):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = self.sampling
        greedy = s.temperature <= 0
        params = [SamplingParams(
            n=1, max_tokens=s.max_new_tokens, temperature=0.0 if greedy else float(s.temperature),
            top_p=1.0 if greedy else float(s.top_p), top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
            frequency_penalty=0.0, seed=s.request_seed(r), stop_token_ids=list(s.eos_ids), detokenize=False,
        ) for r in requests]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(r.ids)) for r in requests], params, use_tqdm=False)
        eos = set(s.eos_ids)
        answers = []
        for j, output in enumerate(outputs):
            ids = _cut(output.outputs[0].token_ids, s)
            self.counts.add(True, _ids_round_trip(self.tokenizer, ids, eos))
            answers.append(ids)
            done(j)
        return answers

    def stats(self) -> dict:
        return {"engine": self.name, "vllm_version": getattr(self.vllm, "__version__", None), "token_ids": self.counts.stats()}

    def summary(self) -> str:
        return _ids_summary(self.counts.stats())

    def close(self) -> None:
        self.llm = None  # the engine's processes end with it


def build_engine(engine: str, gen, options: EngineOptions | None, say=None) -> EngineBase:
    """The engine named ``engine`` for the run ``gen`` (a ``training.data._Generation``)."""
    options = options or EngineOptions()
    check_options(engine, options, key="data.self_distill")
    if engine == "hf":
        return HFEngine(gen)
    sampling = Sampling(gen.max_new_tokens, float(gen.temperature), float(gen.top_p), gen.seed, list(gen.verifier.eos_token_ids))
    if not sampling.eos_ids:
        raise SpecHeadsError(f"verifier '{gen.verifier.name}' has no eos token id: engine {engine} would never stop an answer early")
    if engine == "openai":
        return OpenAIEngine(gen.verifier, sampling, options, say=say)
    return VLLMEngine(gen.verifier, sampling, options, say=say)
