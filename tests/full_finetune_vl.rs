//! `ferrotune train` with `finetuning: full` on a Qwen2-VL model: the tiny `init-model --preset
//! tiny-vl` model (float32, tied embeddings) trained a few steps on the bundled StoryReasoning
//! sample (two frames per story), with the `vision:` switches deciding which side trains.
//!
//! * `vision: {freeze_vision_tower: true, tune_merger: true}`: every vision-tower tensor of
//!   output_dir is byte-identical to the input model's, every merger and language-model tensor
//!   moved, all but a chance few of its elements (weight decay is off, so a change means a
//!   gradient reached it), and so did every embedding row, the tied lm_head sending a gradient
//!   to rows of tokens the data never uses; transformers loads output_dir
//!   (`Qwen2VLForConditionalGeneration.from_pretrained`, every key used, and
//!   `AutoImageProcessor` on its preprocessor_config.json) and its logits on a two-image story
//!   prompt equal ferrotune's forward of the same directory within 1e-4.
//! * `vision: {freeze_llm: true}`: only the vision side (tower and merger, full's defaults)
//!   trains; every language-model tensor is byte-identical.
//!
//! The saved keys are transformers' `save_pretrained` layout: `visual.*` for the vision side
//! (`visual.merger.*` the PatchMerger), `model.*` for the language model; a tied lm_head is
//! not saved.
//!
//! Needs `cargo build --workspace` (the CLI, `sft`, `single`, `storyreasoning`),
//! `assets/qwen2-tokenizer` and the reference stack (`$PYTHON` or `.venv`).
use std::path::{Path, PathBuf};

use ferrotune::generate::pipeline::TextGenerator;
use ferrotune::model::ForwardArgs;
use ferrotune_plugin_api::ForwardFlags;
use ferrotune_tests::*;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

const PROMPT: &str = "Create a story based on these images.";
const STEPS: usize = 3;
/// Adam moves each trained element by about lr per step: ~6e-3 over the run.
const LR: f64 = 2e-3;
/// The least max |change| of a tensor that counts as trained (f32 weights of scale ~0.02).
const MOVED: f64 = 1e-4;
/// The largest share of a trained tensor's elements that may end exactly where they started:
/// three Adam updates of about ±lr each cancel to below half an ulp for about one element in
/// 10^7 (1 of the 9.7 M embedding elements in the measured run). A tensor that received no
/// gradient keeps all of them; one updated only in part (a shard) keeps a large share.
const UNCHANGED_SHARE: f64 = 1e-5;
/// Largest accepted max |difference| of the logits, ferrotune vs transformers.
const LOGITS_TOL: f64 = 1e-4;
/// Largest accepted max |difference| of the pixel values, ferrotune vs transformers' image
/// processor (image_preprocess_parity.rs's bound).
const PIXEL_TOL: f64 = 1e-6;
/// The tiny-vl preset's vision side: patch_embed + 2 blocks × (norm1, norm2, qkv, proj, fc1,
/// fc2; weight and bias each); the merger's ln_q, mlp.0, mlp.2 (weight and bias each).
const TOWER_TENSORS: usize = 1 + 2 * 12;
const MERGER_TENSORS: usize = 6;

fn story_images() -> Vec<PathBuf> {
    ["toy-test-008_1.png", "toy-test-008_2.png"]
        .iter()
        .map(|f| repo_root().join("datasets/story-llava/images").join(f))
        .collect()
}

/// Which side of a Qwen2-VL a saved key belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Tower,
    Merger,
    Language,
}

/// The part of a checkpoint key, in transformers' `save_pretrained` layout (`visual.*`) or its
/// module layout (`model.visual.*`, `model.language_model.*`).
fn part_of(key: &str) -> Part {
    let vision = key.strip_prefix("visual.").or_else(|| key.strip_prefix("model.visual."));
    match vision {
        Some(rest) if rest.starts_with("merger.") => Part::Merger,
        Some(_) => Part::Tower,
        None => Part::Language,
    }
}

/// What training did to one tensor.
struct Change {
    key: String,
    part: Part,
    identical: bool,
    max_abs: f64,
    /// Share of its elements left exactly as they were.
    unchanged: f64,
    elements: usize,
}

struct Run {
    model: PathBuf,
    out: PathBuf,
    seconds: f64,
}

/// Trains the tiny Qwen2-VL in full with the `vision:` section `vision`; returns the run.
fn train(tag: &str, vision: &str) -> Run {
    let dir = temp_dir(tag);
    let model = dir.join("model");
    init_tiny_vl_model(&model, 3);
    let out = dir.join("out");
    let config = dir.join("train.yaml");
    std::fs::write(
        &config,
        format!(
            "model: {model}\noutput_dir: {out}\ndevice: cpu\ndtype: f32\nseed: 1\n\
             finetuning: full\nvision: {vision}\n\
             optimizer: {{lr: {LR:?}, weight_decay: 0.0}}\nscheduler: {{type: constant}}\n\
             data: {{plugin: storyreasoning, path: {data}, cutoff_len: 1024, image_max_pixels: 50176, config: {{max_images: 2}}}}\n\
             training: {{max_steps: {STEPS}, micro_batch_size: 1, logging_steps: 1, progress_bar: false}}\n",
            model = model.display(),
            out = out.display(),
            data = repo_root().join("datasets/storyreasoning-sample").display(),
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let o = ferrotune(&["train", config.to_str().unwrap()]);
    let seconds = started.elapsed().as_secs_f64();
    assert!(o.status.success(), "{tag}: train failed:\n{}\n{}", stdout(&o), stderr(&o));
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["steps"], STEPS, "{tag}: {summary}");
    println!(
        "{tag}: {STEPS} steps in {seconds:.1} s, loss {:.4} -> {:.4}",
        summary["first_loss"].as_f64().unwrap(),
        summary["last_loss"].as_f64().unwrap()
    );
    Run { model, out, seconds }
}

/// The tensors of a saved model: one `model.safetensors` (the tiny model is far below the
/// default max_shard_size), sorted by key.
fn model_tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let file = dir.join("model.safetensors");
    assert!(file.is_file(), "{}: no model.safetensors", dir.display());
    let mut v = Tensor::read_safetensors(&file).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Compares output_dir's tensors with the input model's, key by key: the key sets are equal
/// and every part holds the preset's number of tensors.
fn changes(run: &Run) -> Vec<Change> {
    let before = model_tensors(&run.model);
    let after = model_tensors(&run.out);
    let keys = |v: &[(String, Tensor)]| v.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&after), keys(&before), "output_dir saves exactly the input model's keys");
    let count = |p: Part| before.iter().filter(|(k, _)| part_of(k) == p).count();
    assert_eq!(count(Part::Tower), TOWER_TENSORS, "vision-tower keys: {:?}", keys(&before));
    assert_eq!(count(Part::Merger), MERGER_TENSORS, "merger keys: {:?}", keys(&before));
    assert!(count(Part::Language) > 0);
    before
        .iter()
        .zip(&after)
        .map(|((key, a), (_, b))| {
            assert_eq!(b.kind(), Kind::Float, "`{key}` is saved in the run's dtype");
            assert_eq!(a.size(), b.size(), "`{key}`");
            let same = a.eq_tensor(b).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
            Change {
                key: key.clone(),
                part: part_of(key),
                identical: a.equal(b),
                max_abs: (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
                    .abs()
                    .max()
                    .double_value(&[]),
                unchanged: same,
                elements: a.numel(),
            }
        })
        .collect()
}

/// Asserts that the tensors of `frozen` parts are byte-identical and that every other tensor
/// moved (by more than MOVED, with at most UNCHANGED_SHARE of its elements left as they were);
/// prints a line per part.
fn check_parts(tag: &str, changes: &[Change], frozen: &[Part]) {
    for c in changes {
        if frozen.contains(&c.part) {
            assert!(
                c.identical,
                "{tag}: `{}` ({:?}, frozen) changed by {:e}",
                c.key, c.part, c.max_abs
            );
        } else {
            assert!(
                c.max_abs > MOVED && c.unchanged <= UNCHANGED_SHARE,
                "{tag}: `{}` ({:?}) did not train: max |change| {:e}, {:.2e} of its elements unchanged",
                c.key,
                c.part,
                c.max_abs,
                c.unchanged
            );
        }
    }
    for part in [Part::Tower, Part::Merger, Part::Language] {
        let of: Vec<&Change> = changes.iter().filter(|c| c.part == part).collect();
        let least = of.iter().map(|c| c.max_abs).fold(f64::INFINITY, f64::min);
        let most = of.iter().map(|c| c.max_abs).fold(0.0, f64::max);
        let unchanged: f64 = of.iter().map(|c| c.unchanged * c.elements as f64).sum();
        let elements: usize = of.iter().map(|c| c.elements).sum();
        let state = if frozen.contains(&part) { "byte-identical" } else { "trained" };
        println!(
            "{tag}: {part:?}: {} tensors {state}, max |change| per tensor {least:.2e}..{most:.2e}, \
             {unchanged:.0} of {elements} elements unchanged",
            of.len()
        );
    }
}

/// The least max |change| over the rows of tensor `key` (a row per token for the embedding).
fn least_row_change(run: &Run, key: &str) -> f64 {
    let row = |dir: &Path| {
        model_tensors(dir)
            .into_iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("no `{key}`"))
            .1
    };
    let d = (row(&run.out).to_kind(Kind::Double) - row(&run.model).to_kind(Kind::Double)).abs();
    d.amax(&[1i64][..], false).min().double_value(&[])
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

#[test]
fn qwen2vl_full_finetuning_with_a_frozen_tower() {
    let started = std::time::Instant::now();
    let run = train("full-vl-frozen-tower", "{freeze_vision_tower: true, tune_merger: true}");

    // output_dir is a Hugging Face model directory with the input model's processor files.
    for file in ["config.json", "generation_config.json", "tokenizer.json"] {
        assert!(run.out.join(file).is_file(), "output_dir lacks {file}");
    }
    for file in ["preprocessor_config.json", "tokenizer_config.json"] {
        let read = |dir: &Path| -> Value {
            let text = std::fs::read_to_string(dir.join(file))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()));
            serde_json::from_str(&text).unwrap()
        };
        assert_eq!(read(&run.out), read(&run.model), "{file}: the input model's");
    }

    let changes = changes(&run);
    check_parts("frozen tower", &changes, &[Part::Tower]);
    let embedding = least_row_change(&run, "model.embed_tokens.weight");
    println!("frozen tower: every embedding row moved, by at least {embedding:.2e} (max |change|)");
    assert!(
        embedding > MOVED,
        "an embedding row moved only {embedding:e}: the tied lm_head trains every row"
    );

    // Ferrotune's logits of output_dir on a two-image story prompt.
    one_torch_thread();
    let g = TextGenerator::load(&run.out, Device::Cpu, Kind::Float).unwrap();
    let prompt = g.prompt_with_images(PROMPT, &story_images(), true, None).unwrap();
    let images = prompt.images.as_ref().expect("two images");
    assert_eq!(images.image_grid_thw.len(), 2);
    let ids = Tensor::from_slice(&prompt.ids).view([1, -1]);
    let ours = tch::no_grad(|| {
        g.model.forward(
            ForwardArgs::ids(&ids)
                .images(Some(images))
                .mode(g.model.mode(ForwardFlags::NONE, false)),
        )
    })
    .unwrap();
    let grid =
        Tensor::from_slice(&images.image_grid_thw.iter().flatten().copied().collect::<Vec<i64>>())
            .view([-1, 3]);

    // transformers' logits of output_dir (and of the input model) on the same prompt.
    let dir = run.out.parent().unwrap();
    let inputs = dir.join("inputs.safetensors");
    Tensor::write_safetensors(&[("input_ids", &ids), ("image_grid_thw", &grid)], &inputs).unwrap();
    let reference = dir.join("reference.safetensors");
    let mut args = vec![
        repo_root().join("tests/python/full_vl_reference.py").into_os_string(),
        run.out.clone().into_os_string(),
        run.model.clone().into_os_string(),
        inputs.into_os_string(),
        reference.clone().into_os_string(),
    ];
    args.extend(story_images().into_iter().map(PathBuf::into_os_string));
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let o = run_python(&args);
    println!("{}", stdout(&o).trim());
    let theirs = Tensor::read_safetensors(&reference).unwrap();
    let get = |name: &str| {
        theirs.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone()).unwrap()
    };
    assert!(get("image_grid_thw").equal(&grid), "image grids");
    let pixel_diff = max_abs_diff(&images.pixel_values, &get("pixel_values"));
    let logits_diff = max_abs_diff(&ours, &get("logits"));
    let trained_by = max_abs_diff(&get("input_logits"), &get("logits"));
    println!(
        "frozen tower: two-image story prompt ({} tokens): pixel values ferrotune vs transformers \
         {pixel_diff:.2e}; logits of output_dir ferrotune vs transformers {logits_diff:.2e} \
         (training moved transformers' logits by {trained_by:.2e}); train {:.1} s, test {:.1} s",
        prompt.ids.len(),
        run.seconds,
        started.elapsed().as_secs_f64()
    );
    assert!(pixel_diff <= PIXEL_TOL, "pixel values differ by {pixel_diff:e}");
    assert!(
        trained_by > 100.0 * LOGITS_TOL,
        "training moved the logits only {trained_by:e}: the comparison would not show a lost update"
    );
    assert!(
        logits_diff <= LOGITS_TOL,
        "logits of output_dir: ferrotune vs transformers {logits_diff:e}"
    );
}

#[test]
fn qwen2vl_full_finetuning_with_a_frozen_llm_trains_only_the_vision_side() {
    let started = std::time::Instant::now();
    let run = train("full-vl-frozen-llm", "{freeze_llm: true}");
    let changes = changes(&run);
    check_parts("frozen llm", &changes, &[Part::Language]);
    println!(
        "frozen llm: train {:.1} s, test {:.1} s",
        run.seconds,
        started.elapsed().as_secs_f64()
    );
}
