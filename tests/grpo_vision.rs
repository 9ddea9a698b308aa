//! GRPO with images in the prompts (tiny random Qwen2-VL, the bundled StoryReasoning sample):
//! * the prompts batch carries each prompt's images (`pixel_values`, `image_grid_thw`,
//!   `images_per_prompt`); generation through the objective context with `prompt_rows`
//!   (GRPO's repeated prompts, out of order) gives each prompt's greedy completion with its own
//!   images, as the prompt generated alone; the completions' log-probabilities through the
//!   context, with the vision inputs repeated per row as GRPO repeats them
//!   (`select_prompt_rows`), equal a direct forward of each prompt + completion with its own
//!   images (and differ without those pixels);
//! * `ferrotune train` runs GRPO on the story sample's image prompts, logging
//!   `story_grounding` beside a length reward whose mean rises between the first and last
//!   ten steps;
//! * a prompt with images for a model without a vision tower is refused by name.
//!
//! Needs the workspace build (`ferrotune`, plugins `lora`, `align`, `rewards`,
//! `storyreasoning`) and `assets/qwen2-tokenizer`.
use std::path::{Path, PathBuf};

use ferrotune::data::layout::prepare;
use ferrotune::data::{collate, EncodeOptions, ImagePrep, Item, Layout};
use ferrotune::model::{CausalLM, ForwardArgs, VisionInputs};
use ferrotune::peft::PeftModel;
use ferrotune::text::Tokenizer;
use ferrotune::train::context::BatchContext;
use ferrotune::train::PolicyContext;
use ferrotune_plugin_api::kinds::objective::select_prompt_rows;
use ferrotune_plugin_api::{
    target_logps, Batch, ForwardFlags, ImageSource, Message, ObjectiveContext, Sample,
};
use ferrotune_tests::*;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

/// A temporary folder removed when the test ends, passed or not.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        Self(temp_dir(tag))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The CLI on one intra-op thread: a tiny model's operations are too small to share out, and
/// on a busy machine the thread pool's spinning costs more than it saves (a GRPO step here:
/// ~2x faster).
fn ferrotune_one_thread(args: &[&str]) -> std::process::Output {
    std::process::Command::new(ferrotune_bin())
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("FERROTUNE_PLUGIN_PATH")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("run ferrotune")
}

fn story_image(name: &str) -> ImageSource {
    ImageSource::Path(
        repo_root().join("datasets/story-llava/images").join(name).display().to_string(),
    )
}

fn prompt_sample(id: &str, text: &str, images: &[&str]) -> Sample {
    Sample {
        id: Some(id.into()),
        messages: vec![Message::new("user", text)],
        images: images.iter().map(|f| story_image(f)).collect(),
        ..Default::default()
    }
}

fn options() -> EncodeOptions {
    EncodeOptions { cutoff_len: 2048, train_on_prompt: false, mask_history: true }
}

fn lora_model(dir: &Path) -> PeftModel {
    let mut model = CausalLM::load(dir, Device::Cpu, Kind::Float).map(PeftModel::new).unwrap();
    let method = registry()
        .adapter("lora", r#"{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "lm_head"]}"#)
        .unwrap();
    model.attach_adapter("default", Box::new(method)).unwrap();
    perturb_adapter(&mut model, 3, 0.1);
    model
}

/// Each prompt's own log-probabilities of `completion` with `images`: one forward of prompt +
/// completion alone.
fn direct_logps(
    model: &PeftModel,
    prompt: &[i64],
    completion: &[i64],
    images: &VisionInputs,
) -> Vec<f64> {
    let ids: Vec<i64> = prompt.iter().chain(completion).copied().collect();
    let t = Tensor::from_slice(&ids).view([1, -1]);
    let logits = tch::no_grad(|| {
        model.forward(ForwardArgs::ids(&t).images(Some(images)).mode(model.eval_mode()))
    })
    .unwrap();
    let lp = logits.log_softmax(-1, Kind::Double);
    let p = prompt.len() as i64;
    completion
        .iter()
        .enumerate()
        .map(|(j, &tok)| lp.double_value(&[0, p - 1 + j as i64, tok]))
        .collect()
}

#[test]
fn image_prompts_generate_and_score_with_their_own_images() {
    let dir = TempDir::new("grpo-vision-logps");
    let model_dir = dir.0.join("model");
    init_tiny_vl_model(&model_dir, 5);
    let tok = Tokenizer::from_dir(&model_dir).unwrap();
    let mut prep = ImagePrep::for_model_dir(&model_dir, &tok).unwrap().expect("a vision model");
    prep.max_pixels = Some(50176);
    // Prompt 0 holds one image, prompt 1 two (of other sizes), so the patch blocks differ.
    let rows = vec![
        Ok(prompt_sample(
            "one",
            "Create a story based on this image.<image>",
            &["toy-test-008_1.png"],
        )),
        Ok(prompt_sample(
            "two",
            "<image><image>Create a story based on these images.",
            &["toy-train-000_1.png", "toy-train-001_2.png"],
        )),
    ];
    let prepared = prepare(Layout::Prompts, rows, &tok, Some(&prep), &options()).unwrap();
    assert!(prepared.bad.is_empty() && prepared.skipped.is_empty(), "{:?}", prepared.bad);
    let items: Vec<&Item> = prepared.items.iter().map(|(_, i)| i).collect();
    let pad = tok.pad_token_id().unwrap_or(0);
    let (tensors, meta) = collate(Layout::Prompts, &items, pad, Some(&prep)).unwrap();
    assert_eq!(meta["images_per_prompt"], json!([1, 2]));
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["prompt_ids", "prompt_mask", "pixel_values", "image_grid_thw"]);
    let batch = Batch { tensors, meta_json: Value::Object(meta).to_string() };

    let (prompts, own_images): (Vec<Vec<i64>>, Vec<VisionInputs>) = items
        .iter()
        .map(|i| match i {
            Item::Prompt { ids, images, .. } => {
                (ids.clone(), prep.vision_inputs(images.iter()).unwrap().unwrap())
            }
            _ => panic!("a prompts batch holds prompts"),
        })
        .unzip();
    let image_pad = prep.image_pad_id();
    for (p, n) in prompts.iter().zip([1usize, 2]) {
        let blocks = p.windows(2).filter(|w| w[1] == image_pad && w[0] != image_pad).count();
        assert_eq!(blocks, n, "each <image> became one block of image-pad tokens");
    }

    let model = lora_model(&model_dir);
    let ctx = PolicyContext {
        model: &model,
        tokenizer: &tok,
        train: false,
        rewards: &[],
        max_len: 4096,
        reference: None,
    };
    let bctx = BatchContext::new(&ctx, &batch);
    // GRPO's order (each prompt repeated), here out of order to catch a misplaced block.
    let order = [1usize, 0, 1, 0];
    let repeated: Vec<Vec<i64>> = order.iter().map(|&r| prompts[r].clone()).collect();
    let opts = json!({"max_new_tokens": 6, "prompt_rows": order}).to_string();
    let completions = bctx.generate(&repeated, &opts).unwrap();
    let params = {
        let mut p = ferrotune::generate::SamplingParams::greedy(6);
        p.eos_token_ids = tok.eos_token_id().into_iter().collect();
        p.pad_token_id = pad;
        p
    };
    for (k, &r) in order.iter().enumerate() {
        let alone = ferrotune::generate::generate_mm(
            &model,
            &prompts[r..r + 1],
            Some(&own_images[r]),
            &params,
        )
        .unwrap();
        assert_eq!(completions[k], alone[0], "row {k} (prompt {r}): batched vs alone");
        assert!(!completions[k].is_empty());
    }
    let e = bctx.generate(&repeated, r#"{"max_new_tokens": 2}"#).unwrap_err().to_string();
    assert!(e.contains("prompt_rows"), "{e}");

    // Log-probabilities as GRPO computes them: the prompt rows repeated with their images,
    // left-padded prompt + right-padded completion, targets on the completion tokens.
    let inputs = |pixels_zeroed: bool| {
        let mut vision: Vec<(String, Tensor)> = batch
            .tensors
            .iter()
            .filter(|(n, _)| n == "pixel_values" || n == "image_grid_thw")
            .map(|(n, t)| {
                (
                    n.clone(),
                    if pixels_zeroed && n == "pixel_values" {
                        t.zeros_like()
                    } else {
                        t.shallow_clone()
                    },
                )
            })
            .collect();
        vision = select_prompt_rows(&vision, 2, Some(&[1, 2]), None, &order).unwrap();
        vision
    };
    let prompt_ids = batch.get("prompt_ids").unwrap();
    let prompt_mask = batch.get("prompt_mask").unwrap();
    let idx = Tensor::from_slice(&order.iter().map(|&r| r as i64).collect::<Vec<_>>());
    let (pw, cw) = (prompt_ids.size()[1], completions.iter().map(Vec::len).max().unwrap() as i64);
    let n = order.len() as i64;
    let mut comp = vec![pad; (n * cw) as usize];
    let mut cmask = vec![0i64; (n * cw) as usize];
    let mut targets = vec![-1i64; (n * (pw + cw)) as usize];
    for (k, c) in completions.iter().enumerate() {
        for (j, &t) in c.iter().enumerate() {
            comp[k * cw as usize + j] = t;
            cmask[k * cw as usize + j] = 1;
            targets[k * (pw + cw) as usize + (pw - 1) as usize + j] = t;
        }
    }
    let ids = Tensor::cat(
        &[prompt_ids.index_select(0, &idx), Tensor::from_slice(&comp).view([n, cw])],
        1,
    );
    let mask = Tensor::cat(
        &[prompt_mask.index_select(0, &idx), Tensor::from_slice(&cmask).view([n, cw])],
        1,
    );
    let targets = Tensor::from_slice(&targets).view([n, pw + cw]);
    let batched = |pixels_zeroed: bool| {
        let mut all = inputs(pixels_zeroed);
        all.push(("input_ids".into(), ids.shallow_clone()));
        all.push(("attention_mask".into(), mask.shallow_clone()));
        target_logps(&bctx, &all, &targets, 1.0, ForwardFlags::NO_GRAD).unwrap().logps
    };
    let with_images = batched(false);
    let without = batched(true);
    let (mut max_diff, mut max_change) = (0f64, 0f64);
    for (k, &r) in order.iter().enumerate() {
        let direct = direct_logps(&model, &prompts[r], &completions[k], &own_images[r]);
        for (j, d) in direct.iter().enumerate() {
            let at = [k as i64, pw - 1 + j as i64];
            max_diff = max_diff.max((with_images.double_value(&at) - d).abs());
            max_change = max_change.max((without.double_value(&at) - d).abs());
        }
    }
    println!(
        "completion log-probs with images vs a direct forward: max |diff| {max_diff:.2e}; with the pixels zeroed: max |diff| {max_change:.2e}"
    );
    assert!(max_diff < 1e-4, "batched log-probs differ from the direct forward by {max_diff}");
    assert!(max_change > 1e-3, "the images changed nothing ({max_change}): were they used?");
}

#[test]
fn image_prompts_need_a_vision_model() {
    let dir = TempDir::new("grpo-vision-textonly");
    let model_dir = dir.0.join("model");
    init_tiny_model(&qwen2_tokenizer(), &model_dir, 1);
    let tok = Tokenizer::from_dir(&model_dir).unwrap();
    let rows = vec![Ok(prompt_sample("pic", "Describe <image>", &["toy-test-008_1.png"]))];
    let prepared = prepare(Layout::Prompts, rows, &tok, None, &options()).unwrap();
    assert!(prepared.items.is_empty());
    let (row, why) = &prepared.bad[0];
    assert_eq!(*row, 0);
    assert!(why.contains("pic") && why.contains("no vision tower"), "{why}");
}

#[test]
fn grpo_on_story_image_prompts_raises_the_mean_reward() {
    let dir = TempDir::new("grpo-vision-train");
    let model = dir.0.join("model");
    init_tiny_vl_model(&model, 3);
    let out = dir.0.join("run");
    let config = dir.0.join("grpo.yaml");
    // A random 151k-token model never writes a grounding tag, so `story_grounding` (logged,
    // weight 0) stays 0 here; the length reward (short completions) is what a few steps can
    // learn, and shows the image prompts train end to end.
    std::fs::write(
        &config,
        format!(
            "model: {model}\noutput_dir: {out}\nseed: 1\n\
             adapter: {{plugin: lora, r: 16, lora_alpha: 32, lora_dropout: 0.0, \
             target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head]}}\n\
             objective: {{plugin: grpo, num_generations: 4, max_completion_length: 12, temperature: 1.0, seed: 1}}\n\
             rewards: [{{plugin: length, name: short, mode: target, unit: chars, target: 4, tolerance: 100}}, \
             {{plugin: story_grounding, weight: 0.0}}]\n\
             optimizer: {{lr: 3.0e-2}}\nscheduler: {{type: constant}}\n\
             data: {{plugin: storyreasoning, path: {data}, cutoff_len: 2048, image_max_pixels: 50176, config: {{max_images: 1}}}}\n\
             training: {{max_steps: 40, micro_batch_size: 2, progress_bar: false}}\n",
            model = model.display(),
            out = out.display(),
            data = repo_root().join("datasets/storyreasoning-sample").display(),
        ),
    )
    .unwrap();
    let o = ferrotune_one_thread(&["train", config.to_str().unwrap()]);
    assert!(o.status.success(), "train: {}\n{}", stdout(&o), stderr(&o));
    let lines: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l.get("step").is_some() && l.get("train/reward").is_some())
        .collect();
    let series = |key: &str| -> Vec<f64> { lines.iter().filter_map(|l| l[key].as_f64()).collect() };
    let short = series("train/rewards/short/mean");
    let grounding = series("train/rewards/story_grounding/mean");
    assert_eq!(short.len(), 40, "a reward per step");
    assert_eq!(grounding.len(), 40, "story_grounding scored every step");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&short[..10]), mean(&short[30..]));
    println!(
        "GRPO on image prompts: length reward first 10 steps {first:.3}, last 10 {last:.3}; story_grounding mean {:.3}",
        mean(&grounding)
    );
    assert!(last > first + 0.05, "mean reward did not rise: {first:.3} -> {last:.3}: {short:?}");
}
