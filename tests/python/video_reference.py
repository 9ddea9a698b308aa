"""Reference output of Qwen2-VL video preprocessing for tests/video_preprocess_parity.rs.

    python tests/python/video_reference.py OUT_DIR

Writes into OUT_DIR:
  frames_<case>/     a folder of PNG frames per case (synthetic pictures, frame k shifted by k)
  reference.safetensors  per case: `<case>.pixel_values_videos` (float32) and
                     `<case>.video_grid_thw` (int64 [1, 3])
  manifest.json      the cases (frame count, pixel bounds, resized size, tokens) and, for the
                     mp4 fixture's frame count and rate, the frame indices qwen-vl-utils samples
                     for several fps / nframes settings

Pixels: transformers 5.24's `Qwen2VLVideoProcessor` (`video_processing_qwen2_vl.py`). That
module imports torchvision at the top, which the reference stack does not have (with it,
transformers would also switch the image processor the image parity test checks), so its own
`smart_resize` and `patchify` are taken from its source file (`ast`, not copied) and run here,
and `TorchvisionBackend._fuse_mean_std_and_rescale_factor` is called as transformers calls it.
The two torchvision steps between them are written out as torchvision 0.2x does them:
`resize_image` returns a frame of the target size unchanged and otherwise runs
`torch.nn.functional.interpolate(uint8, mode="bicubic", antialias=True, align_corners=False)`
natively on uint8 on the CPU (`_do_native_uint8_resize_on_cpu` is true for bicubic), and
`normalize` is `(x - mean[:, None, None]) / std[:, None, None]` in float32.

Frame indices: qwen-vl-utils' `smart_nframes` and `torch.linspace(0, total - 1, n).round()`
(`_read_video_torchvision`). qwen-vl-utils imports torchvision at the top too, so the rule is
written out below from its published source (qwen_vl_utils/vision_process.py, 0.0.14).
"""
import ast
import json
import math
import os
import pathlib
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers.image_processing_backends import TorchvisionBackend  # noqa: E402

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PATCH, MERGE, TEMPORAL = 14, 2, 2


def transformers_functions():
    """`smart_resize` and `Qwen2VLVideoProcessor.patchify` from transformers' own source."""
    src_path = pathlib.Path(transformers.__file__).parent / "models/qwen2_vl/video_processing_qwen2_vl.py"
    tree = ast.parse(src_path.read_text())
    wanted = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "smart_resize":
            wanted["smart_resize"] = node
        if isinstance(node, ast.ClassDef) and node.name == "Qwen2VLVideoProcessor":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "patchify":
                    wanted["patchify"] = item
    assert set(wanted) == {"smart_resize", "patchify"}, f"not found in {src_path}: {set(wanted)}"
    module = ast.Module(body=list(wanted.values()), type_ignores=[])
    namespace = {"math": math, "torch": torch}
    # Annotations name torch types only; evaluate them lazily.
    exec(compile("from __future__ import annotations\n", "<future>", "exec"), namespace)
    exec(compile(module, str(src_path), "exec"), namespace)
    return namespace["smart_resize"], namespace["patchify"]


SMART_RESIZE, PATCHIFY = transformers_functions()


def picture(h, w, seed):
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 127.5 + 127.5 * np.sin(x / 5.0 + y / 9.0)], -1)
    img[int(h * 0.2) : int(h * 0.5), int(w * 0.3) : int(w * 0.6)] = [230, 40, 60]
    img += rng.normal(0, 14, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def torchvision_resize(video, height, width):
    """torchvision.transforms.v2.functional.resize of a uint8 [..., C, H, W] on the CPU, bicubic."""
    if tuple(video.shape[-2:]) == (height, width):
        return video
    shape = video.shape
    flat = video.reshape(-1, *shape[-3:])
    out = torch.nn.functional.interpolate(flat, size=[height, width], mode="bicubic", align_corners=False, antialias=True)
    return out.reshape(*shape[:-2], height, width)


def process(frames, min_pixels, max_pixels):
    """Qwen2VLVideoProcessor._preprocess of one video (uint8 [T, H, W, 3] frames)."""
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()[None]  # [1, T, C, H, W]
    h, w = video.shape[-2:]
    rh, rw = SMART_RESIZE(h, w, factor=PATCH * MERGE, min_pixels=min_pixels, max_pixels=max_pixels)
    video = torchvision_resize(video, rh, rw)
    backend = object.__new__(TorchvisionBackend)
    mean, std, do_rescale = backend._fuse_mean_std_and_rescale_factor(
        do_normalize=True, image_mean=tuple(CLIP_MEAN), image_std=tuple(CLIP_STD), do_rescale=True,
        rescale_factor=1 / 255, device=video.device,
    )
    assert not do_rescale
    video = (video.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    patches, gt, gh, gw = PATCHIFY(None, video, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL)
    return patches[0].contiguous(), [gt, gh, gw], (rh, rw)


# qwen-vl-utils 0.0.14, vision_process.py (constants, round/ceil/floor_by_factor, smart_nframes).
FPS, FRAME_FACTOR, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2.0, 2, 4, 768


def round_by_factor(number, factor):
    return round(number / factor) * factor


def ceil_by_factor(number, factor):
    return math.ceil(number / factor) * factor


def floor_by_factor(number, factor):
    return math.floor(number / factor) * factor


def smart_nframes(ele, total_frames, video_fps):
    assert not ("fps" in ele and "nframes" in ele), "Only accept either `fps` or `nframes`"
    if "nframes" in ele:
        nframes = round_by_factor(ele["nframes"], FRAME_FACTOR)
    else:
        fps = ele.get("fps", FPS)
        min_frames = ceil_by_factor(ele.get("min_frames", FPS_MIN_FRAMES), FRAME_FACTOR)
        max_frames = floor_by_factor(ele.get("max_frames", min(FPS_MAX_FRAMES, total_frames)), FRAME_FACTOR)
        nframes = total_frames / video_fps * fps
        nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
        nframes = floor_by_factor(nframes, FRAME_FACTOR)
    if not (FRAME_FACTOR <= nframes and nframes <= total_frames):
        raise ValueError(f"nframes should in interval [{FRAME_FACTOR}, {total_frames}], but got {nframes}.")
    return nframes


def sampled(ele, total_frames, video_fps):
    """`_read_video_torchvision`'s indices and sample_fps."""
    nframes = smart_nframes(ele, total_frames=total_frames, video_fps=video_fps)
    idx = torch.linspace(0, total_frames - 1, nframes).round().long()
    return idx.tolist(), nframes / max(total_frames, 1e-6) * video_fps


def main(out):
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = [
        # name, frames, height, width, min_pixels, max_pixels: resized down, odd count (padded)
        ("shrink", 5, 75, 100, 56 * 56, 28 * 28 * 8),
        ("on_grid", 4, 56, 84, 56 * 56, 28 * 28 * 1280),  # already a multiple of 28: no resize
        ("grow", 6, 130, 50, 28 * 28 * 20, 28 * 28 * 64),  # below min_pixels: enlarged
    ]
    tensors, manifest_cases = {}, []
    for k, (name, n, h, w, lo, hi) in enumerate(cases):
        folder = out / f"frames_{name}"
        folder.mkdir(exist_ok=True)
        frames = []
        for i in range(n):
            arr = np.roll(picture(h, w, 100 * k + i), 3 * i, axis=1)
            Image.fromarray(arr).save(folder / f"frame_{i:03d}.png")
            frames.append(np.asarray(Image.open(folder / f"frame_{i:03d}.png").convert("RGB")))
        pv, grid, resized = process(frames, lo, hi)
        tensors[f"{name}.pixel_values_videos"] = pv
        tensors[f"{name}.video_grid_thw"] = torch.tensor([grid], dtype=torch.int64)
        manifest_cases.append({
            "name": name, "folder": folder.name, "frames": n, "min_pixels": lo, "max_pixels": hi,
            "resized": list(resized), "grid": grid, "tokens": grid[0] * grid[1] * grid[2] // MERGE**2,
        })
    total, rate = int(sys.argv[2]) if len(sys.argv) > 2 else 25, float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    sampling = []
    for ele in [{}, {"fps": 4.0}, {"fps": 1.0}, {"nframes": 6}, {"nframes": 7}, {"fps": 8.0, "max_frames": 12},
                {"fps": 0.5, "min_frames": 6}]:
        idx, fps = sampled(ele, total, rate)
        sampling.append({"options": ele, "indices": idx, "sample_fps": fps})
    save_file(tensors, str(out / "reference.safetensors"))
    (out / "manifest.json").write_text(json.dumps({
        "cases": manifest_cases, "mp4": {"total_frames": total, "fps": rate, "sampling": sampling},
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
    }, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
