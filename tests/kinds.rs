//! Every plugin kind across the real boundary, against a computation done in the host,
//! plus configuration errors and panics contained as error values.
use ferrotune::dist::collectives::SingleProcess;
use ferrotune_plugin_api::kinds::objective::{ObjectiveContext, RewardScores};
use ferrotune_plugin_api::{
    Batch, DataSource, DatasetFormat, ErrorCode, ForwardFlags, ImageSource, MemoryStrategy,
    Objective, PluginResult, Quantizer, Reward, RewardInput, TrainParam,
};
use ferrotune_tests::*;
use tch::{Device, Kind, Tensor};

#[test]
fn quantizer_stores_bf16_and_applies_it() {
    let q = registry().quantizer("testkit-bf16", "{}").unwrap();
    let w = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
    let qw = q.quantize("mlp.up_proj", &w).unwrap();
    assert_eq!(qw.shape().unwrap(), vec![8, 4]);
    assert_eq!(qw.storage_bytes().unwrap(), 8 * 4 * 2);
    let expected = w.to_kind(Kind::BFloat16).to_kind(Kind::Float);
    assert_eq!(
        (qw.dequantize(Kind::Float).unwrap() - &expected).abs().max().double_value(&[]),
        0.0
    );
    let x = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
    let y = qw.linear(&x).unwrap();
    assert!((y - x.matmul(&expected.tr())).abs().max().double_value(&[]) < 1e-6);
}

/// A tiny host "model": logits = onehot(ids) · E, with E trainable in the host.
struct TinyLm {
    emb: Tensor,
}

impl ObjectiveContext for TinyLm {
    fn forward(
        &self,
        inputs: &[(String, Tensor)],
        flags: ForwardFlags,
    ) -> PluginResult<Vec<(String, Tensor)>> {
        assert_eq!(flags, ForwardFlags::NONE);
        let ids = &inputs.iter().find(|(n, _)| n == "input_ids").unwrap().1;
        Ok(vec![(
            "logits".into(),
            self.emb.f_index_select(0, &ids.flatten(0, -1))?.view([
                ids.size()[0],
                ids.size()[1],
                -1,
            ]),
        )])
    }
    fn generate(&self, _prompts: &[Vec<i64>], _options_json: &str) -> PluginResult<Vec<Vec<i64>>> {
        unreachable!("the masked CE objective does not generate")
    }
    fn decode(&self, _ids: &[i64]) -> PluginResult<String> {
        unreachable!()
    }
    fn rewards(&self, _inputs: &[RewardInput]) -> PluginResult<Vec<RewardScores>> {
        unreachable!()
    }
}

#[test]
fn objective_calls_back_into_host_model_and_loss_matches() {
    let mut obj = registry().objective("testkit-masked-ce", "{}").unwrap();
    tch::manual_seed(3);
    let lm =
        TinyLm { emb: Tensor::randn([11, 11], (Kind::Float, Device::Cpu)).set_requires_grad(true) };
    let ids = Tensor::from_slice(&[1i64, 4, 2, 7, 3, 9, 9, 0]).view([2, 4]);
    let labels = Tensor::from_slice(&[-100i64, 4, 2, 7, -100, -100, 9, 0]).view([2, 4]);
    let batch = Batch {
        tensors: vec![
            ("input_ids".into(), ids.shallow_clone()),
            ("labels".into(), labels.shallow_clone()),
        ],
        meta_json: "{}".into(),
    };
    let out = obj.loss(&batch, &lm).unwrap();
    assert_eq!(out.num_items, 5);
    // Host computation of the same loss.
    let logits = lm.emb.index_select(0, &ids.flatten(0, -1)).view([2, 4, 11]);
    let lp = logits.narrow(1, 0, 3).log_softmax(-1, Kind::Float);
    let tgt = labels.narrow(1, 1, 3);
    let mut total = 0.0;
    for b in 0..2 {
        for t in 0..3 {
            let y = tgt.int64_value(&[b, t]);
            if y != -100 {
                total -= lp.double_value(&[b, t, y]);
            }
        }
    }
    let expected = total / 5.0;
    let got = out.loss.double_value(&[]);
    assert!((got - expected).abs() < 1e-6, "plugin loss {got}, host {expected}");
    out.loss.backward();
    assert!(
        lm.emb.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0,
        "gradient reached the host's weights"
    );
    let missing = Batch { tensors: vec![("input_ids".into(), ids)], meta_json: String::new() };
    let e = obj.loss(&missing, &lm).unwrap_err();
    assert!(e.message().contains("`labels`") && e.message().contains("input_ids"), "{e}");
}

#[test]
fn reward_scores_and_config_errors_name_the_key() {
    let reg = registry();
    let r = reg.reward("testkit-length", r#"{"per_char": 0.5}"#).unwrap();
    let inputs = vec![
        RewardInput { prompt: "p".into(), completion: "abcd".into(), sample_json: "{}".into() },
        RewardInput { prompt: "p".into(), completion: "héé".into(), sample_json: "{}".into() },
    ];
    assert_eq!(r.score(&inputs).unwrap(), vec![2.0, 1.5]);
    let e = reg.reward("testkit-length", r#"{"per_char": "x"}"#).err().unwrap().to_string();
    assert!(e.contains("`per_char`") && e.contains("testkit-length"), "{e}");
    let e = reg.reward("testkit-length", r#"{"per_chr": 1}"#).err().unwrap().to_string();
    assert!(e.contains("unknown field `per_chr`"), "{e}");
    let e = reg.adapter("testkit-lowrank", r#"{"rank": 0}"#).err().unwrap().to_string();
    assert!(e.contains("`rank`") && e.contains("at least 1"), "{e}");
    let e = reg.reward("no-such-reward", "{}").err().unwrap().to_string();
    assert!(
        e.contains("no reward plugin named `no-such-reward`") && e.contains("testkit-length"),
        "{e}"
    );
}

#[test]
fn panics_and_bad_answers_become_errors_and_the_process_goes_on() {
    let reg = registry();
    let inputs =
        vec![RewardInput { prompt: "p".into(), completion: "c".into(), sample_json: "{}".into() }];
    let bad = reg.reward("testkit-misbehaving", "{}").unwrap();
    let e = bad.score(&inputs).unwrap_err();
    assert_eq!(e.code, ErrorCode::PANIC);
    assert!(e.message().contains("index out of bounds"), "{e}");
    // Same object again, and a healthy plugin after it.
    assert_eq!(bad.score(&inputs).unwrap_err().code, ErrorCode::PANIC);
    let good = reg.reward("testkit-length", "{}").unwrap();
    assert_eq!(good.score(&inputs).unwrap(), vec![1.0]);
    let e = reg
        .reward("testkit-misbehaving", r#"{"panic_in_config": true}"#)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("panicked") && e.contains("its config"), "{e}");
    let e = reg
        .reward("testkit-misbehaving", r#"{"mode": "wrong_count"}"#)
        .unwrap()
        .score(&inputs)
        .unwrap_err();
    assert!(e.message().contains("2 scores for 1 completions"), "{e}");
    let e = reg
        .reward("testkit-misbehaving", r#"{"mode": "nan"}"#)
        .unwrap()
        .score(&inputs)
        .unwrap_err();
    assert!(e.message().contains("non-finite"), "{e}");
}

#[test]
fn dataset_reads_samples_and_names_bad_lines() {
    let dir = temp_dir("jsonl");
    let path = dir.join("data.jsonl");
    std::fs::write(
        &path,
        "{\"messages\":[{\"role\":\"user\",\"content\":\"<image>What is here?\"},{\"role\":\"assistant\",\"content\":\"A cat.\"}],\"images\":[{\"path\":\"cat.png\"}]}\n\n{\"messages\":[]}\n",
    )
    .unwrap();
    let fmt = registry().dataset("testkit-jsonl", "{}").unwrap();
    let src = DataSource { path: path.display().to_string(), split: "train".into() };
    let reader = fmt.open(&src).unwrap();
    assert_eq!(reader.len().unwrap(), 2);
    let s = reader.get(0).unwrap();
    assert_eq!(s.messages[1].content, "A cat.");
    assert_eq!(s.images, vec![ImageSource::Path("cat.png".into())]);
    assert!(reader.get(5).unwrap_err().message().contains("out of range"));
    std::fs::write(&path, "{\"messages\":[]}\n{not json}\n").unwrap();
    let e = fmt.open(&src).err().unwrap();
    assert!(e.message().contains("data.jsonl:2"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn memory_plugin_steps_host_parameters() {
    let mut mem = registry().memory("testkit-sgd", "{}").unwrap();
    let p = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
    let q = Tensor::from_slice(&[0.5f32]).set_requires_grad(true);
    let mut tq = TrainParam::new("q", q.shallow_clone());
    tq.lr_scale = 2.0;
    mem.setup(
        vec![TrainParam::new("p", p.shallow_clone()), tq],
        r#"{"max_grad_norm": 1.0}"#,
        Device::Cpu,
        &SingleProcess,
    )
    .unwrap();
    ((&p * &p).sum(Kind::Float) + &q * 4.0).sum(Kind::Float).backward();
    // grads: p -> 2p = [2,-4,6], q -> 4; norm = sqrt(4+16+36+16) = sqrt(72)
    let report = mem.step(0.1, &SingleProcess).unwrap();
    let norm = 72f64.sqrt();
    assert!((report.grad_norm - norm).abs() < 1e-9);
    let coef = 1.0 / (norm + 1e-6);
    let expect_p: Vec<f64> =
        [1.0, -2.0, 3.0].iter().map(|v: &f64| v - 0.1 * coef * 2.0 * v).collect();
    let got_p: Vec<f64> = Vec::<f32>::try_from(&p).unwrap().into_iter().map(f64::from).collect();
    for (g, e) in got_p.iter().zip(&expect_p) {
        assert!((g - e).abs() < 1e-6, "{got_p:?} vs {expect_p:?}");
    }
    let got_q = q.double_value(&[0]);
    assert!((got_q - (0.5 - 0.2 * coef * 4.0)).abs() < 1e-6);
    assert!(!p.grad().defined(), "step drops the gradients (grad = None)");
    let e = mem
        .load_state_dict(vec![("momentum".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu)))])
        .unwrap_err();
    assert!(e.message().contains("momentum"));
}
