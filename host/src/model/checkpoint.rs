//! Activation checkpointing (`training.gradient_checkpointing`): a block of the forward pass
//! (one decoder layer) runs without keeping its activations and is recomputed in backward.
//!
//! tch has no checkpoint API, so this is torch.utils.checkpoint's reentrant variant written
//! as a `torch::autograd::Function` in the host's C++ layer (`host/csrc/checkpoint.cpp`),
//! whose body calls back into Rust. The CPU generator state, and that of every CUDA device
//! an input is on, is saved with the inputs and restored for the recomputation, so dropout
//! draws the same masks (the CUDA part is compiled here but runs only on a GPU machine).
//!
//! As in torch's reentrant checkpoint, parameters used inside the block receive their
//! gradients from the recomputation; the block's output requires grad only if one of its
//! inputs does (the caller makes the first layer's input require grad).
use std::ffi::{c_char, c_void};

use anyhow::{bail, Result};
use tch::Tensor;

type BlockFn = dyn Fn(&[Tensor]) -> Result<Tensor>;

extern "C" {
    fn ft_grad_enabled() -> i32;
    fn ft_varlen_attention(
        q: *mut c_void,
        k: *mut c_void,
        v: *mut c_void,
        cu_seqlens: *mut c_void,
        max_len: i64,
        scale: f64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn ft_checkpoint(
        f: unsafe extern "C" fn(
            *mut c_void,
            *mut *mut c_void,
            usize,
            *mut *mut c_void,
            *mut *mut c_char,
        ) -> i32,
        ctx: *mut c_void,
        drop: unsafe extern "C" fn(*mut c_void),
        inputs: *const *mut c_void,
        n: usize,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn ft_regather_linear(
        f: unsafe extern "C" fn(
            *mut c_void,
            *mut *mut c_void,
            usize,
            *mut *mut c_void,
            *mut *mut c_char,
        ) -> i32,
        ctx: *mut c_void,
        drop: unsafe extern "C" fn(*mut c_void),
        x: *mut c_void,
        bias: *mut c_void,
        err: *mut *mut c_char,
    ) -> *mut c_void;
}

fn c_message(s: &str) -> *mut c_char {
    let bytes = s.replace('\0', " ");
    unsafe {
        let p = libc_malloc(bytes.len() + 1) as *mut u8;
        if !p.is_null() {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
            *p.add(bytes.len()) = 0;
        }
        p as *mut c_char
    }
}

extern "C" {
    #[link_name = "malloc"]
    fn libc_malloc(n: usize) -> *mut c_void;
    #[link_name = "free"]
    fn libc_free(p: *mut c_void);
}

unsafe extern "C" fn call_block(
    ctx: *mut c_void,
    inputs: *mut *mut c_void,
    n: usize,
    out: *mut *mut c_void,
    err: *mut *mut c_char,
) -> i32 {
    let block = &*(ctx as *const Box<BlockFn>);
    let inputs: Vec<Tensor> = (0..n).map(|i| Tensor::from_ptr(*inputs.add(i) as *mut _)).collect();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| block(&inputs))) {
        Ok(Ok(mut t)) => {
            let p = t.as_mut_ptr() as *mut c_void;
            std::mem::forget(t);
            *out = p;
            0
        }
        Ok(Err(e)) => {
            *err = c_message(&format!("{e:#}"));
            1
        }
        Err(_) => {
            *err = c_message("panic in a checkpointed block");
            1
        }
    }
}

unsafe extern "C" fn drop_block(ctx: *mut c_void) {
    drop(Box::from_raw(ctx as *mut Box<BlockFn>));
}

/// Whether autograd records operations on this thread (`torch.is_grad_enabled()`): outside
/// `no_grad`, checkpointing has something to save.
pub fn grad_enabled() -> bool {
    unsafe { ft_grad_enabled() != 0 }
}

/// Runs `block(inputs)` as a checkpointed block: the forward keeps only `inputs`, and the
/// backward recomputes `block` with grad enabled. `block` must be deterministic given the
/// inputs and the CPU generator state, and may be called again during backward: it must stay
/// valid for as long as the graph that uses its output ('static; capture shallow clones).
pub fn checkpoint(
    inputs: &[&Tensor],
    block: impl Fn(&[Tensor]) -> Result<Tensor> + 'static,
) -> Result<Tensor> {
    let boxed: Box<BlockFn> = Box::new(block);
    let ctx = Box::into_raw(Box::new(boxed)) as *mut c_void;
    let ptrs: Vec<*mut c_void> = inputs.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let mut err: *mut c_char = std::ptr::null_mut();
    let out =
        unsafe { ft_checkpoint(call_block, ctx, drop_block, ptrs.as_ptr(), ptrs.len(), &mut err) };
    take_output(out, err, "activation checkpointing failed")
}

/// `x Wᵀ + b` for a frozen `W` that `gather` produces (ZeRO-3: all-gathered from the ranks'
/// shards), called once in forward and once more in backward, where the input gradient is
/// `grad_y W`. Nothing is saved for backward (not `W`, not `x`), and the product is not
/// recomputed. The output requires grad when `x` does. `gather` must stay valid for as long
/// as the graph that uses the output ('static; capture shallow clones).
pub fn regather_linear(
    x: &Tensor,
    bias: Option<&Tensor>,
    gather: impl Fn() -> Result<Tensor> + 'static,
) -> Result<Tensor> {
    let boxed: Box<BlockFn> = Box::new(move |_: &[Tensor]| gather());
    let ctx = Box::into_raw(Box::new(boxed)) as *mut c_void;
    let bias = bias.map_or(std::ptr::null_mut(), |b| b.as_ptr() as *mut c_void);
    let mut err: *mut c_char = std::ptr::null_mut();
    let out = unsafe {
        ft_regather_linear(call_block, ctx, drop_block, x.as_ptr() as *mut c_void, bias, &mut err)
    };
    take_output(out, err, "re-gathered linear layer failed")
}

/// Causal attention over packed samples on CUDA (host/csrc/attention.cpp): `q`
/// `[total, heads, d]`, `k`, `v` `[total, kv_heads, d]` in bf16 or f16, `cu_seqlens` the
/// int32 cumulative sample lengths `[n + 1]` on the same device; libtorch's variable-length
/// FlashAttention-2 kernel, differentiable.
pub fn varlen_flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &Tensor,
    max_len: i64,
    scale: f64,
) -> Result<Tensor> {
    let ptr = |t: &Tensor| t.as_ptr() as *mut c_void;
    let mut err: *mut c_char = std::ptr::null_mut();
    let out = unsafe {
        ft_varlen_attention(ptr(q), ptr(k), ptr(v), ptr(cu_seqlens), max_len, scale, &mut err)
    };
    take_output(out, err, "variable-length flash attention failed")
}

/// The tensor a C++ entry point returned, or its error message (freed here).
fn take_output(out: *mut c_void, err: *mut c_char, fallback: &str) -> Result<Tensor> {
    if out.is_null() {
        let msg = if err.is_null() {
            fallback.to_string()
        } else {
            let s = unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned();
            unsafe { libc_free(err as *mut c_void) };
            s
        };
        bail!("{msg}");
    }
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// A re-gathered linear layer gives the plain product and input gradient, calls its
    /// gather once in forward and once in backward, and lets gradients reach what comes before.
    #[test]
    fn regathered_linear_matches_the_plain_layer() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let w = Tensor::randn([5, 3], (Kind::Double, Device::Cpu));
        let b = Tensor::randn([5], (Kind::Double, Device::Cpu));
        let p = Tensor::randn([3], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let x0 = Tensor::randn([2, 4, 3], (Kind::Double, Device::Cpu));
        let f = |y: &Tensor| y.tanh().sum(Kind::Double);
        f(&(&x0 * &p).linear(&w, Some(&b))).backward();
        let expected = p.grad().copy();
        let _ = p.grad().zero_();
        let calls = Arc::new(AtomicUsize::new(0));
        let (wc, c) = (w.shallow_clone(), calls.clone());
        let y = regather_linear(&(&x0 * &p), Some(&b), move || {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(wc.copy())
        })
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let plain = (&x0 * &p).linear(&w, Some(&b));
        assert!(f64::try_from((&y - plain).abs().max()).unwrap() < 1e-12);
        f(&y).backward();
        assert_eq!(calls.load(Ordering::SeqCst), 2, "backward gathers again");
        assert!(f64::try_from((p.grad() - expected).abs().max()).unwrap() < 1e-12);
    }

    /// Gradients through a checkpointed block equal those of the plain computation, for the
    /// input and for a parameter captured by the block.
    #[test]
    fn gradients_match_the_plain_graph() {
        tch::manual_seed(0);
        let w = Tensor::randn([4, 4], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let x0 = Tensor::randn([3, 4], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let f = |x: &Tensor, w: &Tensor| x.matmul(w).tanh().matmul(w).sin();
        f(&x0, &w).sum(Kind::Double).backward();
        let (gx, gw) = (x0.grad().copy(), w.grad().copy());
        let _ = x0.grad().zero_();
        let _ = w.grad().zero_();
        let wc = w.shallow_clone();
        let y = checkpoint(&[&x0], move |xs| Ok(f(&xs[0], &wc))).unwrap();
        assert!(y.requires_grad());
        y.sum(Kind::Double).backward();
        assert!(f64::try_from((x0.grad() - gx).abs().max()).unwrap() < 1e-12);
        assert!(f64::try_from((w.grad() - gw).abs().max()).unwrap() < 1e-12);
    }

    /// Dropout inside the block draws the same mask in the recomputation. The replay uses
    /// libtorch's process-wide CPU generator, which other tests of this binary draw from in
    /// parallel threads: a draw between the replayed state and the recomputation changes the
    /// mask, so an attempt may be spoiled by another test; a real replay bug fails every one.
    #[test]
    fn dropout_mask_is_replayed() {
        let attempt = || {
            let x = Tensor::ones([1000], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let y = checkpoint(&[&x], |xs| Ok(xs[0].dropout(0.5, true))).unwrap();
            y.sum(Kind::Float).backward();
            // d(dropout(x))/dx is the mask scaled by 2: the same positions as the forward's zeros.
            let fwd_zero = y.eq(0.0);
            let grad_zero = x.grad().eq(0.0);
            let kept = i64::try_from(fwd_zero.logical_not().sum(Kind::Int64)).unwrap();
            assert!(kept > 300 && kept < 700, "{kept}");
            fwd_zero.equal(&grad_zero)
        };
        assert!(
            (0..5).any(|_| attempt()),
            "the recomputed dropout mask differs from the forward's in 5 attempts"
        );
    }

    #[test]
    fn errors_come_back_as_values() {
        let x = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let e = checkpoint(&[&x], |_| bail!("block says no")).unwrap_err().to_string();
        assert!(e.contains("block says no"), "{e}");
    }
}
