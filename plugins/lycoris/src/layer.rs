//! One adapted linear layer, peft's `loha.Linear` / `lokr.Linear`:
//! `y = base(x) + x ΔWᵀ`, with ΔW built from the factors each forward (peft's
//! `get_delta_weight`), and in training peft's `rank_dropout` (rows of ΔW) and `module_dropout`
//! (the whole update). Tensor names are peft's state-dict keys.
use ferrotune_plugin_api::{AdapterLayer, BaseLinear, PluginError, PluginResult, TrainParam};
use tch::{Device, Kind, Tensor};

use crate::config::{InitWeights, LycorisConfig, Method};
use crate::shapes::layer_tensors;

pub struct LycorisLayer {
    module: String,
    method: Method,
    /// The factors, peft's names, in peft's order.
    tensors: Vec<(&'static str, Tensor)>,
    /// `[out, in]` of the base layer.
    shape: [i64; 2],
    scaling: f64,
    rank_dropout: f64,
    /// Whether the rows kept by rank dropout are rescaled (always for LoHa, as peft).
    rank_dropout_scale: bool,
    module_dropout: f64,
}

/// float32 factors for a half-precision base (peft's `autocast_adapter_dtype=True`).
fn adapter_kind(base: Kind) -> Kind {
    match base {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        k => k,
    }
}

/// `nn.init.kaiming_uniform_(w, a=√5)` on a 2-D tensor: U(−1/√fan_in, 1/√fan_in), fan_in the
/// second dimension.
fn kaiming_uniform(shape: [i64; 2], opts: (Kind, Device)) -> PluginResult<Tensor> {
    let bound = 1.0 / (shape[1] as f64).sqrt();
    let mut t = Tensor::f_empty(shape, opts)?;
    let _ = t.f_uniform_(-bound, bound)?;
    Ok(t)
}

/// Whether factor `name` starts at zero under `init` (peft's `reset_adapter_parameters*`): the
/// one factor that makes the initial update vanish.
fn starts_at_zero(name: &str, init: InitWeights) -> bool {
    match init {
        InitWeights::Random => false,
        InitWeights::Default => matches!(name, "hada_w2_b" | "lokr_w1" | "lokr_w1_a"),
        InitWeights::Lycoris => matches!(name, "lokr_w2" | "lokr_w2_b"),
    }
}

impl LycorisLayer {
    /// The adapter of `base` (`module` names it in errors), initialised as peft does.
    pub fn new(cfg: &LycorisConfig, module: &str, base: &dyn BaseLinear) -> PluginResult<Self> {
        let (out, inp) = base.shape()?;
        let weight = base.weight()?;
        if weight.size() != [out, inp] {
            return Err(PluginError::invalid(format!(
                "`{module}`: base weight has shape {:?}, the layer reports {:?}",
                weight.size(),
                (out, inp)
            )));
        }
        let opts = (adapter_kind(weight.kind()), weight.device());
        let r = cfg.rank_for(module)?;
        let tensors = layer_tensors(cfg, r, out, inp)
            .into_iter()
            .map(|(name, shape)| {
                let t = if starts_at_zero(name, cfg.init_weights) {
                    Tensor::f_zeros(shape, opts)?
                } else {
                    kaiming_uniform(shape, opts)?
                };
                Ok((name, t.set_requires_grad(true)))
            })
            .collect::<PluginResult<Vec<_>>>()?;
        Ok(Self {
            module: module.to_string(),
            method: cfg.method,
            tensors,
            shape: [out, inp],
            scaling: cfg.scaling_for(module)?,
            rank_dropout: cfg.rank_dropout,
            rank_dropout_scale: cfg.method == Method::LoHa || cfg.rank_dropout_scale(),
            module_dropout: cfg.module_dropout,
        })
    }

    fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| *n == name).map(|(_, t)| t)
    }

    /// A Kronecker factor: `full` stored whole, or `a · b`.
    fn kron_factor(&self, full: &str, a: &str, b: &str) -> PluginResult<Tensor> {
        match (self.get(full), self.get(a), self.get(b)) {
            (Some(w), _, _) => Ok(w.shallow_clone()),
            (None, Some(a), Some(b)) => Ok(a.f_matmul(b)?),
            _ => Err(PluginError::runtime(format!(
                "`{}`: LoKr layer holds neither `{full}` nor `{a}` and `{b}`",
                self.module
            ))),
        }
    }

    /// peft's `get_delta_weight` `[out, in]` (differentiable): LoHa
    /// `((W1a·W1b) ⊙ (W2a·W2b)) · scale`, LoKr `(W1 ⊗ W2) · scale`; with `rank_dropout`
    /// (training only) each row kept with probability 1 − p (LoHa, and LoKr with
    /// `rank_dropout_scale`, divide by the fraction kept).
    pub fn delta_weight(&self, rank_dropout: bool) -> PluginResult<Tensor> {
        let weight = match self.method {
            Method::LoHa => {
                let t = |n: &str| {
                    self.get(n).ok_or_else(|| {
                        PluginError::runtime(format!("`{}`: LoHa layer lacks `{n}`", self.module))
                    })
                };
                let w1 = t("hada_w1_a")?.f_matmul(t("hada_w1_b")?)?;
                let w2 = t("hada_w2_a")?.f_matmul(t("hada_w2_b")?)?;
                w1.f_mul(&w2)?.f_mul_scalar(self.scaling)?
            }
            Method::LoKr => {
                let w1 = self.kron_factor("lokr_w1", "lokr_w1_a", "lokr_w1_b")?;
                let w2 = self.kron_factor("lokr_w2", "lokr_w2_a", "lokr_w2_b")?.f_contiguous()?;
                w1.f_kron(&w2)?.f_mul_scalar(self.scaling)?
            }
        };
        let weight = weight.f_reshape(self.shape)?;
        if !(rank_dropout && self.rank_dropout > 0.0) {
            return Ok(weight);
        }
        // peft draws the rows on the CPU.
        let keep = Tensor::f_rand([self.shape[0]], (Kind::Float, Device::Cpu))?
            .f_gt(self.rank_dropout)?
            .f_to_kind(weight.kind())?;
        let keep = if self.rank_dropout_scale { keep.f_div(&keep.f_mean(None)?)? } else { keep };
        Ok(weight.f_mul(&keep.f_view([-1, 1])?.f_to_device(weight.device())?)?)
    }

    /// peft's `torch.rand(1) > module_dropout` in training: whether the update runs.
    fn update_runs(&self, train: bool) -> PluginResult<bool> {
        if !train || self.module_dropout == 0.0 {
            return Ok(true);
        }
        let draw = Tensor::f_rand([1], (Kind::Float, Device::Cpu))?.f_double_value(&[0])?;
        Ok(draw > self.module_dropout)
    }

    /// The delta, detached, in float32 or wider.
    fn detached_delta(&self) -> PluginResult<Tensor> {
        let d = tch::no_grad(|| self.delta_weight(false))?;
        Ok(d.f_to_kind(wide(d.kind()))?)
    }
}

fn wide(k: Kind) -> Kind {
    if k == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

impl AdapterLayer for LycorisLayer {
    fn forward(&self, x: &Tensor, base: &dyn BaseLinear, train: bool) -> PluginResult<Tensor> {
        let result = base.forward(x)?;
        if !self.update_runs(train)? {
            return Ok(result.f_to_kind(x.kind())?);
        }
        let delta = self.delta_weight(train)?;
        let update = x.f_to_kind(delta.kind())?.f_linear::<Tensor>(&delta, None)?;
        Ok(result.f_add(&update)?.f_to_kind(x.kind())?)
    }

    fn parameters(&self) -> PluginResult<Vec<TrainParam>> {
        Ok(self.tensors.iter().map(|(n, t)| TrainParam::new(*n, t.shallow_clone())).collect())
    }

    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        self.tensors.iter().map(|(n, t)| Ok((n.to_string(), t.f_detach_copy()?))).collect()
    }

    fn load_state_dict(&self, tensors: Vec<(String, Tensor)>) -> PluginResult<()> {
        let method = match self.method {
            Method::LoHa => "LoHa",
            Method::LoKr => "LoKr",
        };
        let expected = || self.tensors.iter().map(|(n, _)| format!("`{n}`")).collect::<Vec<_>>();
        let mut found: Vec<Option<Tensor>> = self.tensors.iter().map(|_| None).collect();
        for (name, t) in tensors {
            let Some(i) = self.tensors.iter().position(|(n, _)| *n == name) else {
                return Err(PluginError::invalid(format!(
                    "unexpected tensor `{name}` in the {method} state of `{}` (expected {})",
                    self.module,
                    expected().join(", ")
                )));
            };
            let want = self.tensors[i].1.size();
            if t.size() != want {
                return Err(PluginError::invalid(format!(
                    "`{}.{name}`: shape {:?}, expected {want:?} (the layer is {:?})",
                    self.module,
                    t.size(),
                    self.shape
                )));
            }
            found[i] = Some(t);
        }
        if let Some(i) = found.iter().position(Option::is_none) {
            return Err(PluginError::invalid(format!(
                "the {method} state of `{}` lacks `{}` (expected {})",
                self.module,
                self.tensors[i].0,
                expected().join(", ")
            )));
        }
        tch::no_grad(|| -> PluginResult<()> {
            for ((_, live), t) in self.tensors.iter().zip(found.into_iter().flatten()) {
                live.shallow_clone().f_copy_(&t)?;
            }
            Ok(())
        })
    }

    fn merged_weight(&self, base_weight: &Tensor) -> PluginResult<Tensor> {
        let delta = self.detached_delta()?;
        Ok(base_weight.f_to_kind(delta.kind())?.f_add(&delta)?.f_to_kind(base_weight.kind())?)
    }

    fn unmerged_weight(&self, merged_weight: &Tensor) -> PluginResult<Tensor> {
        let delta = self.detached_delta()?;
        Ok(merged_weight.f_to_kind(delta.kind())?.f_sub(&delta)?.f_to_kind(merged_weight.kind())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use ferrotune_plugin_api::kinds::adapter::DenseLinear as Base;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    fn cfg(json: &str, method: Method) -> LycorisConfig {
        LycorisConfig::from_json(json, method).unwrap()
    }

    fn names(l: &LycorisLayer) -> Vec<(String, Vec<i64>)> {
        l.state_dict().unwrap().into_iter().map(|(n, t)| (n, t.size())).collect()
    }

    #[test]
    fn delta_weights_are_the_closed_forms() {
        tch::manual_seed(1);
        let o = (Kind::Float, Device::Cpu);
        let base = Base { w: Tensor::randn([12, 8], o), b: None };
        let x = Tensor::randn([2, 3, 8], o);
        let loha = LycorisLayer::new(
            &cfg(r#"{"r": 2, "alpha": 3, "init_weights": false}"#, Method::LoHa),
            "m",
            &base,
        )
        .unwrap();
        let s = loha.state_dict().unwrap();
        let want = (s[0].1.mm(&s[1].1) * s[2].1.mm(&s[3].1)) * 1.5;
        assert!(max_diff(&loha.delta_weight(false).unwrap(), &want) < 1e-6);
        // LoKr, 12 = 3·4 and 8 = 2·4: W1 [3, 2] whole, W2 [4, 4] as a·b (r = 1 < 4/2)
        let lokr = LycorisLayer::new(
            &cfg(r#"{"r": 1, "alpha": 2, "init_weights": false}"#, Method::LoKr),
            "m",
            &base,
        )
        .unwrap();
        assert_eq!(
            names(&lokr),
            [
                ("lokr_w1".into(), vec![3, 2]),
                ("lokr_w2_a".into(), vec![4, 1]),
                ("lokr_w2_b".into(), vec![1, 4])
            ]
        );
        let s = lokr.state_dict().unwrap();
        let (w1, w2) = (&s[0].1, s[1].1.mm(&s[2].1));
        let d = lokr.delta_weight(false).unwrap();
        for (i, j) in [(0, 0), (5, 7), (11, 3)] {
            let want = w1.double_value(&[i / 4, j / 4]) * w2.double_value(&[i % 4, j % 4]) * 2.0;
            assert!((d.double_value(&[i, j]) - want).abs() < 1e-6, "({i}, {j})");
        }
        for l in [&loha, &lokr] {
            let y = l.forward(&x, &base, false).unwrap();
            let merged = l.merged_weight(&base.w).unwrap();
            assert!(max_diff(&y, &x.linear::<Tensor>(&merged, None)) < 1e-5);
            assert!(max_diff(&l.unmerged_weight(&merged).unwrap(), &base.w) < 1e-5);
        }
    }

    #[test]
    fn default_init_is_the_base_layer() {
        let o = (Kind::Float, Device::Cpu);
        let base = Base { w: Tensor::randn([12, 8], o), b: None };
        let x = Tensor::randn([2, 8], o);
        for (json, method, zero) in [
            ("{}", Method::LoHa, "hada_w2_b"),
            (r#"{"r": 1}"#, Method::LoKr, "lokr_w1"),
            (
                r#"{"r": 1, "decompose_both": true, "decompose_factor": 4}"#,
                Method::LoKr,
                "lokr_w1_a",
            ),
            (r#"{"r": 1, "init_weights": "lycoris"}"#, Method::LoKr, "lokr_w2_b"),
        ] {
            let l = LycorisLayer::new(&cfg(json, method), "m", &base).unwrap();
            assert_eq!(
                max_diff(&l.forward(&x, &base, true).unwrap(), &base.forward(&x).unwrap()),
                0.0
            );
            for (n, t) in l.state_dict().unwrap() {
                let zero_here = t.abs().max().double_value(&[]) == 0.0;
                assert_eq!(zero_here, n == zero, "{json}: {n}");
                if !zero_here {
                    let bound = 1.0 / (t.size()[1] as f64).sqrt();
                    assert!(t.abs().max().double_value(&[]) <= bound, "{json}: {n} kaiming");
                }
            }
        }
    }

    #[test]
    fn dropouts_act_in_training_only() {
        tch::manual_seed(2);
        let o = (Kind::Float, Device::Cpu);
        let base = Base { w: Tensor::randn([16, 8], o), b: None };
        let x = Tensor::randn([4, 8], o);
        let c = cfg(r#"{"r": 2, "init_weights": false, "module_dropout": 1.0}"#, Method::LoHa);
        let l = LycorisLayer::new(&c, "m", &base).unwrap();
        let plain = base.forward(&x).unwrap();
        assert_eq!(max_diff(&l.forward(&x, &base, true).unwrap(), &plain), 0.0, "always skipped");
        assert!(max_diff(&l.forward(&x, &base, false).unwrap(), &plain) > 1e-3, "eval: applied");
        let c = cfg(r#"{"r": 2, "init_weights": false, "rank_dropout": 0.5}"#, Method::LoKr);
        let l = LycorisLayer::new(&c, "m", &base).unwrap();
        let full = l.delta_weight(false).unwrap();
        let dropped = l.delta_weight(true).unwrap();
        let kept = dropped.abs().sum_dim_intlist([1i64].as_slice(), false, Kind::Float).gt(0.0);
        let n_kept = kept.sum(Kind::Int64).int64_value(&[]);
        assert!(n_kept > 0 && n_kept < 16, "some rows dropped, some kept: {n_kept}");
        // LoKr without rank_dropout_scale: the kept rows unchanged
        let rows = Tensor::nonzero(&kept).view([-1]);
        assert!(max_diff(&dropped.index_select(0, &rows), &full.index_select(0, &rows)) < 1e-7);
    }

    #[test]
    fn bad_state_is_refused_by_name() {
        let o = (Kind::Float, Device::Cpu);
        let base = Base { w: Tensor::randn([12, 8], o), b: None };
        let l = LycorisLayer::new(&cfg(r#"{"r": 2}"#, Method::LoHa), "m.q_proj", &base).unwrap();
        let mut s = l.state_dict().unwrap();
        s[1].1 = Tensor::zeros([3, 8], o);
        let e = l.load_state_dict(s).unwrap_err();
        assert!(
            e.message().contains("`m.q_proj.hada_w1_b`") && e.message().contains("[3, 8]"),
            "{e}"
        );
        let mut s = l.state_dict().unwrap();
        s[0].0 = "lokr_w1".into();
        let e = l.load_state_dict(s).unwrap_err();
        assert!(e.message().contains("`lokr_w1`") && e.message().contains("LoHa"), "{e}");
        let mut s = l.state_dict().unwrap();
        s.pop();
        let e = l.load_state_dict(s).unwrap_err();
        assert!(e.message().contains("lacks `hada_w2_b`"), "{e}");
    }
}
