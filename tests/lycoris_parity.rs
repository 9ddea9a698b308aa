//! The `loha` and `lokr` adapter plugins (plugins/lycoris) against peft 0.21's LoHa and LoKr
//! on a tiny Qwen2 model made by `ferrotune init-model` (hidden 64, float32), every logits
//! comparison to 1e-5. Three variants, all linear layers adapted: LoHa (r 4; v_proj r 2 and
//! o_proj alpha 4 through `rank_pattern` / `alpha_pattern`), LoKr (r 2, down_proj r 4: the
//! right factor `W2` as `lokr_w2_a · lokr_w2_b`) and LoKr with `decompose_both` and
//! `decompose_factor` 16 (the left factor decomposed, the right one whole where `r` is not
//! below half its side). For each:
//! * peft loads the PEFT directory we write (our factors perturbed) and computes our logits;
//! * we load the directory peft wrote (every factor drawn as 0.4·N(0, 1)), compute peft's
//!   logits, save it back under the same keys, and `ferrotune generate --adapter` gives peft's
//!   greedy tokens;
//! * transformers loads the directory `ferrotune merge` writes and computes the unmerged logits;
//! * peft's three adapters and the base model share one batch (`mixed_batch`), each row
//!   equal to its adapter alone, and unloading one leaves the others as they were;
//! * a key the plugin does not implement is refused by name, and so is a tensor of the wrong
//!   shape (and, for LoKr, a `decompose_factor` that disagrees with the tensors);
//! * 10 steps of `ferrotune train` from peft's initial adapter give peft + torch AdamW's
//!   per-step losses within 1e-5 (the shared harness, `common/train_parity.rs`).
//!
//! Needs `cargo build --workspace` (the `lycoris` plugin library) and the reference stack
//! (`$PYTHON` or `.venv`: torch 2.11, transformers 5, peft 0.21); one Python run
//! (`tests/python/lycoris_reference.py`) serves the parity test, one (`train_reference.py`)
//! the training test.
use std::path::{Path, PathBuf};

use ferrotune::model::linear::LinearMode;
use ferrotune::model::ForwardArgs;

use ferrotune_tests::adapter_parity::*;
use ferrotune_tests::train_parity::{check_variant, prepare, Variant};
use ferrotune_tests::*;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

/// (name, plugin, peft_type, config shared by the plugin and peft's config class).
const VARIANTS: [(&str, &str, &str, &str); 3] = [
    (
        "loha",
        "loha",
        "LOHA",
        r#"{"r": 4, "alpha": 8, "target_modules": "all-linear", "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 4}}"#,
    ),
    (
        "lokr",
        "lokr",
        "LOKR",
        r#"{"r": 2, "alpha": 4, "target_modules": "all-linear", "rank_pattern": {"down_proj": 4}}"#,
    ),
    (
        "lokr_both",
        "lokr",
        "LOKR",
        r#"{"r": 2, "alpha": 4, "decompose_both": true, "decompose_factor": 16, "target_modules": "all-linear"}"#,
    ),
];

/// (tensor under `model.layers.0.`, shape) pairs one variant must hold.
type Expected = &'static [(&'static str, [i64; 2])];

/// The tensors each variant must hold in layer 0 (q_proj [64, 64], k_proj [32, 64],
/// gate_proj [176, 64]), as peft 0.21.2 lays them out.
const LAYER0: [(&str, Expected); 3] = [
    (
        "loha",
        &[
            ("self_attn.q_proj.hada_w1_a", [64, 4]),
            ("self_attn.q_proj.hada_w2_b", [4, 64]),
            ("self_attn.v_proj.hada_w1_a", [32, 2]),
        ],
    ),
    (
        "lokr",
        &[
            ("self_attn.q_proj.lokr_w1", [8, 8]),
            ("self_attn.q_proj.lokr_w2_a", [8, 2]),
            ("self_attn.k_proj.lokr_w1", [4, 8]),
            ("mlp.gate_proj.lokr_w2_b", [2, 8]),
            ("mlp.down_proj.lokr_w2_a", [8, 4]),
        ],
    ),
    (
        "lokr_both",
        &[
            ("self_attn.q_proj.lokr_w1_a", [16, 2]),
            ("self_attn.q_proj.lokr_w2", [4, 4]),
            ("self_attn.k_proj.lokr_w2", [2, 4]),
            ("mlp.gate_proj.lokr_w2_a", [11, 2]),
        ],
    ),
];

const PROMPT: &str = "w1 w2 w3 w4 w5";
const NEW_TOKENS: usize = 8;

/// A copy of PEFT directory `from` at `to` with `edit` applied to its config and `tensors`
/// (when given) as its weights.
fn edited_copy(
    from: &Path,
    to: &Path,
    edit: impl FnOnce(&mut Value),
    tensors: Option<&[(String, Tensor)]>,
) {
    std::fs::create_dir_all(to).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("adapter_config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(to.join("adapter_config.json"), cfg.to_string()).unwrap();
    match tensors {
        Some(t) => Tensor::write_safetensors(t, to.join("adapter_model.safetensors")).unwrap(),
        None => {
            std::fs::copy(
                from.join("adapter_model.safetensors"),
                to.join("adapter_model.safetensors"),
            )
            .unwrap();
        }
    }
}

#[test]
fn loha_and_lokr_match_peft_both_ways_and_merge() {
    one_torch_thread();
    let work = TempDir::new("lycoris-parity");
    let w = &work.0;
    let base = tiny_parity_model(w);
    let registry = plugin_registry("libferrotune_lycoris.so");
    let base_logits = logits_of(&load_model(&base), &parity_ids());

    // ours: written (and merged) before the reference run so that peft and transformers can
    // load them
    let mut ours_logits = Vec::new();
    for (i, (name, plugin, _, config)) in VARIANTS.iter().enumerate() {
        let mut model = load_model(&base);
        let method = registry.adapter(plugin, config).unwrap_or_else(|e| panic!("{name}: {e}"));
        let report = model.attach_adapter("default", Box::new(method)).unwrap();
        println!("{name}: {}", report.summary());
        check_logits(
            &format!("{name} at init: the base model"),
            &logits_of(&model, &parity_ids()),
            &base_logits,
        );
        perturb_adapter(&mut model, 7 + i as i64, 0.2);
        let l = logits_of(&model, &parity_ids());
        assert!(max_abs_diff(&l, &base_logits) > 1e-2, "{name}: our adapter must matter");
        let dir = w.join(format!("ours-{name}"));
        model.save_peft_adapter(&dir).unwrap();
        let merged = w.join(format!("merged-{name}"));
        let o = ferrotune(&[
            "merge",
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            dir.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "merge {name}: {}", stderr(&o));
        ours_logits.push(l);
    }

    let entry = |kind: &str, name: &str, dir: PathBuf| json!({"name": name, "dir": dir, "out": w.join(format!("{kind}-{name}.logits.safetensors"))});
    let plan = json!({
        "base": base,
        "tokenizer": w.join("tokenizer"),
        "ids": parity_ids_rows(),
        "peft_writes": VARIANTS.iter().enumerate().map(|(i, (name, _, peft_type, config))| {
            let mut e = entry("peft-writes", name, w.join(format!("peft-{name}")));
            e["peft_type"] = json!(peft_type);
            e["config"] = serde_json::from_str(config).unwrap();
            e["seed"] = json!(11 + i);
            e["generate"] = json!({"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "out": w.join(format!("generate-{name}.json"))});
            e
        }).collect::<Vec<_>>(),
        "peft_loads": VARIANTS.iter().map(|v| entry("peft-loads", v.0, w.join(format!("ours-{}", v.0)))).collect::<Vec<_>>(),
        "transformers_loads": VARIANTS.iter().map(|v| entry("transformers-loads", v.0, w.join(format!("merged-{}", v.0)))).collect::<Vec<_>>(),
    });
    std::fs::write(w.join("plan.json"), serde_json::to_string_pretty(&plan).unwrap()).unwrap();
    let script = repo_root().join("tests/python/lycoris_reference.py");
    let out = run_python(&[script.as_os_str(), w.as_os_str()]);
    println!("{}", stdout(&out).trim());

    for (i, (name, _, _, _)) in VARIANTS.iter().enumerate() {
        // peft loads ours; transformers loads our merge
        check_logits(
            &format!("{name}: peft loads our directory: logits"),
            &read_logits(&w.join(format!("peft-loads-{name}.logits.safetensors"))),
            &ours_logits[i],
        );
        check_logits(
            &format!("{name}: transformers on our merged directory"),
            &read_logits(&w.join(format!("transformers-loads-{name}.logits.safetensors"))),
            &ours_logits[i],
        );

        // we load peft's: peft's logits, peft's keys and shapes, saved back unchanged
        let peft_dir = w.join(format!("peft-{name}"));
        let mut model = load_model(&base);
        let report = model
            .load_peft_adapter(&peft_dir, &registry)
            .unwrap_or_else(|e| panic!("{name}: peft's directory: {e:#}"));
        println!("{name}: peft's directory: {}", report.summary());
        let theirs = read_logits(&w.join(format!("peft-writes-{name}.logits.safetensors")));
        assert!(max_abs_diff(&theirs, &base_logits) > 1e-2, "{name}: peft's adapter must matter");
        check_logits(
            &format!("{name}: we load peft's directory: logits"),
            &logits_of(&model, &parity_ids()),
            &theirs,
        );
        let peft_saved = saved_tensors(&peft_dir);
        assert_eq!(
            tensor_names(&peft_saved),
            tensor_names(&saved_tensors(&w.join(format!("ours-{name}"))))
        );
        let layer0 = LAYER0.iter().find(|l| l.0 == *name).unwrap().1;
        for (key, shape) in layer0 {
            let key = format!("base_model.model.model.layers.0.{key}");
            let t = peft_saved.iter().find(|(k, _)| *k == key);
            assert_eq!(t.map(|t| t.1.size()), Some(shape.to_vec()), "{name}: `{key}`");
        }
        let resaved = w.join(format!("peft-resaved-{name}"));
        model.save_peft_adapter(&resaved).unwrap();
        let again = saved_tensors(&resaved);
        assert_eq!(tensor_names(&again), tensor_names(&peft_saved));
        assert!(again.iter().zip(&peft_saved).all(|(x, y)| x.1.equal(&y.1)), "values saved back");

        // greedy generation with peft's directory: peft's tokens
        let o = ferrotune(&[
            "generate",
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            peft_dir.to_str().unwrap(),
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            &NEW_TOKENS.to_string(),
            "--greedy",
            "--json",
        ]);
        assert!(o.status.success(), "{name}: generate: {}", stderr(&o));
        let ours: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        let theirs: Value = serde_json::from_str(
            &std::fs::read_to_string(w.join(format!("generate-{name}.json"))).unwrap(),
        )
        .unwrap();
        println!(
            "{name}: generate --adapter: ours {} peft {} (base {})",
            ours["token_ids"], theirs["token_ids"], theirs["base_token_ids"]
        );
        assert_eq!(ours["token_ids"], theirs["token_ids"], "{name}: greedy tokens");
        assert_eq!(
            ours["token_ids"].as_array().map(Vec::len),
            Some(NEW_TOKENS),
            "{name}: no early stop"
        );
        assert_ne!(
            theirs["token_ids"], theirs["base_token_ids"],
            "{name}: the adapter must change the tokens"
        );

        // hostile directories: refused by name, the model untouched
        let mut plain = load_model(&base);
        let bad = w.join(format!("bad-key-{name}"));
        edited_copy(&peft_dir, &bad, |c| c["exclude_modules"] = json!(["k_proj"]), None);
        let e = format!("{:#}", plain.load_peft_adapter(&bad, &registry).unwrap_err());
        assert!(e.contains("`exclude_modules`") && e.contains("not supported"), "{name}: {e}");
        let mut tensors =
            peft_saved.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect::<Vec<_>>();
        let (key, t) = &mut tensors[0];
        *t = Tensor::zeros([t.size()[0] + 1, t.size()[1]], (Kind::Float, Device::Cpu));
        let key = key.clone();
        let bad = w.join(format!("bad-shape-{name}"));
        edited_copy(&peft_dir, &bad, |_| {}, Some(&tensors));
        let e = format!("{:#}", plain.load_peft_adapter(&bad, &registry).unwrap_err());
        assert!(e.contains(&key) && e.contains("adapter_model.safetensors"), "{name}: {e}");
        println!("{name}: a mis-shaped tensor is refused: {e}");
        if name.starts_with("lokr") {
            let bad = w.join(format!("bad-factor-{name}"));
            edited_copy(&peft_dir, &bad, |c| c["decompose_factor"] = json!(4), None);
            let e = format!("{:#}", plain.load_peft_adapter(&bad, &registry).unwrap_err());
            assert!(e.contains("`decompose_factor` = 4"), "{name}: {e}");
        }
        check_logits(
            &format!("{name}: refused directories leave the model"),
            &logits_of(&plain, &parity_ids()),
            &base_logits,
        );
    }

    // mixed_batch: peft's three adapters and the base in one batch, each row its own output;
    // then one adapter unloaded, the others unchanged
    let mut model = load_model(&base);
    for (name, _, _, _) in VARIANTS {
        model.load_peft_adapter_as(&w.join(format!("peft-{name}")), &registry, name).unwrap();
        assert!(model.adapter_mixes(name), "{name} declares mixed_batch");
    }
    let theirs =
        |name: &str| read_logits(&w.join(format!("peft-writes-{name}.logits.safetensors")));
    let rows = [Some("loha"), Some("lokr"), Some("lokr_both"), None];
    let batch = Tensor::cat(&[parity_ids(), parity_ids()], 0);
    let mixed = tch::no_grad(|| {
        model.forward(
            ForwardArgs::ids(&batch).mode(LinearMode { rows: Some(&rows), ..LinearMode::BASE }),
        )
    })
    .unwrap();
    for (i, row) in rows.iter().enumerate() {
        let want = row.map_or_else(|| base_logits.get(1), |n| theirs(n).get(i as i64 % 2));
        check_logits(
            &format!("mixed batch, row {i}: {}", row.unwrap_or("the base model")),
            &mixed.get(i as i64),
            &want,
        );
    }
    model.remove_adapter("lokr").unwrap();
    model.set_active_adapter(Some("lokr_both")).unwrap();
    check_logits(
        "lokr unloaded: lokr_both alone",
        &logits_of(&model, &parity_ids()),
        &theirs("lokr_both"),
    );
    drop(work);
}

const fn lycoris(
    name: &'static str,
    plugin: &'static str,
    peft_type: &'static str,
    config: &'static str,
) -> Variant {
    Variant { name, plugin, peft_type, config, from_init: true, steps: 10, loss_tol: 1e-5 }
}

const TRAIN_VARIANTS: &[Variant] = &[
    lycoris(
        "loha",
        "loha",
        "LOHA",
        r#"{"r": 4, "alpha": 8, "rank_dropout": 0.0, "module_dropout": 0.0, "target_modules": "all-linear", "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 4}}"#,
    ),
    lycoris("lokr", "lokr", "LOKR", r#"{"r": 2, "alpha": 4, "target_modules": "all-linear"}"#),
    lycoris(
        "lokr_both",
        "lokr",
        "LOKR",
        r#"{"r": 2, "alpha": 4, "decompose_both": true, "decompose_factor": 16, "target_modules": "all-linear"}"#,
    ),
];

#[test]
fn training_matches_peft_and_torch_adamw() {
    let f = prepare("lycoris-train", TRAIN_VARIANTS);
    let _cleanup = TempDir(f.work.clone());
    for v in TRAIN_VARIANTS {
        check_variant(&f, TRAIN_VARIANTS, v.name);
    }
}
