//! Log-probabilities of target tokens from the last hidden state, in chunks of target
//! positions: the `[B, T, V]` logits are never built (Liger's fused linear cross-entropy,
//! torchtune's chunked loss).
//!
//! Only positions that have a target reach the head. Each chunk's logits are computed, turned
//! into the target's log-probability (and argmax hit, entropy) and dropped; when a graph is
//! wanted, the chunk also computes `∂ log p(target) / ∂ h = (onehot − softmax) W / τ` right
//! away, a `[n, hidden]` tensor. A position's log-probability depends on its own hidden state
//! alone, so the returned tensor is `logp + Σ_h (h − h.detach()) · g`: its value is `logp`
//! exactly (the second term is exactly zero) and autograd gives `upstream · g` for `h`, the
//! exact gradient, whatever loss the objective builds from the log-probabilities (SFT's sum,
//! DPO's sigmoid of sums, GRPO's clipped ratios). Nothing of a chunk is kept for backward.
//!
//! That needs a head whose weight takes no gradient and is a plain product
//! ([`FrozenLinear::plain_weight`]). A head whose weight trains (full fine-tuning,
//! [`FrozenLinear::trained_weight`]) is chunked too: each chunk is an activation-checkpointed
//! block over (its hidden states, W): its forward keeps nothing, and its backward recomputes
//! that chunk's logits and back-propagates through them, so the weight's gradient is
//! accumulated chunk by chunk and at most one chunk's logits exist at a time, in forward or
//! backward (one more head product per chunk than plain autograd; the weight's gradient is
//! exact). Otherwise (an adapter or a trainable copy on `lm_head`, a quantized head) the
//! target positions go through the head with autograd, still without the positions that have
//! no target.
use anyhow::{bail, Result};
use ferrotune_plugin_api::{logps_from_logits, ForwardFlags};
use tch::{Kind, Tensor};

use super::checkpoint::grad_enabled;
use super::linear::{FrozenLinear, LinearMode};

/// Logits elements per chunk (64 MiB of fp32): 524 rows of a 32,000 vocabulary, 110 of
/// Qwen2's 151,936.
const CHUNK_ELEMENTS: i64 = 1 << 24;

/// Target positions per chunk for a head of `vocab` outputs.
fn chunk_rows(vocab: i64) -> i64 {
    (CHUNK_ELEMENTS / vocab.max(1)).clamp(16, 4096)
}

/// Target log-probabilities, argmax hits and entropies, each `[B, T]`.
pub struct TargetOutputs {
    pub logps: Tensor,
    pub correct: Tensor,
    pub entropy: Option<Tensor>,
}

/// What to compute besides the log-probabilities.
#[derive(Clone, Copy, Debug)]
pub struct TargetOptions {
    /// Divide the logits by this (sampling temperature).
    pub temperature: f64,
    pub entropy: bool,
}

/// The log-probabilities of `targets` (`[B, T]`, negative = none) under `head(hidden) / τ`
/// for `hidden` `[B, T, H]` (see the module docs).
pub fn target_logps(
    head: &FrozenLinear,
    mode: LinearMode<'_>,
    hidden: &Tensor,
    targets: &Tensor,
    opts: TargetOptions,
) -> Result<TargetOutputs> {
    let (b, t, h) = hidden.size3()?;
    let vocab = head.out_features();
    if targets.size() != [b, t] {
        bail!("target_ids must be [batch, seq] = [{b}, {t}], got {:?}", targets.size());
    }
    if !(opts.temperature.is_finite() && opts.temperature > 0.0) {
        bail!("target temperature must be positive, got {}", opts.temperature);
    }
    let flat = targets.f_to_device(hidden.device())?.f_to_kind(Kind::Int64)?.f_reshape([-1])?;
    if flat.f_ge(vocab)?.f_any()?.f_int64_value(&[])? != 0 {
        bail!("target_ids hold ids outside the vocabulary [0, {vocab})");
    }
    let idx = flat.f_ge(0)?.f_nonzero()?.f_squeeze_dim(-1)?;
    let hs = hidden.f_reshape([b * t, h])?.f_index_select(0, &idx)?;
    let tg = flat.f_index_select(0, &idx)?;
    let sel = match head.plain_weight(mode) {
        Some((w, bias)) => chunked(&hs, w, bias, &tg, opts)?,
        None => match head.trained_weight(mode)? {
            Some((w, bias)) if grad_enabled() => {
                chunked_trained(&hs, &w, bias.as_ref(), &tg, opts)?
            }
            // Without a graph a trained weight is a plain product.
            Some((w, bias)) => {
                chunked(&hs, &w.f_detach()?, bias.map(|b| b.detach()).as_ref(), &tg, opts)?
            }
            None => through_head(head, mode, &hs, &tg, opts)?,
        },
    };
    let scatter = |x: &Tensor, kind: Kind| -> Result<Tensor> {
        let zeros = Tensor::f_zeros([b * t], (kind, hidden.device()))?;
        Ok(zeros.f_index_copy(0, &idx, &x.f_to_kind(kind)?)?.f_view([b, t])?)
    };
    let mut logps = scatter(&sel.logps, sel.logps.kind())?;
    if idx.size()[0] == 0 && hidden.requires_grad() {
        // No target at all: a zero that still depends on the graph, so backward runs.
        logps = logps.f_add(&hidden.f_sum(Kind::Float)?.f_mul_scalar(0.0)?)?;
    }
    Ok(TargetOutputs {
        logps,
        correct: scatter(&sel.correct, Kind::Bool)?,
        entropy: sel.entropy.map(|e| scatter(&e, Kind::Float)).transpose()?,
    })
}

/// Per selected position: log-probability, argmax hit, entropy.
struct Selected {
    logps: Tensor,
    correct: Tensor,
    entropy: Option<Tensor>,
}

/// The frozen, plain head: chunks without a graph, the gradient attached (module docs).
fn chunked(
    hs: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    tg: &Tensor,
    opts: TargetOptions,
) -> Result<Selected> {
    let n = hs.size()[0];
    let vocab = w.size()[0];
    let want_grad = hs.requires_grad() && grad_enabled();
    let rows = chunk_rows(vocab);
    let (mut logps, mut correct, mut entropy, mut grads) = (vec![], vec![], vec![], vec![]);
    tch::no_grad(|| -> Result<()> {
        let mut start = 0;
        while start < n {
            let len = rows.min(n - start);
            let h = hs.f_narrow(0, start, len)?.f_detach()?;
            let c = chunk_stats(&h, w, bias, &tg.f_narrow(0, start, len)?, opts, want_grad)?;
            logps.push(c.logp);
            correct.push(c.correct);
            entropy.extend(c.entropy);
            grads.extend(c.grad);
            start += len;
        }
        Ok(())
    })?;
    let cat = |v: &[Tensor], kind: Kind| -> Result<Tensor> {
        Ok(if v.is_empty() {
            Tensor::f_zeros([0], (kind, hs.device()))?
        } else {
            Tensor::f_cat(v, 0)?
        })
    };
    let mut lp = cat(&logps, Kind::Float)?;
    if want_grad && n > 0 {
        let g = cat(&grads, Kind::Float)?;
        // Exactly zero in value; its gradient for `hs` is `g` (module docs).
        let zero = hs.f_sub(&hs.f_detach()?)?.f_to_kind(Kind::Float)?;
        lp = lp.f_add(&zero.f_mul(&g)?.f_sum_dim_intlist(
            [-1i64].as_slice(),
            false,
            None::<Kind>,
        )?)?;
    }
    Ok(Selected {
        logps: lp,
        correct: cat(&correct, Kind::Bool)?,
        entropy: if opts.entropy { Some(cat(&entropy, Kind::Float)?) } else { None },
    })
}

/// A head whose weight trains, with a graph: each chunk of positions is a checkpointed block
/// of `(hidden, W[, b])` (module docs) returning `[n, 3]`: log-probability, entropy (zeros
/// unless asked) and argmax hit (no gradient).
fn chunked_trained(
    hs: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    tg: &Tensor,
    opts: TargetOptions,
) -> Result<Selected> {
    let n = hs.size()[0];
    let vocab = w.size()[0];
    let rows = chunk_rows(vocab);
    let mut parts = Vec::new();
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let h = hs.f_narrow(0, start, len)?;
        let targets = tg.f_narrow(0, start, len)?.f_unsqueeze(-1)?;
        let mut inputs = vec![&h, w];
        inputs.extend(bias);
        let block = move |x: &[Tensor]| -> Result<Tensor> {
            let mut logits = x[0].f_linear(&x[1], x.get(2))?.f_to_kind(Kind::Float)?;
            if opts.temperature != 1.0 {
                logits = logits.f_div_scalar(opts.temperature)?;
            }
            let lse = logits.f_logsumexp([-1i64].as_slice(), true)?;
            let logp = logits.f_gather(-1, &targets, false)?.f_sub(&lse)?;
            let entropy = if opts.entropy {
                let p = logits.f_sub(&lse)?.f_exp()?;
                lse.f_sub(&p.f_mul(&logits)?.f_sum_dim_intlist(
                    [-1i64].as_slice(),
                    true,
                    None::<Kind>,
                )?)?
            } else {
                logp.f_zeros_like()?
            };
            let hit = logits.f_argmax(-1, true)?.f_eq_tensor(&targets)?.f_to_kind(Kind::Float)?;
            Ok(Tensor::f_cat(&[logp, entropy, hit], -1)?)
        };
        parts.push(super::checkpoint::checkpoint(&inputs, block)?);
        start += len;
    }
    let all = if parts.is_empty() {
        Tensor::f_zeros([0, 3], (Kind::Float, hs.device()))?
    } else {
        Tensor::f_cat(&parts, 0)?
    };
    Ok(Selected {
        logps: all.f_select(1, 0)?,
        correct: all.f_select(1, 2)?.f_detach()?.f_gt(0.5)?,
        entropy: if opts.entropy { Some(all.f_select(1, 1)?) } else { None },
    })
}

/// One chunk's statistics.
struct ChunkStats {
    logp: Tensor,
    correct: Tensor,
    entropy: Option<Tensor>,
    /// `∂ logp / ∂ h`, `[n, hidden]` fp32.
    grad: Option<Tensor>,
}

fn chunk_stats(
    h: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    tg: &Tensor,
    opts: TargetOptions,
    want_grad: bool,
) -> Result<ChunkStats> {
    let mut logits = h.f_linear(w, bias)?.f_to_kind(Kind::Float)?;
    if opts.temperature != 1.0 {
        logits = logits.f_div_scalar(opts.temperature)?;
    }
    let tgc = tg.f_unsqueeze(-1)?;
    let lse = logits.f_logsumexp([-1i64].as_slice(), true)?;
    let logp = logits.f_gather(-1, &tgc, false)?.f_sub(&lse)?.f_squeeze_dim(-1)?;
    let (_, argmax) = logits.f_max_dim(-1, false)?;
    let correct = argmax.f_eq_tensor(tg)?;
    if !want_grad && !opts.entropy {
        return Ok(ChunkStats { logp, correct, entropy: None, grad: None });
    }
    let mut p = logits.f_sub(&lse)?.f_exp_()?;
    let entropy = if opts.entropy {
        let expected =
            p.f_mul(&logits)?.f_sum_dim_intlist([-1i64].as_slice(), false, None::<Kind>)?;
        Some(lse.f_squeeze_dim(-1)?.f_sub(&expected)?)
    } else {
        None
    };
    drop(logits);
    let grad = if want_grad {
        // (onehot − p) / τ, then through the head: [n, V] · [V, H].
        let _ = p.f_neg_()?;
        let ones = Tensor::f_ones([tgc.size()[0], 1], (Kind::Float, p.device()))?;
        let _ = p.f_scatter_add_(-1, &tgc, &ones)?;
        if opts.temperature != 1.0 {
            let _ = p.f_div_scalar_(opts.temperature)?;
        }
        Some(p.f_to_kind(w.kind())?.f_matmul(w)?.f_to_kind(Kind::Float)?)
    } else {
        None
    };
    Ok(ChunkStats { logp, correct, entropy, grad })
}

/// A head that is not a plain frozen product: the selected positions through it, with
/// autograd, scored as objectives score full logits ([`logps_from_logits`]).
fn through_head(
    head: &FrozenLinear,
    mode: LinearMode<'_>,
    hs: &Tensor,
    tg: &Tensor,
    opts: TargetOptions,
) -> Result<Selected> {
    let logits = head.forward(hs, mode)?.f_unsqueeze(0)?;
    let flags = if opts.entropy { ForwardFlags::TARGET_ENTROPY } else { ForwardFlags::NONE };
    let out = logps_from_logits(&logits, &tg.f_unsqueeze(0)?, opts.temperature, flags)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let row = |t: Tensor| t.f_squeeze_dim(0);
    Ok(Selected {
        logps: row(out.logps)?,
        correct: row(out.correct)?,
        entropy: out.entropy.map(row).transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        a.f_sub(b).unwrap().abs().max().double_value(&[])
    }

    /// The full-logits computation the chunks replace, as the objectives did it.
    fn reference(w: &Tensor, hidden: &Tensor, targets: &Tensor, tau: f64) -> (Tensor, Tensor) {
        let logits = hidden.linear::<Tensor>(w, None).f_div_scalar(tau).unwrap();
        let lp = logits.log_softmax(-1, Kind::Float);
        let valid = targets.ge(0);
        let got = lp.gather(-1, &targets.clamp_min(0).unsqueeze(-1), false).squeeze_dim(-1);
        let ent = (lp.exp() * &lp).sum_dim_intlist([-1i64].as_slice(), false, Kind::Float).neg();
        (got.where_scalarother(&valid, 0.0), ent.where_scalarother(&valid, 0.0))
    }

    /// Values within 1e-6 and gradients (through a nonlinear loss of the log-probabilities)
    /// within 1e-5 of the full logits, over several chunks, with a temperature.
    #[test]
    fn chunks_equal_the_full_logits_in_value_and_gradient() {
        tch::manual_seed(3);
        let (b, t, h, v) = (3i64, 50i64, 16i64, 40_000i64);
        let w = Tensor::randn([v, h], (Kind::Float, Device::Cpu)).f_mul_scalar(0.3).unwrap();
        let head = FrozenLinear::new("lm_head", w.shallow_clone(), None);
        let hidden = Tensor::randn([b, t, h], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let targets = Tensor::randint(v, [b, t], (Kind::Int64, Device::Cpu));
        let _ = targets.narrow(1, 0, 7).fill_(-100);
        let opts = TargetOptions { temperature: 0.7, entropy: true };
        let out = target_logps(&head, LinearMode::BASE, &hidden, &targets, opts).unwrap();
        let (want, want_ent) = reference(&w, &hidden, &targets, 0.7);
        assert!(max_diff(&out.logps, &want) < 1e-5, "{}", max_diff(&out.logps, &want));
        assert!(max_diff(out.entropy.as_ref().unwrap(), &want_ent) < 1e-4);
        // A loss that weights tokens unequally: DPO-like sigmoid of row sums.
        let loss = |lp: &Tensor| {
            lp.sum_dim_intlist([-1i64].as_slice(), false, Kind::Float).sigmoid().sum(Kind::Float)
        };
        let ours = Tensor::run_backward(&[loss(&out.logps)], &[&hidden], false, false);
        let theirs = Tensor::run_backward(&[loss(&want)], &[&hidden], false, false);
        assert!(max_diff(&ours[0], &theirs[0]) < 1e-5, "{}", max_diff(&ours[0], &theirs[0]));
        let mask = targets.ge(0);
        let argmax = hidden.linear::<Tensor>(&w, None).argmax(-1, false);
        let hits = argmax.eq_tensor(&targets).logical_and(&mask);
        assert!(out.correct.equal(&hits));
    }

    /// SFT's mean token loss from the chunks equals `cross_entropy` within 1e-6.
    #[test]
    fn sft_loss_equals_cross_entropy() {
        tch::manual_seed(4);
        let (t, h, v) = (64i64, 8i64, 3000i64);
        let w = Tensor::randn([v, h], (Kind::Float, Device::Cpu));
        let head = FrozenLinear::new("lm_head", w.shallow_clone(), None);
        let hidden = Tensor::randn([1, t, h], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let targets = Tensor::randint(v, [1, t], (Kind::Int64, Device::Cpu));
        let opts = TargetOptions { temperature: 1.0, entropy: false };
        let out = target_logps(&head, LinearMode::BASE, &hidden, &targets, opts).unwrap();
        let ours = out.logps.sum(Kind::Float).neg().f_div_scalar(t as f64).unwrap();
        let logits = hidden.linear::<Tensor>(&w, None).view([t, v]);
        let ce = logits.cross_entropy_loss::<Tensor>(
            &targets.view([t]),
            None,
            tch::Reduction::Mean,
            -100,
            0.0,
        );
        assert!((ours.double_value(&[]) - ce.double_value(&[])).abs() < 1e-6);
        let g1 = Tensor::run_backward(&[ours], &[&hidden], false, false);
        let g2 = Tensor::run_backward(&[ce], &[&hidden], false, false);
        assert!(max_diff(&g1[0], &g2[0]) < 1e-5);
    }

    /// No target at all: zeros that still reach the graph; bad targets are errors.
    #[test]
    fn no_targets_and_bad_targets() {
        let head =
            FrozenLinear::new("lm_head", Tensor::ones([5, 2], (Kind::Float, Device::Cpu)), None);
        let hidden = Tensor::ones([1, 3, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let none = Tensor::full([1, 3], -1, (Kind::Int64, Device::Cpu));
        let opts = TargetOptions { temperature: 1.0, entropy: false };
        let out = target_logps(&head, LinearMode::BASE, &hidden, &none, opts).unwrap();
        assert_eq!(out.logps.abs().sum(Kind::Float).double_value(&[]), 0.0);
        out.logps.sum(Kind::Float).backward();
        let big = Tensor::full([1, 3], 5, (Kind::Int64, Device::Cpu));
        let e = target_logps(&head, LinearMode::BASE, &hidden, &big, opts).err().unwrap();
        assert!(format!("{e}").contains("outside the vocabulary"), "{e}");
        let e =
            target_logps(&head, LinearMode::BASE, &hidden, &none.view([3, 1]), opts).err().unwrap();
        assert!(format!("{e}").contains("target_ids must be"), "{e}");
    }

    /// A head whose weight trains is chunked (checkpointed blocks): values, entropies, hits,
    /// and the gradients of both the hidden states and the weight equal plain autograd over
    /// the full logits, over several chunks.
    #[test]
    fn a_trained_head_is_chunked_with_the_weight_gradient() {
        tch::manual_seed(6);
        let (b, t, h, v) = (2i64, 40i64, 8i64, 300_000i64);
        let w = Tensor::randn([v, h], (Kind::Float, Device::Cpu)).f_mul_scalar(0.3).unwrap();
        let mut head = FrozenLinear::new("lm_head", w.shallow_clone(), None);
        let trained = w.copy().set_requires_grad(true);
        head.base_mut().weight = trained.shallow_clone();
        let hidden = Tensor::randn([b, t, h], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let targets = Tensor::randint(v, [b, t], (Kind::Int64, Device::Cpu));
        let _ = targets.narrow(1, 0, 5).fill_(-100);
        let opts = TargetOptions { temperature: 0.8, entropy: true };
        let out = target_logps(&head, LinearMode::BASE, &hidden, &targets, opts).unwrap();
        let w2 = w.copy().set_requires_grad(true);
        let (want, want_ent) = reference(&w2, &hidden, &targets, 0.8);
        assert!(max_diff(&out.logps, &want) < 1e-5, "{}", max_diff(&out.logps, &want));
        assert!(max_diff(out.entropy.as_ref().unwrap(), &want_ent) < 1e-4);
        let hits = hidden
            .linear::<Tensor>(&w, None)
            .argmax(-1, false)
            .eq_tensor(&targets)
            .logical_and(&targets.ge(0));
        assert!(out.correct.equal(&hits));
        let loss = |lp: &Tensor, e: &Tensor| {
            (lp.sum_dim_intlist([-1i64].as_slice(), false, Kind::Float).sigmoid()
                + e.sum(Kind::Float) * 0.01)
                .sum(Kind::Float)
        };
        let ours = Tensor::run_backward(
            &[loss(&out.logps, out.entropy.as_ref().unwrap())],
            &[&hidden, &trained],
            false,
            false,
        );
        let theirs = Tensor::run_backward(&[loss(&want, &want_ent)], &[&hidden, &w2], false, false);
        for (i, what) in ["hidden", "weight"].iter().enumerate() {
            let d = max_diff(&ours[i], &theirs[i]);
            assert!(d < 1e-5, "{what} gradient differs by {d}");
        }
    }

    /// A head whose weight takes gradients keeps a graph (one chunk) and matches too.
    #[test]
    fn a_trained_head_keeps_a_graph() {
        tch::manual_seed(5);
        let w = Tensor::randn([50, 4], (Kind::Float, Device::Cpu));
        let mut head = FrozenLinear::new("lm_head", w.shallow_clone(), None);
        head.base_mut().weight = w.shallow_clone().set_requires_grad(true);
        assert!(head.plain_weight(LinearMode::BASE).is_none());
        let hidden = Tensor::randn([2, 6, 4], (Kind::Float, Device::Cpu));
        let targets = Tensor::randint(50, [2, 6], (Kind::Int64, Device::Cpu));
        let opts = TargetOptions { temperature: 1.0, entropy: false };
        let out = target_logps(&head, LinearMode::BASE, &hidden, &targets, opts).unwrap();
        let (want, _) = reference(&w, &hidden, &targets, 1.0);
        assert!(max_diff(&out.logps, &want) < 1e-5);
        assert!(out.logps.requires_grad());
    }
}
