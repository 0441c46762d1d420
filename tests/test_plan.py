"""The plan's own refusals: a lockfile that cannot fill the spec's layers (the spec's layering is checked on load,
tests/specs/broken/layering-*.yaml)."""

from __future__ import annotations

import pytest
from conftest import REPO
from vlmbuild.errors import VlmbuildError
from vlmbuild.lockfile import parse_lockfile
from vlmbuild.plan import make_plan
from vlmbuild.spec import load_spec

HASH = "--hash=sha256:" + "a" * 64


def lock_of(*pins: str):
    return parse_lockfile("".join(f"{pin} {HASH}\n" for pin in pins))


def test_a_lock_without_torch_is_refused_naming_the_lockfile():
    variant = load_spec(REPO / "images" / "vlm-r1.yaml").variant("local")
    with pytest.raises(VlmbuildError, match=r"local\.txt: torch is not locked"):
        make_plan(variant, lock_of("packaging==24.2", "deepspeed==0.19.8", "transformers==4.49.0", "trl==0.17.0"))


def test_a_lock_with_nothing_to_install_in_place_is_refused():
    variant = load_spec(REPO / "images" / "vlm-r1.yaml").variant("local")
    with pytest.raises(VlmbuildError, match="no layer installed in place holds a package"):
        make_plan(variant, lock_of("deepspeed==0.19.8", "transformers==4.49.0", "trl==0.17.0"))


def test_the_plan_is_computed_once_and_frozen():
    variant = load_spec(REPO / "images" / "vlm-r1.yaml").variant("local")
    from vlmbuild.lock import load_variant_lock

    plan = make_plan(variant, load_variant_lock(variant))
    with pytest.raises(AttributeError):
        plan.tag = "other"  # type: ignore[misc]
    assert plan.tag == variant.tag(plan.lock.pins)
    assert plan.wheel_stages[0] == "deepspeed-wheel" and plan.layers[0].name == "torch"
    assert plan.lock.sha256 is plan.lock.sha256  # hashed once, then kept
