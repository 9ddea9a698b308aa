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
//! fp16/bf16/fp32 parameters (fp64 for fp64 ones); a low-precision parameter is updated in
//! an fp32 copy and rounded back. A non-finite global gradient norm skips the step (and the
//! step counter). After every step the gradients are dropped (`grad = None`). A parameter
//! without a gradient at a step is left alone; the bias correction
//! uses the run's step count (torch counts per parameter: the two differ only for a
//! parameter that misses some steps' gradients entirely).
//!
//! State dict: `step` (int64 scalar), `<param>.exp_avg`, `<param>.exp_avg_sq`, and with
//! amsgrad `<param>.max_exp_avg_sq`.
use ferrotune_plugin_api::prelude::*;
use serde::Deserialize;

pub use ferrotune_plugin_api::optim::AdamWConfig;
use ferrotune_plugin_api::optim::{
    adamw_step, check_params, global_norm, state_kind, AdamWMoments, AdamWParam,
};

/// One trainable parameter and its AdamW state.
struct Slot {
    param: TrainParam,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Option<Tensor>,
}

/// Which state tensor a state-dict name refers to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Moment {
    ExpAvg,
    ExpAvgSq,
    MaxExpAvgSq,
}

impl Moment {
    const ALL: [Moment; 3] = [Moment::ExpAvg, Moment::ExpAvgSq, Moment::MaxExpAvgSq];
    fn suffix(self) -> &'static str {
        match self {
            Moment::ExpAvg => "exp_avg",
            Moment::ExpAvgSq => "exp_avg_sq",
            Moment::MaxExpAvgSq => "max_exp_avg_sq",
        }
    }
}

impl Slot {
    fn moment(&self, m: Moment) -> Option<&Tensor> {
        match m {
            Moment::ExpAvg => Some(&self.exp_avg),
            Moment::ExpAvgSq => Some(&self.exp_avg_sq),
            Moment::MaxExpAvgSq => self.max_exp_avg_sq.as_ref(),
        }
    }
}

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
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct NoOptions {}
        let _: NoOptions = parse_config(config_json)?;
        Ok(Self { cfg: AdamWConfig::parse("{}")?, slots: Vec::new(), step: 0, ready: false })
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
        let mut slots = Vec::with_capacity(params.len());
        for p in params {
            let t = &p.tensor;
            let zeros = || Tensor::f_zeros(t.size(), (state_kind(t.kind()), t.device()));
            slots.push(Slot {
                exp_avg: zeros()?,
                exp_avg_sq: zeros()?,
                max_exp_avg_sq: if cfg.amsgrad { Some(zeros()?) } else { None },
                param: p,
            });
        }
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
            let Slot { param, exp_avg, exp_avg_sq, max_exp_avg_sq } = slot;
            let moments =
                AdamWMoments { exp_avg, exp_avg_sq, max_exp_avg_sq: max_exp_avg_sq.as_mut() };
            Some(AdamWParam { param, moments, grad: grad.as_ref()? })
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
            for m in Moment::ALL {
                if let Some(t) = s.moment(m) {
                    out.push((format!("{}.{}", s.param.name, m.suffix()), t.f_detach_copy()?));
                }
            }
        }
        Ok(out)
    }

    fn load_state_dict(&mut self, state: Vec<(String, Tensor)>) -> PluginResult<()> {
        self.ensure_ready()?;
        // Validate everything first, so a bad checkpoint leaves the state untouched.
        let mut step = None;
        let mut found: Vec<[Option<Tensor>; 3]> =
            self.slots.iter().map(|_| [None, None, None]).collect();
        for (name, t) in state {
            if name == "step" {
                if t.numel() != 1 {
                    return Err(PluginError::invalid(format!(
                        "optimizer state `step` must be a scalar, got shape {:?}",
                        t.size()
                    )));
                }
                let v = t.f_to_kind(Kind::Double)?.f_double_value(&[])?;
                if !(v >= 0.0 && v.fract() == 0.0 && v < 9.0e15) {
                    return Err(PluginError::invalid(format!(
                        "optimizer state `step` must be a non-negative integer, got {v}"
                    )));
                }
                step = Some(v as i64);
                continue;
            }
            let target = self.slots.iter().enumerate().find_map(|(i, s)| {
                let rest = name.strip_prefix(s.param.name.as_str())?.strip_prefix('.')?;
                let m = Moment::ALL.into_iter().find(|m| m.suffix() == rest)?;
                s.moment(m).map(|_| (i, m))
            });
            let Some((i, m)) = target else {
                let hint = if name.ends_with(".max_exp_avg_sq") && !self.cfg.amsgrad {
                    " (amsgrad state, but `amsgrad` is off)"
                } else {
                    ""
                };
                return Err(PluginError::invalid(format!(
                    "unknown optimizer state `{name}`{hint}: expected `step` and `<param>.exp_avg`, `<param>.exp_avg_sq`{} for the {} parameters of this run",
                    if self.cfg.amsgrad { ", `<param>.max_exp_avg_sq`" } else { "" },
                    self.slots.len()
                )));
            };
            let expected = self.slots[i].param.tensor.size();
            if t.size() != expected {
                return Err(PluginError::invalid(format!(
                    "optimizer state `{name}` has shape {:?}, the parameter {expected:?}",
                    t.size()
                )));
            }
            if !t.is_floating_point() {
                return Err(PluginError::invalid(format!(
                    "optimizer state `{name}` is {:?}, not floating point",
                    t.kind()
                )));
            }
            if found[i][m as usize].replace(t).is_some() {
                return Err(PluginError::invalid(format!(
                    "optimizer state `{name}` appears twice"
                )));
            }
        }
        let step = step.ok_or_else(|| PluginError::invalid("optimizer state has no `step`"))?;
        for (s, f) in self.slots.iter().zip(&found) {
            for m in Moment::ALL {
                if s.moment(m).is_some() && f[m as usize].is_none() {
                    return Err(PluginError::invalid(format!(
                        "optimizer state has no `{}.{}`",
                        s.param.name,
                        m.suffix()
                    )));
                }
            }
        }
        tch::no_grad(|| -> PluginResult<()> {
            for (s, f) in self.slots.iter_mut().zip(found) {
                for (m, t) in Moment::ALL.into_iter().zip(f) {
                    if let (Some(dst), Some(src)) = (s.moment(m), t) {
                        dst.shallow_clone().f_copy_(&src)?;
                    }
                }
            }
            Ok(())
        })?;
        self.step = step;
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
