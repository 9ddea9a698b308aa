//! Qwen2-VL against transformers 5.24's `Qwen2VLForConditionalGeneration`: a tiny random fp32
//! checkpoint built by `tests/python/qwen2vl_reference.py` (2 vision blocks, a 2-layer decoder
//! with M-RoPE split [2, 3, 3], token ids read from config.json), compared on the logits of a
//! left-padded two-row batch with five images of four grid sizes, on text-only logits, and on
//! greedy generations (batch of 1 and 2 with images, a padded text-only batch); both key layouts
//! and both config layouts; the error for a wrong image-token count; `init-model --preset tiny-vl` loaded by
//! transformers; a merged save; and LoRA's targets and adapter keys against peft's.
use ferrotune::model::ForwardArgs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrotune::generate::{generate, generate_mm, generate_mm_with_stats, SamplingParams};
use ferrotune::model::linear::LinearMode;
use ferrotune::model::{InitOptions, VisionInputs};
use ferrotune_tests::reference::{grids, json, load, max_abs, read, rows, tensor2, unpadded};
use ferrotune_tests::{
    build_dir, cached_reference, one_torch_thread, registry, relative_error, run_python, temp_dir,
};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

/// The reference outputs, built once into `target/qwen2vl-reference/<hash>/`.
fn reference() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    one_torch_thread();
    DIR.get_or_init(|| cached_reference("qwen2vl_reference.py", "qwen2vl-reference"))
}

struct Batch {
    ids: Tensor,
    mask: Tensor,
    images: VisionInputs,
}

fn batch() -> Batch {
    let dir = reference();
    let inputs = json(&dir.join("inputs.json"));
    Batch {
        ids: tensor2(&rows(&inputs["mm_ids"])),
        mask: tensor2(&rows(&inputs["mm_mask"])),
        images: VisionInputs::images(
            read(&dir.join("pixels.safetensors"), "pixel_values"),
            grids(&inputs["grids"]),
        ),
    }
}

#[test]
fn multimodal_logits_match_transformers_in_both_layouts() {
    let dir = reference();
    let b = batch();
    let want = read(&dir.join("logits.safetensors"), "mm");
    let mut outs = Vec::new();
    for layout in ["vl", "vl-hf", "vl-old"] {
        let model = load(&dir.join(layout));
        assert_eq!(
            model.image_token_id(),
            Some(295),
            "{layout}: image_token_id comes from config.json"
        );
        assert_eq!(
            (model.vision_start_token_id(), model.spatial_merge_size()),
            (Some(292), Some(2))
        );
        let got = tch::no_grad(|| {
            model.forward(
                ForwardArgs::ids(&b.ids)
                    .mask(Some(&b.mask))
                    .images(Some(&b.images))
                    .mode(LinearMode::BASE),
            )
        })
        .unwrap();
        let (g, w) = (unpadded(&got, &b.mask), unpadded(&want, &b.mask));
        let (abs, rel) = (max_abs(&g, &w), relative_error(&g, &w));
        eprintln!("{layout}: 2 rows, 5 images, left padding: max abs logit diff {abs:.2e}, max rel {rel:.2e}");
        assert!(rel <= TOLERANCE, "{layout}: relative error {rel:e} > {TOLERANCE:e}");
        assert!(got.isfinite().all().int64_value(&[]) == 1, "{layout}: padding rows stay finite");
        outs.push(got);
    }
    assert_eq!(max_abs(&outs[0], &outs[1]), 0.0, "both key layouts load to the same logits");
    assert_eq!(max_abs(&outs[0], &outs[2]), 0.0, "both config layouts load to the same logits");
}

#[test]
fn kv_cache_prefill_then_steps_match_the_full_forward() {
    // The prefill stores the rope deltas; single-token steps must then equal the full forward.
    let dir = reference();
    let b = batch();
    let want = read(&dir.join("logits.safetensors"), "mm");
    let model = load(&dir.join("vl"));
    let t = b.ids.size()[1];
    let prefix = t - 3;
    let mut cache = model.new_cache(2);
    let mode = LinearMode::BASE;
    let mut parts = vec![tch::no_grad(|| {
        model.forward(
            ForwardArgs::ids(&b.ids.narrow(1, 0, prefix))
                .mask(Some(&b.mask.narrow(1, 0, prefix)))
                .images(Some(&b.images))
                .cache(Some(&mut cache))
                .mode(mode),
        )
    })
    .unwrap()];
    assert!(
        cache.rope_deltas().is_some_and(|d| d.iter().any(|&x| x != 0)),
        "images shift the positions"
    );
    for s in prefix..t {
        parts.push(
            tch::no_grad(|| {
                model.forward(
                    ForwardArgs::ids(&b.ids.narrow(1, s, 1))
                        .mask(Some(&b.mask.narrow(1, 0, s + 1)))
                        .cache(Some(&mut cache))
                        .mode(mode),
                )
            })
            .unwrap(),
        );
    }
    let got = Tensor::cat(&parts, 1);
    let rel = relative_error(&unpadded(&got, &b.mask), &unpadded(&want, &b.mask));
    eprintln!("prefill + 3 cached steps vs transformers: max rel {rel:.2e}");
    assert!(rel <= TOLERANCE, "{rel:e}");
    // Images after the prefill are refused.
    let e = model
        .forward(
            ForwardArgs::ids(&b.ids.narrow(1, 0, 1))
                .images(Some(&b.images))
                .cache(Some(&mut cache))
                .mode(mode),
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("prefill"), "{e:#}");
}

#[test]
fn text_only_input_matches_transformers() {
    let dir = reference();
    let inputs = json(&dir.join("inputs.json"));
    let model = load(&dir.join("vl"));
    let got =
        tch::no_grad(|| model.forward(ForwardArgs::ids(&tensor2(&rows(&inputs["text_ids"])))))
            .unwrap();
    let want = read(&dir.join("logits.safetensors"), "text");
    let rel = relative_error(&got, &want);
    eprintln!("text-only logits: max abs {:.2e}, max rel {rel:.2e}", max_abs(&got, &want));
    assert!(rel <= TOLERANCE, "{rel:e}");
}

#[test]
fn greedy_generation_matches_transformers() {
    let dir = reference();
    let inputs = json(&dir.join("inputs.json"));
    let want = json(&dir.join("generations.json"));
    let model = load(&dir.join("vl"));
    let new_tokens = inputs["new_tokens"].as_u64().unwrap() as usize;
    let params = SamplingParams {
        pad_token_id: inputs["pad_token_id"].as_i64().unwrap(),
        ..SamplingParams::greedy(new_tokens)
    };
    let prompts = rows(&inputs["prompts"]);
    let b = batch();

    let n0 = inputs["patches_row0"].as_i64().unwrap();
    let single =
        VisionInputs::images(b.images.pixel_values.narrow(0, 0, n0), grids(&inputs["grids_row0"]));
    let got = generate_mm(&model, &prompts[..1], Some(&single), &params).unwrap();
    assert_eq!(got, rows(&want["single"]), "batch of 1 with 2 images");

    let got = generate_mm_with_stats(&model, &prompts, Some(&b.images), &params).unwrap();
    assert_eq!(got.tokens, rows(&want["batch"]), "left-padded batch of 2 with 5 images");

    let got_text = generate(&model, &rows(&inputs["text_prompts"]), &params).unwrap();
    assert_eq!(got_text, rows(&want["text_batch"]), "left-padded text-only batch");
    eprintln!(
        "{} greedy tokens identical to transformers (min top-1/top-2 gap {:.1e}); decode {:.0} tok/s",
        new_tokens * 5,
        want["min_greedy_gap"].as_f64().unwrap(),
        got.stats.decode_tokens_per_second()
    );
}

#[test]
fn wrong_image_token_count_is_a_clear_error() {
    let dir = reference();
    let model = load(&dir.join("vl"));
    let b = batch();
    // Row 1's last token becomes one more image token.
    let ids = b.ids.copy();
    let t = ids.size()[1];
    let _ = ids.get(1).narrow(0, t - 1, 1).fill_(295);
    let e = format!(
        "{:#}",
        model
            .forward(
                ForwardArgs::ids(&ids)
                    .mask(Some(&b.mask))
                    .images(Some(&b.images))
                    .mode(LinearMode::BASE)
            )
            .unwrap_err()
    );
    assert!(
        e.contains("19 image tokens")
            && e.contains("18 merged patches")
            && e.contains("[6, 1, 6, 1, 4]"),
        "{e}"
    );
    // Too few images for the blocks.
    let fewer = VisionInputs::images(
        b.images.pixel_values.narrow(0, 0, 28),
        b.images.image_grid_thw[..2].to_vec(),
    );
    let e = format!(
        "{:#}",
        model
            .forward(
                ForwardArgs::ids(&b.ids)
                    .mask(Some(&b.mask))
                    .images(Some(&fewer))
                    .mode(LinearMode::BASE)
            )
            .unwrap_err()
    );
    assert!(e.contains("18 image tokens") && e.contains("7 merged patches"), "{e}");
    // pixel_values that disagree with the grids.
    let bad = VisionInputs::images(
        b.images.pixel_values.narrow(0, 0, 70),
        b.images.image_grid_thw.clone(),
    );
    let e = format!(
        "{:#}",
        model
            .forward(
                ForwardArgs::ids(&b.ids)
                    .mask(Some(&b.mask))
                    .images(Some(&bad))
                    .mode(LinearMode::BASE)
            )
            .unwrap_err()
    );
    assert!(e.contains("pixel_values") && e.contains("[72, 1176]"), "{e}");
}

#[test]
fn images_for_a_text_model_are_an_error() {
    let root = temp_dir("vl-text-model");
    let tok = ferrotune_tests::write_tiny_tokenizer(&root.join("tok"), 20);
    let mut opts = InitOptions::preset("tiny", tok, root.join("m")).unwrap();
    opts.dtype = Kind::Float;
    ferrotune::model::write_random_model(&opts).unwrap();
    let model = load(&root.join("m"));
    let images =
        VisionInputs::images(Tensor::zeros([4, 1176], (Kind::Float, Device::Cpu)), vec![[1, 2, 2]]);
    let e = format!(
        "{:#}",
        model
            .forward(
                ForwardArgs::ids(&Tensor::from_slice(&[3i64, 4]).view([1, 2]))
                    .images(Some(&images))
                    .mode(LinearMode::BASE)
            )
            .unwrap_err()
    );
    assert!(e.contains("no vision tower"), "{e}");
    std::fs::remove_dir_all(root).ok();
}

/// A WordLevel tokenizer holding Qwen2-VL's vision tokens as special added tokens.
fn write_vl_tokenizer(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let specials = [
        "<unk>",
        "<|endoftext|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ];
    let mut vocab = serde_json::Map::new();
    for (i, s) in
        specials.iter().map(|s| s.to_string()).chain((0..40).map(|w| format!("w{w}"))).enumerate()
    {
        vocab.insert(s, serde_json::json!(i));
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string_pretty(&tokenizer).unwrap()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>", "bos_token": null}"#).unwrap();
    path
}

#[test]
fn init_model_tiny_vl_loads_in_transformers_with_the_same_logits_and_saves_merged() {
    let root = temp_dir("vl-init");
    let tok = write_vl_tokenizer(&root.join("tok"));
    // A tokenizer without the vision tokens is refused by name.
    let plain = ferrotune_tests::write_tiny_tokenizer(&root.join("plain"), 10);
    let e = ferrotune::model::write_random_model(
        &InitOptions::preset("tiny-vl", &plain, root.join("bad")).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("<|image_pad|>") && e.contains("lacks"), "{e}");
    assert!(!root.join("bad").exists(), "nothing is written for a refused tokenizer");

    let mut opts = InitOptions::preset("tiny-vl", &tok, root.join("m")).unwrap();
    opts.dtype = Kind::Float;
    opts.seed = 3;
    ferrotune::model::write_random_model(&opts).unwrap();
    let cfg = json(&root.join("m/config.json"));
    assert_eq!(
        (
            cfg["image_token_id"].as_i64(),
            cfg["vision_start_token_id"].as_i64(),
            cfg["video_token_id"].as_i64()
        ),
        (Some(5), Some(2), Some(6))
    );
    assert_eq!(
        cfg["text_config"]["rope_parameters"]["mrope_section"],
        serde_json::json!([2, 3, 3])
    );
    let pre = json(&root.join("m/preprocessor_config.json"));
    assert_eq!(
        (
            pre["min_pixels"].as_i64(),
            pre["max_pixels"].as_i64(),
            pre["image_processor_type"].as_str()
        ),
        (Some(3136), Some(12845056), Some("Qwen2VLImageProcessor"))
    );

    let model = load(&root.join("m"));
    // One image [1, 4, 4] (4 tokens) between text; pixel values from a seeded generator.
    let ids = Tensor::from_slice(&[7i64, 8, 2, 5, 5, 5, 5, 3, 9, 10]).view([1, 10]);
    tch::manual_seed(0);
    let images = VisionInputs::images(
        Tensor::randn([16, 1176], (Kind::Float, Device::Cpu)),
        vec![[1, 4, 4]],
    );
    let ours = tch::no_grad(|| {
        model.forward(ForwardArgs::ids(&ids).images(Some(&images)).mode(LinearMode::BASE))
    })
    .unwrap();
    let io = root.join("io.safetensors");
    Tensor::write_safetensors(
        &[
            ("ids", &ids),
            ("pixel_values", &images.pixel_values),
            ("grid", &Tensor::from_slice(&[1i64, 4, 4]).view([1, 3])),
        ],
        &io,
    )
    .unwrap();
    let script = r#"
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2VLForConditionalGeneration
m = Qwen2VLForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32, attn_implementation="sdpa").eval()
t = load_file(sys.argv[2])
ids = t["ids"]
with torch.no_grad():
    out = m(input_ids=ids, pixel_values=t["pixel_values"], image_grid_thw=t["grid"], mm_token_type_ids=(ids == m.config.image_token_id).int()).logits
save_file({"logits": out.contiguous()}, sys.argv[3])
"#;
    let py = root.join("check.py");
    std::fs::write(&py, script).unwrap();
    let out = root.join("ref.safetensors");
    run_python(&[py.as_os_str(), root.join("m").as_os_str(), io.as_os_str(), out.as_os_str()]);
    let rel = relative_error(&ours, &read(&out, "logits"));
    eprintln!("init-model tiny-vl in transformers: max rel logit diff {rel:.2e}");
    assert!(rel <= TOLERANCE, "{rel:e}");

    // save_pretrained writes the vision weights and the processor config; it reloads equal.
    model.save_pretrained(&root.join("saved"), &root.join("m"), None).unwrap();
    assert!(root.join("saved/preprocessor_config.json").is_file());
    let keys: Vec<String> = ferrotune::model::save::read_model_tensors(&root.join("saved"))
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    // The layout transformers 5.24's save_pretrained writes (its original format).
    assert!(
        keys.iter().any(|k| k == "visual.patch_embed.proj.weight")
            && keys.iter().any(|k| k == "model.norm.weight"),
        "{keys:?}"
    );
    let again = tch::no_grad(|| {
        load(&root.join("saved"))
            .forward(ForwardArgs::ids(&ids).images(Some(&images)).mode(LinearMode::BASE))
    })
    .unwrap();
    assert_eq!(max_abs(&again, &ours), 0.0);
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn saving_writes_the_keys_transformers_saves() {
    // `vl-hf` is transformers' own save_pretrained output; `vl` holds the module paths.
    let dir = reference();
    let model = load(&dir.join("vl"));
    let root = temp_dir("vl-save-old");
    model.save_pretrained(&root.join("out"), &dir.join("vl"), None).unwrap();
    let mut saved: Vec<String> = ferrotune::model::save::read_model_tensors(&root.join("out"))
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut want: Vec<String> = ferrotune::model::save::read_model_tensors(&dir.join("vl-hf"))
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    saved.sort();
    want.sort();
    assert_eq!(saved, want, "the keys transformers 5.24 saves");
    let b = batch();
    let a = tch::no_grad(|| {
        load(&root.join("out")).forward(
            ForwardArgs::ids(&b.ids)
                .mask(Some(&b.mask))
                .images(Some(&b.images))
                .mode(LinearMode::BASE),
        )
    })
    .unwrap();
    let c = tch::no_grad(|| {
        model.forward(
            ForwardArgs::ids(&b.ids)
                .mask(Some(&b.mask))
                .images(Some(&b.images))
                .mode(LinearMode::BASE),
        )
    })
    .unwrap();
    assert_eq!(max_abs(&a, &c), 0.0);
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn lora_targets_and_adapter_keys_match_peft() {
    let lib = build_dir().join("libferrotune_lora.so");
    assert!(
        lib.exists(),
        "{} is missing: `cargo build -p ferrotune-lora -p ferrotune-testkit` first",
        lib.display()
    );
    let dir = reference();
    let peft = json(&dir.join("peft.json"));
    let reg = registry();
    for (tag, config) in [
        ("q_v", r#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}"#),
        ("qkv", r#"{"r": 2, "lora_alpha": 4, "target_modules": ["qkv"]}"#),
    ] {
        let mut model = load(&dir.join("vl"));
        let method = reg.adapter("lora", config).unwrap_or_else(|e| panic!("{config}: {e}"));
        let report = model
            .attach_adapter("default", Box::new(method))
            .unwrap_or_else(|e| panic!("{config}: {e:#}"));
        let mut keys: Vec<String> =
            model.adapter_state_dict().unwrap().into_iter().map(|(k, _)| k).collect();
        keys.sort();
        let want: Vec<String> = serde_json::from_value(peft[tag].clone()).unwrap();
        assert_eq!(keys, want, "{tag}: adapter keys, ours vs peft's");
        let vision = report.modules.iter().filter(|(m, _)| m.starts_with("model.visual.")).count();
        match tag {
            "q_v" => assert_eq!(vision, 0, "q_proj/v_proj are language-model layers only"),
            _ => {
                assert_eq!((vision, report.modules.len()), (2, 2), "qkv is the vision attention's")
            }
        }
        // The adapted model still runs with images (B = 0: the base logits).
        let b = batch();
        let base = tch::no_grad(|| {
            model.forward(
                ForwardArgs::ids(&b.ids)
                    .mask(Some(&b.mask))
                    .images(Some(&b.images))
                    .mode(LinearMode::BASE),
            )
        })
        .unwrap();
        let adapted = tch::no_grad(|| {
            model.forward(
                ForwardArgs::ids(&b.ids)
                    .mask(Some(&b.mask))
                    .images(Some(&b.images))
                    .mode(model.mode(ferrotune_plugin_api::ForwardFlags::NONE, false)),
            )
        })
        .unwrap();
        assert!(max_abs(&base, &adapted) < 1e-6, "{tag}: LoRA starts as the identity");
    }
}
