//! One adapted linear layer, peft's `ia3.Linear`: a learned vector `ia3_l` scales the output
//! (`base(x) · l`, `l` `[out, 1]`) or, for a feed-forward layer, the input (`base(x · l)`,
//! `l` `[1, in]`). The state-dict name is peft's (`ia3_l`).
use ferrotune_plugin_api::{AdapterLayer, BaseLinear, PluginError, PluginResult, TrainParam};
use tch::{Kind, Tensor};

/// The scaling vector's state-dict name.
pub const IA3_L: &str = "ia3_l";

pub struct Ia3Layer {
    module: String,
    l: Tensor,
    feedforward: bool,
}

/// float32 vectors for a half-precision base (peft's `autocast_adapter_dtype=True`).
fn adapter_kind(base: Kind) -> Kind {
    match base {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        k => k,
    }
}

impl Ia3Layer {
    /// The adapter of `base` (`module` names it in errors): `l` starts at ones
    /// (`init_ones`, peft's `init_ia3_weights=True`) or standard normal.
    pub fn new(
        module: &str,
        base: &dyn BaseLinear,
        feedforward: bool,
        init_ones: bool,
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
        let shape = if feedforward { [1, inp] } else { [out, 1] };
        let opts = (adapter_kind(weight.kind()), weight.device());
        let l =
            if init_ones { Tensor::f_ones(shape, opts)? } else { Tensor::f_randn(shape, opts)? };
        Ok(Self { module: module.to_string(), l: l.set_requires_grad(true), feedforward })
    }

    /// The weight scaled along its input (feed-forward) or output axis, peft's merge
    /// (`invert`: peft's unmerge, a division by `l + 1e-8`).
    fn scale_weight(&self, w: &Tensor, invert: bool) -> PluginResult<Tensor> {
        tch::no_grad(|| -> PluginResult<Tensor> {
            let l = self.l.f_detach()?.f_to_kind(Kind::Float)?;
            let w32 = w.f_to_kind(Kind::Float)?;
            let y = if invert { w32.f_div(&l.f_add_scalar(1e-8)?)? } else { w32.f_mul(&l)? };
            Ok(y.f_to_kind(w.kind())?)
        })
    }
}

impl AdapterLayer for Ia3Layer {
    fn forward(&self, x: &Tensor, base: &dyn BaseLinear, _train: bool) -> PluginResult<Tensor> {
        let l = self.l.f_flatten(0, -1)?;
        if self.feedforward {
            let xk = x.kind();
            base.forward(&x.f_to_kind(l.kind())?.f_mul(&l)?.f_to_kind(xk)?)
        } else {
            let y = base.forward(x)?;
            let yk = y.kind();
            Ok(y.f_mul(&l)?.f_to_kind(yk)?)
        }
    }

    fn parameters(&self) -> PluginResult<Vec<TrainParam>> {
        Ok(vec![TrainParam::new(IA3_L, self.l.shallow_clone())])
    }

    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        Ok(vec![(IA3_L.to_string(), self.l.f_detach_copy()?)])
    }

    fn load_state_dict(&self, tensors: Vec<(String, Tensor)>) -> PluginResult<()> {
        let mut found = None;
        for (name, t) in tensors {
            if name != IA3_L {
                return Err(PluginError::invalid(format!(
                    "unexpected tensor `{name}` in the IA³ state of `{}` (expected `{IA3_L}`)",
                    self.module
                )));
            }
            if t.size() != self.l.size() {
                return Err(PluginError::invalid(format!(
                    "`{}.{IA3_L}`: shape {:?}, expected {:?} ({})",
                    self.module,
                    t.size(),
                    self.l.size(),
                    if self.feedforward {
                        "a feed-forward layer scales its input"
                    } else {
                        "the layer scales its output"
                    }
                )));
            }
            found = Some(t);
        }
        let Some(t) = found else {
            return Err(PluginError::invalid(format!(
                "the IA³ state of `{}` lacks `{IA3_L}`",
                self.module
            )));
        };
        tch::no_grad(|| self.l.shallow_clone().f_copy_(&t))?;
        Ok(())
    }

    fn merged_weight(&self, base_weight: &Tensor) -> PluginResult<Tensor> {
        self.scale_weight(base_weight, false)
    }

    fn unmerged_weight(&self, merged_weight: &Tensor) -> PluginResult<Tensor> {
        self.scale_weight(merged_weight, true)
    }

    /// peft's merge of an output scaling scales the bias too (`bias · l`); an input scaling
    /// leaves it alone.
    fn merged_bias(&self, base_bias: Option<&Tensor>) -> PluginResult<Option<Tensor>> {
        match base_bias {
            Some(b) if !self.feedforward => tch::no_grad(|| -> PluginResult<Option<Tensor>> {
                let l = self.l.f_detach()?.f_to_kind(Kind::Float)?.f_reshape(b.size())?;
                Ok(Some(b.f_to_kind(Kind::Float)?.f_mul(&l)?.f_to_kind(b.kind())?))
            }),
            other => Ok(other.map(Tensor::shallow_clone)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    use ferrotune_plugin_api::kinds::adapter::DenseLinear as Base;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn forward_is_peft_s_closed_form_and_merges() {
        tch::manual_seed(3);
        let o = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([2, 3, 5], o);
        for feedforward in [false, true] {
            let base = Base { w: Tensor::randn([6, 5], o), b: None };
            let l = Ia3Layer::new("layer", &base, feedforward, true).unwrap();
            assert_eq!(l.forward(&x, &base, true).unwrap().size(), [2, 3, 6]);
            assert_eq!(
                max_diff(&l.forward(&x, &base, false).unwrap(), &base.forward(&x).unwrap()),
                0.0,
                "ones: the base layer"
            );
            let v =
                Ia3Layer::new("layer", &base, feedforward, false).unwrap().state_dict().unwrap();
            assert_eq!(v[0].1.size(), if feedforward { vec![1, 5] } else { vec![6, 1] });
            let want = if feedforward {
                (&x * v[0].1.flatten(0, -1)).linear::<Tensor>(&base.w, None)
            } else {
                x.linear::<Tensor>(&base.w, None) * v[0].1.flatten(0, -1)
            };
            l.load_state_dict(v).unwrap();
            let y = l.forward(&x, &base, false).unwrap();
            assert!(max_diff(&y, &want) < 1e-6);
            let merged = l.merged_weight(&base.w).unwrap();
            assert!(max_diff(&y, &x.linear::<Tensor>(&merged, None)) < 1e-5);
            assert!(max_diff(&l.unmerged_weight(&merged).unwrap(), &base.w) < 1e-4);
        }
    }

    #[test]
    fn a_bias_merges_as_peft_s_and_bad_state_is_refused_by_name() {
        let o = (Kind::Float, Device::Cpu);
        let base = Base { w: Tensor::randn([6, 5], o), b: Some(Tensor::randn([6], o)) };
        let x = Tensor::randn([3, 5], o);
        for feedforward in [false, true] {
            let l = Ia3Layer::new("m.q_proj", &base, feedforward, false).unwrap();
            let (w, b) = (
                l.merged_weight(&base.w).unwrap(),
                l.merged_bias(base.b.as_ref()).unwrap().unwrap(),
            );
            let merged = x.linear(&w, Some(&b));
            assert!(max_diff(&merged, &l.forward(&x, &base, false).unwrap()) < 1e-5);
            assert_eq!(max_diff(&b, base.b.as_ref().unwrap()) == 0.0, feedforward, "{feedforward}");
        }
        let l = Ia3Layer::new("m.q_proj", &base, false, true).unwrap();
        let e = l.load_state_dict(vec![(IA3_L.into(), Tensor::ones([1, 5], o))]).unwrap_err();
        assert!(e.message().contains("[1, 5]") && e.message().contains("m.q_proj"), "{e}");
        let e =
            l.load_state_dict(vec![("lora_A.weight".into(), Tensor::ones([6, 1], o))]).unwrap_err();
        assert!(e.message().contains("`lora_A.weight`"), "{e}");
        assert!(l.load_state_dict(vec![]).unwrap_err().message().contains("lacks"));
    }
}
