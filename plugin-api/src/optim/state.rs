//! The optimizer state a memory plugin keeps per parameter (AdamW's moments and, for a
//! bf16/f16 parameter, its fp32 master copy) and its state dict: the entries a checkpoint
//! holds, and the checks that refuse a checkpoint before any of it is loaded.
use tch::{Device, Kind, Tensor};

use super::{state_kind, AdamWMoments};
use crate::{PluginError, PluginResult};

/// One tensor of an [`AdamWState`]; its state-dict name is `<param>.<suffix>`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StateEntry {
    ExpAvg,
    ExpAvgSq,
    /// With amsgrad only.
    MaxExpAvgSq,
    /// bf16/f16 parameters only.
    Master,
}

impl StateEntry {
    /// In state-dict order.
    pub const ALL: [Self; 4] = [Self::ExpAvg, Self::ExpAvgSq, Self::MaxExpAvgSq, Self::Master];

    pub fn suffix(self) -> &'static str {
        match self {
            Self::ExpAvg => "exp_avg",
            Self::ExpAvgSq => "exp_avg_sq",
            Self::MaxExpAvgSq => "max_exp_avg_sq",
            Self::Master => "master",
        }
    }
}

/// Whether a parameter of dtype `k` keeps an fp32 master copy: every dtype whose optimizer
/// state is wider than itself ([`state_kind`]), i.e. bf16 and f16. fp32 and fp64 parameters
/// are updated in place.
pub fn needs_master(k: Kind) -> bool {
    state_kind(k) != k
}

/// One parameter's optimizer state, all of it in [`state_kind`] on the state's device (the
/// parameter's, or the CPU under optimizer offload).
pub struct AdamWState {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub max_exp_avg_sq: Option<Tensor>,
    /// The fp32 master weights of a bf16/f16 parameter ([`needs_master`]), as DeepSpeed's bf16
    /// mode keeps them: the update runs on the master, and the parameter receives it rounded,
    /// so updates smaller than the parameter's precision accumulate instead of being lost.
    pub master: Option<Tensor>,
}

impl AdamWState {
    /// Zero moments (and `max_exp_avg_sq` with amsgrad) of `param`'s shape on `device`; the
    /// master, where the parameter needs one, is a contiguous fp32 copy of its current values.
    pub fn new(param: &Tensor, amsgrad: bool, device: Device) -> PluginResult<Self> {
        let kind = state_kind(param.kind());
        let zeros = || Tensor::f_zeros(param.size(), (kind, device));
        let master = if needs_master(param.kind()) {
            let mut m = Tensor::f_empty(param.size(), (kind, device))?;
            tch::no_grad(|| m.f_copy_(param))?;
            Some(m)
        } else {
            None
        };
        Ok(Self {
            exp_avg: zeros()?,
            exp_avg_sq: zeros()?,
            max_exp_avg_sq: if amsgrad { Some(zeros()?) } else { None },
            master,
        })
    }

    pub fn get(&self, e: StateEntry) -> Option<&Tensor> {
        match e {
            StateEntry::ExpAvg => Some(&self.exp_avg),
            StateEntry::ExpAvgSq => Some(&self.exp_avg_sq),
            StateEntry::MaxExpAvgSq => self.max_exp_avg_sq.as_ref(),
            StateEntry::Master => self.master.as_ref(),
        }
    }

    /// The state as the step borrows it.
    pub fn moments(&mut self) -> AdamWMoments<'_> {
        AdamWMoments {
            exp_avg: &mut self.exp_avg,
            exp_avg_sq: &mut self.exp_avg_sq,
            max_exp_avg_sq: self.max_exp_avg_sq.as_mut(),
            master: self.master.as_mut(),
        }
    }

    /// Bytes held, masters included.
    pub fn bytes(&self) -> usize {
        StateEntry::ALL
            .into_iter()
            .filter_map(|e| self.get(e))
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }

    /// `(<param>.<suffix>, tensor)` of every tensor held, in [`StateEntry::ALL`] order. The
    /// tensors share storage with the live state (no copy: the state of a full fine-tuning run
    /// is 12 bytes per parameter): a caller writes or reads them before the next step.
    pub fn named(&self, param: &str) -> PluginResult<Vec<(String, Tensor)>> {
        StateEntry::ALL
            .into_iter()
            .filter_map(|e| Some((e, self.get(e)?)))
            .map(|(e, t)| Ok((format!("{param}.{}", e.suffix()), t.f_detach()?)))
            .collect()
    }
}

/// One parameter in [`load_state`]: its name, its shape, and the state this plugin keeps for
/// it (`None`: none on this rank).
pub struct StateSlot<'a> {
    pub name: &'a str,
    pub shape: Vec<i64>,
    pub state: Option<&'a mut AdamWState>,
}

/// The value of a state dict's `step`: a non-negative integer scalar.
pub fn parse_step(t: &Tensor) -> PluginResult<i64> {
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
    Ok(v as i64)
}

/// Loads a state dict of `step` and `<param>.<suffix>` entries into `slots`, returning the
/// step. Checked first, so that a refused checkpoint leaves the state untouched: every entry
/// names a tensor some slot's state holds (else the error `unknown(name)`), has the
/// parameter's shape, is floating point and appears once; every tensor held has an entry
/// (else an error naming it, followed by `whose`, e.g. " (rank 1 of 2)"). Values are
/// converted to the state's dtype and device. The parameters themselves are not touched:
/// the checkpoint's weights are the host's to load (they equal the masters rounded).
pub fn load_state(
    state: Vec<(String, Tensor)>,
    slots: &mut [StateSlot<'_>],
    unknown: &dyn Fn(&str) -> PluginError,
    whose: &str,
) -> PluginResult<i64> {
    let mut step = None;
    let mut found: Vec<[Option<Tensor>; 4]> = slots.iter().map(|_| Default::default()).collect();
    for (name, t) in state {
        if name == "step" {
            step = Some(parse_step(&t)?);
            continue;
        }
        let target = slots.iter().enumerate().find_map(|(i, s)| {
            let rest = name.strip_prefix(s.name)?.strip_prefix('.')?;
            let e = StateEntry::ALL.into_iter().find(|e| e.suffix() == rest)?;
            s.state.as_ref()?.get(e).map(|_| (i, e))
        });
        let Some((i, e)) = target else { return Err(unknown(&name)) };
        let expected = &slots[i].shape;
        if t.size() != *expected {
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
        if found[i][e as usize].replace(t).is_some() {
            return Err(PluginError::invalid(format!("optimizer state `{name}` appears twice")));
        }
    }
    let step = step.ok_or_else(|| PluginError::invalid("optimizer state has no `step`"))?;
    for (s, f) in slots.iter().zip(&found) {
        let Some(state) = s.state.as_ref() else { continue };
        for e in StateEntry::ALL {
            if state.get(e).is_some() && f[e as usize].is_none() {
                let what = if e == StateEntry::Master {
                    ": the fp32 master weights of this low-precision parameter (a checkpoint \
                     written before they were kept cannot resume it)"
                } else {
                    ""
                };
                return Err(PluginError::invalid(format!(
                    "optimizer state has no `{}.{}`{whose}{what}",
                    s.name,
                    e.suffix()
                )));
            }
        }
    }
    tch::no_grad(|| -> PluginResult<()> {
        for (s, f) in slots.iter_mut().zip(found) {
            let Some(state) = s.state.as_deref() else { continue };
            for (e, src) in StateEntry::ALL.into_iter().zip(f) {
                if let (Some(dst), Some(src)) = (state.get(e), src) {
                    dst.shallow_clone().f_copy_(&src)?;
                }
            }
        }
        Ok(())
    })?;
    Ok(step)
}
