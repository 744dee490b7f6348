"""Tree decoding: tree attention, tree verification rules, and the engine's tree steps.

(a) The tree mask and position ids: the logits of every node of one tree forward (on top of a
KV cache) equal those of a plain causal forward over the root-to-node path, for Llama, Qwen2 and
GPT-2 (absolute positions), with both the sdpa and the eager attention implementations.
(b) Greedy tree decoding is lossless: the engine's tokens equal ``model.generate(do_sample=False)``
with random trees (around the verifier's own greedy chain, and fully random), with an eos token
in the middle, and with the real ``MedusaDrafter`` (random heads, trees tree8 and tree16).
(c) ``tree_speculative_sampling`` at unit level: the emitted tokens follow the verifier's p
(chi-square over seeded draws), for deterministic and for sampled drafts, and the same check
rejects deliberately wrong rules.
(d) End to end: sampled tree decoding on a vocabulary-8 model gives the verifier's exact joint.
(e) After a tree step the KV cache equals a fresh prefill over the accepted tokens, and the
hidden states handed to the drafter are those of [root] + accepted path.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from conftest import EOS, REPETITIVE_PROMPTS, VOCAB, cached_verifier, greedy_reference, make_model, make_verifier, noisy_model, random_medusa_heads
from specheads.decoding import SpeculativeDecoder
from specheads.decoding.candidates import Candidates, DraftContext
from specheads.decoding.engine import _clip
from specheads.decoding.kv_cache import cache_kwargs, keep_positions, new_cache
from specheads.decoding.sampling import SamplingParams
from specheads.decoding.tree import (
    path_to_node,
    tree_attention_mask,
    tree_children,
    tree_depths,
    tree_max_depth,
    tree_position_ids,
    tree_visibility,
)
from specheads.decoding.verify import greedy_verify_tree, tree_speculative_sampling
from test_sampling import PASS, REJECT, chisquare_pvalue, exact_joint

# A tree with branching at several depths, a leaf at depth 1, and a depth-4 path:
#   root -> 0 -> 2 -> 5 -> 7
#             -> 3
#        -> 1 -> 4
#        -> 8       (a later child of the root, after deeper nodes)
#   2 -> 6
TREE = [-1, -1, 0, 0, 1, 2, 2, 5, -1]


# --------------------------------------------------------------------------------------------
# tree helpers


def test_tree_helpers():
    assert tree_depths(TREE) == [1, 1, 2, 2, 2, 3, 3, 4, 1]
    assert tree_max_depth(TREE) == 4 and tree_max_depth([]) == 0
    assert path_to_node(TREE, 7) == [0, 2, 5, 7]
    assert path_to_node(torch.tensor(TREE), 4) == [1, 4]
    assert path_to_node(TREE, -1) == []
    assert tree_children(TREE)[0] == [0, 1, 8] and tree_children(TREE)[1] == [2, 3] and tree_children(TREE)[8] == []
    vis = tree_visibility(TREE)
    for i in range(len(TREE)):
        seen = {0} | {j + 1 for j in path_to_node(TREE, i)}
        assert {c for c in range(len(TREE) + 1) if vis[i + 1, c]} == seen
    assert tree_position_ids(TREE, 10).tolist() == [[10, 11, 11, 12, 12, 12, 13, 13, 14, 11]]
    mask = tree_attention_mask(TREE, 6, dtype=torch.float16)
    q = len(TREE) + 1
    assert mask.shape == (1, 1, q, 6 + q) and mask.dtype == torch.float16
    assert bool((mask[0, 0, :, :6] == 0).all())  # every row sees the whole past
    assert torch.equal(mask[0, 0, :, 6:] == 0, vis)
    assert float(mask.min()) == torch.finfo(torch.float16).min
    # A chain's tree mask is the causal mask.
    chain = tree_attention_mask([-1, 0, 1], 2)[0, 0] == 0
    assert torch.equal(chain[:, 2:], torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_clip_tree_depth():
    cands = Candidates(torch.arange(10, 19), torch.tensor(TREE))
    clipped = _clip(cands, 2)
    assert clipped.tokens.tolist() == [10, 11, 12, 13, 14, 18]
    assert clipped.parents.tolist() == [-1, -1, 0, 0, 1, -1]
    assert tree_max_depth(clipped.parents) == 2
    assert _clip(cands, 4) is cands
    probs = torch.softmax(torch.randn(9, 5), -1)
    clipped = _clip(Candidates(cands.tokens, cands.parents, probs), 1)
    assert clipped.tokens.tolist() == [10, 11, 18] and torch.equal(clipped.draft_probs, probs[[0, 1, 8]])


# --------------------------------------------------------------------------------------------
# (a) tree attention equals causal attention over each root-to-node path

PROMPT = [5, 9, 13, 7, 22, 3, 40, 41]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_tree_forward_matches_causal_paths(arch, impl):
    model = make_model(arch)
    model.set_attn_implementation(impl)
    past, pending = PROMPT[:-1], PROMPT[-1]
    gen = torch.Generator().manual_seed(0)
    toks = torch.randint(3, VOCAB, (len(TREE),), generator=gen).tolist()
    toks[3] = toks[2]  # duplicate siblings (different positions in the input)
    with torch.no_grad():
        full = {}
        for i in range(-1, len(TREE)):
            seq = PROMPT + [toks[j] for j in path_to_node(TREE, i)]
            full[i] = model(input_ids=torch.tensor([seq])).logits[0, -1]

        def tree_forward(mask, position_ids):
            cache = new_cache(model)
            kw = cache_kwargs(model, cache)
            model(input_ids=torch.tensor([past]), **kw, use_cache=True)
            out = model(input_ids=torch.tensor([[pending] + toks]), attention_mask=mask, position_ids=position_ids, **kw, use_cache=True)
            assert cache.get_seq_length() == len(past) + 1 + len(TREE)
            return out.logits[0]

        logits = tree_forward(tree_attention_mask(TREE, len(past)), tree_position_ids(TREE, len(past)))
        for i in range(-1, len(TREE)):
            # Logits are of magnitude ~10 here; two plain causal forwards of the same path (with
            # and without a cache) already differ by ~1e-5, hence the small rtol.
            torch.testing.assert_close(logits[i + 1], full[i], atol=1e-5, rtol=1e-5, msg=f"node {i}")

        # The check has power: without the tree mask (causal over the flattened tree), or with
        # consecutive positions, nodes off the first branch get different logits.
        def worst(lg):
            return max(float((lg[i + 1] - full[i]).abs().max()) for i in range(-1, len(TREE)))

        assert worst(tree_forward(None, None)) > 1e-2
        assert worst(tree_forward(tree_attention_mask(TREE, len(past)), None)) > 1e-2
        if impl == "eager":
            # Why the mask is additive float: the eager path adds the mask to the scores, so a
            # bool mask (True = attend, as sdpa would take it) is silently wrong there.
            bool_mask = tree_attention_mask(TREE, len(past)) == 0
            assert worst(tree_forward(bool_mask, tree_position_ids(TREE, len(past)))) > 1e-2


# --------------------------------------------------------------------------------------------
# (b) greedy tree decoding is lossless

N_NEW = 40
PROMPTS = REPETITIVE_PROMPTS
reference = greedy_reference


@torch.no_grad()
def greedy_chain(model, tokens: list[int], k: int) -> list[int]:
    seq = list(tokens)
    for _ in range(k):
        seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(tokens):]


class RandomTreeDrafter:
    """Random trees, for greedy losslessness. With ``model``, the tree contains a spine: that
    model's greedy chain (the verifier's own, so drafts are often right), sometimes with one
    token replaced, at a random place among random siblings at every depth, and random children
    under the siblings; tokens repeat among siblings now and then. Without a model every token
    is random."""

    name = "random_tree"

    def __init__(self, model=None, vocab: int = VOCAB, width: int = 3, seed: int = 0, corrupt: float = 0.3, hidden: bool = False):
        self.model, self.vocab, self.width, self.corrupt = model, vocab, width, corrupt
        self.rng = random.Random(seed)
        self.needs_hidden_states = hidden
        self.proposals: list[Candidates] = []
        self.contexts: list[tuple[list[int], tuple | None]] = []
        self.observed: list[int] = []

    def start(self, prompt_ids):
        pass

    def propose(self, ctx: DraftContext) -> Candidates:
        rng, V, k = self.rng, self.vocab, ctx.num_draft_tokens
        self.contexts.append((list(ctx.tokens), ctx.hidden_states))
        if self.model is not None:
            spine = greedy_chain(self.model, ctx.tokens, k)
            if rng.random() < self.corrupt:
                spine[rng.randrange(k)] = rng.randrange(V)
        else:
            spine = [rng.randrange(V) for _ in range(k)]
        tokens: list[int] = []
        parents: list[int] = []
        spine_node, others = -1, []
        for d in range(k):
            n_sibs = rng.randint(1 if d == 0 else 0, self.width - 1)  # depth 1 always branches
            group = [(rng.randrange(V), False) for _ in range(n_sibs)]
            if group and rng.random() < 0.3:
                group.append((rng.choice([spine[d]] + [t for t, _ in group]), False))  # a repeated token
            group.insert(rng.randint(0, len(group)), (spine[d], True))
            new_others = []
            for t, on_spine in group:
                tokens.append(t)
                parents.append(spine_node)
                if on_spine:
                    new_spine = len(tokens) - 1
                else:
                    new_others.append(len(tokens) - 1)
            for o in others:
                if rng.random() < 0.5:
                    tokens.append(rng.randrange(V))
                    parents.append(o)
                    new_others.append(len(tokens) - 1)
            spine_node, others = new_spine, new_others
        cands = Candidates(torch.tensor(tokens), torch.tensor(parents))
        self.proposals.append(cands)
        return cands

    def observe(self, num_accepted, emitted):
        self.observed.append(num_accepted)


@pytest.mark.parametrize("kind,k", [("spine", 3), ("spine", 5), ("noisy", 4), ("random", 3)])
def test_greedy_tree_matches_hf(arch, kind, k):
    verifier = cached_verifier(arch)
    accepted = rejected = 0
    for s, prompt in enumerate(PROMPTS):
        ref = list(reference(arch, prompt, N_NEW, EOS))
        if kind == "spine":  # the verifier's own chain, sometimes with a wrong token
            drafter = RandomTreeDrafter(verifier.model, seed=s)
        elif kind == "noisy":  # a noisy copy's chain: right about half the time
            drafter = RandomTreeDrafter(noisy_model(arch), seed=s, corrupt=0.0)
        else:  # all random, and wide
            drafter = RandomTreeDrafter(None, seed=s, width=8)
        out = SpeculativeDecoder(verifier, drafter, num_draft_tokens=k, control="fixed").generate(list(prompt), max_new_tokens=N_NEW, eos_token_ids=[EOS])
        assert out.token_ids == ref, f"prompt {prompt}: engine {out.token_ids} != HF greedy {ref}"
        assert out.finish_reason == ("eos" if ref[-1] == EOS else "length")
        assert out.stats.emitted_in_steps == len(ref) - 1
        assert all(not c.is_chain for c in drafter.proposals)
        # Trees count drafted = depth, accepted = accepted path length.
        assert len(out.stats.drafted_at) == k and out.stats.drafted_at[0] == len(drafter.proposals)
        assert sum(out.stats.accepted_at) == sum(drafter.observed)
        counts = out.stats.accepted_at
        assert all(a >= b for a, b in zip(counts, counts[1:]))  # reaching depth d+1 needs depth d
        accepted += sum(drafter.observed)
        rejected += sum(1 for c, n in zip(drafter.proposals, drafter.observed) if n < tree_max_depth(c.parents))
    assert rejected > 0
    if kind == "spine":
        # The spine is the verifier's greedy chain: long paths are accepted, from any sibling slot.
        assert accepted > 2 * N_NEW / k, accepted
    elif kind == "noisy":
        assert accepted > 0


def test_greedy_tree_eos_mid_path(arch):
    """An eos token inside the accepted path ends generation there."""
    verifier = cached_verifier(arch)
    prompt = PROMPTS[0]
    full = list(reference(arch, prompt, 30, EOS))
    j = next(i for i in range(7, len(full)) if full[i] not in full[:i] and full[i] != EOS)
    eos = full[j]
    ref = list(reference(arch, prompt, 30, eos))
    assert ref == full[: j + 1]
    drafter = RandomTreeDrafter(verifier.model, seed=1, corrupt=0.0)
    out = SpeculativeDecoder(verifier, drafter, num_draft_tokens=5, control="fixed").generate(list(prompt), max_new_tokens=30, eos_token_ids=[eos])
    assert out.token_ids == ref and out.finish_reason == "eos"
    # The spine drafted past the eos token, so the engine cut an accepted path at eos.
    assert any(eos in c.tokens.tolist() and n > 0 for c, n in zip(drafter.proposals, drafter.observed))


@pytest.mark.parametrize("tree", ["tree4", "tree6", "tree8", "tree16"])
def test_medusa_tree_greedy_lossless(tree):
    from specheads.drafters.medusa import MedusaDrafter, TREES

    verifier = cached_verifier("llama")
    heads = random_medusa_heads(verifier, 5)
    depth = max(len(p) for p in TREES[tree])
    steps = accepted = 0
    for prompt in PROMPTS:
        ref = list(reference("llama", prompt, N_NEW, EOS))
        drafter = MedusaDrafter(heads, verifier, tree=tree)
        out = SpeculativeDecoder(verifier, drafter, num_draft_tokens=depth, control="fixed").generate(list(prompt), max_new_tokens=N_NEW, eos_token_ids=[EOS])
        assert out.token_ids == ref, f"{tree}, prompt {prompt}"
        assert len(out.stats.drafted_at) == depth
        steps += out.stats.verify_steps
        accepted += sum(out.stats.accepted_at)
    assert steps > 0 and accepted > 0


# --------------------------------------------------------------------------------------------
# (c) tree_speculative_sampling against fixed rows

V = 5
# Root children: tokens 1, 3, 1 (a repeat) and 4; node 0 (token 1) has children tokens 2, 0;
# node 1 (token 3) has child token 0.
UNIT_TOKENS = torch.tensor([1, 3, 1, 2, 0, 0, 4])
UNIT_PARENTS = torch.tensor([-1, -1, -1, 0, 0, 1, -1])
P = torch.tensor(
    [
        [0.10, 0.30, 0.15, 0.25, 0.20],  # root row
        [0.20, 0.05, 0.40, 0.05, 0.30],  # after node 0 (token 1)
        [0.50, 0.10, 0.10, 0.20, 0.10],  # after node 1 (token 3)
        [0.20, 0.20, 0.20, 0.20, 0.20],  # after node 2 (never reached: a repeat)
        [0.10, 0.60, 0.10, 0.10, 0.10],
        [0.30, 0.30, 0.20, 0.10, 0.10],
        [0.25, 0.25, 0.25, 0.15, 0.10],
        [0.05, 0.05, 0.05, 0.05, 0.80],  # after node 6 (token 4)
    ]
)
N_UNIT = 12000


def wrong_first_child_then_p(target_probs, candidates, generator=None):
    """Wrong: tries only the first child, with probability p(x), and on rejection samples from
    the unmodified p (the residual is never formed)."""
    children = tree_children(candidates.parents)
    tokens = candidates.tokens.tolist()
    path, row = [], 0
    while children[row]:
        c = children[row][0]
        if float(torch.rand((), generator=generator)) < float(target_probs[row, tokens[c]]):
            path.append(c)
            row = c + 1
        else:
            break
    return path, int(torch.multinomial(target_probs[row], 1, generator=generator))


def run_unit(rule, candidates, n_samples=N_UNIT, seed=0):
    """counts[r][x]: how often the token emitted after the path reaching row r was x."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.zeros(V)
    second = {}  # first emitted token (an accepted node) -> counts of the token after it
    for _ in range(n_samples):
        path, nxt = rule(P, candidates, gen)
        emitted = candidates.tokens[path].tolist() + [nxt] if path else [nxt]
        first[emitted[0]] += 1
        if path:
            row = path[0] + 1
            second.setdefault(row, torch.zeros(V))[emitted[1]] += 1
    return first, second


@functools.lru_cache(maxsize=None)
def deterministic_run():
    return run_unit(tree_speculative_sampling, Candidates(UNIT_TOKENS, UNIT_PARENTS))


def test_tree_sampling_follows_p():
    first, second = deterministic_run()
    assert chisquare_pvalue(first, P[0]) > PASS
    # After an accepted first node, the next token follows p at that node's row.
    assert set(second) == {1, 2, 7}, set(second)  # node 2 (a repeat of node 0) is never accepted
    for row, counts in second.items():
        assert counts.sum() > 500
        assert chisquare_pvalue(counts, P[row]) > PASS, row
    # Token 1 is accepted with p(1), token 3 after rejecting 1 with p(3) / (1 - p(1)), token 4 next.
    p = P[0].tolist()
    expect = {1: p[1], 2: (1 - p[1]) * p[3] / (1 - p[1]), 7: (1 - p[1] - p[3]) * p[4] / (1 - p[1] - p[3])}
    for row, e in expect.items():
        assert float(second[row].sum()) / N_UNIT == pytest.approx(e, abs=0.015)


def test_the_tree_check_rejects_a_wrong_rule():
    first, _ = run_unit(wrong_first_child_then_p, Candidates(UNIT_TOKENS, UNIT_PARENTS), n_samples=N_UNIT // 4)
    assert chisquare_pvalue(first, P[0]) < REJECT


# Sampled drafts: the root's children are drawn i.i.d. from Q (so tokens repeat often).
Q = torch.tensor([0.05, 0.10, 0.10, 0.05, 0.70])


def sampled_tree(gen, width=3):
    tokens = torch.multinomial(Q, width, replacement=True, generator=gen)
    return Candidates(tokens, torch.full((width,), -1), Q.expand(width, V).clone())


def skip_repeats_when_sampled(target_probs, candidates, generator=None):
    """Wrong for sampled drafts: skips a child whose token was already rejected (harmless for
    deterministic drafts, but here it drops that trial's residual update, biasing the output)."""
    tokens = candidates.tokens.tolist()
    p = target_probs[0]
    u = torch.rand(len(tokens), generator=generator).tolist()
    seen = set()
    for c, x in enumerate(tokens):
        if x in seen:
            continue
        q = candidates.draft_probs[c]
        if u[c] * float(q[x]) < float(p[x]):
            return [c], int(torch.multinomial(target_probs[c + 1], 1, generator=generator))
        seen.add(x)
        p = (p - q).clamp_min(0)
        p = p / p.sum()
    return [], int(torch.multinomial(p, 1, generator=generator))


def run_sampled(rule, n_samples, seed=0):
    gen = torch.Generator().manual_seed(seed)
    first = torch.zeros(V)
    for _ in range(n_samples):
        cands = sampled_tree(gen)
        path, nxt = rule(P, cands, gen)
        first[int(cands.tokens[path[0]]) if path else nxt] += 1
    return first


def test_tree_sampling_with_draft_probs_follows_p():
    assert chisquare_pvalue(run_sampled(tree_speculative_sampling, N_UNIT), P[0]) > PASS
    assert chisquare_pvalue(run_sampled(skip_repeats_when_sampled, N_UNIT // 4), P[0]) < REJECT


def test_tree_sampling_edge_cases():
    gen = torch.Generator().manual_seed(0)
    onehot = torch.nn.functional.one_hot(torch.tensor([3, 2, 0, 1, 0, 1, 2, 0]), V).float()
    cands = Candidates(UNIT_TOKENS, UNIT_PARENTS)
    # A one-hot p (greedy): the sampling rule reduces to the greedy rule.
    assert tree_speculative_sampling(onehot, cands, gen) == greedy_verify_tree(onehot, cands) == ([1, 5], 2)
    # No candidates: a plain draw.
    assert tree_speculative_sampling(onehot[:1], Candidates.empty(), gen) == ([], 3)
    # A child with p(x) = 0 is never accepted, and the recovered token is never a rejected one.
    p = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] + [[0.2] * 5] * 3)
    for _ in range(100):
        path, t = tree_speculative_sampling(p, Candidates(torch.tensor([0, 2, 4]), torch.tensor([-1, -1, -1])), gen)
        assert path == [] and t in (1, 3)


def test_greedy_verify_tree_takes_first_matching_child():
    logits = torch.zeros(1 + len(TREE), 10)
    tokens = torch.tensor([4, 4, 6, 7, 6, 1, 2, 3, 5])
    for row, best in enumerate([4, 7, 6, 0, 0, 6, 0, 0, 0, 0]):
        logits[row, best] = 1
    # root -> 4: node 0 (first of the two 4s); its argmax 7 -> node 3, a leaf: next = argmax row 4.
    assert greedy_verify_tree(logits, Candidates(tokens, torch.tensor(TREE))) == ([0, 3], 0)
    logits[0] = 0
    logits[0, 9] = 1
    assert greedy_verify_tree(logits, Candidates(tokens, torch.tensor(TREE))) == ([], 9)


# --------------------------------------------------------------------------------------------
# (d) end to end: sampled tree decoding gives the verifier's exact joint

E2E_VOCAB = 8
TINY = dict(vocab=E2E_VOCAB, hidden=16, layers=1, heads=2, init_range=0.3)
E2E_PROMPT = [3, 5, 6, 1]
E2E_RUNS = 1200


class SampledTreeDrafter:
    """Depth-2 trees: ``width`` children of the root, each with ``width`` children; children are
    drawn i.i.d. from a random q per parent (given as draft_probs), or, when ``deterministic``,
    tokens are random and no q is given."""

    name = "sampled_tree"
    needs_hidden_states = False

    def __init__(self, deterministic: bool, width: int = 2):
        self.deterministic, self.width = deterministic, width

    def start(self, prompt_ids):
        pass

    def propose(self, ctx):
        gen, W = ctx.generator, self.width
        tokens, parents, probs = [], [], []

        def children(parent):
            q = torch.softmax(2 * torch.randn(E2E_VOCAB, generator=gen), -1)
            for t in torch.multinomial(q, W, replacement=True, generator=gen).tolist():
                tokens.append(t)
                parents.append(parent)
                probs.append(q)

        children(-1)
        if ctx.num_draft_tokens >= 2:
            for parent in range(W):
                children(parent)
        return Candidates(torch.tensor(tokens), torch.tensor(parents), None if self.deterministic else torch.stack(probs))

    def observe(self, num_accepted, emitted):
        pass


@functools.lru_cache(maxsize=None)
def e2e_verifier():
    return make_verifier("llama", seed=0, **TINY)


@functools.lru_cache(maxsize=None)
def e2e_tree_samples(deterministic: bool):
    verifier = e2e_verifier()
    decoder = SpeculativeDecoder(verifier, SampledTreeDrafter(deterministic), num_draft_tokens=2, control="fixed")
    sampling = SamplingParams(temperature=1.0)
    counts = torch.zeros((E2E_VOCAB,) * 3)
    accepted = torch.zeros(3)
    for seed in range(E2E_RUNS):
        # The prefill emits x1, the first (tree) step drafts depth 2 and emits x2, x3 at least.
        out = decoder.generate(E2E_PROMPT, max_new_tokens=4, sampling=sampling, seed=seed, eos_token_ids=[])
        assert len(out.token_ids) == 4
        counts[tuple(out.token_ids[:3])] += 1
        accepted[: len(out.stats.accepted_at)] += torch.tensor(out.stats.accepted_at, dtype=torch.float)
    return counts, accepted


@pytest.mark.parametrize("deterministic", [False, True], ids=["draft-probs", "deterministic"])
def test_e2e_tree_sampling_matches_verifier_distribution(deterministic):
    counts, accepted = e2e_tree_samples(deterministic)
    # Paths of depth 1 and 2 were both accepted, often.
    assert accepted[0] > 0.2 * E2E_RUNS and accepted[1] > 0.02 * E2E_RUNS, accepted
    p = exact_joint(e2e_verifier().model, E2E_PROMPT)
    assert chisquare_pvalue(counts, p) > PASS
    assert chisquare_pvalue(counts.sum(0), p.sum(0)) > PASS  # (x2, x3): the tree step's tokens
    # Power: the counts are rejected against another model's joint.
    other = exact_joint(make_model("llama", seed=1, **TINY), E2E_PROMPT)
    assert chisquare_pvalue(counts, other) < REJECT


# --------------------------------------------------------------------------------------------
# (e) the KV cache and hidden states after a tree step


@pytest.mark.parametrize("spine_slot", [0, 2], ids=["first-branch", "later-branch"])
def test_cache_after_tree_step_equals_fresh_prefill(arch, spine_slot):
    verifier = cached_verifier(arch)
    model = verifier.model
    prompt = list(PROMPTS[1])
    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
    tokens = prompt + [first]
    chain = greedy_chain(model, tokens, 3)
    # The verifier's greedy chain sits at `spine_slot` among the root's children, with wrong
    # siblings (and a wrong subtree) before it, so the accepted path is not a prefix of the rows.
    wrong = [(t + 1) % VOCAB for t in chain]
    if spine_slot == 0:
        toks = [chain[0], wrong[0], chain[1], wrong[1], chain[2]]
        parents = [-1, -1, 0, 1, 2]
        path = [0, 2, 4]
    else:
        toks = [wrong[0], (wrong[0] + 5) % VOCAB, chain[0], wrong[1], wrong[1], chain[1], chain[2]]
        parents = [-1, -1, -1, 0, 2, 2, 5]
        path = [2, 5, 6]
    assert chain[0] not in toks[:spine_slot]
    cands = Candidates(torch.tensor(toks), torch.tensor(parents))
    decoder = SpeculativeDecoder(verifier, None)
    with torch.no_grad():
        cache = new_cache(model)
        kw = cache_kwargs(model, cache)
        model(input_ids=torch.tensor([prompt]), **kw, use_cache=True)
        emitted, path, depth, hidden = decoder._tree_step(
            cands, tokens, cache, kw, SamplingParams(), None, torch.device("cpu"), True
        )
        assert (len(path), depth) == (3, 3)
        assert emitted[:3] == chain
        accepted_seq = tokens + chain  # everything except the new pending token emitted[-1]
        fresh = new_cache(model)
        ref = model(input_ids=torch.tensor([accepted_seq]), **cache_kwargs(model, fresh), use_cache=True, output_hidden_states=True)
    assert emitted[-1] == int(ref.logits[0, -1].argmax())
    assert cache.get_seq_length() == fresh.get_seq_length() == len(accepted_seq)
    for mine, theirs in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-5)
    # Hidden states: the rows of [root] + accepted path, the last one predicting the new token.
    assert len(hidden) == len(ref.hidden_states)
    for h, f in zip(hidden, ref.hidden_states):
        torch.testing.assert_close(h, f[0, len(prompt) :], atol=1e-4, rtol=1e-4)


def test_keep_positions():
    from transformers import DynamicCache

    cache = DynamicCache()
    keys = torch.arange(2 * 10, dtype=torch.float).reshape(1, 2, 10, 1)  # positions 0..9 per head
    for layer in range(2):
        cache.update(keys + 100 * layer, -(keys + 100 * layer), layer)
    keep_positions(cache, 4, [0, 2, 5])
    assert cache.get_seq_length() == 7
    for layer in range(2):
        expect = torch.tensor([0, 1, 2, 3, 4, 6, 9]) + 100 * layer
        assert cache.layers[layer].keys[0, 0, :, 0].tolist() == expect.tolist()
        assert cache.layers[layer].values[0, 1, :, 0].tolist() == (-(expect + 10)).tolist()
    keep_positions(cache, 4, [0, 1])  # a prefix: only a crop
    assert cache.get_seq_length() == 6
    with pytest.raises(ValueError):
        keep_positions(cache, 4, [1, 0])
    with pytest.raises(ValueError):
        keep_positions(cache, 4, [0, 5])


def test_tree_hidden_states_given_to_drafter(arch):
    """A tree drafter with needs_hidden_states gets the hidden states of [root] + accepted path."""
    verifier = cached_verifier(arch)
    prompt = PROMPTS[2]
    drafter = RandomTreeDrafter(verifier.model, seed=3, hidden=True)
    out = SpeculativeDecoder(verifier, drafter, num_draft_tokens=3, control="fixed").generate(list(prompt), max_new_tokens=20, eos_token_ids=[EOS])
    assert out.token_ids == list(reference(arch, prompt, N_NEW, EOS))[:20]
    for step, (tokens, hidden) in enumerate(drafter.contexts):
        with torch.no_grad():
            full = verifier.model(input_ids=torch.tensor([tokens[:-1]]), output_hidden_states=True).hidden_states
        m = hidden[0].shape[0]
        if step > 0:
            assert m == drafter.observed[step - 1] + 1
        for h, f in zip(hidden, full):
            torch.testing.assert_close(h, f[0, len(tokens) - 1 - m : len(tokens) - 1], atol=1e-4, rtol=1e-4)
    assert any(n > 0 for n in drafter.observed)
