"""TensorFlow's ``checkpoint`` state file, without TensorFlow or protobuf.

Every TF checkpoint directory holds a small file named ``checkpoint``: a
``CheckpointState`` protocol buffer in text format, which is how
``tf.train.latest_checkpoint`` and ``tf.train.CheckpointManager`` find the
newest checkpoint and the ones still kept::

    model_checkpoint_path: "model.ckpt-200"
    all_model_checkpoint_paths: "model.ckpt-100"
    all_model_checkpoint_paths: "model.ckpt-200"
    all_model_checkpoint_timestamps: 1700000000.123456
    all_model_checkpoint_timestamps: 1700000100.5
    last_preserved_timestamp: 1699999999.0

Paths are prefixes (no ``.index`` suffix), relative to the directory when the
checkpoints live inside it.  ``format_state`` reproduces the output of
``google.protobuf.text_format.MessageToString`` exactly; ``parse_state``
accepts what TF's text-format parser accepts for this message (comments,
either quote style, adjacent string literals, list syntax for repeated fields,
inf/nan), and rejects anything else, including unknown fields.
"""

from __future__ import annotations

import dataclasses
import math
import re

__all__ = ["CheckpointState", "format_state", "parse_state"]


@dataclasses.dataclass
class CheckpointState:
    model_checkpoint_path: str
    all_model_checkpoint_paths: list[str]
    all_model_checkpoint_timestamps: list[float]
    last_preserved_timestamp: float = 0.0


# protobuf's CEscape with as_utf8=True (MessageToString's default): printable
# ASCII stays except quotes and backslash, other ASCII becomes a 3-digit octal
# escape, and non-ASCII characters are written as themselves (UTF-8 on disk).
_ESCAPES = {i: chr(i) if 32 <= i < 127 else "\\%03o" % i for i in range(128)}
_ESCAPES.update({9: r"\t", 10: r"\n", 13: r"\r", 34: r"\"", 39: r"\'", 92: r"\\"})


def _quote(s: str) -> str:
    return '"' + s.translate(_ESCAPES) + '"'


def _is_default_double(x: float) -> bool:
    # proto3 omits a double only when it is +0.0 bit for bit; -0.0 is printed.
    return x == 0.0 and math.copysign(1.0, x) > 0


def format_state(state: CheckpointState) -> str:
    """Serializes ``state`` exactly as TF's ``text_format.MessageToString`` does."""
    if not state.model_checkpoint_path:
        raise ValueError("CheckpointState.model_checkpoint_path must not be empty")
    # text_format prints doubles with Python's str(), so repr-style shortest form.
    lines = [f"model_checkpoint_path: {_quote(state.model_checkpoint_path)}"]
    lines += [f"all_model_checkpoint_paths: {_quote(p)}"
              for p in state.all_model_checkpoint_paths]
    lines += [f"all_model_checkpoint_timestamps: {float(t)}"
              for t in state.all_model_checkpoint_timestamps]
    if not _is_default_double(float(state.last_preserved_timestamp)):
        lines.append(f"last_preserved_timestamp: {float(state.last_preserved_timestamp)}")
    return "\n".join(lines) + "\n"


# The same token shapes as protobuf's text_format tokenizer: numbers are taken
# greedily and validated later, so "-inf" or "1e5f" are single tokens.
_TOKEN = re.compile(r"""
    (?P<space>[ \t\r\f\v]+|\#[^\n]*)
  | (?P<newline>\n)
  | (?P<ident>[A-Za-z_][0-9A-Za-z_+-]*)
  | (?P<number>(?:[0-9+-]|\.[0-9])[0-9A-Za-z_.+-]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<punct>[:\[\],;])
""", re.VERBOSE)
_INF = re.compile(r"-?inf(inity)?f?", re.IGNORECASE)
_NAN = re.compile(r"nanf?", re.IGNORECASE)

_SIMPLE_ESCAPES = {"n": 10, "t": 9, "r": 13, "a": 7, "b": 8, "f": 12, "v": 11,
                   "\\": 92, "'": 39, '"': 34, "?": 63}
_ESCAPE = re.compile(r"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|u([0-9a-fA-F]{4})"
                     r"|U([0-9a-fA-F]{8})|(.))", re.DOTALL)

# CheckpointState's fields: name -> (is a string field, is repeated).
_FIELDS = {
    "model_checkpoint_path": (True, False),
    "all_model_checkpoint_paths": (True, True),
    "all_model_checkpoint_timestamps": (False, True),
    "last_preserved_timestamp": (False, False),
}


class _Malformed(Exception):
    def __init__(self, line: int, detail: str):
        super().__init__(detail)
        self.line = line


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens, pos, line = [], 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _Malformed(line, f"unexpected character {text[pos]!r}")
        kind = m.lastgroup
        if kind == "newline":
            line += 1
        elif kind != "space":
            tokens.append((kind, m.group(), line))
        pos = m.end()
    tokens.append(("end", "", line))
    return tokens


def _unescape(literal: str, line: int) -> bytes:
    out = bytearray()
    body, pos = literal[1:-1], 0
    for m in _ESCAPE.finditer(body):
        out += body[pos:m.start()].encode("utf-8")
        octal, hex2, u4, u8, other = m.groups()
        if octal or hex2:
            byte = int(octal, 8) if octal else int(hex2, 16)
            if byte > 0xFF:
                raise _Malformed(line, f"octal escape \\{octal} out of range in {literal}")
            out.append(byte)
        elif u4 or u8:
            try:
                out += chr(int(u4 or u8, 16)).encode("utf-8")
            except (ValueError, UnicodeEncodeError):
                raise _Malformed(line, f"invalid unicode escape in {literal}") from None
        elif other in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[other])
        else:
            raise _Malformed(line, f"invalid escape \\{other} in {literal}")
        pos = m.end()
    out += body[pos:].encode("utf-8")
    return bytes(out)


def _parse_double(tok: str, line: int) -> float:
    # Mirrors protobuf's text_format.ParseFloat.
    try:
        return float(tok)
    except ValueError:
        pass
    if _INF.fullmatch(tok):
        return -math.inf if tok.startswith("-") else math.inf
    if _NAN.fullmatch(tok):
        return math.nan
    try:
        return float(tok.rstrip("fF"))
    except ValueError:
        raise _Malformed(line, f"expected a number, got {tok!r}") from None


class _Parser:
    def __init__(self, tokens: list[tuple[str, str, int]]):
        self.tokens, self.i = tokens, 0

    def peek(self) -> tuple[str, str, int]:
        return self.tokens[self.i]

    def take(self) -> tuple[str, str, int]:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, text: str) -> None:
        _, tok, line = self.take()
        if tok != text:
            raise _Malformed(line, f"expected {text!r}, got {tok or 'end of file'!r}")

    def value(self, is_string: bool):
        kind, tok, line = self.take()
        if is_string:
            if kind != "string":
                raise _Malformed(line, f"expected a quoted string, got {tok or 'end of file'!r}")
            raw = _unescape(tok, line)
            while self.peek()[0] == "string":  # adjacent literals concatenate
                raw += _unescape(self.take()[1], line)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _Malformed(line, "string is not valid UTF-8") from None
        if kind not in ("number", "ident"):
            raise _Malformed(line, f"expected a number, got {tok or 'end of file'!r}")
        return _parse_double(tok, line)


def parse_state(text: str, url: str = "<state>") -> CheckpointState:
    """Parses a ``checkpoint`` state file; raises ValueError naming ``url`` and line."""
    state = CheckpointState("", [], [], 0.0)
    try:
        p = _Parser(_tokenize(text))
        while p.peek()[0] != "end":
            kind, name, line = p.take()
            if kind != "ident":
                raise _Malformed(line, f"expected a field name, got {name!r}")
            if name not in _FIELDS:
                raise _Malformed(line, f"unknown field {name!r}")
            is_string, repeated = _FIELDS[name]
            p.expect(":")
            # Punctuation never collides with other tokens' text (strings keep
            # their quotes), so comparing text alone is enough below.
            if repeated and p.peek()[1] == "[":
                p.take()
                values = []
                if p.peek()[1] != "]":
                    values.append(p.value(is_string))
                    while p.peek()[1] == ",":
                        p.take()
                        values.append(p.value(is_string))
                p.expect("]")
            else:
                values = [p.value(is_string)]
            if repeated:
                getattr(state, name).extend(values)
            else:
                # text_format.Merge (what TF uses) lets a later value win.
                setattr(state, name, values[0])
            if p.peek()[1] in (",", ";"):
                p.take()
        if not state.model_checkpoint_path:
            raise _Malformed(p.peek()[2], "model_checkpoint_path is missing or empty")
    except _Malformed as e:
        raise ValueError(f"{url}: malformed checkpoint state file at line {e.line}: {e}") from None
    return state
