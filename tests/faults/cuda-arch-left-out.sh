#!/bin/bash
# vlmbuild fault injection, run inside a built CUDA image (tests/test_cu124_docker.py): DeepSpeed's fused_adam built
# again, the way DeepSpeed's setup.py builds it (its op builder's extension, with the image's nvcc and no GPU), for
# a TORCH_CUDA_ARCH_LIST of 8.0 alone (one nvcc pass, not three: the suite's time), which leaves out 8.6 and 9.0 and
# the PTX, and put in place of the image's; then the gate's cuda_ops check.
# Then the op's shared object cut short: it no longer loads.
set -u
cd /opt/venv/lib/python3.*/site-packages/deepspeed/ops
so=$(ls adam/fused_adam_op*.so)
DS_ACCELERATOR=cuda TORCH_CUDA_ARCH_LIST="8.0" CC=g++-13 CXX=g++-13 MAX_JOBS=2 python - <<'PY' >/tmp/build.log 2>&1
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension
from deepspeed.ops.op_builder import FusedAdamBuilder
setup(name="fault", ext_modules=[FusedAdamBuilder().builder()], cmdclass={"build_ext": BuildExtension},
      script_args=["-q", "build_ext", "--build-lib", "/tmp/build", "--build-temp", "/tmp/build-temp"])
PY
echo "BUILT=$? $(cuobjdump --list-elf --list-ptx /tmp/build/deepspeed/ops/adam/fused_adam_op*.so | tr '\n' ' ')"
cp /tmp/build/deepspeed/ops/adam/fused_adam_op*.so "$so"
vlmbuild-smoke --device cpu --checks cuda_ops
echo "EXIT=$?"
head -c 4096 /tmp/build/deepspeed/ops/adam/fused_adam_op*.so > "$so"
vlmbuild-smoke --device cpu --checks cuda_ops
echo "EXIT=$?"
