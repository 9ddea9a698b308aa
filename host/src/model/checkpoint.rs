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
//!
//! The same C++ layer holds ZeRO stage 3's autograd functions, whose bodies also call back
//! into Rust (the gathers and reduce-scatters of [`crate::model::partition`]): a linear layer
//! with a frozen weight gathered again in backward ([`regather_linear`]), one with a
//! trainable partitioned weight ([`partitioned_linear`]), and a partitioned tensor made whole
//! ([`gather_partitioned`]).
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
        f: BlockCallback,
        ctx: *mut c_void,
        drop: unsafe extern "C" fn(*mut c_void),
        inputs: *const *mut c_void,
        n: usize,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn ft_regather_linear(
        f: BlockCallback,
        ctx: *mut c_void,
        drop: unsafe extern "C" fn(*mut c_void),
        x: *mut c_void,
        bias: *mut c_void,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn ft_partitioned_linear(
        gather: BlockCallback,
        gather_ctx: *mut c_void,
        gather_drop: unsafe extern "C" fn(*mut c_void),
        scatter: BlockCallback,
        scatter_ctx: *mut c_void,
        scatter_drop: unsafe extern "C" fn(*mut c_void),
        x: *mut c_void,
        shard: *mut c_void,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn ft_gather_partitioned(
        gather: BlockCallback,
        gather_ctx: *mut c_void,
        gather_drop: unsafe extern "C" fn(*mut c_void),
        scatter: BlockCallback,
        scatter_ctx: *mut c_void,
        scatter_drop: unsafe extern "C" fn(*mut c_void),
        shard: *mut c_void,
        err: *mut *mut c_char,
    ) -> *mut c_void;
}

/// What the C++ layer calls back into: a [`BlockFn`] behind `ctx` on `n` inputs.
type BlockCallback = unsafe extern "C" fn(
    *mut c_void,
    *mut *mut c_void,
    usize,
    *mut *mut c_void,
    *mut *mut c_char,
) -> i32;

/// A Rust closure as the `ctx` of a C++ callback; `drop_block` frees it.
fn block_ctx(block: Box<BlockFn>) -> *mut c_void {
    Box::into_raw(Box::new(block)) as *mut c_void
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
    let ctx = block_ctx(Box::new(block));
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
    let ctx = block_ctx(Box::new(move |_: &[Tensor]| gather()));
    let bias = bias.map_or(std::ptr::null_mut(), |b| b.as_ptr() as *mut c_void);
    let mut err: *mut c_char = std::ptr::null_mut();
    let out = unsafe {
        ft_regather_linear(call_block, ctx, drop_block, x.as_ptr() as *mut c_void, bias, &mut err)
    };
    take_output(out, err, "re-gathered linear layer failed")
}

/// `x Wᵀ` for a TRAINABLE weight `W` partitioned over the ranks (ZeRO stage 3): `shard` is
/// this rank's part, a leaf that requires grad; `gather` returns the whole `W` `[out, in]` and
/// is called once in forward and once more in backward (for `grad_x = grad_y W`); `scatter`
/// receives `dL/dW = grad_yᵀ x` `[out, in]` in backward and returns the shard's gradient
/// (same shape, dtype and device as `shard`: the reduce-scatter of every rank's `dL/dW`),
/// which autograd accumulates into `shard.grad()`. Only `x` is saved for backward, never `W`.
///
/// Backward always calls `gather` (even when `x` needs no gradient, so that no rank skips a
/// collective the others make) and calls `scatter` when `shard` requires grad. Add a bias
/// outside. Under `no_grad` gather and multiply instead: this records a graph. Both closures
/// must stay valid for as long as the graph that uses the output ('static).
pub fn partitioned_linear(
    x: &Tensor,
    shard: &Tensor,
    gather: impl Fn() -> Result<Tensor> + 'static,
    scatter: impl Fn(&Tensor) -> Result<Tensor> + 'static,
) -> Result<Tensor> {
    let (gather, scatter) = partition_callbacks(gather, scatter);
    let mut err: *mut c_char = std::ptr::null_mut();
    let out = unsafe {
        ft_partitioned_linear(
            call_block,
            gather,
            drop_block,
            call_block,
            scatter,
            drop_block,
            x.as_ptr() as *mut c_void,
            shard.as_ptr() as *mut c_void,
            &mut err,
        )
    };
    take_output(out, err, "partitioned linear layer failed")
}

/// The whole tensor of a partition (ZeRO stage 3), differentiably: `gather` builds it from
/// `shard` (this rank's part, a leaf that requires grad) in forward; in backward `scatter`
/// turns the whole tensor's gradient into the shard's (as in [`partitioned_linear`]). Nothing
/// is saved: once the caller's ops are done with the whole tensor it is freed (an embedding
/// lookup keeps only its indices for backward).
pub fn gather_partitioned(
    shard: &Tensor,
    gather: impl Fn() -> Result<Tensor> + 'static,
    scatter: impl Fn(&Tensor) -> Result<Tensor> + 'static,
) -> Result<Tensor> {
    let (gather, scatter) = partition_callbacks(gather, scatter);
    let mut err: *mut c_char = std::ptr::null_mut();
    let out = unsafe {
        ft_gather_partitioned(
            call_block,
            gather,
            drop_block,
            call_block,
            scatter,
            drop_block,
            shard.as_ptr() as *mut c_void,
            &mut err,
        )
    };
    take_output(out, err, "gathering a partitioned tensor failed")
}

/// The gather (no inputs) and scatter (one input) closures as C++ callback contexts.
fn partition_callbacks(
    gather: impl Fn() -> Result<Tensor> + 'static,
    scatter: impl Fn(&Tensor) -> Result<Tensor> + 'static,
) -> (*mut c_void, *mut c_void) {
    let gather: Box<BlockFn> = Box::new(move |_: &[Tensor]| gather());
    let scatter: Box<BlockFn> = Box::new(move |xs: &[Tensor]| match xs {
        [grad] => scatter(grad),
        _ => bail!("a partition's scatter takes one gradient, got {}", xs.len()),
    });
    (block_ctx(gather), block_ctx(scatter))
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

    /// The partitioned product against the plain one: output and input gradient equal, the
    /// weight gradient `grad_yᵀ x` is what `scatter` receives and what it returns is the
    /// shard's gradient; `gather` runs once in forward and once in backward, `scatter` once.
    #[test]
    fn partitioned_linear_matches_the_plain_layer() {
        use std::cell::RefCell;
        use std::rc::Rc;
        let o = (Kind::Double, Device::Cpu);
        let w = Tensor::randn([5, 3], o);
        let x = Tensor::randn([2, 4, 3], o).set_requires_grad(true);
        let dy = Tensor::randn([2, 4, 5], o);
        let wr = w.copy().set_requires_grad(true);
        let want = x.linear::<Tensor>(&wr, None);
        (&want * &dy).sum(Kind::Double).backward();
        let (want_gx, want_gw) = (x.grad().copy(), wr.grad().copy());
        let _ = x.grad().zero_();

        // A stand-in "shard": the scatter hands back the first 4 elements of dL/dW, twice.
        let shard = Tensor::zeros([4], o).set_requires_grad(true);
        let seen: Rc<RefCell<Vec<Tensor>>> = Rc::default();
        let gathers = Rc::new(RefCell::new(0));
        let (wc, g, s) = (w.shallow_clone(), gathers.clone(), seen.clone());
        let y = partitioned_linear(
            &x,
            &shard,
            move || {
                *g.borrow_mut() += 1;
                Ok(wc.copy())
            },
            move |grad| {
                s.borrow_mut().push(grad.copy());
                Ok(grad.reshape([-1]).narrow(0, 0, 4) * 2.0)
            },
        )
        .unwrap();
        assert_eq!(*gathers.borrow(), 1);
        assert!(f64::try_from((&y - &want).abs().max()).unwrap() < 1e-12);
        (&y * &dy).sum(Kind::Double).backward();
        assert_eq!(*gathers.borrow(), 2, "backward gathers again");
        assert_eq!(seen.borrow().len(), 1, "one scatter");
        assert!(f64::try_from((&seen.borrow()[0] - &want_gw).abs().max()).unwrap() < 1e-12);
        assert!(f64::try_from((x.grad() - want_gx).abs().max()).unwrap() < 1e-12);
        let want_shard = want_gw.reshape([-1]).narrow(0, 0, 4) * 2.0;
        assert!(f64::try_from((shard.grad() - want_shard).abs().max()).unwrap() < 1e-12);
    }

    /// An input that needs no gradient gets none, but backward still gathers (every rank
    /// makes the same collectives) and the shard still gets its gradient.
    #[test]
    fn partitioned_linear_gathers_in_backward_without_an_input_gradient() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let o = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([2, 3], o);
        let x = Tensor::randn([4, 3], o);
        let shard = Tensor::zeros([6], o).set_requires_grad(true);
        let gathers = Arc::new(AtomicUsize::new(0));
        let (wc, g) = (w.shallow_clone(), gathers.clone());
        let y = partitioned_linear(
            &x,
            &shard,
            move || {
                g.fetch_add(1, Ordering::SeqCst);
                Ok(wc.copy())
            },
            |grad| Ok(grad.reshape([-1])),
        )
        .unwrap();
        assert!(y.requires_grad());
        y.sum(Kind::Float).backward();
        assert_eq!(gathers.load(Ordering::SeqCst), 2);
        assert!(!x.grad().defined());
        let want = x.sum_dim_intlist([0i64].as_slice(), false, None::<Kind>).repeat([2]);
        assert!(f64::try_from((shard.grad() - want).abs().max()).unwrap() < 1e-6);
    }

    /// The gathered embedding matrix: the lookup's output equals the plain lookup, the
    /// scatter receives the plain embedding gradient (dense) and the shard gets its result;
    /// the gather is not repeated in backward. Two uses (a tied head) accumulate.
    #[test]
    fn gathered_embedding_scatters_its_gradient() {
        use std::cell::RefCell;
        use std::rc::Rc;
        let o = (Kind::Double, Device::Cpu);
        let w = Tensor::randn([6, 4], o);
        let ids = Tensor::from_slice(&[1i64, 3, 3, 5]).view([2, 2]);
        let dy = Tensor::randn([2, 2, 4], o);
        let wr = w.copy().set_requires_grad(true);
        (Tensor::embedding(&wr, &ids, -1, false, false) * &dy).sum(Kind::Double).backward();
        let want_gw = wr.grad().copy();

        let shard = Tensor::zeros([24], o).set_requires_grad(true);
        let calls = Rc::new(RefCell::new((0, 0)));
        let gather_scatter = || {
            let (c1, c2, wc) = (calls.clone(), calls.clone(), w.shallow_clone());
            gather_partitioned(
                &shard,
                move || {
                    c1.borrow_mut().0 += 1;
                    Ok(wc.copy())
                },
                move |grad| {
                    c2.borrow_mut().1 += 1;
                    Ok(grad.reshape([-1]))
                },
            )
            .unwrap()
        };
        let whole = gather_scatter();
        assert!(whole.requires_grad());
        assert_eq!(f64::try_from((&whole - &w).abs().max()).unwrap(), 0.0);
        let y = Tensor::embedding(&whole, &ids, -1, false, false);
        drop(whole);
        (y * &dy).sum(Kind::Double).backward();
        assert_eq!(*calls.borrow(), (1, 1));
        let got = shard.grad().copy();
        assert!(f64::try_from((&got - want_gw.reshape([-1])).abs().max()).unwrap() < 1e-12);
        // A second use of the same shard (a tied lm_head) adds its gradient.
        let head = gather_scatter();
        let x = Tensor::randn([3, 4], o);
        x.linear::<Tensor>(&head, None).sum(Kind::Double).backward();
        let head_gw = x.sum_dim_intlist([0i64].as_slice(), false, None::<Kind>).repeat([6]);
        assert!(f64::try_from((shard.grad() - got - head_gw).abs().max()).unwrap() < 1e-12);
        assert_eq!(*calls.borrow(), (2, 2));
        let no_grad = tch::no_grad(gather_scatter);
        assert!(!no_grad.requires_grad(), "under no_grad a plain tensor");
    }
}
