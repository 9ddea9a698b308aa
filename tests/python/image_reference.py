"""Reference output of transformers' Qwen2-VL image processor for tests/image_preprocess_parity.rs.

    python tests/python/image_reference.py OUT_DIR

Writes into OUT_DIR:
  images/            synthetic images of odd sizes (smooth gradients, shapes, noise): RGB, RGBA,
                     greyscale, palette with transparency PNGs and a JPEG
  model/             a Qwen2-VL-7B-Instruct style preprocessor_config.json (min/max_pixels keys)
  model_small/       the same with `size: {shortest_edge, longest_edge}` and a small longest_edge
  reference.safetensors  per case: `<name>.rgb` (Pillow's decode + transformers' convert_to_rgb,
                     uint8 HxWx3), `<name>.resized` (Pillow's bicubic resize of that, uint8),
                     `<name>.pixel_values` (float32) and `<name>.grid` (int64); `batch.*` for all
                     `model` cases processed in one call
  manifest.json      the cases (file, config folder, original/resized (height, width)), the
                     processor class AutoImageProcessor chose, and library versions

Images go through `AutoImageProcessor.from_pretrained(folder)`, i.e. the class transformers
picks by default for a Qwen2-VL `preprocessor_config.json`. Nothing is downloaded.
"""
import json
import os
import pathlib
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import AutoImageProcessor  # noqa: E402
from transformers.image_transforms import convert_to_rgb  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # noqa: E402
from transformers.utils import logging  # noqa: E402

logging.set_verbosity_error()

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def picture(h, w, seed):
    """A photo-like uint8 RGB array: gradients, a disc, a rectangle, stripes and noise."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * (x / max(w - 1, 1))
    g = 255 * (y / max(h - 1, 1))
    b = 127.5 + 127.5 * np.sin(x / 7.0 + y / 11.0)
    img = np.stack([r, g, b], -1)
    cy, cx, rad = h * 0.4, w * 0.6, min(h, w) * 0.3
    disc = (y - cy) ** 2 + (x - cx) ** 2 < rad**2
    img[disc] = [230, 40, 60]
    img[int(h * 0.1) : int(h * 0.3) + 1, int(w * 0.1) : int(w * 0.5) + 1] = [20, 20, 200]
    img[:, ::9] = img[:, ::9] * 0.5
    img += rng.normal(0, 12, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def main(out):
    out = pathlib.Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)

    base = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    }
    configs = {
        "model": {**base, "min_pixels": 3136, "max_pixels": 12845056},
        "model_small": {**base, "size": {"shortest_edge": 3136, "longest_edge": 100000}},
    }
    for name, cfg in configs.items():
        (out / name).mkdir(exist_ok=True)
        (out / name / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))

    cases = []

    def add(name, file, config="model"):
        cases.append({"name": name, "file": f"images/{file}", "config": config})

    Image.fromarray(picture(333, 517, 1)).save(images / "rgb_333x517.png")
    add("rgb_333x517", "rgb_333x517.png")
    Image.fromarray(picture(517, 333, 2)).save(images / "rgb_517x333.png")
    add("rgb_517x333", "rgb_517x333.png")
    Image.fromarray(picture(1000, 75, 3)).save(images / "tall_1000x75.png")
    add("tall_1000x75", "tall_1000x75.png")
    Image.fromarray(picture(29, 41, 4)).save(images / "tiny_29x41.png")
    add("tiny_29x41", "tiny_29x41.png")
    Image.fromarray(picture(64, 64, 5)).save(images / "square_64x64.png")
    add("square_64x64", "square_64x64.png")
    # Already a multiple of 28 within the bounds: no resize, so pixel values test the layout.
    Image.fromarray(picture(224, 280, 6)).save(images / "exact_224x280.png")
    add("exact_224x280", "exact_224x280.png")
    # RGBA with every alpha level (transparent, partial, opaque).
    rgba = np.concatenate([picture(150, 200, 7), np.zeros((150, 200, 1), np.uint8)], -1)
    rgba[..., 3] = np.clip(np.mgrid[0:150, 0:200][1] * 1.4, 0, 255).astype(np.uint8)
    rgba[:20, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(images / "rgba_150x200.png")
    add("rgba_150x200", "rgba_150x200.png")
    Image.fromarray(picture(90, 120, 8)).convert("L").save(images / "grey_90x120.png")
    add("grey_90x120", "grey_90x120.png")
    # Palette with a transparent index.
    pal = Image.fromarray(picture(60, 80, 9)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    pal.save(images / "palette_60x80.png", transparency=0)
    add("palette_60x80", "palette_60x80.png")
    Image.fromarray(picture(300, 401, 10)).save(images / "photo_300x401.jpg", quality=90)
    add("photo_300x401", "photo_300x401.jpg")
    # Larger than model_small's longest_edge (100_000 pixels): scaled down.
    Image.fromarray(picture(480, 640, 11)).save(images / "big_480x640.png")
    add("big_480x640", "big_480x640.png", config="model_small")

    processors = {name: AutoImageProcessor.from_pretrained(out / name) for name in configs}
    tensors = {}
    for case in cases:
        proc = processors[case["config"]]
        img = Image.open(out / case["file"])
        res = proc(images=img, return_tensors="np")
        rgb = convert_to_rgb(img, return_numpy=True)
        h, w = rgb.shape[:2]
        size = proc.size
        rh, rw = smart_resize(
            h, w, factor=proc.patch_size * proc.merge_size, min_pixels=size.shortest_edge, max_pixels=size.longest_edge
        )
        resized = np.array(Image.fromarray(rgb).resize((rw, rh), resample=Image.Resampling.BICUBIC))
        name = case["name"]
        tensors[f"{name}.rgb"] = np.ascontiguousarray(rgb)
        tensors[f"{name}.resized"] = np.ascontiguousarray(resized)
        tensors[f"{name}.pixel_values"] = np.ascontiguousarray(res["pixel_values"].astype(np.float32))
        tensors[f"{name}.grid"] = np.ascontiguousarray(res["image_grid_thw"].astype(np.int64))
        case["original"] = [h, w]
        case["resized"] = [rh, rw]
        case["grid"] = res["image_grid_thw"][0].tolist()
        assert case["grid"] == [1, rh // 14, rw // 14], case

    batch = [c for c in cases if c["config"] == "model"]
    res = processors["model"](images=[Image.open(out / c["file"]) for c in batch], return_tensors="np")
    tensors["batch.pixel_values"] = np.ascontiguousarray(res["pixel_values"].astype(np.float32))
    tensors["batch.grid"] = np.ascontiguousarray(res["image_grid_thw"].astype(np.int64))

    save_file(tensors, str(out / "reference.safetensors"))
    manifest = {
        "processor_class": type(processors["model"]).__name__,
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "cases": cases,
        "batch": [c["name"] for c in batch],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps(manifest))


if __name__ == "__main__":
    main(sys.argv[1])
