"""A tiny random-weight Qwen2.5-VL, built locally (no hub), and a batch it can train on.

The shapes follow the constraints transformers 4.49 enforces (its Qwen2_5_VLConfig and rotary code):
``sum(mrope_section) == head_dim / 2``, ``out_hidden_size == hidden_size`` and an even image grid
because ``spatial_merge_size == 2``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Token ids of the tiny vocabulary.
BOS, EOS, PAD, VISION_START, IMAGE_TOKEN, VIDEO_TOKEN = 0, 1, 2, 3, 4, 5
VOCAB_SIZE = 128
# The tokenizer's special tokens, in id order: the Qwen2.5-VL names, so its processor finds them.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|pad|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>",
                  "<|vision_end|>", "<|im_start|>")
# One character a token; the rest of the vocabulary is filled with unused tokens up to VOCAB_SIZE.
CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;?!'\n<>/=-+*()[]{}#%&_|"
# 56x56 pixels: 4x4 patches of 14 pixels, merged 2x2 into 4 image tokens (the grid of IMAGE_GRID_THW).
IMAGE_SIDE = 56
# One image of 4x4 patches (temporal 1); merged 2x2 it becomes 4 image tokens.
IMAGE_GRID_THW = (1, 4, 4)
PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal_patch_size * patch_size**2 = 1176


def tiny_config() -> Any:
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_window_layers=2,
        tie_word_embeddings=True,
        rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]},
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        vision_start_token_id=VISION_START,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=64,
            spatial_merge_size=2,
            fullatt_block_indexes=[1],
        ),
    )


def image_text_batch(device: Any, dtype: Any, config: Any = None, seed: int = 1234, text_tokens: int = 12) -> dict[str, Any]:
    """One sample: BOS, <vision_start>, the image's tokens, then text; labels only on the text.

    Token ids come from ``config`` (a real Qwen2.5-VL's are in the 151k range), the tiny vocabulary's otherwise.
    """
    import torch

    def token(name: str, default: int) -> int:
        value = getattr(config, name, None) if config is not None else None
        return default if value is None else int(value)

    bos, eos = token("bos_token_id", BOS), token("eos_token_id", EOS)
    vision_start, image_token = token("vision_start_token_id", VISION_START), token("image_token_id", IMAGE_TOKEN)
    vocab = token("vocab_size", VOCAB_SIZE)
    gen = torch.Generator().manual_seed(seed)
    t, h, w = IMAGE_GRID_THW
    n_patches = t * h * w
    n_image_tokens = n_patches // 4
    text = torch.randint(10, min(vocab, 1000), (text_tokens,), generator=gen)
    ids = torch.cat(
        [torch.tensor([bos, vision_start]), torch.full((n_image_tokens,), image_token), text, torch.tensor([eos])]
    )
    labels = ids.clone()
    labels[: 2 + n_image_tokens] = -100
    pixel_values = torch.randn(n_patches, PATCH_DIM, generator=gen)
    return {
        "input_ids": ids.unsqueeze(0).to(device),
        "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long, device=device),
        "labels": labels.unsqueeze(0).to(device),
        "pixel_values": pixel_values.to(device=device, dtype=dtype),
        "image_grid_thw": torch.tensor([IMAGE_GRID_THW], device=device),
    }


def tiny_processor(vocab_size: int = VOCAB_SIZE, special_ids: dict[str, int] | None = None) -> Any:
    """A Qwen2.5-VL processor (image processor + tokenizer) for a tiny vocabulary, made without the hub.

    One token per character (a WordLevel model over CHARACTERS), the special tokens at the ids the tiny config
    names (or at ``special_ids``, token -> id, for a checkpoint of other ids), and an image processor that sizes
    every image to IMAGE_SIDE x IMAGE_SIDE pixels.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2_5_VLProcessor, Qwen2TokenizerFast, Qwen2VLImageProcessor

    specials = special_ids or {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    by_id = {i: token for token, i in specials.items()}
    plain = iter(list(dict.fromkeys(CHARACTERS)) + ["<|unk|>"])
    vocab: dict[str, int] = {}
    for i in range(vocab_size):
        token = by_id.get(i) or next(plain, None) or f"<|unused_{i}|>"
        vocab[token] = i
    if "<|unk|>" not in vocab:
        raise ValueError(f"a vocabulary of {vocab_size} has no room for the tiny tokenizer's characters")
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=core, bos_token=SPECIAL_TOKENS[BOS], eos_token=SPECIAL_TOKENS[EOS],
        pad_token=SPECIAL_TOKENS[PAD], unk_token="<|unk|>", additional_special_tokens=list(SPECIAL_TOKENS[3:]),
    )
    pixels = IMAGE_SIDE * IMAGE_SIDE
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=14,
                                            temporal_patch_size=2, merge_size=2)
    parts = {}
    if "video_processor" in getattr(Qwen2_5_VLProcessor, "attributes", ()):
        # transformers 4.52 made a video processor a required part of Qwen2.5-VL's processor ("Received a NoneType
        # for argument video_processor"); before, it had none. The same pixel budget as the images'.
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        parts["video_processor"] = Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=14,
                                                         temporal_patch_size=2, merge_size=2)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, **parts)


def load_processor(model_dir: Path) -> Any:
    """The processor a real checkpoint ships (tokenizer + preprocessor_config.json)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model_dir))


def tiny_images(count: int, seed: int = 0) -> list[Any]:
    """Random RGB images of IMAGE_SIDE pixels, made locally."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)) for _ in range(count)]


def chat_prompt(question: str) -> str:
    """A user turn holding one image and a question, then the assistant's turn: what the chat template of
    Qwen2.5-VL renders for an image+text message."""
    return (f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
            "<|im_start|>assistant\n")
