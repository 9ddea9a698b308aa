"""Helpers shared by the reference scripts that build tiny checkpoints and their transformers
outputs (make_parity_models.py, qwen2vl_reference.py). The Rust side hashes this file with
each script, so a change here rebuilds their cached outputs."""
import torch


def left_pad(prompts, pad):
    """Token id lists as a left-padded batch: (ids, attention mask), both int64."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


class MarginRecorder:
    """A logits processor that records the smallest top-1/top-2 gap of the rows it sees."""

    def __init__(self):
        self.min_gap = float("inf")

    def __call__(self, input_ids, scores):
        top2 = scores.float().topk(2, dim=-1).values
        self.min_gap = min(self.min_gap, float((top2[:, 0] - top2[:, 1]).min()))
        return scores
