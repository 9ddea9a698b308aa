//! Initial values of A `[r, in]` and B `[out, r]` (`init_lora_weights`), computed as peft's
//! `reset_lora_parameters`, `pissa_init` and `olora_init` compute them. The base-weight side
//! of PiSSA and OLoRA (W becomes W − scale·B·A) is the layer's `unmerged_weight`; see
//! `lib.rs` (`INIT_REWRITES_BASE`).
use ferrotune_plugin_api::blockwise::{nf4_round_trip, NF4_BLOCKSIZE};
use ferrotune_plugin_api::{PluginError, PluginResult};
use tch::{Kind, Tensor};

use crate::config::InitLoraWeights;

/// Builds `(A, B)` in `kind` on `weight`'s device from the base weight `[out, in]`.
///
/// `scaling` is the adapter's scale: PiSSA divides the singular values by it so that
/// `scaling · B·A` is the principal part of W.
pub fn initial_factors(
    init: InitLoraWeights,
    weight: &Tensor,
    r: i64,
    scaling: f64,
    kind: Kind,
) -> PluginResult<(Tensor, Tensor)> {
    let (out_f, in_f) = weight.size2()?;
    let opts = (kind, weight.device());
    let (a, b) = match init {
        InitLoraWeights::Default => {
            (kaiming_uniform([r, in_f], opts)?, Tensor::f_zeros([out_f, r], opts)?)
        }
        InitLoraWeights::Random => {
            (kaiming_uniform([r, in_f], opts)?, kaiming_uniform([out_f, r], opts)?)
        }
        InitLoraWeights::Gaussian => {
            let mut a = Tensor::f_empty([r, in_f], opts)?;
            let _ = a.f_normal_(0.0, 1.0 / r as f64)?;
            (a, Tensor::f_zeros([out_f, r], opts)?)
        }
        InitLoraWeights::Pissa => {
            check_rank(r, out_f, in_f, "pissa")?;
            // peft's names: V, S, Uh = svd(W), W = V·diag(S)·Uh.
            let (v, s, u) = weight.f_to_kind(Kind::Float)?.f_svd(true, true)?;
            let vr = v.f_narrow(1, 0, r)?;
            let sr = s.f_narrow(0, 0, r)? / scaling;
            let uhr = u.f_narrow(1, 0, r)?.f_tr()?;
            let root = sr.f_sqrt()?.f_diag(0)?;
            (root.f_matmul(&uhr)?, vr.f_matmul(&root)?)
        }
        InitLoraWeights::Loftq => {
            return Err(PluginError::invalid(
                "LoftQ factors come from `loftq` (they come with the quantized base weight)",
            ));
        }
        InitLoraWeights::Olora => {
            check_rank(r, out_f, in_f, "olora")?;
            let (q, rr) = Tensor::f_linalg_qr(&weight.f_to_kind(Kind::Float)?, "reduced")?;
            (rr.f_narrow(0, 0, r)?.f_contiguous()?, q.f_narrow(1, 0, r)?.f_contiguous()?)
        }
    };
    Ok((a.f_to_kind(kind)?, b.f_to_kind(kind)?))
}

/// LoftQ (peft's `loftq_init` with 4 bits): `(A, B, Q)` with Q the NF4-quantized base (as
/// bitsandbytes' `Params4bit(compress_statistics=False, quant_type="nf4")`, block 64, then
/// dequantized) and B·A the rank-r SVD of `W − Q`, so that `Q + B·A ≈ W`. Each of the `iters`
/// rounds quantizes `W − B·A` of the round before (the first quantizes W). As in peft, A and B
/// are not divided by the adapter's scale: `Q + scale·B·A ≈ W` holds for `lora_alpha = r`.
/// A and B come back in `kind`, Q in W's dtype. The quantizer math is
/// `ferrotune_plugin_api::blockwise`, the one the `nf4` quantizer plugin stores weights with.
pub fn loftq(
    weight: &Tensor,
    r: i64,
    iters: i64,
    kind: Kind,
) -> PluginResult<(Tensor, Tensor, Tensor)> {
    let (out_f, in_f) = weight.size2()?;
    check_rank(r, out_f, in_f, "loftq")?;
    let w = weight.f_to_kind(Kind::Float)?;
    let mut res = w.shallow_clone();
    let mut factors = None;
    let mut q = None;
    for i in 0..iters.max(1) {
        let dequantized = nf4_round_trip(&res, NF4_BLOCKSIZE)?;
        let (l, rr) = low_rank(&w.f_sub(&dequantized)?, r)?;
        q = Some(dequantized);
        if i + 1 == iters.max(1) {
            factors = Some((rr, l));
            break;
        }
        res = w.f_sub(&l.f_matmul(&rr)?)?;
    }
    let ((a, b), q) = (factors.expect("at least one round"), q.expect("at least one round"));
    Ok((a.f_to_kind(kind)?, b.f_to_kind(kind)?, q.f_to_kind(weight.kind())?))
}

/// peft's `_low_rank_decomposition`: `L = U·√diag(S)[:, :r]`, `R = √diag(S)[:r, :]·Vh`, with
/// the same ops in the same order.
fn low_rank(weight: &Tensor, r: i64) -> PluginResult<(Tensor, Tensor)> {
    // torch.svd is linalg_svd(full_matrices=False) with V = Vhᴴ: the same numbers and layout.
    let (u, s, v) = weight.f_svd(true, true)?;
    let vh = v.f_tr()?;
    let d = s.f_diag(0)?;
    let l = u.f_matmul(&d.f_narrow(1, 0, r)?.f_sqrt()?)?;
    let rr = d.f_narrow(0, 0, r)?.f_sqrt()?.f_matmul(&vh)?;
    Ok((l, rr))
}

/// `nn.init.kaiming_uniform_(w, a=√5)`, `nn.Linear`'s default: U(−1/√fan_in, 1/√fan_in).
fn kaiming_uniform(shape: [i64; 2], opts: (Kind, tch::Device)) -> PluginResult<Tensor> {
    let bound = 1.0 / (shape[1] as f64).sqrt();
    let mut t = Tensor::f_empty(shape, opts)?;
    let _ = t.f_uniform_(-bound, bound)?;
    Ok(t)
}

fn check_rank(r: i64, out_f: i64, in_f: i64, init: &str) -> PluginResult<()> {
    if r > out_f.min(in_f) {
        return Err(PluginError::config(
            "r",
            format!("{r} exceeds min(out, in) = {} of a [{out_f}, {in_f}] layer, which \"{init}\" needs", out_f.min(in_f)),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn std(t: &Tensor) -> f64 {
        t.std(true).double_value(&[])
    }

    #[test]
    fn default_init_is_nn_linear_a_and_zero_b() {
        tch::manual_seed(1);
        let w = Tensor::randn([64, 400], (Kind::Float, Device::Cpu));
        let (a, b) = initial_factors(InitLoraWeights::Default, &w, 32, 1.0, Kind::Float).unwrap();
        assert_eq!((a.size(), b.size()), (vec![32, 400], vec![64, 32]));
        assert_eq!(b.abs().max().double_value(&[]), 0.0);
        let bound = 1.0 / 20.0;
        assert!(a.abs().max().double_value(&[]) <= bound);
        // U(-c, c) has std c/√3; 12 800 samples put the estimate within a few percent.
        let expected = bound / 3f64.sqrt();
        assert!((std(&a) / expected - 1.0).abs() < 0.05, "std {} vs {expected}", std(&a));
    }

    #[test]
    fn gaussian_init_has_std_one_over_r() {
        tch::manual_seed(2);
        let w = Tensor::randn([64, 400], (Kind::Float, Device::Cpu));
        let (a, b) = initial_factors(InitLoraWeights::Gaussian, &w, 16, 1.0, Kind::Float).unwrap();
        assert_eq!(b.abs().max().double_value(&[]), 0.0);
        assert!((std(&a) * 16.0 - 1.0).abs() < 0.05, "std {}", std(&a));
        assert!(a.mean(Kind::Float).abs().double_value(&[]) < 0.01);
    }

    #[test]
    fn pissa_is_the_best_rank_r_approximation_over_scale() {
        tch::manual_seed(3);
        let w = Tensor::randn([12, 20], (Kind::Float, Device::Cpu));
        let (a, b) = initial_factors(InitLoraWeights::Pissa, &w, 12, 2.0, Kind::Float).unwrap();
        // full rank: scale · B·A reproduces W
        let diff = (b.matmul(&a) * 2.0 - &w).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
        // rank 3: the residual's spectral norm is the 4th singular value (Eckart–Young)
        let (a, b) = initial_factors(InitLoraWeights::Pissa, &w, 3, 2.0, Kind::Float).unwrap();
        let s = w.svd(true, false).1;
        let resid_top = (&w - b.matmul(&a) * 2.0).svd(true, false).1.double_value(&[0]);
        assert!((resid_top - s.double_value(&[3])).abs() < 1e-4);
        let e = initial_factors(InitLoraWeights::Pissa, &w, 13, 2.0, Kind::Float).unwrap_err();
        assert!(e.message().contains("`r`"), "{e}");
    }

    #[test]
    fn loftq_error_falls_with_iterations_and_beats_plain_quantization() {
        tch::manual_seed(5);
        let w = Tensor::randn([32, 128], (Kind::Float, Device::Cpu));
        let err = |iters| {
            let (a, b, q) = loftq(&w, 4, iters, Kind::Float).unwrap();
            (&w - &q - b.matmul(&a)).norm().double_value(&[])
        };
        let plain = (&w - nf4_round_trip(&w, 64).unwrap()).norm().double_value(&[]);
        let (e1, e3) = (err(1), err(3));
        assert!(
            e1 < plain && e3 < e1,
            "quantized only {plain}, 1 iteration {e1}, 3 iterations {e3}"
        );
    }

    #[test]
    fn olora_factors_are_orthonormal_q_and_upper_r() {
        tch::manual_seed(4);
        let w = Tensor::randn([12, 20], (Kind::Float, Device::Cpu));
        let (a, b) = initial_factors(InitLoraWeights::Olora, &w, 4, 1.0, Kind::Float).unwrap();
        let gram = b.tr().matmul(&b) - Tensor::eye(4, (Kind::Float, Device::Cpu));
        assert!(gram.abs().max().double_value(&[]) < 1e-5);
        assert!(a.tril(-1).abs().max().double_value(&[]) == 0.0, "R is upper triangular");
        // W[:, :4] lies in span(Q[:, :4]) and equals Q[:, :4]·R[:4, :4]
        let first =
            (b.matmul(&a).narrow(1, 0, 4) - w.narrow(1, 0, 4)).abs().max().double_value(&[]);
        assert!(first < 1e-5, "{first}");
    }
}
