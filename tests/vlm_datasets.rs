//! The `storyreasoning` and `llava` dataset plugins (the built `plugins/vlmdata` library,
//! loaded through the ABI) on the bundled sample data sets made by
//! `scripts/make_story_sample.py`.
//!
//! `tests/python/story_reference.py` reads the parquet files with pyarrow: every row's fields
//! and frame bytes must be what the plugin yields, and `max_images` must cut the chain of
//! thought and the story as that script does (the story the StoryReasoning authors' way). The
//! LLaVA JSON copy of the same stories must give the same messages, its image files the same
//! bytes. The other tests check what the plugins say about bad input. Build the plugin first:
//! `cargo build -p ferrotune-vlmdata`.
use std::path::{Path, PathBuf};

use ferrotune::data::load_samples;
use ferrotune::plugins::Registry;
use ferrotune_plugin_api::{DataSource, DatasetFormat, ImageSource, Sample};
use ferrotune_tests::{build_dir, registry, repo_root, run_python, temp_dir};
use serde_json::{json, Value};

/// The storyreasoning plugin's default system prompt and user prompt (as the sample script
/// writes them into the LLaVA copy).
const USER_PROMPT: &str = "Create a story based on these images.";

fn vlmdata() -> Registry {
    let lib = build_dir().join("libferrotune_vlmdata.so");
    assert!(
        lib.exists(),
        "{} is missing: build it first with `cargo build -p ferrotune-vlmdata`",
        lib.display()
    );
    registry()
}

fn parquet_dir() -> PathBuf {
    repo_root().join("datasets/storyreasoning-sample")
}

fn llava_dir() -> PathBuf {
    repo_root().join("datasets/story-llava")
}

fn load(reg: &Registry, plugin: &str, config: &str, path: &Path, split: &str) -> Vec<Sample> {
    load_samples(reg, plugin, config, path, split).unwrap_or_else(|e| panic!("{e:#}"))
}

fn load_err(reg: &Registry, plugin: &str, config: &str, path: &Path, split: &str) -> String {
    format!(
        "{:#}",
        load_samples(reg, plugin, config, path, split).expect_err("the load should fail")
    )
}

/// pyarrow's rows of a parquet file (see story_reference.py).
fn reference(file: &Path, max_images: usize) -> Vec<Value> {
    let script = repo_root().join("tests/python/story_reference.py");
    let keep = max_images.to_string();
    let out = run_python(&[script.as_os_str(), "dump".as_ref(), file.as_os_str(), keep.as_ref()]);
    serde_json::from_slice(&out.stdout).expect("story_reference.py prints JSON")
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

fn answer(cot: &str, story: &str) -> String {
    format!("<think>\n{cot}\n</think>\n{story}")
}

#[test]
fn storyreasoning_rows_equal_pyarrow() {
    let reg = vlmdata();
    let mut compared = 0;
    for (split, rows) in [("train", 8), ("test", 2)] {
        // The folder with a split name, and the file itself, read alike.
        let samples = load(&reg, "storyreasoning", "{}", &parquet_dir(), split);
        let file = parquet_dir().join(format!("{split}.parquet"));
        assert_eq!(load(&reg, "storyreasoning", "{}", &file, "ignored"), samples);
        let want = reference(&file, 2);
        assert_eq!((samples.len(), want.len()), (rows, rows), "{split}: row count");
        for (s, w) in samples.iter().zip(&want) {
            let id = w["story_id"].as_str().unwrap();
            assert_eq!(s.id.as_deref(), Some(id));
            assert_eq!(s.extra["story_id"], w["story_id"], "{id}");
            assert_eq!(s.extra["frame_count"], w["frame_count"], "{id}");
            let frames: Vec<Vec<u8>> = w["images_hex"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| unhex(h.as_str().unwrap()))
                .collect();
            assert_eq!(
                frames.len() as i64,
                w["frame_count"].as_i64().unwrap(),
                "{id}: the sample data's frame_count"
            );
            assert_eq!(s.blobs, frames, "{id}: frame bytes");
            assert_eq!(
                s.images,
                (0..frames.len()).map(ImageSource::Blob).collect::<Vec<_>>(),
                "{id}"
            );
            let roles: Vec<&str> = s.messages.iter().map(|m| m.role.as_str()).collect();
            assert_eq!(roles, ["system", "user", "assistant"], "{id}");
            assert!(
                s.messages[0].content.contains("<think></think>"),
                "{id}: {}",
                s.messages[0].content
            );
            assert_eq!(
                s.messages[1].content,
                format!("{USER_PROMPT}{}", "<image>".repeat(frames.len())),
                "{id}"
            );
            let (cot, story) =
                (w["chain_of_thought"].as_str().unwrap(), w["story"].as_str().unwrap());
            assert_eq!(s.messages[2].content, answer(cot, story), "{id}");
            assert!(
                story.contains(&format!("<gdi image{}>", frames.len()))
                    && cot.contains("| char1 |"),
                "{id}: sample data format"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 10);
}

#[test]
fn storyreasoning_options_trim_and_pass_on() {
    let reg = vlmdata();
    let file = parquet_dir().join("train.parquet");
    let want = reference(&file, 2);
    let cfg = r#"{"max_images": 2, "min_pixels": 3136, "max_pixels": 50176, "system_prompt": "Tell stories.", "user_prompt": ""}"#;
    let trimmed = load(&reg, "storyreasoning", cfg, &file, "train");
    let full = load(&reg, "storyreasoning", "{}", &file, "train");
    let mut cut = 0;
    for ((t, f), w) in trimmed.iter().zip(&full).zip(&want) {
        let id = t.id.clone().unwrap();
        assert_eq!(t.messages[0].content, "Tell stories.");
        assert_eq!(t.messages[1].content, "<image><image>", "{id}");
        assert_eq!(t.blobs[..], f.blobs[..2], "{id}: the first two frames");
        assert_eq!(t.images, vec![ImageSource::Blob(0), ImageSource::Blob(1)]);
        let (cot, story) = (
            w["trimmed"]["chain_of_thought"].as_str().unwrap(),
            w["trimmed"]["story"].as_str().unwrap(),
        );
        assert_eq!(t.messages[2].content, answer(cot, story), "{id}");
        assert!(
            !t.messages[2].content.contains("## Image 3")
                && !t.messages[2].content.contains("<gdi image3>"),
            "{id}"
        );
        assert!(t.messages[2].content.contains("## Narrative Structure"), "{id}");
        cut += usize::from(f.blobs.len() > 2);
        // frame_count stays the data set's; the pixel bounds go to the host's image processor.
        assert_eq!(t.extra["frame_count"], f.extra["frame_count"]);
        assert_eq!(
            (t.extra["image_min_pixels"].as_u64(), t.extra["image_max_pixels"].as_u64()),
            (Some(3136), Some(50176))
        );
    }
    assert_eq!(cut, 8, "every train story has more than 2 frames");
    // A bound at or above the frame count changes nothing.
    assert_eq!(load(&reg, "storyreasoning", r#"{"max_images": 5}"#, &file, "train"), full);
}

#[test]
fn llava_copy_reads_like_the_parquet() {
    let reg = vlmdata();
    for split in ["train", "test"] {
        let stories = load(&reg, "storyreasoning", "{}", &parquet_dir(), split);
        let json_file = llava_dir().join(format!("{split}.json"));
        let llava = load(&reg, "llava", "{}", &llava_dir(), split);
        assert_eq!(load(&reg, "llava", "{}", &json_file, "ignored"), llava);
        assert_eq!(llava.len(), stories.len());
        for (l, s) in llava.iter().zip(&stories) {
            assert_eq!(l.id, s.id);
            assert_eq!(l.messages, s.messages, "{:?}", l.id);
            assert_eq!(l.images.len(), s.blobs.len());
            for (k, (image, blob)) in l.images.iter().zip(&s.blobs).enumerate() {
                let ImageSource::Path(p) = image else {
                    panic!("{:?}: a path image, found {image:?}", l.id)
                };
                let want =
                    llava_dir().join(format!("images/{}_{}.png", s.id.as_deref().unwrap(), k + 1));
                assert_eq!(Path::new(p), want, "joined to the JSON file's folder");
                assert_eq!(&std::fs::read(p).unwrap(), blob, "{p}");
            }
        }
    }
    // An absolute `image_folder` replaces the JSON file's folder.
    let elsewhere = temp_dir("vlm-llava-image-folder");
    let cfg = json!({ "image_folder": elsewhere }).to_string();
    let moved = load(&reg, "llava", &cfg, &llava_dir(), "test");
    assert!(
        matches!(&moved[0].images[0], ImageSource::Path(p) if Path::new(p).starts_with(elsewhere.join("images"))),
        "{:?}",
        moved[0].images
    );
    // A relative one is joined to the JSON file's folder, whatever the working directory.
    let up = load(&reg, "llava", r#"{"image_folder": ".."}"#, &llava_dir(), "test");
    assert!(
        matches!(&up[0].images[0], ImageSource::Path(p) if Path::new(p).starts_with(llava_dir().join("../images"))),
        "{:?}",
        up[0].images
    );
    // One that does not exist is refused by name.
    let err =
        load_err(&reg, "llava", r#"{"image_folder": "no-such-folder"}"#, &llava_dir(), "test");
    assert!(err.contains("image_folder") && err.contains("no-such-folder"), "{err}");
}

#[test]
fn llava_bad_rows_fail_when_read_naming_row_id_and_counts() {
    let reg = vlmdata();
    let dir = temp_dir("vlm-llava-bad");
    let f = dir.join("bad.json");
    let turn = |from: &str, value: &str| json!({"from": from, "value": value});
    let rows = json!([
        {"id": "ok", "image": "a.png", "conversations": [turn("human", "<image>\nWhat?"), turn("gpt", "A cat.")]},
        {"id": "two-for-three", "image": ["a.png", "b.png"],
         "conversations": [turn("human", "<image><image><image> Which?"), turn("gpt", "The first.")]},
        {"id": "no-turns", "image": "a.png"},
    ]);
    std::fs::write(&f, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    // The file opens; each row is checked when asked for, so the host can stop or skip.
    let format = reg.dataset("llava", "{}").unwrap();
    let reader =
        format.open(&DataSource { path: f.display().to_string(), split: "train".into() }).unwrap();
    assert_eq!(reader.len().unwrap(), 3);
    let ok = reader.get(0).unwrap();
    assert_eq!((ok.id.as_deref(), ok.messages[0].content.as_str()), (Some("ok"), "<image>What?"));
    let e = reader.get(1).unwrap_err().to_string();
    assert!(e.contains(&format!("{}: record [1] (id `two-for-three`)", f.display())), "{e}");
    assert!(e.contains("2 image(s) in `image` but 3 `<image>` placeholder(s)"), "{e}");
    let e = reader.get(2).unwrap_err().to_string();
    assert!(
        e.contains(&format!("{}: record [2] (id `no-turns`): no `conversations` key", f.display())),
        "{e}"
    );
    // A folder without the split's file says which names it looked for.
    let e = load_err(&reg, "llava", "{}", &dir, "test");
    assert!(e.contains("no test.json or test.jsonl for split `test`"), "{e}");
}

#[test]
fn storyreasoning_bad_sources_are_clear() {
    let reg = vlmdata();
    let dir = temp_dir("vlm-story-bad");
    // A column missing: named, with the file.
    let broken = dir.join("train.parquet");
    let script = repo_root().join("tests/python/story_reference.py");
    let src = parquet_dir().join("train.parquet");
    run_python(&[
        script.as_os_str(),
        "drop-column".as_ref(),
        src.as_os_str(),
        broken.as_os_str(),
        "chain_of_thought".as_ref(),
    ]);
    let e = load_err(&reg, "storyreasoning", "{}", &broken, "train");
    assert!(e.contains(&format!("{}: no column `chain_of_thought`", broken.display())), "{e}");
    assert!(e.contains("this file has story_id, images, frame_count, story"), "{e}");
    // A split that is not there: the folder, the names looked for, and the splits found.
    let e = load_err(&reg, "storyreasoning", "{}", &dir, "validation");
    assert!(
        e.contains(&format!("{}: no parquet file for split `validation`", dir.display())),
        "{e}"
    );
    assert!(e.contains("splits found: train"), "{e}");
    // The Hugging Face layout: data/{split}-00000-of-00001.parquet.
    let hf = dir.join("hub");
    std::fs::create_dir_all(hf.join("data")).unwrap();
    std::fs::copy(parquet_dir().join("test.parquet"), hf.join("data/test-00000-of-00001.parquet"))
        .unwrap();
    assert_eq!(load(&reg, "storyreasoning", "{}", &hf, "test").len(), 2);
    // Not parquet at all.
    let junk = dir.join("junk.parquet");
    std::fs::write(&junk, "not parquet").unwrap();
    let e = load_err(&reg, "storyreasoning", "{}", &junk, "train");
    assert!(e.contains(&format!("{}: not a readable parquet file", junk.display())), "{e}");
}

#[test]
fn unknown_config_keys_are_named() {
    let reg = vlmdata();
    let e = reg
        .dataset("storyreasoning", r#"{"max_frames": 4}"#)
        .err()
        .expect("unknown key")
        .to_string();
    assert!(e.contains("unknown field `max_frames`"), "{e}");
    let e = reg
        .dataset("storyreasoning", r#"{"max_images": 0}"#)
        .err()
        .expect("zero frames")
        .to_string();
    assert!(e.contains("config key `max_images`"), "{e}");
    let e = reg.dataset("llava", r#"{"image_dir": "x"}"#).err().expect("unknown key").to_string();
    assert!(e.contains("unknown field `image_dir`"), "{e}");
    let e = reg
        .dataset("llava", r#"{"columns": {"images": "imgs"}}"#)
        .err()
        .expect("unknown column key")
        .to_string();
    assert!(e.contains("unknown field `images`") && e.contains("columns"), "{e}");
}
