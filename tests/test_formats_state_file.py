"""Tests for rayhooks.formats.state_file: the ``checkpoint`` CheckpointState file."""

import math
import os
import random

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from rayhooks.formats.state_file import CheckpointState, format_state, parse_state


@pytest.fixture(scope="module")
def tf():
    import tensorflow

    return tensorflow


@pytest.fixture(scope="module")
def pb(tf):
    """TF's own CheckpointState proto class and text_format module."""
    from google.protobuf import text_format
    from tensorflow.python.checkpoint.checkpoint_management import CheckpointState as Proto

    return Proto, text_format


def _to_proto(Proto, state):
    return Proto(model_checkpoint_path=state.model_checkpoint_path,
                 all_model_checkpoint_paths=state.all_model_checkpoint_paths,
                 all_model_checkpoint_timestamps=state.all_model_checkpoint_timestamps,
                 last_preserved_timestamp=state.last_preserved_timestamp)


def _from_proto(msg):
    return CheckpointState(msg.model_checkpoint_path, list(msg.all_model_checkpoint_paths),
                           list(msg.all_model_checkpoint_timestamps),
                           msg.last_preserved_timestamp)


_ALPHABET = [chr(i) for i in range(128)] + ["\u00e9", "\u2603", "\U0001f600", "/", "-"] * 5


def _random_state(rng):
    def text(n):
        return "".join(rng.choice(_ALPHABET) for _ in range(n))

    def number():
        kind = rng.randrange(6)
        if kind == 0:
            return rng.choice([0.0, -0.0, math.inf, -math.inf, 1.0, 5e-324, 1.7976931348623157e308])
        if kind == 1:
            return float(rng.randrange(-10**6, 10**6))
        if kind == 2:
            return rng.uniform(1.6e9, 1.8e9)
        return rng.uniform(-1, 1) * 10 ** rng.randrange(-30, 30)

    n = rng.randrange(0, 5)
    return CheckpointState(text(rng.randrange(1, 12)),
                           [text(rng.randrange(0, 8)) for _ in range(n)],
                           [number() for _ in range(rng.randrange(0, 5))],
                           number() if rng.random() < 0.7 else 0.0)


def test_format_matches_text_format_exactly(pb):
    Proto, text_format = pb
    states = [
        CheckpointState("model.ckpt-200", ["model.ckpt-100", "model.ckpt-200"],
                        [1700000000.123456, 1700000100.5], 1699999999.0),
        CheckpointState("ckpt-1", [], [], 0.0),
        CheckpointState('we"ird\\path\n\t\x01\x7f caf\u00e9', ["'"], [1e20, -0.0, math.inf], -0.0),
    ] + [_random_state(random.Random(seed)) for seed in range(200)]
    for state in states:
        assert format_state(state) == text_format.MessageToString(_to_proto(Proto, state))
    assert format_state(states[0]) == (
        'model_checkpoint_path: "model.ckpt-200"\n'
        'all_model_checkpoint_paths: "model.ckpt-100"\n'
        'all_model_checkpoint_paths: "model.ckpt-200"\n'
        "all_model_checkpoint_timestamps: 1700000000.123456\n"
        "all_model_checkpoint_timestamps: 1700000100.5\n"
        "last_preserved_timestamp: 1699999999.0\n")


def test_round_trip_and_agreement_with_tf_parser(pb):
    Proto, text_format = pb
    rng = random.Random(1234)
    for _ in range(300):
        state = _random_state(rng)
        text = format_state(state)
        parsed = parse_state(text)
        assert parsed == state
        # -0.0 == 0.0, so compare signs too.
        signs = [math.copysign(1, t) for t in parsed.all_model_checkpoint_timestamps]
        assert signs == [math.copysign(1, t) for t in state.all_model_checkpoint_timestamps]
        assert parsed == _from_proto(text_format.Parse(text, Proto()))
    nan_state = parse_state(format_state(CheckpointState("a", [], [math.nan], math.nan)))
    assert math.isnan(nan_state.all_model_checkpoint_timestamps[0])
    assert math.isnan(nan_state.last_preserved_timestamp)


def test_tf_reads_our_state_file(tmp_path, tf):
    for step in (100, 200):
        (tmp_path / f"model.ckpt-{step}.index").write_bytes(b"")
    state = CheckpointState("model.ckpt-200", ["model.ckpt-100", "model.ckpt-200"],
                            [1700000000.25, 1700000300.75], 1690000000.5)
    (tmp_path / "checkpoint").write_text(format_state(state), encoding="utf-8")

    got = tf.train.get_checkpoint_state(str(tmp_path))
    assert got.model_checkpoint_path == str(tmp_path / "model.ckpt-200")
    assert list(got.all_model_checkpoint_paths) == [str(tmp_path / "model.ckpt-100"),
                                                    str(tmp_path / "model.ckpt-200")]
    assert list(got.all_model_checkpoint_timestamps) == [1700000000.25, 1700000300.75]
    assert got.last_preserved_timestamp == 1690000000.5
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-200")


def test_parses_state_written_by_checkpoint_manager(tmp_path, tf, pb):
    Proto, text_format = pb
    ckpt = tf.train.Checkpoint(v=tf.Variable(1.0))
    manager = tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=2,
                                         keep_checkpoint_every_n_hours=1000)
    for _ in range(3):
        manager.save()
    text = (tmp_path / "checkpoint").read_text(encoding="utf-8")
    state = parse_state(text, url=str(tmp_path / "checkpoint"))
    assert state.model_checkpoint_path == "ckpt-3"
    assert state.all_model_checkpoint_paths == ["ckpt-2", "ckpt-3"]
    assert len(state.all_model_checkpoint_timestamps) == 2
    assert state == _from_proto(text_format.Parse(text, Proto()))
    assert format_state(state) == text
    assert os.path.join(str(tmp_path), state.model_checkpoint_path) == manager.latest_checkpoint


# Inputs that exercise the less common corners of the text format.  Each is
# checked against protobuf's own parser: both accept with equal results, or
# both reject.
_VARIANTS = [
    "# leading comment\nmodel_checkpoint_path: 'single' \"adjacent\"  # trailing\n",
    'model_checkpoint_path: "a"; all_model_checkpoint_paths: ["x", \'y\'],',
    'model_checkpoint_path: "a"\nall_model_checkpoint_timestamps: [1, 2.5e3, -inf, 1f, nan, .5]',
    'model_checkpoint_path: "a"\nall_model_checkpoint_timestamps: []\nlast_preserved_timestamp: 3',
    'model_checkpoint_path: "a" model_checkpoint_path: "b"',
    'model_checkpoint_path: "\\x41\\101\\u00e9\\U0001F600\\n\\\\"',
    'model_checkpoint_path:"a"\r\nlast_preserved_timestamp:-Infinity\r\n',
    'model_checkpoint_path: "a"\nlast_preserved_timestamp: [1]',
    'model_checkpoint_path: "a"\nall_model_checkpoint_timestamps: "1"',
    'model_checkpoint_path: "a"\nbogus: 1',
    'model_checkpoint_path: "a"\nall_model_checkpoint_paths: [',
    'model_checkpoint_path "a"',
    'model_checkpoint_path: "a',
    'model_checkpoint_path: 5',
    'model_checkpoint_path: "\\777"',
    'model_checkpoint_path: "\\xe9"',
]


@pytest.mark.parametrize("text", _VARIANTS)
def test_parser_agrees_with_protobuf(pb, text):
    Proto, text_format = pb
    try:
        want = _from_proto(text_format.Merge(text, Proto()))
    except text_format.ParseError:
        with pytest.raises(ValueError, match="malformed"):
            parse_state(text)
        return
    got = parse_state(text)
    assert repr(got) == repr(want)  # repr so that nan compares equal to nan


@pytest.mark.parametrize("text, line", [
    ("", 1),
    ("\n\n", 3),
    ("garbage", 1),
    ('model_checkpoint_path: "ok"\n\nunknown_field: "x"\n', 3),
    ('model_checkpoint_path: "ok"\nall_model_checkpoint_timestamps: 1.0.0\n', 2),
    ('model_checkpoint_path: "ok"\nall_model_checkpoint_paths: "unterminated\n', 2),
    ('model_checkpoint_path: "bad \\q escape"', 1),
    ('model_checkpoint_path: "\\377"', 1),
    ('model_checkpoint_path: ""', 1),
    ("model_checkpoint_path: \"a\"\n{\n", 2),
    ("\x00\x01\x02binary", 1),
])
def test_malformed_input_names_url_and_line(text, line):
    url = "gs://bucket/run/checkpoint"
    with pytest.raises(ValueError) as info:
        parse_state(text, url=url)
    message = str(info.value)
    assert message.startswith(f"{url}: malformed checkpoint state file")
    assert f"line {line}:" in message


def test_format_rejects_empty_path():
    with pytest.raises(ValueError, match="model_checkpoint_path"):
        format_state(CheckpointState("", [], [], 0.0))
