"""Spec validation: the real spec loads; every file of the broken-spec corpus is refused with its key path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO, SPECS
from vlmbuild.errors import SpecError
from vlmbuild.spec import load_spec

BROKEN = sorted((SPECS / "broken").glob("*.yaml"))


def expectations(path: Path) -> tuple[str, str]:
    head = path.read_text().splitlines()[:2]
    key = re.match(r"# expect-key: ?(.*)$", head[0]).group(1).strip()
    text = re.match(r"# expect-text: (.*)$", head[1]).group(1).strip()
    return key, text


def test_the_real_spec_loads_with_its_variants():
    spec = load_spec(REPO / "images" / "vlm-r1.yaml")
    assert set(spec.variants) >= {"seed", "cu124", "local"}
    assert spec.variants["seed"].expected_rejected
    assert spec.variants["seed"].packages["deepspeed"] == "==0.15.4"
    cu = spec.variants["cu124"]
    assert cu.base_image == (
        "debian:trixie-slim@sha256:3a39a0592364683e6bab97937b72cad5a8fa6dcbbee90edb3bb48c7f8e94f258")
    # flash-attn's cp313 wheel has no sha256 from two public records: built from PyPI's sdist, pinned by the lock;
    # the spec leaves nothing out, a build given --leave-out flash-attn does
    build = cu.source_builds["flash-attn"]
    assert cu.packages["flash-attn"] == "==2.7.4.post1" and build.version == "2.7.4.post1"
    assert "two independent public records" in build.why
    assert build.env["FLASH_ATTN_CUDA_ARCHS"] == "80;90" and build.env["FLASH_ATTENTION_FORCE_BUILD"] == "TRUE"
    assert not cu.wheels and not cu.left_out and list(cu.built_from_source) == ["flash-attn"]
    assert (cu.python, cu.cuda, cu.cuda_archs) == ("3.13", "12.4", "8.0;8.6;9.0")
    local = spec.variants["local"]
    assert (local.python, local.cuda) == ("3.11", None)
    # the local variant is the same stack, not a fork: same packages (but cu124's CUDA kernels), same template
    assert local.packages == {n: s for n, s in cu.packages.items() if n not in ("flash-attn", "wheel")}
    assert not local.wheels and local.base_image == "vlmbuild-local/debian:bookworm"


def test_layers_put_heavy_packages_first_and_fast_movers_last():
    spec = load_spec(REPO / "images" / "vlm-r1.yaml")
    names = [layer.name for layer in spec.layers]
    assert spec.layer_of("torch").name == names[0]
    assert spec.layer_of("nvidia-cudnn-cu12").name == names[0]
    assert spec.layer_of("triton").name == names[0]
    for fast in ("transformers", "trl", "accelerate", "tokenizers"):
        assert spec.layer_of(fast).name == "training", fast
    # the recipe's packages sit in a layer of their own, above the training layer
    assert names[-1] == "recipe" and names.index("recipe") > names.index("training")
    for package in ("wandb", "math-verify", "python-levenshtein", "json-repair"):
        assert spec.layer_of(package).name == "recipe", package
    assert spec.layer_of("some-unknown-package").name == "libraries"


def test_the_recipe_group_is_data_with_its_imports():
    spec = load_spec(REPO / "images" / "vlm-r1.yaml")
    recipe = spec.groups["recipe"]
    assert {"babel", "math-verify", "python-levenshtein", "json-repair", "openai", "matplotlib", "pycocotools",
            "wandb", "tensorboardx"} <= set(recipe.packages)
    assert {"math_verify", "latex2sympy2_extended", "antlr4", "Levenshtein", "json_repair"} <= set(recipe.imports)
    for variant in spec.variants.values():  # every variant carries the group and imports it
        assert set(recipe.packages) <= set(variant.packages), variant.name
        assert set(recipe.imports) <= set(variant.imports) and "pip" in variant.packages, variant.name


def test_the_valid_mini_spec_loads():
    spec = load_spec(SPECS / "valid" / "mini.yaml")
    assert spec.variant("good").tag({"torch": "2.6.0", "deepspeed": "0.19.8"}) == "py3.11-torch2.6.0-ds0.19.8"


def test_the_corpus_is_not_empty():
    assert len(BROKEN) >= 20


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_spec_is_refused_naming_file_and_key(path: Path):
    key, text = expectations(path)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert info.value.key == key, message
    assert text in message, message


def test_a_tag_that_renders_invalid_is_refused():
    spec = load_spec(SPECS / "valid" / "mini.yaml")
    with pytest.raises(SpecError, match="not a valid docker tag"):
        spec.variant("good").tag({"torch": "2.6.0+cu124/x", "deepspeed": "0.19.8"})
