"""Fixtures shared by every test package: a real moto S3 server and a real etcd server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import typing
import urllib.error
import urllib.request
from typing import Iterator

import pytest

from kvpool.launcher import LocalCluster, free_port

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def start_moto(port: int, log: "typing.IO[bytes]") -> subprocess.Popen:
    """A standalone moto S3 server on 127.0.0.1:``port``, answering when this returns."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **AWS_ENV})
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"moto server exited with {proc.returncode}: "
                               f"{log.read().decode(errors='replace')[-2000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return proc
        except urllib.error.HTTPError:
            return proc  # it answered, with an error status: it is up
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"moto server did not answer at {endpoint} within 30 s")
            time.sleep(0.1)


def stop_proc(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A standalone moto S3 server as a subprocess; yields its endpoint URL. The AWS
    variables point boto3 at dummy credentials while the session runs."""
    port = free_port()
    log = tempfile.TemporaryFile()  # a file, not a pipe: moto logs every request
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    proc = None
    try:
        proc = start_moto(port, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if proc is not None:
            stop_proc(proc)
        log.close()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real etcd server on free ports; yields 'host:port'. Skips when etcd is absent
    (`make test` installs Debian's etcd-server when it can)."""
    if shutil.which("etcd") is None:
        pytest.skip("needs an etcd server binary: apt-get install etcd-server (make test does, as root)")
    etcd = LocalCluster(tmp_path_factory.mktemp("etcd"))
    try:
        etcd.start_etcd()
        yield etcd.etcd_endpoint
    finally:
        etcd.stop_etcd()
