"""`specheads calibrate` and scripts/verify_cost_table.py on a tiny model saved to disk, with the
machine's load faked (busy or quiet); the timings themselves are real. And the load reading itself:
other processes' CPU use, without this process's own."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specheads.cli import main
from tiny_text import CHARS, SPECIAL, char_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_verifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "verifier"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(SPECIAL) + len(CHARS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECHEADS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def calibrate(verifier, *extra):
    return main(["calibrate", "--verifier", verifier, "--device", "cpu", "--threads", "1", "--sizes", "1,2",
                 "--max-seconds", "20", *extra])


def table_rows(out: str) -> dict[int, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) == 8 and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


def test_calibrate_on_a_busy_machine_measures_prints_and_refuses_to_store(tiny_verifier, cache, monkeypatch, capsys):
    monkeypatch.setattr("specheads.machine_store.other_processes_load", lambda: 1.9)
    assert calibrate(tiny_verifier) == 0
    out, err = capsys.readouterr()
    assert "other processes kept 1.90 of" in err and "the machine is busy, so no timing measured now is stored" in err
    assert "not storing the CPU-linears choice" in err and "not storing the verifier cost per token count" in err
    assert "cores busy in the second before measuring" in err
    assert "NOT stored" in out and set(table_rows(out)) == {1, 2}
    assert not (cache / "verify_cost.json").exists() and not (cache / "cpu_linears.json").exists()
    # logits do not depend on load: the tie bound is printed and stored all the same
    (tie,) = json.loads((cache / "tie_bound.json").read_text()).values()
    assert f"tie bound (bench: a difference from plain decoding is a numerical tie below it): {tie['bound']:.3g} = 2 x" in out
    assert tie["positions"] > 100 and tie["bound"] == pytest.approx(2 * tie["max_gap_change"])  # dtype auto: as --dtype chose


def test_calibrate_force_stores_and_writes_markdown(tiny_verifier, cache, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("specheads.machine_store.other_processes_load", lambda: 1.9)
    md = tmp_path / "table.md"
    assert calibrate(tiny_verifier, "--force", "--markdown", str(md)) == 0
    out, err = capsys.readouterr()
    assert "WARNING: storing the verifier cost per token count" in err and "other processes kept 1.90 of" in err
    rows = table_rows(out)
    assert set(rows) == {1, 2} and float(rows[1][1]) <= float(rows[2][1])  # fitted: non-decreasing
    assert float(rows[2][5]) > float(rows[1][5])  # twice the tokens, more FLOPs
    stored = json.loads((cache / "verify_cost.json").read_text())
    (entry,) = stored.values()
    assert set(entry["ms"]) == {"1", "2"} and entry["context"] == 256
    assert (cache / "cpu_linears.json").exists()
    text = md.read_text()
    assert "| q | ms (fitted) |" in text and "\n| 2 |" in text and "stored" in text and "tie bound" in text


def test_calibrate_refuses_bad_sizes(tiny_verifier, cache, capsys):
    assert main(["calibrate", "--verifier", tiny_verifier, "--sizes", "0,2"]) == 2
    assert "--sizes must be token counts >= 1, got '0,2'" in capsys.readouterr().err
    assert main(["calibrate", "--verifier", tiny_verifier, "--sizes", "two"]) == 2
    assert "--sizes must be integers separated by commas, got 'two'" in capsys.readouterr().err


def test_verify_cost_table_script_writes_both_dtypes(tiny_verifier, cache, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("specheads.machine_store.other_processes_load", lambda: 1.9)  # quick: minimum rounds
    spec = importlib.util.spec_from_file_location("verify_cost_table", ROOT / "scripts" / "verify_cost_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "costs.md"
    assert script.main(["--verifier", tiny_verifier, "--sizes", "1,2", "--threads", "1", "--max-seconds", "10",
                        "--output", str(out)]) == 0
    text = out.read_text()
    assert "**float32**" in text and "**bfloat16**" in text and text.count("| q | ms (fitted) |") == 2
    assert "bfloat16, cpu" in text and "NOT stored" in text
    f32, bf16 = text.split("**bfloat16**")
    mb = lambda part: float(next(line for line in part.splitlines() if line.startswith("| 1 |")).split("|")[5])
    assert mb(bf16) == pytest.approx(mb(f32) / 2, rel=0.1)  # half the bytes per weight


def test_the_load_read_counts_other_processes_and_not_this_one():
    """A process spinning beside us counts; this process's own CPU time does not (the demo's own
    training kept the 1-minute load average above 2 for a minute after it ended)."""
    import subprocess
    import sys
    import time

    from specheads.machine_store import other_processes_load

    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 3\nwhile time.time() < t: pass"])
    try:
        time.sleep(0.3)
        assert other_processes_load(window=1.0) > 0.6
    finally:
        spinner.wait()
    # the arithmetic: 3 busy CPU seconds over 2 s of which this process spent 2.5 -> 0.25 cores for others
    ticks = iter([10.0, 13.0]), iter([4.0, 6.5]), iter([100.0, 102.0])
    load = other_processes_load(busy_seconds=lambda: next(ticks[0]), own_cpu=lambda: next(ticks[1]), sleep=lambda s: None,
                                clock=lambda: next(ticks[2]))
    assert load == pytest.approx(0.25)


def test_no_proc_stat_falls_back_to_the_load_average(monkeypatch):
    from specheads import machine_store

    def missing():
        raise OSError("no /proc/stat")

    monkeypatch.setattr(machine_store, "machine_busy_seconds", missing)
    monkeypatch.setattr(machine_store, "load_average", lambda: 3.5)
    assert machine_store.other_processes_load(busy_seconds=missing) is None
    monkeypatch.setattr(machine_store, "other_processes_load", lambda: None)
    assert machine_store.busy_before_measuring(2, 2) == (3.5, "the 1-minute load average was 3.50 on 2 cores")
