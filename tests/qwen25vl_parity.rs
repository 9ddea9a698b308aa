//! Qwen2.5-VL against transformers 5.24's `Qwen2_5_VLForConditionalGeneration`, and videos for
//! both Qwen2-VL and Qwen2.5-VL: tiny random fp32 checkpoints built by
//! `tests/python/qwen25vl_reference.py` (a 3-block windowed vision tower, blocks 0 and 2 on
//! 56-pixel windows that split every grid, block 1 full attention; a 2-layer M-RoPE decoder).
//! Compared: logits with two images of different sizes, with a 3-temporal-patch video at 2/3 s
//! per patch, with both in a left-padded batch of two rows, with a video without
//! `second_per_grid_ts`, in both key layouts; 32 greedy tokens decoded on the KV cache after
//! the multimodal prefill (Qwen2.5-VL and Qwen2-VL); a peft LoRA adapter with random weights on language and vision
//! linears (loaded from peft's files, then merged); Qwen2-VL with videos; the errors for video
//! tokens that disagree with the grids; and `init-model --preset tiny-vl25` with the real Qwen
//! tokenizer loaded by transformers, saved and reloaded.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrotune::model::linear::LinearMode;
use ferrotune::model::{ForwardArgs, InitOptions, VideoInputs, VisionInputs};
use ferrotune::peft::PeftModel;
use ferrotune_plugin_api::ForwardFlags;
use ferrotune_tests::reference::{json, load, max_abs, read, rows, tensor2, unpadded};
use ferrotune_tests::{
    build_dir, cached_reference, one_torch_thread, qwen2_tokenizer, registry, run_python, temp_dir,
};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// Max absolute logit difference allowed against transformers (fp32, same libtorch kernels).
const TOLERANCE: f64 = 1e-5;

/// The reference outputs, built once into `target/qwen25vl-reference/<hash>/`.
fn reference() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    one_torch_thread();
    DIR.get_or_init(|| cached_reference("qwen25vl_reference.py", "qwen25vl-reference"))
}

/// One case of `inputs.json`: a left-padded batch with its images and videos.
struct Case {
    ids: Tensor,
    mask: Tensor,
    prompts: Vec<Vec<i64>>,
    vision: VisionInputs,
}

fn case(name: &str) -> Case {
    let dir = reference();
    let c = &json(&dir.join("inputs.json"))["cases"][name];
    let pixels = dir.join("pixels.safetensors");
    let grids = |v: &Value| -> Vec<[i64; 3]> { serde_json::from_value(v.clone()).unwrap() };
    let videos = grids(&c["videos"]);
    let seconds: Vec<f64> = serde_json::from_value(c["seconds"].clone()).unwrap_or_default();
    Case {
        ids: tensor2(&rows(&c["ids"])),
        mask: tensor2(&rows(&c["mask"])),
        prompts: rows(&c["prompts"]),
        vision: VisionInputs {
            pixel_values: read(&pixels, &format!("{name}.pixel_values")),
            image_grid_thw: grids(&c["images"]),
            videos: (!videos.is_empty()).then(|| VideoInputs {
                pixel_values: read(&pixels, &format!("{name}.pixel_values_videos")),
                grid_thw: videos,
                second_per_grid_ts: seconds,
            }),
        },
    }
}

fn forward(model: &PeftModel, c: &Case, mode: LinearMode<'_>) -> Tensor {
    tch::no_grad(|| {
        model.forward(
            ForwardArgs::ids(&c.ids).mask(Some(&c.mask)).images(Some(&c.vision)).mode(mode),
        )
    })
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Max abs difference of `model`'s logits on case `name` from `want` (padding left out).
fn diff(model: &PeftModel, name: &str, want: &str, mode: LinearMode<'_>) -> f64 {
    let c = case(name);
    let got = forward(model, &c, mode);
    let want = read(&reference().join("logits.safetensors"), want);
    assert_eq!(got.size(), want.size(), "{name}");
    max_abs(&unpadded(&got, &c.mask), &unpadded(&want, &c.mask))
}

#[test]
fn logits_match_transformers_for_images_video_and_both_in_both_layouts() {
    let dir = reference();
    for layout in ["vl25", "vl25-hf"] {
        let model = load(&dir.join(layout));
        let cfg = model.vision_config().unwrap();
        assert!(cfg.qwen25 && cfg.window_size == Some(56) && cfg.fullatt_block_indexes == [1]);
        assert_eq!(model.config().architecture().hf_name(), "Qwen2_5_VLForConditionalGeneration");
        for name in ["images", "video", "both", "video_default"] {
            let d = diff(&model, name, &format!("vl25.{name}"), LinearMode::BASE);
            eprintln!("Qwen2.5-VL {layout} {name}: max abs logit diff {d:.2e}");
            assert!(d <= TOLERANCE, "{layout} {name}: {d:e} > {TOLERANCE:e}");
        }
    }
}

#[test]
fn module_names_are_transformers_named_modules() {
    let dir = reference();
    let model = load(&dir.join("vl25"));
    let mut ours: Vec<String> = model.module_names().into_iter().map(|(n, _)| n).collect();
    let mut want: Vec<String> = serde_json::from_value(json(&dir.join("modules.json"))).unwrap();
    ours.sort();
    want.sort();
    assert_eq!(ours, want);
}

#[test]
fn windows_split_the_grids_and_video_times_scale() {
    let model = load(&reference().join("vl25"));
    let tower = model.vision_tower().unwrap();
    // Grid 1×6×10: merged 3 × 5, windows of 2 × 2 merged tokens: 2×2, 2×2, 2×1, 1×2, 1×2, 1×1.
    let (order, lens) = tower.window_index(&[[1, 6, 10]]).unwrap();
    assert_eq!(lens, vec![16, 16, 8, 8, 8, 4]);
    assert_eq!(&order[..8], &[0, 1, 5, 6, 2, 3, 7, 8]);
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..15).collect::<Vec<i64>>(), "a permutation");
}

#[test]
fn greedy_decoding_on_the_kv_cache_after_a_video_prefill_matches_transformers() {
    let dir = reference();
    let want = json(&dir.join("generations.json"));
    let new_tokens = json(&dir.join("inputs.json"))["new_tokens"].as_i64().unwrap();
    for (checkpoint, name, key) in
        [("vl25", "both", "both"), ("vl25", "video", "video"), ("vl2", "both", "vl2.both")]
    {
        let model = load(&dir.join(checkpoint));
        let c = case(name);
        let b = c.ids.size()[0];
        let mut cache = model.new_cache(b);
        let mut mask = c.mask.copy();
        let mut logits = tch::no_grad(|| {
            model.forward(
                ForwardArgs::ids(&c.ids)
                    .mask(Some(&mask))
                    .images(Some(&c.vision))
                    .cache(Some(&mut cache))
                    .mode(LinearMode::BASE)
                    .last(),
            )
        })
        .unwrap();
        assert!(cache.rope_deltas().is_some_and(|d| d.iter().all(|&x| x != 0)));
        let mut out: Vec<Vec<i64>> = vec![Vec::new(); b as usize];
        for step in 0..new_tokens {
            let next = logits.argmax(-1, false);
            for (r, row) in out.iter_mut().enumerate() {
                row.push(next.int64_value(&[r as i64]));
            }
            if step + 1 == new_tokens {
                break;
            }
            mask = Tensor::cat(&[&mask, &Tensor::ones([b, 1], (Kind::Int64, Device::Cpu))], 1);
            logits = tch::no_grad(|| {
                model.forward(
                    ForwardArgs::ids(&next.view([b, 1]))
                        .mask(Some(&mask))
                        .cache(Some(&mut cache))
                        .mode(LinearMode::BASE)
                        .last(),
                )
            })
            .unwrap();
        }
        assert_eq!(out, rows(&want[key]), "{checkpoint} {name}: {} prompts", c.prompts.len());
    }
    eprintln!(
        "{} greedy tokens identical to transformers (min top-1/top-2 gap {:.1e})",
        new_tokens * 5,
        want["min_greedy_gap"].as_f64().unwrap()
    );
}

#[test]
fn peft_lora_on_language_and_vision_linears_gives_peft_logits_and_merges() {
    let lib = build_dir().join("libferrotune_lora.so");
    assert!(lib.exists(), "{} is missing: `cargo build --workspace` first", lib.display());
    let dir = reference();
    let mut model = load(&dir.join("vl25"));
    let report = model.load_peft_adapter(&dir.join("lora"), &registry()).unwrap();
    let mut ours: Vec<String> = report.modules.iter().map(|(m, _)| m.clone()).collect();
    ours.sort();
    let peft: Vec<String> =
        serde_json::from_value::<Vec<String>>(json(&dir.join("lora_modules.json")))
            .unwrap()
            .into_iter()
            .map(|m| m.trim_start_matches("base_model.model.").to_string())
            .collect();
    assert_eq!(ours, peft, "the modules peft adapted");
    assert!(ours.iter().any(|m| m.ends_with("visual.blocks.2.mlp.gate_proj")));
    let mode = model.mode(ForwardFlags::NONE, false);
    let d = diff(&model, "both", "lora.both", mode);
    eprintln!(
        "peft LoRA (language + vision linears), images and videos: max abs logit diff {d:.2e}"
    );
    assert!(d <= TOLERANCE, "{d:e}");
    let base = diff(&model, "both", "vl25.both", mode);
    assert!(base > 1e-2, "the adapter changes the logits ({base:e})");
    let merged = model.merge_adapter().unwrap();
    assert_eq!(merged.len(), ours.len());
    let d = diff(&model, "both", "lora.both", LinearMode::BASE);
    eprintln!("merged into the weights: max abs logit diff {d:.2e}");
    assert!(d <= 1e-4, "{d:e}");
}

#[test]
fn qwen2vl_videos_match_transformers() {
    let model = load(&reference().join("vl2"));
    assert!(!model.vision_config().unwrap().qwen25);
    for name in ["video", "both"] {
        let d = diff(&model, name, &format!("vl2.{name}"), LinearMode::BASE);
        eprintln!("Qwen2-VL {name}: max abs logit diff {d:.2e}");
        assert!(d <= TOLERANCE, "{name}: {d:e}");
    }
}

#[test]
fn video_tokens_that_disagree_with_the_grids_are_clear_errors() {
    let model = load(&reference().join("vl25"));
    let c = case("both");
    let err = |vision: &VisionInputs, ids: &Tensor| {
        format!(
            "{:#}",
            tch::no_grad(|| model.forward(
                ForwardArgs::ids(ids)
                    .mask(Some(&c.mask))
                    .images(Some(vision))
                    .mode(LinearMode::BASE)
            ))
            .unwrap_err()
        )
    };
    // One more video token than the grids give.
    let ids = c.ids.copy();
    let t = ids.size()[1];
    let _ = ids.get(1).narrow(0, t - 1, 1).fill_(296);
    let e = err(&c.vision, &ids);
    assert!(
        e.contains("video tokens") && e.contains("<|video_pad|>") && e.contains("video_grid_thw"),
        "{e}"
    );
    // One video fewer.
    let v = c.vision.videos.as_ref().unwrap();
    let fewer = VisionInputs {
        pixel_values: c.vision.pixel_values.shallow_clone(),
        image_grid_thw: c.vision.image_grid_thw.clone(),
        videos: Some(VideoInputs {
            pixel_values: v.pixel_values.narrow(0, 0, 72),
            grid_thw: v.grid_thw[..1].to_vec(),
            second_per_grid_ts: v.second_per_grid_ts[..1].to_vec(),
        }),
    };
    let e = err(&fewer, &c.ids);
    assert!(e.contains("26 video tokens") && e.contains("18 merged patches"), "{e}");
    // pixel_values_videos that disagree with the grids.
    let bad = VisionInputs {
        pixel_values: c.vision.pixel_values.shallow_clone(),
        image_grid_thw: c.vision.image_grid_thw.clone(),
        videos: Some(VideoInputs {
            pixel_values: v.pixel_values.narrow(0, 0, 80),
            grid_thw: v.grid_thw.clone(),
            second_per_grid_ts: vec![],
        }),
    };
    let e = err(&bad, &c.ids);
    assert!(e.contains("pixel_values_videos") && e.contains("[104, 1176]"), "{e}");
    // Videos but no second_per_grid_ts for each.
    let wrong_seconds = VisionInputs {
        pixel_values: c.vision.pixel_values.shallow_clone(),
        image_grid_thw: c.vision.image_grid_thw.clone(),
        videos: Some(VideoInputs {
            pixel_values: v.pixel_values.shallow_clone(),
            grid_thw: v.grid_thw.clone(),
            second_per_grid_ts: vec![0.5],
        }),
    };
    let e = err(&wrong_seconds, &c.ids);
    assert!(e.contains("second_per_grid_ts has 1"), "{e}");
}

/// Text, an image [1, 4, 8] (8 tokens: two windows), text, a video [2, 4, 4] at 1.5 s per
/// temporal patch (8 tokens), text; seeded random pixels. Token ids from `model`'s config.
fn image_video_prompt(model: &PeftModel) -> (Tensor, VisionInputs) {
    let vl = model.qwen2vl_config().unwrap();
    let (image, video_id, start, end) =
        (vl.image_token_id, vl.video_token_id, vl.vision_start_token_id, vl.vision_end_token_id);
    let mut ids = vec![40i64, 41, start];
    ids.extend([image; 8]);
    ids.extend([end, 42, start]);
    ids.extend([video_id; 8]);
    ids.extend([end, 43, 44]);
    let n = ids.len() as i64;
    tch::manual_seed(0);
    let vision = VisionInputs {
        pixel_values: Tensor::randn([32, 1176], (Kind::Float, Device::Cpu)),
        image_grid_thw: vec![[1, 4, 8]],
        videos: Some(VideoInputs {
            pixel_values: Tensor::randn([32, 1176], (Kind::Float, Device::Cpu)),
            grid_thw: vec![[2, 4, 4]],
            second_per_grid_ts: vec![1.5],
        }),
    };
    (Tensor::from_slice(&ids).view([1, n]), vision)
}

#[test]
fn init_model_tiny_vl25_loads_in_transformers_and_saves_what_it_saves() {
    let root = temp_dir("vl25-init");
    let tok = qwen2_tokenizer();
    let mut opts = InitOptions::preset("tiny-vl25", &tok, root.join("m")).unwrap();
    opts.dtype = Kind::Float;
    opts.seed = 5;
    let report = ferrotune::model::write_random_model(&opts).unwrap();
    for f in [
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
    ] {
        assert!(report.files.iter().any(|x| x == f), "{f} in {:?}", report.files);
    }
    let cfg = json(&root.join("m/config.json"));
    assert_eq!(cfg["architectures"][0], "Qwen2_5_VLForConditionalGeneration");
    assert_eq!(cfg["vision_config"]["window_size"], 56);
    let video = json(&root.join("m/video_preprocessor_config.json"));
    assert_eq!(video["video_processor_type"], "Qwen2VLVideoProcessor");

    let model = load(&root.join("m"));
    let (ids, vision) = image_video_prompt(&model);
    let run = |m: &PeftModel| {
        tch::no_grad(|| {
            m.forward(ForwardArgs::ids(&ids).images(Some(&vision)).mode(LinearMode::BASE))
        })
        .unwrap()
    };
    let ours = run(&model);
    let io = root.join("io.safetensors");
    let v = vision.videos.as_ref().unwrap();
    Tensor::write_safetensors(
        &[
            ("ids", &ids),
            ("pixel_values", &vision.pixel_values),
            ("grid", &Tensor::from_slice(&[1i64, 4, 8]).view([1, 3])),
            ("pixel_values_videos", &v.pixel_values),
            ("video_grid", &Tensor::from_slice(&[2i64, 4, 4]).view([1, 3])),
        ],
        &io,
    )
    .unwrap();
    let script = r#"
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration
m, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True)
assert not any(info.values()), info
m.eval()
t = load_file(sys.argv[2])
ids = t["ids"]
types = (ids == m.config.image_token_id).int() + 2 * (ids == m.config.video_token_id).int()
with torch.no_grad():
    out = m(input_ids=ids, pixel_values=t["pixel_values"], image_grid_thw=t["grid"],
            pixel_values_videos=t["pixel_values_videos"], video_grid_thw=t["video_grid"],
            second_per_grid_ts=torch.tensor([1.5]), mm_token_type_ids=types).logits
save_file({"logits": out.contiguous()}, sys.argv[3])
from transformers import AutoTokenizer
import json
tok = AutoTokenizer.from_pretrained(sys.argv[1])
msgs = json.loads(open(sys.argv[4]).read())
texts = [tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
         tok.apply_chat_template(msgs, tokenize=False, add_vision_id=True)]
open(sys.argv[5], "w").write(json.dumps(texts))
"#;
    let py = root.join("check.py");
    std::fs::write(&py, script).unwrap();
    let out = root.join("ref.safetensors");
    // A conversation with an image and a video in content lists, and plain strings.
    let messages = serde_json::json!([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is here?"},
                                     {"type": "video"}, {"type": "text", "text": "And here?"}]},
        {"role": "assistant", "content": "A cat, then a dog."},
        {"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "More?"}]},
    ]);
    let (msgs, texts) = (root.join("messages.json"), root.join("texts.json"));
    std::fs::write(&msgs, messages.to_string()).unwrap();
    run_python(&[
        py.as_os_str(),
        root.join("m").as_os_str(),
        io.as_os_str(),
        out.as_os_str(),
        msgs.as_os_str(),
        texts.as_os_str(),
    ]);
    let tok = ferrotune::text::Tokenizer::from_dir(&root.join("m")).unwrap();
    let want: Vec<String> = serde_json::from_value(json(&texts)).unwrap();
    let rendered = [
        tok.apply_chat_template_json(&messages, true, &Value::Null).unwrap(),
        tok.apply_chat_template_json(&messages, false, &serde_json::json!({"add_vision_id": true}))
            .unwrap(),
    ];
    assert_eq!(rendered.as_slice(), want.as_slice(), "the chat template renders as transformers'");
    assert!(
        rendered[0].contains("<|vision_start|><|video_pad|><|vision_end|>And here?"),
        "{}",
        rendered[0]
    );
    assert!(rendered[1].contains("Video 2: <|vision_start|><|video_pad|>"), "{}", rendered[1]);
    let d = max_abs(&ours, &read(&out, "logits"));
    eprintln!("init-model tiny-vl25 (image + video) in transformers: max abs logit diff {d:.2e}");
    assert!(d <= TOLERANCE, "{d:e}");

    // Saved in the layout transformers 5.24 writes, with the processor configs; reloads equal.
    model.save_pretrained(&root.join("saved"), &root.join("m"), None).unwrap();
    assert!(root.join("saved/video_preprocessor_config.json").is_file());
    let keys = |d: &str| {
        let mut k: Vec<String> = ferrotune::model::save::read_model_tensors(&root.join(d))
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys("saved"), keys("m"));
    assert!(keys("saved").iter().any(|k| k == "visual.blocks.0.mlp.gate_proj.bias"));
    assert_eq!(max_abs(&run(&load(&root.join("saved"))), &ours), 0.0);
    std::fs::remove_dir_all(root).ok();
}

/// `ferrotune train` on the video fixture (frame folders) with the tiny Qwen2.5-VL: a LoRA on
/// language and vision linears, the same as nf4 QLoRA, and full fine-tuning of the decoder,
/// tower and merger. transformers and peft then load what was written: peft's logits with the
/// LoRA adapter, `ferrotune merge`'s merged model and the fully trained model all equal ours.
#[test]
fn video_training_lora_qlora_full_and_merge_load_in_transformers_and_peft() {
    let root = temp_dir("vl25-train");
    let mut opts = InitOptions::preset("tiny-vl25", qwen2_tokenizer(), root.join("m")).unwrap();
    opts.dtype = Kind::Float;
    opts.seed = 5;
    ferrotune::model::write_random_model(&opts).unwrap();
    let data = ferrotune_tests::repo_root().join("tests/fixtures/video/frames_demo.json");
    let train = |name: &str, method: &str| -> Value {
        let config = root.join(format!("{name}.yaml"));
        std::fs::write(
            &config,
            format!(
                "model: {model}\noutput_dir: {out}\nseed: 1\ndtype: f32\n{method}\n\
                 optimizer: {{lr: 1.0e-2}}\nscheduler: {{type: constant}}\n\
                 data: {{plugin: sharegpt, path: {data}, cutoff_len: 512, video_min_pixels: 3136, \
                 video_max_pixels: 12544, config: {{columns: {{messages: messages, videos: videos}}, \
                 tags: {{role_tag: role, content_tag: content, user_tag: user, assistant_tag: assistant}}}}}}\n\
                 training: {{max_steps: 6, micro_batch_size: 2, progress_bar: false}}\n",
                model = root.join("m").display(),
                out = root.join(name).display(),
                data = data.display(),
            ),
        )
        .unwrap();
        let o = ferrotune_tests::ferrotune(&["train", config.to_str().unwrap()]);
        assert!(o.status.success(), "{name}: {}", ferrotune_tests::stderr(&o));
        let summary = json(&root.join(name).join("train_summary.json"));
        let (first, last) =
            (summary["first_loss"].as_f64().unwrap(), summary["last_loss"].as_f64().unwrap());
        eprintln!("{name} on videos: loss {first:.4} -> {last:.4} in 6 steps");
        assert!(last < first, "{name}: {first} -> {last}");
        summary
    };
    let lora = "adapter: {plugin: lora, r: 8, lora_alpha: 16, lora_dropout: 0.0, \
                target_modules: [q_proj, v_proj, gate_proj, down_proj, qkv, proj]}";
    train("lora", lora);
    train("qlora", &format!("{lora}\nquantization: {{plugin: nf4, compute_dtype: float32}}"));
    train("full", "finetuning: full\nvision: {freeze_vision_tower: false, tune_merger: true}");
    let quantized: Vec<String> =
        serde_json::from_value(json(&root.join("qlora/quantization.json"))["modules"].clone())
            .unwrap();
    assert!(
        !quantized.is_empty() && quantized.iter().all(|m| !m.contains("visual")),
        "{quantized:?}"
    );
    let adapter: Vec<String> =
        Tensor::read_safetensors(root.join("lora/adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
    for key in [
        "base_model.model.model.visual.blocks.0.mlp.gate_proj.lora_A.weight",
        "base_model.model.model.visual.blocks.1.attn.proj.lora_B.weight",
        "base_model.model.model.language_model.layers.1.mlp.down_proj.lora_A.weight",
    ] {
        assert!(adapter.iter().any(|k| k == key), "{key} not in {adapter:?}");
    }
    let o = ferrotune_tests::ferrotune(&[
        "merge",
        "--model",
        root.join("m").to_str().unwrap(),
        "--adapter",
        root.join("lora").to_str().unwrap(),
        "--out",
        root.join("merged").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "merge: {}", ferrotune_tests::stderr(&o));

    let mut model = load(&root.join("m"));
    let (ids, vision) = image_video_prompt(&model);
    let run = |m: &PeftModel, mode: LinearMode<'_>| {
        tch::no_grad(|| m.forward(ForwardArgs::ids(&ids).images(Some(&vision)).mode(mode))).unwrap()
    };
    let base = run(&model, LinearMode::BASE);
    model.load_peft_adapter(&root.join("lora"), &registry()).unwrap();
    let adapted = run(&model, model.mode(ForwardFlags::NONE, false));
    let merged = run(&load(&root.join("merged")), LinearMode::BASE);
    let full = run(&load(&root.join("full")), LinearMode::BASE);
    assert!(max_abs(&adapted, &base) > 1e-3 && max_abs(&full, &base) > 1e-3, "training moved");

    let io = root.join("io.safetensors");
    let v = vision.videos.as_ref().unwrap();
    Tensor::write_safetensors(
        &[
            ("ids", &ids),
            ("pixel_values", &vision.pixel_values),
            ("pixel_values_videos", &v.pixel_values),
        ],
        &io,
    )
    .unwrap();
    let script = r#"
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration
from peft import PeftModel
root = sys.argv[1]
t = load_file(sys.argv[2])
def load(d):
    m, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(f"{root}/{d}", dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True)
    assert not any(info.values()), (d, info)
    return m.eval()
def logits(m):
    ids = t["ids"]
    types = (ids == 151655).int() + 2 * (ids == 151656).int()
    with torch.no_grad():
        return m(input_ids=ids, pixel_values=t["pixel_values"], image_grid_thw=torch.tensor([[1, 4, 8]]),
                 pixel_values_videos=t["pixel_values_videos"], video_grid_thw=torch.tensor([[2, 4, 4]]),
                 second_per_grid_ts=torch.tensor([1.5]), mm_token_type_ids=types).logits.contiguous()
out = {"peft": logits(PeftModel.from_pretrained(load("m"), f"{root}/lora").eval()),
       "merged": logits(load("merged")), "full": logits(load("full"))}
save_file(out, sys.argv[3])
"#;
    let py = root.join("check.py");
    std::fs::write(&py, script).unwrap();
    let out = root.join("ref.safetensors");
    run_python(&[py.as_os_str(), root.as_os_str(), io.as_os_str(), out.as_os_str()]);
    for (name, ours, tol) in
        [("peft", &adapted, TOLERANCE), ("merged", &merged, 1e-4), ("full", &full, TOLERANCE)]
    {
        let d = max_abs(ours, &read(&out, name));
        eprintln!("trained on videos, {name} in transformers: max abs logit diff {d:.2e}");
        assert!(d <= tol, "{name}: {d:e}");
    }
    std::fs::remove_dir_all(root).ok();
}

/// ZeRO stage 3 over two ranks (one video row each) trains tiny-vl25 as one process does with
/// both rows: a LoRA on language and vision linears plus the merger trained in full (the tower
/// and merger are never partitioned; the decoder's adapted layers are).
#[test]
fn zero3_on_videos_matches_one_process() {
    if !ferrotune::dist::collectives::HAS_C10D {
        panic!("this build has no c10d Gloo layer: apt-get install libgloo-dev (make setup) and rebuild");
    }
    let root = temp_dir("vl25-zero3");
    let mut opts = InitOptions::preset("tiny-vl25", qwen2_tokenizer(), root.join("m")).unwrap();
    opts.dtype = Kind::Float;
    ferrotune::model::write_random_model(&opts).unwrap();
    let data = ferrotune_tests::repo_root().join("tests/fixtures/video/frames_demo.json");
    let config = |name: &str, memory: &str, micro: usize| {
        let path = root.join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "model: {model}\noutput_dir: {out}\nseed: 1\ndtype: f32\n\
                 adapter: {{plugin: lora, r: 8, lora_alpha: 16, lora_dropout: 0.0, \
                 target_modules: [q_proj, v_proj, gate_proj, down_proj, qkv]}}\n\
                 vision: {{tune_merger: true, merger_lr: 1.0e-3}}\n\
                 optimizer: {{lr: 1.0e-3}}\nscheduler: {{type: constant}}\nmemory: {memory}\n\
                 data: {{plugin: sharegpt, path: {data}, shuffle: false, cutoff_len: 512, \
                 video_min_pixels: 3136, video_max_pixels: 12544, config: {{columns: {{messages: messages, \
                 videos: videos}}, tags: {{role_tag: role, content_tag: content, user_tag: user, \
                 assistant_tag: assistant}}}}}}\n\
                 training: {{max_steps: 3, micro_batch_size: {micro}, progress_bar: false}}\n",
                model = root.join("m").display(),
                out = root.join(name).display(),
                data = data.display(),
            ),
        )
        .unwrap();
        path
    };
    let one = config("one", "{plugin: single}", 2);
    let o = ferrotune_tests::ferrotune(&["train", one.to_str().unwrap()]);
    assert!(o.status.success(), "one process: {}", ferrotune_tests::stderr(&o));
    let zero = config("zero3", "{plugin: zero, stage: 3}", 1);
    let o = ferrotune_tests::ferrotune(&[
        "launch",
        "--nproc",
        "2",
        "--timeout",
        "60",
        "train",
        zero.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "zero3: {}", ferrotune_tests::stderr(&o));
    let losses = |name: &str| -> Vec<f64> {
        std::fs::read_to_string(root.join(name).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["loss"].as_f64())
            .collect()
    };
    let (a, b) = (losses("one"), losses("zero3"));
    assert_eq!((a.len(), b.len()), (3, 3));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    let tensors = |name: &str, file: &str| {
        let mut t = Tensor::read_safetensors(root.join(name).join(file)).unwrap();
        t.sort_by(|x, y| x.0.cmp(&y.0));
        t
    };
    let mut weights = 0.0f64;
    for file in ["adapter_model.safetensors", "non_lora_state_dict.safetensors"] {
        let (x, y) = (tensors("one", file), tensors("zero3", file));
        assert_eq!(x.len(), y.len(), "{file}");
        assert!(!x.is_empty(), "{file}");
        for ((k, s), (_, t)) in x.iter().zip(&y) {
            assert!(
                file != "non_lora_state_dict.safetensors" || k.contains("visual.merger"),
                "{k}"
            );
            weights = weights.max(max_abs(s, t));
        }
    }
    eprintln!(
        "zero-3 on 2 ranks vs one process, LoRA + merger on videos: loss diff {worst:.1e}, weights diff {weights:.1e}"
    );
    assert!(worst <= 1e-5 && weights <= 1e-5, "loss {worst:e}, weights {weights:e}");
    std::fs::remove_dir_all(root).ok();
}
