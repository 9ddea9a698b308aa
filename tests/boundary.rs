//! Autograd across the boundary, with the built test-kit library really loaded.
use ferrotune::model::linear::FrozenLinear;
use ferrotune::selfcheck;
use ferrotune_plugin_api::AdapterMethod;
use ferrotune_tests::*;
use tch::{Device, Kind, Tensor};

#[test]
fn plugin_gradients_equal_host_gradients_and_host_step_is_seen() {
    let report = selfcheck::run(&registry(), Device::Cpu).unwrap();
    for l in report.lines() {
        println!("{l}");
    }
    assert_eq!(report.output_diff, 0.0);
    assert_eq!(report.grad_a_diff, 0.0);
    assert_eq!(report.grad_b_diff, 0.0);
    assert_eq!(report.step_diff, 0.0);
    assert_eq!(report.output_after_step_diff, 0.0);
    assert!(report.step_size > 1e-4, "the step must move the parameters");
    assert!(report.passed());
}

/// Gradient flows into the host's own tensors too: an input that requires grad gets the
/// gradient of the plugin's computation, equal to the closed form.
#[test]
fn gradient_reaches_host_inputs_through_plugin() {
    let reg = registry();
    let method = reg.adapter("testkit-lowrank", r#"{"rank": 2}"#).unwrap();
    let w = Tensor::eye(4, (Kind::Float, Device::Cpu));
    let base = FrozenLinear::new("q_proj", w, None);
    let layer = method.adapt_linear("q_proj", &base).unwrap();
    let x = Tensor::ones([1, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let y = layer.forward(&x, &base, true).unwrap();
    y.sum(Kind::Float).backward();
    // d/dx sum(x I + x Aᵀ Bᵀ) = 1ᵀ (I + B A) summed over outputs = 1 + colsum(B A).
    let (a, b) = {
        let sd = layer.state_dict().unwrap();
        (sd[0].1.shallow_clone(), sd[1].1.shallow_clone())
    };
    let expected = Tensor::ones([1, 4], (Kind::Float, Device::Cpu))
        + b.matmul(&a).sum_dim_intlist(0, true, Kind::Float);
    let diff = (x.grad() - expected).abs().max().double_value(&[]);
    assert!(diff < 1e-6, "input gradient differs by {diff}");
}

#[test]
fn merge_and_unmerge_round_trip_through_plugin() {
    let reg = registry();
    let method = reg.adapter("testkit-lowrank", r#"{"rank": 3, "alpha": 6}"#).unwrap();
    tch::manual_seed(7);
    let base = FrozenLinear::new("v_proj", Tensor::randn([6, 5], (Kind::Float, Device::Cpu)), None);
    let layer = method.adapt_linear("v_proj", &base).unwrap();
    let x = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
    let merged = layer.merged_weight(&base.weight).unwrap();
    let via_merge = x.matmul(&merged.tr());
    let via_adapter = tch::no_grad(|| layer.forward(&x, &base, false)).unwrap();
    assert!((via_merge - via_adapter).abs().max().double_value(&[]) < 1e-5);
    let back = layer.unmerged_weight(&merged).unwrap();
    assert!((back - &base.weight).abs().max().double_value(&[]) < 1e-6);
    assert!(method.targets("model.layers.0.self_attn.v_proj").unwrap());
    let peft: serde_json::Value = serde_json::from_str(&method.peft_config().unwrap()).unwrap();
    assert_eq!(peft["r"], 3);
}
