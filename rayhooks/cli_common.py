"""What the `rayhooks` commands share: argument types, output helpers, and opening a URL."""

import argparse
import datetime
import json
import re
import sys
from typing import List, Optional, Tuple

PROG = "rayhooks"


class UsageError(Exception):
    """A mistake in what the user asked for: exit code 2, one line on stderr."""


def storage_option(text: str) -> Tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE, got %r" % text)
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key, parsed


def step_arg(text: str) -> int:
    try:
        step = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected an integer step, got %r" % text) from None
    if step < 0:
        raise argparse.ArgumentTypeError("a step is >= 0, got %d" % step)
    return step


_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def age_arg(text: str) -> float:
    """'90s', '30m', '12h', '2d' or plain seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhd]?)\s*", text.lower())
    if m is None or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError("expected an age such as 90s, 30m, 12h or 2d, got %r" % text)
    return float(m.group(1)) * _AGE_UNITS[m.group(2)]


def human_size(nbytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    n = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return "%d B" % n if unit == "B" else "%.1f %s" % (n, unit)
        n /= 1024
    raise AssertionError("unreachable")


def utc_iso(timestamp: Optional[float]) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def table(rows: List[List[str]], right: Tuple[int, ...] = ()) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def progress_bar(args, **kwargs):
    """A bar on stderr: on a terminal only, as a training run's (`RAYHOOKS_PROGRESS`); never with -q."""
    from tqdm import tqdm
    from rayhooks import progress
    return tqdm(file=sys.stderr, disable=True if args.quiet else progress._disable(), dynamic_ncols=True, **kwargs)


def open_storage(args):
    """The Storage at args.url; UsageError if the URL's protocol is unknown or the directory is missing."""
    from rayhooks.storage import Storage
    storage = Storage(args.url, dict(args.storage_option or []))
    storage.fs  # resolves the protocol: ValueError/ImportError with the URL and a fix
    if not storage.exists(""):
        raise UsageError("%s does not exist; check the URL (and --storage-option credentials)" % args.url)
    if storage.fs.isfile(storage._path("")):
        raise UsageError("%s is a file, not a directory; pass the run's directory" % args.url)
    return storage


def open_store(args):
    """The CheckpointStore at args.url; UsageError if it is not a checkpoint directory."""
    from rayhooks.checkpoints import MANIFEST_SUFFIX, STATE_FILE, CheckpointStore
    storage = open_storage(args)
    store = CheckpointStore(storage, basename=args.basename)
    names = storage.listdir()
    pattern = re.compile(re.escape(args.basename) + r"-(\d+)\..*$")
    if STATE_FILE in names or any(pattern.fullmatch(n) for n in names):
        try:
            if not any(n.endswith(MANIFEST_SUFFIX) for n in names):  # malformed ones: verify reports them
                store.refuse_foreign()
        except FileExistsError:
            state = store._read_state()
            raise UsageError("%s holds TF checkpoints that rayhooks did not write (latest: %s, no manifests): "
                             "rayhooks reads only its own; read these with tf.train.load_checkpoint(%r)"
                             % (args.url, state.model_checkpoint_path, args.url)) from None
        return store
    hint = "pass the directory the checkpoints were saved to (checkpoint_dir)"
    others = sorted({n[:-len(MANIFEST_SUFFIX)].rsplit("-", 1)[0] for n in names
                     if n.endswith(MANIFEST_SUFFIX) and "-" in n})
    if others:
        hint = "its manifests use basename %s: pass --basename %s" % (", ".join(others), others[0])
    else:
        inside = checkpoint_dirs_in(storage, names, MANIFEST_SUFFIX)
        if inside:
            hint = "the checkpoints are in %s: pass that" % " or ".join(inside)
    raise UsageError("%s is not a checkpoint directory (no %s-*%s manifests, no %r state file); %s"
                     % (args.url, args.basename, MANIFEST_SUFFIX, STATE_FILE, hint))


def step_of(store, name: str) -> Optional[int]:
    m = store._pattern.fullmatch(name)
    return int(m.group(1)) if m else None


def well_formed(info) -> bool:
    """True when every file entry of the manifest has an int size and crc32c (verify needs both)."""
    return isinstance(info.files, dict) and bool(info.files) and all(
        isinstance(name, str) and isinstance(meta, dict)
        and all(isinstance(meta.get(k), int) and not isinstance(meta.get(k), bool) for k in ("bytes", "crc32c"))
        for name, meta in info.files.items())


def committed(store):
    """(well-formed committed checkpoints, {step: manifest name} of the malformed ones)."""
    from rayhooks.checkpoints import MANIFEST_SUFFIX
    infos = store.committed()
    good = [i for i in infos if well_formed(i)]
    known = {i.prefix + MANIFEST_SUFFIX for i in good}
    malformed = {}
    for name in store.storage.listdir():
        if name.endswith(MANIFEST_SUFFIX) and store._pattern.fullmatch(name) and name not in known:
            malformed[step_of(store, name)] = name
    return good, malformed


def checkpoint_dirs_in(storage, names, manifest_suffix, most=20):
    """URLs of the entries of `storage` that hold manifests (a run's `ckpt` subdirectory, say)."""
    found = []
    for name in sorted(names)[:most]:
        try:
            if any(n.endswith(manifest_suffix) for n in storage.child(name).listdir()):
                found.append(storage.url_of(name))
        except (OSError, ValueError):  # a file, not a directory; or unreadable: no hint from it
            continue
    return found


def pick(store, args, infos):
    """The checkpoint args.step names, or the latest; UsageError when there is none."""
    if not infos:
        raise UsageError("%s has no committed checkpoints (no %s-*.manifest.json); run `rayhooks ls %s` "
                         "to see its partial files" % (args.url, args.basename, args.url))
    if args.step is None:
        return store.newest(infos)
    for info in infos:
        if info.step == args.step:
            return info
    partial = any(step_of(store, n) == args.step for n in store.partials())
    raise UsageError("%s has no committed checkpoint at step %d%s; committed steps: %s"
                     % (args.url, args.step, " (only partial, uncommitted files)" if partial else "",
                        ", ".join(str(i.step) for i in infos)))


def warn(message: str) -> None:
    print("%s: warning: %s" % (PROG, message), file=sys.stderr)
