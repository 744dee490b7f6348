"""Measurements that depend on the machine (the CPU-linears choice, the verifier's cost per token
count): how they are timed, and where they are kept.

A shared machine makes timings lie. Another process waking up slows a few forwards; a busy
machine slows all of them, and one measurement taken then would size every later run. So
``time_rounds`` times its cases in interleaved rounds until every median settles, and
``measured_once`` keeps a result (a small JSON file per kind under the specheads cache, keyed by
what it depends on) only when it was taken on a quiet machine:

- other processes kept at most ``max(OTHERS_BUSY_CORES, cores - threads)`` cores busy over the
  second before measuring (``other_processes_load``, from /proc/stat less this process's own CPU
  time: the 1-minute load average it replaces still carried a run's own training for a minute
  after it ended, so the demo never stored its costs); where /proc/stat is missing, the 1-minute
  load average was at most the core count;
- while measuring, the process got at least ``MIN_CPU_SHARE`` of the CPU time its threads could
  use (on a 2-core VM with one other busy process, 2-thread SmolLM2 forwards got about half, and a
  1-token forward took 8x its quiet time: the load average, which lags, had said 1.4);
- the medians settled (each moved less than the tolerance in the last rounds) before the cap.

Otherwise the run uses the result for itself only and says why on stderr, naming the load and the
spread. A measurement that load cannot change (``decoding.tie_bound``: how far logits move between
forwards of different sizes) gives no reason to refuse it and is kept always. A stored entry that fails its kind's check (unreadable JSON, a hand edit, an older format)
is measured again, with a message saying so.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable

from .atomic_files import write_json_atomic

MIN_CPU_SHARE = 0.6


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def machine_busy_seconds() -> float:
    """CPU seconds all processes have spent busy (user, nice, system, irq, softirq, steal), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def other_processes_load(window: float = 1.0, *, busy_seconds: Callable[[], float] = machine_busy_seconds,
                         own_cpu: Callable[[], float] | None = None, sleep: Callable[[float], None] = time.sleep,
                         clock: Callable[[], float] = time.monotonic) -> float | None:
    """Cores that processes other than this one kept busy over ``window`` seconds, or None where
    the OS has no /proc/stat: the machine's busy time less this process's own CPU time over the same
    window. Unlike the load average it does not lag, and it does not count this process (whose own
    earlier work, such as the demo's training, is over)."""
    own_cpu = own_cpu or cpu_time
    try:
        busy0, own0, t0 = busy_seconds(), own_cpu(), clock()
        sleep(window)
        busy1, own1, t1 = busy_seconds(), own_cpu(), clock()
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9)


OTHERS_BUSY_CORES = 0.5  # other processes' use that already slows a forward on all cores (see above)


def busy_before_measuring(cores: int, threads: int, load: Callable[[], float | None] | None = None) -> tuple[float | None, str | None]:
    """(the load read, why the machine counts as busy or None). ``load`` given: a 1-minute load
    average source (tests inject one), busy above the core count. Otherwise other processes' CPU
    use over the last second, busy above ``max(OTHERS_BUSY_CORES, cores - threads)``, falling back
    to the load average where the OS cannot tell."""
    if load is None:
        others = other_processes_load()
        if others is not None:
            limit = max(OTHERS_BUSY_CORES, cores - threads)
            return others, (f"other processes kept {others:.2f} of {cores} cores busy in the second before measuring"
                            if others > limit else None)
        load = load_average
    value = load()
    return value, (f"the 1-minute load average was {value:.2f} on {cores} cores" if value is not None and value > cores else None)


def cpu_time() -> float:
    """CPU seconds this process has used, all its threads together."""
    return time.process_time()


def say(message: str) -> None:
    print(f"[specheads] {message}", file=sys.stderr, flush=True)


@dataclass
class Measurement:
    """Timings of several cases (``samples``: seconds per run, per case key) and whether they may be kept."""

    samples: dict[Hashable, list[float]]
    rounds: int
    seconds: float  # clock time the rounds took
    drift: float  # the largest relative move of a median over the last round
    stable: bool
    load: float | None  # before measuring: other processes' busy cores, or the 1-minute load average (busy_before_measuring)
    cores: int
    cpu_share: float | None  # CPU time the process got / (wall time x the threads it could run); None: not checked
    busy: str | None  # why the machine counted as busy, or None
    label: Callable[[Hashable], str] = field(default=str, repr=False)

    @property
    def medians(self) -> dict[Hashable, float]:
        return {k: statistics.median(v) for k, v in self.samples.items()}

    @property
    def ms(self) -> dict[Hashable, float]:
        return {k: m * 1e3 for k, m in self.medians.items()}

    @property
    def spread(self) -> dict[Hashable, float]:
        """Per case, the interquartile range of its runs over their median."""
        out = {}
        for k, v in self.samples.items():
            q1, _, q3 = statistics.quantiles(v, n=4) if len(v) > 1 else (v[0], v[0], v[0])
            median = statistics.median(v)
            out[k] = (q3 - q1) / median if median > 0 else 0.0
        return out

    @property
    def refusal(self) -> str | None:
        """Why this measurement must not be kept (naming the load and the spread), or None."""
        why = [self.busy] if self.busy else []
        if not self.stable:
            why.append(f"the medians still moved {self.drift:.0%} in the last round after {self.rounds} rounds in {self.seconds:.0f} s")
        if not why:
            return None
        spread = self.spread
        worst = max(spread, key=spread.get)
        return "; ".join(why) + f"; spread up to {spread[worst]:.0%} at {self.label(worst)}"

    def record(self) -> dict:
        """How it was measured, for the store."""
        return {"rounds": self.rounds, "seconds": round(self.seconds, 1), "drift": round(self.drift, 4),
                "stable": self.stable, "load": self.load, "cores": self.cores,
                "cpu_share": None if self.cpu_share is None else round(self.cpu_share, 3),
                "max_spread": round(max(self.spread.values()), 4)}


def time_rounds(keys: Iterable[Hashable], run: Callable[[Hashable], Any], *, prepare: Callable[[Hashable], Any] | None = None,
                timer: Callable[[], float] = time.perf_counter, clock: Callable[[], float] = time.monotonic,
                load: Callable[[], float | None] | None = None, cpu_clock: Callable[[], float] | None = None,
                check_cpu: bool = True, threads: int | None = None, cores: int | None = None, tolerance: float = 0.03, patience: int = 3,
                min_rounds: int = 5, max_rounds: int = 50, max_seconds: float = 60.0, quick_if_busy: bool = True,
                seed: int = 0, label: Callable[[Hashable], str] = str) -> Measurement:
    """Time ``run(key)`` (after an untimed ``prepare(key)``) once per key per round, keys in a fresh
    random order each round so that neither a drift in the machine's speed nor a periodic
    disturbance falls on some keys only, after one untimed warm-up round. Rounds go on until every
    median (over all runs so far) moved less than ``tolerance`` for ``patience`` rounds in a row
    (stable), or ``max_rounds`` / ``max_seconds`` of ``clock`` run out (not stable). When the load
    average already says busy, ``min_rounds`` are taken and no more (``quick_if_busy``): the
    result is for this run only anyway.

    ``load`` gives a 1-minute load average (default: other processes' CPU use, see
    ``busy_before_measuring``), ``cpu_clock`` the
    process's CPU seconds (default: ``cpu_time``); against the ``timer``'s wall time they tell
    whether the process got the CPU its ``threads`` (default: torch's) asked for, unless
    ``check_cpu`` is off (a GPU measurement).
    """
    cpu_clock = (cpu_clock or cpu_time) if check_cpu else None
    keys = list(dict.fromkeys(keys))
    if not keys:
        raise ValueError("time_rounds needs at least one case")
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    cores = cores or os.cpu_count() or 1
    load_before, busy = busy_before_measuring(cores, threads, load)
    last_round = min_rounds if busy and quick_if_busy else max_rounds
    order = random.Random(seed)

    def once(key):
        if prepare is not None:
            prepare(key)
        t0 = timer()
        run(key)
        return timer() - t0

    for key in keys:  # warm-up: first calls allocate and pick kernels
        once(key)
    samples: dict[Hashable, list[float]] = {k: [] for k in keys}
    start, wall0, cpu0 = clock(), timer(), cpu_clock() if cpu_clock else None
    rounds, settled, drift, before = 0, 0, math.inf, None
    while True:
        shuffled = keys[:]
        order.shuffle(shuffled)
        for key in shuffled:
            samples[key].append(once(key))
        rounds += 1
        now = {k: statistics.median(v) for k, v in samples.items()}
        if before is not None:
            drift = max(abs(now[k] - before[k]) / before[k] if before[k] > 0 else math.inf for k in keys)
            settled = settled + 1 if drift < tolerance else 0
        before = now
        if rounds >= min_rounds and settled >= patience:
            stable = True
            break
        if rounds >= last_round or clock() - start >= max_seconds:
            stable = False
            break
    seconds = clock() - start
    cpu_share = None
    if cpu_clock is not None:
        wall = timer() - wall0
        cpu_share = (cpu_clock() - cpu0) / (wall * min(threads, cores)) if wall > 0 else None
        if cpu_share is not None and cpu_share < MIN_CPU_SHARE:
            n = min(threads, cores)
            starved = (f"the process got {cpu_share:.0%} of the CPU time its {n} thread{'s' if n > 1 else ''} could use "
                       "while measuring (another process was running")
            load_said = "" if busy or load_before is None else f"; the load before was {load_before:.2f} on {cores} cores"
            busy = f"{busy}; {starved})" if busy else f"{starved}{load_said})"
    return Measurement(samples, rounds, seconds, drift if rounds > 1 else math.inf, stable, load_before, cores,
                       cpu_share, busy, label)


def _read(store: Path) -> tuple[dict, str | None]:
    """(the store's entries, what is wrong with the file or None)."""
    if not store.is_file():
        return {}, None
    try:
        known = json.loads(store.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"is unreadable ({exc})"
    if not isinstance(known, dict):
        return {}, f"holds a JSON {type(known).__name__}, not an object of entries"
    return known, None


def stored_entry(store: str | os.PathLike, key: str, check: Callable[[Any], str | None] | None = None) -> Any | None:
    """The entry stored under ``key`` that passes ``check``, or None; measures nothing."""
    known, _ = _read(Path(store))
    entry = known.get(key)
    return entry if entry is not None and (check is None or check(entry) is None) else None


def measured_once(store: str | os.PathLike, key: str, measure: Callable[[], tuple[Any, str | None]], *,
                  refresh: bool = False, check: Callable[[Any], str | None] | None = None, force: bool = False,
                  what: str = "measurement") -> tuple[Any, bool]:
    """(the value stored under ``key``, True), or (``measure()``'s value, False).

    ``measure`` returns (value, why it must not be kept or None); a value with a reason is kept
    only with ``force``, with a warning. ``check(value)`` says what is wrong with a stored entry
    (None: usable); an unusable entry is measured again, and so is everything under ``refresh``.
    """
    store = Path(store)
    known, problem = _read(store)
    if problem:
        say(f"{store} {problem}: measuring the {what} again")
    if not refresh and key in known:
        why = check(known[key]) if check else None
        if why is None:
            return known[key], True
        say(f"the {what} stored in {store} is unusable ({why}): measuring it again")
    value, refusal = measure()
    if refusal and not force:
        say(f"not storing the {what} in {store}: {refusal}. This run uses it for itself only; "
            "`specheads calibrate` on a quiet machine measures it for later runs")
        return value, False
    if refusal:
        say(f"WARNING: storing the {what} in {store} although {refusal} (--force)")
    known, _ = _read(store)  # another process may have written meanwhile
    known[key] = value
    store.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(store, known)  # readers never see half a file
    return value, False
