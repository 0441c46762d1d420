#!/bin/bash
# vlmbuild: build DeepSpeed's wheel from its sdist with the ops compiled in (the deepspeed-wheel stage).
#
#   build-deepspeed.sh SDIST_REQUIREMENT OUT_DIR WHEEL_CACHE INPUT_FILE...
#
# The sdist is the one the lockfile names, checked by sha256 (fetch_sdist.py). It is built against the torch and
# the build requirements already installed from the lockfile (no build isolation: nothing unhashed is fetched),
# with the DS_BUILD_* variables, the portable compiler and the parallel build the environment sets.
#
# A built wheel is kept in WHEEL_CACHE (a BuildKit cache mount) under a key of everything that decides its
# bytes: the sdist's hash, the lock layers it was built against (INPUT_FILE...), the compiler, the C library,
# Python and the build variables. A rebuild whose inputs are all unchanged (a new base image with the same
# toolchain, say) takes the wheel from there instead of compiling the ops again.
set -euo pipefail
requirement=$1 out=$2 cache=$3
shift 3
here=$(dirname "$0")
python=/opt/venv/bin/python

key=$( {
  cat "$requirement" "$@"
  "${VLMBUILD_REAL_CXX:-g++}" --version | head -n1
  ldd --version 2>&1 | head -n1
  "$python" -VV
  env | grep -E '^(DS_|TORCH_CUDA_ARCH_LIST=|CUDA_HOME=|VLMBUILD_MARCH=|VLMBUILD_SIMD=)' | sort
  sha256sum "$here/portable-cxx" "$here/build_ext.cfg" "$0"
} | sha256sum | cut -c1-32)

mkdir -p "$out"
if [ -s "$cache/$key/SHA256SUMS" ] && (cd "$cache/$key" && sha256sum --quiet -c SHA256SUMS); then
  cp "$cache/$key"/*.whl "$cache/$key/SHA256SUMS" "$out/"
  echo "build-deepspeed: reused the wheel built from the same inputs (key $key)"
  exit 0
fi

sdist=$(mktemp -d)
"$python" "$here/fetch_sdist.py" "$requirement" "$sdist"
/opt/build-tools/bin/uv build --wheel --no-build-isolation --python "$python" --out-dir "$out" "$sdist"/*.tar.gz
rm -rf "$sdist"
(cd "$out" && sha256sum ./*.whl > SHA256SUMS)
mkdir -p "$cache/$key" && cp "$out"/*.whl "$out/SHA256SUMS" "$cache/$key/"
echo "build-deepspeed: built $(cd "$out" && ls ./*.whl) (key $key)"
