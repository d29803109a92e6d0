"""An S3-compatible server on 127.0.0.1 for the object-storage tests (moto's server mode).

``s3_server`` (session fixture, in conftest.py) starts moto's ``ThreadedMotoServer`` on a free
loopback port, creates the bucket ``dfmsd``, an IAM user with an access key allowed everything,
then switches authentication on (moto's ``/moto-api/reset-auth``), so wrong credentials are
refused like on AWS. Tests give the endpoint and credentials the way users do: through the
environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``), see :meth:`S3Server.env`.

``DelayProxy`` is a TCP proxy in front of the server that holds every request for ``delay``
seconds before forwarding it: the per-request latency of a remote object store, for the
read-throughput measurement (examples/s3_read_bench.py).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass

BUCKET = "dfmsd"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    bucket: str = BUCKET

    def env(self, **over: str) -> dict[str, str]:
        """The variables a user sets for this endpoint (``over`` replaces some)."""
        e = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": REGION,
        }
        e.update(over)
        return e


def start(port: int | None = None):
    """(server, S3Server): moto on ``port`` with the bucket, a user's key and auth on."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = port or free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    anon = {"endpoint_url": endpoint, "region_name": REGION, "aws_access_key_id": "x",
            "aws_secret_access_key": "x"}  # fmt: skip
    boto3.client("s3", **anon).create_bucket(Bucket=BUCKET)
    iam = boto3.client("iam", **anon)
    iam.create_user(UserName="dfmsd")
    policy = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}  # fmt: skip
    iam.put_user_policy(UserName="dfmsd", PolicyName="all", PolicyDocument=json.dumps(policy))
    k = iam.create_access_key(UserName="dfmsd")["AccessKey"]
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})  # fmt: skip
    urllib.request.urlopen(req, timeout=10).read()  # from now on every request is checked
    return server, S3Server(endpoint, k["AccessKeyId"], k["SecretAccessKey"])


def available() -> str | None:
    """None when moto's server and s3fs import, else the reason to skip."""
    for mod in ("moto.server", "s3fs", "boto3"):
        try:
            __import__(mod)
        except ImportError as exc:
            return f"{mod} is not installed ({exc}): pip install -e '.[test]' installs it"
    return None


class DelayProxy:
    """Forward TCP connections from a free port to ``target``, each request held ``delay`` s.

    A request is the client's data after a quiet period; every chunk the client sends after
    the server has answered is delayed once, so HTTP keep-alive requests each pay ``delay``.
    """

    def __init__(self, target_port: int, delay: float):
        self.target = ("127.0.0.1", target_port)
        self.delay = delay
        self.port = free_port()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(256)
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target)
        answered = threading.Event()
        answered.set()

        def down() -> None:  # server -> client, as it comes
            try:
                while data := upstream.recv(1 << 16):
                    client.sendall(data)
                    answered.set()
            except OSError:
                pass
            finally:
                client.close()

        threading.Thread(target=down, daemon=True).start()
        try:
            while data := client.recv(1 << 16):
                if answered.is_set():  # the first bytes of a new request: its latency
                    answered.clear()
                    time.sleep(self.delay)
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            upstream.close()

    def close(self) -> None:
        self._stop = True
        self._sock.close()


def env_without_aws() -> dict[str, str]:
    """This process's environment minus AWS/fsspec S3 settings (the tests set their own)."""
    drop = ("AWS_", "FSSPEC_S3_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}
