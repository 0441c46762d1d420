"""The build cache's references: what a build imports and where the wheel stages' caches live (the real engine and
registry round trip is in test_pipeline_docker.py)."""

from __future__ import annotations

import pytest
from vlmbuild.build_cache import BuildCache, stage_ref
from vlmbuild.engine_api import split_ref
from vlmbuild.errors import VlmbuildError


def test_each_wheel_stage_cache_lives_beside_the_image_cache():
    assert stage_ref("ghcr.io/o/vlmbuild-cache:cu124", "deepspeed-wheel") == "ghcr.io/o/vlmbuild-cache:cu124-deepspeed-wheel"
    assert stage_ref("127.0.0.1:5000/c", "deepspeed-wheel-cpu") == "127.0.0.1:5000/c:latest-deepspeed-wheel-cpu"
    cache = BuildCache(("127.0.0.1:5000/a:x", "127.0.0.1:5000/b:y"))
    assert cache.import_refs(["deepspeed-wheel", "deepspeed-wheel-cpu"]) == (
        "127.0.0.1:5000/a:x", "127.0.0.1:5000/a:x-deepspeed-wheel", "127.0.0.1:5000/a:x-deepspeed-wheel-cpu",
        "127.0.0.1:5000/b:y", "127.0.0.1:5000/b:y-deepspeed-wheel", "127.0.0.1:5000/b:y-deepspeed-wheel-cpu")
    assert BuildCache().import_refs(["deepspeed-wheel"]) == ()


def test_a_registry_port_is_not_a_tag():
    assert split_ref("127.0.0.1:5000/vlmbuild-test/vlm-r1") == ("127.0.0.1:5000/vlmbuild-test/vlm-r1", "latest")
    assert split_ref("127.0.0.1:5000/vlmbuild-test/vlm-r1:local") == ("127.0.0.1:5000/vlmbuild-test/vlm-r1", "local")


@pytest.mark.parametrize("ref", ["ghcr.io/o/c@sha256:" + "0" * 64, " "])
def test_a_cache_ref_must_be_a_tag(ref):
    with pytest.raises(VlmbuildError, match="give a repository:tag"):
        BuildCache(cache_to=ref)
