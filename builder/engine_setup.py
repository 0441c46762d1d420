"""Bring up what a build needs on a bare Debian host: a Docker daemon and a local registry.

``python -m vlmbuild.engine_setup`` (run by .ci/setup): when no daemon answers, install Debian's
``docker.io`` and start ``dockerd`` (its log to a file, wait for the socket); start Debian's
``docker-registry`` on 127.0.0.1:5000 with a storage folder of our own. Idempotent. Our machines have no
registry to pull from, so the local base image is made by ``vlmbuild.localbase`` (on demand, by build).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STATE = Path(os.environ.get("VLMBUILD_STATE", Path.home() / ".cache" / "vlmbuild"))
REGISTRY_ADDR = os.environ.get("VLMBUILD_REGISTRY", "127.0.0.1:5000")
DOCKERD_LOG = STATE / "dockerd.log"
DOCKERD_COMMAND = ["dockerd"]  # how start_dockerd runs it, and so how stop_started_dockerd knows it
REGISTRY_LOG = STATE / "registry.log"


def log(msg: str) -> None:
    print(f"[engine] {msg}", flush=True)


def apt_install(*packages: str) -> None:
    missing = [p for p in packages if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if not missing:
        return
    log(f"installing {' '.join(missing)} from Debian")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def daemon_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
        client.close()
        return True
    except Exception:  # noqa: BLE001 - any failure means: no usable daemon
        return False


def data_root() -> Path:
    """Where the dockerd we start keeps its storage: daemon.json's data-root, else dockerd's default."""
    config = Path("/etc/docker/daemon.json")
    if config.is_file():
        root = json.loads(config.read_text() or "{}").get("data-root")
        if root:
            return Path(root)
    return Path("/var/lib/docker")


def reclaim_orphans(root: Path) -> None:
    """Before dockerd starts: remove the storage directories nothing references (vlmbuild.engine_orphans; left by
    dockerd's BuildKit when a build re-makes a layer an image already holds, moby/moby#45939). The one moment they
    can be removed safely is this one, with the engine at rest."""
    from .engine_orphans import reclaim
    from .errors import VlmbuildError

    if not (root / "overlay2").is_dir():
        return
    try:
        removed = reclaim(root)
    except VlmbuildError as e:  # a dockerd that lives but does not answer yet: leave its storage alone
        log(f"storage left as it is: {e}")
        return
    if removed:
        log(f"removed {len(removed)} storage directories nothing referenced under {root / 'overlay2'}: "
            f"{sum(o.size or 0 for o in removed) / 1e9:.1f} GB")


def stop_started_dockerd(timeout: float = 60) -> bool:
    """Stop the dockerd this module starts (a bare ``dockerd``, as start_dockerd runs it) and wait until it has
    exited; False when none runs: a dockerd started another way (systemd's) is not ours to stop."""
    import signal

    from .engine_orphans import dockerd_running

    ours = [pid for pid in dockerd_running()
            if Path(f"/proc/{pid}/cmdline").read_bytes() == "\0".join(DOCKERD_COMMAND).encode() + b"\0"]
    if not ours:
        return False
    os.kill(ours[0], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{ours[0]}").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    return True


def start_dockerd() -> None:
    apt_install("docker.io")
    STATE.mkdir(parents=True, exist_ok=True)
    reclaim_orphans(data_root())
    log(f"starting dockerd (log: {DOCKERD_LOG})")
    with open(DOCKERD_LOG, "ab") as out:
        subprocess.Popen(DOCKERD_COMMAND, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if daemon_answers():
            log("dockerd is up")
            return
        time.sleep(1)
    tail = DOCKERD_LOG.read_text(errors="replace").splitlines()[-20:]
    sys.exit("dockerd did not answer within 90 s; last log lines:\n" + "\n".join(tail))


def registry_answers(addr: str = REGISTRY_ADDR) -> bool:
    try:
        with urllib.request.urlopen(f"http://{addr}/v2/", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_registry(addr: str = REGISTRY_ADDR) -> None:
    apt_install("docker-registry")
    host, port = addr.rsplit(":", 1)
    with socket.socket() as s:
        if s.connect_ex((host, int(port))) == 0:
            sys.exit(f"{addr} is taken by something that is not a Docker registry")
    data = STATE / "registry" / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = STATE / "registry" / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {addr}\n"
    )
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    log(f"starting a local registry on {addr} (log: {REGISTRY_LOG})")
    with open(REGISTRY_LOG, "ab") as out:
        subprocess.Popen([binary, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if registry_answers(addr):
            log("registry is up")
            return
        time.sleep(0.5)
    sys.exit(f"the registry did not answer on {addr} within 30 s; see {REGISTRY_LOG}")


def purge_local_repository(name: str, addr: str = REGISTRY_ADDR) -> None:
    """Delete one repository's images from our local registry and reclaim their disk (garbage-collect).

    For what tests and benchmarks push: a registry on a shared disk keeps every blob until collected."""
    # cosign's signatures and attestations (tags sha256-<digest>.sig/.att) are OCI manifests
    accept = ("application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json, "
              "application/vnd.oci.image.index.v1+json")
    try:
        with urllib.request.urlopen(f"http://{addr}/v2/{name}/tags/list", timeout=10) as resp:
            tags = json.load(resp).get("tags") or []
    except OSError:
        return
    digests = set()
    for tag in tags:  # tags of one image share its manifest: collect, then delete each digest once
        head = urllib.request.Request(f"http://{addr}/v2/{name}/manifests/{tag}", method="HEAD",
                                      headers={"Accept": accept})
        try:
            with urllib.request.urlopen(head, timeout=10) as resp:
                digests.add(resp.headers["Docker-Content-Digest"])
        except OSError:
            continue  # deleted with an earlier digest, or a kind of manifest this registry will not describe
    for digest in digests:
        urllib.request.urlopen(urllib.request.Request(f"http://{addr}/v2/{name}/manifests/{digest}",
                                                      method="DELETE"), timeout=10).close()
    config = STATE / "registry" / "config.yml"
    if config.is_file():
        # --delete-untagged: a tag pushed twice leaves its first manifest untagged, and its blobs with it
        subprocess.run([shutil.which("docker-registry") or "/usr/bin/docker-registry", "garbage-collect",
                        "--delete-untagged", str(config)], capture_output=True)


def main() -> None:
    if daemon_answers():
        log("a Docker daemon answers")
    else:
        start_dockerd()
    apt_install("debootstrap")  # for the local base image (vlmbuild.localbase)
    if registry_answers():
        log(f"a registry answers on {REGISTRY_ADDR}")
    else:
        start_registry()


if __name__ == "__main__":
    main()
