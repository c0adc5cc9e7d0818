"""A real S3 server for the tests: `moto`'s server mode on a free loopback port.

moto serves the S3 REST API over HTTP, multipart uploads included, so s3fs
talks to it exactly as it talks to AWS: same requests, same error codes.
"""

import sys

from gcs_emulator import LoopbackServer, start_server

# moto accepts any credentials; they are passed as storage options, never through the
# environment, so tests that remove the AWS variables are not affected.
KEY, SECRET = "rayhooks-test-key", "rayhooks-test-secret"


class S3Server(LoopbackServer):
    """Starts `python -m moto.server` and gives the s3fs options that point at it."""

    def start(self, timeout=60.0):
        self.proc = start_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                 self.endpoint + "/moto-api/", "moto's S3 server", timeout)
        return self

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
