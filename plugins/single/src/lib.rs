//! `single`: one device, the optimizer step owned by the plugin.
//!
//! AdamW as `torch.optim.AdamW(fused=True)` (libtorch's `_fused_adamw_`, one call per torch
//! param group, i.e. per distinct (`lr_scale`, `weight_decay_scale`), through
//! `ferrotune_plugin_api::optim`), preceded by `torch.nn.utils.clip_grad_norm_(foreach=True)`
//! when `max_grad_norm` is set. Per parameter and step:
//!
//! ```text
//! lr_p = lr · lr_scale                    wd_p = weight_decay · weight_decay_scale
//! p ← p · (1 − lr_p · wd_p)               (skipped when wd_p = 0)
//! m ← lerp(m, g, 1 − β1)                  v ← v · β2 + (1 − β2) · g²
//! step_size = lr_p / (1 − β1^t)           denom = √v / √(1 − β2^t) + eps   (√max(v) with amsgrad)
//! p ← p − step_size · m / denom
//! ```
//!
//! The fused kernel evaluates these formulas per element in one pass, so fp32 results are
//! bit-identical to `AdamW(fused=True)` on the same device (tests/optim_parity.rs; torch's
//! unfused path differs from it in the last bits). Optimizer state is fp32 for
//! fp16/bf16/fp32 parameters (fp64 for fp64 ones). A bf16/f16 parameter also keeps fp32
//! master weights, made from its values at setup (DeepSpeed's bf16 mode): the update runs on
//! the master and the parameter receives `master.to(dtype)`, so updates below the
//! parameter's precision accumulate in the master instead of being lost. A non-finite global gradient norm skips the step (and the
//! step counter). After every step the gradients are dropped (`grad = None`). A parameter
//! without a gradient at a step is left alone; the bias correction
//! uses the run's step count (torch counts per parameter: the two differ only for a
//! parameter that misses some steps' gradients entirely).
//!
//! State dict: `step` (int64 scalar), `<param>.exp_avg`, `<param>.exp_avg_sq`, with
//! amsgrad `<param>.max_exp_avg_sq`, and for a bf16/f16 parameter `<param>.master`.
use ferrotune_plugin_api::prelude::*;
use schemars::JsonSchema;
use serde::Deserialize;

pub use ferrotune_plugin_api::optim::AdamWConfig;
use ferrotune_plugin_api::optim::{
    adamw_step, check_params, global_norm, load_state, AdamWParam, AdamWState, StateSlot,
};

/// One trainable parameter and its AdamW state.
struct Slot {
    param: TrainParam,
    state: AdamWState,
}

/// `single` takes no keys (the optimizer is configured by the run's `optimizer:` section).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct NoOptions {}

pub struct Single {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Optimizer steps taken (skipped steps excluded).
    step: i64,
    ready: bool,
}

impl Plugin for Single {
    const NAME: &'static str = "single";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "one device: torch-exact AdamW (amsgrad, LoRA+ lr scales) with global-norm clipping";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let _: NoOptions = parse_config(config_json)?;
        Ok(Self { cfg: AdamWConfig::parse("{}")?, slots: Vec::new(), step: 0, ready: false })
    }
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<NoOptions>())
    }
}

fn single_rank(comm: &dyn Collectives) -> PluginResult<()> {
    match comm.world_size() {
        1 => Ok(()),
        n => Err(PluginError::unsupported(format!(
            "the `single` memory plugin trains on one process, this run has {n} ranks: use the ddp or zero plugin"
        ))),
    }
}

impl Single {
    fn ensure_ready(&self) -> PluginResult<()> {
        if self.ready {
            Ok(())
        } else {
            Err(PluginError::invalid("the `single` memory plugin was not set up: call setup first"))
        }
    }
}

impl MemoryStrategy for Single {
    fn setup(
        &mut self,
        params: Vec<TrainParam>,
        optimizer_json: &str,
        device: Device,
        comm: &dyn Collectives,
    ) -> PluginResult<()> {
        single_rank(comm)?;
        let cfg = AdamWConfig::parse(optimizer_json)?;
        check_params(&params, device, ": the `single` plugin keeps everything on one device")?;
        let slots = params
            .into_iter()
            .map(|p| {
                let state = AdamWState::new(&p.tensor, cfg.amsgrad, device)?;
                Ok(Slot { param: p, state })
            })
            .collect::<PluginResult<Vec<_>>>()?;
        *self = Self { cfg, slots, step: 0, ready: true };
        Ok(())
    }

    fn step(&mut self, lr: f64, comm: &dyn Collectives) -> PluginResult<StepReport> {
        self.ensure_ready()?;
        single_rank(comm)?;
        if !(lr >= 0.0 && lr.is_finite()) {
            return Err(PluginError::invalid(format!(
                "learning rate must be finite and ≥ 0, got {lr}"
            )));
        }
        let grads: Vec<Option<Tensor>> = self
            .slots
            .iter()
            .map(|s| {
                let g = s.param.tensor.grad();
                g.defined().then_some(g)
            })
            .collect();
        let Some(total_norm) = tch::no_grad(|| global_norm(&grads))? else {
            return Ok(StepReport {
                grad_norm: 0.0,
                skipped: true,
                metrics: vec![("no_gradients".into(), 1.0)],
            });
        };
        // Parameters without a gradient at this step are left alone.
        let params = self.slots.iter_mut().zip(&grads).filter_map(|(slot, grad)| {
            let grad = grad.as_ref()?;
            Some(AdamWParam { param: &slot.param, moments: slot.state.moments(), grad })
        });
        let report = adamw_step(&self.cfg, &total_norm, lr, &mut self.step, params)?;
        self.zero_grad()?;
        Ok(report)
    }

    fn zero_grad(&mut self) -> PluginResult<()> {
        ferrotune_plugin_api::optim::zero_grads(self.slots.iter().map(|s| &s.param.tensor))
    }

    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        self.ensure_ready()?;
        let mut out = vec![("step".to_string(), Tensor::from(self.step))];
        for s in &self.slots {
            out.extend(s.state.named(&s.param.name)?);
        }
        Ok(out)
    }

    fn load_state_dict(&mut self, state: Vec<(String, Tensor)>) -> PluginResult<()> {
        self.ensure_ready()?;
        let (amsgrad, count) = (self.cfg.amsgrad, self.slots.len());
        let unknown = |name: &str| {
            let hint = if name.ends_with(".max_exp_avg_sq") && !amsgrad {
                " (amsgrad state, but `amsgrad` is off)"
            } else if name.ends_with(".master") {
                " (fp32 master weights are kept only for bf16/f16 parameters)"
            } else {
                ""
            };
            PluginError::invalid(format!(
                "unknown optimizer state `{name}`{hint}: expected `step` and `<param>.exp_avg`, `<param>.exp_avg_sq`{}, `<param>.master` (bf16/f16 only) for the {count} parameters of this run",
                if amsgrad { ", `<param>.max_exp_avg_sq`" } else { "" },
            ))
        };
        let mut slots: Vec<StateSlot<'_>> = self
            .slots
            .iter_mut()
            .map(|s| StateSlot {
                name: &s.param.name,
                shape: s.param.tensor.size(),
                state: Some(&mut s.state),
            })
            .collect();
        self.step = load_state(state, &mut slots, &unknown, "")?;
        Ok(())
    }
}

export_plugin!(memory: Single);

#[cfg(test)]
mod tests {
    use super::*;

    struct World(usize);

    impl Collectives for World {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            self.0
        }
        fn all_reduce(&self, _: &Tensor, _: ReduceOp) -> PluginResult<()> {
            Ok(())
        }
        fn broadcast(&self, _: &Tensor, _: usize) -> PluginResult<()> {
            Ok(())
        }
        fn all_gather(&self, t: &Tensor) -> PluginResult<Vec<Tensor>> {
            Ok(vec![t.shallow_clone()])
        }
        fn reduce_scatter(&self, _: &Tensor, _: &Tensor, _: ReduceOp) -> PluginResult<()> {
            Ok(())
        }
        fn barrier(&self) -> PluginResult<()> {
            Ok(())
        }
    }

    fn param(name: &str, values: &[f32]) -> TrainParam {
        TrainParam::new(name, Tensor::from_slice(values).set_requires_grad(true))
    }

    fn ready(cfg: &str, params: Vec<TrainParam>) -> Single {
        let mut s = Single::from_config("{}").unwrap();
        s.setup(params, cfg, Device::Cpu, &World(1)).unwrap();
        s
    }

    #[test]
    fn config_defaults_and_errors_name_the_key() {
        let cfg = AdamWConfig::parse("").unwrap();
        assert_eq!(
            cfg,
            AdamWConfig {
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.01,
                amsgrad: false,
                max_grad_norm: None
            }
        );
        let e = AdamWConfig::parse(r#"{"beta": [0.9, 0.99]}"#).unwrap_err();
        assert!(e.message().contains("unknown field `beta`"), "{e}");
        let e = AdamWConfig::parse(r#"{"betas": [0.9, 1.0]}"#).unwrap_err();
        assert!(e.message().contains("`betas[1]`"), "{e}");
        let e = AdamWConfig::parse(r#"{"betas": [0.9]}"#).unwrap_err();
        assert!(e.message().contains("`betas`"), "{e}");
        let e = AdamWConfig::parse(r#"{"eps": -1}"#).unwrap_err();
        assert!(e.message().contains("`optimizer.eps`"), "{e}");
        let e = AdamWConfig::parse(r#"{"eps": 0}"#).unwrap_err();
        assert!(e.message().contains("`optimizer.eps`") && e.message().contains("positive"), "{e}");
        let e = AdamWConfig::parse(r#"{"weight_decay": -0.1}"#).unwrap_err();
        assert!(e.message().contains("`weight_decay`"), "{e}");
        let e = AdamWConfig::parse(r#"{"max_grad_norm": 0}"#).unwrap_err();
        assert!(e.message().contains("`max_grad_norm`"), "{e}");
        let e = AdamWConfig::parse(r#"{"amsgrad": "yes"}"#).unwrap_err();
        assert!(e.message().contains("`amsgrad`"), "{e}");
        let e = Single::from_config(r#"{"lr": 1}"#).err().unwrap();
        assert!(e.message().contains("unknown field `lr`"), "{e}");
    }

    #[test]
    fn refuses_several_ranks() {
        let mut s = Single::from_config("{}").unwrap();
        let e = s.setup(vec![param("p", &[1.0])], "{}", Device::Cpu, &World(2)).unwrap_err();
        assert!(
            e.message().contains("use the ddp or zero plugin") && e.message().contains("2 ranks"),
            "{e}"
        );
        assert!(s.step(0.1, &World(1)).unwrap_err().message().contains("not set up"));
    }

    /// First step closed form: m = 0.1 g, v = 0.001 g², bias-corrected m̂/√v̂ = sign(g), so
    /// p ← p(1 − lr·wd) − lr·g/(|g| + eps).
    #[test]
    fn first_step_is_sign_descent_with_decay() {
        // eps must be positive; 1e-30 leaves |g| + eps = |g| in f32 for these gradients.
        let mut s =
            ready(r#"{"weight_decay": 0.1, "eps": 1e-30}"#, vec![param("p", &[1.0, -2.0, 3.0])]);
        let p = s.slots[0].param.tensor.shallow_clone();
        (&p * Tensor::from_slice(&[0.5f32, -4.0, 0.0])).sum(Kind::Float).backward();
        let r = s.step(0.01, &World(1)).unwrap();
        assert!((r.grad_norm - (0.25f64 + 16.0).sqrt()).abs() < 1e-6);
        let got = Vec::<f32>::try_from(&p).unwrap();
        let decay = 1.0 - 0.01 * 0.1;
        assert!((got[0] as f64 - (1.0 * decay - 0.01)).abs() < 1e-6, "{got:?}");
        assert!((got[1] as f64 - (-2.0 * decay + 0.01)).abs() < 1e-6, "{got:?}");
        // g = 0: m̂ = 0, so only the decay moves it (with eps = 0 this was 0/0 = NaN).
        assert!((got[2] as f64 - 3.0 * decay).abs() < 1e-6, "{got:?}");
        assert!(!p.grad().defined(), "the step drops the gradients");
    }

    #[test]
    fn non_finite_norm_skips_and_drops_grads() {
        let mut s = ready("{}", vec![param("p", &[1.0, 2.0])]);
        let p = s.slots[0].param.tensor.shallow_clone();
        (&p * Tensor::from_slice(&[f32::NAN, 1.0])).sum(Kind::Float).backward();
        let r = s.step(0.1, &World(1)).unwrap();
        assert!(r.skipped && r.grad_norm.is_nan());
        assert_eq!(Vec::<f32>::try_from(&p).unwrap(), vec![1.0, 2.0]);
        assert_eq!(s.step, 0);
        assert!(!p.grad().defined(), "a skipped step drops the gradients too");
    }

    #[test]
    fn bf16_parameter_keeps_fp32_state() {
        let t = Tensor::from_slice(&[1.0f32, -1.0]).to_kind(Kind::BFloat16).set_requires_grad(true);
        let mut s = ready("{}", vec![TrainParam::new("p", t.shallow_clone())]);
        (&t * Tensor::from_slice(&[1.0f32, 2.0]).to_kind(Kind::BFloat16))
            .sum(Kind::Float)
            .backward();
        s.step(0.1, &World(1)).unwrap();
        assert_eq!(t.kind(), Kind::BFloat16);
        let state = s.state_dict().unwrap();
        assert!(state.iter().filter(|(n, _)| n != "step").all(|(_, t)| t.kind() == Kind::Float));
        assert!(
            (t.double_value(&[0]) - (1.0 - 0.1 * 0.01 - 0.1)).abs() < 1e-2,
            "{}",
            t.double_value(&[0])
        );
    }

    /// Steps `plugins` (each holding one parameter) with the gradients `grads[step]`, each
    /// converted to its parameter's dtype, calling `after` after every step.
    fn train(
        plugins: &mut [&mut Single],
        grads: &[Vec<f32>],
        lr: f64,
        after: &dyn Fn(&[&mut Single]),
    ) {
        for g in grads {
            for s in plugins.iter_mut() {
                let p = s.slots[0].param.tensor.shallow_clone();
                (&p * Tensor::from_slice(g).to_kind(p.kind())).sum(Kind::Float).backward();
                assert!(!s.step(lr, &World(1)).unwrap().skipped);
            }
            after(plugins);
        }
    }

    fn master_of(s: &Single) -> Tensor {
        s.slots[0].state.master.as_ref().expect("a master").shallow_clone()
    }

    /// Gradients whose bf16 and f16 roundings differ from themselves, varying per step.
    fn tiny_update_grads() -> Vec<Vec<f32>> {
        (0..6)
            .map(|k| (0..4).map(|i| ((i * 7 + k * 3) % 11) as f32 * 0.137 - 0.6).collect())
            .collect()
    }

    /// lr 1e-5 on weights near 1: each step moves a weight by ~1e-5, far below bf16's half
    /// ulp there (2^-9): rounding the parameter after each step, as before masters, lost
    /// every update. The master keeps them, equals an fp32 parameter trained alone on the
    /// same (fp32-converted) gradients bit for bit, and the parameter is always the master
    /// rounded.
    #[test]
    fn low_precision_parameter_trains_an_fp32_master() {
        let init = [1.0f32, -1.0, 0.75, 1.5];
        for kind in [Kind::BFloat16, Kind::Half] {
            let cfg = r#"{"weight_decay": 0.1, "max_grad_norm": 0.5}"#;
            let t = Tensor::from_slice(&init).to_kind(kind).set_requires_grad(true);
            let mut low = ready(cfg, vec![TrainParam::new("p", t.shallow_clone())]);
            // The reference gets the low-precision gradients converted to fp32.
            let grads: Vec<Vec<f32>> = tiny_update_grads()
                .iter()
                .map(|g| {
                    Vec::<f32>::try_from(Tensor::from_slice(g).to_kind(kind).to_kind(Kind::Float))
                        .unwrap()
                })
                .collect();
            let init_low = Vec::<f32>::try_from(t.to_kind(Kind::Float)).unwrap();
            let mut reference = ready(cfg, vec![param("p", &init_low)]);
            assert_eq!(Vec::<f32>::try_from(&master_of(&low)).unwrap(), init_low);
            train(&mut [&mut low, &mut reference], &grads, 1e-5, &|ss| {
                let (low, reference) = (&ss[0], &ss[1]);
                let master = master_of(low);
                assert_eq!(master.kind(), Kind::Float);
                assert!(
                    master.equal(&reference.slots[0].param.tensor),
                    "{kind:?}: master != fp32 run"
                );
                assert!(t.equal(&master.to_kind(kind)), "{kind:?}: param != master rounded");
            });
            let master = Vec::<f32>::try_from(&master_of(&low)).unwrap();
            assert!(master.iter().zip(&init_low).all(|(m, i)| m != i), "{kind:?}: {master:?}");
            // bf16/f16 alone would have lost every update: the rounded master is the start.
            assert_eq!(Vec::<f32>::try_from(t.to_kind(Kind::Float)).unwrap(), init_low, "{kind:?}");
        }
    }

    #[test]
    fn master_survives_a_state_dict_round_trip() {
        let grads = tiny_update_grads();
        let new = || {
            let t = Tensor::from_slice(&[1.0f32, -1.0, 0.75, 1.5]).to_kind(Kind::BFloat16);
            ready("{}", vec![TrainParam::new("w", t.set_requires_grad(true)), param("b", &[0.5])])
        };
        let mut a = new();
        train(&mut [&mut a], &grads[..3], 1e-5, &|_| {});
        let state = a.state_dict().unwrap();
        let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["step", "w.exp_avg", "w.exp_avg_sq", "w.master", "b.exp_avg", "b.exp_avg_sq"]
        );
        // A fresh plugin, its parameter given the checkpoint's (rounded) weights as the host
        // does, then the optimizer state: both continue identically.
        let mut b = new();
        tch::no_grad(|| b.slots[0].param.tensor.shallow_clone().copy_(&a.slots[0].param.tensor));
        assert!(!master_of(&b).equal(&master_of(&a)), "the steps moved the master");
        b.load_state_dict(state.iter().map(|(n, t)| (n.clone(), t.copy())).collect()).unwrap();
        assert!(master_of(&b).equal(&master_of(&a)));
        train(&mut [&mut a, &mut b], &grads[3..], 1e-5, &|ss| {
            assert!(master_of(ss[0]).equal(&master_of(ss[1])));
            assert!(ss[0].slots[0].param.tensor.equal(&ss[1].slots[0].param.tensor));
        });

        let without: Vec<_> = state
            .iter()
            .filter(|(n, _)| n != "w.master")
            .map(|(n, t)| (n.clone(), t.copy()))
            .collect();
        let e = b.load_state_dict(without).unwrap_err();
        assert!(
            e.message().contains("no `w.master`") && e.message().contains("master weights"),
            "{e}"
        );
        let mut extra: Vec<_> = state.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        extra.push(("b.master".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu))));
        let e = b.load_state_dict(extra).unwrap_err();
        assert!(
            e.message().contains("`b.master`") && e.message().contains("only for bf16/f16"),
            "{e}"
        );
        let mut bad: Vec<_> = state.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        bad[3].1 = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        let e = b.load_state_dict(bad).unwrap_err();
        assert!(e.message().contains("`w.master` has shape [3]"), "{e}");
    }

    #[test]
    fn load_state_dict_names_bad_entries() {
        let mut s =
            ready(r#"{"amsgrad": true}"#, vec![param("a", &[1.0, 2.0]), param("b", &[3.0])]);
        let good = s.state_dict().unwrap();
        let names: Vec<&str> = good.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "step",
                "a.exp_avg",
                "a.exp_avg_sq",
                "a.max_exp_avg_sq",
                "b.exp_avg",
                "b.exp_avg_sq",
                "b.max_exp_avg_sq"
            ]
        );
        type State = Vec<(String, Tensor)>;
        let with = |f: &dyn Fn(&mut State)| {
            let mut st: State = good.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
            f(&mut st);
            st
        };
        let e = s
            .load_state_dict(with(&|st| {
                st.push(("c.exp_avg".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu))))
            }))
            .unwrap_err();
        assert!(e.message().contains("unknown optimizer state `c.exp_avg`"), "{e}");
        let e = s
            .load_state_dict(with(&|st| st[1].1 = Tensor::zeros([3], (Kind::Float, Device::Cpu))))
            .unwrap_err();
        assert!(
            e.message().contains("`a.exp_avg` has shape [3]") && e.message().contains("[2]"),
            "{e}"
        );
        let e = s.load_state_dict(with(&|st| drop(st.remove(6)))).unwrap_err();
        assert!(e.message().contains("no `b.max_exp_avg_sq`"), "{e}");
        let e = s.load_state_dict(with(&|st| drop(st.remove(0)))).unwrap_err();
        assert!(e.message().contains("no `step`"), "{e}");
        let e = s.load_state_dict(with(&|st| st[0].1 = Tensor::from(2.5f64))).unwrap_err();
        assert!(e.message().contains("`step`"), "{e}");
        s.load_state_dict(with(&|st| st[0].1 = Tensor::from(7i64))).unwrap();
        assert_eq!(s.step, 7);
        let mut plain = ready("{}", vec![param("a", &[1.0, 2.0]), param("b", &[3.0])]);
        let e = plain.load_state_dict(good).unwrap_err();
        assert!(
            e.message().contains("`a.max_exp_avg_sq`") && e.message().contains("`amsgrad` is off"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotune_plugin_api::schema::assert_schema_matches;
    use serde_json::json;

    #[test]
    fn schema_matches_the_parser() {
        let s = assert_schema_matches::<Single>(json!({}));
        assert_eq!((&s["properties"], &s["additionalProperties"]), (&json!({}), &json!(false)));
    }
}
