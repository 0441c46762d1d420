"""vlmbuild: container images for Qwen2.5-VL training, validated by running the training path inside them.

Kept import-light on purpose: the smoke subpackage ships inside every image and imports ``vlmbuild``
with only torch, transformers and deepspeed (and their dependencies) installed.
"""

__version__ = "0.1.0"
