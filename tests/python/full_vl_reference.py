"""transformers' side of tests/full_finetune_vl.rs: loads the Hugging Face model directory that
`ferrotune train` with `finetuning: full` wrote for a Qwen2-VL model, and its logits.

    full_vl_reference.py OUTPUT_DIR INPUT_MODEL_DIR INPUTS.safetensors OUT.safetensors IMAGE...

OUTPUT_DIR is loaded with `Qwen2VLForConditionalGeneration.from_pretrained` (float32); every
checkpoint key must be used and every parameter loaded (no missing, unexpected or mismatched
keys: transformers would otherwise initialise the missing ones at random and go on), and the
image processor transformers picks for its preprocessor_config.json
(`AutoImageProcessor.from_pretrained`, Pillow backend) turns IMAGE... into pixel values.

INPUTS.safetensors, written by the Rust test: `input_ids` [1, T] (ferrotune's chat prompt with
the images' `<|image_pad|>` runs: the directory's tokenizer_config.json chat template is the
text-only Qwen2 one, so transformers cannot build the multimodal prompt itself) and
`image_grid_thw` [N, 3] (ferrotune's).

Writes OUT.safetensors: `logits` (OUTPUT_DIR's model on input_ids and transformers' pixel
values), `input_logits` (INPUT_MODEL_DIR's model on the same inputs: how far training moved
the prediction), `pixel_values` and `image_grid_thw` (transformers' image processor's).
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoImageProcessor, Qwen2VLForConditionalGeneration  # noqa: E402


def load(model_dir):
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
    assert not problems and not info.get("error_msgs"), f"{model_dir}: {info}"
    return model.eval()


def logits(model, ids, pixels, grid):
    with torch.no_grad():
        return model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            image_grid_thw=grid,
            mm_token_type_ids=(ids == model.config.image_token_id).int(),
        ).logits.float().contiguous()


def main():
    out_dir, input_dir, inputs_file, out_file, *images = sys.argv[1:]
    torch.manual_seed(0)
    inputs = load_file(inputs_file)
    ids = inputs["input_ids"]
    processor = AutoImageProcessor.from_pretrained(out_dir)
    processed = processor(images=[Image.open(p) for p in images], return_tensors="pt")
    pixels, grid = processed["pixel_values"].float(), processed["image_grid_thw"]
    assert torch.equal(grid, inputs["image_grid_thw"]), f"image grids: {grid.tolist()} vs ferrotune's {inputs['image_grid_thw'].tolist()}"
    trained = load(out_dir)
    result = {
        "logits": logits(trained, ids, pixels, grid),
        "input_logits": logits(load(input_dir), ids, pixels, grid),
        "pixel_values": pixels.contiguous(),
        "image_grid_thw": grid.contiguous(),
    }
    save_file(result, out_file)
    print(
        f"{out_dir}: {type(trained).__name__} loaded with every key, {type(processor).__name__}, "
        f"{ids.shape[1]} tokens, {len(images)} images {grid.tolist()}"
    )


if __name__ == "__main__":
    main()
