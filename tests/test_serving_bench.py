"""`bench --engine vllm` (specheads.serving_bench): vLLM's metrics, the concurrency runner, the
whole run against a fake vLLM server (tests/vllm_fake.py), refusals; and one slow run on vLLM itself."""

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specheads.cli import main
from specheads.errors import SpecHeadsError
from specheads.serving_bench import (SpecCounts, ServingConfig, ServedMethod, RunResult, VllmRuntime, make_report, parse_prometheus,
                                     probe_vllm, run_concurrent, vllm_python_candidates)

from tiny_text import CHARS, SPECIAL, char_tokenizer
from vllm_fake import FakeServer, fake_counts, fake_tokens

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"


# -- vLLM's /metrics -------------------------------------------------------------------------------
def test_recorded_vllm_metrics_give_per_position_counts():
    # recorded from vLLM 0.32 (CPU) serving SmolLM2 with {"method": "ngram", "num_speculative_tokens": 3}: before any
    # request, and after three greedy completions (24, 24 and 64 tokens)
    before = SpecCounts.from_metrics((DATA / "vllm-0.32-metrics-before.txt").read_text())
    after = SpecCounts.from_metrics((DATA / "vllm-0.32-metrics-after.txt").read_text())
    assert (before.drafts, before.draft_tokens, before.accepted, before.accepted_per_pos) == (0, 0, 0, [0, 0, 0])
    assert (after.drafts, after.draft_tokens, after.accepted, after.accepted_per_pos) == (14, 42, 11, [4, 4, 3])
    run = after - before
    assert run.tau == pytest.approx(1 + 11 / 14)
    assert run.acceptance_per_position == pytest.approx([4 / 14, 4 / 14, 3 / 14])
    assert SpecCounts().tau is None and SpecCounts().acceptance_per_position == []  # no drafts: nothing to divide


def test_prometheus_text_labels_engines_and_timestamps():
    text = "\n".join([
        "# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.",
        'vllm:spec_decode_num_drafts_total{engine="0",model_name="a \\"q\\" b"} 10.0',
        'vllm:spec_decode_num_drafts_total{engine="1",model_name="x"} 5.0 1712345678000',  # a second engine, a timestamp
        'vllm:spec_decode_num_drafts_created{engine="0",model_name="x"} 1.79e+09',  # not a count
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="1"} 2.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",position="1"} 1.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="0"} 6.0',
        "process_open_fds 34.0",
    ])
    samples = parse_prometheus(text)
    assert samples[0] == ("vllm:spec_decode_num_drafts_total", {"engine": "0", "model_name": 'a "q" b'}, 10.0)
    counts = SpecCounts.from_metrics(text)
    assert counts.drafts == 15 and counts.accepted_per_pos == [6, 3]
    with pytest.raises(SpecHeadsError, match="unreadable line"):
        parse_prometheus("vllm:broken{engine=")


# -- the concurrency runner --------------------------------------------------------------------------
def _send_to(server, max_tokens=5):
    from specheads.serving_bench import _post_json

    def send(i, ids):
        return _post_json(server.url + "/v1/completions", {"model": "verifier", "prompt": ids, "max_tokens": max_tokens,
                                                          "return_token_ids": True}, 10)["choices"][0]["token_ids"]
    return send


@pytest.mark.parametrize("concurrency", [1, 3])
def test_run_concurrent_keeps_at_most_c_in_flight_and_the_order(concurrency):
    prompts = [[5 + i, 9, i] for i in range(7)]
    with FakeServer(delay=0.05) as server:
        outputs, wall = run_concurrent(_send_to(server), prompts, concurrency, progress=False)
    assert outputs == [fake_tokens(p, 5) for p in prompts]
    assert server.max_in_flight == concurrency  # never more; and with 7 slow requests, the bound is reached
    assert server.completions == 7
    assert wall >= 0.05 * 7 / concurrency * 0.9


def test_run_concurrent_stops_at_the_first_failure():
    started = []

    def send(i, ids):
        started.append(i)
        if i == 1:
            raise SpecHeadsError("HTTP 500 from the server")
        time.sleep(0.2)
        return [i]

    t = time.perf_counter()
    with pytest.raises(SpecHeadsError, match="HTTP 500"):
        run_concurrent(send, [[1]] * 20, 2, progress=False)
    assert time.perf_counter() - t < 1.5  # the 18 requests not yet sent are cancelled, not run
    assert len(started) < 20


# -- the report --------------------------------------------------------------------------------------
def test_report_speedup_tau_and_identity_per_concurrency():
    a, b = [1, 2, 3], [4, 5, 6]
    results = {
        "plain": {1: RunResult([a, b], 2.0, None), 4: RunResult([a, [4, 5, 7]], 1.0, None)},
        "speculative[ngram]": {1: RunResult([a, b], 1.0, SpecCounts(4, 12, 6, [4, 2, 0])),
                               4: RunResult([a, b], 0.75, SpecCounts(2, 6, 1, [1, 0, 0]))},
    }
    methods = [ServedMethod("plain"), ServedMethod("speculative[ngram]", "ngram", "ngram", {"method": "ngram"})]
    report = make_report(ServingConfig(model="m", concurrency=(1, 4)), VllmRuntime("py", "0.32.0", "cpu"), methods, results, [[9, 9]] * 2)
    plain, spec = report["methods"]["plain"]["concurrency"], report["methods"]["speculative[ngram]"]["concurrency"]
    assert plain["1"]["speedup"] == 1.0 and plain["4"]["tokens_per_s"] == 6.0
    assert "identical_prompts" not in plain["1"]  # plain at the first concurrency is the reference itself
    assert plain["4"]["identical_prompts"] == 1 and plain["4"]["first_mismatch_positions"] == [2]  # batching changed one output
    assert spec["1"]["speedup"] == 2.0 and spec["1"]["tau"] == 2.5 and spec["1"]["acceptance_per_position"] == [1.0, 0.5, 0.0]
    assert spec["1"]["identical_prompts"] == 2
    assert spec["4"]["speedup"] == 8.0 / 6.0 and spec["4"]["identical_prompts"] == 1  # against plain at concurrency 4
    sampled = make_report(ServingConfig(model="m", concurrency=(1, 4), temperature=0.7), VllmRuntime("py", "0.32.0", "cpu"),
                          methods, results, [[9, 9]] * 2)
    assert "identical_prompts" not in sampled["methods"]["speculative[ngram]"]["concurrency"]["1"]  # sampled: no identity claim


def test_request_body_samples_only_when_asked():
    from specheads.serving_bench import request_body

    greedy = request_body(ServingConfig(max_new_tokens=32, top_k=5), seed=3)
    assert greedy == {"max_tokens": 32, "temperature": 0.0, "ignore_eos": False}  # greedy: no seed, no top-k to send
    sampled = request_body(ServingConfig(max_new_tokens=32, temperature=0.7, top_k=5, top_p=0.9), seed=3, max_tokens=8)
    assert sampled == {"max_tokens": 8, "temperature": 0.7, "ignore_eos": False, "seed": 3, "top_k": 5, "top_p": 0.9}


# -- refusals and the missing vLLM -------------------------------------------------------------------
def _bench(*extra):
    return main(["bench", "--engine", "vllm", "--num-prompts", "2", "--max-new-tokens", "8", *extra])


@pytest.mark.parametrize("drafter, message", [
    ("ngram+suffix", "a hybrid cannot be served by vLLM, which runs one speculative method per engine"),
    ("ngram,runs/x/drafter+ngram", "a hybrid cannot be served by vLLM"),
    ("suffix:corpus.safetensors", "vLLM's suffix method indexes its own requests only"),
    ("no/such/folder", "is none of them"),
])
def test_what_vllm_cannot_serve_is_refused_before_anything_starts(drafter, message, capsys, tmp_path):
    assert _bench("--drafter", drafter, "--vllm-python", "/nonexistent/python", "--output", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert message in err and drafter.split(",")[-1] in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--engine", "vllm", "--control", "fixed"], "--control: options of the specheads engine"),
    (["--engine", "vllm", "--num-draft-tokens", "2"], "--num-draft-tokens: options of the specheads engine"),
    (["--concurrency", "1,4"], "--concurrency: only with --engine vllm"),
    (["--num-speculative-tokens", "2"], "--num-speculative-tokens: only with --engine vllm"),
    (["--engine", "vllm", "--concurrency", "0,4"], "--concurrency must be >= 1"),
])
def test_options_of_the_other_engine_are_refused(args, message, capsys):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_python_without_vllm_is_one_clear_error():
    if "vllm" in sys.modules or any(p == sys.executable for p in vllm_python_candidates()):
        pytest.skip("this Python imports vllm")
    with pytest.raises(SpecHeadsError) as e:
        probe_vllm(sys.executable)
    msg = str(e.value)
    assert "--engine vllm needs a Python that imports vllm" in msg and sys.executable in msg
    assert "No module named 'vllm'" in msg and "--vllm-python" in msg and "scripts/vllm_interop.sh" in msg


# -- the whole run against the fake vLLM -------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    python = root / "fake-vllm-python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "vllm_fake.py"}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(SPECIAL) + len(CHARS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    dirs = {}
    for name in ("verifier", "draft"):  # the fake serves no weights; the draft model is exported for real
        LlamaForCausalLM(config).save_pretrained(root / name)
        char_tokenizer().save_pretrained(root / name)
        dirs[name] = str(root / name)
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": t}) for t in ["what is a hash table?", "count to ten.", "a poem, please.",
                                                                     "why is the sky blue?"]))
    return {"python": str(python), "prompts": str(prompts), **dirs}


def _fake_bench(d, out, drafter, *extra):
    return main(["bench", "--engine", "vllm", "--verifier", d["verifier"], "--vllm-python", d["python"], "--drafter", drafter,
                 "--prompts", d["prompts"], "--max-new-tokens", "12", "--concurrency", "1,3", "--output", str(out), *extra])


def _server_pids(log: Path) -> list[int]:
    return [int(line.split()[3]) for line in log.read_text().splitlines() if line.startswith("fake vLLM pid")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_whole_run_against_a_fake_vllm(fake_setup, tmp_path, capsys):
    assert _fake_bench(fake_setup, tmp_path, f"ngram,suffix,{fake_setup['draft']}", "--num-speculative-tokens", "2",
                       "--dtype", "float32") == 0
    report = json.loads((tmp_path / "report.json").read_text())
    label = "draft_model:draft"
    assert set(report["methods"]) == {"plain", "speculative[ngram]", f"speculative[{label}]"}
    assert report["vllm"]["version"] == "0.32.0+fake" and report["concurrency"] == [1, 3] and report["dtype"] == "float32"
    assert report["methods"]["speculative[ngram]"]["speculative_config"] == {
        "method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    exported = report["methods"][f"speculative[{label}]"]["speculative_config"]
    assert exported["method"] == "draft_model" and exported["num_speculative_tokens"] == 2
    assert (Path(exported["model"]) / "config.json").is_file() and Path(exported["model"]).parent == tmp_path / "vllm_drafters"
    # suffix: reported with the reason, not dropped
    assert "arctic-inference" in report["not_served"]["suffix"] and "No module named 'arctic_inference'" in report["not_served"]["suffix"]
    drafts, accepted = fake_counts(12, 2)  # per request, as the fake counts
    for c in ("1", "3"):
        assert report["methods"]["plain"]["concurrency"][c]["speedup"] == 1.0
        row = report["methods"]["speculative[ngram]"]["concurrency"][c]
        assert row["requests"] == 4 and row["new_tokens"] == 48 and row["identical_prompts"] == 4
        assert row["drafts"] == 4 * drafts  # the warm-up's drafts are not counted
        assert row["tau"] == pytest.approx(1 + sum(accepted) / drafts)
        assert row["acceptance_per_position"] == pytest.approx([a / drafts for a in accepted])
        assert row["speedup"] > 0
    assert report["methods"]["plain"]["concurrency"]["3"]["identical_prompts"] == 4
    table = (tmp_path / "report.md").read_text()
    assert "| speculative[ngram] | 3 |" in table and "- `suffix`: not served: vLLM's suffix method needs the arctic-inference" in table
    assert (tmp_path / "report.png").stat().st_size > 1000
    # every server was started with the serving arguments and is gone
    for name, logs in report["logs"].items():
        for log in logs:
            argv = json.loads(Path(log).read_text().splitlines()[1].split(" argv ", 1)[1])
            assert "--enforce-eager" in argv and argv[argv.index("--max-num-seqs") + 1] == "3"
            assert argv[argv.index("--dtype") + 1] == "float32"
            assert not any(_alive(pid) for pid in _server_pids(Path(log)))


def test_suffix_gets_a_fresh_server_per_concurrency(fake_setup, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_SUFFIX", "1")
    assert _fake_bench(fake_setup, tmp_path, "suffix") == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["not_served"] == {}
    assert [Path(p).name for p in report["logs"]["speculative[suffix]"]] == ["suffix-c1.log", "suffix-c3.log"]
    assert report["methods"]["speculative[suffix]"]["speculative_config"] == {"method": "suffix"}
    assert len(report["methods"]["speculative[suffix]"]["concurrency"]["3"]["acceptance_per_position"]) == 24  # vLLM's depth
    assert "| speculative[suffix] | 3 |" in (tmp_path / "report.md").read_text()
    assert "| 1.00, 0.50, 0 at positions 3-24 |" in (tmp_path / "report.md").read_text()  # the fake accepts 2 of 24


def test_a_server_that_fails_mid_run_is_named_and_stopped(fake_setup, tmp_path, capsys):
    # 1 warm-up + 4 prompts at concurrency 1 answer; the first request at concurrency 3 fails
    assert _fake_bench(fake_setup, tmp_path, "none", "--vllm-args", "--fail-after 5") == 2
    err = capsys.readouterr().err
    assert "plain at concurrency 3: the vLLM server failed (HTTP 500" in err and "fake engine failure" in err
    assert "its log" in err and "fake vLLM pid" in err  # the log's tail
    assert not any(_alive(pid) for pid in _server_pids(tmp_path / "vllm_logs" / "plain.log"))


def test_a_server_that_does_not_start_shows_its_log(fake_setup, tmp_path, capsys):
    assert _fake_bench(fake_setup, tmp_path, "ngram", "--vllm-args=--crash-at-start") == 2
    err = capsys.readouterr().err
    assert "the vLLM server for `plain` exited with status 1 before it was ready" in err
    assert "fake crash: the engine failed to start" in err


def test_ctrl_c_stops_the_server(fake_setup, tmp_path):
    from specheads.serving_bench import VllmServer, _get

    log = tmp_path / "plain.log"
    with pytest.raises(KeyboardInterrupt):
        with VllmServer(probe_vllm(fake_setup["python"]), "model", [], log_path=log, label="plain") as server:
            assert _get(server.url + "/health", 5)[0] == 200
            raise KeyboardInterrupt
    pids = _server_pids(log)
    assert pids and not any(_alive(pid) for pid in pids)


# -- vLLM itself ---------------------------------------------------------------------------------------
def _real_vllm_python():
    try:
        runtime = probe_vllm()
    except SpecHeadsError:
        return None
    return None if runtime.version.endswith("+fake") else runtime


@pytest.mark.slow
def test_vllm_end_to_end_on_smollm2(tmp_path):
    runtime = _real_vllm_python()
    if runtime is None:
        pytest.skip("no Python imports vllm (make .venv-vllm with `bash scripts/vllm_interop.sh`)")
    assert main(["bench", "--engine", "vllm", "--concurrency", "1,2", "--num-prompts", "2", "--max-new-tokens", "16",
                 "--drafter", "ngram", "--dtype", "float32", "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["vllm"]["version"] == runtime.version and report["verifier"] == "smollm2-135m"
    for c in ("1", "2"):
        plain = report["methods"]["plain"]["concurrency"][c]
        spec = report["methods"]["speculative[ngram]"]["concurrency"][c]
        assert plain["requests"] == spec["requests"] == 2
        assert plain["tokens_per_s"] > 0 and spec["tokens_per_s"] > 0 and spec["speedup"] > 0
        assert spec["drafts"] > 0 and len(spec["acceptance_per_position"]) == 3
        assert 1.0 <= spec["tau"] <= 4.0
        assert spec["identical_prompts"] == 2  # float32, greedy: vLLM's speculative decoding is lossless
    assert "| speculative[ngram] | 2 |" in (tmp_path / "report.md").read_text()
