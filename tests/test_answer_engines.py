"""Self-distillation through a serving engine (``data.self_distill.engine``): an OpenAI-compatible
server (tests/openai_fake.py, a tiny HF model behind /v1/completions on 127.0.0.1) writes the
same records as ``model.generate`` here, multi-turn included, with ids returned or text only,
over one or two endpoints; failures are retried, then named, and a rerun resumes; a server of
another model is refused before any request; bad recipe values are refused at load.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from tokenizers import decoders
from transformers import LlamaConfig, LlamaForCausalLM

from openai_fake import FakeOpenAIServer, closed_port_url
from specheads.errors import SpecHeadsError
from specheads.training.answer_engines import EngineOptions
from specheads.training.data import generate_self_distillation, last_run_stats, load_self_distilled
from specheads.training.recipe import load_recipe
from specheads.verifier import Verifier
from tiny_text import CHARS, SPECIAL, char_tokenizer

EOS = 2
PROMPTS = [
    "what is a hash table?",
    "write a poem about rain.",
    {"user_turns": ["count to ten.", "now count back."]},
    "hi",
    {"user_turns": ["list three fruits.", "which is sweetest?", "why?"]},
    "explain why the sky is blue, in two short sentences please.",
]
FIELDS = ("prompt_id", "messages", "input_ids", "prompt_length")
FAST = dict(request_timeout=10.0, max_retries=2, retry_backoff=0.01)


def tiny_verifier(seed: int = 0, name: str = "tiny-0", fused: bool = False) -> Verifier:
    """A tiny Llama with the character tokenizer; ``fused``: its decode joins characters without
    spaces, so text round-trips to the same ids (the plain one puts a space between tokens)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(SPECIAL) + len(CHARS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                      bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS)
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 1.5  # some answers stop early, others run to max_new_tokens
    tok = char_tokenizer()
    if fused:
        tok.backend_tokenizer.decoder = decoders.Fuse()
    return Verifier(model=model, tokenizer=tok, name=name)


@pytest.fixture(scope="module")
def verifier():
    return tiny_verifier()


def run(verifier, out, engine="hf", prompts=PROMPTS, **kw):
    kw = {"max_new_tokens": 10, "batch_size": 2, "shard_size": 2, "progress": False, **kw}
    return generate_self_distillation(verifier, prompts, out, engine=engine, **kw)


def openai(*servers, **options):
    return EngineOptions(endpoints=[s.url for s in servers], **{"concurrency": 3, **FAST, **options})


def rows(ds):
    return [{k: ds[i][k] for k in FIELDS} for i in range(len(ds))]


@pytest.fixture(scope="module")
def hf_records(verifier, tmp_path_factory):
    return rows(run(verifier, tmp_path_factory.mktemp("hf") / "sd"))


def test_openai_records_equal_hf_records_multi_turn_included(verifier, hf_records, tmp_path):
    """At T=0 the server's answers, stored through engine openai, are the hf engine's records
    exactly: the same prompt ids (chat template applied here), answers and messages."""
    with FakeOpenAIServer(verifier, model_id=verifier.name) as server:
        got = rows(run(verifier, tmp_path / "sd", "openai", engine_options=openai(server)))
        requests = server.answered
    assert got == hf_records
    assert any(r["input_ids"][-1] == EOS for r in got) and any(r["input_ids"][-1] != EOS for r in got)
    assert len(got[4]["messages"]) == 6  # three user turns, each answered after the verifier's own answer
    assert requests == 4 + 2 + 3  # one request per answered turn
    stats = last_run_stats(tmp_path / "sd")
    assert stats["engine"] == "openai" and stats["endpoints"] == [server.url] and stats["served_model"] == verifier.name
    assert stats["token_ids"]["from_engine"] == requests and stats["token_ids"]["from_text"] == 0
    # The char tokenizer decodes "ab" as "a b": answers of two characters or more do not round-trip through text.
    assert 0 < stats["token_ids"]["round_trip_same"] < requests
    manifest = json.loads((tmp_path / "sd" / "manifest.json").read_text())
    assert {s["engine"] for s in manifest["shards"]} == {"openai"}


def test_two_endpoints_with_several_requests_in_flight_give_the_same_records(verifier, hf_records, tmp_path):
    with FakeOpenAIServer(verifier, model_id=verifier.name, delay=0.05) as a, \
            FakeOpenAIServer(verifier, model_id=verifier.name, delay=0.05) as b:
        got = rows(run(verifier, tmp_path / "sd", "openai", shard_size=6, engine_options=openai(a, b, concurrency=4)))
        assert a.answered > 0 and b.answered > 0  # spread over both
        assert a.max_in_flight + b.max_in_flight > 2  # requests really overlapped
    assert got == hf_records


def exact_from_text(verifier, server) -> int:
    """How many of the server's answers its text gives back exactly (eos appended when it stopped)."""
    tok = verifier.tokenizer
    return sum(tok.encode(text, add_special_tokens=False) + ids[-1:] * (ids[-1:] == [EOS]) == ids for ids, text in server.answers)


def test_text_only_server_is_retokenised_and_the_round_trip_counted(tmp_path, capsys):
    """A server that returns only text: the text is encoded here (eos appended when the answer
    stopped), and the answers whose text round-trips are counted (those without a special token,
    which text drops, with a tokenizer that decodes without spaces). Records whose answers all
    round-trip equal hf's; the others differ, as counted."""
    fused = tiny_verifier(fused=True)
    expected = rows(run(fused, tmp_path / "hf"))
    with FakeOpenAIServer(fused, model_id=fused.name, return_ids=False) as server:
        got = rows(run(fused, tmp_path / "fused", "openai", engine_options=openai(server), progress=True))
        n, exact = server.answered, exact_from_text(fused, server)
    counts = last_run_stats(tmp_path / "fused")["token_ids"]
    assert counts == {"from_engine": 0, "from_text": n, "round_trip_same": exact, "round_trip_checked": n}
    assert n - 2 <= exact < n  # one answer (or two) holds <unk>, which decode drops
    assert f"{n} re-tokenised from its text (round trip exact for {exact}/{n} = " in capsys.readouterr().err
    differ = sum(a != b for a, b in zip(got, expected))
    assert 1 <= differ <= n - exact

    spaced = tiny_verifier()
    with FakeOpenAIServer(spaced, model_id=spaced.name, return_ids=False) as server:
        rows(run(spaced, tmp_path / "spaced", "openai", engine_options=openai(server)))
        n, exact = server.answered, exact_from_text(spaced, server)
    counts = last_run_stats(tmp_path / "spaced")["token_ids"]
    assert counts["from_text"] == n and counts["round_trip_same"] == exact < n / 2  # "ab" decodes as "a b"


def test_failing_endpoint_is_named_shards_are_kept_and_a_rerun_resumes(verifier, hf_records, tmp_path):
    out = tmp_path / "sd"
    with FakeOpenAIServer(verifier, model_id=verifier.name, fail_after=3) as server:
        with pytest.raises(SpecHeadsError, match=rf"endpoint {server.url}: completions failed after 3 tries: HTTP 500.*rerun resumes"):
            run(verifier, out, "openai", engine_options=openai(server, concurrency=1))
    kept = load_self_distilled(out)
    assert 0 < len(kept) < len(PROMPTS)
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]
    with FakeOpenAIServer(verifier, model_id=verifier.name) as healthy:
        got = rows(run(verifier, out, "openai", engine_options=openai(healthy)))
    assert got == hf_records
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert runs[-1]["skipped_already_stored"] == len(kept)


def test_transient_errors_are_retried(verifier, hf_records, tmp_path):
    with FakeOpenAIServer(verifier, model_id=verifier.name, flaky_every=3) as server:
        got = rows(run(verifier, tmp_path / "sd", "openai", engine_options=openai(server)))
    assert got == hf_records
    assert last_run_stats(tmp_path / "sd")["retries"] >= 3


def test_timeout_and_a_down_endpoint_are_named(verifier, tmp_path):
    with FakeOpenAIServer(verifier, model_id=verifier.name, delay=1.0) as slow:
        options = openai(slow, request_timeout=0.2, max_retries=1)
        with pytest.raises(SpecHeadsError, match=rf"endpoint {slow.url}: completions failed after 2 tries: no answer within request_timeout=0.2"):
            run(verifier, tmp_path / "slow", "openai", engine_options=options)
    down = closed_port_url()
    with pytest.raises(SpecHeadsError, match=rf"endpoint {down}: models failed after 3 tries: cannot connect"):
        run(verifier, tmp_path / "down", "openai", engine_options=EngineOptions(endpoints=[down], **FAST))
    assert load_self_distilled(tmp_path / "down").num_rows == 0


def test_endpoint_serving_another_model_is_refused_before_any_request(verifier, tmp_path):
    with FakeOpenAIServer(verifier, model_id="meta-llama/Llama-3.1-8B-Instruct") as server:
        with pytest.raises(SpecHeadsError, match=r"serves 'meta-llama/Llama-3.1-8B-Instruct', not the recipe's verifier 'tiny-0'"
                                                 r".*served_model"):
            run(verifier, tmp_path / "a", "openai", engine_options=openai(server))
        with pytest.raises(SpecHeadsError, match=r"not the recipe's verifier 'tiny-0' under the name data.self_distill.served_model='other'"):
            run(verifier, tmp_path / "b", "openai", engine_options=openai(server, served_model="other"))
        assert server.posts == 0
        # The same weights served under another name: named by served_model, accepted.
        run(verifier, tmp_path / "c", "openai", prompts=PROMPTS[:2],
            engine_options=openai(server, served_model="meta-llama/Llama-3.1-8B-Instruct"))
        assert server.answered == 2


def test_endpoint_serving_the_verifiers_folder_is_accepted(tmp_path):
    """vllm serve DIR reports DIR as the model's root: it names a verifier loaded from DIR."""
    folder = tmp_path / "verifier"
    folder.mkdir()
    verifier = tiny_verifier(name=str(folder))
    with FakeOpenAIServer(verifier, model_id="served-name", root=str(folder) + "/") as server:
        run(verifier, tmp_path / "sd", "openai", prompts=PROMPTS[:1], engine_options=openai(server))
    assert last_run_stats(tmp_path / "sd")["served_model"] == "served-name"


def test_sampled_answers_are_seeded_per_request(verifier, tmp_path):
    """At T > 0 each request carries a seed fixed by the run's seed, prompt and turn: a rerun, and a
    run resumed after a failure, store the same answers."""
    with FakeOpenAIServer(verifier, model_id=verifier.name) as server:
        first = rows(run(verifier, tmp_path / "a", "openai", temperature=0.9, top_p=0.9, engine_options=openai(server)))
        seeds = list(server.seeds)
        again = rows(run(verifier, tmp_path / "b", "openai", temperature=0.9, top_p=0.9, engine_options=openai(server)))
    assert again == first and len(set(seeds)) == len(seeds)
    with FakeOpenAIServer(verifier, model_id=verifier.name, fail_after=4) as broken:
        with pytest.raises(SpecHeadsError):
            run(verifier, tmp_path / "c", "openai", temperature=0.9, top_p=0.9, engine_options=openai(broken, concurrency=1))
    with FakeOpenAIServer(verifier, model_id=verifier.name) as server:
        assert rows(run(verifier, tmp_path / "c", "openai", temperature=0.9, top_p=0.9, engine_options=openai(server))) == first


def test_a_folder_resumes_with_another_engine_and_records_which_wrote_each_shard(verifier, hf_records, tmp_path):
    out = tmp_path / "sd"
    run(verifier, out, prompts=PROMPTS[:2])
    with FakeOpenAIServer(verifier, model_id=verifier.name) as server:
        got = rows(run(verifier, out, "openai", engine_options=openai(server)))
    assert got == hf_records
    shards = json.loads((out / "manifest.json").read_text())["shards"]
    assert [s["engine"] for s in shards] == ["hf", "openai", "openai"]
    with pytest.raises(SpecHeadsError, match="generated with settings"):  # other answers: refused, as with hf
        run(verifier, out, "openai", max_new_tokens=11, engine_options=openai(server))


def test_server_context_limit_counts_as_too_long(verifier, tmp_path):
    with FakeOpenAIServer(verifier, model_id=verifier.name, max_model_len=36) as server:
        run(verifier, tmp_path / "sd", "openai", prompts=PROMPTS[:2], engine_options=openai(server))
    stats = last_run_stats(tmp_path / "sd")
    assert stats["skipped_too_long"] == 1 and stats["prompts"] == 1  # 27 prompt tokens + 10 new > 36; 24 + 10 fit


def test_vllm_engine_without_vllm_names_the_alternative(verifier, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm fails
    with pytest.raises(SpecHeadsError, match=r"import vllm.*fails.*vllm serve.*engine: openai"):
        run(verifier, tmp_path / "sd", "vllm")


def test_feature_capture_is_hf_only(verifier, tmp_path):
    with pytest.raises(SpecHeadsError, match="engine hf only, not openai"):
        run(verifier, tmp_path / "sd", "openai", capture=(None, [1], 64), engine_options=EngineOptions(endpoints=["http://127.0.0.1:9/v1"]))


@pytest.mark.parametrize("overrides, named", [
    (["data.self_distill.engine=tgi"], r"data.self_distill.engine='tgi' is not an answer engine \(choose hf, openai, vllm\)"),
    (["data.self_distill.engine=openai"], r"data.self_distill.endpoints=None: engine openai needs at least one endpoint"),
    (["data.self_distill.engine=openai", "data.self_distill.endpoints=[]"], r"data.self_distill.endpoints=\[\]: engine openai"),
    (["data.self_distill.engine=openai", "data.self_distill.endpoints=[http://a:1/v1]", "data.self_distill.concurrency=0"],
     r"data.self_distill.concurrency=0 must be an integer >= 1"),
    (["data.self_distill.engine=openai", "data.self_distill.endpoints=[localhost:8000]"],
     r"data.self_distill.endpoints\[0\]='localhost:8000' is not an http\(s\) URL"),
    (["data.self_distill.engine=openai", "data.self_distill.endpoints=[http://a:1/v1, 'http://b:99999/v1']"],
     r"data.self_distill.endpoints\[1\]='http://b:99999/v1' is not an http\(s\) URL"),
    (["data.self_distill.endpoints=[http://a:1/v1]"], r"data.self_distill.endpoints=\['http://a:1/v1'\] is for engine openai, not hf"),
    (["data.self_distill.engine=openai", "data.self_distill.endpoints=[http://a:1/v1]", "data.self_distill.request_timeout=0"],
     r"data.self_distill.request_timeout=0.0 must be a number > 0"),
    (["data.self_distill.prompts=[]"], r"data.self_distill.prompts=\[\] must be a prompt source or a non-empty list"),
])
def test_bad_engine_settings_are_refused_at_recipe_load(overrides, named):
    with pytest.raises(SpecHeadsError, match=named):
        load_recipe(None, overrides)


def test_engine_settings_load_from_a_recipe():
    recipe = load_recipe(None, ["data.self_distill.engine=openai", "data.self_distill.endpoints=[http://gpu1:8000, https://gpu2/v1/]",
                                "data.self_distill.concurrency=64", "data.self_distill.api_key_env=MY_KEY"])
    s = recipe.data.self_distill
    assert s.engine == "openai" and s.endpoints == ["http://gpu1:8000/v1", "https://gpu2/v1"] and s.concurrency == 64
    assert s.engine_options().api_key_env == "MY_KEY"


def test_api_key_comes_from_the_named_environment_variable(verifier, tmp_path, monkeypatch):
    monkeypatch.delenv("SPECHEADS_TEST_KEY", raising=False)
    with FakeOpenAIServer(verifier, model_id=verifier.name) as server:
        with pytest.raises(SpecHeadsError, match="SPECHEADS_TEST_KEY, which is not set"):
            run(verifier, tmp_path / "a", "openai", engine_options=openai(server, api_key_env="SPECHEADS_TEST_KEY"))
        monkeypatch.setenv("SPECHEADS_TEST_KEY", "secret")
        run(verifier, tmp_path / "b", "openai", prompts=PROMPTS[:1], engine_options=openai(server, api_key_env="SPECHEADS_TEST_KEY"))
        assert server.authorization == "Bearer secret"
    assert "secret" not in (tmp_path / "b" / "manifest.json").read_text()


def test_eagle3_recipe_on_an_openai_engine_trains_with_features_computed_in_the_first_epoch(verifier, tmp_path, capsys):
    """Features are captured during generation by engine hf only; with another engine the
    recipe still trains, and its first epoch computes and stores the features of every
    conversation the server wrote (later epochs read them)."""
    from specheads.training.features import FeatureStore, tokens_key
    from specheads.training.loop import train

    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS if isinstance(p, str))
                      + "".join(json.dumps({"prompt": f"say {w} twice."}) + "\n" for w in ("yes", "no", "maybe", "rain")))
    with FakeOpenAIServer(verifier, model_id=verifier.name) as server:
        recipe = load_recipe(None, [
            f"training.output_dir={tmp_path / 'run'}", "drafter.kind=eagle3", "drafter.aux_layer_ids=[1, 2, 2]",
            "objective.ttt_steps=2", "training.batch_size=2", "training.max_steps=8", "training.eval_every=8",
            "training.save_every=8", "training.cache_hidden_states=true", "training.dtype=float32", "data.eval_fraction=0.25",
            f"data.self_distill.output_dir={tmp_path / 'sd'}", f"data.self_distill.prompts={source}",
            "data.self_distill.max_new_tokens=8", "data.self_distill.engine=openai", f"data.self_distill.endpoints=[{server.url}]",
        ])
        train(recipe, verifier=verifier, progress=False)
    assert "engine=openai does not capture the verifier's features while it generates: the first training epoch computes them" \
        in capsys.readouterr().out
    assert (tmp_path / "run" / "drafter" / "model.safetensors").is_file()
    store = FeatureStore(recipe.training.hidden_cache_path(), verifier, [1, 2, 2])
    records = load_self_distilled(tmp_path / "sd")
    assert len(records) == 8 and all(store.has(tokens_key(ids)) for ids in records["input_ids"])
