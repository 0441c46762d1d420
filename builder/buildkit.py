"""Building with BuildKit through the Docker CLI: secret and cache mounts, parallel stages.

The Docker SDK for Python speaks only the classic builder (https://github.com/docker/docker-py/issues/2230),
which has neither secret nor cache mounts; the engine's built-in BuildKit is reached through a Docker CLI:
``docker buildx build --load`` where the buildx plugin is installed, else a CLI older than 23 with
``DOCKER_BUILDKIT=1`` (Debian's docker.io 20.10). A newer CLI without buildx refuses BuildKit, so it is skipped.

The build's CA bundle and network settings are handed over as secrets (files in a private temporary directory,
outside the context, removed after): they reach the RUN steps that mount them and no layer, no history entry.
Progress is reported per stage (started, done in N s, cached), not one line per instruction.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckFailed, VlmbuildError
from .progress import Progress
from .smoke.rank_processes import die_with_parent

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy",
              "all_proxy")
INDEX_VARS = ("UV_INDEX_URL", "PIP_INDEX_URL", "UV_EXTRA_INDEX_URL", "PIP_EXTRA_INDEX_URL")
# Where the secrets appear inside RUN steps (BuildKit's default target for `--mount=type=secret,id=X`).
SECRET_CA = "/run/secrets/build-ca"
CLI_ENV = "VLMBUILD_DOCKER_CLI"

VERTEX = re.compile(r"^#(\d+) (.*)$")
STAGE_STEP = re.compile(r"^\[(?P<stage>[^\]\s]+) (?P<n>\d+)/(?P<total>\d+)\] (?P<text>.*)$")
DONE = re.compile(r"^DONE (\d+(?:\.\d+)?)s$")
OUTPUT = re.compile(r"^\d+(?:\.\d+)? (.*)$")


class BuildFailed(CheckFailed):
    """A Dockerfile step failed: exit 1, with the failing stage and its last output lines."""


class BuilderUnavailable(VlmbuildError):
    """No Docker CLI here can build with BuildKit."""


# ---------------------------------------------------------------- the CLI


def _client_major(cli: str) -> int | None:
    try:
        out = subprocess.run([cli, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.match(r"(\d+)\.", out.stdout.strip())
    return int(match.group(1)) if match else None


def builder_command() -> tuple[list[str], dict[str, str]]:
    """(command prefix, extra environment) of a CLI build that uses BuildKit."""
    override = os.environ.get(CLI_ENV)
    candidates = [override] if override else list(dict.fromkeys(
        p for p in (shutil.which("docker"), "/usr/bin/docker") if p and Path(p).is_file()))
    for cli in candidates:
        buildx = subprocess.run([cli, "buildx", "version"], capture_output=True, text=True)
        if buildx.returncode == 0:
            return [cli, "buildx", "build", "--load"], {}
        major = _client_major(cli)
        if major is not None and major < 23:
            return [cli, "build"], {"DOCKER_BUILDKIT": "1"}
    raise BuilderUnavailable(
        f"no Docker CLI here builds with BuildKit (tried {', '.join(candidates) or 'none'}): install the buildx "
        f"plugin, or Debian's docker.io (its 20.10 CLI, /usr/bin/docker), or name one in ${CLI_ENV}")


# ---------------------------------------------------------------- secrets


def host_ca_bundle() -> Path | None:
    """The CA bundle this host trusts for PyPI (SSL_CERT_FILE), which the build needs where TLS is intercepted."""
    value = os.environ.get("SSL_CERT_FILE")
    return Path(value) if value and Path(value).is_file() else None


def build_env_script(environ: dict[str, str] | None = None) -> str:
    """The ``build-env`` secret: sourced by every RUN that reaches the network; never in a layer."""
    environ = dict(os.environ if environ is None else environ)
    lines = ["# vlmbuild: the build's network settings, a BuildKit secret (never in a layer or the history)"]
    for var in PROXY_VARS + INDEX_VARS:
        if environ.get(var):
            lines.append(f"export {var}={shlex.quote(environ[var])}")
    lines += [
        f"if [ -s {SECRET_CA} ]; then",
        f"  export SSL_CERT_FILE={SECRET_CA} PIP_CERT={SECRET_CA} REQUESTS_CA_BUNDLE={SECRET_CA}",
        f"  APT_OPTIONS='-o Acquire::https::CAInfo={SECRET_CA}'",
        "else",
        "  APT_OPTIONS=''",
        "fi",
        "export UV_CACHE_DIR=/root/.cache/uv UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never",
        "",
    ]
    return "\n".join(lines)


def write_secrets(directory: Path, ca_bundle: Path | None) -> dict[str, Path]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    env_file, ca_file = directory / "build-env", directory / "build-ca"
    env_file.write_text(build_env_script())
    ca_file.write_bytes(ca_bundle.read_bytes() if ca_bundle else b"")
    for f in (env_file, ca_file):
        f.chmod(0o600)
    return {"build-env": env_file, "build-ca": ca_file}


# ---------------------------------------------------------------- progress


@dataclass
class StageState:
    started: float
    total: int = 0
    done: set[int] = field(default_factory=set)
    cached: set[int] = field(default_factory=set)
    pulled: set[int] = field(default_factory=set)  # FROM steps: neither cached nor run
    announced: bool = False
    reported: bool = False


class PlainLog:
    """Reads BuildKit's ``--progress=plain`` output; tells a person when each stage starts and ends."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.vertices: dict[int, tuple[str, int, str]] = {}  # id -> (stage, step, instruction)
        self.output: dict[int, deque[str]] = defaultdict(lambda: deque(maxlen=30))
        self.stages: dict[str, StageState] = {}
        self.failed: int | None = None
        self.error_lines: list[str] = []
        self.tail: deque[str] = deque(maxlen=40)

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        if not line.strip():
            return
        self.tail.append(line)
        match = VERTEX.match(line)
        if not match:
            if line.startswith(("error:", "ERROR:", "failed to solve")):
                self.error_lines.append(line)
            return
        vid, rest = int(match.group(1)), match.group(2)
        if vid not in self.vertices:
            self._new_vertex(vid, rest)
            return
        if rest == "CACHED":
            self._finish(vid, cached=True)
        elif DONE.match(rest):
            self._finish(vid, cached=False)
        elif rest.startswith("ERROR"):
            self.failed = vid
            self.error_lines.append(rest)
        else:
            out = OUTPUT.match(rest)
            if out:
                self.output[vid].append(out.group(1))
                self._announce(self.vertices[vid][0])

    def _announce(self, stage: str) -> None:
        """A stage is announced when it really runs (cached stages only say so when they end)."""
        state = self.stages.get(stage)
        if state is not None and not state.announced:
            state.announced = True
            self.progress.info(f"stage {stage}: running ({state.total} step{'s' if state.total > 1 else ''})")

    def _new_vertex(self, vid: int, text: str) -> None:
        step = STAGE_STEP.match(text)
        if step:
            stage, n, total = step.group("stage"), int(step.group("n")), int(step.group("total"))
            self.vertices[vid] = (stage, n, step.group("text"))
            if stage not in self.stages:
                self.stages[stage] = StageState(time.monotonic(), total)
            return
        self.vertices[vid] = ("", 0, text)
        if text.startswith("exporting to image"):
            self.progress.info("exporting the image")

    def _finish(self, vid: int, cached: bool) -> None:
        stage, n, text = self.vertices[vid]
        state = self.stages.get(stage)
        if state is None:
            return
        state.done.add(n)
        if text.startswith("FROM "):
            state.pulled.add(n)
        elif cached:
            state.cached.add(n)
        else:
            self._announce(stage)
        if not state.reported and len(state.done) >= state.total:
            state.reported = True
            seconds = time.monotonic() - state.started
            how = "cached" if state.done - state.pulled <= state.cached else f"done in {seconds:.0f}s"
            # on GitHub Actions a fold holding the stage's last output lines
            output = [line for v, (s, _, _) in self.vertices.items() if s == stage for line in self.output[v]]
            self.progress.fold(f"stage {stage}: {how}", output)

    def failure(self) -> str:
        """The failing step and its last output lines, for a person."""
        if self.failed is not None:
            stage, n, text = self.vertices.get(self.failed, ("?", 0, "?"))
            total = self.stages[stage].total if stage in self.stages else "?"
            lines = "\n".join(f"    {line}" for line in self.output[self.failed])
            reason = self.error_lines[0] if self.error_lines else "failed"
            return f"build failed at [{stage} {n}/{total}] {text[:200]}\n  {reason}\n  last output lines:\n{lines}"
        tail = "\n".join(f"    {line}" for line in self.tail)
        return "build failed:\n" + tail


# ---------------------------------------------------------------- the build


def build(context: Path, progress: Progress, nocache: bool = False, cache_from: tuple[str, ...] = (),
          inline_cache: bool = False, target: str | None = None) -> str:
    """Build ``context`` (its ``target`` stage; None: the image) with BuildKit, untagged; the image id. ``cache_from``:
    images whose inline cache BuildKit may reuse layers from (a ref not there is skipped with a warning);
    ``inline_cache``: write this build's cache into the image's config, so the image pushed is a cache for the next
    machine (vlmbuild.build_cache). Raises BuildFailed (a step failed), BuilderUnavailable, or VlmbuildError (the CLI
    failed otherwise). Ctrl-C and SIGTERM cancel the build."""
    prefix, extra_env = builder_command()
    log = PlainLog(progress)
    with tempfile.TemporaryDirectory(prefix="vlmbuild-secrets-") as tmp:
        secrets = write_secrets(Path(tmp) / "s", host_ca_bundle())
        iidfile = Path(tmp) / "iid"
        cmd = prefix + ["--progress=plain", "--iidfile", str(iidfile)]
        for name, path in secrets.items():
            cmd += ["--secret", f"id={name},src={path}"]
        if nocache:
            cmd.append("--no-cache")
        for ref in cache_from:
            cmd += ["--cache-from", ref]
        if inline_cache:
            # BuildKit's inline cache (final stage, mode=min): the one cache export Debian's 20.10 CLI has, and the one
            # buildx's default docker driver has (registry caches need a docker-container builder)
            cmd += ["--build-arg", "BUILDKIT_INLINE_CACHE=1"]
        if target:
            cmd += ["--target", target]
        cmd.append(str(context))
        # SIGINT to the CLI if vlmbuild dies without unwinding (SIGKILL, OOM): the CLI then cancels the build in
        # BuildKit as on Ctrl-C, instead of building on and leaving an untagged candidate nobody removes.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env={**os.environ, **extra_env}, start_new_session=True,
                                preexec_fn=functools.partial(die_with_parent, os.getpid(), signal.SIGINT))
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.feed(line)
            code = proc.wait()
        except BaseException:
            # Ctrl-C or SIGTERM: the CLI cancels the build in BuildKit when interrupted; never leave it running.
            _stop(proc)
            raise
        if code != 0:
            if log.failed is not None:
                raise BuildFailed(log.failure())
            raise VlmbuildError(f"docker build exited with status {code}:\n" + "\n".join(log.tail))
        image_id = iidfile.read_text().strip() if iidfile.is_file() else ""
    if not image_id:
        raise VlmbuildError(f"building {context}: BuildKit reported no image id")
    return image_id


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
