//! Safe wrappers of `csrc/optim.cpp`: libtorch's multi-tensor optimizer kernels, which tch's
//! generator leaves unbound (it skips every `_foreach*` and `_fused_adam*` op).
use std::ffi::{c_char, c_int, CStr};

use tch::{Kind, Tensor};

use crate::{PluginError, PluginResult};

type TensorPtr = *mut torch_sys::C_tensor;

extern "C" {
    fn ferrotune_fused_adamw(
        params: *const TensorPtr,
        grads: *const TensorPtr,
        exp_avgs: *const TensorPtr,
        exp_avg_sqs: *const TensorPtr,
        max_exp_avg_sqs: *const TensorPtr,
        step: TensorPtr,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn ferrotune_foreach_norm(
        ts: *const TensorPtr,
        n: usize,
        dtype: c_int,
        out: *mut TensorPtr,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn ferrotune_foreach_mul_(
        ts: *const TensorPtr,
        n: usize,
        factor: TensorPtr,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn ferrotune_set_grad_none(t: TensorPtr, err: *mut c_char, errlen: usize) -> c_int;
}

/// Runs `call` with an error buffer; a non-zero return becomes a runtime error naming `op`.
fn checked(op: &str, call: impl FnOnce(*mut c_char, usize) -> c_int) -> PluginResult<()> {
    let mut err = [0 as c_char; 1024];
    if call(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the C++ side wrote a NUL-terminated message (snprintf) into `err`.
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
    Err(PluginError::runtime(format!("{op}: {msg}")))
}

fn ptrs(ts: &[&Tensor]) -> Vec<TensorPtr> {
    ts.iter().map(|t| t.as_ptr() as TensorPtr).collect()
}

/// One `torch._fused_adamw_` call: the tensors of one dtype and device (every list as long
/// as `params`; `max_exp_avg_sqs` empty without amsgrad).
pub struct FusedAdamW<'a> {
    pub params: Vec<&'a Tensor>,
    pub grads: Vec<&'a Tensor>,
    pub exp_avgs: Vec<&'a Tensor>,
    pub exp_avg_sqs: Vec<&'a Tensor>,
    pub max_exp_avg_sqs: Vec<&'a Tensor>,
}

/// The hyper-parameters of one [`FusedAdamW`] call; `step` is the advanced step count as an
/// fp32 scalar tensor on the tensors' device (torch's `state_steps`).
pub struct AdamWHyper<'a> {
    pub lr: f64,
    pub betas: (f64, f64),
    pub weight_decay: f64,
    pub eps: f64,
    pub step: &'a Tensor,
}

/// `torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, [step]·n, …,
/// maximize=False)`: the parameters and moments updated in place.
pub fn fused_adamw(t: &FusedAdamW<'_>, h: &AdamWHyper<'_>) -> PluginResult<()> {
    let n = t.params.len();
    let lists = [&t.grads, &t.exp_avgs, &t.exp_avg_sqs];
    if lists.iter().any(|l| l.len() != n)
        || !(t.max_exp_avg_sqs.is_empty() || t.max_exp_avg_sqs.len() == n)
    {
        return Err(PluginError::invalid("fused AdamW: tensor lists of different lengths"));
    }
    let (p, g, m, v, vmax) = (
        ptrs(&t.params),
        ptrs(&t.grads),
        ptrs(&t.exp_avgs),
        ptrs(&t.exp_avg_sqs),
        ptrs(&t.max_exp_avg_sqs),
    );
    let vmax = if vmax.is_empty() { std::ptr::null() } else { vmax.as_ptr() };
    checked("torch._fused_adamw_", |err, len| {
        // SAFETY: every pointer is a live tensor borrowed for the call; the lists hold n each.
        unsafe {
            ferrotune_fused_adamw(
                p.as_ptr(),
                g.as_ptr(),
                m.as_ptr(),
                v.as_ptr(),
                vmax,
                h.step.as_ptr() as TensorPtr,
                n,
                h.lr,
                h.betas.0,
                h.betas.1,
                h.weight_decay,
                h.eps,
                err,
                len,
            )
        }
    })
}

/// libtorch's `c10::ScalarType` number of the norm dtypes used here.
fn scalar_type(kind: Kind) -> PluginResult<c_int> {
    match kind {
        Kind::Float => Ok(6),
        Kind::Double => Ok(7),
        k => Err(PluginError::invalid(format!("foreach norm: unsupported norm dtype {k:?}"))),
    }
}

/// `torch._foreach_norm(ts, 2, dtype=kind)`: each tensor's L2 norm, computed in `kind`
/// (fp32 or fp64).
pub fn foreach_norm(ts: &[&Tensor], kind: Kind) -> PluginResult<Vec<Tensor>> {
    let dtype = scalar_type(kind)?;
    let input = ptrs(ts);
    let mut out: Vec<TensorPtr> = vec![std::ptr::null_mut(); ts.len()];
    checked("torch._foreach_norm", |err, len| {
        // SAFETY: `input` holds live tensors; `out` has room for one pointer per input.
        unsafe {
            ferrotune_foreach_norm(input.as_ptr(), ts.len(), dtype, out.as_mut_ptr(), err, len)
        }
    })?;
    // SAFETY: on success each entry is a new `at::Tensor*` that we now own.
    Ok(out.into_iter().map(|p| unsafe { Tensor::from_ptr(p) }).collect())
}

/// `torch._foreach_mul_(ts, factor)`, `factor` a scalar tensor on the tensors' device.
pub fn foreach_mul_(ts: &[&Tensor], factor: &Tensor) -> PluginResult<()> {
    let input = ptrs(ts);
    checked("torch._foreach_mul_", |err, len| {
        // SAFETY: `input` and `factor` are live tensors for the call.
        unsafe {
            ferrotune_foreach_mul_(input.as_ptr(), ts.len(), factor.as_ptr() as TensorPtr, err, len)
        }
    })
}

/// `t.grad = None`: frees the gradient; the next backward allocates a new one.
pub fn set_grad_none(t: &Tensor) -> PluginResult<()> {
    checked("set grad to None", |err, len| {
        // SAFETY: `t` is a live tensor; only its autograd metadata's grad slot is reset.
        unsafe { ferrotune_set_grad_none(t.as_ptr() as TensorPtr, err, len) }
    })
}
