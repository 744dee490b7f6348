"""Hybrid drafters (``A+B+...``) under goodput control: never worse than their best part.

Unit tests drive ``GoodputController`` with injected proposals, costs and acceptance: the merged
selection keeps one part's nodes where the other's do not pay and both where they do, and by its
own estimates is never below any single part's best; lookup nodes are valued by their match
length and apart from nodes another part also proposed; a costly model part is skipped after a
long, confident lookup match and run where the lookup has nothing. A simulated text (repetitive
stretches a lookup predicts, new text only the model drafter does) checks the whole loop: the
hybrid's goodput beats its best part's. Engine tests, on tiny float32 verifiers with a clock that
charges each part a fixed drafting time (so skipping happens, and the same way on any machine):
EAGLE-3 + n-gram + suffix and Medusa + n-gram are token for token the verifier's greedy output,
an EAGLE-3 part skipped for some steps drafts exactly what it would have drafted had it run every
step, and the per-part report adds up. Bad hybrid specs fail with one error naming the part.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import EOS, REPETITIVE_PROMPTS, VOCAB, cached_verifier, hf_greedy
from specheads.decoding.candidates import Candidates, DraftContext
from specheads.decoding.engine import SpeculativeDecoder
from specheads.decoding.goodput import Calibrator, GoodputController, Origin, Selection, merge
from specheads.decoding.sampling import SamplingParams
from specheads.drafters import NgramDrafter, SuffixDrafter, build_drafter
from specheads.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Model, draft_vocab_d2t
from specheads.drafters.hybrid import HybridDrafter
from specheads.drafters.medusa import MedusaConfig, MedusaDrafter, MedusaHeads
from specheads.errors import SpecHeadsError


class Curve:
    """A fixed verify cost in ms per token count, deaf to what it observes."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, q):
        return self.fn(q)

    def observe(self, q, seconds):
        pass


CPU = Curve(lambda q: 45.0 + 2.5 * (q - 1))  # a CPU: one more token costs a little
STEEP = Curve(lambda q: 40.0 + 10.0 * q)


def chain(tokens, scores=None):
    return Candidates.chain(tokens, scores=scores)


# -- selection ----------------------------------------------------------------------------------


def test_merged_selection_keeps_one_part_where_the_other_does_not_pay():
    confident = chain([5, 6, 7], [0.95, 0.95, 0.95])
    weak = chain([9, 10], [0.08, 0.08])  # other tokens: siblings of the confident chain
    sel = GoodputController(STEEP, 2).select([(0, confident), (1, weak)], {0: 0.0, 1: 0.0})
    assert sel.candidates.tokens.tolist() == [5, 6, 7]
    assert all({o.source for o in origin} == {0} for origin in sel.origins)


def test_merged_selection_takes_both_parts_where_both_pay():
    a = chain([5, 6], [0.6, 0.6])
    b = chain([9, 10], [0.35, 0.35])  # a different first token: a sibling branch
    sel = GoodputController(Curve(lambda q: 40.0 + 1.0 * q), 2).select([(0, a), (1, b)], {0: 0.0, 1: 0.0})
    kept = sel.candidates.tokens.tolist()
    assert 5 in kept and 9 in kept
    assert {o.source for origin in sel.origins for o in origin} == {0, 1}


def test_selection_is_never_worse_than_the_best_single_part():
    """Random trees from three parts (overlapping tokens, so nodes are shared), random evidence,
    costs and drafting times: by the controller's own estimates, the selection's expected tokens
    less what its time is worth (drafting included, a second worth the generation's goodput: the
    measure whose sum over steps a generation's goodput is best for) is at least that of the best
    subset of any one part's nodes, and of a plain step."""
    rng = random.Random(0)
    for trial in range(150):
        cal = Calibrator()
        for _ in range(rng.randrange(0, 200)):  # evidence: per part, depth, score, rank and match
            cal.observe([([Origin(rng.randrange(3), rng.randrange(1, 5), rng.choice([None, 0.1, 0.5, 0.95]),
                                  rng.randrange(3), rng.choice([None, 1, 4, 20]))], rng.random() < 0.5)])
        slope = rng.choice([0.5, 2.5, 10.0, 30.0])
        cost = Curve(lambda q, slope=slope: 45.0 + slope * (q - 1))
        ctl = GoodputController(cost, 3, calibrator=cal)
        for _ in range(rng.randrange(0, 5)):  # a generation's goodput so far, above a plain step's
            ctl._tokens.add(rng.uniform(1, 4))
            ctl._time.add(cost(3) / 1e3)
        proposals, draft_s, matches = [], {}, {}
        for part in range(3):
            n = rng.randrange(0, 8)
            parents = [-1 if v == 0 or rng.random() < 0.3 else rng.randrange(v) for v in range(n)]
            tokens = [rng.randrange(4) for _ in range(n)]
            scores = None if part == 2 else [rng.random() for _ in range(n)]
            keep, seen = [], set()  # a drafter's own tree names a token once under a parent
            for v, (p, t) in enumerate(zip(parents, tokens)):
                if (p, t) not in seen and (p < 0 or p in keep):
                    seen.add((p, t))
                    keep.append(v)
            index = {old: new for new, old in enumerate(keep)}
            cands = Candidates(torch.tensor([tokens[v] for v in keep], dtype=torch.long),
                               torch.tensor([-1 if parents[v] < 0 else index[parents[v]] for v in keep], dtype=torch.long),
                               scores=None if scores is None else torch.tensor([scores[v] for v in keep]))
            proposals.append((part, cands))
            draft_s[part] = rng.choice([0.0, 0.0002, 0.015])
            matches[part] = rng.choice([None, 2, 12]) if part == 2 else None
        sel = ctl.select(proposals, draft_s, matches=matches)
        spent, worth = sum(draft_s.values()), ctl.goodput

        def value(gained: float, nodes: int) -> float:
            return 1.0 + gained - worth * (spent + cost(nodes + 1) / 1e3)

        chosen = value(sum(sel.probs), len(sel.candidates))
        assert chosen >= value(0.0, 0) - 1e-12, trial
        merged, origins = merge([(i, c) for i, c in proposals if len(c)], matches)
        probs = ctl._node_probs(merged, origins) if len(merged) else []
        for part in range(3):
            mine = sorted((probs[v] for v in range(len(probs)) if part in {o.source for o in origins[v]}), reverse=True)
            best = max(value(sum(mine[:n]), n) for n in range(len(mine) + 1))
            assert chosen >= best - 1e-12, (trial, part)


def test_a_branch_is_charged_what_tree_forwards_cost_beyond_chains():
    """Two parts that disagree on the first token make a tree; on a machine whose tree forwards
    cost more than chains of as many tokens (learned from the forwards), the weaker branch is
    verified only where it pays for that too."""
    a, b = chain([5, 6], [0.95, 0.95]), chain([9], [0.3])
    ctl = GoodputController(CPU, 2)
    assert 9 in ctl.select([(0, a), (1, b)], {0: 0.0, 1: 0.0}).candidates.tokens.tolist()
    far = [Origin(0, 6, None)]  # nodes whose outcome teaches nothing about a's and b's
    tree = Candidates(torch.tensor([1, 2]), torch.tensor([-1, -1]))
    for _ in range(20):
        ctl.update(Selection(chain([1, 2]), [far, far], [0.5, 0.25], []), [], CPU(3) / 1e3)  # chains: on the curve
        ctl.update(Selection(tree, [far, far], [0.5, 0.5], []), [], CPU(3) / 1e3 + 0.03)  # trees: 30 ms more
    assert ctl.tree_extra == pytest.approx(0.03, rel=0.05)
    sel = ctl.select([(0, a), (1, b)], {0: 0.0, 1: 0.0})
    assert sel.candidates.tokens.tolist() == [5, 6] and sel.candidates.is_chain


# -- what each part's nodes are worth ------------------------------------------------------------


def test_lookup_nodes_are_valued_by_match_length_and_apart_from_agreed_nodes():
    cal = Calibrator()
    rng = random.Random(1)
    for _ in range(300):
        # an n-gram part (source 1, no scores): right after a long match, wrong after a short one;
        # where the suffix part (source 0) proposed the same token, right almost always
        cal.observe([([Origin(1, 1, None, 0, 12)], rng.random() < 0.8),
                     ([Origin(1, 1, None, 0, 1)], rng.random() < 0.1),
                     ([Origin(0, 1, 0.95, 0, 12), Origin(1, 1, None, 0, 12)], rng.random() < 0.95)])
    long_match, short_match = cal.node([Origin(1, 1, None, 0, 12)]), cal.node([Origin(1, 1, None, 0, 1)])
    agreed = cal.node([Origin(0, 1, 0.95, 0, 12), Origin(1, 1, None, 0, 12)])
    assert long_match == pytest.approx(0.8, abs=0.1) and short_match == pytest.approx(0.1, abs=0.08)
    assert agreed == pytest.approx(0.95, abs=0.06)
    # A match length never seen starts from the part's own confidence (none: the lookup prior), so
    # that failing short matches do not keep a long one from ever being tried.
    assert cal.node([Origin(1, 1, None, 0, 5)]) == pytest.approx(0.3)


def test_model_nodes_are_valued_by_rank():
    cal = Calibrator()
    for i in range(200):
        cal.observe([([Origin(0, 1, 0.5, 0)], i % 5 != 0), ([Origin(0, 1, 0.5, 1)], i % 10 == 0)])
    assert cal.node([Origin(0, 1, 0.5, 0)]) > 0.7 > 0.2 > cal.node([Origin(0, 1, 0.5, 1)])
    # a rank never seen leans on the others of its depth and confidence
    assert 0.3 < cal.node([Origin(0, 1, 0.5, 2)]) < 0.6


# -- a simulated text: what runs, and the goodput it gives ----------------------------------------

LOOKUP_S, MODEL_S = 0.0002, 0.010


def text_step(rng, t, k=4):
    """One step of a text that is repetitive (35%: the lookup matched 12 tokens and its drafts are
    right 90% each), half known (25%: a 1-token match, right 20% each) or new (no match). The model
    drafter's drafts are right 70% each everywhere; its wrong tokens differ from the lookup's."""
    truth = [1000 + 10 * t + j for j in range(k)]

    def drafts(p, wrong):
        return [x if rng.random() < p else x + wrong for x in truth]

    r = rng.random()
    kind = "repetitive" if r < 0.35 else "half" if r < 0.6 else "new"
    lookup = (drafts(0.9, 500), 12) if kind == "repetitive" else (drafts(0.2, 500)[:2], 1) if kind == "half" else None
    return kind, truth, lookup, drafts(0.7, 700)


def accepted_path(cands, truth):
    """Greedy verification against ``truth``: the nodes down the matching path."""
    tokens, parents = cands.tokens.tolist(), cands.parents.tolist()
    path, node = [], -1
    for token in truth:
        nxt = [v for v in range(len(tokens)) if parents[v] == node and tokens[v] == token]
        if not nxt:
            break
        node = nxt[0]
        path.append(node)
    return path


def simulate(parts, steps=2500, seed=0):
    """Goodput over plain decoding's, and per kind of text the share of steps the model ran in."""
    rng = random.Random(seed)
    ctl = GoodputController(CPU, len(parts))
    tokens = seconds = 0.0
    ran = {"repetitive": [0, 0], "half": [0, 0], "new": [0, 0]}
    for t in range(steps):
        kind, truth, lookup, model = text_step(rng, t)
        ctl.begin()
        for i in ctl.order():
            if not ctl.should_run(i):
                continue
            if parts[i] == "lookup":
                ctl.add(i, chain(lookup[0]) if lookup else Candidates.empty(), LOOKUP_S, match=lookup[1] if lookup else None)
                seconds += LOOKUP_S
            else:
                ctl.add(i, chain(model, [0.6] * len(model)), MODEL_S, levels=len(model))
                seconds += MODEL_S
                ran[kind][0] += 1
        ran[kind][1] += 1
        sel = ctl.select()
        path = accepted_path(sel.candidates, truth)
        ctl.update(sel, path, 0.0)
        tokens += 1 + len(path)
        seconds += CPU(len(sel.candidates) + 1) / 1e3
    return tokens / seconds * CPU(1) / 1e3, {k: a / b for k, (a, b) in ran.items()}


def test_simulated_hybrid_beats_its_best_part_and_skips_the_model_where_the_lookup_is_sure():
    lookup, _ = simulate(["lookup"])
    model, _ = simulate(["model"])
    hybrid, ran = simulate(["lookup", "model"])
    assert lookup > 1.5 and model > 1.5  # each part pays on its own
    assert hybrid >= 1.1 * max(lookup, model), (hybrid, lookup, model)
    # After a 12-token match the lookup's 4 drafts are right 66% of the time: the model adds
    # little for its time there and is mostly skipped; on new text it runs.
    assert ran["repetitive"] < 0.5 and ran["new"] > 0.9, ran
    reversed_order, _ = simulate(["model", "lookup"])  # the cheap part is considered first whatever its index
    assert reversed_order >= 1.1 * max(lookup, model), reversed_order


def test_the_model_part_is_skipped_after_a_long_confident_match_and_run_without_one():
    rng = random.Random(2)
    ctl = GoodputController(CPU, 2)
    for t in range(600):  # learn what each part adds, as in the simulation
        kind, truth, lookup, model = text_step(rng, t)
        ctl.begin()
        for i in ctl.order():
            if ctl.should_run(i):
                c = (chain(lookup[0]) if lookup else Candidates.empty()) if i == 0 else chain(model, [0.6] * 4)
                ctl.add(i, c, LOOKUP_S if i == 0 else MODEL_S, 0 if i == 0 else 4, lookup[1] if lookup and i == 0 else None)
        sel = ctl.select()
        ctl.update(sel, accepted_path(sel.candidates, truth), 0.0)
    assert ctl.order() == [0, 1]  # the lookup is considered first
    decisions = {"confident": [], "none": []}
    for case in decisions:
        for _ in range(16):
            ctl.begin()
            assert ctl.should_run(0)
            ctl.add(0, chain([1, 2, 3, 4]) if case == "confident" else Candidates.empty(), LOOKUP_S,
                    match=12 if case == "confident" else None)
            decisions[case].append(ctl.should_run(1))
            ctl.select()
    assert sum(decisions["confident"]) <= 3  # tried again now and then only (every 4, 8, then 16 skips)
    assert all(decisions["none"])


# -- the engine: lossless with skipping, a skipped EAGLE-3 catches up, the report -----------------


class Clock:
    """Seconds that pass only when a drafter drafts (a verify forward takes none)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Costly:
    """A drafter whose every ``propose`` takes ``ms`` on ``clock``; records what it proposed."""

    def __init__(self, inner, clock: Clock, ms: float):
        self.inner, self.clock, self.ms = inner, clock, ms
        self.proposals: list[tuple[list[int], int, int, Candidates]] = []  # (context, k, levels, candidates)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def propose(self, ctx):
        self.clock.now += self.ms / 1e3
        cands = self.inner.propose(ctx)
        self.proposals.append((list(ctx.tokens), ctx.num_draft_tokens, ctx.levels_drafted, cands))
        return cands


def eagle3(verifier, seed=0, tree="auto"):
    cfg = Eagle3Config.from_verifier(verifier, VOCAB, [1, 1, 2])
    torch.manual_seed(seed)
    return Eagle3Drafter(Eagle3Model(cfg, d2t=draft_vocab_d2t(torch.arange(VOCAB))), verifier, tree=tree, top_k=3)


def medusa(verifier):
    torch.manual_seed(0)
    heads = MedusaHeads(MedusaConfig(hidden_size=verifier.hidden_size, vocab_size=VOCAB, num_heads=3))
    heads.init_lm_heads_from(verifier.model.get_output_embeddings().weight)
    return MedusaDrafter(heads, verifier, tree="tree8")


PROMPTS = [list(REPETITIVE_PROMPTS[0]), [3, 17, 22, 9, 41, 5, 30, 17, 22]]


@pytest.mark.parametrize("kind", ["eagle3+ngram+suffix", "medusa+ngram"])
def test_hybrids_with_skipping_are_lossless(arch, kind):
    """Greedy float32: token for token the verifier's own output, while goodput control skips the
    costly model part on some steps (charged 20 ms a draft against a 45 ms forward)."""
    v = cached_verifier(arch)
    clock = Clock()
    model = Costly(eagle3(v) if kind.startswith("eagle3") else medusa(v), clock, 20.0)
    lookups = [Costly(NgramDrafter(), clock, 0.1)] + ([Costly(SuffixDrafter(), clock, 0.3)] if "suffix" in kind else [])
    hybrid = HybridDrafter([model, *lookups], kind.split("+"))
    decoder = SpeculativeDecoder(v, hybrid, num_draft_tokens=4, cost=CPU, clock=clock)
    steps = runs = accepted = 0
    for prompt in PROMPTS:
        out = decoder.generate(prompt, max_new_tokens=40, eos_token_ids=[EOS])
        assert out.token_ids == hf_greedy(v.model, prompt, 40, EOS)
        steps += out.stats.verify_steps
        runs += out.stats.parts[0].runs
        accepted += sum(out.stats.accepted_at)
        parts = out.stats.parts
        assert [p.name for p in parts] == kind.split("+")
        for p in parts:
            assert p.proposed >= p.verified >= p.accepted >= p.accepted_alone >= 0 and p.runs <= out.stats.verify_steps
        assert sum(p.accepted for p in parts) >= sum(out.stats.accepted_at)  # each accepted draft came from some part
        assert parts[0].draft_s == pytest.approx(0.02 * parts[0].runs)
    assert 0 < runs < steps, (runs, steps)  # the model part was skipped on some steps, run on others
    assert accepted > 0


def reference_proposal(drafter_model, verifier, context, k, levels):
    """What a fresh EAGLE-3 drafter proposes for ``context`` from one forward of the verifier over
    it, drafting ``levels`` levels: what a drafter that ran every step must propose too."""
    fresh = Eagle3Drafter(drafter_model, verifier, tree="auto", top_k=3)
    fresh.start(context)
    with torch.no_grad():
        out = verifier.model(input_ids=torch.tensor([context[:-1]]), output_hidden_states=True)
    hidden = tuple(out.hidden_states[i][0] for i in fresh.hidden_layers)
    ctx = DraftContext(list(context), k, SamplingParams(), None, hidden, keep_going=lambda depth, paths: depth <= levels)
    return fresh.propose(ctx)


def test_a_skipped_eagle3_part_catches_up_exactly():
    """EAGLE-3 keeps its own cache of the verifier's features. Skipped for some steps, it reads every
    row it missed when it next runs (the tokens other parts had accepted, from tree steps too), and
    proposes what a fresh drafter given one full forward over the same context would."""
    v = cached_verifier("llama")
    clock = Clock()
    part = Costly(eagle3(v), clock, 20.0)
    hybrid = HybridDrafter([part, Costly(NgramDrafter(), clock, 0.1), Costly(SuffixDrafter(), clock, 0.3)])
    decoder = SpeculativeDecoder(v, hybrid, num_draft_tokens=4, cost=CPU, clock=clock)
    out = decoder.generate(PROMPTS[0], max_new_tokens=48, eos_token_ids=[EOS])
    assert out.token_ids == hf_greedy(v.model, PROMPTS[0], 48, EOS)
    contexts = [p[0] for p in part.proposals]
    gaps = [len(b) - len(a) for a, b in zip(contexts, contexts[1:])]
    assert len(part.proposals) < out.stats.verify_steps and max(gaps) > 5, gaps  # it was skipped, for several steps at once
    for context, k, levels, cands in part.proposals:
        ref = reference_proposal(part.inner.model, v, context, k, levels)
        assert cands.tokens.tolist() == ref.tokens.tolist() and cands.parents.tolist() == ref.parents.tolist()
        torch.testing.assert_close(cands.scores, ref.scores, rtol=1e-4, atol=1e-5)


def test_bench_and_generate_report_each_part(tmp_path, capsys):
    from test_bench_cli import save_tiny

    from specheads.cli import main

    verifier = save_tiny(tmp_path / "verifier", 0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [t]}) for t in ["abc abc abc abc", "count to ten, count to ten"]))
    out = tmp_path / "out"
    assert main(["bench", "--verifier", verifier, "--drafter", "ngram,ngram+suffix", "--prompts", str(prompts), "--max-new-tokens", "24",
                 "--device", "cpu", "--no-hf", "--cpu-linears", "packed", "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    name = "speculative[hybrid:ngram+suffix]"
    parts = report["methods"][name]["parts"]
    assert [p["name"] for p in parts] == ["ngram", "suffix"]
    for p in parts:
        assert set(p) >= {"runs", "proposed", "verified", "accepted", "accepted_alone", "draft_ms_per_run", "run_fraction",
                          "accepted_share", "accepted_alone_share"}
        assert 0 <= p["accepted_share"] <= 1 and p["accepted_alone_share"] <= p["accepted_share"]
    assert "parts" not in report["methods"]["speculative[ngram]"]  # a lone drafter has no parts
    table = (out / "report.md").read_text()
    assert "hybrid parts" in table and f"| {name} | suffix |" in table
    assert f"| {name} | suffix |" in capsys.readouterr().out  # printed too
    assert main(["generate", "--verifier", verifier, "--drafter", "ngram+suffix", "--prompt", "abc abc abc", "--max-new-tokens", "12",
                 "--device", "cpu", "--cpu-linears", "packed"]) == 0
    err = capsys.readouterr().err
    assert "[part ngram: ran in" in err and "[part suffix: ran in" in err


# -- bad input ----------------------------------------------------------------------------------


def test_a_part_named_twice_is_refused(tmp_path):
    v = cached_verifier("llama")
    with pytest.raises(SpecHeadsError, match="names the part 'ngram' twice"):
        build_drafter("ngram+suffix+ngram", v)
    folder = tmp_path / "d"
    folder.mkdir()
    with pytest.raises(SpecHeadsError, match=r"names the part '.*/\./d' twice \(as '.*/d'\)"):
        build_drafter(f"{folder}+ngram+{tmp_path}/./d", v)
    assert isinstance(build_drafter("ngram+suffix", v), HybridDrafter)


@pytest.fixture(scope="module")
def eagle3_folders(tmp_path_factory):
    """A tiny verifier folder, an EAGLE-3 drafter for it, one for another verifier, a corrupt one."""
    import shutil

    from test_bench_cli import save_tiny

    from specheads.drafters.eagle3 import save_eagle3
    from specheads.verifier import load_verifier

    root = tmp_path_factory.mktemp("hybrid")
    folders = {"verifier": save_tiny(root / "verifier", 0), "other": save_tiny(root / "other", 5)}
    for name, verifier in (("good", folders["verifier"]), ("wrong_verifier", folders["other"])):
        v = load_verifier(verifier, device="cpu")
        cfg = Eagle3Config.from_verifier(v, v.vocab_size, [1, 1, 2])
        save_eagle3(root / name, Eagle3Model(cfg), v)
        folders[name] = str(root / name)
    shutil.copytree(root / "good", root / "corrupt")
    weights = next((root / "corrupt").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    folders["corrupt"] = str(root / "corrupt")
    return folders


@pytest.mark.parametrize("bad, names", [
    ("wrong_verifier", ["part 1", "wrong_verifier", "LM head hash"]),
    ("corrupt", ["part 1", "corrupt", "truncated"]),
    ("nonsense", ["part 1 'nonsense'", "unknown drafter"]),
])
def test_a_part_that_cannot_be_loaded_is_refused_naming_it(eagle3_folders, tmp_path, capsys, bad, names):
    from specheads.cli import main

    part = eagle3_folders.get(bad, bad)
    assert main(["generate", "--verifier", eagle3_folders["verifier"], "--drafter", f"{part}+ngram+suffix", "--prompt", "abc",
                 "--max-new-tokens", "4", "--device", "cpu", "--cpu-linears", "packed"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("specheads: error: hybrid drafter") and all(n in err for n in names), err
    assert captured.out == ""  # nothing was generated by the other parts alone
    # the good checkpoint in the same place loads, named in reports by its kind and folder
    good = build_drafter(f"{eagle3_folders['good']}+ngram", _load(eagle3_folders["verifier"]))
    assert isinstance(good, HybridDrafter) and good.labels == ["eagle3:good", "ngram"]


def _load(path):
    from specheads.verifier import load_verifier

    return load_verifier(path, device="cpu")
