//! 100,000 tensor crossings must not grow the process's memory (its own binary, so no
//! other test disturbs the measurement).
use ferrotune::model::linear::FrozenLinear;
use ferrotune_plugin_api::AdapterMethod;
use ferrotune_tests::*;
use tch::{Device, Kind, Tensor};

#[test]
fn hundred_thousand_crossings_do_not_grow_rss() {
    let reg = registry();
    let method = reg.adapter("testkit-lowrank", r#"{"rank": 2}"#).unwrap();
    let base =
        FrozenLinear::new("o_proj", Tensor::randn([16, 16], (Kind::Float, Device::Cpu)), None);
    let layer = method.adapt_linear("o_proj", &base).unwrap();
    let x = Tensor::randn([4, 16], (Kind::Float, Device::Cpu));
    // Each forward crosses 4 tensors: x in, x out to the host's base layer, its result
    // back, the layer's output back. Each merged_weight crosses 2.
    let mut crossings = 0u64;
    let mut round = |n: usize| {
        for _ in 0..n {
            let y = tch::no_grad(|| layer.forward(&x, &base, false)).unwrap();
            assert_eq!(y.size(), vec![4, 16]);
            let w = layer.merged_weight(&base.weight).unwrap();
            assert_eq!(w.size(), vec![16, 16]);
            crossings += 6;
        }
    };
    round(2_000); // warm-up: allocator pools, lazy libtorch initialisation
    let before = rss_bytes();
    round(17_000);
    let after = rss_bytes();
    let growth = after as i64 - before as i64;
    println!(
        "crossings: {crossings}, RSS before {} KiB, after {} KiB, growth {} KiB",
        before / 1024,
        after / 1024,
        growth / 1024
    );
    assert!(crossings >= 100_000);
    // A leaked handle keeps its tensor alive: >= 100 bytes each, > 10 MB over this loop.
    assert!(growth < 4 * 1024 * 1024, "RSS grew by {growth} bytes over {crossings} crossings");
}
