"""`rayhooks summaries`: the last value of each scalar tag in a run's events files, and a plot."""

import os
from typing import Dict, List, Optional, Tuple

from rayhooks import cli_common as common


def _events_files(storage, run: str = ".") -> List[Tuple[str, object, str]]:
    """(run, storage, file name) of every events file in the directory and its subdirectories.

    Every level, as TensorBoard searches (`runs/evaluate/eval` is run `evaluate/eval`).
    """
    fs, root = storage.fs, storage._path("")
    found = []
    entries = storage.call("list", "", fs.ls, root, detail=True)
    for entry in sorted(entries, key=lambda e: e["name"]):
        if entry["name"].rstrip("/") == root.rstrip("/"):
            continue  # an object store's placeholder of the directory itself
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") == "directory":
            found += _events_files(storage.child(name), name if run == "." else run + "/" + name)
        elif "tfevents" in name:
            found.append((run, storage, name))
    return found


def _scalar_of(value) -> Optional[float]:
    """The number in a Summary.Value holding a scalar, else None."""
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind != "tensor":
        return None
    plugin = value.metadata.plugin_data.plugin_name
    if plugin not in ("", "scalars"):
        return None
    from tensorboard.util import tensor_util
    try:
        array = tensor_util.make_ndarray(value.tensor)
    except Exception:  # an unsupported dtype: not a scalar we can print
        return None
    if array.size != 1 or array.dtype.kind not in "biuf":
        return None
    return float(array.reshape(()))


def cmd_summaries(args) -> int:
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import event_pb2
    from rayhooks.formats.events import read_records

    if args.plot:
        parent = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(parent):
            raise common.UsageError("--plot %s: directory %s does not exist; create it or pick another path"
                                    % (args.plot, parent))
    storage = common.open_storage(args)
    files = _events_files(storage)
    if not files:
        raise common.UsageError("%s has no events files (*tfevents*) in it or its subdirectories; pass the "
                                "summary_dir (or checkpoint_dir) of the run" % args.url)
    series: Dict[Tuple[str, str], List[Tuple[int, float, float]]] = {}
    for run, where, name in files:
        with where.open_read(name) as f:
            try:
                for record in read_records(f):
                    try:
                        event = event_pb2.Event.FromString(record)
                    except DecodeError:
                        common.warn("%s: skipping an undecodable record" % where.url_of(name))
                        continue
                    if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                        # A restart: as TensorBoard does, drop what the run had logged at
                        # this step or later (the orphans of the job that died).
                        for key, points in series.items():
                            if key[0] == run:
                                points[:] = [p for p in points if p[0] < event.step]
                        continue
                    if not event.HasField("summary"):
                        continue
                    for value in event.summary.value:
                        number = _scalar_of(value)
                        if number is not None:
                            series.setdefault((run, value.tag), []).append(
                                (event.step, number, event.wall_time))
            except ValueError as e:  # a torn tail: the file is still being written
                common.warn("%s: %s; using the records before it" % (where.url_of(name), e))
    series = {key: points for key, points in series.items() if points}
    if not series:
        print("no scalar summaries in %d events file(s) under %s" % (len(files), storage.url))
        if args.plot:
            raise common.UsageError("%s has no scalar summaries to plot" % args.url)
        return 0
    rows = [["RUN", "TAG", "STEP", "VALUE", "TIME (UTC)"]]
    for (run, tag), points in sorted(series.items()):
        step, number, wall = points[-1]
        rows.append([run, tag, str(step), "%.7g" % number, common.utc_iso(wall)])
    print(common.table(rows, right=(2, 3)))
    if args.plot:
        _plot(series, args.plot, storage.url)
        print("wrote %s (%d tag(s))" % (args.plot, len({t for _, t in series})))
    return 0


def _plot(series, path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("--plot needs matplotlib (%s); pip install matplotlib or rayhooks[plot]" % e) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = sorted({tag for _, tag in series})
    runs = sorted({run for run, _ in series})
    fig, axes = plt.subplots(len(tags), 1, figsize=(8, 2.6 * len(tags)), squeeze=False, sharex=False)
    try:
        for ax, tag in zip(axes[:, 0], tags):
            for run in runs:
                points = series.get((run, tag))
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points],
                            marker="." if len(points) < 50 else None, label=run)
            ax.set_title(tag)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
            if len(runs) > 1:
                ax.legend(fontsize="small")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
