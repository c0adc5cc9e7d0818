"""A real GCS server for the tests: the `gcp-storage-emulator` package on a free loopback port.

Also the start and stop of a storage server subprocess, which the S3 server shares."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(argv, ready_url, what, timeout):
    """Starts a storage server subprocess; returns it once `ready_url` answers."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:  # polls readiness of a server in another process; not a synchronisation sleep
        try:
            urllib.request.urlopen(ready_url, timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_server(proc)
                raise RuntimeError("%s did not start (%s)" % (what, ready_url))
            time.sleep(0.05)


def stop_server(proc):
    if proc is None:
        return
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    if proc.poll() is None:
        proc.kill()


class LoopbackServer:
    """A storage server subprocess on a loopback port: its endpoint, and `stop`."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.endpoint = "http://127.0.0.1:%d" % self.port
        self.proc = None

    def stop(self):
        stop_server(self.proc)
        self.proc = None


class GcsEmulator(LoopbackServer):
    """Starts `gcp-storage-emulator start --in-memory` and points gcsfs at it."""

    def __init__(self, port=None, data_dir=None):
        super().__init__(port)
        self.data_dir = data_dir  # None: in memory; a directory: data survives a restart

    def start(self, timeout=30.0):
        self.proc = start_server(
            [sys.executable, "-m", "gcp_storage_emulator"]
            + ([] if self.data_dir is None else ["-d", self.data_dir])
            + ["start", "--host", "127.0.0.1", "--port", str(self.port)]
            + (["--in-memory"] if self.data_dir is None else []),
            self.endpoint + "/storage/v1/b", "gcp-storage-emulator", timeout)
        os.environ["STORAGE_EMULATOR_HOST"] = self.endpoint
        # Without this gcsfs spends 60 s on a gRPC probe the emulator does not serve.
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
        return self

    @property
    def options(self):
        """fsspec storage options for this server. The endpoint is explicit: gcsfs caches
        filesystems by their options, and one cached for an earlier server would keep
        talking to its (closed) port."""
        return {"token": "anon", "project": "rayhooks-test", "endpoint_url": self.endpoint}

    def make_bucket(self, name):
        import gcsfs
        fs = gcsfs.GCSFileSystem(**self.options)
        fs.mkdir(name)
        fs.invalidate_cache()
        return name

    def restart(self):
        """Stops the server and starts it again on the same port (data kept with a data_dir)."""
        self.stop()
        return self.start()
