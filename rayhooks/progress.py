"""Progress bars for the waits a user sits through: uploads at the end of a run, restore downloads.

A bar appears only once a wait has lasted `DELAY_SECS`, and by default only on
a terminal (tqdm's own rule), so logs and CI output stay clean. Set
`RAYHOOKS_PROGRESS=0` to turn bars off everywhere, or `RAYHOOKS_PROGRESS=1` to
show them on any stream (a notebook, a log file).
"""

import os
import sys

DELAY_SECS = 1.0


def _disable():
    setting = os.environ.get("RAYHOOKS_PROGRESS", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return True
    if setting in ("1", "true", "yes", "on"):
        return False
    return None  # tqdm: show on a terminal only


def byte_bar(desc: str, total: int, file=None, delay=None):
    """A tqdm bar counting bytes, shown after `delay` seconds (`DELAY_SECS`); `.update(n)`, then `.close()`."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                delay=DELAY_SECS if delay is None else delay,
                file=file if file is not None else sys.stderr, disable=_disable(), dynamic_ncols=True,
                leave=True)


class CountingWriter:
    """A file object that reports each write's size to `on_bytes`."""

    def __init__(self, fileobj, on_bytes):
        self._f = fileobj
        self._on_bytes = on_bytes

    def write(self, data):
        n = self._f.write(data)
        self._on_bytes(len(data))
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)


class CountingReader:
    """A file object that reports each read's size to `on_bytes`."""

    def __init__(self, fileobj, on_bytes):
        self._f = fileobj
        self._on_bytes = on_bytes

    def read(self, *args):
        data = self._f.read(*args)
        self._on_bytes(len(data))
        return data

    def readinto(self, buffer):
        n = self._f.readinto(buffer)
        self._on_bytes(n or 0)
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)
