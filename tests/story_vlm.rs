//! Qwen2-VL fine-tuning end to end on the bundled StoryReasoning sample, through the CLI:
//! * `ferrotune train` (LoRA on the language model and the tied lm_head, the PatchMerger
//!   trained in full) halves the training loss, writes loss.png and
//!   non_lora_state_dict.safetensors beside the PEFT adapter;
//! * transformers + peft, given the saved merger weights and the adapter, compute our logits
//!   on a two-image story prompt (≤ 1e-4), and their greedy tokens equal `ferrotune generate
//!   --image … --chat --adapter`; transformers loads `ferrotune merge`'s directory (merger
//!   restored, adapter merged) with the same logits;
//! * `data check` and `train` on a LLaVA-format data set with broken rows (placeholder count,
//!   missing image, corrupt image, an image above max_pixels, a parquet without a column)
//!   report every row, and stop or skip as `data.on_bad_sample` says.
//!
//! Needs the workspace build (`ferrotune`, plugins `lora`, `sft`, `single`, `storyreasoning`,
//! `llava`), `assets/qwen2-tokenizer` and the reference stack.
use ferrotune::model::ForwardArgs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrotune::generate::pipeline::TextGenerator;
use ferrotune_plugin_api::ForwardFlags;
use ferrotune_tests::*;
use tch::{Device, Kind, Tensor};

const PROMPT: &str = "Create a story based on these images.";
const NEW_TOKENS: usize = 12;

fn story_images() -> Vec<PathBuf> {
    ["toy-test-008_1.png", "toy-test-008_2.png"]
        .iter()
        .map(|f| repo_root().join("datasets/story-llava/images").join(f))
        .collect()
}

struct Trained {
    model: PathBuf,
    adapter: PathBuf,
}

/// One training run shared by the tests of this file.
fn trained() -> &'static Trained {
    static RUN: OnceLock<Trained> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = temp_dir("story-train");
        let model = dir.join("model");
        init_tiny_vl_model(&model, 3);
        let adapter = dir.join("run");
        let config = dir.join("train.yaml");
        std::fs::write(
            &config,
            format!(
                "model: {model}\noutput_dir: {out}\nseed: 1\n\
                 adapter: {{plugin: lora, r: 16, lora_alpha: 32, lora_dropout: 0.0, \
                 target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head]}}\n\
                 vision: {{tune_merger: true, merger_lr: 1.0e-3}}\n\
                 optimizer: {{lr: 1.0e-2}}\nscheduler: {{type: constant}}\n\
                 data: {{plugin: storyreasoning, path: {data}, cutoff_len: 1024, image_max_pixels: 50176, config: {{max_images: 2}}}}\n\
                 training: {{max_steps: 14, micro_batch_size: 1, progress_bar: false}}\n",
                model = model.display(),
                out = adapter.display(),
                data = repo_root().join("datasets/storyreasoning-sample").display(),
            ),
        )
        .unwrap();
        let o = ferrotune(&["train", config.to_str().unwrap()]);
        assert!(o.status.success(), "train: {}\n{}", stdout(&o), stderr(&o));
        Trained { model, adapter }
    })
}

#[test]
fn story_lora_sft_halves_the_loss_and_saves_merger_and_curve() {
    let t = trained();
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.adapter.join("train_summary.json")).unwrap(),
    )
    .unwrap();
    let (first, last) =
        (summary["first_loss"].as_f64().unwrap(), summary["last_loss"].as_f64().unwrap());
    println!("story LoRA SFT: loss {first:.4} -> {last:.4} in {} steps", summary["steps"]);
    assert!(last <= first / 2.0, "loss {first} -> {last}: not halved");
    let png = std::fs::read(t.adapter.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let non_lora =
        Tensor::read_safetensors(t.adapter.join("non_lora_state_dict.safetensors")).unwrap();
    let names: Vec<&str> = non_lora.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.iter().all(|n| n.starts_with("base_model.model.model.visual.merger.")),
        "{names:?}"
    );
    assert_eq!(names.len(), 6, "merger: ln_q weight/bias, mlp.0 and mlp.2 weight/bias: {names:?}");
    // The merger moved away from its initial weights.
    let base = Tensor::read_safetensors(t.model.join("model.safetensors")).unwrap();
    let (_, before) = base
        .iter()
        .find(|(n, _)| n.ends_with("merger.mlp.0.weight"))
        .expect("merger weight in the base");
    let (_, after) = non_lora.iter().find(|(n, _)| n.ends_with("merger.mlp.0.weight")).unwrap();
    assert!(
        before
            .to_kind(Kind::Float)
            .ne_tensor(after)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[])
            > 0.5
    );
}

#[test]
fn peft_and_merge_agree_with_ours_on_a_two_image_prompt() {
    one_torch_thread();
    let t = trained();
    let dir = temp_dir("story-peft");
    let merged = dir.join("merged");
    let o = ferrotune(&[
        "merge",
        "--model",
        t.model.to_str().unwrap(),
        "--adapter",
        t.adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "merge: {}", stderr(&o));
    assert!(stdout(&o).contains("restored 6 full weight(s)"), "{}", stdout(&o));

    let mut g = TextGenerator::load(&t.model, Device::Cpu, Kind::Float).unwrap();
    g.apply_adapter(&t.adapter, &registry()).unwrap();
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
    let inputs = dir.join("inputs.safetensors");
    Tensor::write_safetensors(
        &[("input_ids", &ids), ("pixel_values", &images.pixel_values), ("image_grid_thw", &grid)],
        &inputs,
    )
    .unwrap();
    let out = dir.join("reference.safetensors");
    run_python(&[
        repo_root().join("tests/python/story_peft_reference.py").as_os_str(),
        t.model.as_os_str(),
        t.adapter.as_os_str(),
        merged.as_os_str(),
        inputs.as_os_str(),
        out.as_os_str(),
        NEW_TOKENS.to_string().as_ref(),
    ]);
    let reference = Tensor::read_safetensors(&out).unwrap();
    let get = |name: &str| {
        reference.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone()).unwrap()
    };
    let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    let (peft_diff, merged_diff) =
        (diff(&ours, &get("logits")), diff(&ours, &get("merged_logits")));
    println!("two-image story prompt ({} tokens): |ours - peft| {peft_diff:.2e}, |ours - merged| {merged_diff:.2e}", prompt.ids.len());
    assert!(peft_diff <= 1e-4, "peft logits differ by {peft_diff}");
    assert!(merged_diff <= 1e-4, "merged logits differ by {merged_diff}");

    // `generate --image … --chat` gives peft's greedy tokens.
    let mut args = vec![
        "generate",
        "--model",
        t.model.to_str().unwrap(),
        "--adapter",
        t.adapter.to_str().unwrap(),
        "--chat",
        "--greedy",
        "--json",
    ];
    let files: Vec<String> = story_images().iter().map(|p| p.display().to_string()).collect();
    for f in &files {
        args.extend(["--image", f.as_str()]);
    }
    let n = NEW_TOKENS.to_string();
    args.extend(["--prompt", PROMPT, "--max-new-tokens", &n]);
    let o = ferrotune(&args);
    assert!(o.status.success(), "generate: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let ours: Vec<i64> =
        v["token_ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    let theirs: Vec<i64> = Vec::try_from(&get("tokens").view([-1])).unwrap();
    assert_eq!(ours, theirs[..ours.len()], "greedy tokens: ours {ours:?} vs peft {theirs:?}");
    assert!(!ours.is_empty());
}

#[test]
fn images_need_a_vision_model() {
    let dir = temp_dir("story-textonly");
    let model = dir.join("m");
    init_tiny_model(&qwen2_tokenizer(), &model, 1);
    let f = story_images()[0].display().to_string();
    let o = ferrotune(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--image",
        &f,
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("needs a vision-language model"), "{}", stderr(&o));
}

/// A LLaVA-format data set with one good row and one of each problem.
fn broken_llava(dir: &Path) -> PathBuf {
    let img = |name: &str| {
        repo_root().join("datasets/story-llava/images").join(name).display().to_string()
    };
    std::fs::write(dir.join("corrupt.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    // 800×600: above the max_pixels of the config below.
    let big = image::RgbImage::from_fn(800, 600, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    });
    big.save(dir.join("big.png")).unwrap();
    let turn = |from: &str, value: &str| serde_json::json!({"from": from, "value": value});
    let rows = serde_json::json!([
        {"id": "good", "image": [img("toy-train-000_1.png"), img("toy-train-000_2.png")],
         "conversations": [turn("human", "<image>\n<image>\nTell the story."), turn("gpt", "Mira walks.")]},
        {"id": "count", "image": [img("toy-train-000_1.png"), img("toy-train-000_2.png")],
         "conversations": [turn("human", "<image>\nTell the story."), turn("gpt", "Mira walks.")]},
        {"id": "missing", "image": "no-such-frame.png",
         "conversations": [turn("human", "<image>\nTell the story."), turn("gpt", "Mira walks.")]},
        {"id": "corrupt", "image": "corrupt.png",
         "conversations": [turn("human", "<image>\nTell the story."), turn("gpt", "Mira walks.")]},
        {"id": "big", "image": "big.png",
         "conversations": [turn("human", "<image>\nTell the story."), turn("gpt", "Mira walks.")]},
    ]);
    let data = dir.join("data.json");
    std::fs::write(&data, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    data
}

fn write_config(dir: &Path, model: &Path, plugin: &str, data: &Path, on_bad: &str) -> PathBuf {
    let config = dir.join(format!("{plugin}-{on_bad}.yaml"));
    std::fs::write(
        &config,
        format!(
            "model: {}\noutput_dir: {}\nadapter: {{plugin: lora, r: 4, target_modules: [q_proj, v_proj]}}\n\
             data: {{plugin: {plugin}, path: {}, image_max_pixels: 200704, on_bad_sample: {on_bad}}}\n\
             training: {{max_steps: 1, micro_batch_size: 1, progress_bar: false}}\n",
            model.display(),
            dir.join(format!("out-{on_bad}")).display(),
            data.display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn bad_rows_are_reported_then_stop_or_skip() {
    let dir = temp_dir("story-bad");
    let model = dir.join("model");
    init_tiny_vl_model(&model, 3);
    let data = broken_llava(&dir);
    let stop = write_config(&dir, &model, "llava", &data, "stop");
    let o = ferrotune(&["data", "check", stop.to_str().unwrap()]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{}", stderr(&o));
    for want in [
        "row 1: error:",
        "2 image(s) in `image` but 1 `<image>` placeholder(s)",
        "row 2: error:",
        "no-such-frame.png",
        "row 3: error:",
        "corrupt.png",
        "row 4: warning: image 0: 800×600 is above max_pixels 200704",
        "5 rows, 2 usable, 3 with errors",
        "training would stop before its first step",
    ] {
        assert!(out.contains(want), "`{want}` not in:\n{out}");
    }
    assert!(!out.contains("row 0:"), "{out}");

    let o = ferrotune(&["train", stop.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("3 of the 5 rows") && err.contains("row 2:") && err.contains("on_bad_sample"),
        "{err}"
    );
    assert!(!dir.join("out-stop/adapter_model.safetensors").exists());

    let skip = write_config(&dir, &model, "llava", &data, "skip");
    let o = ferrotune(&["train", skip.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("skipping 3 unusable rows"), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("out-skip/train_summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["train_samples"], 2);
    assert_eq!(summary["skipped_samples"], 3);

    // A parquet file without the `story` column stops before anything is read.
    let parquet = dir.join("nostory.parquet");
    let script = format!(
        "import pyarrow as pa, pyarrow.parquet as pq\n\
         t = pa.table({{'story_id': ['a'], 'images': [[{{'bytes': b'x', 'path': 'a.png'}}]], 'frame_count': [1], 'chain_of_thought': ['c']}})\n\
         pq.write_table(t, r'{}')\n",
        parquet.display()
    );
    let py = dir.join("write.py");
    std::fs::write(&py, script).unwrap();
    run_python(&[py.as_os_str()]);
    let cfg = write_config(&dir, &model, "storyreasoning", &parquet, "stop");
    let o = ferrotune(&["data", "check", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("story") && stderr(&o).contains("nostory.parquet"),
        "{}",
        stderr(&o)
    );
}

/// Qwen2-VL-Finetune's DPO rows (`prompt` with `<image>` placeholders, `chosen`, `rejected`)
/// through `ferrotune train` with `objective: dpo`: each pair's two rows carry the images
/// (pixel values for 2B rows), the reference is the same model with the adapter disabled, and
/// the preference is learnt (train reward accuracy and margin at the end).
#[test]
fn multi_image_dpo_trains_on_llava_preference_rows() {
    let dir = temp_dir("story-dpo");
    let model = dir.join("model");
    init_tiny_vl_model(&model, 3);
    let img = |name: &str| {
        repo_root().join("datasets/story-llava/images").join(name).display().to_string()
    };
    let rows: Vec<serde_json::Value> = (0..4)
        .map(|i| {
            serde_json::json!({
                "id": format!("pair-{i}"),
                "image": [img(&format!("toy-train-00{i}_1.png")), img(&format!("toy-train-00{i}_2.png"))],
                "prompt": "<image>\n<image>\nWho is in these frames?",
                "chosen": "Mira and Tobin walk to the pond.",
                "rejected": "Nobody is there at all.",
            })
        })
        .collect();
    std::fs::write(dir.join("dpo.json"), serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    let config = dir.join("dpo.yaml");
    std::fs::write(
        &config,
        format!(
            "model: {}\noutput_dir: {}\nadapter: {{plugin: lora, r: 8, lora_alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]}}\n\
             objective: {{plugin: dpo, beta: 0.1}}\noptimizer: {{lr: 1.0e-2}}\nscheduler: {{type: constant}}\n\
             data: {{plugin: llava, path: {}, image_max_pixels: 50176}}\n\
             training: {{max_steps: 6, micro_batch_size: 2, progress_bar: false}}\n",
            model.display(),
            dir.join("out").display(),
            dir.join("dpo.json").display()
        ),
    )
    .unwrap();
    let o = ferrotune(&["data", "preview", config.to_str().unwrap(), "-n", "1"]);
    let preview = stdout(&o);
    assert!(
        o.status.success()
            && preview.contains("rows as preference pairs")
            && preview.matches("<|image_pad|>×").count() == 4,
        "{preview}"
    );
    let o = ferrotune(&["train", config.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = read_jsonl(&dir.join("out/metrics.jsonl"));
    let first = &metrics[0];
    let last = metrics.last().unwrap();
    println!("first {first}\nlast {last}");
    assert!(
        (first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-4,
        "policy = reference at step 1: {first}"
    );
    assert!(last["loss"].as_f64().unwrap() < 0.6, "{last}");
    assert_eq!(last["train/rewards/accuracies"].as_f64(), Some(1.0), "{last}");
    assert!(last["train/rewards/margins"].as_f64().unwrap() > 0.0, "{last}");
}

/// `serve`'s one-decode path (`expand_with_pixels`) gives the text and pixels of the
/// trainer's two passes (`expand` when the data set is loaded, `vision_inputs` per batch).
#[test]
fn one_decode_gives_the_tokens_and_pixels_of_two() {
    let model = &trained().model;
    let tok = ferrotune::text::Tokenizer::from_dir(model).unwrap();
    let prep = ferrotune::data::ImagePrep::for_model_dir(model, &tok).unwrap().unwrap();
    let sample = || ferrotune_plugin_api::Sample {
        messages: vec![ferrotune_plugin_api::Message::new("user", "<image>\n<image>\nTell.")],
        images: story_images()
            .iter()
            .map(|p| ferrotune_plugin_api::ImageSource::Path(p.display().to_string()))
            .collect(),
        ..Default::default()
    };
    let mut twice = sample();
    let sized = prep.expand(&mut twice).unwrap();
    let two = prep.vision_inputs(&sized).unwrap().unwrap();
    let mut once = sample();
    let (sized_once, one) = prep.expand_with_pixels(&mut once).unwrap();
    let one = one.unwrap();
    assert_eq!(once.messages, twice.messages);
    assert!(once.messages[0].content.contains("<|image_pad|>"));
    assert_eq!(
        sized_once.iter().map(|s| s.grid_thw).collect::<Vec<_>>(),
        sized.iter().map(|s| s.grid_thw).collect::<Vec<_>>()
    );
    assert_eq!(one.image_grid_thw, two.image_grid_thw);
    assert_eq!(one.pixel_values.size(), two.pixel_values.size());
    assert!(one.pixel_values.equal(&two.pixel_values));
}
