"""The smoke gate: Qwen2.5-VL under DeepSpeed ZeRO-3, run inside an image or in the current environment."""
