"""A real GCS server for the tests: the `gcp-storage-emulator` package on a free loopback port."""

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


class GcsEmulator:
    """Starts `gcp-storage-emulator start --in-memory` and points gcsfs at it."""

    def __init__(self, port=None, data_dir=None):
        self.data_dir = data_dir  # None: in memory; a directory: data survives a restart
        self.port = port or free_port()
        self.endpoint = "http://127.0.0.1:%d" % self.port
        self.proc = None

    def start(self, timeout=30.0):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gcp_storage_emulator"]
            + ([] if self.data_dir is None else ["-d", self.data_dir])
            + ["start", "--host", "127.0.0.1", "--port", str(self.port)]
            + (["--in-memory"] if self.data_dir is None else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:  # polls readiness of a server in another process; not a synchronisation sleep
            try:
                urllib.request.urlopen(self.endpoint + "/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("gcp-storage-emulator did not start on %s" % self.endpoint)
                time.sleep(0.05)
        os.environ["STORAGE_EMULATOR_HOST"] = self.endpoint
        # Without this gcsfs spends 60 s on a gRPC probe the emulator does not serve.
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
        return self

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc = None

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
