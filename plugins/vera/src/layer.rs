//! One adapted linear layer, peft's `vera.Linear`:
//! `y = base(x) + λ_b · (λ_d · (dropout(x) A[:, :in]ᵀ)) B[:out, :]ᵀ`, with `A` / `B` the
//! adapter's shared frozen projections ([`Projections`]) and `λ_b` `[out]`, `λ_d` `[r]` the
//! layer's trained vectors. State-dict names are peft's (`vera_lambda_b`, `vera_lambda_d`; the
//! projections, the method's own tensors, `base_model.vera_A` / `base_model.vera_B`).
use std::sync::{Arc, Mutex, MutexGuard};

use ferrotune_plugin_api::{AdapterLayer, BaseLinear, PluginError, PluginResult, TrainParam};
use tch::{Device, Kind, Tensor};

use crate::config::VeraConfig;
use crate::projection::projections;

pub const LAMBDA_B: &str = "vera_lambda_b";
pub const LAMBDA_D: &str = "vera_lambda_d";
/// The shared projections' keys, peft's (`base_model.` + the tuner's buffer name).
pub const VERA_A: &str = "base_model.vera_A";
pub const VERA_B: &str = "base_model.vera_B";

/// float32 vectors for a half-precision base (peft's `autocast_adapter_dtype=True`).
fn adapter_kind(base: Kind) -> Kind {
    match base {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        k => k,
    }
}

/// The adapter's frozen projections, one pair for all its layers (peft's `vera_A` / `vera_B`
/// buffers): `A` `[r, largest in]`, `B` `[largest out, r]` over the targeted layers (made in
/// [`Projections::begin`], before any layer is adapted), each layer reading its top-left slice.
/// The method's own tensors: saved once (`root_state_dict`), not per layer.
pub struct Projections {
    seed: i64,
    r: i64,
    pair: Mutex<Option<Pair>>,
}

struct Pair {
    a: Tensor,
    b: Tensor,
}

impl Projections {
    pub fn new(cfg: &VeraConfig) -> Self {
        Self { seed: cfg.projection_prng_key, r: cfg.r, pair: Mutex::new(None) }
    }

    fn lock(&self) -> PluginResult<MutexGuard<'_, Option<Pair>>> {
        self.pair
            .lock()
            .map_err(|_| PluginError::runtime("VeRA projections: a thread panicked holding them"))
    }

    /// Generates the pair for the targeted layers `[(out, in)]` (peft's `_find_dim` then
    /// `_init_vera_A_vera_B`).
    pub fn begin(&self, layers: &[(i64, i64)]) -> PluginResult<()> {
        let out = layers.iter().map(|l| l.0).max();
        let inp = layers.iter().map(|l| l.1).max();
        let (Some(out), Some(inp)) = (out, inp) else {
            return Err(PluginError::config(
                "target_modules",
                "matches no linear layer of this model: VeRA sizes its projections to the targeted layers",
            ));
        };
        let (a, b) = projections(self.seed, self.r, out, inp);
        *self.lock()? = Some(Pair { a, b });
        Ok(())
    }

    /// Checks that the pair covers a layer `[out, inp]` and lives on `device`.
    fn cover(&self, module: &str, out: i64, inp: i64, device: Device) -> PluginResult<()> {
        let mut guard = self.lock()?;
        let p = guard.as_mut().ok_or_else(|| {
            PluginError::runtime("VeRA: a layer was adapted before the method's begin()")
        })?;
        let (have_out, have_in) = (p.b.size()[0], p.a.size()[1]);
        if out > have_out || inp > have_in {
            return Err(PluginError::invalid(format!(
                "`{module}` ([{out}, {inp}]) is wider than the layers the projections were made for ([{have_out}, {have_in}])"
            )));
        }
        if p.a.device() != device {
            p.a = p.a.f_to_device(device)?;
            p.b = p.b.f_to_device(device)?;
        }
        Ok(())
    }

    /// `(A[:, :inp], B[:out, :])` in `kind` on `device`.
    fn slices(
        &self,
        out: i64,
        inp: i64,
        kind: Kind,
        device: Device,
    ) -> PluginResult<(Tensor, Tensor)> {
        let guard = self.lock()?;
        let p = guard.as_ref().ok_or_else(|| PluginError::runtime("VeRA: no projections"))?;
        Ok((
            p.a.f_narrow(1, 0, inp)?.f_to(device)?.f_to_kind(kind)?,
            p.b.f_narrow(0, 0, out)?.f_to(device)?.f_to_kind(kind)?,
        ))
    }

    /// `base_model.vera_A`, `base_model.vera_B` (detached copies).
    pub fn state(&self) -> PluginResult<Vec<(String, Tensor)>> {
        let guard = self.lock()?;
        let p = guard.as_ref().ok_or_else(|| PluginError::runtime("VeRA: no projections"))?;
        Ok(vec![(VERA_A.into(), p.a.f_detach_copy()?), (VERA_B.into(), p.b.f_detach_copy()?)])
    }

    /// Loads `base_model.vera_A` / `base_model.vera_B` (both, with their shapes).
    pub fn load(&self, tensors: Vec<(String, Tensor)>) -> PluginResult<()> {
        let guard = self.lock()?;
        let p = guard.as_ref().ok_or_else(|| PluginError::runtime("VeRA: no projections"))?;
        for want in [VERA_A, VERA_B] {
            if !tensors.iter().any(|(n, _)| n == want) {
                return Err(PluginError::invalid(format!("the VeRA projections lack `{want}`")));
            }
        }
        for (name, t) in &tensors {
            let dst = match name.as_str() {
                VERA_A => &p.a,
                VERA_B => &p.b,
                other => {
                    return Err(PluginError::invalid(format!(
                        "unexpected tensor `{other}` among the VeRA projections (expected `{VERA_A}`, `{VERA_B}`)"
                    )))
                }
            };
            if t.size() != dst.size() {
                return Err(PluginError::invalid(format!(
                    "`{name}`: shape {:?}, expected {:?} (r = {} and the largest adapted layer's widths)",
                    t.size(),
                    dst.size(),
                    self.r
                )));
            }
            tch::no_grad(|| dst.shallow_clone().f_copy_(t))?;
        }
        Ok(())
    }
}

pub struct VeraLayer {
    module: String,
    out: i64,
    inp: i64,
    lambda_b: Tensor,
    lambda_d: Tensor,
    shared: Arc<Projections>,
    dropout: f64,
}

impl VeraLayer {
    /// The adapter of `base` (`module` names it in errors), its vectors initialised as peft's
    /// `update_layer` does; `shared` grows to cover the layer.
    pub fn new(
        module: &str,
        base: &dyn BaseLinear,
        cfg: &VeraConfig,
        shared: Arc<Projections>,
    ) -> PluginResult<Self> {
        let (out, inp) = base.shape()?;
        let weight = base.weight()?;
        if weight.size() != [out, inp] {
            return Err(PluginError::invalid(format!(
                "`{module}`: base weight has shape {:?}, the layer reports {:?}",
                weight.size(),
                (out, inp)
            )));
        }
        shared.cover(module, out, inp, weight.device())?;
        let opts = (adapter_kind(weight.kind()), weight.device());
        let (lambda_b, lambda_d) = if cfg.init_weights {
            (Tensor::f_zeros([out], opts)?, Tensor::f_full([cfg.r], cfg.d_initial, opts)?)
        } else {
            (Tensor::f_ones([out], opts)?, Tensor::f_randn([cfg.r], opts)?)
        };
        Ok(Self {
            module: module.to_string(),
            out,
            inp,
            lambda_b: lambda_b.set_requires_grad(true),
            lambda_d: lambda_d.set_requires_grad(true),
            shared,
            dropout: cfg.vera_dropout,
        })
    }

    /// peft's `get_delta_weight`: `(λ_b ⊙ B) (λ_d ⊙ A)`, `[out, in]`, in float32.
    fn delta_weight(&self) -> PluginResult<Tensor> {
        let device = self.lambda_b.device();
        let (a, b) = self.shared.slices(self.out, self.inp, Kind::Float, device)?;
        tch::no_grad(|| -> PluginResult<Tensor> {
            let lb = self.lambda_b.f_detach()?.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?;
            let ld = self.lambda_d.f_detach()?.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?;
            Ok(b.f_mul(&lb)?.f_matmul(&a.f_mul(&ld)?)?)
        })
    }

    fn shift_weight(&self, w: &Tensor, sign: f64) -> PluginResult<Tensor> {
        let delta = self.delta_weight()?.f_to_device(w.device())?;
        let y = w.f_to_kind(Kind::Float)?.f_add(&delta.f_mul_scalar(sign)?)?;
        Ok(y.f_to_kind(w.kind())?)
    }
}

impl AdapterLayer for VeraLayer {
    fn forward(&self, x: &Tensor, base: &dyn BaseLinear, train: bool) -> PluginResult<Tensor> {
        let y = base.forward(x)?;
        let kind = self.lambda_d.kind();
        let (a, b) = self.shared.slices(self.out, self.inp, kind, x.device())?;
        let x = x.f_to_kind(kind)?;
        let x = if train && self.dropout > 0.0 { x.f_dropout(self.dropout, true)? } else { x };
        let h = x.f_linear::<Tensor>(&a, None)?.f_mul(&self.lambda_d)?;
        let delta = h.f_linear::<Tensor>(&b, None)?.f_mul(&self.lambda_b)?;
        let yk = y.kind();
        Ok(y.f_add(&delta)?.f_to_kind(yk)?)
    }

    fn parameters(&self) -> PluginResult<Vec<TrainParam>> {
        Ok(vec![
            TrainParam::new(LAMBDA_B, self.lambda_b.shallow_clone()),
            TrainParam::new(LAMBDA_D, self.lambda_d.shallow_clone()),
        ])
    }

    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        Ok(vec![
            (LAMBDA_B.to_string(), self.lambda_b.f_detach_copy()?),
            (LAMBDA_D.to_string(), self.lambda_d.f_detach_copy()?),
        ])
    }

    fn load_state_dict(&self, tensors: Vec<(String, Tensor)>) -> PluginResult<()> {
        for want in [LAMBDA_B, LAMBDA_D] {
            if !tensors.iter().any(|(n, _)| n == want) {
                return Err(PluginError::invalid(format!(
                    "the VeRA state of `{}` lacks `{want}`",
                    self.module
                )));
            }
        }
        for (name, t) in &tensors {
            let (own, what) = match name.as_str() {
                LAMBDA_B => (&self.lambda_b, "the layer's output width"),
                LAMBDA_D => (&self.lambda_d, "r"),
                other => {
                    return Err(PluginError::invalid(format!(
                        "unexpected tensor `{other}` in the VeRA state of `{}` (expected `{LAMBDA_B}`, `{LAMBDA_D}`)",
                        self.module
                    )))
                }
            };
            if t.size() != own.size() {
                return Err(PluginError::invalid(format!(
                    "`{}.{name}`: shape {:?}, expected {:?} ({what})",
                    self.module,
                    t.size(),
                    own.size(),
                )));
            }
            tch::no_grad(|| own.shallow_clone().f_copy_(t))?;
        }
        Ok(())
    }

    fn merged_weight(&self, base_weight: &Tensor) -> PluginResult<Tensor> {
        self.shift_weight(base_weight, 1.0)
    }

    fn unmerged_weight(&self, merged_weight: &Tensor) -> PluginResult<Tensor> {
        self.shift_weight(merged_weight, -1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use ferrotune_plugin_api::kinds::adapter::DenseLinear as Base;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn forward_is_peft_s_closed_form_merges_and_shares_projections() {
        tch::manual_seed(3);
        let o = (Kind::Float, Device::Cpu);
        let cfg = VeraConfig::from_json(r#"{"r": 3, "init_weights": false}"#).unwrap();
        let shared = Arc::new(Projections::new(&cfg));
        let small = Base { w: Tensor::randn([4, 5], o), b: Some(Tensor::randn([4], o)) };
        let wide = Base { w: Tensor::randn([6, 7], o), b: None };
        shared.begin(&[(4, 5), (6, 7)]).unwrap();
        let l = VeraLayer::new("small", &small, &cfg, shared.clone()).unwrap();
        let _ = VeraLayer::new("wide", &wide, &cfg, shared.clone()).unwrap();
        // the projections cover the widest layer and are the generator's for that size
        let (a, b) = projections(0, 3, 6, 7);
        let p = shared.state().unwrap();
        assert!(p[0].1.equal(&a) && p[1].1.equal(&b), "{:?}", p[0].1.size());
        let state = l.state_dict().unwrap();
        assert_eq!(state.len(), 2, "the projections are the method's, not the layer's");
        let x = Tensor::randn([2, 3, 5], o);
        let (lb, ld) = (&state[0].1, &state[1].1);
        let want = small.forward(&x).unwrap()
            + ((x.linear::<Tensor>(&a.narrow(1, 0, 5), None) * ld)
                .linear::<Tensor>(&b.narrow(0, 0, 4), None)
                * lb);
        let y = l.forward(&x, &small, false).unwrap();
        assert!(max_diff(&y, &want) < 1e-6);
        let merged = l.merged_weight(&small.w).unwrap();
        assert!(max_diff(&y, &x.linear(&merged, small.b.as_ref())) < 1e-5, "the bias stays");
        assert!(max_diff(&l.unmerged_weight(&merged).unwrap(), &small.w) < 1e-5);
    }

    #[test]
    fn init_is_peft_s_and_bad_state_is_refused_by_name() {
        let o = (Kind::Float, Device::Cpu);
        let cfg = VeraConfig::from_json(r#"{"r": 3, "d_initial": 0.2}"#).unwrap();
        let base = Base { w: Tensor::randn([4, 5], o), b: None };
        let shared = Arc::new(Projections::new(&cfg));
        let e = VeraLayer::new("m.q_proj", &base, &cfg, shared.clone()).err().unwrap();
        assert!(e.message().contains("begin()"), "{e}");
        shared.begin(&[(4, 5)]).unwrap();
        let l = VeraLayer::new("m.q_proj", &base, &cfg, shared.clone()).unwrap();
        let wide = Base { w: Tensor::randn([4, 6], o), b: None };
        let e = VeraLayer::new("m.wide", &wide, &cfg, shared.clone()).err().unwrap();
        assert!(e.message().contains("`m.wide` ([4, 6])"), "{e}");
        let s = l.state_dict().unwrap();
        assert_eq!(s[0].1.abs().max().double_value(&[]), 0.0, "lambda_b starts at 0");
        assert!((s[1].1.mean(None).double_value(&[]) - 0.2).abs() < 1e-7, "lambda_d at d_initial");
        let x = Tensor::randn([2, 5], o);
        assert_eq!(max_diff(&l.forward(&x, &base, true).unwrap(), &base.forward(&x).unwrap()), 0.0);
        let mut bad = s.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect::<Vec<_>>();
        bad[1].1 = Tensor::ones([4], o);
        let e = l.load_state_dict(bad).unwrap_err();
        assert!(
            e.message().contains("m.q_proj.vera_lambda_d") && e.message().contains("[4]"),
            "{e}"
        );
        let mut bad = shared.state().unwrap();
        bad[0].1 = Tensor::ones([3, 9], o);
        let e = shared.load(bad).unwrap_err();
        assert!(
            e.message().contains("`base_model.vera_A`") && e.message().contains("[3, 9]"),
            "{e}"
        );
        let mut extra = s.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect::<Vec<_>>();
        extra.push(("ia3_l".into(), Tensor::ones([4], o)));
        let e = l.load_state_dict(extra).unwrap_err();
        assert!(e.message().contains("`ia3_l`"), "{e}");
        let mut first_missing = shared.state().unwrap();
        let _ = first_missing.remove(0);
        let e = shared.load(first_missing).unwrap_err();
        assert!(e.message().contains("lack `base_model.vera_A`"), "{e}");
        let e = l.load_state_dict(vec![(LAMBDA_B.into(), s[0].1.copy())]).unwrap_err();
        assert!(e.message().contains("lacks `vera_lambda_d`"), "{e}");
    }
}
