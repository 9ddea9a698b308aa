//! One adapted linear layer, peft's `lora.Linear`: `y = base(x) + scale · B A dropout(x)`,
//! with DoRA as a variant (`dora.rs`). Parameter names are peft's state-dict keys.
use ferrotune_plugin_api::{AdapterLayer, BaseLinear, PluginError, PluginResult, TrainParam};
use tch::{Kind, Tensor};

use crate::config::InitLoraWeights;
use crate::config::LoraConfig;
use crate::dora::{DoraMagnitude, LORA_MAGNITUDE};
use crate::init::{initial_factors, loftq};

/// A `[r, in]`: the down projection.
pub const LORA_A: &str = "lora_A.weight";
/// B `[out, r]`: the up projection.
pub const LORA_B: &str = "lora_B.weight";

/// How the update is applied on top of the base layer.
enum Variant {
    /// `base(x) + scale · x Aᵀ Bᵀ`.
    Plain,
    /// Magnitude and direction (DoRA).
    Dora(DoraMagnitude),
}

pub struct LoraLayer {
    a: Tensor,
    b: Tensor,
    scaling: f64,
    dropout: f64,
    b_lr_scale: f64,
    variant: Variant,
    /// LoftQ's quantized base weight Q, handed to the host by the first `unmerged_weight`
    /// (the `init_rewrites_base` contract: right after `adapt_linear` the host sets the base
    /// weight to `unmerged_weight(W)`, which for LoftQ is Q, not W − scale·B·A).
    loftq_base: std::sync::Mutex<Option<Tensor>>,
}

/// The dtype of the trainable tensors: float32 for a half-precision base, as peft's default
/// `autocast_adapter_dtype=True`; otherwise the base weight's.
fn adapter_kind(base: Kind) -> Kind {
    match base {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        k => k,
    }
}

/// Refuses a rank `r` outside 1..=min(out, in) of the layer `module` (`shape` = `(out, in)`):
/// a larger rank adds nothing min(out, in) cannot express, and A `[r, in]` and B `[out, r]`
/// of an absurd one would exhaust memory before anything else could refuse it.
pub fn check_rank(r: i64, module: &str, (out, inp): (i64, i64)) -> PluginResult<()> {
    if r < 1 || r > out.min(inp) {
        return Err(PluginError::config(
            "r",
            format!(
                "{r} does not fit `{module}` ([{out}, {inp}]): the rank must be between 1 and min(out, in) = {}",
                out.min(inp)
            ),
        ));
    }
    Ok(())
}

impl LoraLayer {
    /// Builds the adapter of `base` (`module` names it in errors).
    /// `r` is checked against the layer's widths first, before anything is allocated.
    pub fn new(cfg: &LoraConfig, module: &str, base: &dyn BaseLinear) -> PluginResult<Self> {
        let shape = base.shape()?;
        check_rank(cfg.r, module, shape)?;
        let weight = base.weight()?;
        if weight.size() != [shape.0, shape.1] {
            return Err(PluginError::invalid(format!(
                "`{module}`: base weight has shape {:?}, the layer reports {shape:?}",
                weight.size()
            )));
        }
        let scaling = cfg.scaling();
        let context = |e: PluginError| e.context(format!("layer `{module}`"));
        let (a, b, loftq_base) = if cfg.init_lora_weights == InitLoraWeights::Loftq {
            let (a, b, q) = tch::no_grad(|| {
                loftq(&weight, cfg.r, cfg.loftq_config.loftq_iter, adapter_kind(weight.kind()))
            })
            .map_err(context)?;
            (a, b, Some(q))
        } else {
            let (a, b) = initial_factors(
                cfg.init_lora_weights,
                &weight,
                cfg.r,
                scaling,
                adapter_kind(weight.kind()),
            )
            .map_err(context)?;
            (a, b, None)
        };
        let mut layer = Self {
            a: a.set_requires_grad(true),
            b: b.set_requires_grad(true),
            scaling,
            dropout: cfg.lora_dropout,
            b_lr_scale: cfg.b_lr_scale(),
            variant: Variant::Plain,
            loftq_base: std::sync::Mutex::new(loftq_base),
        };
        if cfg.use_dora {
            let delta = layer.delta_weight()?;
            let weight = weight.f_to_kind(delta.kind())?;
            // The magnitude starts at the norm of the weight the layer will really see: the
            // residual when the init rewrites the base weight.
            let base_weight =
                if cfg.init_lora_weights.rewrites_base() { weight.f_sub(&delta)? } else { weight };
            let dora = DoraMagnitude::new(&base_weight, &delta)?;
            if cfg.init_lora_weights.rewrites_base() {
                // The original W is the merged weight of (residual, adapter): let
                // `unmerged_weight(W)` return the residual (see INIT_REWRITES_BASE).
                dora.remember_merge_norm(dora.magnitude.f_detach_copy()?);
            }
            layer.variant = Variant::Dora(dora);
        }
        Ok(layer)
    }

    /// `scale · B·A` `[out, in]`, detached.
    pub fn delta_weight(&self) -> PluginResult<Tensor> {
        Ok(tch::no_grad(|| self.b.f_matmul(&self.a))?.f_detach()? * self.scaling)
    }

    /// Whether the plain update runs in the base output's dtype `kind`: a half-precision
    /// base over fp32 adapters, as peft under bf16/fp16 autocast (its `F.linear` casts the
    /// fp32 adapter weights to the autocast dtype). DoRA keeps its fp32 path (its weight
    /// norm is fp32 in peft too).
    fn computes_in(&self, kind: Kind) -> bool {
        matches!(kind, Kind::Half | Kind::BFloat16) && self.a.kind() != kind
    }

    /// `base_out + scale · (x Aᵀ) Bᵀ` in `base_out`'s dtype: A and B cast from their fp32
    /// master copies (gradients flow back through the casts and stay fp32), the second
    /// product and the sum in one `addmm` over the flattened leading dims. The scale is
    /// folded into B before its cast (tch binds `addmm` without `alpha`), which rounds
    /// `scale · B` once instead of rounding `(x Aᵀ) Bᵀ` and its scaled copy.
    fn add_low_precision(
        &self,
        x: &Tensor,
        base_out: &Tensor,
        dropped: bool,
    ) -> PluginResult<Tensor> {
        let kind = base_out.kind();
        let x = x.f_to_kind(kind)?;
        let x = if dropped { x.f_dropout(self.dropout, true)? } else { x };
        let (r, out) = (self.a.size()[0], self.b.size()[0]);
        let xa = x.f_linear::<Tensor>(&self.a.f_to_kind(kind)?, None)?.f_reshape([-1, r])?;
        let scaled_bt = self.b.f_mul_scalar(self.scaling)?.f_to_kind(kind)?.f_tr()?;
        let y = base_out.f_reshape([-1, out])?.f_addmm(&xa, &scaled_bt)?;
        Ok(y.f_reshape(base_out.size())?)
    }

    fn named_tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v = vec![(LORA_A, &self.a), (LORA_B, &self.b)];
        if let Variant::Dora(d) = &self.variant {
            v.push((LORA_MAGNITUDE, &d.magnitude));
        }
        v
    }
}

impl AdapterLayer for LoraLayer {
    fn forward(&self, x: &Tensor, base: &dyn BaseLinear, train: bool) -> PluginResult<Tensor> {
        let result = base.forward(x)?;
        let out_kind = result.kind();
        let dropped = train && self.dropout > 0.0;
        if matches!(self.variant, Variant::Plain) && self.computes_in(out_kind) {
            return self.add_low_precision(x, &result, dropped);
        }
        let x = x.f_to_kind(self.a.kind())?;
        let x = if dropped { x.f_dropout(self.dropout, true)? } else { x };
        let lora_result = x.f_linear::<Tensor>(&self.a, None)?.f_linear::<Tensor>(&self.b, None)?;
        let y = match &self.variant {
            Variant::Plain => result.f_add(&(lora_result * self.scaling))?,
            Variant::Dora(dora) => {
                let lora_weight = tch::no_grad(|| self.b.f_matmul(&self.a))?;
                let base_result = if dropped { None } else { Some(result.shallow_clone()) };
                let extra = dora.forward(
                    &x,
                    &lora_result,
                    &base.weight()?,
                    base.bias()?,
                    base_result,
                    &lora_weight,
                    self.scaling,
                )?;
                result.f_add(&extra)?
            }
        };
        Ok(y.f_to_kind(out_kind)?)
    }

    fn parameters(&self) -> PluginResult<Vec<TrainParam>> {
        // LoRA+ speeds up B; peft's LoRA+ optimizer puts every 1-D parameter (DoRA's
        // magnitude) in B's group too.
        Ok(self
            .named_tensors()
            .into_iter()
            .map(|(name, t)| {
                let mut p = TrainParam::new(name, t.shallow_clone());
                if name != LORA_A {
                    p.lr_scale = self.b_lr_scale;
                }
                p
            })
            .collect())
    }

    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        self.named_tensors()
            .into_iter()
            .map(|(name, t)| Ok((name.to_string(), t.f_detach_copy()?)))
            .collect()
    }

    fn load_state_dict(&self, tensors: Vec<(String, Tensor)>) -> PluginResult<()> {
        let live = self.named_tensors();
        let expected = || live.iter().map(|(n, _)| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        let mut seen = Vec::new();
        for (name, t) in &tensors {
            let Some((_, dst)) = live.iter().find(|(n, _)| n == name) else {
                return Err(PluginError::invalid(format!(
                    "unexpected tensor `{name}` in LoRA state (expected {})",
                    expected()
                )));
            };
            if dst.size() != t.size() {
                return Err(PluginError::invalid(format!(
                    "`{name}`: shape {:?}, expected {:?}",
                    t.size(),
                    dst.size()
                )));
            }
            seen.push(name.as_str());
        }
        let missing: Vec<_> =
            live.iter().filter(|(n, _)| !seen.contains(n)).map(|(n, _)| format!("`{n}`")).collect();
        if !missing.is_empty() {
            return Err(PluginError::invalid(format!(
                "LoRA state lacks {} (expected {})",
                missing.join(", "),
                expected()
            )));
        }
        tch::no_grad(|| -> PluginResult<()> {
            for (name, t) in &tensors {
                let (_, dst) = live.iter().find(|(n, _)| n == name).expect("checked above");
                dst.shallow_clone().f_copy_(t)?;
            }
            Ok(())
        })
    }

    fn merged_weight(&self, base_weight: &Tensor) -> PluginResult<Tensor> {
        let delta = self.delta_weight()?;
        let merged = match &self.variant {
            Variant::Plain => tch::no_grad(|| base_weight.f_add(&delta))?,
            Variant::Dora(dora) => dora.merge(&base_weight.f_to_kind(delta.kind())?, &delta)?,
        };
        Ok(merged.f_to_kind(base_weight.kind())?)
    }

    fn unmerged_weight(&self, merged_weight: &Tensor) -> PluginResult<Tensor> {
        if let Some(q) =
            self.loftq_base.lock().map_err(|_| PluginError::runtime("LoftQ state poisoned"))?.take()
        {
            return Ok(q.f_to_kind(merged_weight.kind())?);
        }
        let delta = self.delta_weight()?;
        let unmerged = match &self.variant {
            Variant::Plain => tch::no_grad(|| merged_weight.f_sub(&delta))?,
            Variant::Dora(dora) => dora.unmerge(&merged_weight.f_to_kind(delta.kind())?, &delta)?,
        };
        Ok(unmerged.f_to_kind(merged_weight.kind())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    use ferrotune_plugin_api::kinds::adapter::DenseLinear as Base;

    fn base(out: i64, inp: i64) -> Base {
        let o = (Kind::Float, Device::Cpu);
        Base { w: Tensor::randn([out, inp], o), b: Some(Tensor::randn([out], o)) }
    }

    /// Row norms `‖W‖` (norm over the input dim), written out independently of `dora.rs`.
    fn row_norms(w: &Tensor) -> Tensor {
        w.square().sum_dim_intlist(1, false, Kind::Float).sqrt()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    fn layer(json: &str, base: &Base) -> LoraLayer {
        LoraLayer::new(&LoraConfig::from_json(json).unwrap(), "layer", base).unwrap()
    }

    /// A layer that reports its shape and refuses to hand out its weight: what `new` may touch
    /// before it has checked `r`.
    struct ShapeOnly(i64, i64);

    impl BaseLinear for ShapeOnly {
        fn name(&self) -> PluginResult<String> {
            Ok("layer".into())
        }
        fn shape(&self) -> PluginResult<(i64, i64)> {
            Ok((self.0, self.1))
        }
        fn forward(&self, _: &Tensor) -> PluginResult<Tensor> {
            Err(PluginError::runtime("forward called before r was checked"))
        }
        fn weight(&self) -> PluginResult<Tensor> {
            Err(PluginError::runtime("weight read before r was checked"))
        }
        fn bias(&self) -> PluginResult<Option<Tensor>> {
            Ok(None)
        }
    }

    #[test]
    fn a_rank_beyond_the_layer_is_refused_by_name_before_anything_is_allocated() {
        for (json, fits) in [
            (r#"{"r": 1000000000}"#, false),
            (r#"{"r": 7}"#, false),
            (r#"{"r": 6, "init_lora_weights": "gaussian"}"#, true),
        ] {
            let cfg = LoraConfig::from_json(json).unwrap();
            let e = LoraLayer::new(&cfg, "model.layers.0.mlp.down_proj", &ShapeOnly(6, 9))
                .err()
                .unwrap();
            if fits {
                assert!(e.message().contains("weight read before r was checked"), "{json}: {e}");
            } else {
                assert_eq!(e.code, ferrotune_plugin_api::ErrorCode::CONFIG, "{json}");
                assert!(
                    e.message().contains("`r`")
                        && e.message().contains("`model.layers.0.mlp.down_proj` ([6, 9])")
                        && e.message().contains("min(out, in) = 6"),
                    "{json}: {e}"
                );
            }
        }
        assert_eq!(layer(r#"{"r": 5}"#, &base(5, 8)).state_dict().unwrap()[1].1.size(), [5, 5]);
    }

    /// Gives B (and the magnitude) non-trivial values, as after some training.
    fn perturb(l: &LoraLayer) {
        let sd: Vec<_> = l
            .state_dict()
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, &t + t.randn_like() * 0.3))
            .collect();
        l.load_state_dict(sd).unwrap();
    }

    #[test]
    fn forward_equals_the_closed_form_and_the_merged_weight() {
        tch::manual_seed(10);
        let base = base(6, 5);
        let l = layer(r#"{"r": 2, "lora_alpha": 6}"#, &base);
        let x = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
        // B = 0 at init: the adapted layer is the base layer
        assert_eq!(max_diff(&l.forward(&x, &base, true).unwrap(), &base.forward(&x).unwrap()), 0.0);
        perturb(&l);
        let y = l.forward(&x, &base, false).unwrap();
        let expected =
            x.linear(&base.w, base.b.as_ref()) + x.matmul(&l.a.tr()).matmul(&l.b.tr()) * 3.0;
        assert!(max_diff(&y, &expected) < 1e-5);
        let merged = l.merged_weight(&base.w).unwrap();
        assert!(max_diff(&y, &x.linear(&merged, base.b.as_ref())) < 1e-5);
        assert!(max_diff(&l.unmerged_weight(&merged).unwrap(), &base.w) < 1e-6);
    }

    #[test]
    fn dora_starts_at_the_base_layer_and_merges_to_its_forward() {
        tch::manual_seed(11);
        let base = base(6, 5);
        let l = layer(r#"{"r": 2, "lora_alpha": 4, "use_dora": true}"#, &base);
        let Variant::Dora(d) = &l.variant else { panic!("DoRA expected") };
        assert!(
            max_diff(&d.magnitude, &row_norms(&base.w)) < 1e-6,
            "m starts at the row norms of W"
        );
        let x = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
        assert!(max_diff(&l.forward(&x, &base, false).unwrap(), &base.forward(&x).unwrap()) < 1e-5);
        assert!(l.unmerged_weight(&base.w).is_err(), "unmerge before merge has no norm to use");
        perturb(&l);
        let y = l.forward(&x, &base, false).unwrap();
        let merged = l.merged_weight(&base.w).unwrap();
        // closed form: rows of the merged weight have norm m
        assert!(max_diff(&row_norms(&merged), &d.magnitude.abs()) < 1e-5);
        assert!(max_diff(&y, &x.linear(&merged, base.b.as_ref())) < 1e-5);
        assert!(max_diff(&l.unmerged_weight(&merged).unwrap(), &base.w) < 1e-5);
        assert!(!l.parameters().unwrap().is_empty());
    }

    #[test]
    fn dropout_touches_only_the_lora_input_and_only_in_training() {
        tch::manual_seed(12);
        let base = base(6, 5);
        let l = layer(r#"{"r": 2, "lora_dropout": 0.5}"#, &base);
        let x = Tensor::randn([64, 5], (Kind::Float, Device::Cpu));
        // B = 0: whatever dropout does to the LoRA input, the base path is untouched
        assert_eq!(max_diff(&l.forward(&x, &base, true).unwrap(), &base.forward(&x).unwrap()), 0.0);
        perturb(&l);
        let eval1 = l.forward(&x, &base, false).unwrap();
        let eval2 = l.forward(&x, &base, false).unwrap();
        assert_eq!(max_diff(&eval1, &eval2), 0.0);
        let train = l.forward(&x, &base, true).unwrap();
        assert!(max_diff(&train, &eval1) > 1e-3, "dropout is on in training");
    }

    #[test]
    fn parameters_carry_peft_names_and_loraplus_scales() {
        tch::manual_seed(13);
        let base = base(6, 5);
        let l = layer(r#"{"r": 2, "use_dora": true, "loraplus_lr_ratio": 16}"#, &base);
        let p: Vec<_> = l
            .parameters()
            .unwrap()
            .into_iter()
            .map(|p| (p.name, p.lr_scale, p.tensor.requires_grad()))
            .collect();
        assert_eq!(
            p,
            vec![
                ("lora_A.weight".to_string(), 1.0, true),
                ("lora_B.weight".to_string(), 16.0, true),
                ("lora_magnitude_vector".to_string(), 16.0, true)
            ]
        );
        let sd: Vec<_> = l.state_dict().unwrap().into_iter().map(|(n, t)| (n, t.size())).collect();
        assert_eq!(
            sd,
            vec![
                ("lora_A.weight".into(), vec![2, 5]),
                ("lora_B.weight".into(), vec![6, 2]),
                ("lora_magnitude_vector".into(), vec![6])
            ]
        );
    }

    #[test]
    fn load_state_dict_names_the_key() {
        tch::manual_seed(14);
        let base = base(6, 5);
        let l = layer(r#"{"r": 2}"#, &base);
        let o = (Kind::Float, Device::Cpu);
        let good = || {
            vec![
                ("lora_A.weight".to_string(), Tensor::ones([2, 5], o)),
                ("lora_B.weight".to_string(), Tensor::ones([6, 2], o)),
            ]
        };
        let mut bad = good();
        bad[1].1 = Tensor::ones([2, 6], o);
        let e = l.load_state_dict(bad).unwrap_err();
        assert!(e.message().contains("`lora_B.weight`") && e.message().contains("[2, 6]"), "{e}");
        let mut bad = good();
        bad.push(("lora_magnitude_vector".into(), Tensor::ones([6], o)));
        assert!(l.load_state_dict(bad).unwrap_err().message().contains("`lora_magnitude_vector`"));
        let mut partial = good();
        partial.truncate(1);
        let e = l.load_state_dict(partial).unwrap_err();
        assert!(e.message().contains("lacks `lora_B.weight`"), "{e}");
        l.load_state_dict(good()).unwrap();
        assert_eq!(l.b.sum(Kind::Float).double_value(&[]), 12.0);
    }

    #[test]
    fn half_precision_bases_get_float32_adapters() {
        tch::manual_seed(15);
        let base = Base { w: Tensor::randn([6, 5], (Kind::BFloat16, Device::Cpu)), b: None };
        let l = layer(r#"{"r": 2}"#, &base);
        assert_eq!(l.a.kind(), Kind::Float);
        perturb(&l);
        let x = Tensor::randn([3, 5], (Kind::BFloat16, Device::Cpu));
        assert_eq!(l.forward(&x, &base, false).unwrap().kind(), Kind::BFloat16);
        assert_eq!(l.merged_weight(&base.w).unwrap().kind(), Kind::BFloat16);
    }

    /// A bf16 base computes the update in bf16 (the output is bf16) from the fp32 A and B,
    /// within bf16 rounding of the same layer computed in fp32, and the gradients reaching
    /// A and B are fp32 and match the fp32 ones to bf16 precision.
    #[test]
    fn bf16_base_computes_in_bf16_with_fp32_adapters() {
        tch::manual_seed(16);
        let fp32 = base(6, 5);
        let bf16 = Base {
            w: fp32.w.to_kind(Kind::BFloat16),
            b: fp32.b.as_ref().map(|b| b.to_kind(Kind::BFloat16)),
        };
        let l = layer(r#"{"r": 2, "lora_alpha": 6}"#, &bf16);
        perturb(&l);
        // the same fp32 computation, from the bf16-rounded base weights
        let exact = Base {
            w: bf16.w.to_kind(Kind::Float),
            b: bf16.b.as_ref().map(|b| b.to_kind(Kind::Float)),
        };
        let x = Tensor::randn([2, 3, 5], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let grads = |y: &Tensor| {
            l.a.shallow_clone().zero_grad();
            l.b.shallow_clone().zero_grad();
            (y.to_kind(Kind::Float) * y.to_kind(Kind::Float).ones_like().cumsum(-1, Kind::Float))
                .sum(Kind::Float)
                .backward();
            (l.a.grad().copy(), l.b.grad().copy())
        };
        let y = l.forward(&x, &bf16, true).unwrap();
        assert_eq!(y.kind(), Kind::BFloat16);
        assert_eq!(y.size(), [2, 3, 6]);
        let (ga, gb) = grads(&y);
        assert_eq!((ga.kind(), gb.kind()), (Kind::Float, Kind::Float));
        let want = l.forward(&x.to_kind(Kind::Float), &exact, true).unwrap();
        assert_eq!(want.kind(), Kind::Float, "the fp32 path is unchanged");
        let (wa, wb) = grads(&want);
        // bf16 keeps 8 significant bits: a few roundings of values of size ~|y| each
        let close = |got: &Tensor, want: &Tensor| {
            let tol = 3.0 * 2f64.powi(-8) * want.abs().max().double_value(&[]);
            let d = max_diff(&got.to_kind(Kind::Float), want);
            assert!(d <= tol && d > 0.0, "max diff {d:e}, bf16 tolerance {tol:e}");
        };
        close(&y, &want);
        close(&ga, &wa);
        close(&gb, &wb);
    }
}
