//! Activation checkpointing (`training.gradient_checkpointing`): the same loss and the same
//! LoRA gradients as without it (within 1e-6) on the tiny model, with adapter dropout on (the
//! recomputation replays the dropout masks) and a padded batch; and `ferrotune bench train`
//! prints the peak memory of a long-sequence step with and without it (lower with it).
//!
//! Needs `cargo build --workspace` (the CLI and the `lora` plugin); no Python.
use ferrotune::model::CausalLM;
use ferrotune::model::ForwardArgs;
use ferrotune::peft::PeftModel;
use ferrotune_plugin_api::ForwardFlags;
use ferrotune_tests::*;
use tch::{Device, Kind, Tensor};

const WORDS: usize = 40;

fn loss_and_grads(model: &PeftModel, ids: &Tensor, mask: &Tensor) -> (f64, Vec<(String, Tensor)>) {
    tch::manual_seed(5);
    let logits = model
        .forward(ForwardArgs::ids(ids).mask(Some(mask)).mode(model.mode(ForwardFlags::NONE, true)))
        .unwrap();
    let v = logits.size()[2];
    let loss = logits
        .narrow(1, 0, ids.size()[1] - 1)
        .reshape([-1, v])
        .cross_entropy_for_logits(&ids.narrow(1, 1, ids.size()[1] - 1).reshape([-1]));
    loss.backward();
    let grads = model
        .trainable_parameters()
        .unwrap()
        .into_iter()
        .map(|p| {
            let g = p.tensor.grad();
            let out = g.copy();
            let _ = g.shallow_clone().zero_();
            (p.name, out)
        })
        .collect();
    (loss.double_value(&[]), grads)
}

#[test]
fn same_loss_and_gradients_with_checkpointing() {
    let work = temp_dir("grad-ckpt");
    write_chat_tokenizer(&work.join("tokenizer"), WORDS);
    let dir = work.join("model");
    init_tiny_model(&work.join("tokenizer"), &dir, 3);
    let mut model = CausalLM::load(&dir, Device::Cpu, Kind::Float).map(PeftModel::new).unwrap();
    let registry = registry();
    let method = registry
        .adapter(
            "lora",
            r#"{"r": 4, "lora_alpha": 8, "lora_dropout": 0.2, "target_modules": "all-linear"}"#,
        )
        .unwrap();
    model.attach_adapter("default", Box::new(method)).unwrap();
    tch::manual_seed(1);
    for p in model.trainable_parameters().unwrap() {
        tch::no_grad(|| {
            p.tensor
                .shallow_clone()
                .copy_(&(Tensor::randn(p.tensor.size(), (Kind::Float, Device::Cpu)) * 0.1))
        });
    }
    let vocab = model.config().vocab_size;
    let ids = Tensor::randint(vocab, [2, 24], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([2, 24], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(1, 0, 5).get(1).fill_(0);

    let (plain_loss, plain) = loss_and_grads(&model, &ids, &mask);
    model.set_gradient_checkpointing(true);
    let (ckpt_loss, ckpt) = loss_and_grads(&model, &ids, &mask);
    let mut worst = 0f64;
    let mut nonzero = 0;
    for ((n1, g1), (n2, g2)) in plain.iter().zip(&ckpt) {
        assert_eq!(n1, n2);
        assert!(g1.defined() && g2.defined(), "{n1}: no gradient");
        worst = worst.max(f64::try_from((g1 - g2).abs().max()).unwrap());
        if f64::try_from(g1.abs().max()).unwrap() > 0.0 {
            nonzero += 1;
        }
    }
    println!(
        "loss {plain_loss} vs {ckpt_loss}; max |grad diff| {worst:.2e} over {} parameters",
        plain.len()
    );
    assert!((plain_loss - ckpt_loss).abs() <= 1e-6, "{plain_loss} vs {ckpt_loss}");
    assert!(worst <= 1e-6, "{worst}");
    assert_eq!(nonzero, plain.len(), "every LoRA parameter gets a gradient");
    // Under no_grad (eval, generation) checkpointing is bypassed and the logits agree.
    let eval = |m: &PeftModel| {
        tch::no_grad(|| {
            m.forward(
                ForwardArgs::ids(&ids).mask(Some(&mask)).mode(m.mode(ForwardFlags::NONE, false)),
            )
            .unwrap()
        })
    };
    let a = eval(&model);
    model.set_gradient_checkpointing(false);
    assert!(f64::try_from((a - eval(&model)).abs().max()).unwrap() == 0.0);
}

#[test]
fn checkpointing_lowers_peak_memory_of_a_long_step() {
    let work = temp_dir("grad-ckpt-bench");
    write_chat_tokenizer(&work.join("tokenizer"), WORDS);
    let dir = work.join("model");
    init_tiny_model(&work.join("tokenizer"), &dir, 3);
    let run = |ckpt: bool| -> f64 {
        let mut args = vec![
            "bench",
            "train",
            "--model",
            dir.to_str().unwrap(),
            "--batch",
            "2",
            "--seq-len",
            "4096",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--rank",
            "4",
            "--threads",
            "1",
        ];
        if ckpt {
            args.push("--gradient-checkpointing");
        }
        let o = ferrotune(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value =
            serde_json::from_str(stdout(&o).lines().last().unwrap()).unwrap();
        v["peak_rss_mb"].as_f64().unwrap() - v["base_rss_mb"].as_f64().unwrap()
    };
    let (without, with) = (run(false), run(true));
    println!("long-sequence step (batch 2 × 4096 tokens): peak RSS above the loaded model {without:.1} MiB without, {with:.1} MiB with activation checkpointing");
    assert!(with < 0.8 * without, "{with} vs {without}");
}
