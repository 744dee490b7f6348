"""An offline source of training prompts for self-distillation.

Self-distillation asks the verifier to answer many prompts and trains the drafter on its answers,
so the prompts should be diverse and must never be the benchmark's own questions (the MT-Bench
questions are for evaluation only). ``default_training_prompts`` builds a few thousand distinct
user requests with no network access, from two sources:

* task templates x topics written for this project (``specheads/data/training_prompt_parts.jsonl``):
  explanations, comparisons, lists, step-by-step instructions, code in several languages, SQL and
  shell, emails, stories, poems, travel plans, advice, rewriting and translation, sentiment, and
  arithmetic word problems generated here from fixed random numbers;
* Python's own standard library: for public functions and classes of a fixed list of modules,
  requests such as "Explain what `json.dumps` does ..." or "Rewrite this description ... in plain
  English" around the first paragraph of its docstring (``inspect.getdoc``), short pure-Python
  functions to explain or review, and module documentation to summarise.

The pool is the same on every call in one environment; ``seed`` only decides the order (each
prompt is ranked by a hash of the seed and its text, so a prompt added to or missing from the pool
- e.g. a docstring that differs between Python versions - does not reorder the others). Prompts
are deduplicated; ``n`` takes the first ``n`` of that order.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import random
import re
import sys
import textwrap
from collections import defaultdict
from importlib import resources

from ..errors import SpecHeadsError

PARTS_FILE = "training_prompt_parts.jsonl"

# How many of each filler's templates are used (the rest rotate over the fillers, so every
# template is used and no filler dominates).
_PER_CONCEPT = 4
_STDLIB_NAMES_PER_MODULE = 8
_STDLIB_SOURCES_PER_MODULE = 2
_MATH_PER_TEMPLATE = 20


def parts_path() -> str:
    return str(resources.files("specheads") / "data" / PARTS_FILE)


def _load_parts() -> dict[str, list[dict]]:
    parts: dict[str, list[dict]] = defaultdict(list)
    with open(parts_path(), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                parts[record["kind"]].append(record)
    return parts


def _texts(parts, kind) -> list[str]:
    return [r["text"] for r in parts[kind]]


def _rotate(items: list, i: int, k: int, stride: int = 5) -> list:
    """k items of ``items`` for the i-th filler, rotating so that every item gets used."""
    start = (i * stride) % len(items)
    return [items[(start + j) % len(items)] for j in range(min(k, len(items)))]


def _template_prompts(parts) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []

    def emit(category, text):
        out.append((category, text))

    templates = _texts(parts, "concept_template")
    for i, rec in enumerate(parts["concept"]):
        for t in _rotate(templates, i, _PER_CONCEPT):
            emit(f"explain/{rec['domain']}", t.format(x=rec["text"]))

    templates = _texts(parts, "pair_template")
    for i, rec in enumerate(parts["pair"]):
        for t in _rotate(templates, i, 2, stride=1):
            emit("compare", t.format(a=rec["a"], b=rec["b"]))

    templates = _texts(parts, "howto_template")
    for i, x in enumerate(_texts(parts, "howto")):
        for t in _rotate(templates, i, 2, stride=1):
            emit("steps", t.format(x=x))

    templates, languages = _texts(parts, "code_template"), _texts(parts, "language")
    for i, task in enumerate(_texts(parts, "code_task")):
        lang_a, lang_b = _rotate(languages, i, 2, stride=3)
        emit("code", templates[0].format(x=task))
        emit("code", templates[1].format(x=task, language=lang_a))
        emit("code", templates[3].format(x=task, language=lang_b))
        if i % 2 == 0:
            emit("code", templates[2].format(x=task))
    for kind in ("sql", "shell"):
        for x in _texts(parts, f"{kind}_task"):
            for t in _texts(parts, f"{kind}_template"):
                emit("code", t.format(x=x))

    templates, tones = _texts(parts, "email_template"), _texts(parts, "tone")
    for i, x in enumerate(_texts(parts, "email")):
        for j, t in enumerate(templates):
            emit("email", t.format(x=x, tone=tones[(i + 2 * j) % len(tones)]))

    templates, events = _texts(parts, "story_template"), _texts(parts, "story_event")
    for i, s in enumerate(_texts(parts, "story_subject")):
        for j in range(3):
            emit("story", templates[(i + j) % len(templates)].format(s=s, e=events[(i * 3 + j * 5) % len(events)]))

    forms = _texts(parts, "poem_form")
    for i, theme in enumerate(_texts(parts, "poem_theme")):
        for form in _rotate(forms, i, 2, stride=1):
            emit("poem", f"Write a {form} about {theme}.")
    for x in _texts(parts, "writing_task"):
        emit("writing", x)

    templates = _texts(parts, "list_template")
    for i, x in enumerate(_texts(parts, "list_topic")):
        for j, t in enumerate(_rotate(templates, i, 2, stride=1)):
            emit("list", t.format(x=x, k=(3, 5, 7, 10)[(i + j) % 4]))

    templates = _texts(parts, "city_template")
    for i, city in enumerate(_texts(parts, "city")):
        for t in _rotate(templates, i, 3, stride=1):
            emit("travel", t.format(x=city, d=(2, 3, 4, 5)[i % 4]))

    simple = [
        ("proscons", "proscons_template", "opinion"), ("idea", "idea_template", "brainstorm"),
        ("name_for", "name_template", "brainstorm"), ("proverb", "proverb_template", "explain/language"),
        ("grammar", "grammar_template", "editing"), ("review", "review_template", "classify"),
    ]
    for kind, template_kind, category in simple:
        for x in _texts(parts, kind):
            for t in _texts(parts, template_kind):
                emit(category, t.format(x=x))
    for x in _texts(parts, "advice"):
        emit("advice", x)

    template, styles = _texts(parts, "rewrite_template")[0], _texts(parts, "style")
    for i, x in enumerate(_texts(parts, "sentence")):
        for style in _rotate(styles, i, 3, stride=1):
            emit("editing", template.format(x=x, style=style))

    templates, langs = _texts(parts, "translate_template"), _texts(parts, "lang")
    for i, x in enumerate(_texts(parts, "phrase")):
        for j, lang in enumerate(langs):
            emit("translate", templates[(i + j) % len(templates)].format(x=x, lang=lang))
    return out


# ----------------------------------------------------------------------------- math word problems


def _money(x: float) -> str:
    return f"${x:,.2f}" if x != int(x) else f"${int(x):,}"


def _math_prompts() -> list[tuple[str, str]]:
    """Arithmetic word problems; the numbers come from a fixed generator (not from ``seed``)."""
    rng = random.Random(20240611)
    names = ["Maya", "Sam", "Priya", "Leo", "Aisha", "Tom", "Chen", "Sofia", "Omar", "Nina", "Jonas", "Lucia"]
    items = ["notebooks", "pencils", "apples", "tickets", "mugs", "plants", "books", "candles"]

    def f1():
        d, h = rng.choice([60, 90, 120, 150, 180, 240, 300, 360]), rng.choice([1.5, 2, 2.5, 3, 4])
        return f"A train travels {d} km in {h} hours. What is its average speed in km per hour? Show your reasoning."

    def f2():
        p, n = rng.choice([1.5, 2, 2.25, 3, 3.75, 4.5]), rng.randint(2, 9)
        bill = 20 if p * n < 20 else 50
        return (f"A shop sells {rng.choice(items)} for {_money(p)} each. {rng.choice(names)} buys {n} of them and pays "
                f"with a {_money(bill)} note. How much change do they get?")

    def f3():
        a, s, t = rng.choice([200, 250, 300, 360, 450]), rng.choice([2, 3, 4, 6]), rng.choice([5, 8, 9, 10, 12])
        return f"A recipe needs {a} grams of flour for {s} servings. How much flour is needed for {t} servings?"

    def f4():
        length, w = rng.randint(4, 30), rng.randint(2, 20)
        return f"A rectangle is {length} cm long and {w} cm wide. What are its area and its perimeter?"

    def f5():
        p, r = rng.choice([40, 60, 75, 80, 120, 150, 240]), rng.choice([10, 15, 20, 25, 30, 40])
        return f"A jacket costs {_money(p)} and is on sale for {r}% off. What is the sale price, and how much is saved?"

    def f6():
        p, r, y = rng.choice([500, 1000, 2000, 5000]), rng.choice([2, 3, 4, 5, 6]), rng.randint(2, 6)
        return (f"If you invest {_money(p)} at {r}% annual interest, compounded yearly, how much will you have after "
                f"{y} years? Show each year.")

    def f7():
        n1, n2 = rng.sample(names, 2)
        a, b, c = rng.randint(5, 14), rng.randint(2, 8), rng.randint(3, 10)
        return f"{n1} is {a} years old and {n2} is {b} years older. In {c} years, what will the sum of their ages be?"

    def f8():
        v, r = rng.choice([120, 180, 240, 300, 450, 600]), rng.choice([6, 8, 12, 15, 20])
        return f"A tank holds {v} litres and is filled at {r} litres per minute. How long does it take to fill it from empty?"

    def f9():
        r, b, g = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9)
        return (f"A bag holds {r} red, {b} blue and {g} green marbles. What is the probability of drawing a blue marble? "
                f"And of drawing two red marbles in a row without putting the first back?")

    def f10():
        n, m, s = rng.randint(12, 30), rng.randint(60, 80), rng.randint(50, 100)
        return (f"A class of {n} students had an average test score of {m}. A new student joins and scores {s}. "
                f"What is the new class average?")

    def f11():
        a, b = rng.sample([2, 3, 4, 5, 6, 8, 10, 12], 2)
        return (f"One painter can paint a fence in {a} hours and another can paint it in {b} hours. "
                f"How long does it take them working together?")

    def f12():
        v, t = rng.choice([12, 15, 18, 20, 24, 30]), rng.choice([20, 30, 40, 45, 50, 90])
        return f"A cyclist rides at {v} km/h for {t} minutes. How far does she travel?"

    def f13():
        a, x, b = rng.randint(2, 9), rng.randint(-6, 12), rng.randint(-20, 20)
        return f"Solve for x: {a}x {'+' if b >= 0 else '-'} {abs(b)} = {a * x + b}. Explain each step."

    def f14():
        p, n = rng.choice([5, 12, 15, 18, 25, 35, 40, 75]), rng.choice([80, 120, 240, 360, 450, 1200])
        return f"What is {p}% of {n}? Explain how to work it out without a calculator."

    def f15():
        n, p, c = rng.choice([40, 60, 80, 120]), rng.choice([3, 3.5, 4, 4.5]), rng.choice([1, 1.25, 1.5, 2])
        return (f"A bakery bakes {n} loaves a day and sells each for {_money(p)}; the ingredients cost {_money(c)} per loaf. "
                f"If it sells every loaf, what is its profit over a 6-day week?")

    def f16():
        h1, m1 = rng.randint(6, 11), rng.choice([0, 15, 20, 35, 45, 50])
        dur = rng.choice([95, 130, 165, 200, 255])
        return (f"A flight leaves at {h1}:{m1:02d} and takes {dur} minutes. At what time does it land? "
                f"Explain your working.")

    out = []
    for f in (f1, f2, f3, f4, f5, f6, f7, f8, f9, f10, f11, f12, f13, f14, f15, f16):
        for _ in range(_MATH_PER_TEMPLATE):
            out.append(("math", f()))
    return out


# ----------------------------------------------------------------------------- standard library


def _first_paragraph(doc: str | None, lo: int = 40, hi: int = 600) -> str | None:
    if not doc:
        return None
    for para in doc.strip().split("\n\n"):
        para = " ".join(para.split())
        if re.fullmatch(r"[\w.]+\(.*\)( -> .*)?", para):  # a C function's signature line
            continue
        if lo <= len(para) <= hi and "deprecated" not in para.lower():
            return para
        return None
    return None


def _module_doc(module, hi: int = 900) -> str | None:
    doc = inspect.getdoc(module)
    if not doc:
        return None
    paragraphs = [" ".join(p.split()) for p in doc.strip().split("\n\n") if p.strip()]
    text = ""
    for p in paragraphs[:3]:
        if len(text) + len(p) > hi:
            break
        text = f"{text}\n\n{p}" if text else p
    return text if len(text) >= 80 else None


def _public_objects(modname: str, module) -> list[tuple[str, object]]:
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    last = modname.rsplit(".", 1)[-1]
    found = []
    for name in sorted(set(names)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            continue
        owner = (getattr(obj, "__module__", "") or "").lstrip("_")
        # Keep what the module defines (or its C accelerator / os.path's posixpath), not re-exports.
        if not hasattr(module, "__all__") and not (owner.startswith(last) or owner == modname):
            continue
        found.append((name, obj))
    return found


def _rank(text: str, salt: str) -> str:
    return hashlib.sha1(f"{salt}\x00{text}".encode("utf-8")).hexdigest()


def _stdlib_prompts(parts) -> list[tuple[str, str]]:
    name_t, class_t = _texts(parts, "stdlib_name_template"), _texts(parts, "stdlib_class_template")
    doc_t, src_t = _texts(parts, "stdlib_doc_template"), _texts(parts, "stdlib_source_template")
    mod_t = _texts(parts, "stdlib_module_template")
    out: list[tuple[str, str]] = []
    counter = 0
    for mi, modname in enumerate(_texts(parts, "stdlib_module")):
        try:
            module = importlib.import_module(modname)
        except ImportError:  # e.g. a Python built without sqlite3
            continue
        doc = _module_doc(module)
        if doc:
            out.append(("stdlib/module", mod_t[mi % len(mod_t)].format(x=modname, doc=doc)))
        objects = _public_objects(modname, module)
        # A stable choice of names: ranked by a hash of the name, not by position.
        chosen = sorted(objects, key=lambda o: _rank(o[0], "stdlib"))[:_STDLIB_NAMES_PER_MODULE]
        for name, obj in sorted(chosen, key=lambda o: o[0]):
            qual = f"{modname}.{name}"
            templates = class_t if inspect.isclass(obj) else name_t
            out.append(("stdlib/name", templates[counter % len(templates)].format(x=qual)))
            para = _first_paragraph(inspect.getdoc(obj))
            if para and counter % 3 == 0:
                out.append(("stdlib/doc", doc_t[counter % len(doc_t)].format(x=qual, doc=para)))
            counter += 1
        sources = 0
        for name, obj in sorted(objects, key=lambda o: _rank(o[0], "source")):
            if sources >= _STDLIB_SOURCES_PER_MODULE or not inspect.isfunction(obj):
                continue
            try:
                src = textwrap.dedent(inspect.getsource(obj)).strip()
            except (OSError, TypeError):
                continue
            lines = src.count("\n") + 1
            if 5 <= lines <= 30 and len(src) <= 1500:
                out.append(("stdlib/source", src_t[(mi + sources) % len(src_t)].format(m=modname, src=src)))
                sources += 1
    return out


@functools.lru_cache(maxsize=1)
def _pool() -> tuple[tuple[str, str], ...]:
    """Every (category, prompt), deduplicated, in a fixed order."""
    parts = _load_parts()
    seen: set[str] = set()
    pool = []
    for category, text in _template_prompts(parts) + _math_prompts() + _stdlib_prompts(parts):
        text = text.strip()
        if text and text not in seen:
            seen.add(text)
            pool.append((category, text))
    return tuple(pool)


def training_prompt_pool() -> list[tuple[str, str]]:
    """All default training prompts as ``(category, prompt)`` pairs, in the pool's fixed order."""
    return list(_pool())


def training_prompts(source: str | list[str], n: int | None = None, seed: int = 0, turns: int = 1) -> list:
    """A recipe's ``data.self_distill.prompts``: ``default`` (this module), ``sharegpt[:PATH]``
    (ShareGPT's first user turns, or with ``turns`` > 1 its conversations' first ``turns`` user
    turns, answered one after the other) in an order fixed by ``seed``, or any ``load_prompts``
    source (in its own order; with ``turns`` > 1 its conversations' user turns too, e.g.
    UltraChat's ``messages``). A list of sources is mixed (``mixed_prompts``)."""
    if isinstance(source, (list, tuple)):
        return mixed_prompts(list(source), n, seed=seed, turns=turns)
    return _source_prompts(source, n, seed, turns)


def _source_prompts(source: str, n: int | None, seed: int, turns: int) -> list:
    from ..prompts import load_prompts
    from .sharegpt import first_user_turns, is_sharegpt_source, source_path, user_turn_scripts

    if source == "default":
        return default_training_prompts(n, seed=seed)
    if is_sharegpt_source(source):
        if turns > 1:
            return user_turn_scripts(source_path(source), limit=n, seed=seed, max_turns=turns)
        return first_user_turns(source_path(source), limit=n, seed=seed)
    return load_prompts(source, limit=n, turns=turns)


def mixed_prompts(sources: list[str], n: int | None = None, seed: int = 0, turns: int = 1) -> list:
    """Prompts of several sources in equal shares (``n`` split evenly, the first sources taking the
    remainder; a source that runs short leaves its share to the others), repeats dropped, in an
    order fixed by ``seed`` (each prompt ranked by a hash of the seed and its id), so that every
    shard of the self-distilled data holds some of each source."""
    from .data import prompt_id

    if not sources:
        raise SpecHeadsError("no prompt sources to mix: the list is empty")
    lists = [_source_prompts(source, n, seed, turns) for source in sources]
    seen: set[str] = set()
    chosen: list[list] = [[] for _ in sources]
    if n is None:
        quotas = [None] * len(sources)
    else:
        quotas = [n // len(sources) + (i < n % len(sources)) for i in range(len(sources))]
    positions = [0] * len(sources)

    def take(i: int, want: int | None) -> None:
        while (want is None or len(chosen[i]) < want) and positions[i] < len(lists[i]):
            prompt = lists[i][positions[i]]
            positions[i] += 1
            pid = prompt_id(prompt)
            if pid not in seen:
                seen.add(pid)
                chosen[i].append(prompt)

    for i, quota in enumerate(quotas):
        take(i, quota)
    if n is not None:  # shares a short source could not fill, from the others in turn
        for i in range(len(sources)):
            take(i, len(chosen[i]) + n - sum(map(len, chosen)))
    mixed = [p for group in chosen for p in group]
    counts = ", ".join(f"{len(group)} from {source}" for source, group in zip(sources, chosen))
    print(f"[specheads] training prompts: {counts}", file=sys.stderr, flush=True)
    return sorted(mixed, key=lambda p: _rank(prompt_id(p), str(seed)))


def default_training_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """``n`` distinct training prompts (all of them when ``n`` is None), in an order fixed by ``seed``."""
    pool = _pool()
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise SpecHeadsError(f"number of training prompts must be a positive integer, got {n!r}")
    if n is not None and n > len(pool):
        raise SpecHeadsError(f"asked for {n} default training prompts, but only {len(pool)} are available")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpecHeadsError(f"seed must be an integer, got {seed!r}")
    ordered = sorted((text for _, text in pool), key=lambda text: _rank(text, str(seed)))
    return ordered if n is None else ordered[:n]
