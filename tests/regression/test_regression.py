"""The regression gate: its comparison rules, and proof that it catches a method made deliberately slower."""

import json

import pytest

from tokenbench.cli import main
from tokenbench.methods.random_drop import RandomDrop
from tokenbench.methods.topk import ClassAttentionReducer, TopK
from tokenbench.reduce.registry import _REGISTRY, all_methods
from tokenbench.reduce.schedules import default_reduction_blocks
from tokenbench.reduce.vit import TokenReducedViT
from tokenbench.regression import snapshot as reg
from tokenbench.regression import speed_gate as gate

WASTED_MATMULS = 100  # per reduction block: in all about twice the MACs of the dense forward


class WastefulTopKReducer(ClassAttentionReducer):
    """Top-k with a deliberate slowdown: matmuls whose results are thrown away (and not on the ledger)."""

    def decide(self, x, state, info):
        for _ in range(WASTED_MATMULS):
            x.mT @ x
        return super().decide(x, state, info)


class SlowedTopK(TopK):
    """A copy of top-k that keeps the same tokens but spends far more compute doing it."""

    def build(self, model, keep=1.0):
        blocks = default_reduction_blocks(len(model.blocks)) if keep < 1 else ()
        return TokenReducedViT(model, {i: WastefulTopKReducer(keep) for i in blocks})


@pytest.fixture
def slowed_topk(monkeypatch):
    """Registers the slowed copy under the name `topk` (as if a commit had slowed top-k), then restores it."""
    all_methods()  # load the plugins first, so that loading them later cannot collide with the copy
    monkeypatch.setitem(_REGISTRY, "topk", SlowedTopK)
    yield
    monkeypatch.undo()
    assert all_methods()["topk"] is TopK


def quiet(*args):
    pass


def test_speed_gate_fails_a_slowed_method_and_passes_the_unchanged_one(slowed_topk):
    setup = gate.SpeedSetup(batch=8, pairs=5, sample_s=0.03, warmup_s=0.1)
    speeds = gate.measure_speeds({"topk": TopK, "random": RandomDrop}, setup, log=quiet)  # before the "commit"
    baseline = gate.baseline_entry(speeds, setup, calibration_s=1.0)["methods"]
    registered = all_methods()

    report = gate.speed_gate({"topk": registered["topk"], "random": registered["random"]}, baseline, None, setup,
                            log=quiet)

    verdicts = {v.method: v for v in report.verdicts}
    assert report.failed and report.inconclusive is None
    assert verdicts["topk"].failed, verdicts["topk"]
    assert verdicts["topk"].now < 0.8 * verdicts["topk"].baseline
    assert not verdicts["random"].failed, verdicts["random"]


def test_exact_gate_catches_the_slowed_method_s_extra_compute(slowed_topk):
    """The wasted matmuls keep tokens and ledger GMACs unchanged; FlopCounterMode sees them."""
    models = {"vit_digits": 2}
    before = reg.take_snapshot({"topk": TopK}, models)
    after = reg.take_snapshot({"topk": all_methods()["topk"]}, models)

    diff = reg.compare_snapshots(before, after)

    assert [row[:4] for row in diff] == [["vit_digits", "topk", f"keep={k:g}", "fcm_gmacs"]
                                         for k in sorted(TopK.knobs[0].sweep)]
    for row in diff:
        assert float(row[5]) > float(row[4])


def test_compare_snapshots_lists_every_difference():
    entry = {"tokens": [65.0, 65.0], "gmacs": 0.1, "fcm_gmacs": 0.09}
    expected = {"m": {"a": {"k=1": entry, "k=2": entry}, "b": {"-": entry}, "gone": {"-": entry}}}
    actual = {"m": {"a": {"k=1": entry, "k=3": entry}, "b": {"-": {**entry, "tokens": [65.0, 33.0]}},
                    "new": {"-": entry}}}

    assert reg.compare_snapshots(expected, actual) == [
        ["m", "a", "k=2", "*", "(in snapshot)", "sweep point gone"],
        ["m", "a", "k=3", "*", "(not in snapshot)", "new sweep point"],
        ["m", "b", "-", "tokens", "[65 65]", "[65 33]"],
        ["m", "new", "*", "*", "(not in snapshot)", "new method"],
    ]
    assert reg.compare_snapshots(expected, {"m": {"a": expected["m"]["a"]}}) == []
    assert reg.compare_snapshots(expected, {"m": {"b": {"-": {**entry, "gmacs": 0.1 * (1 + 1e-12)}}}}) == []


def speed(speedup, knobs=None):
    return gate.Speed(knobs if knobs is not None else {"keep": 0.7}, speedup, 0.02, 15, 10.0, 10.0 / speedup)


@pytest.mark.parametrize("baseline, now, status", [
    (1.50, 1.21, "ok"),  # a 19% drop is inside the 20% band
    (1.50, 1.19, "SLOWER (> 20% drop)"),
    (1.50, 1.81, "faster"),
    (1.05, 0.95, "ok"),  # never clearly faster than dense, so being slower is noise
    (1.12, 0.99, "SLOWER than dense"),  # expected faster, now slower than dense
])
def test_judge_rules(baseline, now, status):
    verdict = gate.judge("m", speed(now), {"knobs": {"keep": 0.7}, "speedup": baseline})
    assert verdict.status == status
    assert verdict.failed == status.startswith("SLOWER")


def test_judge_does_not_gate_what_it_cannot_compare():
    assert gate.judge("m", speed(0.5), None).status.startswith("no baseline")
    assert gate.judge("m", speed(0.5), {"knobs": {"keep": 0.5}, "speedup": 2.0}).status.startswith("baseline timed at")
    skipped = gate.judge("m", "needs trained weights", {"knobs": {}, "speedup": 2.0})
    assert skipped.status == "skipped: needs trained weights" and not skipped.failed
    # Another device's baseline: only "slower than dense" counts.
    assert gate.judge("m", speed(1.05), {"knobs": {"keep": 0.7}, "speedup": 2.0}, tolerance=None).status == "ok"
    assert gate.judge("m", speed(0.9), {"knobs": {"keep": 0.7}, "speedup": 2.0}, tolerance=None).failed


def test_a_loaded_machine_is_inconclusive_not_a_failure(monkeypatch):
    calibrations = iter([0.010, 0.020, 0.030])  # baseline 0.010 s; every attempt more than 1.5x slower
    monkeypatch.setattr(gate, "calibration_seconds", lambda: next(calibrations) * 2)
    monkeypatch.setattr(gate, "measure_speeds", lambda *a, **k: pytest.fail("measured on a loaded machine"))
    sleeps = []
    monkeypatch.setattr(gate.time, "sleep", sleeps.append)

    report = gate.speed_gate({"topk": TopK}, {}, 0.010, retries=2, wait_s=5, log=quiet)

    assert report.inconclusive and not report.failed
    assert report.calibration_s == [0.020, 0.040, 0.060] and sleeps == [5, 5]


def test_a_failure_is_measured_again_before_it_counts(monkeypatch):
    rounds = iter([{"topk": speed(1.0)}, {"topk": speed(1.45)}])  # a noisy first round, then normal
    asked = []

    def measure(methods, setup, pairs=None, log=None):
        asked.append(pairs)
        return next(rounds)

    monkeypatch.setattr(gate, "calibration_seconds", lambda: 0.010)
    monkeypatch.setattr(gate, "measure_speeds", measure)
    baseline = {"topk": {"knobs": {"keep": 0.7}, "speedup": 1.5}}

    report = gate.speed_gate({"topk": TopK}, baseline, 0.010, log=quiet)

    assert not report.failed and [v.status for v in report.verdicts] == ["ok"]
    assert asked == [None, 2 * gate.SpeedSetup().pairs]


def test_cli_exact_part_update_then_check_then_detect_an_edit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reg, "SNAPSHOT_MODELS", {"vit_digits": 2})
    snapshot = tmp_path / "snapshot.json"
    args = ["regression", "--part", "exact", "--methods", "none,topk", "--snapshot", str(snapshot)]

    assert main(args + ["--update"]) == 0
    assert main(args) == 0
    stored = json.loads(snapshot.read_text())
    assert sorted(stored["models"]["vit_digits"]) == ["none", "topk"]
    assert stored["models"]["vit_digits"]["topk"]["keep=0.5"]["tokens"] == [65] * 4 + [33] * 3 + [17] * 3 + [9] * 2
    stored["models"]["vit_digits"]["topk"]["keep=0.5"]["tokens"][-1] = 10
    snapshot.write_text(json.dumps(stored))
    capsys.readouterr()

    assert main(args) == 1
    out = capsys.readouterr().out
    assert "exact: FAILED, 1 value(s) differ" in out
    assert any(line.split()[:4] == ["vit_digits", "topk", "keep=0.5", "tokens"] for line in out.splitlines())
    assert "--update --part exact" in out


def test_the_speed_part_times_in_a_fresh_process_before_the_exact_part(monkeypatch):
    """The exact part's builds leave the allocator in a state that lowers measured speedups by up to 17 %: the
    gate times first, as `--part speed` alone (which records the baseline) does."""
    from tokenbench.cli import regression as command

    ran = []
    monkeypatch.setattr(command, "exact_part", lambda *a: ran.append("exact") or True)
    monkeypatch.setattr(command, "speed_part", lambda *a: ran.append("speed") or True)
    assert main(["regression", "--methods", "none"]) == 0
    assert ran == ["speed", "exact"]


def test_speeds_are_timed_with_the_allocator_pinned(monkeypatch):
    """glibc's moving mmap threshold made a method's speedup depend on what the process allocated before (LTMP
    0.46-0.63x over fresh processes): every measurement pins it first, and pinning works on this Linux."""
    import sys
    from dataclasses import replace

    pinned = []
    monkeypatch.setattr(gate, "pin_allocator", lambda: pinned.append(True) or True)
    gate.measure_speeds({"none": all_methods()["none"]}, replace(gate.SpeedSetup(), pairs=1), log=lambda *a: None)
    assert pinned == [True]
    monkeypatch.undo()
    assert gate.pin_allocator() == sys.platform.startswith("linux")


def test_cli_rejects_unknown_methods(capsys):
    assert main(["regression", "--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


class NeedsTrainedPart(TopK):
    """A method that needs training: build() refuses a backbone its training hook has not prepared."""

    needs_training = True

    def training_loss(self, model, **knobs):
        model.trained_part = True
        return super().training_loss(model, **knobs)

    def build(self, model, keep=1.0):
        if not getattr(model, "trained_part", False):
            raise reg.BenchError("needs its trained part")
        return super().build(model, keep)


def test_methods_that_need_training_are_snapshotted_with_fresh_parts_on_a_copy(tiny_vit):
    images = reg.random_images(tiny_vit, 2)

    with reg.threads(1):
        entry = reg.snapshot_entry(NeedsTrainedPart(), tiny_vit, images, {"keep": 0.5})
        plain = reg.snapshot_entry(TopK(), tiny_vit, images, {"keep": 0.5})

    assert entry["tokens"] == [65] * 4 + [33] * 3 + [17] * 3 + [9] * 2
    assert entry == plain
    assert not hasattr(tiny_vit, "trained_part")  # the shared backbone is left as it was


@pytest.mark.parametrize("last_calibration, outcome", [(0.010, "failed"), (0.020, "inconclusive")])
def test_a_confirmed_slowdown_fails_unless_the_machine_was_loaded_meanwhile(monkeypatch, last_calibration, outcome):
    calibrations = iter([0.010, 0.010, last_calibration])  # before, before the re-measurement, after it
    monkeypatch.setattr(gate, "calibration_seconds", lambda: next(calibrations))
    monkeypatch.setattr(gate, "measure_speeds", lambda *a, **k: {"topk": speed(0.9)})
    baseline = {"topk": {"knobs": {"keep": 0.7}, "speedup": 1.5}}

    report = gate.speed_gate({"topk": TopK}, baseline, 0.010, retries=0, log=quiet)

    assert report.failed == (outcome == "failed")
    assert (report.inconclusive is not None) == (outcome == "inconclusive")
    assert [v.status for v in report.verdicts] == ["SLOWER than dense"]


def test_dvt_is_snapshotted_with_its_shipped_cascade_on_real_digits():
    """Early exit on real images: a tighter budget exits earlier, the full budget runs every stage."""
    snapshot = reg.take_snapshot({"dvt": all_methods()["dvt"]}, {"vit_digits": 4, "deit_small_patch16_224": 1})
    points = snapshot["vit_digits"]["dvt"]
    assert points["cost=1 criterion=confidence"]["tokens"] == [17] * 4 + [37] * 4 + [65] * 4
    gmacs = [points[f"cost={c:g} criterion=confidence"]["gmacs"] for c in (0.15, 0.2, 0.3, 0.4, 1.0)]
    assert gmacs == sorted(gmacs) and gmacs[0] < gmacs[-1] / 4
    assert "ships no weights" in snapshot["deit_small_patch16_224"]["dvt"]["cost=1 criterion=confidence"]["error"]
    assert snapshot == reg.take_snapshot({"dvt": all_methods()["dvt"]}, {"vit_digits": 4, "deit_small_patch16_224": 1})


def test_the_snapshot_is_found_from_the_working_directory_not_the_package(tmp_path, monkeypatch):
    """An installed tokenbench reads and writes the snapshot of the project it is run in, never site-packages."""
    project = tmp_path / "project"
    (project / "results" / "regression").mkdir(parents=True)
    (project / "src" / "deep").mkdir(parents=True)
    assert reg.regression_folder(project / "src" / "deep") == project / "results" / "regression"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert reg.regression_folder() == elsewhere / "results" / "regression"
