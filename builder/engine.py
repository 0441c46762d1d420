"""The container engine, through the Docker SDK for Python: run the smoke, add evidence, tag, push.

Builds go through BuildKit (vlmbuild.buildkit: the SDK speaks only the classic builder,
https://github.com/docker/docker-py/issues/2230). Every failure of the engine becomes an EngineError (exit 2)
or a BuildFailed (exit 1) with a message for a person; containers we start are removed on every path out.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import docker
import requests
import urllib3
from docker.utils import parse_repository_tag

from . import buildkit, contract, engine_disk, owner
from .bases import LOCAL_BASE_PREFIX, split_digest
from .build_turns import build_turn
from .buildkit import BuildFailed  # noqa: F401 - re-exported: the gate catches it from here
from .engine_api import Base, SmokeLimits, SmokeRun  # noqa: F401 - SmokeRun re-exported
from .errors import CheckFailed, VlmbuildError
from .localbase import ensure_local_base
from .progress import Progress

CONTAINER_REPORT_DIR = "/tmp/vlmbuild-smoke"
CONTAINER_MODEL_DIR = "/model"
OWNER_LABEL = contract.OWNER_LABEL
OWNER_PROCESS_LABEL = contract.OWNER_PROCESS_LABEL


class EngineError(VlmbuildError):
    """No daemon, or the daemon went away, or it refused a request: exit 2."""


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


def leftover(container) -> bool:
    """A container of ours that nothing will remove: the process that made it is gone (vlmbuild.owner). Only the
    process mark decides: the owner label alone is also on the containers users make from images built before
    the evidence container went unlabelled (a commit keeps its container's labels), and those are theirs."""
    return left_by_dead_run(container.labels)


def left_by_dead_run(labels: dict | None) -> bool:
    mark = (labels or {}).get(OWNER_PROCESS_LABEL)
    return mark is not None and owner.is_gone(mark)


def remove_leftovers(client) -> list[str]:
    """Remove the containers of ours that a killed run left (SIGKILL, OOM, a reboot): their short ids."""
    removed = []
    for container in client.containers.list(all=True, filters={"label": OWNER_LABEL}):
        if leftover(container):
            discard(container)
            removed.append(container.short_id)
    # a smoke over several nodes also makes a network and a volume (engine_nodes), once its containers are gone
    for thing in (client.networks.list(filters={"label": OWNER_LABEL})
                  + client.volumes.list(filters={"label": OWNER_LABEL})):
        if left_by_dead_run(thing.attrs.get("Labels")):
            try:
                thing.remove()
                removed.append(thing.name)
            except docker.errors.APIError:
                pass
    return removed


def discard(container) -> None:
    """Remove a container of ours whatever state it is in; a daemon already gone leaves nothing to remove."""
    if container is None:
        return
    try:
        container.remove(force=True)
    except (docker.errors.APIError, requests.exceptions.ConnectionError):
        pass


class Engine:
    """The Docker engine, as vlmbuild.engine_api.EngineAPI describes it."""

    def __init__(self, timeout: int = 600) -> None:
        try:
            self.client = docker.from_env(timeout=timeout)
            self.client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineError(f"no Docker daemon answers ({exc}). Start one (`bash .ci/setup` installs and starts "
                              "dockerd) or point DOCKER_HOST at one.") from None
        self.api = self.client.api
        self.leftovers_removed = False  # a killed run's containers are looked for once per Engine, not per container

    @contextmanager
    def container(self, image: str, purpose: str, what: str, marked: bool = True, **kwargs) -> Iterator:
        """A container of ours of ``image``, created (not started) and marked with ``purpose`` and this process;
        removed when the block ends, whatever ends it (a failure, a timeout, Ctrl-C, SIGTERM). What no handler can
        catch (SIGKILL) leaves it to the next run: the leftovers of dead runs go first.

        ``marked=False`` for a container that is committed into an image: a commit keeps the container's labels,
        and every container users make from that image would carry our marks (and look like our leftover)."""
        container = None
        try:
            with engine_errors(what):
                if not self.leftovers_removed:
                    remove_leftovers(self.client)
                    self.leftovers_removed = True
                labels = {OWNER_LABEL: purpose, OWNER_PROCESS_LABEL: owner.mark()} if marked else {}
                container = self.client.containers.create(image, labels=labels, **kwargs)
            yield container
        finally:
            discard(container)

    def disk(self) -> engine_disk.EngineDisk:
        """The engine's storage: what it holds on disk, what it accounts for, what is free."""
        with engine_errors("measuring the engine's disk"):
            return engine_disk.measure(self.client)

    # ------------------------------------------------------------ images

    def image_id(self, ref: str) -> str | None:
        with engine_errors(f"looking up {ref}"):
            try:
                return self.client.images.get(ref).id
            except docker.errors.ImageNotFound:
                return None

    def image_size(self, ref: str) -> int:
        with engine_errors(f"inspecting {ref}"):
            return int(self.client.images.get(ref).attrs.get("Size") or 0)

    def labels(self, ref: str) -> dict[str, str]:
        with engine_errors(f"inspecting {ref}"):
            return self.client.images.get(ref).labels or {}

    def layers(self, ref: str) -> tuple[str, ...]:
        with engine_errors(f"inspecting {ref}"):
            return tuple(self.client.images.get(ref).attrs["RootFS"].get("Layers") or ())

    def resolve_base(self, ref: str, progress: Progress | None = None) -> Base:
        """The base image as the engine has it, checked against its pin.

        A base made on this machine (vlmbuild-local/...) is made when missing; its image id is what the build
        records. A pinned base (name:tag@sha256:...) is pulled by digest when missing, and must carry that digest:
        a build never starts from whatever the engine happens to have cached under the tag."""
        name, digest = split_digest(ref)
        if ref.startswith(LOCAL_BASE_PREFIX):
            say = progress.info if progress is not None else Progress(f"base {ref}", tty=False).info
            made = ensure_local_base(self.client, ref, echo=say)
            return Base(ref, made, None, self.layers(made))
        if digest is None:  # --base-image naming a local image by tag or id: its id is what counts
            image_id = self.image_id(ref)
            if image_id is None:
                raise EngineError(f"base image {ref}: no such image in this engine (pull or build it first)")
            return Base(ref, image_id, None, self.layers(image_id))
        repository, _ = parse_repository_tag(name)  # the tag goes, a registry's :port stays
        image_id = self.image_id(f"{repository}@{digest}")
        if image_id is None:
            with engine_errors(f"pulling the base {ref}"):
                self.client.images.pull(repository, tag=digest)
            image_id = self.image_id(f"{repository}@{digest}")
        if image_id is None:
            raise EngineError(f"base image {ref}: the engine has no image with that digest")
        with engine_errors(f"inspecting {ref}"):
            repo_digests = self.client.images.get(image_id).attrs.get("RepoDigests") or []
        if not any(d.endswith(f"@{digest}") for d in repo_digests):
            raise CheckFailed(f"base image {ref}: the engine's image {image_id[:19]} does not carry the pinned "
                              f"digest (it has {repo_digests or 'none'}); not building on an unverified base")
        return Base(ref, image_id, digest, self.layers(image_id))

    def check_built_on(self, image_id: str, base: Base) -> None:
        """The candidate really starts from the checked base: its first layers are the base's layers."""
        layers = self.layers(image_id)
        if base.layers and layers[: len(base.layers)] != base.layers:
            raise CheckFailed(f"the build did not start from the checked base {base.ref} ({base.image_id[:19]}): "
                              "its tag moved during the build? Nothing was tagged")

    def untag(self, repository: str, tag: str) -> None:
        with engine_errors(f"removing the tag {repository}:{tag}"):
            try:
                self.client.images.remove(f"{repository}:{tag}", noprune=True)
            except docker.errors.ImageNotFound:
                pass

    def remote_digest(self, repository: str, tag: str) -> str | None:
        """The digest a registry serves for repository:tag, None when it has no such tag."""
        try:
            return self.api.inspect_distribution(f"{repository}:{tag}")["Descriptor"]["digest"]
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as exc:
            text = str(exc.explanation or exc).lower()
            if "not found" in text or "manifest unknown" in text or "name unknown" in text:
                return None
            raise EngineError(f"asking the registry for {repository}:{tag}: {exc.explanation or exc}") from None
        except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
            raise EngineError(f"asking the registry for {repository}:{tag}: {exc}") from None

    def local_repo_digest(self, image_id: str, repository: str) -> str | None:
        with engine_errors(f"inspecting {image_id[:19]}"):
            digests = self.client.images.get(image_id).attrs.get("RepoDigests") or []
        return next((d.split("@", 1)[1] for d in digests if d.split("@", 1)[0] == repository), None)

    def build(self, context: Path, progress: Progress, nocache: bool = False, cache_from: tuple[str, ...] = (),
              inline_cache: bool = False, target: str | None = None) -> str:
        """Build ``context`` untagged with BuildKit; the image id. A daemon lost on the way is an EngineError."""
        pulled = self.pull_caches(cache_from, progress)
        try:
            with engine_errors("asking the engine for its ID and version"):
                info = self.client.info()
            with build_turn(info["ID"], info["ServerVersion"], progress):  # moby/moby#46136: vlmbuild.build_turns
                return buildkit.build(context, progress, nocache=nocache, cache_from=cache_from,
                                      inline_cache=inline_cache, target=target)
        except buildkit.BuildFailed:
            raise
        except VlmbuildError as exc:
            if not self.answers():
                raise EngineError(f"building {context}: lost the Docker daemon ({exc}). Is dockerd running? "
                                  "(.ci/setup starts one)") from None
            raise
        finally:
            for ref in pulled:  # the layers the build took stay with its image and BuildKit's (prunable) cache
                try:
                    self.client.images.remove(ref)
                except (docker.errors.APIError, requests.exceptions.RequestException):
                    pass

    def pull_caches(self, refs: tuple[str, ...], progress: Progress) -> list[str]:
        """Pull each --cache-from image this engine lacks; the refs pulled.

        On dockerd 20.10 (BuildKit 0.8) a build that imports a cache straight from a registry leaves the image's
        layers held in the daemon's memory after the image is gone: no image, no cache record, and no prune owns
        them until dockerd restarts (7.1 GB per build of `local`; benchmarks/results/engine-disk.txt). With the
        cache image in the engine's own store, moby resolves --cache-from from it, and what the build took is
        BuildKit's to prune. A ref that cannot be pulled is left to BuildKit, which builds without it."""
        pulled = []
        for ref in refs:
            if self.image_id(ref) is not None:
                continue
            repository, tag = parse_repository_tag(ref)
            try:
                self.client.images.pull(repository, tag=tag or "latest")
            except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
                progress.info(f"cache {ref}: not pulled ({getattr(exc, 'explanation', None) or exc}); "
                              "BuildKit looks it up itself")
                continue
            pulled.append(ref)
        return pulled

    def answers(self) -> bool:
        try:
            self.client.ping()
            return True
        except (docker.errors.DockerException, requests.exceptions.RequestException, urllib3.exceptions.HTTPError):
            return False

    def add_evidence(self, image_id: str, files: dict[str, bytes], labels: dict[str, str]) -> str:
        """The tested image plus one layer holding ``files`` and the ``labels``: a new image id.

        A container is created from the image (never started), the files are put into it and it is committed
        with the labels; no builder is involved and nothing else of the image changes."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for dest, data in sorted(files.items()):
                info = tarfile.TarInfo(dest.lstrip("/"))
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        changes = [f"LABEL {json.dumps(k)}={json.dumps(v)}" for k, v in sorted(labels.items())]
        what = f"adding evidence to {image_id[:19]}"
        with self.container(image_id, "evidence", what, marked=False, command=["true"]) as container, engine_errors(what):
            if not container.put_archive("/", buf.getvalue()):
                raise EngineError(f"the engine refused the evidence files for {image_id[:19]}")
            image = container.commit(changes=changes, message="vlmbuild: smoke evidence")
        return image.id

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

    def run_smoke(self, image: str, device: str, timeout: int, progress: Progress, repeat: int = 1,
                  model_dir: Path | None = None, checks: str | None = None,
                  limits: SmokeLimits = SmokeLimits(), nodes: int = 1) -> SmokeRun:
        """Run the image's smoke in a container of its own, collect the JSON report, always remove the container:
        on success, failure, a start that fails, the timeout, Ctrl-C and SIGTERM alike.

        The container is hardened: the smoke runs whatever code the image holds (`vlmbuild smoke IMAGE` is how a
        user checks an image pulled from elsewhere), so it gets no capabilities, cannot gain privileges
        (no-new-privileges: no setuid binary helps), no network, no host path but the read-only model directory,
        and a memory and a task limit (``limits``) at which a runaway ends instead of the host. Over ``nodes`` > 1:
        one such container per node (engine_nodes)."""
        if nodes > 1:
            from .engine_nodes import run_node_smoke

            return run_node_smoke(self, image, device, timeout, progress, nodes, repeat, model_dir, checks, limits)
        report_path = f"{CONTAINER_REPORT_DIR}/report.json"
        command = [contract.SMOKE_ENTRYPOINT, "--device", device, "--report", report_path,
                   "--timeout", str(max(60, timeout - 30)), "--repeat", str(repeat)]
        if checks:
            command += ["--checks", checks]
        kwargs, model_args = self.smoke_container_options(device, limits, model_dir)
        command += model_args
        started = time.monotonic()
        with self.container(image, "smoke", f"creating the smoke container of {image}", command=command,
                            **kwargs) as container:
            try:
                container.start()
            except docker.errors.APIError as exc:
                # docker-py's containers.run() would leave this container behind in state Created.
                raise EngineError(f"the smoke could not start in {image}: {exc.explanation or exc}") from None
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, ConnectionError) as exc:
                raise EngineError(f"starting the smoke in {image}: lost the Docker daemon ({exc})") from None
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
                container.reload()
                oom_killed = bool(container.attrs["State"].get("OOMKilled"))
            return SmokeRun(exit_code, json.loads(report) if report else None, logs,
                            time.monotonic() - started, timed_out, device, limits, oom_killed)

    @staticmethod
    def smoke_container_options(device: str, limits: SmokeLimits, model_dir: Path | None,
                                network: str = "none") -> tuple[dict, list[str]]:
        """How every smoke container is made (docker-py's create arguments) and the smoke arguments that go with
        them: no capabilities, no privilege to gain, a memory and a task limit, no network but ``network``, no host
        path but the read-only model directory."""
        memory = int(limits.memory_gb * 1e9)
        kwargs: dict = dict(shm_size="2g", stdin_open=False, cap_drop=["ALL"], security_opt=["no-new-privileges:true"],
                            mem_limit=memory, memswap_limit=memory, pids_limit=limits.pids)
        kwargs["network_mode" if network == "none" else "network"] = network
        args: list[str] = []
        if model_dir is not None:  # a real checkpoint, read-only
            kwargs["volumes"] = {str(Path(model_dir).absolute()): {"bind": CONTAINER_MODEL_DIR, "mode": "ro"}}
            args = ["--model-dir", CONTAINER_MODEL_DIR, "--model-label", str(Path(model_dir).absolute())]
        if device == "gpu":
            kwargs["device_requests"] = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
        return kwargs, args

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
        return self.read_image_files(image, [path])[path]

    def read_image_files(self, image: str, paths: list[str]) -> dict[str, bytes | None]:
        what = f"reading files from {image[:19]}"
        with self.container(image, "inspect", what, command=["true"]) as container, engine_errors(what):
            return {path: self._read_file(container, path) for path in paths}

    def run_in_image(self, image: str, command: list[str], timeout: int = 300) -> tuple[int, str]:
        """(exit status, output) of ``command`` in a container of ``image`` with no network; always removed."""
        what = f"running {command[0]} in {image}"
        with self.container(image, "inspect", what, command=command, network_mode="none") as container, \
                engine_errors(what):
            container.start()
            code = container.wait(timeout=timeout)["StatusCode"]
            return code, container.logs().decode(errors="replace")

    def history(self, image: str) -> list[dict]:
        """The image's history, oldest first."""
        with engine_errors(f"reading the history of {image[:19]}"):
            return list(reversed(self.api.history(image)))
