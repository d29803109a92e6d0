"""Stores on S3, against moto's S3 server on 127.0.0.1 (tests/s3server.py), through the CLI
with ``--cache s3://dfmsd/...`` and the endpoint and credentials in the environment, as users
give them: precompute, resume after SIGKILL, two shard processes, ``cache info``/``verify``,
distill, and the one-line errors (missing bucket, refused credentials, unreachable endpoint,
s3fs not installed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import zarr
from conftest import _cli
from s3server import BUCKET, DelayProxy, available, env_without_aws, free_port

from dfmsd_cli.store import remote

needs_s3 = pytest.mark.skipif(available() is not None, reason=str(available()))
PRE = ["--teacher", "retina_tiny", "--img-scale", "128,96", "--batch-size", "2",
       "--num-workers", "0", "--device", "cpu", "--block", "4"]  # fmt: skip


def _url(s3, what: str = "cache") -> str:
    return f"s3://{s3.bucket}/{uuid.uuid4().hex[:8]}/{what}"


def _run(args: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    """``dfmsd ARGS`` in a fresh interpreter with exactly ``env``'s AWS settings."""
    full = env_without_aws() | env
    return subprocess.run([sys.executable, "-m", "dfmsd_cli", *args], env=full, text=True,
                          capture_output=True, timeout=300, **kw)  # fmt: skip


def _popen(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    full = env_without_aws() | env
    return subprocess.Popen([sys.executable, "-m", "dfmsd_cli", *args], env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def _group(s3, url: str) -> zarr.Group:
    opts = {"endpoint_url": s3.endpoint, "key": s3.key, "secret": s3.secret,
            "skip_instance_cache": True}  # fmt: skip
    return zarr.open_group(url, mode="r", storage_options=opts)


def _arrays(group: zarr.Group) -> dict[str, np.ndarray]:
    out = {}

    def walk(g, prefix=""):
        for name, a in g.arrays():
            out[prefix + name] = np.asarray(a[:])
        for name, sub in g.groups():
            walk(sub, prefix + name + "/")

    walk(group)
    return out


def _same(s3, url: str, local) -> None:
    """The S3 store at ``url`` holds exactly the arrays of the local reference store."""
    a = _arrays(_group(s3, url))
    b = _arrays(zarr.open_group(str(local), mode="r"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), f"array {k} differs"


def _store(cache: str) -> str:
    return f"{cache}/retina_tiny/train2017.zarr"


@pytest.fixture(scope="module")
def remote_cache(s3_server, synthetic_root):
    """One uninterrupted ``precompute`` into S3 (a fresh interpreter): the module's store."""
    cache = _url(s3_server)
    r = _run(["precompute", *PRE, "--data", str(synthetic_root), "--cache", cache],
             s3_server.env())  # fmt: skip
    assert r.returncode == 0, r.stderr
    return cache


@needs_s3
@pytest.mark.slow
def test_precompute_to_s3_equals_local(s3_server, remote_cache, tiny_cache):
    _same(s3_server, _store(remote_cache), _store(str(tiny_cache)))


@needs_s3
@pytest.mark.slow
def test_cache_info_and_verify_on_s3(s3_server, remote_cache, tmp_path):
    env = s3_server.env()
    r = _run(["cache", "info", _store(remote_cache), "--json", "-"], env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["done"] == 12 and info["bytes_on_disk"] > 0
    r = _run(["cache", "verify", _store(remote_cache)], env)
    assert r.returncode == 0 and "OK" in r.stderr + r.stdout, r.stderr


@needs_s3
@pytest.mark.slow
def test_pcodec_store_on_s3_equals_local_and_verifies(s3_server, synthetic_root, tmp_path):
    """--codec pcodec through the object-storage write and read paths."""
    enc = ["--codec", "pcodec", "--dtype", "bfloat16", "--max-images", "4"]
    cache, env = _url(s3_server), s3_server.env()
    r = _run(["precompute", *PRE, *enc, "--data", str(synthetic_root), "--cache", cache], env)
    assert r.returncode == 0, r.stderr
    local = tmp_path / "c"
    args = ["precompute", *PRE, *enc, "--data", str(synthetic_root), "--cache", str(local)]
    assert _run(args, env).returncode == 0
    _same(s3_server, _store(cache), _store(str(local)))
    r = _run(["cache", "verify", _store(cache)], env)
    assert r.returncode == 0 and "OK" in r.stderr + r.stdout, r.stderr


@needs_s3
@pytest.mark.slow
def test_verify_names_a_damaged_chunk_on_s3(s3_server, synthetic_root):
    """A chunk altered on the object store fails its crc32c: verify exits 1 naming it."""
    import s3fs

    cache = _url(s3_server)
    env = s3_server.env()
    assert _run(["precompute", *PRE, "--data", str(synthetic_root), "--cache", cache],
                env).returncode == 0  # fmt: skip
    fs = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint, key=s3_server.key,
                           secret=s3_server.secret, skip_instance_cache=True)  # fmt: skip
    key = _store(cache)[len("s3://") :] + "/feat/orig/8/c.3.0.0.0"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    r = _run(["cache", "verify", _store(cache)], env)
    assert r.returncode == 1
    assert "crc32c" in r.stderr + r.stdout and "feat/orig/8" in r.stderr + r.stdout


@needs_s3
@pytest.mark.slow
def test_sigkill_mid_write_then_resume_on_s3(s3_server, synthetic_root, tiny_cache):
    """SIGKILL a precompute writing to S3 (through a proxy holding each request 50 ms, so it is
    caught mid-way), then resume it: the store equals the uninterrupted local one."""
    cache = _url(s3_server)
    proxy = DelayProxy(int(s3_server.endpoint.rsplit(":", 1)[1]), delay=0.05)
    args = ["precompute", *PRE, "--data", str(synthetic_root), "--cache", cache]
    p = _popen(args, s3_server.env(AWS_ENDPOINT_URL=proxy.endpoint))
    killed_at = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and p.poll() is None:
            try:
                done = np.asarray(_group(s3_server, _store(cache))["done"][:])
            except Exception:  # noqa: BLE001 - not created yet
                time.sleep(0.05)
                continue
            if 0 < (done == 1).sum() < len(done):
                p.send_signal(signal.SIGKILL)  # no cleanup of any kind runs
                killed_at = int((done == 1).sum())
                break
            time.sleep(0.05)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
        proxy.close()
    assert killed_at is not None and p.returncode == -signal.SIGKILL, p.stdout.read()
    done = np.asarray(_group(s3_server, _store(cache))["done"][:])
    assert (done == 1).sum() < len(done)
    r = _run(args + ["--json", "-"], s3_server.env())  # resume
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert 0 < summary["written"] < 12 and summary["done"] == 12
    _same(s3_server, _store(cache), _store(str(tiny_cache)))


@needs_s3
@pytest.mark.slow
def test_two_shard_processes_on_s3_equal_one(s3_server, synthetic_root, tiny_cache):
    cache = _url(s3_server)
    args = ["precompute", *PRE, "--data", str(synthetic_root), "--cache", cache]
    procs = [_popen(args + ["--shard", f"{k}/2"], s3_server.env()) for k in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    _same(s3_server, _store(cache), _store(str(tiny_cache)))


@needs_s3
@pytest.mark.slow
def test_distill_reads_the_s3_store(s3_server, remote_cache, synthetic_root, tmp_path):
    """In forked DataLoader workers too (the parent's S3 client is bound to its event loop:
    a worker must reopen the store, which failed with 'attached to a different loop')."""
    out = tmp_path / "run"
    r = _run(["distill", "--student", "retina_tiny", "--stages", "retina_tiny", "--data",
              str(synthetic_root), "--cache", remote_cache, "--img-scale", "128,96",
              "--batch-size", "2", "--num-workers", "2", "--device", "cpu", "--max-steps", "2",
              "--out", str(out)], s3_server.env())  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (out / "student.pth").is_file()


@needs_s3
@pytest.mark.slow
def test_distill_flags_bound_requests_and_keep_chunks_locally(
    s3_server, remote_cache, synthetic_root, tmp_path
):
    """--store-concurrency and --cache-local (not only the environment variables): the chunks
    distill read are kept under the local folder."""
    local = tmp_path / "local"
    r = _run(["distill", "--student", "retina_tiny", "--stages", "retina_tiny", "--data",
              str(synthetic_root), "--cache", remote_cache, "--img-scale", "128,96",
              "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--max-steps", "1",
              "--no-eval", "--out", str(tmp_path / "run"), "--store-concurrency", "2",
              "--cache-local", str(local)], s3_server.env())  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert any(p.is_file() for p in local.rglob("*"))


# ------------------------------------------------------------------ one-line errors, in process


@pytest.fixture
def aws_env(monkeypatch):
    """Set AWS variables for an in-process CLI call; forget filesystems and checks made with
    other settings (fsspec caches filesystem instances per process)."""

    def use(env: dict[str, str]) -> None:
        for k in list(os.environ):
            if k.startswith(("AWS_", "FSSPEC_S3_")):
                monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        remote._checked.clear()
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()

    yield use
    remote._checked.clear()


def _error(argv: list[str], capsys) -> str:
    assert _cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@needs_s3
def test_missing_bucket_is_one_line(s3_server, synthetic_root, aws_env, capsys):
    aws_env(s3_server.env())
    for argv in (["precompute", *PRE, "--data", str(synthetic_root), "--cache",
                  "s3://no-such-bucket/cache"],
                 ["cache", "info", "s3://no-such-bucket/cache/x.zarr"]):  # fmt: skip
        err = _error(argv, capsys)
        assert "bucket 'no-such-bucket' does not exist" in err and "aws s3 mb" in err


@needs_s3
def test_refused_credentials_are_one_line(s3_server, synthetic_root, aws_env, capsys):
    aws_env(s3_server.env(AWS_SECRET_ACCESS_KEY="wrong-secret"))
    for argv in (["precompute", *PRE, "--data", str(synthetic_root), "--cache",
                  f"s3://{BUCKET}/cache"],
                 ["cache", "info", f"s3://{BUCKET}/cache/x.zarr"]):  # fmt: skip
        err = _error(argv, capsys)
        assert "was refused" in err and "AWS_ACCESS_KEY_ID" in err


@needs_s3
@pytest.mark.slow  # the backend's bounded connect retries take a few seconds
def test_unreachable_endpoint_is_one_line(synthetic_root, aws_env, capsys):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    aws_env({"AWS_ENDPOINT_URL": dead, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
             "AWS_DEFAULT_REGION": "us-east-1"})  # fmt: skip
    err = _error(["cache", "info", f"s3://{BUCKET}/cache/x.zarr"], capsys)
    assert "cannot reach the object store" in err and dead in err


def test_without_s3fs_the_error_names_the_extra(synthetic_root, monkeypatch, capsys):
    """Without s3fs (hidden here), an s3:// cache ends with one line naming dfmsd[s3]."""
    from fsspec.registry import _registry  # the classes fsspec imported already

    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs -> ImportError
    monkeypatch.delitem(_registry, "s3", raising=False)
    monkeypatch.delitem(_registry, "s3a", raising=False)
    remote._checked.clear()
    for argv in (["precompute", *PRE, "--data", str(synthetic_root), "--cache", "s3://b/c"],
                 ["cache", "info", "s3://b/c/retina_tiny/train2017.zarr"]):  # fmt: skip
        err = _error(argv, capsys)
        assert "needs the package s3fs" in err and "pip install 'dfmsd[s3]'" in err
