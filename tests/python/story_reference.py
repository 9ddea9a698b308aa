#!/usr/bin/env python3
"""pyarrow's view of StoryReasoning parquet files, for tests/vlm_datasets.rs.

    story_reference.py dump FILE MAX_IMAGES     rows as JSON on stdout
    story_reference.py drop-column SRC DST COL  copy SRC without column COL

`dump` prints one object per row: story_id, frame_count, images_hex (each frame's bytes as
hex), chain_of_thought, story, and `trimmed`: the chain of thought and story cut to the first
MAX_IMAGES frames. The story is cut the StoryReasoning authors' way (parse the
`<gdi imageN>...</gdi>` sections, keep the first N, serialize back as in
StoryReasoningUtil.story_to_string); the chain of thought by removing the `## Image K`
sections (K > N) up to the `## Narrative Structure` section.
"""
import json
import re
import sys

import pyarrow.parquet as pq


def trim_story(story, keep):
    sections = sorted(((int(n), t.strip()) for n, t in re.findall(r"<gdi image(\d+)>(.*?)</gdi>", story, re.DOTALL)))
    out = []
    for n, text in sections[:keep]:
        out += [f"<gdi image{n}>", text, "</gdi>", ""]
    return "\n".join(out).strip()


def trim_cot(cot, keep):
    cut = re.search(rf"## Image {keep + 1}\s*\n", cot)
    if not cut:
        return cot
    narrative = re.search(r"## Narrative Structure", cot[cut.start():])
    rest = cot[cut.start() + narrative.start():] if narrative else ""
    return cot[: cut.start()] + rest


def dump(path, keep):
    table = pq.read_table(path)
    rows = []
    for r in table.to_pylist():
        rows.append(
            {
                "story_id": r["story_id"],
                "frame_count": r["frame_count"],
                "images_hex": [im["bytes"].hex() for im in r["images"]],
                "chain_of_thought": r["chain_of_thought"],
                "story": r["story"],
                "trimmed": {"chain_of_thought": trim_cot(r["chain_of_thought"], keep), "story": trim_story(r["story"], keep)},
            }
        )
    json.dump(rows, sys.stdout)


def drop_column(src, dst, column):
    table = pq.read_table(src)
    pq.write_table(table.drop_columns([column]), dst)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "dump":
        dump(args[0], int(args[1]))
    elif cmd == "drop-column":
        drop_column(*args)
    else:
        sys.exit(f"unknown command {cmd}")
