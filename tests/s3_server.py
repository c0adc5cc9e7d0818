"""A real S3 server for the tests: `moto`'s server mode on a free loopback port.

moto serves the S3 REST API over HTTP, multipart uploads included, so s3fs
talks to it exactly as it talks to AWS: same requests, same error codes.
"""

import contextlib
import subprocess
import sys
import time
import urllib.request

from gcs_emulator import free_port

# moto accepts any credentials; they are passed as storage options, never through the
# environment, so tests that remove the AWS variables are not affected.
KEY, SECRET = "rayhooks-test-key", "rayhooks-test-secret"


class S3Server:
    """Starts `python -m moto.server` and gives the s3fs options that point at it."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.endpoint = "http://127.0.0.1:%d" % self.port
        self.proc = None

    def start(self, timeout=60.0):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:  # polls readiness of a server in another process; not a synchronisation sleep
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto's S3 server did not start on %s" % self.endpoint)
                time.sleep(0.05)
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
        """s3fs storage options for this server (the endpoint keeps s3fs' instance cache per server)."""
        return {"key": KEY, "secret": SECRET, "endpoint_url": self.endpoint,
                "client_kwargs": {"region_name": "us-east-1"}}

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY,
                            aws_secret_access_key=SECRET, region_name="us-east-1")

    def make_bucket(self, name):
        self.client().create_bucket(Bucket=name)
        return name

    def pending_uploads(self, bucket):
        """Multipart uploads begun and neither completed nor aborted (AWS bills their parts)."""
        return self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
