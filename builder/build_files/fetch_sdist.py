"""Fetch the source distribution a hash-locked requirement names, and check it, inside a build stage.

    python fetch_sdist.py REQUIREMENT_FILE DEST_DIR

REQUIREMENT_FILE holds one ``name==version --hash=sha256:...`` entry of a vlmbuild lockfile. The file is
looked up on the index's simple API (PEP 691 JSON, or the PEP 503 HTML page) by its sha256, downloaded and
checked again after download: a file whose bytes do not hash to a locked value never reaches the build. Why not
``pip download``: it prepares the sdist's metadata first, running its setup.py (DeepSpeed's imports torch and
fails where torch is absent), and uv has no download-only command.

Standard library only: it runs with the image's own Python before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import NoReturn

INDEX = os.environ.get("UV_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")
HTML_LINK = re.compile(r'<a[^>]+href="([^"]+)"[^>]*>([^<]+)</a>', re.I)


def fail(message: str) -> NoReturn:
    sys.exit(f"fetch_sdist: {message}")


def index_files(name: str) -> list[tuple[str, str, str]]:
    """(filename, url, sha256) of every file the index lists for ``name``."""
    page = f"{INDEX.rstrip('/')}/{re.sub(r'[-_.]+', '-', name).lower()}/"
    request = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(request, timeout=120) as response:
        body = response.read().decode()
        kind = response.headers.get("Content-Type", "")
    if "json" in kind:
        data = json.loads(body)
        return [(f["filename"], urllib.parse.urljoin(page, f["url"]), f.get("hashes", {}).get("sha256", ""))
                for f in data["files"]]
    files = []
    for href, text in HTML_LINK.findall(body):
        url = urllib.parse.urljoin(page, href.replace("&amp;", "&"))
        digest = re.search(r"#sha256=([0-9a-f]{64})", url)
        files.append((text.strip(), url.split("#", 1)[0], digest.group(1) if digest else ""))
    return files


def main(requirement_file: str, dest: str) -> None:
    text = Path(requirement_file).read_text()
    entry = ENTRY.search(text.strip())
    hashes = set(HASH.findall(text))
    if not entry or not hashes:
        fail(f"{requirement_file}: expected one 'name==version --hash=sha256:...' entry")
    name, version = entry.group(1), entry.group(2)
    candidates = [(f, u) for f, u, h in index_files(name) if h in hashes and f.endswith((".tar.gz", ".zip"))]
    if not candidates:
        fail(f"the index {INDEX} lists no sdist of {name} {version} with a locked sha256")
    filename, url = candidates[0]
    data = urllib.request.urlopen(url, timeout=600).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest not in hashes:
        fail(f"{filename}: downloaded bytes hash to {digest}, which the lockfile does not list")
    Path(dest, filename).write_bytes(data)
    print(f"fetch_sdist: {filename} sha256:{digest} (locked)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        fail("usage: fetch_sdist.py REQUIREMENT_FILE DEST_DIR")
    main(sys.argv[1], sys.argv[2])
