"""The calibration store: computed once, reused while its inputs are the same, never trusted when unsound."""

import json

import pytest
import torch
import torch.nn as nn

from tokenbench.measure import calibrations
from tokenbench.reduce import Knob, Method


class Counting(Method):
    """A calibrating method that counts its searches."""

    name = "counting"
    family = "prune"
    needs_calibration = True
    knobs = (Knob("target", (0.5, 0.7), noop=1.0, low=0.0, high=1.0),)
    searches = 0

    def calibrate(self, model, calibration, target=1.0):
        type(self).searches += 1
        return {"counts": [round(10 * target), 3]}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibrations, "shipped_folder", lambda method: tmp_path / "shipped" / method)
    Counting.searches = 0
    torch.manual_seed(0)
    model, data = nn.Linear(4, 2), (torch.randn(6, 4), torch.arange(6) % 2)
    return Counting(), model, data, tmp_path


def the_file(tmp_path):
    (path,) = (tmp_path / "cache" / "calibrations" / "counting").glob("*.json")
    return path


def test_a_calibration_is_computed_once_then_loaded(store):
    method, model, data, tmp_path = store
    first, made = calibrations.calibrated(method, model, data, {"target": 0.5})
    again, loaded = calibrations.calibrated(method, model, data, {"target": 0.5})
    assert first == again == {"counts": [5, 3]} and Counting.searches == 1
    assert made["source"] == "computed" and loaded["source"] == "loaded" and made["key"] == loaded["key"]
    _, forced = calibrations.calibrated(method, model, data, {"target": 0.5}, recalibrate=True)
    assert forced["source"] == "computed" and Counting.searches == 2


def test_the_key_follows_knobs_weights_data_and_version(store):
    method, model, data, _ = store
    key = calibrations.calibrated(method, model, data, {"target": 0.5})[1]["key"]
    other_model = nn.Linear(4, 2)
    keys = {calibrations.calibrated(method, model, data, {"target": 0.7})[1]["key"],
            calibrations.calibrated(method, other_model, data, {"target": 0.5})[1]["key"],
            calibrations.calibrated(method, model, (data[0] + 1, data[1]), {"target": 0.5})[1]["key"]}
    Counting.calibration_version = 2
    try:
        keys.add(calibrations.calibrated(method, model, data, {"target": 0.5})[1]["key"])
    finally:
        del Counting.calibration_version
    assert key not in keys and len(keys) == 4 and Counting.searches == 5


@pytest.mark.parametrize("damage", ["truncated", "edited counts", "another model's file"])
def test_an_unsound_file_is_recomputed_with_a_warning(store, damage, capsys):
    method, model, data, tmp_path = store
    calibrations.calibrated(method, model, data, {"target": 0.5})
    path = the_file(tmp_path)
    text = path.read_text()
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "edited counts":
        record = json.loads(text)
        record["settings"]["counts"][0] = 6  # a hand edit that leaves the checksum as it was
        path.write_text(json.dumps(record))
    else:  # a sound record of another calibration, stored under this key's name
        calibrations.calibrated(method, nn.Linear(4, 2), data, {"target": 0.5})
        other = next(p for p in path.parent.glob("*.json") if p != path)
        path.write_text(other.read_text())
    settings, provenance = calibrations.calibrated(method, model, data, {"target": 0.5})
    assert settings == {"counts": [5, 3]} and provenance["source"] == "computed"
    assert "not a sound calibration" in capsys.readouterr().err
    assert json.loads(path.read_text())["settings"] == {"counts": [5, 3]}  # rewritten sound


def test_a_shipped_calibration_comes_first_and_is_checked_like_any_other(store, capsys):
    method, model, data, tmp_path = store
    path = calibrations.ship(method, model, data, {"target": 0.5}, origin={"model": "linear"})
    assert path.parent == tmp_path / "shipped" / "counting" and Counting.searches == 1
    _, provenance = calibrations.calibrated(method, model, data, {"target": 0.5})
    assert provenance["source"] == "shipped" and Counting.searches == 1
    path.write_text(path.read_text().replace('"settings_sha256": "', '"settings_sha256": "0'))
    _, provenance = calibrations.calibrated(method, model, data, {"target": 0.5})
    assert provenance["source"] == "computed" and "not a sound calibration" in capsys.readouterr().err


def outcome(method_name: str, knobs: dict, settings: dict) -> tuple[float, float]:
    """(mean GMACs as a fraction of the dense embedded model's, top-1 in points) of `settings` applied on the
    digits val split, the data every shipped calibration was made on."""
    from tokenbench.data.registry import load_split
    from tokenbench.measure.budget import dense_gmacs
    from tokenbench.measure.metrics import evaluate
    from tokenbench.models import loading as models
    from tokenbench.reduce.registry import get_method

    method = get_method(method_name)
    model = calibrations.shipped_model(method).model
    images, labels = load_split(model, "digits", "val")
    run = evaluate(method.build(model, **knobs, calibrated=settings), [(images, labels)], torch.device("cpu"))
    dense = dense_gmacs(models.load_model(checkpoint=models.asset(models.EMBEDDED_WEIGHTS["vit_digits"])).model, images)
    return float(run.gmacs.mean() / dense), 100 * run.top1


SHIPPED = sorted(calibrations.shipped_folder("x").parent.glob("*/*.json"))


def test_calibrations_ship_for_each_calibrating_method_s_default_sweep():
    from tokenbench.reduce.registry import all_methods

    shipped = {(p.parent.name, json.dumps(json.loads(p.read_text())["knobs"], sort_keys=True)) for p in SHIPPED}
    calibrating = [m for m in all_methods().values() if m.needs_calibration]
    assert {name for name, _ in shipped} == {m.name for m in calibrating}
    for method in calibrating:  # one file per point of the sweep (its knobs as the key records them)
        assert len([1 for name, _ in shipped if name == method.name]) == len(method.sweep_points())


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_shipped_calibration_is_reproduced_on_this_torch(path, tmp_path, monkeypatch):
    """Recompute a shipped calibration (one thread, as `tokenbench calibrate --write-shipped`) and compare:
    a change to a search, a model or the data that moves it fails here, so it never goes stale silently.

    On the machine and torch that wrote the file the settings must be equal. Elsewhere a search may round
    differently and end at other settings (DiffRate's counts one token apart, a DVT threshold at a neighbouring
    confidence), so there both settings must do the same: mean GMACs within 2% of dense, top-1 within 2 points."""
    from tokenbench.measure.results import cpu_name

    record = json.loads(path.read_text())
    monkeypatch.setattr(calibrations, "shipped_folder", lambda method: tmp_path / method)
    with torch.inference_mode(False):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            written = calibrations.ship_point(path.parent.name, record["knobs"])
        finally:
            torch.set_num_threads(threads)
    assert written.name == path.name, "the same inputs no longer give the same key"
    recomputed = json.loads(written.read_text())["settings"]
    if recomputed == record["settings"]:
        return
    same_place = record.get("machine") == cpu_name() and record["torch"] == torch.__version__
    assert not same_place, f"{recomputed} != {record['settings']} on the machine and torch that wrote it"
    (cost, top1), (cost_now, top1_now) = (outcome(path.parent.name, record["knobs"], settings)
                                          for settings in (record["settings"], recomputed))
    print(f"{path.name} ({record['knobs']}) written on {record.get('machine', 'an unrecorded machine')}, torch "
          f"{record['torch']}: {cost:.4f} x dense, {top1:.2f}%; recomputed here: {cost_now:.4f} x dense, {top1_now:.2f}%")
    assert abs(cost - cost_now) <= 0.02 and abs(top1 - top1_now) <= 2, (
        f"stale (torch {torch.__version__}, {cpu_name()}): shipped {cost:.4f} x dense, {top1:.2f}%; "
        f"recomputed {cost_now:.4f} x dense, {top1_now:.2f}%")


def test_the_cache_command_lists_and_clears(store, capsys):
    from tokenbench.cli import main

    method, model, data, tmp_path = store
    calibrations.calibrated(method, model, data, {"target": 0.7})
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "1 calibrations" in out and "counting {'target': 0.7}" in out
    assert main(["cache", "clear", "--what", "calibrations"]) == 0
    assert not list((tmp_path / "cache").rglob("*.json"))
    _, provenance = calibrations.calibrated(method, model, data, {"target": 0.7})
    assert provenance["source"] == "computed"
