//! The `vera` adapter plugin against peft 0.21's VeRA on a tiny Qwen2 model made by
//! `ferrotune init-model` (hidden 64, float32), every logits comparison to 1e-5:
//! * peft loads the PEFT directory we write (q/v/down_proj, r 8, our vectors perturbed), with
//!   the projections saved (`save_projection: true`) and without (peft then regenerates them
//!   from `projection_prng_key`: the test of our reproduction of torch's generator), and
//!   computes our logits; a fresh adapter's projections equal peft's bit for bit;
//! * we load the PEFT directory peft wrote (its `vera_lambda_b` / `vera_lambda_d` drawn at
//!   random so that they matter) and compute peft's logits and its greedy tokens, and save it
//!   back under the same keys and values; peft's adapter and ours share a batch
//!   (`mixed_batch`), each row its adapter's logits;
//! * `ferrotune merge` of our directory, loaded by transformers, gives the unmerged logits;
//! * hostile directories: a key we do not implement, and tensors whose shapes disagree with the
//!   model or the configuration, are refused by name with the model left as it was;
//! * 10 optimizer steps of `ferrotune train` from peft's initial adapter equal peft + torch
//!   AdamW's per-step losses within 1e-5 (`common/train_parity.rs`).
//!
//! Needs `cargo build --workspace` (the `vera` plugin) and the reference stack (`$PYTHON` or
//! `.venv`: torch 2.11, transformers 5, peft 0.21); one Python run
//! (`tests/python/vera_reference.py`) serves the parity test, one (`train_reference.py`) the
//! training test.
use std::path::Path;

use ferrotune::generate::{generate, SamplingParams};
use ferrotune::model::linear::LinearMode;
use ferrotune::model::ForwardArgs;
use ferrotune::peft::PeftModel;
use ferrotune_tests::adapter_parity::*;
use ferrotune_tests::train_parity::{check_variant, prepare, Variant};
use ferrotune_tests::*;
use serde_json::{json, Value};
use tch::Tensor;

/// The adapter peft writes and we write (VeraConfig / plugin `vera` keys): layers of three
/// shapes, so that the shared projections are sliced three ways.
const QVD: &str = r#"{"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}"#;
/// The same without saving the projections: loading regenerates them from the key.
const QVD_UNSAVED: &str = r#"{"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "save_projection": false, "projection_prng_key": 123}"#;
const NEW_TOKENS: usize = 8;

/// Draws every `vera_lambda_b` as 0.5·N(0, 1) and `vera_lambda_d` as 1 + 0.5·N(0, 1), as the
/// reference script does for peft's; the projections stay as they are.
fn perturb(model: &mut PeftModel, seed: i64) {
    tch::manual_seed(seed);
    let state = model
        .adapter_state_dict()
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let t = if k.ends_with(".vera_lambda_b") {
                t.randn_like() * 0.5
            } else if k.ends_with(".vera_lambda_d") {
                t.randn_like() * 0.5 + 1.0
            } else {
                t
            };
            (k, t)
        })
        .collect();
    model.load_adapter_state_dict(state).unwrap();
}

/// Copies the PEFT directory `from` to `to` with its config and tensors edited.
fn edited(
    from: &Path,
    to: &Path,
    config: impl FnOnce(&mut Value),
    tensors: impl FnOnce(&mut Vec<(String, Tensor)>),
) {
    std::fs::create_dir_all(to).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("adapter_config.json")).unwrap())
            .unwrap();
    config(&mut cfg);
    std::fs::write(to.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut t = saved_tensors(from);
    tensors(&mut t);
    Tensor::write_safetensors(&t, to.join("adapter_model.safetensors")).unwrap();
}

#[test]
fn vera_matches_peft_both_ways_merges_and_refuses_bad_directories() {
    one_torch_thread();
    let work = TempDir::new("vera-parity");
    let w = &work.0;
    let base = tiny_parity_model(w);
    let registry = plugin_registry("libferrotune_vera.so");
    let base_logits = logits_of(&load_model(&base), &parity_ids());

    // ours, written before the reference run so that peft can load them
    let mut ours_dirs = Vec::new();
    let mut ours_logits = Vec::new();
    for (i, config) in [QVD, QVD_UNSAVED].iter().enumerate() {
        let dir = w.join(format!("ours-{i}"));
        let mut ours = load_model(&base);
        attach_plugin(&mut ours, &registry, "vera", config);
        check_logits(
            "vera_lambda_b = 0 at init: the base model",
            &logits_of(&ours, &parity_ids()),
            &base_logits,
        );
        perturb(&mut ours, 7 + i as i64);
        let l = logits_of(&ours, &parity_ids());
        assert!(max_abs_diff(&l, &base_logits) > 1e-2, "our adapter must matter");
        ours.save_peft_adapter(&dir).unwrap();
        ours_dirs.push(dir);
        ours_logits.push(l);
    }
    assert!(
        tensor_names(&saved_tensors(&ours_dirs[1])).iter().all(|k| !k.contains("vera_A")),
        "save_projection false: no projections saved"
    );
    // `ferrotune merge` of ours (transformers loads the result in the reference run)
    let merged_dir = w.join("merged");
    let o = ferrotune_one_thread(&[
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        ours_dirs[0].to_str().unwrap(),
        "--out",
        merged_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "merge: {}\n{}", stdout(&o), stderr(&o));

    let peft_dir = w.join("peft");
    let plan = json!({
        "base": base,
        "ids": parity_ids_rows(),
        "peft_writes": [{"config": serde_json::from_str::<Value>(QVD).unwrap(), "seed": 11,
                         "dir": peft_dir, "out": w.join("peft.logits.safetensors"),
                         "greedy_out": w.join("peft.greedy.json"), "new_tokens": NEW_TOKENS}],
        "peft_loads": ours_dirs.iter().enumerate().map(|(i, d)| json!({
            "dir": d, "out": w.join(format!("peft-loads-ours-{i}.logits.safetensors"))
        })).collect::<Vec<_>>(),
        "merged": [{"dir": merged_dir, "out": w.join("merged.logits.safetensors")}],
    });
    std::fs::write(w.join("plan.json"), serde_json::to_string_pretty(&plan).unwrap()).unwrap();
    let script = repo_root().join("tests/python/vera_reference.py");
    let out = run_python(&[script.as_os_str(), w.as_os_str()]);
    println!("{}", stdout(&out).trim());

    // peft loads ours, with the projections saved and regenerated from the key
    check_logits(
        "peft loads our VeRA directory: logits",
        &read_logits(&w.join("peft-loads-ours-0.logits.safetensors")),
        &ours_logits[0],
    );
    check_logits(
        "peft loads ours (save_projection false): logits",
        &read_logits(&w.join("peft-loads-ours-1.logits.safetensors")),
        &ours_logits[1],
    );
    // transformers loads the merged model
    check_logits(
        "ferrotune merge, loaded by transformers: logits",
        &read_logits(&w.join("merged.logits.safetensors")),
        &ours_logits[0],
    );

    // we load peft's: the same keys as ours, the same projections, peft's logits and tokens
    let (peft_saved, ours_saved) = (saved_tensors(&peft_dir), saved_tensors(&ours_dirs[0]));
    assert_eq!(tensor_names(&peft_saved), tensor_names(&ours_saved), "peft's keys are ours");
    for key in ["base_model.vera_A", "base_model.vera_B"] {
        let find = |v: &[(String, Tensor)]| v.iter().find(|(k, _)| k == key).unwrap().1.copy();
        let (p, o) = (find(&peft_saved), find(&ours_saved));
        assert!(p.equal(&o), "{key}: ours {:?} vs peft's {:?} differ", o.size(), p.size());
        println!("{key} {:?}: bit for bit peft's (projection_prng_key 0)", p.size());
    }
    let mut model = load_model(&base);
    let report = model
        .load_peft_adapter(&peft_dir, &registry)
        .unwrap_or_else(|e| panic!("peft's VeRA directory: {e:#}"));
    println!("peft's VeRA: {}", report.summary());
    let theirs = read_logits(&w.join("peft.logits.safetensors"));
    assert!(max_abs_diff(&theirs, &base_logits) > 1e-2, "peft's adapter must matter");
    check_logits(
        "we load peft's VeRA directory: logits",
        &logits_of(&model, &parity_ids()),
        &theirs,
    );
    let greedy: Vec<Vec<i64>> =
        serde_json::from_str(&std::fs::read_to_string(w.join("peft.greedy.json")).unwrap())
            .unwrap();
    let ours_greedy =
        generate(&model, &parity_ids_rows(), &SamplingParams::greedy(NEW_TOKENS)).unwrap();
    println!("greedy tokens: ours {ours_greedy:?}, peft's {greedy:?}");
    assert_eq!(ours_greedy, greedy, "greedy tokens");
    // mixed_batch: peft's adapter and ours (and the base) in one batch, each row its own output
    model.load_peft_adapter_as(&ours_dirs[0], &registry, "ours").unwrap();
    assert!(model.adapter_mixes("default") && model.adapter_mixes("ours"));
    let rows = [Some("ours"), Some("default"), None];
    let batch = Tensor::cat(&[parity_ids(), parity_ids().narrow(0, 0, 1)], 0);
    let mixed = tch::no_grad(|| {
        model.forward(
            ForwardArgs::ids(&batch).mode(LinearMode { rows: Some(&rows), ..LinearMode::BASE }),
        )
    })
    .unwrap();
    check_logits("mixed batch, row 0: our adapter", &mixed.get(0), &ours_logits[0].get(0));
    check_logits("mixed batch, row 1: peft's adapter", &mixed.get(1), &theirs.get(1));
    check_logits("mixed batch, row 2: the base model", &mixed.get(2), &base_logits.get(0));
    model.set_active_adapter(Some("default")).unwrap();
    model.remove_adapter("ours").unwrap();
    let resaved = w.join("peft-resaved");
    model.save_peft_adapter(&resaved).unwrap();
    let again = saved_tensors(&resaved);
    assert_eq!(tensor_names(&again), tensor_names(&peft_saved));
    assert!(again.iter().zip(&peft_saved).all(|(x, y)| x.1.equal(&y.1)), "values saved back");

    // hostile directories, each refused by name before anything is attached
    let mut plain = load_model(&base);
    let refused = |dir: &Path, plain: &mut PeftModel| -> String {
        let e = format!("{:#}", plain.load_peft_adapter(dir, &registry).unwrap_err());
        check_logits(
            "a refused directory leaves the model as it was",
            &logits_of(plain, &parity_ids()),
            &base_logits,
        );
        e
    };
    let d = w.join("bad-key");
    edited(&peft_dir, &d, |c| c["layers_to_transform"] = json!([0]), |_| {});
    let e = refused(&d, &mut plain);
    assert!(e.contains("`layers_to_transform` = [0]") && e.contains("`vera`"), "{e}");
    let d = w.join("bad-bias");
    edited(&peft_dir, &d, |c| c["bias"] = json!("all"), |_| {});
    let e = refused(&d, &mut plain);
    assert!(e.contains("`bias`") && e.contains("all"), "{e}");
    let d = w.join("bad-projection");
    edited(
        &peft_dir,
        &d,
        |_| {},
        |t| {
            let a = t.iter_mut().find(|(k, _)| k == "base_model.vera_A").unwrap();
            a.1 = a.1.narrow(1, 0, 64).contiguous();
        },
    );
    let e = refused(&d, &mut plain);
    assert!(e.contains("`base_model.vera_A` is [8, 64]") && e.contains("`r` = 8"), "{e}");
    let d = w.join("bad-rank");
    edited(&peft_dir, &d, |c| c["r"] = json!(4), |_| {});
    let e = refused(&d, &mut plain);
    assert!(e.contains("vera_lambda_d` is [8]") && e.contains("`r` = 4"), "{e}");
    let d = w.join("bad-projection-missing");
    edited(&peft_dir, &d, |_| {}, |t| t.retain(|(k, _)| !k.ends_with("vera_B")));
    let e = refused(&d, &mut plain);
    assert!(e.contains("missing key(s): `base_model.vera_B`"), "{e}");
    drop(work);
}

const TRAIN: &[Variant] = &[Variant {
    name: "vera",
    plugin: "vera",
    peft_type: "VERA",
    config: r#"{"r": 16, "target_modules": "all-linear", "vera_dropout": 0.0}"#,
    from_init: true,
    steps: 10,
    loss_tol: 1e-5,
}];

#[test]
fn vera_training_matches_peft() {
    one_torch_thread();
    let f = prepare("vera-train-parity", TRAIN);
    check_variant(&f, TRAIN, "vera");
    let _ = std::fs::remove_dir_all(&f.work);
}
