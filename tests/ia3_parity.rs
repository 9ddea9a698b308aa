//! The `ia3` adapter plugin against peft 0.21's IA³ on a tiny Qwen2 model made by
//! `ferrotune init-model` (hidden 64, float32), every logits comparison to 1e-5:
//! * we load the PEFT directory peft wrote (`IA3Config` on q/k/v/down_proj with down_proj
//!   feed-forward, every `ia3_l` drawn as 1 + 0.3·N(0, 1)) and compute peft's logits, and
//!   save it back under the same keys and values;
//! * peft loads the PEFT directory we write (same targets, our vectors perturbed) and
//!   computes our logits;
//! * merging equals the unmerged forward for output-scaled layers with a bias (Qwen2's q/k/v:
//!   the bias is scaled too, as peft merges), bias-free ones (o_proj) and input-scaled ones
//!   (down_proj, up_proj); `ferrotune merge` of our directory, loaded by transformers, gives
//!   our unmerged logits;
//! * a directory whose `feedforward_modules` disagrees with its tensors' shapes is refused
//!   naming the tensor and the key;
//! * `ferrotune train` with `adapter: {plugin: ia3, ...}` moves every vector and writes a
//!   directory with `peft_type: IA3` that loads back;
//! * 10 optimizer steps from peft's initial adapter equal peft + torch AdamW's per-step losses
//!   within 1e-5 (`common/train_parity.rs`);
//! * on the tiny Qwen2-VL (`init-model --preset tiny-vl`), peft loads our IA³ directory onto
//!   `Qwen2VLForConditionalGeneration` and gives our logits for an input with an image.
//!
//! Needs `cargo build --workspace` (the `ia3` plugin) and the reference stack (`$PYTHON` or
//! `.venv`: torch 2.11, transformers 5, peft 0.21); one Python run
//! (`tests/python/ia3_reference.py`) serves the file.

use ferrotune::model::{ForwardArgs, VisionInputs};
use ferrotune::peft::PeftModel;

use ferrotune_tests::adapter_parity::*;
use ferrotune_tests::train_parity::{check_variant, prepare, Variant};
use ferrotune_tests::*;
use tch::{Device, Kind, Tensor};

/// The adapter peft writes and we write (IA3Config / plugin `ia3` keys).
const QKV_DOWN: &str = r#"{"target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}"#;
/// An adapter whose output-scaled layer has no bias (o_proj): it merges.
const MERGEABLE: &str = r#"{"target_modules": ["o_proj", "up_proj", "down_proj"], "feedforward_modules": ["up_proj", "down_proj"]}"#;

/// Draws every `ia3_l` as 1 + 0.3·N(0, 1), as the reference script does for peft's.
fn perturb(model: &mut PeftModel, seed: i64) {
    tch::manual_seed(seed);
    let state = model
        .adapter_state_dict()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.randn_like() * 0.3 + 1.0))
        .collect();
    model.load_adapter_state_dict(state).unwrap();
}

#[test]
fn ia3_matches_peft_both_ways_and_merges() {
    one_torch_thread();
    let work = TempDir::new("ia3-parity");
    let w = &work.0;
    let base = tiny_parity_model(w);
    let registry = plugin_registry("libferrotune_ia3.so");

    // ours, written before the reference run so that peft can load it
    let ours_dir = w.join("ours");
    let mut ours = load_model(&base);
    attach_plugin(&mut ours, &registry, "ia3", QKV_DOWN);
    let base_logits = logits_of(&ours, &parity_ids());
    check_logits(
        "ia3_l = 1 at init: the base model",
        &base_logits,
        &logits_of(&load_model(&base), &parity_ids()),
    );
    perturb(&mut ours, 7);
    let ours_logits = logits_of(&ours, &parity_ids());
    assert!(max_abs_diff(&ours_logits, &base_logits) > 1e-2, "our adapter must matter");
    ours.save_peft_adapter(&ours_dir).unwrap();
    // `ferrotune merge` of ours, q/k/v biases scaled (transformers loads it in the reference run)
    let merged_dir = w.join("merged");
    let o = ferrotune_one_thread(&[
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        ours_dir.to_str().unwrap(),
        "--out",
        merged_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "merge: {}\n{}", stdout(&o), stderr(&o));

    let peft_dir = w.join("peft");
    let plan = serde_json::json!({
        "base": base,
        "ids": parity_ids_rows(),
        "peft_writes": {"config": serde_json::from_str::<serde_json::Value>(QKV_DOWN).unwrap(),
                        "seed": 11, "dir": peft_dir, "out": w.join("peft.logits.safetensors")},
        "peft_loads": [{"dir": ours_dir, "out": w.join("peft-loads-ours.logits.safetensors")}],
        "merged": [{"dir": merged_dir, "out": w.join("merged.logits.safetensors")}],
    });
    std::fs::write(w.join("plan.json"), serde_json::to_string_pretty(&plan).unwrap()).unwrap();
    let script = repo_root().join("tests/python/ia3_reference.py");
    let out = run_python(&[script.as_os_str(), w.as_os_str()]);
    println!("{}", stdout(&out).trim());

    // peft loads ours
    check_logits(
        "peft loads our IA³ directory: logits",
        &read_logits(&w.join("peft-loads-ours.logits.safetensors")),
        &ours_logits,
    );
    check_logits(
        "ferrotune merge (q/k/v biases scaled), in transformers",
        &read_logits(&w.join("merged.logits.safetensors")),
        &ours_logits,
    );

    // we load peft's: the same keys as ours, peft's logits, saved back unchanged
    let mut model = load_model(&base);
    let report = model
        .load_peft_adapter(&peft_dir, &registry)
        .unwrap_or_else(|e| panic!("peft's IA³ directory: {e:#}"));
    println!("peft's IA³: {}", report.summary());
    let theirs = read_logits(&w.join("peft.logits.safetensors"));
    assert!(max_abs_diff(&theirs, &base_logits) > 1e-2, "peft's adapter must matter");
    check_logits(
        "we load peft's IA³ directory: logits",
        &logits_of(&model, &parity_ids()),
        &theirs,
    );
    let (peft_saved, ours_saved) = (saved_tensors(&peft_dir), saved_tensors(&ours_dir));
    assert_eq!(tensor_names(&peft_saved), tensor_names(&ours_saved), "peft's keys are ours");
    assert!(
        peft_saved
            .iter()
            .any(|(k, t)| k == "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
                && t.size()[0] == 1)
            && peft_saved
                .iter()
                .any(|(k, t)| k == "base_model.model.model.layers.0.self_attn.q_proj.ia3_l"
                    && t.size()[1] == 1),
        "feed-forward [1, in], others [out, 1]: {:?}",
        peft_saved.iter().map(|(k, t)| (k, t.size())).collect::<Vec<_>>()
    );
    let resaved = w.join("peft-resaved");
    model.save_peft_adapter(&resaved).unwrap();
    let again = saved_tensors(&resaved);
    assert_eq!(tensor_names(&again), tensor_names(&peft_saved));
    assert!(again.iter().zip(&peft_saved).all(|(x, y)| x.1.equal(&y.1)), "values saved back");

    // a directory whose config disagrees with its tensors is refused naming the file, the
    // tensor and the key the shapes follow from, before anything is attached
    let broken = w.join("peft-broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(
        peft_dir.join("adapter_model.safetensors"),
        broken.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(peft_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    cfg["feedforward_modules"] = serde_json::json!([]);
    std::fs::write(broken.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut plain = load_model(&base);
    let e = format!("{:#}", plain.load_peft_adapter(&broken, &registry).unwrap_err());
    assert!(
        e.contains("adapter_model.safetensors")
            && e.contains("down_proj.ia3_l")
            && e.contains("`feedforward_modules` = []"),
        "{e}"
    );
    check_logits(
        "a refused directory leaves the model as it was",
        &logits_of(&plain, &parity_ids()),
        &base_logits,
    );

    // q/k/v scale their output over a bias: the merge scales the bias too, as peft's does
    let merged = model.merge_adapter().unwrap();
    assert!(merged.iter().any(|m| m.ends_with(".self_attn.q_proj")), "{merged:?}");
    check_logits(
        "merged IA³ (q/k/v with biases, down_proj) vs peft's unmerged",
        &logits_of(&model, &parity_ids()),
        &theirs,
    );

    // a bias-free output scaling and two input scalings merge exactly
    let mut model = load_model(&base);
    attach_plugin(&mut model, &registry, "ia3", MERGEABLE);
    perturb(&mut model, 13);
    let unmerged = logits_of(&model, &parity_ids());
    assert!(max_abs_diff(&unmerged, &base_logits) > 1e-2, "the adapter must matter");
    let merged = model.merge_adapter().unwrap();
    assert!(
        !merged.is_empty()
            && merged.iter().all(|m| ["o_proj", "up_proj", "down_proj"]
                .iter()
                .any(|t| m.ends_with(&format!(".{t}")))),
        "{merged:?}"
    );
    check_logits(
        "merged IA³ (o_proj, up_proj, down_proj) vs unmerged",
        &logits_of(&model, &parity_ids()),
        &unmerged,
    );
    drop(work);
}

#[test]
fn ferrotune_train_trains_the_vectors() {
    one_torch_thread();
    let work = TempDir::new("ia3-train");
    let w = &work.0;
    let base = tiny_parity_model(w);
    let out = w.join("out");
    let data = w.join("data.jsonl");
    write_alpaca_rows(&data, 8, 200, 1);
    let config = format!(
        "model: {model}\noutput_dir: {out}\nseed: 3\n\
         adapter:\n  plugin: ia3\n  target_modules: [k_proj, v_proj, down_proj]\n  feedforward_modules: [down_proj]\n\
         optimizer:\n  lr: 1.0e-2\n  weight_decay: 0.0\n  max_grad_norm: null\n\
         scheduler:\n  type: constant\n\
         data:\n  plugin: alpaca\n  path: {data}\n  cutoff_len: 64\n\
         training:\n  max_steps: 3\n  micro_batch_size: 2\n  progress_bar: false\n",
        model = base.display(),
        out = out.display(),
        data = data.display()
    );
    let config_path = w.join("train.yaml");
    std::fs::write(&config_path, config).unwrap();
    let o = ferrotune_one_thread(&["train", config_path.to_str().unwrap()]);
    assert!(o.status.success(), "train: {}\n{}", stdout(&o), stderr(&o));
    let saved = saved_tensors(&out);
    let layers = saved.len() / 3;
    assert!(
        layers > 0 && saved.len() == 3 * layers,
        "{:?}",
        saved.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    for (k, t) in &saved {
        assert!(k.starts_with("base_model.model.model.layers.") && k.ends_with(".ia3_l"), "{k}");
        let moved = (t - 1.0).abs().max().double_value(&[]);
        println!("trained {k} {:?}: max |ia3_l - 1| {moved:.3e}", t.size());
        assert!(moved > 1e-4, "{k} did not move from its initial ones");
    }
    for line in std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(m["grad_norm"].as_f64().is_some_and(|g| g > 0.0), "{line}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "IA3");
    assert_eq!(config["feedforward_modules"], serde_json::json!(["down_proj"]));
    // the trained directory loads and changes the model
    let mut model = load_model(&base);
    model.load_peft_adapter(&out, &plugin_registry("libferrotune_ia3.so")).unwrap();
    assert!(
        max_abs_diff(
            &logits_of(&model, &parity_ids()),
            &logits_of(&load_model(&base), &parity_ids())
        ) > 1e-4
    );
    drop(work);
}

const TRAIN: &[Variant] = &[Variant {
    name: "ia3",
    plugin: "ia3",
    peft_type: "IA3",
    config: r#"{"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}"#,
    from_init: true,
    steps: 10,
    loss_tol: 1e-5,
}];

#[test]
fn ia3_training_matches_peft() {
    one_torch_thread();
    let f = prepare("ia3-train-parity", TRAIN);
    check_variant(&f, TRAIN, "ia3");
    let _ = std::fs::remove_dir_all(&f.work);
}

/// IA³ on the tiny Qwen2-VL: peft loads our directory onto `Qwen2VLForConditionalGeneration`
/// and computes our logits for an input with one image (random pixel values, grid [1, 4, 4]:
/// four image tokens between `<|vision_start|>` and `<|vision_end|>`).
#[test]
fn ia3_on_qwen2_vl_matches_peft() {
    one_torch_thread();
    let work = TempDir::new("ia3-vl");
    let w = &work.0;
    let base = w.join("vl");
    init_tiny_vl_model(&base, 3);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    let token = |k: &str| {
        cfg[k]
            .as_i64()
            .or_else(|| cfg["text_config"][k].as_i64())
            .unwrap_or_else(|| panic!("config.json: {k}"))
    };
    let (start, image, end) =
        (token("vision_start_token_id"), token("image_token_id"), token("vision_end_token_id"));
    let ids =
        Tensor::from_slice(&[7i64, 8, start, image, image, image, image, end, 9, 10]).view([1, 10]);
    tch::manual_seed(0);
    let images = VisionInputs::images(
        Tensor::randn([16, 1176], (Kind::Float, Device::Cpu)),
        vec![[1, 4, 4]],
    );
    let registry = plugin_registry("libferrotune_ia3.so");
    let mut model = load_model(&base);
    attach_plugin(&mut model, &registry, "ia3", QKV_DOWN);
    let forward = |m: &PeftModel| {
        tch::no_grad(|| m.forward(ForwardArgs::ids(&ids).images(Some(&images)))).unwrap()
    };
    let base_logits = forward(&model);
    perturb(&mut model, 5);
    let ours = forward(&model);
    assert!(max_abs_diff(&ours, &base_logits) > 1e-2, "the adapter must matter");
    let dir = w.join("ours");
    model.save_peft_adapter(&dir).unwrap();
    let io = w.join("io.safetensors");
    Tensor::write_safetensors(
        &[
            ("ids", &ids),
            ("pixel_values", &images.pixel_values),
            ("grid", &Tensor::from_slice(&[1i64, 4, 4]).view([1, 3])),
        ],
        &io,
    )
    .unwrap();
    let plan = serde_json::json!({
        "vl": {"base": base, "dir": dir, "io": io, "out": w.join("vl.logits.safetensors")},
    });
    std::fs::write(w.join("plan.json"), serde_json::to_string_pretty(&plan).unwrap()).unwrap();
    let script = repo_root().join("tests/python/ia3_reference.py");
    let out = run_python(&[script.as_os_str(), w.as_os_str()]);
    println!("{}", stdout(&out).trim());
    check_logits(
        "peft loads our IA³ directory on Qwen2-VL: logits with an image",
        &read_logits(&w.join("vl.logits.safetensors")),
        &ours,
    );
    drop(work);
}
