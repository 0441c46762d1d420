"""Storage directories nothing references (vlmbuild.engine_orphans): found in a storage tree laid out as dockerd's,
and, against the real engine, made by the shape that leaks (a rebuild of layers an image holds), named by
`vlmbuild doctor`, refused while dockerd runs, and reclaimed when it is stopped."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import TEST_REPO, run_cli
from vlmbuild.engine_orphans import find_orphans, reclaim, remove_orphans
from vlmbuild.errors import VlmbuildError


def storage_tree(root: Path) -> None:
    """dockerd's layout, as on disk: a layer (cache-id, no newline), a container's mount and init layers, a
    BuildKit snapshot known only to BuildKit's database, and one directory nobody knows, with overlay2's short
    links to each."""
    layerdb = root / "image" / "overlay2" / "layerdb"
    (layerdb / "sha256" / "abc").mkdir(parents=True)
    (layerdb / "sha256" / "abc" / "cache-id").write_text("layerdir")
    (layerdb / "mounts" / "c1").mkdir(parents=True)
    (layerdb / "mounts" / "c1" / "mount-id").write_text("mountdir")
    (layerdb / "mounts" / "c1" / "init-id").write_text("mountdir-init")
    (root / "buildkit").mkdir()
    (root / "buildkit" / "snapshots.db").write_bytes(b"\x00\x01bucket\x00snapshotkey25xxxxxxxxxxxxx\x00")
    (root / "buildkit" / "content").mkdir()  # not a database: a blob's bytes never keep a directory
    (root / "buildkit" / "content" / "blob").write_bytes(b"orphan25yyyyyyyyyyyyyyyyy")
    storage = root / "overlay2"
    (storage / "l").mkdir(parents=True)
    for name, short in (("layerdir", "AAA"), ("mountdir", "BBB"), ("mountdir-init", "CCC"),
                        ("snapshotkey25xxxxxxxxxxxxx", "DDD"), ("orphan25yyyyyyyyyyyyyyyyy", "EEE")):
        (storage / name / "diff").mkdir(parents=True)
        (storage / name / "link").write_text(short)
        (storage / "l" / short).symlink_to(f"../{name}/diff")
    (storage / "orphan25yyyyyyyyyyyyyyyyy" / "diff" / "blob").write_bytes(b"x" * 100_000)


def test_the_directories_nothing_references_are_found_and_removed_with_their_links_alone(tmp_path):
    storage_tree(tmp_path)
    found = find_orphans(tmp_path)
    assert [o.name for o in found] == ["orphan25yyyyyyyyyyyyyyyyy"]
    assert found[0].size >= 100_000
    removed = remove_orphans(tmp_path)
    assert [o.name for o in removed] == ["orphan25yyyyyyyyyyyyyyyyy"]
    left = sorted(p.name for p in (tmp_path / "overlay2").iterdir())
    assert left == ["l", "layerdir", "mountdir", "mountdir-init", "snapshotkey25xxxxxxxxxxxxx"]
    assert sorted(p.name for p in (tmp_path / "overlay2" / "l").iterdir()) == ["AAA", "BBB", "CCC", "DDD"]
    assert find_orphans(tmp_path) == []


def test_a_storage_that_cannot_be_read_is_an_error_not_an_empty_answer(tmp_path):
    with pytest.raises(VlmbuildError, match="cannot read the engine's storage"):
        find_orphans(tmp_path / "nothing-here")


@pytest.mark.docker
def test_a_rebuild_of_layers_an_image_holds_leaves_storage_that_doctor_names_and_a_stopped_engine_gets_back(
        client, tmp_path):
    """The shape that leaks on dockerd's BuildKit (moby/moby#45939): a layer made again while an image holds the
    same one. vlmbuild's layers are reproducible, so a rebuild after a prune, or with --no-cache, is this shape."""
    from vlmbuild import buildkit
    from vlmbuild.engine import Engine
    from vlmbuild.progress import Progress

    base = "vlmbuild-local/debian:bookworm"
    Engine().resolve_base(base)
    root = Path(client.info()["DockerRootDir"])
    context = tmp_path / "context"
    context.mkdir()
    # the same bytes on every build of this file (mtimes pinned), and bytes no other image has (the marker)
    (context / "Dockerfile").write_text(
        f"FROM {base}\nRUN head -c 100000000 /dev/zero > /blob && echo {uuid.uuid4().hex} > /marker "
        "&& touch -d @0 /blob /marker\n")
    ref = f"{TEST_REPO}:orphan-first"
    first = buildkit.build(context, Progress("first"))
    client.images.get(first).tag(ref)
    try:
        before = {o.name for o in find_orphans(root, sizes=False)}
        again = buildkit.build(context, Progress("again"), nocache=True)
        assert client.images.get(again).attrs["RootFS"]["Layers"] == client.images.get(first).attrs["RootFS"]["Layers"]
        client.api.prune_builds(all=True)
        new = [o for o in find_orphans(root) if o.name not in before]
        assert sum(o.size or 0 for o in new) >= 100_000_000, new  # the layer, made twice, kept twice

        doctor = run_cli("doctor", "vlm-r1", "--json")
        listed = {o["name"] for o in json.loads(doctor.out)["orphaned_storage"]}
        assert {o.name for o in new} <= listed
        refused = run_cli("doctor", "--reclaim-orphans", "--data-root", str(root))
        assert refused.code == 2 and "dockerd is running" in refused.err, refused.err
        with pytest.raises(VlmbuildError, match="stop it first"):
            reclaim(root)

        from vlmbuild.engine_setup import stop_started_dockerd

        if not stop_started_dockerd():
            pytest.skip("this engine's dockerd was not started by vlmbuild.engine_setup: it is not ours to stop")
        setup = subprocess.run([sys.executable, "-m", "vlmbuild.engine_setup"], capture_output=True, text=True,
                               timeout=300)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        assert "storage directories nothing referenced" in setup.stdout, setup.stdout
        for _ in range(10):  # the client's pooled connection died with the daemon
            try:
                client.ping()
                break
            except Exception:  # noqa: BLE001
                time.sleep(1)
        assert not [o for o in new if (root / "overlay2" / o.name).exists()]
        # what the engine references survived: the image still runs, its layer whole
        out = client.containers.run(ref, ["sh", "-c", "wc -c < /blob"], remove=True)
        assert out.strip() == b"100000000"
    finally:
        for image in (ref, first):
            try:
                client.images.remove(image, force=True)
            except Exception:  # noqa: BLE001 - gone with the tag
                pass
