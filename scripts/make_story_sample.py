#!/usr/bin/env python3
"""Makes the bundled StoryReasoning-style sample data sets (deterministic, seeded).

    .venv/bin/python scripts/make_story_sample.py [--seed 7] [--out datasets]

Writes
  datasets/storyreasoning-sample/{train,test}.parquet   the Hugging Face layout of
      daniel3303/StoryReasoning: story_id (string), images (list of Image structs
      {bytes, path}, PNG bytes embedded), frame_count (int32), chain_of_thought, story
  datasets/story-llava/{train,test}.json + images/      the same stories as
      Qwen2-VL-Finetune / LLaVA JSON (system, human with one <image> per frame, gpt)

Each story is 3-5 frames (224x160 PNG) of a cast of 2-3 recurring characters, drawn as
simple figures with a fixed shape, colour and name label, plus one object and a background
element in one of four settings. The chain of thought follows StoryReasoning's markdown
(per image: Characters / Objects / Setting tables with char#, obj#, bg# ids and the boxes
where the figures were actually drawn, x1,y1,x2,y2; then a Narrative Structure table); the
story uses its grounding tags: <gdi imageN> per frame, <gdo charN> / <gdo objN> for
mentions, <gda charN> for actions, <gdl bgN> for background places. The gpt answer is the
StoryReasoning authors' `<think>\\n{cot}\\n</think>\\n{story}`.
"""
import argparse
import io
import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

W, H, GROUND = 224, 160, 128

# Must equal the storyreasoning plugin's defaults (tests/vlm_datasets.rs compares the two).
SYSTEM_PROMPT = (
    "You are an AI storyteller that can analyze sequences of images and create creative narratives. "
    "First think step-by-step to analyze characters, objects, settings, and narrative structure. "
    "Then create a grounded story that maintains consistent character identity and object references across frames. "
    "Use <think></think> tags to show your reasoning process before writing the final story."
)
USER_PROMPT = "Create a story based on these images."

# name, colour, shape, description, pronoun
CHARACTERS = [
    ("Mira", (210, 45, 45), "dress", "Small girl in a red triangle dress with a round head", "she"),
    ("Tobin", (40, 90, 210), "square", "Sturdy boy with a square blue body and square head", "he"),
    ("Pip", (235, 200, 30), "critter", "Tiny yellow creature with pointed ears", "it"),
    ("Grum", (40, 150, 70), "tall", "Tall green giant wearing a black hat", "he"),
]

# name, description, function, draw kind
OBJECTS = [
    ("the lantern", "Orange lantern with a handle", "Gives light", "lantern"),
    ("the ball", "Red and white ball", "Toy for playing", "ball"),
    ("the chest", "Small brown wooden chest", "Holds a treasure", "chest"),
    ("the kite", "Purple diamond kite on a string", "Flies in the wind", "kite"),
]

# name, sky, ground, background element (phrase, description), time, mood, lighting
SETTINGS = [
    ("meadow", (150, 200, 250), (110, 190, 90), ("the old oak tree", "Large oak tree with a round crown"), "Daytime", "Cheerful", "Bright sunlight"),
    ("beach", (170, 215, 245), (235, 215, 150), ("the calm sea", "Blue sea along the horizon"), "Afternoon", "Relaxed", "Warm sunlight"),
    ("forest", (120, 170, 200), (70, 120, 60), ("the tall pines", "Row of dark pine trees"), "Morning", "Mysterious", "Soft shade"),
    ("village", (30, 35, 80), (60, 70, 60), ("the little houses", "Two small houses with lit windows"), "Night", "Quiet", "Moonlight"),
]

# Beats of a story, in order; a story of n frames uses BEATS_FOR[n].
BEATS_FOR = {3: ["arrive", "find", "share"], 4: ["arrive", "find", "quarrel", "share"], 5: ["arrive", "find", "show", "quarrel", "share"]}
PHASE = {"arrive": "Introduction", "find": "Development", "show": "Development", "quarrel": "Conflict", "share": "Conclusion"}


def font():
    try:
        return ImageFont.load_default(size=9)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def draw_background(d, setting):
    name, sky, ground, _, _, _, _ = setting
    d.rectangle([0, 0, W, GROUND], fill=sky)
    d.rectangle([0, GROUND, W, H], fill=ground)
    if name == "meadow":
        d.ellipse([190, 8, 214, 32], fill=(250, 220, 60))
        box = [8, 40, 58, GROUND]
        d.rectangle([28, 80, 38, GROUND], fill=(110, 70, 30))
        d.ellipse([8, 40, 58, 90], fill=(40, 120, 40))
    elif name == "beach":
        box = [0, 96, W, GROUND]
        d.rectangle(box, fill=(50, 110, 190))
        d.ellipse([180, 10, 206, 36], fill=(250, 200, 70))
    elif name == "forest":
        box = [0, 50, W, GROUND]
        for x in range(0, W, 32):
            d.polygon([(x, GROUND), (x + 16, 50), (x + 32, GROUND)], fill=(25, 80, 40))
    else:
        d.ellipse([186, 10, 206, 30], fill=(240, 240, 210))
        box = [6, 70, 96, GROUND]
        for x0 in (6, 54):
            d.rectangle([x0, 92, x0 + 42, GROUND], fill=(150, 110, 80))
            d.polygon([(x0 - 2, 92), (x0 + 21, 70), (x0 + 44, 92)], fill=(120, 40, 40))
            d.rectangle([x0 + 15, 102, x0 + 27, 114], fill=(250, 220, 100))
    return box


def draw_character(d, char, x, f):
    """Draws a figure standing on the ground centred at x; returns its box."""
    name, colour, shape, _, _ = char
    skin = (245, 205, 170)
    if shape == "dress":
        d.polygon([(x - 12, GROUND), (x, GROUND - 30), (x + 12, GROUND)], fill=colour)
        d.ellipse([x - 7, GROUND - 44, x + 7, GROUND - 30], fill=skin)
        box = [x - 12, GROUND - 44, x + 12, GROUND]
    elif shape == "square":
        d.rectangle([x - 11, GROUND - 30, x + 11, GROUND], fill=colour)
        d.rectangle([x - 7, GROUND - 44, x + 7, GROUND - 30], fill=skin)
        box = [x - 11, GROUND - 44, x + 11, GROUND]
    elif shape == "critter":
        d.ellipse([x - 9, GROUND - 18, x + 9, GROUND], fill=colour)
        d.polygon([(x - 8, GROUND - 14), (x - 5, GROUND - 26), (x - 2, GROUND - 16)], fill=colour)
        d.polygon([(x + 2, GROUND - 16), (x + 5, GROUND - 26), (x + 8, GROUND - 14)], fill=colour)
        d.point([(x - 3, GROUND - 11), (x + 3, GROUND - 11)], fill=(0, 0, 0))
        box = [x - 9, GROUND - 26, x + 9, GROUND]
    else:
        d.rectangle([x - 9, GROUND - 56, x + 9, GROUND], fill=colour)
        d.ellipse([x - 7, GROUND - 70, x + 7, GROUND - 56], fill=skin)
        d.rectangle([x - 9, GROUND - 74, x + 9, GROUND - 68], fill=(20, 20, 20))
        box = [x - 9, GROUND - 74, x + 9, GROUND]
    label_w = d.textlength(name, font=f)
    d.text((x - label_w / 2, box[1] - 12), name, fill=(255, 255, 255), font=f, stroke_width=1, stroke_fill=(0, 0, 0))
    return box


def draw_object(d, obj, x, y):
    """Draws an object with its bottom centre at (x, y); returns its box."""
    kind = obj[3]
    if kind == "lantern":
        box = [x - 5, y - 14, x + 5, y]
        d.arc([x - 4, y - 18, x + 4, y - 10], 180, 360, fill=(60, 60, 60))
        d.rectangle(box, fill=(245, 150, 30))
        box = [x - 5, y - 18, x + 5, y]
    elif kind == "ball":
        box = [x - 7, y - 14, x + 7, y]
        d.ellipse(box, fill=(220, 40, 40))
        d.chord(box, 0, 180, fill=(250, 250, 250))
    elif kind == "chest":
        box = [x - 10, y - 12, x + 10, y]
        d.rectangle(box, fill=(130, 80, 30))
        d.line([x - 10, y - 7, x + 10, y - 7], fill=(60, 40, 10))
    else:
        pts = [(x, y - 24), (x + 8, y - 14), (x, y - 4), (x - 8, y - 14)]
        d.polygon(pts, fill=(140, 60, 190))
        d.line([(x, y - 4), (x + 4, y)], fill=(40, 40, 40))
        box = [x - 8, y - 24, x + 8, y]
    return box


def bbox(box):
    return ",".join(str(int(round(v))) for v in box)


def tag(ids, text, kind="gdo"):
    return f"<{kind} {' '.join(ids)}>{text}</{kind}>"


def beat_text(beat, cast_ids, cast, obj, bg_phrase, holder):
    """The story text of one frame and each character's (emotion, action) and the object's interaction."""
    a, b = cast_ids[0], cast_ids[1]
    an, bn = cast[0][0], cast[1][0]
    who = tag([a], an)
    who_b = tag([b], bn)
    o = tag(["obj1"], obj[0])
    place = tag(["bg1"], bg_phrase, "gdl")
    everyone = tag(cast_ids, "they" if len(cast_ids) > 1 else an)
    if beat == "arrive":
        text = f"{who} {tag([a], 'walks', 'gda')} toward {place} with {who_b}, {tag([a, b], 'looking', 'gda')} for something to do."
        acts = {c: ("Curious", "Walking") for c in cast_ids}
        interaction = None
    elif beat == "find":
        text = f"Near {place}, {who} {tag([a], 'finds', 'gda')} {o} and {tag([a], 'holds it up', 'gda')} for {who_b} to see."
        acts = {c: ("Surprised", "Watching") for c in cast_ids}
        acts[a] = ("Excited", "Holding up the object")
        interaction = f"Held by {a}"
    elif beat == "show":
        text = f"{who} {tag([a], 'shows', 'gda')} {o} to {who_b}, who {tag([b], 'leans closer', 'gda')} in wonder."
        acts = {c: ("Amazed", "Leaning in") for c in cast_ids}
        acts[a] = ("Proud", "Showing the object")
        interaction = f"Shown by {a}"
    elif beat == "quarrel":
        text = f"Then {who_b} {tag([b], 'grabs', 'gda')} {o}, and {who} {tag([a], 'frowns', 'gda')} by {place}."
        acts = {c: ("Worried", "Standing still") for c in cast_ids}
        acts[a] = ("Upset", "Frowning")
        acts[b] = ("Stubborn", "Grabbing the object")
        interaction = f"Grabbed by {b}"
    else:
        text = f"In the end {everyone} {tag(cast_ids, 'share', 'gda')} {o} and {tag(cast_ids, 'laugh together', 'gda')} beside {place}."
        acts = {c: ("Happy", "Laughing") for c in cast_ids}
        interaction = "Shared by everyone"
    return text, acts, interaction


FUNCTION = {
    "arrive": "Sets up the characters",
    "find": "Discovers the key object",
    "show": "Builds anticipation",
    "quarrel": "Creates the conflict",
    "share": "Resolves the conflict",
}


def table(header, rows):
    cols = [h.strip() for h in header.strip("|").split("|")]
    sep = "|" + "|".join("-" * (len(c) + 2) for c in cols) + "|"
    return [header, sep] + ["| " + " | ".join(r) + " |" for r in rows]


def make_story(story_id, rng, f):
    setting = rng.choice(SETTINGS)
    cast = rng.sample(CHARACTERS, rng.choice([2, 3]))
    obj = rng.choice(OBJECTS)
    n = rng.randint(3, 5)
    beats = BEATS_FOR[n]
    cast_ids = [f"char{i + 1}" for i in range(len(cast))]
    frames, cot, story = [], [], []
    for k, beat in enumerate(beats, start=1):
        img = Image.new("RGB", (W, H))
        d = ImageDraw.Draw(img)
        bg_box = draw_background(d, setting)
        slots = list(range(len(cast)))
        rng.shuffle(slots)
        step = (W - 60) // len(cast)
        xs = {cid: 40 + s * step + rng.randint(0, step - 30) for cid, s in zip(cast_ids, slots)}
        boxes = {cid: draw_character(d, ch, xs[cid], f) for cid, ch in zip(cast_ids, cast)}
        text, acts, interaction = beat_text(beat, cast_ids, cast, obj, setting[3][0], None)
        holder = {"find": "char1", "show": "char1", "quarrel": "char2"}.get(beat)
        if beat == "arrive":
            obj_box = None
        elif holder:
            hb = boxes[holder]
            obj_box = draw_object(d, obj, hb[2] + 8, GROUND - 14)
        else:
            obj_box = draw_object(d, obj, (boxes[cast_ids[0]][2] + boxes[cast_ids[1]][0]) / 2, GROUND)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        frames.append(buf.getvalue())

        char_rows = [
            [cid, ch[0], ch[3], acts[cid][0], acts[cid][1], "Protagonist" if cid == "char1" else "Companion", bbox(boxes[cid])]
            for cid, ch in zip(cast_ids, cast)
        ]
        obj_rows = []
        if obj_box is not None:
            obj_rows.append(["obj1", obj[1], obj[2], interaction, FUNCTION[beat], bbox(obj_box)])
        obj_rows.append(["bg1", setting[3][1], "Background", "None", "Frames the scene", bbox(bg_box)])
        set_rows = [
            ["Location", f"A {setting[0]}", setting[5], setting[4], "Establishes where the story happens"],
            ["Lighting", setting[6], setting[5], setting[4], "Sets the mood"],
        ]
        cot += [f"## Image {k}", "", "### Characters"]
        cot += table("| Character ID | Name | Description | Emotions | Actions | Narrative Function | Bounding Box |", char_rows)
        cot += ["", "### Objects"]
        cot += table("| Object ID | Description | Function | Interaction | Narrative Function | Bounding Box |", obj_rows)
        cot += ["", "### Setting"]
        cot += table("| Setting Element | Description | Mood | Time | Narrative Function |", set_rows)
        cot += ["", ""]
        story += [f"<gdi image{k}>", text, "</gdi>", ""]

    phases = []
    for phase in dict.fromkeys(PHASE[b] for b in beats):
        ks = [str(k) for k, b in enumerate(beats, start=1) if PHASE[b] == phase]
        events = "; ".join(FUNCTION[beats[int(k) - 1]] for k in ks)
        phases.append([phase, f"{phase} of the {obj[0][4:]} story", events, ", ".join(ks)])
    cot += ["## Narrative Structure", ""]
    cot += table("| Narrative Phase | Description | Key Events | Images |", phases)
    return {
        "story_id": story_id,
        "frames": frames,
        "chain_of_thought": "\n".join(cot),
        "story": "\n".join(story).strip(),
    }


HF_FEATURES = {
    "story_id": {"dtype": "string", "_type": "Value"},
    "images": {"feature": {"_type": "Image"}, "_type": "Sequence"},
    "frame_count": {"dtype": "int32", "_type": "Value"},
    "chain_of_thought": {"dtype": "string", "_type": "Value"},
    "story": {"dtype": "string", "_type": "Value"},
}

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [
        ("story_id", pa.string()),
        ("images", pa.list_(IMAGE_TYPE)),
        ("frame_count", pa.int32()),
        ("chain_of_thought", pa.string()),
        ("story", pa.string()),
    ],
    metadata={"huggingface": json.dumps({"info": {"features": HF_FEATURES}})},
)


def write_parquet(stories, path):
    table_ = pa.table(
        {
            "story_id": [s["story_id"] for s in stories],
            "images": [[{"bytes": b, "path": f"{s['story_id']}_{k}.png"} for k, b in enumerate(s["frames"], start=1)] for s in stories],
            "frame_count": [len(s["frames"]) for s in stories],
            "chain_of_thought": [s["chain_of_thought"] for s in stories],
            "story": [s["story"] for s in stories],
        },
        schema=SCHEMA,
    )
    # Small row groups, as the hub's image data sets have, so readers meet more than one.
    pq.write_table(table_, path, row_group_size=3, compression="snappy")


def write_llava(stories, out_dir, split):
    rows = []
    for s in stories:
        names = []
        for k, b in enumerate(s["frames"], start=1):
            name = f"images/{s['story_id']}_{k}.png"
            (out_dir / name).write_bytes(b)
            names.append(name)
        user = USER_PROMPT + "".join("\n<image>" for _ in names)
        answer = f"<think>\n{s['chain_of_thought']}\n</think>\n{s['story']}"
        rows.append(
            {
                "id": s["story_id"],
                "image": names,
                "conversations": [
                    {"from": "system", "value": SYSTEM_PROMPT},
                    {"from": "human", "value": user},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    (out_dir / f"{split}.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="datasets")
    ap.add_argument("--train", type=int, default=8)
    ap.add_argument("--test", type=int, default=2)
    args = ap.parse_args()
    f = font()
    rng = random.Random(args.seed)
    splits = {"train": [], "test": []}
    for i in range(args.train + args.test):
        split = "train" if i < args.train else "test"
        splits[split].append(make_story(f"toy-{split}-{i:03d}", rng, f))

    out = Path(args.out)
    parquet_dir, llava_dir = out / "storyreasoning-sample", out / "story-llava"
    for d in (parquet_dir, llava_dir):
        shutil.rmtree(d, ignore_errors=True)
    parquet_dir.mkdir(parents=True)
    (llava_dir / "images").mkdir(parents=True)
    for split, stories in splits.items():
        write_parquet(stories, parquet_dir / f"{split}.parquet")
        write_llava(stories, llava_dir, split)
    total = sum(p.stat().st_size for d in (parquet_dir, llava_dir) for p in d.rglob("*") if p.is_file())
    frames = sum(len(s["frames"]) for ss in splits.values() for s in ss)
    print(f"{sum(map(len, splits.values()))} stories, {frames} frames, {total / 1024:.0f} KiB in {parquet_dir} and {llava_dir}")


if __name__ == "__main__":
    main()
