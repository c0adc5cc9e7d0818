"""The `rayhooks` command line: inspect, verify, clean, restore and summarise runs.

    rayhooks ls URL                      committed (and partial) checkpoints
    rayhooks verify URL [--step N]       check every file's crc32c against its manifest
    rayhooks gc URL [--yes]              delete the partial files older than the newest commit
               [--older-than AGE]        and any others not written for AGE (a crashed run's leftovers)
    rayhooks restore URL --to DIR        download a checkpoint TF can read from DIR
    rayhooks summaries URL [--plot PNG]  the last value of each scalar tag

URLs are fsspec URLs (gs://, s3://, memory://, file:// or a local path);
`--storage-option KEY=VALUE` passes options to the filesystem.

Exit codes: 0 success, 1 a check failed (a damaged checkpoint), 2 bad input
(a URL that is not there or not a checkpoint directory, an unknown step, ...).
Only the command's output goes to stdout; progress bars, warnings and errors go
to stderr.
"""

import argparse
import logging
import os
import sys
import time
from typing import Dict, List, Optional

from rayhooks import cli_common as common
from rayhooks.cli_restore import cmd_restore
from rayhooks.cli_summaries import cmd_summaries


# -- ls ----------------------------------------------------------------------


def cmd_ls(args) -> int:
    store = common.open_store(args)
    infos, malformed = common.committed(store)
    partial_steps: Dict[Optional[int], List[str]] = {}
    for name in store.partials():
        partial_steps.setdefault(common.step_of(store, name), []).append(name)
    newest = store.newest(infos)
    latest = newest.step if newest else None

    rows = []  # (sort key, cells)
    for info in infos:
        flags = []
        if info.step == latest:
            flags.append("latest")
        if info.preserved:
            flags.append("preserved")
        rows.append(((info.step, 0), [str(info.step), common.utc_iso(info.timestamp), common.human_size(info.nbytes),
                                      str(len(info.files)), ", ".join(flags)]))
    for step, names in partial_steps.items():
        sizes = []
        for name in names:
            try:
                sizes.append(store.storage.size(name))
            except FileNotFoundError:  # deleted (committed or collected) since the listing
                pass
        committed_step = step is not None and any(i.step == step for i in infos)
        flag = "partial (temporary leftovers)" if committed_step else "partial (uncommitted)"
        rows.append(((step if step is not None else -1, 1),
                     ["?" if step is None else str(step), "-", common.human_size(sum(sizes)), str(len(names)), flag]))
    for step, name in malformed.items():
        rows.append(((step, 2), [str(step), "-", "-", "-", "malformed manifest (`rayhooks verify`)"]))
    rows.sort(key=lambda r: r[0])
    header = ["STEP", "TIME (UTC)", "SIZE", "FILES", "STATUS"]
    print(common.table([header] + [cells for _, cells in rows], right=(0, 2, 3)))
    n_partial = sum(len(v) for v in partial_steps.values())
    summary = "%s: %d committed checkpoint(s)" % (store.url, len(infos))
    if infos:
        summary += ", latest step %d (%s)" % (latest, newest.url)
    if n_partial:
        summary += ("; %d partial file(s) (`rayhooks gc` removes those older than the latest commit; newer "
                    "ones may belong to a save in flight, and go with `--older-than AGE` once none can be)"
                    % n_partial)
    print(summary)
    claim = store.writer_claim.read()
    if claim is not None:
        from rayhooks.claim import describe
        print("writer: %s" % describe(claim))
    return 0


# -- verify ------------------------------------------------------------------


def cmd_verify(args) -> int:
    from rayhooks.checkpoints import MANIFEST_SUFFIX
    store = common.open_store(args)
    infos, malformed = common.committed(store)
    if args.step is not None:
        if args.step in malformed:
            infos, unreadable = [], [malformed[args.step]]
        else:
            infos, unreadable = [common.pick(store, args, infos)], []
    else:
        unreadable = [malformed[k] for k in sorted(malformed)]
        if not infos and not unreadable:
            raise common.UsageError("%s has no committed checkpoints (no %s-*%s); nothing to verify"
                                    % (args.url, args.basename, MANIFEST_SUFFIX))
    bad = 0
    for info in infos:
        problems = store.verify(info)
        status = "BAD" if problems else "OK"
        print("%-3s  step %d  %s  (%d files, %s)" % (status, info.step, info.url, len(info.files),
                                                    common.human_size(info.nbytes)))
        for problem in problems:
            print("     - %s" % problem)
        bad += bool(problems)
    unreadable = [n for n in unreadable if store.storage.exists(n)]  # not dropped by retention since
    for name in unreadable:
        print("BAD  step %s  %s  (manifest unreadable or malformed)"
              % (common.step_of(store, name), store.storage.url_of(name)))
        bad += 1
    total = len(infos) + len(unreadable)
    print("%d checkpoint(s) verified: %d OK, %d BAD" % (total, total - bad, bad))
    return 1 if bad else 0


# -- gc ----------------------------------------------------------------------


def _modified(storage, name: str) -> Optional[float]:
    """When `name` was last written, by the store's own clock; None when the store cannot say."""
    try:
        return storage.call("stat", name, storage.fs.modified, storage._path(name)).timestamp()
    except (NotImplementedError, FileNotFoundError):
        return None


def cmd_gc(args) -> int:
    from rayhooks.checkpoints import MANIFEST_SUFFIX, STATE_FILE
    store = common.open_store(args)
    infos = store.committed()
    latest = infos[-1] if infos else None
    # A partial written after the newest commit may belong to a save in flight, whatever its
    # step: a run resumed below a damaged checkpoint saves steps under that checkpoint's.
    commit_times = [_modified(store.storage, i.prefix + MANIFEST_SUFFIX) for i in infos]
    newest_commit = max((t for t in commit_times if t is not None), default=None)
    # --older-than: the user's word that no save has been in flight that long (a crashed run never
    # resumed leaves its last saves' files newer than any commit, or in a directory with none).
    cutoff = None if args.older_than is None else time.time() - args.older_than
    doomed, kept = [], []
    for name in store.partials():
        step = common.step_of(store, name)
        state_temporary = name.startswith(STATE_FILE + ".tmp-")  # a state file write cut short
        written = _modified(store.storage, name)
        if latest is not None and (state_temporary or step is not None and step < latest.step):
            if newest_commit is not None and written is not None and written < newest_commit:
                doomed.append(name)
                continue
            why = "written since the newest commit"
        else:
            why = ("no committed checkpoint yet" if latest is None else
                   "unknown step" if step is None else "newer than the latest commit")
        if cutoff is not None and written is not None and written < cutoff:
            doomed.append(name)
        else:
            kept.append((name, why))
    # S3 multipart uploads left open (their abort could not reach S3): the same rule, by when begun.
    uploads, uploads_kept = [], []
    for name, upload_id, begun in store.storage.open_uploads():
        step = common.step_of(store, name)
        if latest is not None and step is not None and step < latest.step and \
                newest_commit is not None and begun < newest_commit or cutoff is not None and begun < cutoff:
            uploads.append((name, upload_id))
        else:
            uploads_kept.append(name)
    url_of = store.storage.url_of
    for name in doomed:
        print("%-12s  %s" % ("delete" if args.yes else "would delete", url_of(name)))
    for name, _ in uploads:
        print("%-12s  %s  (an unfinished upload)" % ("abort" if args.yes else "would abort", url_of(name)))
    for name, why in kept:
        print("%-12s  %s  (possibly in flight, kept: %s)" % ("keep", url_of(name), why))
    for name in uploads_kept:
        print("%-12s  %s  (an unfinished upload, possibly in flight)" % ("keep", url_of(name)))
    uploads_note = " and %d unfinished upload(s)" % len(uploads) if uploads else ""
    if (kept or uploads_kept) and args.older_than is None:
        print("(files kept as possibly in flight that a crashed run left behind go with --older-than AGE, "
              "e.g. `%s gc %s --older-than 1d`)" % (common.PROG, store.url))
    if not doomed and not uploads:
        print("nothing to delete in %s (%d partial file(s)%s kept)"
              % (store.url, len(kept), " and %d unfinished upload(s)" % len(uploads_kept) if uploads_kept else ""))
        return 0
    if not args.yes:
        print("dry run: %d partial file(s)%s would be deleted; rerun with --yes to delete them"
              % (len(doomed), uploads_note))
        return 0
    with common.progress_bar(args, total=len(doomed) + len(uploads), desc="deleting", unit="file") as bar:
        for name in doomed:
            store.storage.delete([name])
            bar.update(1)
        for name, upload_id in uploads:
            store.storage.abort_upload(name, upload_id)
            bar.update(1)
    print("deleted %d partial file(s)%s from %s" % (len(doomed), uploads_note, store.url))
    return 0


# -- entry point -------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--storage-option", metavar="KEY=VALUE", type=common.storage_option, action="append",
                         default=[], help="an fsspec storage option, repeatable; VALUE is parsed as JSON "
                                          "when it can be (e.g. token=anon, use_ssl=false)")
    options.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    ckpt = argparse.ArgumentParser(add_help=False)
    ckpt.add_argument("url", metavar="URL", help="the checkpoint directory (gs://, s3://, memory://, file:// "
                                                 "or a local path)")
    ckpt.add_argument("--basename", default="model.ckpt",
                      help="the checkpoints' basename (checkpoint_basename), default: %(default)s")

    parser = argparse.ArgumentParser(prog=common.PROG, description="Inspect, verify, clean up and restore rayhooks "
                                     "checkpoints, and read TensorBoard scalars, on any fsspec URL.",
                                     epilog="Exit codes: 0 ok, 1 a check failed, 2 bad input.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("ls", parents=[options, ckpt], help="list the checkpoints in a directory",
                       description="List committed checkpoints (step, UTC time, size, files), flag partial "
                                   "(uncommitted) files and mark the latest.")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("verify", parents=[options, ckpt], help="check the checkpoints' crc32c checksums",
                       description="Check every file of every committed checkpoint (or of --step) against "
                                   "the size and crc32c its manifest records. Exit code 1 if any is BAD.")
    p.add_argument("--step", type=common.step_arg, help="verify only this step")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("gc", parents=[options, ckpt], help="delete stale partial checkpoint files",
                       description="Delete the uncommitted (partial) files of steps older than the newest "
                                   "commit, written before it; on S3, abort such steps' unfinished multipart "
                                   "uploads too. Other partial files may belong to a save in flight and are "
                                   "kept, unless --older-than says no save has been in flight that long. "
                                   "A dry run unless --yes.")
    p.add_argument("--yes", action="store_true", help="really delete (default: only list)")
    p.add_argument("--older-than", metavar="AGE", type=common.age_arg,
                   help="also delete partial files (and abort uploads) of any step last written longer ago "
                        "than AGE (90s, 30m, 12h, 2d): the leftovers of a crashed run that was never resumed. "
                        "Only safe when no run has had a save in flight that long; ages are read from the "
                        "store's clock against this machine's")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("restore", parents=[options, ckpt], help="download a checkpoint to a local directory",
                       description="Download a committed checkpoint into a local directory, verify its "
                                   "checksums and write a TF `checkpoint` state file there, so that "
                                   "tf.train.latest_checkpoint(DIR) returns it.")
    p.add_argument("--step", type=common.step_arg, help="the step to restore (default: the latest)")
    p.add_argument("--to", required=True, metavar="DIR", help="local directory to restore into")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("summaries", parents=[options], help="last value of each scalar summary",
                       description="Read the events files in URL and its subdirectories and print the last "
                                   "step and value of each scalar tag.")
    p.add_argument("url", metavar="URL", help="the summary directory (usually the checkpoint_dir)")
    p.add_argument("--plot", metavar="OUT.png", help="also plot every scalar tag against step into this PNG")
    p.set_defaults(func=cmd_summaries)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    # Warnings of the storage libraries (gcsfs logs each exhausted retry with its traceback)
    # as one line each; the error itself is reported once, below.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        return args.func(args)
    except common.UsageError as e:
        return _fail(str(e))
    except (ValueError, FileNotFoundError, PermissionError, ImportError, OSError) as e:
        return _fail(_describe(args, e))
    except KeyboardInterrupt:
        print("%s: interrupted" % common.PROG, file=sys.stderr)
        return 130
    finally:
        root.removeHandler(handler)


class _OneLineFormatter(logging.Formatter):
    def format(self, record):
        return "%s: warning: %s" % (common.PROG, " ".join(record.getMessage().split()))


def _describe(args, exc: BaseException) -> str:
    msg = str(exc) or type(exc).__name__
    url = getattr(args, "url", "")
    to, filename = getattr(args, "to", None), getattr(exc, "filename", None)
    if to and isinstance(filename, str):
        dest = os.path.abspath(os.path.expanduser(to[len("file://"):] if to.startswith("file://") else to))
        if os.path.abspath(filename) == dest or os.path.abspath(filename).startswith(dest + os.sep):
            # The local destination failed, not the checkpoint's URL.
            return "--to %s: %s; check that this process can make and write that directory" % (to, msg)
    if url and url not in msg:
        msg = "%s: %s" % (url, msg)
    if isinstance(exc, PermissionError):
        msg += "; check this process's credentials (--storage-option) and the permissions"
    elif isinstance(exc, FileNotFoundError):
        msg += "; check the URL"
    return msg



def _fail(message: str) -> int:
    line = " ".join(message.split())  # one line, whatever the message held
    print("%s: error: %s" % (common.PROG, line), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
