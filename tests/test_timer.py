"""Tier 1: SecondOrStepTimer's trigger arithmetic, with a fake clock."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import random
import types

import pytest

import rayhooks as rh


def test_manual_clock_moves_only_when_told():
    clock = rh.ManualClock(5.0)
    assert clock() == 5.0
    assert clock() == 5.0
    clock.advance(2.5)
    assert clock() == 7.5


@pytest.mark.parametrize("kwargs", [{"every_steps": 10}, {"every_secs": 10.0}])
def test_first_call_triggers(kwargs):
    timer = rh.SecondOrStepTimer(clock=rh.ManualClock(), **kwargs)
    assert timer.last_triggered_step() is None
    assert timer.should_trigger_for_step(0)
    assert timer.should_trigger_for_step(123)  # any step, before any trigger


@pytest.mark.parametrize("kwargs", [{"every_steps": 1}, {"every_secs": 0}, {"every_secs": 1.0}])
def test_same_step_never_triggers_twice(kwargs):
    clock = rh.ManualClock()
    timer = rh.SecondOrStepTimer(clock=clock, **kwargs)
    timer.update_last_triggered_step(5)
    clock.advance(1e6)
    assert not timer.should_trigger_for_step(5)
    assert timer.should_trigger_for_step(6)


def test_every_steps_arithmetic():
    clock = rh.ManualClock()
    timer = rh.SecondOrStepTimer(every_steps=10, clock=clock)
    timer.update_last_triggered_step(0)
    clock.advance(1e9)  # the clock is irrelevant to a step timer
    assert [s for s in range(1, 25) if timer.should_trigger_for_step(s)] == list(range(10, 25))
    assert timer.next_step_trigger() == 10
    timer.update_last_triggered_step(13)
    assert timer.next_step_trigger() == 23
    assert not timer.should_trigger_for_step(22)
    assert timer.should_trigger_for_step(23)
    assert timer.last_triggered_step() == 13


def test_every_secs_arithmetic():
    clock = rh.ManualClock(100.0)
    timer = rh.SecondOrStepTimer(every_secs=10.0, clock=clock)
    timer.update_last_triggered_step(0)
    clock.advance(9.5)
    assert not timer.should_trigger_for_step(1000)  # steps do not matter to a seconds timer
    clock.advance(0.5)
    assert timer.should_trigger_for_step(1)  # exactly every_secs later: >=
    assert timer.next_step_trigger() is None


def test_update_returns_elapsed_since_last_trigger():
    clock = rh.ManualClock(1000.0)
    timer = rh.SecondOrStepTimer(every_steps=3, clock=clock)
    assert timer.update_last_triggered_step(2) == (None, None)
    clock.advance(4.25)
    assert timer.update_last_triggered_step(9) == (4.25, 7)
    clock.advance(0.5)
    assert timer.update_last_triggered_step(10) == (0.5, 1)
    assert timer.last_triggered_step() == 10


def test_reset_forgets_the_last_trigger():
    timer = rh.SecondOrStepTimer(every_steps=100, clock=rh.ManualClock())
    timer.update_last_triggered_step(7)
    assert not timer.should_trigger_for_step(8)
    timer.reset()
    assert timer.last_triggered_step() is None
    assert timer.should_trigger_for_step(8)
    assert timer.update_last_triggered_step(8) == (None, None)


def test_constructor_errors_match_tensorflow():
    import tensorflow as tf
    cases = [{}, {"every_secs": 1, "every_steps": 1}]
    for kwargs in cases:
        with pytest.raises(ValueError) as ours:
            rh.SecondOrStepTimer(**kwargs)
        with pytest.raises(ValueError) as theirs:
            tf.compat.v1.train.SecondOrStepTimer(**kwargs)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match=r"^Either every_secs or every_steps should be provided\.$"):
        rh.SecondOrStepTimer()
    with pytest.raises(ValueError, match=r"^Can not provide both every_secs and every_steps\.$"):
        rh.SecondOrStepTimer(every_secs=2, every_steps=3)


def test_never_trigger_timer():
    timer = rh.NeverTriggerTimer()
    assert not timer.should_trigger_for_step(0)
    assert timer.update_last_triggered_step(5) == (None, None)
    assert timer.last_triggered_step() is None
    assert timer.next_step_trigger() is None


def _random_program(rng):
    """A random sequence of (advance_secs, step, force_update) calls."""
    program, step = [], rng.randrange(0, 5)
    for _ in range(rng.randrange(20, 80)):
        step += rng.choice([0, 0, 1, 1, 1, 2, 3, 7])
        advance = rng.choice([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, rng.random() * 5])
        program.append((advance, step, rng.random() < 0.1))
    return program


@pytest.mark.parametrize("seed", range(40))
def test_matches_tensorflow_timer_on_random_sequences(monkeypatch, seed):
    """Same decisions and same elapsed values as TF's timer, given the same clock."""
    from tensorflow.python.training import basic_session_run_hooks as tf_hooks

    rng = random.Random(seed)
    clock = rh.ManualClock(rng.choice([0.0, 1_700_000_000.0]))
    monkeypatch.setattr(tf_hooks, "time", types.SimpleNamespace(time=clock))
    if rng.random() < 0.5:
        kwargs = {"every_steps": rng.choice([1, 2, 3, 5, 10])}
    else:
        kwargs = {"every_secs": rng.choice([0, 0.5, 1.0, 2.0, 3.7])}
    ours = rh.SecondOrStepTimer(clock=clock, **kwargs)
    theirs = tf_hooks.SecondOrStepTimer(**kwargs)
    triggers = 0
    for i, (advance, step, force) in enumerate(_random_program(rng)):
        clock.advance(advance)
        decision = ours.should_trigger_for_step(step)
        assert decision == theirs.should_trigger_for_step(step), (i, step, clock())
        if decision or force:
            triggers += decision
            assert ours.update_last_triggered_step(step) == theirs.update_last_triggered_step(step)
        assert ours.last_triggered_step() == theirs.last_triggered_step()
    assert triggers >= 1
