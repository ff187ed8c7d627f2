"""The timing loop: its stopping rule (few repeats when timings agree, the maximum when they do not) and its allocator."""

import numpy as np
import torch

from tokenbench.measure.metrics import StoppingRule, interleaved_seconds


def test_the_rule_waits_for_its_minimum_then_for_a_tight_iqr():
    rule = StoppingRule(min_repeats=5, rel_iqr=0.05)
    tight = np.full((5, 2), 1.0) + np.linspace(0, 0.01, 5)[:, None]
    assert not rule.done(tight[:4]) and rule.done(tight)
    noisy = tight.copy()
    noisy[:, 1] = [1.0, 1.3, 0.8, 1.2, 0.9]
    assert not rule.done(noisy)  # one model's spread keeps every model timing


def test_the_loop_stops_early_on_steady_timings_and_records_how_many_ran():
    class Steady(torch.nn.Module):
        def forward(self, x):
            return x * 2

    times, _ = interleaved_seconds([Steady()], torch.ones(4), repeats=50, warmup_rounds=1, warmup_s=0.0,
                                   min_repeat_s=0.002, stop=StoppingRule(min_repeats=5, rel_iqr=1.0))
    assert len(times) == 5  # any spread is tight at rel_iqr = 1: the rule's minimum
    times, _ = interleaved_seconds([Steady()], torch.ones(4), repeats=6, warmup_rounds=1, warmup_s=0.0,
                                   min_repeat_s=0.002, stop=StoppingRule(min_repeats=5, rel_iqr=0.0))
    assert len(times) == 6  # nothing is that tight: the maximum


def test_every_timing_pins_the_allocator_first(monkeypatch):
    """glibc's moving mmap threshold made a forward's time depend on what the process allocated before (every
    speedup 5-17 % lower after the regression gate's builds): the one timing loop pins it, so `bench` and
    `speed` are timed as the gate is."""
    from tokenbench.measure import metrics

    calls = []
    monkeypatch.setattr(metrics, "pin_allocator", lambda: calls.append(len(calls)) or True)
    metrics.interleaved_seconds([torch.nn.Identity()], torch.ones(2), repeats=1, warmup_rounds=1, warmup_s=0.0,
                                min_repeat_s=0.0)
    assert calls == [0]
