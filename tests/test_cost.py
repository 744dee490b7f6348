"""The verifier's cost per token count (specheads.decoding.cost) on a noisy, shared machine: the
fitted curve is non-decreasing and close to the true one, a busy or unsettled measurement is not
stored (and is said), a corrupt store is measured again with a message, and the online refinement
follows a persistent change but not an outlier."""

from __future__ import annotations

import json

import pytest

from conftest import FakeMachine, make_model
from specheads.decoding.cost import CONTEXT, SIZES, CostCurve, device_key, fit_nondecreasing, measure_verify_cost, verify_cost_curve
from specheads.errors import SpecHeadsError

FEW = (1, 2, 3, 4, 6, 8, 12, 16)


def true_ms(q: int) -> float:
    """Memory-bound (nearly flat) up to 8 tokens, then compute-bound (linear): the CPU's shape."""
    return 40.0 + 0.5 * q if q <= 8 else 44.0 + 4.0 * (q - 8)


def assert_close_to_truth(curve_ms: dict[int, float], rel: float, scale: float = 1.0):
    qs = sorted(curve_ms)
    assert all(curve_ms[a] <= curve_ms[b] for a, b in zip(qs, qs[1:])), curve_ms
    for q in qs:
        assert curve_ms[q] == pytest.approx(scale * true_ms(q), rel=rel), (q, curve_ms)


def test_fit_nondecreasing_pools_adjacent_violators():
    # The quiet-machine pass of issue 16: q=1 64, q=2 57, q=3 73, q=4 64, q=5 99 ms.
    assert fit_nondecreasing({1: 64, 2: 57, 3: 73, 4: 64, 5: 99}) == {1: 60.5, 2: 60.5, 3: 68.5, 4: 68.5, 5: 99.0}
    assert fit_nondecreasing({3: 1.0, 1: 0.5, 2: 0.7}) == {1: 0.5, 2: 0.7, 3: 1.0}  # already monotone: unchanged
    assert fit_nondecreasing({1: 10, 2: 4}, weights={1: 1, 2: 2}) == {1: 6.0, 2: 6.0}  # the weighted mean
    assert fit_nondecreasing({1: 9, 2: 8, 3: 7, 4: 1}) == {q: 6.25 for q in range(1, 5)}


def test_cost_curve_interpolates_extrapolates_and_refuses_bad_input():
    curve = CostCurve({1: 10.0, 2: 12.0, 4: 20.0, 3: 11.0})  # q=3 below q=2: fitted
    assert curve.points == {1: 10.0, 2: 11.5, 3: 11.5, 4: 20.0}
    assert curve(3) == 11.5 and curve(4) == 20.0
    assert curve(6) == pytest.approx(20.0 + 2 * 8.5)  # the last segment's slope
    assert CostCurve({2: 5.0, 8: 5.0})(1) == 5.0 and CostCurve({2: 5.0, 8: 5.0})(64) == 5.0  # flat, never below the last
    assert CostCurve({1: 7.0})(30) == 7.0
    assert CostCurve({2: 4.0, 4: 8.0})(3) == 6.0
    for bad, match in [({}, "non-empty"), ({0: 1.0}, "token count 0"), ({1: -2.0}, "q=1 has -2.0 ms"),
                       ({1: float("nan")}, "q=1 has nan"), ({1: "fast"}, "q=1 has 'fast'"), ({1.5: 2.0}, r"integers, got \[1.5\]")]:
        with pytest.raises(SpecHeadsError, match=match):
            CostCurve(bad)
    with pytest.raises(SpecHeadsError, match="token count 0 must be >= 1"):
        curve(0)
    with pytest.raises(SpecHeadsError, match="-1.0 s"):
        curve.observe(2, -1.0)


def test_observe_ignores_outliers_and_follows_a_persistent_change():
    base = {q: true_ms(q) for q in SIZES}
    curve = CostCurve(base)
    for _ in range(4):  # another process wakes up for four forwards in a row
        curve.observe(3, 10 * true_ms(3) / 1e3)
    assert curve.points == pytest.approx(base)

    curve = CostCurve(base)
    steps = 0
    while curve(3) < 1.4 * true_ms(3):  # the machine is 1.5x slower from now on
        curve.observe(3, 1.5 * true_ms(3) / 1e3)
        steps += 1
        assert steps <= 10, "a persistent change must be followed within a few observations of that q"
    assert steps == 5
    for q in (1, 2, 4, 6, 16, 64):  # q not observed follow the observed one
        assert curve(q) == pytest.approx(1.5 * true_ms(q), rel=0.02), q
    for _ in range(9):
        curve.observe(3, 1.5 * true_ms(3) / 1e3)
    for _ in range(4):  # outliers among the slow forwards change nothing either
        curve.observe(3, 100.0)
        assert curve(3) == pytest.approx(1.5 * true_ms(3))
    qs = sorted(curve.points)
    assert all(curve.points[a] <= curve.points[b] for a, b in zip(qs, qs[1:]))
    curve.observe(7, 1.5 * true_ms(7) / 1e3)  # a q between the calibrated ones joins the curve
    assert 7 in curve.points and curve(7) == pytest.approx(1.5 * true_ms(7), rel=0.02)


def test_observe_keeps_the_curve_nondecreasing_when_one_q_gets_cheaper():
    curve = CostCurve({1: 40.0, 2: 41.0, 4: 42.0, 8: 44.0, 16: 76.0})
    for _ in range(9):
        curve.observe(4, 0.030)  # longer forwards measured cheap (e.g. a shorter real context)
        curve.observe(8, 0.060)
    qs = sorted(curve.points)
    assert all(curve.points[a] <= curve.points[b] for a, b in zip(qs, qs[1:])), curve.points
    assert curve(4) < 40.0 and curve(8) == pytest.approx(60.0)


def measure(machine, sizes=FEW, **kw):
    model = make_model("llama")
    machine.attach(model)
    return model, measure_verify_cost(model, sizes, context=16, **machine.timing(), **kw)


def test_a_noisy_measurement_with_outliers_settles_close_to_the_truth():
    machine = FakeMachine(true_ms, noise=0.06, outliers=0.1, outlier=3.0)
    _, m = measure(machine)
    assert m.stable and m.refusal is None and 5 <= m.rounds < 50
    assert set(m.ms) == set(FEW) and all(s > 0 for s in m.spread.values())
    assert_close_to_truth(fit_nondecreasing(m.ms), rel=0.08)


def test_a_machine_that_keeps_slowing_down_never_settles_and_says_so():
    machine = FakeMachine(true_ms, noise=0.03, drift=1.01)  # 1% slower after every forward
    _, m = measure(machine, max_rounds=12)
    assert not m.stable and m.rounds == 12
    assert "moved" in m.refusal and "after 12 rounds" in m.refusal and "spread up to" in m.refusal
    fitted = fit_nondecreasing(m.ms)
    scale = fitted[1] / true_ms(1)  # the sizes are interleaved: the drift hits all alike
    assert_close_to_truth(fitted, rel=0.12, scale=scale)


def test_a_busy_load_takes_the_minimum_rounds_and_is_refused():
    machine = FakeMachine(true_ms, noise=0.02, load=7.5)
    _, m = measure(machine, cores=2)
    assert m.rounds == 5 and "load average was 7.50 on 2 cores" in m.refusal
    assert_close_to_truth(fit_nondecreasing(m.ms), rel=0.06)


def test_a_process_starved_of_cpu_is_refused():
    machine = FakeMachine(true_ms, noise=0.02, cpu_share=0.3)
    _, m = measure(machine)
    assert m.stable and "got 30% of the CPU time its 1 thread could use" in m.refusal


def curve_of(machine, store, capsys, **kw):
    model = make_model("llama")
    machine.attach(model)
    curve = verify_cost_curve(model, store=store, sizes=FEW, **machine.timing(), **kw)
    return model, curve, capsys.readouterr().err


def test_a_quiet_measurement_is_stored_and_reused(tmp_path, capsys):
    store = tmp_path / "verify_cost.json"
    machine = FakeMachine(true_ms, noise=0.05, outliers=0.1)
    model, curve, err = curve_of(machine, store, capsys)
    assert curve.source == "measured" and "measuring the verifier's forward cost" in err and "not storing" not in err
    assert_close_to_truth(curve.points, rel=0.08)
    entry = json.loads(store.read_text())[device_key(model)]
    assert entry["context"] == CONTEXT and entry["measurement"]["stable"] is True
    forwards = machine.forwards
    again = verify_cost_curve(model, store=store, sizes=FEW, **machine.timing())
    assert again.source == "stored" and again.points == pytest.approx(curve.points, rel=1e-3) and machine.forwards == forwards
    assert verify_cost_curve(model, store=store, sizes=FEW, remeasure=True, **machine.timing()).source == "measured"
    assert machine.forwards > forwards
    # a curve stored for fewer sizes than asked for is measured again
    verify_cost_curve(model, store=store, sizes=(1, 2, 100), **machine.timing())
    assert "no value for q=100" in capsys.readouterr().err


@pytest.mark.parametrize("machine, said", [
    (FakeMachine(true_ms, noise=0.02, load=50.0), "load average was 50.00"),
    (FakeMachine(true_ms, noise=0.02, cpu_share=0.2), "got 20% of the CPU time"),
    (FakeMachine(true_ms, noise=0.03, drift=1.01), "the medians still moved"),
], ids=["load", "cpu-share", "unsettled"])
def test_a_busy_or_unsettled_measurement_is_not_stored(tmp_path, capsys, machine, said):
    store = tmp_path / "verify_cost.json"
    _, curve, err = curve_of(machine, store, capsys, max_rounds=10)
    assert not store.exists() and curve.source == "measured (not stored)"
    assert "not storing the verifier cost per token count" in err and said in err and "spread up to" in err
    qs = sorted(curve.points)
    assert all(curve.points[a] <= curve.points[b] for a, b in zip(qs, qs[1:]))
    # --force keeps it anyway, with a warning
    _, forced, err = curve_of(machine, store, capsys, max_rounds=10, force=True)
    assert store.exists() and forced.source == "measured" and "WARNING: storing" in err and said in err


def valid_entry():
    return {"ms": {str(q): true_ms(q) for q in FEW}, "context": CONTEXT, "measurement": {"stable": True}}


@pytest.mark.parametrize("corrupt, said", [
    ("{not json", "is unreadable"),
    ("[1, 2]", "holds a JSON list"),
    (lambda e: {str(q): true_ms(q) for q in FEW}, "an older specheads stored it"),  # the old flat format
    (lambda e: {**e, "ms": {**e["ms"], "3": 101.0, "4": 64.0}}, "not non-decreasing: q=3 101.0 ms, q=4 64.0 ms"),
    (lambda e: {**e, "ms": {**e["ms"], "2": "fast"}}, "q=2 has 'fast' ms"),
    (lambda e: {**e, "ms": {**e["ms"], "1": -1.0}}, "q=1 has -1.0 ms"),
    (lambda e: {**e, "ms": {k: v for k, v in e["ms"].items() if k != "16"}}, "no value for q=16"),
    (lambda e: {**e, "ms": {**e["ms"], "x": 1.0}}, "are not all integers"),
    (lambda e: {**e, "context": 64}, "cache of 64 tokens"),
], ids=["json", "list", "old-format", "non-monotone", "type", "negative", "missing", "key", "context"])
def test_a_corrupt_store_is_measured_again_with_a_message(tmp_path, capsys, corrupt, said):
    store = tmp_path / "verify_cost.json"
    model = make_model("llama")
    if callable(corrupt):
        store.write_text(json.dumps({device_key(model): corrupt(valid_entry()), "other machine": {"kept": True}}))
    else:
        store.write_text(corrupt)
    machine = FakeMachine(true_ms, noise=0.02)
    machine.attach(model)
    curve = verify_cost_curve(model, store=store, sizes=FEW, **machine.timing())
    err = capsys.readouterr().err
    assert said in err and "measuring" in err and curve.source == "measured", err
    assert_close_to_truth(curve.points, rel=0.05)
    known = json.loads(store.read_text())
    assert verify_cost_curve(model, store=store, sizes=FEW, **machine.timing()).source == "stored"
    if callable(corrupt):
        assert known["other machine"] == {"kept": True}  # other entries survive


def test_the_key_names_which_linears_stream():
    from specheads.streamed_linear import stream_linears

    model = make_model("llama")
    packed = device_key(model)
    assert "linears=packed" in packed and "float32" in packed and packed.endswith("|cpu")
    stream_linears(model, head_rows=range(2, 9), layer_rows=[2, 4])
    assert "linears=head:2-8,layers:2+4" in device_key(model)


def test_a_real_tiny_forward_is_measured_on_the_real_clock():
    m = measure_verify_cost(make_model("gpt2"), sizes=(1, 4), context=8, load=lambda: 0.0, max_rounds=4, max_seconds=5)
    assert set(m.ms) == {1, 4} and all(v > 0 for v in m.ms.values()) and m.rounds <= 4
    assert m.cpu_share is not None and m.cpu_share > 0
