#!/bin/bash
# vlmbuild: build a wheel from the sdist a lockfile pins: DeepSpeed's with its ops compiled in (the deepspeed-wheel
# stages, and the tests' venv: the same helper, so the ops the smoke loads are built one way everywhere), and each
# source build of a spec (flash-attn's CUDA kernels, the flash-attn-wheel stage).
#
#   build-sdist-wheel.sh NAME SDIST_REQUIREMENT OUT_DIR WHEEL_CACHE INPUT_FILE...
#
# The sdist is the one the lockfile names, checked by sha256 (fetch_sdist.py). It is built against the torch and
# the build requirements already installed from the lockfile (no build isolation: nothing unhashed is fetched),
# with the build switches (DeepSpeed's DS_*, flash-attn's FLASH_*), the portable compiler and the parallel build
# the environment sets.
# VLMBUILD_PYTHON and VLMBUILD_UV name the interpreter and uv (the image's /opt/venv and tools stage by default).
#
# A built wheel is kept in WHEEL_CACHE under a key of everything that decides its bytes: the sdist's hash, what
# it was built against (INPUT_FILE...: the torch layer and the build requirements, nothing else of the lock),
# the compiler, the C library, Python and the build switches. A rebuild whose inputs are all unchanged (a new base
# image with the same toolchain, a bumped library) takes the wheel from there instead of compiling the ops again.
# pip's own wheel cache is not used: its key leaves out the DS_* variables (a CPU build reused a CUDA wheel).
#
# The sources are unpacked at one fixed path per package (DeepSpeed's __FILE__ strings end up in the ops) and the
# wheel's zip entries carry SOURCE_DATE_EPOCH: the same inputs give the same wheel bytes.
set -euo pipefail
name=$1 requirement=$2 out=$3 cache=$4
shift 4
here=$(dirname "$0")
python=${VLMBUILD_PYTHON:-/opt/venv/bin/python}
uv=${VLMBUILD_UV:-/opt/build-tools/bin/uv}

key=$( {
  echo "$name"
  cat "$requirement" "$@"
  "${VLMBUILD_REAL_CXX:-g++}" --version | head -n1
  ldd --version 2>&1 | head -n1
  "$python" -VV
  env | grep -E '^(DS_|FLASH_|TORCH_CUDA_ARCH_LIST=|CUDA_HOME=|VLMBUILD_MARCH=|VLMBUILD_SIMD=|SOURCE_DATE_EPOCH=|PYTHONHASHSEED=)' | sort
  sha256sum "$here/portable-cxx" "$here/build_ext.cfg" "$0" | cut -d' ' -f1
} | sha256sum | cut -c1-32)

mkdir -p "$out"
if [ -s "$cache/$key/SHA256SUMS" ] && (cd "$cache/$key" && sha256sum --quiet -c SHA256SUMS); then
  cp -p "$cache/$key"/*.whl "$cache/$key/SHA256SUMS" "$out/"
  echo "build-sdist-wheel: reused the $name wheel built from the same inputs (key $key)"
  exit 0
fi

src=${VLMBUILD_SRC:-/tmp/$name-src}
rm -rf "$src" "$src.sdist" && mkdir -p "$src" "$src.sdist"
"$python" "$here/fetch_sdist.py" "$requirement" "$src.sdist"
tar -xzf "$src.sdist"/*.tar.gz -C "$src" --strip-components=1
"$uv" build --wheel --no-build-isolation --python "$python" --out-dir "$out" "$src"
rm -rf "$src" "$src.sdist"
# uv records a local wheel's mtime in the installed dist-info (uv_cache.json)
touch -d "@${SOURCE_DATE_EPOCH:-315532800}" "$out"/*.whl
(cd "$out" && sha256sum ./*.whl > SHA256SUMS)
mkdir -p "$cache/$key" && cp -p "$out"/*.whl "$out/SHA256SUMS" "$cache/$key/"
echo "build-sdist-wheel: built $(cd "$out" && ls ./*.whl) (key $key)"
