"""`rayhooks restore`: a committed checkpoint downloaded, checked, into a directory TF reads."""

import contextlib
import os
import uuid
from typing import List

from rayhooks import cli_common as common


def _safe_name(url: str, name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise common.UsageError("%s: the manifest names a file %r outside the checkpoint directory; "
                                "refusing to restore it" % (url, name))
    return name


def cmd_restore(args) -> int:
    from rayhooks.checkpoints import MANIFEST_SUFFIX, STATE_FILE
    from rayhooks.formats import state_file

    store = common.open_store(args)
    infos, malformed = common.committed(store)
    if args.step is not None and args.step in malformed:
        print("BAD  step %d  %s  (manifest unreadable or malformed): not restored"
              % (args.step, store.storage.url_of(malformed[args.step])))
        return 1
    if args.step is None and not infos and malformed:
        print("BAD  %s: every manifest is unreadable or malformed (see `rayhooks verify`); nothing restored"
              % store.url)
        return 1
    info = common.pick(store, args, infos)
    newer = [k for k in malformed if k is not None and k > info.step]
    if args.step is None and newer:
        common.warn("%s: the manifest of step %d is malformed (see `rayhooks verify`); restoring step %d"
                    % (args.url, max(newer), info.step))
    to = args.to[len("file://"):] if args.to.startswith("file://") else args.to
    if "://" in to:
        raise common.UsageError("--to %s is not a local directory: restore downloads a checkpoint for TensorFlow to "
                                "read from local disk (its readers do not speak every URL); pass a path" % args.to)
    dest = os.path.abspath(os.path.expanduser(to))
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise common.UsageError("--to %s is a file; pass a directory to restore into" % args.to)
    src_root = store.storage.local_root
    if src_root is not None and os.path.isdir(dest) and os.path.samefile(src_root, dest):
        raise common.UsageError("--to %s is the checkpoint directory itself; pass another directory" % args.to)
    _refuse_foreign_destination(args.to, dest)
    os.makedirs(dest, exist_ok=True)

    # Without --step, as a session resumes: the newest checkpoint whose files check out.
    if args.step is not None:
        candidates = [info]
    else:
        first = store.newest(infos)
        # Then older steps, newest first; steps the state file passed over (a damaged one's) last.
        candidates = [first] + sorted((i for i in infos if i is not first),
                                      key=lambda i: (i.step < first.step, i.step), reverse=True)
    for n, info in enumerate(candidates):
        problems = _download(args, store, info, dest)
        if not problems:
            break
        print("BAD  step %d  %s: not restored" % (info.step, info.url))
        for problem in problems:
            print("     - %s" % problem)
        if n + 1 < len(candidates):
            after = candidates[n + 1].step
            common.warn("%s: step %d is damaged (see `rayhooks verify`); trying step %d%s"
                        % (args.url, info.step, after, ", the newest before it" if after < info.step else ""))
    else:
        return 1
    names = sorted(info.files)
    manifest_name = info.prefix + MANIFEST_SUFFIX
    # The manifest too, so that `rayhooks ls/verify DIR` work on the copy.
    _write_local(os.path.join(dest, manifest_name), store.storage.read_bytes(manifest_name))
    state = state_file.CheckpointState(model_checkpoint_path=info.prefix,
                                       all_model_checkpoint_paths=[info.prefix],
                                       all_model_checkpoint_timestamps=[info.timestamp])
    _write_local(os.path.join(dest, STATE_FILE), state_file.format_state(state).encode())
    print("restored step %d (%d files, %s, checksums OK) from %s to %s"
          % (info.step, len(names), common.human_size(info.nbytes), info.url, os.path.join(dest, info.prefix)))
    return 0


def _download(args, store, info, dest) -> List[str]:
    """Copies `info`'s files into `dest`, checking each one's checksum as it streams; returns the problems.

    Files land under their names only when all of them check out.
    """
    from rayhooks.checkpoints import MANIFEST_SUFFIX
    names = [_safe_name(store.url, n) for n in sorted(info.files)]
    _safe_name(store.url, info.prefix + MANIFEST_SUFFIX)
    tag = uuid.uuid4().hex[:12]
    staged, problems = [], []
    try:
        for name in names:
            meta = info.files[name]
            tmp = os.path.join(dest, "%s.tmp-%s" % (name, tag))
            staged.append((tmp, os.path.join(dest, name)))
            with common.progress_bar(args, total=meta["bytes"], desc=name, unit="B", unit_scale=True,
                                     unit_divisor=1024, leave=False) as bar:
                problem = store.check_file(name, meta, bar.update, copy_to=tmp)
            if problem is not None:
                problems.append(problem)
        if not problems:
            for tmp, final in staged:
                os.replace(tmp, final)
            staged = []
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    return problems


def _refuse_foreign_destination(to: str, dest: str) -> None:
    """UsageError if `dest` holds TF checkpoints rayhooks did not write: restore would replace
    their `checkpoint` state file, and `rayhooks gc` would then take them for stale partials."""
    from rayhooks.checkpoints import MANIFEST_SUFFIX, CheckpointStore
    from rayhooks.storage import Storage
    if not os.path.isdir(dest) or any(n.endswith(MANIFEST_SUFFIX) for n in os.listdir(dest)):
        return  # new, or written by rayhooks (an earlier restore, whatever its basename)
    try:
        CheckpointStore(Storage(dest)).refuse_foreign()
    except FileExistsError:
        raise common.UsageError("--to %s holds TF checkpoints that rayhooks did not write (named by its `checkpoint` "
                                "state file), which restoring would replace; pass a new or empty directory"
                                % to) from None


def _write_local(path: str, data: bytes) -> None:
    tmp = "%s.tmp-%s" % (path, uuid.uuid4().hex[:12])
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
