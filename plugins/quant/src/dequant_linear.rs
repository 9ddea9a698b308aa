//! The Rust side of `csrc/dequant_linear.cpp`: `x · Wᵀ` for a packed weight, with autograd
//! saving a reference to the packed weight instead of a dense copy.
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Arc;

use ferrotune_plugin_api::{PluginError, PluginResult};
use tch::{Kind, Tensor};

/// A packed weight that can produce its dense form.
pub trait Dequantize: Send + Sync + 'static {
    fn dequantize(&self, kind: Kind) -> PluginResult<Tensor>;
}

extern "C" {
    fn ferrotune_dequant_linear(
        x: *const c_void,
        ctx: *const c_void,
        dequant: extern "C" fn(*const c_void, c_int, *mut *mut c_void) -> c_int,
        release: extern "C" fn(*const c_void),
        out: *mut *mut c_void,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

/// libtorch's `c10::ScalarType` numbers of the floating dtypes a weight is dequantized to.
fn kind_of(scalar_type: c_int) -> Option<Kind> {
    match scalar_type {
        5 => Some(Kind::Half),
        6 => Some(Kind::Float),
        7 => Some(Kind::Double),
        15 => Some(Kind::BFloat16),
        _ => None,
    }
}

extern "C" fn dequant_cb<T: Dequantize>(
    ctx: *const c_void,
    scalar_type: c_int,
    out: *mut *mut c_void,
) -> c_int {
    let result = std::panic::catch_unwind(|| {
        // SAFETY: ctx is an `Arc<T>` reference taken by `linear`, alive until `release_cb`.
        let source = unsafe { &*(ctx as *const T) };
        let kind = kind_of(scalar_type)?;
        let mut w = std::mem::ManuallyDrop::new(source.dequantize(kind).ok()?);
        // ownership of the `at::Tensor*` passes to the C++ side, which deletes it
        Some(w.as_mut_ptr() as *mut c_void)
    });
    match result {
        Ok(Some(ptr)) => {
            // SAFETY: `out` is the C++ caller's valid out-pointer.
            unsafe { *out = ptr };
            0
        }
        _ => 1,
    }
}

extern "C" fn release_cb<T: Dequantize>(ctx: *const c_void) {
    // SAFETY: balances the `Arc::into_raw` in `linear`, exactly once (C++ `~Source`).
    drop(unsafe { Arc::from_raw(ctx as *const T) });
}

/// `x · Wᵀ` with W = `source.dequantize(x's dtype)`. Under autograd, the graph keeps a
/// reference to `source` (the packed weight), not W; the backward pass dequantizes again.
/// Without gradients (no input requires grad) it is a plain dequantize-then-matmul.
pub fn linear<T: Dequantize>(x: &Tensor, source: &Arc<T>) -> PluginResult<Tensor> {
    if !x.requires_grad() {
        let w = source.dequantize(x.kind())?;
        return Ok(x.f_matmul(&w.f_tr()?)?);
    }
    let ctx = Arc::into_raw(Arc::clone(source)) as *const c_void;
    let mut out: *mut c_void = std::ptr::null_mut();
    let mut err = [0 as c_char; 512];
    // SAFETY: `x` is a live tensor for the call; ctx carries one Arc reference the C++ side
    // releases; the callbacks match the typedefs in csrc/dequant_linear.cpp.
    let rc = unsafe {
        ferrotune_dequant_linear(
            x.as_ptr() as *const c_void,
            ctx,
            dequant_cb::<T>,
            release_cb::<T>,
            &mut out,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 || out.is_null() {
        // SAFETY: the C++ side wrote a NUL-terminated message.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
        return Err(PluginError::runtime(format!("quantized linear: {msg}")));
    }
    // SAFETY: `out` is a new `at::Tensor*` we now own.
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}
