"""The container engine, through the Docker SDK for Python: build, run the smoke, tag, push.

The SDK speaks the classic builder only (no BuildKit: https://github.com/docker/docker-py/issues/2230),
which is what our engines offer. Every failure of the engine becomes an EngineError (exit 2) or a
BuildFailed (exit 1) with a message for a person; containers we start are removed on every path out.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker
import requests
import urllib3

from .errors import CheckFailed, VlmbuildError
from .progress import Progress

PROXY_ARGS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "FTP_PROXY",
              "ftp_proxy", "ALL_PROXY", "all_proxy")
CONTAINER_REPORT_DIR = "/tmp/vlmbuild-smoke"
# Labels that mark what we started, so an interrupted run's leftovers can be found and removed.
OWNER_LABEL = "io.vlmbuild.owner"


class EngineError(VlmbuildError):
    """No daemon, or the daemon went away, or it refused a request: exit 2."""


class BuildFailed(CheckFailed):
    """A Dockerfile step failed: exit 1, with the failing step and its last output lines."""


@dataclass
class SmokeRun:
    exit_code: int | None  # None: killed at the timeout
    report: dict | None
    logs: str
    seconds: float
    timed_out: bool


@contextmanager
def engine_errors(what: str) -> Iterator[None]:
    """Turn the SDK's and requests' connection failures into one clear message."""
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise EngineError(f"{what}: image not found: {exc.explanation}") from None
    except docker.errors.APIError as exc:
        raise EngineError(f"{what}: the Docker engine refused: {exc.explanation or exc}") from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, docker.errors.DockerException,
            ConnectionError) as exc:
        # A daemon that goes away mid-stream surfaces as urllib3's ProtocolError ("Connection broken"), since
        # docker-py reads build and push streams from the raw response; refused connections as requests' errors.
        raise EngineError(f"{what}: lost the Docker daemon ({type(exc).__name__}: {exc}). Is dockerd running? "
                          "(.ci/setup starts one)") from None


def event_error(event: dict) -> str | None:
    """The error message of a build or push stream event, if it reports one."""
    if "error" not in event and "errorDetail" not in event:
        return None
    return (event.get("errorDetail") or {}).get("message") or event.get("error") or "unknown error"


def proxy_buildargs() -> dict[str, str]:
    """The host's proxy settings, as Docker's predefined build args: they reach RUN steps but are kept out
    of the image's history and config (https://docs.docker.com/reference/dockerfile/#predefined-args)."""
    return {k: v for k, v in os.environ.items() if k in PROXY_ARGS and v}


class Engine:
    def __init__(self, timeout: int = 600) -> None:
        try:
            self.client = docker.from_env(timeout=timeout)
            self.client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineError(f"no Docker daemon answers ({exc}). Start one (`bash .ci/setup` installs and starts "
                              "dockerd) or point DOCKER_HOST at one.") from None
        self.api = self.client.api

    # ------------------------------------------------------------ images

    def image_id(self, ref: str) -> str | None:
        with engine_errors(f"looking up {ref}"):
            try:
                return self.client.images.get(ref).id
            except docker.errors.ImageNotFound:
                return None

    def labels(self, ref: str) -> dict[str, str]:
        with engine_errors(f"inspecting {ref}"):
            return self.client.images.get(ref).labels or {}

    def build(self, context: Path, progress: Progress, buildargs: dict[str, str] | None = None,
              nocache: bool = False) -> str:
        """Build ``context`` untagged; the image id. Streams steps into ``progress``."""
        image_id = None
        with engine_errors(f"building {context}"):
            stream = self.api.build(path=str(context), rm=True, forcerm=True, pull=False, decode=True,
                                    buildargs={**proxy_buildargs(), **(buildargs or {})}, nocache=nocache)
            for event in stream:
                if "stream" in event:
                    for line in event["stream"].splitlines():
                        progress.build_line(line)
                if "aux" in event and "ID" in event["aux"]:
                    image_id = event["aux"]["ID"]
                message = event_error(event)
                if message:
                    n, total, text = progress.step
                    tail = "\n".join(f"    {l}" for l in progress.last_lines)
                    raise BuildFailed(f"build failed at step {n}/{total} [{progress.stage}] {text}\n"
                                      f"  {message}\n  last output lines:\n{tail}")
        if image_id is None:
            raise EngineError(f"building {context}: the engine reported no image id (the daemon went away?)")
        return image_id

    def add_evidence(self, image_id: str, files: dict[str, bytes], labels: dict[str, str],
                     progress: Progress) -> str:
        """The tested image plus one layer of evidence files and labels: a new image id."""
        lines = [f"FROM {image_id}"]
        with tempfile.TemporaryDirectory(prefix="vlmbuild-evidence-") as tmp:
            for i, (dest, data) in enumerate(sorted(files.items())):
                name = f"evidence-{i}"
                Path(tmp, name).write_bytes(data)
                lines.append(f"COPY {name} {dest}")
            if labels:  # one instruction: one history entry
                lines.append("LABEL " + " \\\n      ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())))
            Path(tmp, "Dockerfile").write_text("\n".join(lines) + "\n")
            return self.build(Path(tmp), progress)

    def tag(self, image_id: str, repository: str, tag: str) -> None:
        with engine_errors(f"tagging {repository}:{tag}"):
            if not self.api.tag(image_id, repository, tag, force=True):
                raise EngineError(f"the engine refused to tag {image_id[:19]} as {repository}:{tag}")

    def remove_image(self, image_id: str) -> None:
        try:
            self.client.images.remove(image_id, force=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.APIError, requests.exceptions.ConnectionError):
            pass  # best effort: an image in use by a stopped container of someone else's stays

    def push(self, repository: str, tag: str, progress: Progress) -> str:
        """Push one tag; its registry digest."""
        layers: dict[str, str] = {}
        digest = None
        with engine_errors(f"pushing {repository}:{tag}"):
            for event in self.api.push(repository, tag=tag, stream=True, decode=True):
                message = event_error(event)
                if message:
                    raise EngineError(f"pushing {repository}:{tag} failed: {message}")
                if "aux" in event and "Digest" in event["aux"]:
                    digest = event["aux"]["Digest"]
                progress.push_event(event, layers)
        if not digest:
            raise EngineError(f"pushing {repository}:{tag}: the registry returned no digest")
        return digest

    def gpu_available(self) -> bool:
        """Whether the engine can hand a container a GPU (the NVIDIA runtime is registered)."""
        with engine_errors("asking the engine for its runtimes"):
            info = self.client.info()
        return "nvidia" in (info.get("Runtimes") or {}) or info.get("DefaultRuntime") == "nvidia"

    # ------------------------------------------------------------ the smoke

    def run_smoke(self, image: str, device: str, timeout: int, progress: Progress) -> SmokeRun:
        """Run the image's smoke in a container of its own, collect the JSON report, always remove it."""
        report_path = f"{CONTAINER_REPORT_DIR}/report.json"
        command = ["vlmbuild-smoke", "--device", device, "--report", report_path, "--timeout", str(max(60, timeout - 30))]
        kwargs = dict(
            command=command, detach=True, network_mode="none",  # the smoke needs no network: prove it
            shm_size="2g", labels={OWNER_LABEL: "smoke"}, stdin_open=False,
        )
        if device == "gpu":
            kwargs["device_requests"] = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
        container = None
        started = time.monotonic()
        try:
            with engine_errors(f"starting the smoke in {image[:19]}"):
                container = self.client.containers.run(image, **kwargs)
            timed_out, exit_code = False, None
            try:
                exit_code = container.wait(timeout=timeout)["StatusCode"]
            except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError) as exc:
                # docker-py reports the wait's timeout as a ReadTimeout, some versions wrapped in ConnectionError
                if not isinstance(exc, requests.exceptions.ReadTimeout) and "timed out" not in str(exc).lower():
                    raise EngineError(f"lost the Docker daemon while the smoke ran ({exc})") from None
                timed_out = True
                progress.info(f"smoke timed out after {timeout}s: killing its container")
                try:
                    container.kill()
                except docker.errors.APIError:
                    pass
            with engine_errors("reading the smoke's output"):
                logs = container.logs().decode(errors="replace")
                report = None if timed_out else self._read_file(container, report_path)
            return SmokeRun(exit_code, json.loads(report) if report else None, logs,
                            time.monotonic() - started, timed_out)
        finally:
            if container is not None:
                try:
                    container.remove(force=True)
                except (docker.errors.APIError, requests.exceptions.ConnectionError):
                    pass

    @staticmethod
    def _read_file(container, path: str) -> bytes | None:
        try:
            stream, _ = container.get_archive(path)
        except docker.errors.NotFound:
            return None
        buf = io.BytesIO(b"".join(stream))
        with tarfile.open(fileobj=buf) as tar:
            member = tar.next()
            if member is None:
                return None
            fh = tar.extractfile(member)
            return fh.read() if fh else None

    def read_image_file(self, image: str, path: str) -> bytes | None:
        """A file from an image's filesystem (a created, never started container; removed after)."""
        with engine_errors(f"reading {path} from {image[:19]}"):
            container = self.client.containers.create(image, command=["true"], labels={OWNER_LABEL: "inspect"})
            try:
                return self._read_file(container, path)
            finally:
                container.remove(force=True)
