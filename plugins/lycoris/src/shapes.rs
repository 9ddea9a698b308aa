//! The factor tensors of one adapted `[out, in]` linear layer, by peft 0.21's rules: their
//! state-dict names (peft's keys) and shapes, LoKr's `factorization` included. The host's
//! PEFT_METHODS rows (host/src/peft/methods/{loha,lokr}.rs) state the same shapes to check a
//! saved directory before loading it.
use crate::config::{LycorisConfig, Method};

/// peft's `lokr.layer.factorization(dimension, factor)`: splits `dimension` into `(m, n)`,
/// `m · n = dimension`. With `factor > 0` dividing it, `(factor, dimension / factor)` as is
/// (so `m` may exceed `n`); otherwise the divisor pair closest to the square root whose smaller
/// side is at most `factor` (any divisor when `factor` is -1), smaller first.
pub fn factorization(dimension: i64, factor: i64) -> (i64, i64) {
    if factor > 0 && dimension % factor == 0 {
        return (factor, dimension / factor);
    }
    let factor = if factor == -1 { dimension } else { factor };
    let (mut m, mut n) = (1, dimension);
    // peft's `length = m + n` is never updated, so its `new_m + new_n > length` never holds.
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while dimension % new_m != 0 {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n {
        (m, n) = (n, m);
    }
    (m, n)
}

/// One Kronecker factor: stored whole, or as the product of two rank-`r` tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KronFactor {
    /// `[rows, cols]`.
    Full(i64, i64),
    /// `a` `[rows, r]` · `b` `[r, cols]`.
    LowRank(i64, i64),
}

/// LoKr's two factors of an `[out, in]` layer (peft's `LoKrLayer.update_layer` for
/// `nn.Linear`): `out = a·c`, `in = b·d` split by [`factorization`]; `W1` `[a, b]` is
/// decomposed only with `decompose_both` and `r` below half its larger side; `W2` `[c, d]`
/// whenever `r` is below half its larger side.
pub fn lokr_factors(
    out: i64,
    inp: i64,
    r: i64,
    decompose_both: bool,
    factor: i64,
) -> (KronFactor, KronFactor) {
    let (out_l, out_k) = factorization(out, factor);
    let (in_m, in_n) = factorization(inp, factor);
    let below_half = |a: i64, b: i64| (r as f64) < a.max(b) as f64 / 2.0;
    let w1 = if decompose_both && below_half(out_l, in_m) {
        KronFactor::LowRank(out_l, in_m)
    } else {
        KronFactor::Full(out_l, in_m)
    };
    let w2 = if below_half(out_k, in_n) {
        KronFactor::LowRank(out_k, in_n)
    } else {
        KronFactor::Full(out_k, in_n)
    };
    (w1, w2)
}

/// The state-dict names and shapes of the adapter of an `[out, in]` layer of rank `r`, in
/// peft's order.
pub fn layer_tensors(
    cfg: &LycorisConfig,
    r: i64,
    out: i64,
    inp: i64,
) -> Vec<(&'static str, [i64; 2])> {
    match cfg.method {
        Method::LoHa => vec![
            ("hada_w1_a", [out, r]),
            ("hada_w1_b", [r, inp]),
            ("hada_w2_a", [out, r]),
            ("hada_w2_b", [r, inp]),
        ],
        Method::LoKr => {
            let (w1, w2) = lokr_factors(out, inp, r, cfg.decompose_both(), cfg.decompose_factor());
            let mut v = Vec::new();
            for (f, full, a, b) in [
                (w1, "lokr_w1", "lokr_w1_a", "lokr_w1_b"),
                (w2, "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
            ] {
                match f {
                    KronFactor::Full(rows, cols) => v.push((full, [rows, cols])),
                    KronFactor::LowRank(rows, cols) => {
                        v.push((a, [rows, r]));
                        v.push((b, [r, cols]));
                    }
                }
            }
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factorization_is_peft_s() {
        // peft's docstring examples, and values printed by peft 0.21.2's `factorization`.
        for (dim, factor, want) in [
            (256, -1, (16, 16)),
            (128, -1, (8, 16)),
            (127, -1, (1, 127)),
            (128, 4, (4, 32)),
            (64, -1, (8, 8)),
            (32, -1, (4, 8)),
            (176, -1, (11, 16)),
            (64, 16, (16, 4)),
            (176, 5, (4, 44)),
            (64, 0, (1, 64)),
            (1, -1, (1, 1)),
        ] {
            assert_eq!(factorization(dim, factor), want, "factorization({dim}, {factor})");
        }
    }

    #[test]
    fn lokr_decomposes_below_half_the_larger_side() {
        use KronFactor::*;
        assert_eq!(lokr_factors(64, 64, 4, false, -1), (Full(8, 8), Full(8, 8)));
        assert_eq!(lokr_factors(64, 64, 3, false, -1), (Full(8, 8), LowRank(8, 8)));
        assert_eq!(lokr_factors(64, 64, 3, true, -1), (LowRank(8, 8), LowRank(8, 8)));
        assert_eq!(lokr_factors(32, 176, 2, true, 16), (LowRank(16, 16), LowRank(2, 11)));
        assert_eq!(lokr_factors(32, 176, 2, false, 16), (Full(16, 16), LowRank(2, 11)));
    }
}
