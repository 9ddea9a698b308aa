//! ZeRO stage 3: a model's large weights split over the ranks of a process group, each rank
//! keeping 1/world of every such weight and gathering the whole weight just before it is used.
//!
//! A [`WeightShard`] is one rank's part of one weight: elements `rank·len .. (rank+1)·len` of
//! the flattened weight zero-padded to `len·world`, `len = ⌈numel / world⌉`, on the weight's
//! device or in CPU memory (`offload`). The model keeps a zero-strided stand-in of the weight's
//! shape, dtype and device in the weight's place (no storage of its own) for whoever reads
//! shapes. Two kinds:
//!
//! - **Frozen** ([`crate::model::linear::FrozenLinear::shard_weight`]): the weight takes no
//!   gradient. A forward that records gradients runs
//!   [`crate::model::checkpoint::regather_linear`], which gathers again in backward for the
//!   input gradient instead of keeping the gathered weight.
//! - **Partitioned**, a trainable weight in full fine-tuning
//!   ([`crate::model::linear::FrozenLinear::partition_weight`],
//!   [`crate::model::CausalLM::partition_trainable`]): the shard is a leaf that requires grad,
//!   the optimizer's parameter. A linear layer runs
//!   [`crate::model::checkpoint::partitioned_linear`]: forward gathers `W` and keeps only `x`;
//!   backward gathers `W` again for `grad_x = grad_y W` and reduce-scatters (average)
//!   `grad_yᵀ x`, so each rank receives the average over ranks of its shard's gradient (with
//!   each rank's loss scaled by the world size, as the trainer does, the gradient of the global
//!   loss). The token embedding is made whole by
//!   [`crate::model::checkpoint::gather_partitioned`], whose backward reduce-scatters the
//!   embedding's gradient; a tied `lm_head` shares the embedding's shard leaf, so both uses
//!   accumulate into one gradient. Biases, norms and other 1-D tensors stay whole (DeepSpeed's
//!   parameter persistence threshold) and are reduced by the memory plugin as in stage 2.
//!
//! Without grad (evaluation, generation, the forward of a checkpointed layer) a weight is
//! gathered, used and dropped. Under gradient checkpointing a layer's weights are thus
//! gathered three times per step (forward, recomputation, backward) and the reduce-scatter
//! runs during the recomputation's backward.
//!
//! **Collective order.** Every gather (`all_gather`) and gradient reduce-scatter is a
//! collective: every rank must make the same ones in the same order or the group deadlocks.
//! Forward: the model's layer order, the same on every rank as long as every rank runs every
//! forward (the vision tower is never partitioned: a rank whose batch has no image skips it).
//! Backward: autograd's execution order, the same on every rank when the graphs around
//! partitioned weights agree (the same layers, the same `requires_grad`); a backward always
//! gathers, whatever its input needs, and always reduce-scatters a shard that requires grad.
//! The gradient is reduced in its own dtype (the model's, as DeepSpeed does by default).
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::{Collectives, ReduceOp};
use tch::{Device, Kind, Tensor};

use super::checkpoint::{gather_partitioned, grad_enabled, partitioned_linear, regather_linear};

/// The process group weights are partitioned over.
pub type Group = Arc<dyn Collectives + Send + Sync>;

/// This rank's part of a weight split over the ranks (see the module docs).
pub struct WeightShard {
    /// The weight's checkpoint key (`model.layers.0.self_attn.q_proj.weight`), for messages.
    name: String,
    /// Elements `rank·len .. (rank+1)·len` of the flattened weight, zero-padded at the end; a
    /// leaf that requires grad when the weight is trainable (partitioned).
    shard: Tensor,
    /// The whole weight's shape.
    shape: Vec<i64>,
    /// The whole weight's device (the shard may be offloaded to the CPU).
    device: Device,
    /// Whether the shard was put in CPU memory (`offload_param`).
    offload: bool,
    numel: i64,
    group: Group,
}

impl WeightShard {
    /// Keeps this rank's part of `weight` (a copy: `weight` may be dropped afterwards), in CPU
    /// memory when `offload`, as a leaf that requires grad when `trainable`.
    pub fn new(
        name: impl Into<String>,
        weight: &Tensor,
        group: Group,
        offload: bool,
        trainable: bool,
    ) -> Result<Self> {
        let name = name.into();
        let (world, rank) = (group.world_size() as i64, group.rank() as i64);
        let (numel, device) = (weight.numel() as i64, weight.device());
        let len = shard_len(numel, world);
        let shard_device = if offload { Device::Cpu } else { device };
        let shard = tch::no_grad(|| -> Result<Tensor> {
            let flat =
                weight.f_detach()?.f_reshape([-1])?.f_constant_pad_nd([0, len * world - numel])?;
            // A copy of its own: the slice would keep the whole padded weight alive.
            Ok(flat.f_narrow(0, rank * len, len)?.f_to_device(shard_device)?.f_detach_copy()?)
        })
        .with_context(|| format!("partitioning `{name}` over {world} ranks"))?;
        Ok(Self {
            name,
            shard: shard.set_requires_grad(trainable),
            shape: weight.size(),
            device,
            offload,
            numel,
            group,
        })
    }

    /// The shard: a leaf that requires grad when the weight is trainable.
    pub fn tensor(&self) -> &Tensor {
        &self.shard
    }

    /// The weight's checkpoint key.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the weight trains (its shard requires grad).
    pub fn is_trainable(&self) -> bool {
        self.shard.requires_grad()
    }

    /// Whether the shard is in CPU memory.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// The group the weight is split over.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// Bytes this rank holds for the weight (the shard's).
    pub fn resident_bytes(&self) -> usize {
        self.shard.numel() * self.shard.kind().elt_size_in_bytes()
    }

    /// Makes a frozen shard the trainable leaf of a partitioned weight (same values, no
    /// gather), moving it to the CPU when `offload` or back to the weight's device.
    pub(crate) fn make_trainable(&mut self, offload: bool) -> Result<()> {
        let to = if offload { Device::Cpu } else { self.device };
        self.shard = self.shard.f_to_device(to)?.f_detach()?.set_requires_grad(true);
        self.offload = offload;
        Ok(())
    }

    /// The whole weight on its device, gathered from every rank (a collective: see the module
    /// docs), outside autograd. An offloaded shard is copied to the device first, so that the
    /// gather runs there.
    ///
    /// The whole weight is written into one tensor as the parts arrive, `GATHER_WINDOW`
    /// elements per rank at a time, so the gather holds the weight and one window of parts,
    /// not every rank's part and then their concatenation (twice an embedding's size).
    pub fn gather(&self) -> Result<Tensor> {
        tch::no_grad(|| -> Result<Tensor> {
            let local = self.shard.f_detach()?.f_to_device(self.device)?;
            let len = local.size()[0];
            let world = self.group.world_size() as i64;
            let out = Tensor::f_empty([len * world], (local.kind(), self.device))?;
            let mut at = 0i64;
            while at < len {
                let w = GATHER_WINDOW.min(len - at);
                let parts = self.group.all_gather(&local.f_narrow(0, at, w)?)?;
                if parts.len() as i64 != world {
                    bail!("all_gather returned {} parts for {world} ranks", parts.len());
                }
                for (r, part) in parts.iter().enumerate() {
                    out.f_narrow(0, r as i64 * len + at, w)?.f_copy_(part)?;
                }
                at += w;
            }
            Ok(out.f_narrow(0, 0, self.numel)?.f_view(self.shape.as_slice())?)
        })
        .with_context(|| format!("gathering the partitioned weight `{}`", self.name))
    }

    /// This rank's part of the average over ranks of the whole weight's gradient `grad` (a
    /// reduce-scatter, itself a collective), in the shard's dtype and on its device.
    pub fn scatter_grad(&self, grad: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| -> Result<Tensor> {
            if grad.size() != self.shape {
                bail!("a gradient of shape {:?} for a weight of {:?}", grad.size(), self.shape);
            }
            let world = self.group.world_size() as i64;
            let len = shard_len(self.numel, world);
            let kind = self.shard.kind();
            let mut flat = grad.f_reshape([-1])?.f_to_kind(kind)?;
            if len * world > self.numel {
                flat = flat.f_constant_pad_nd([0, len * world - self.numel])?;
            }
            let out = Tensor::f_empty([len], (kind, flat.device()))?;
            self.group.reduce_scatter(&out, &flat, ReduceOp::AVG)?;
            Ok(out.f_to_device(self.shard.device())?)
        })
        .with_context(|| format!("reduce-scattering the gradient of `{}`", self.name))
    }

    /// The whole weight for ops that follow: differentiable (its backward reduce-scatters the
    /// gradient into the shard's, [`gather_partitioned`]) when the weight trains and autograd
    /// records, else a plain [`WeightShard::gather`].
    pub fn gather_for_use(&self) -> Result<Tensor> {
        if !(self.is_trainable() && grad_enabled()) {
            return self.gather();
        }
        let (g, s) = (self.share(), self.share());
        gather_partitioned(&self.shard, move || g.gather(), move |grad| s.scatter_grad(grad))
    }

    /// Rows `ids` (any shape, int64) of a partitioned `[rows, width]` matrix (the token
    /// embedding), as `embedding(W, ids)`. With a graph (a trainable shard) the backward never
    /// builds the dense `[rows, width]` gradient that `embedding`'s backward would (an
    /// embedding's size, then reduce-scattered): every rank's ids and row gradients are
    /// all-gathered (ranks may hold different token counts: padded to the largest with id −1)
    /// and each rank adds those that fall in its own elements of the flattened matrix, divided
    /// by the world size (the mean, as the reduce-scatter). The forward gathers the whole
    /// matrix, takes the rows and drops it.
    pub fn lookup_rows(&self, ids: &Tensor) -> Result<Tensor> {
        if !(self.is_trainable() && grad_enabled()) {
            return Ok(Tensor::f_embedding(&self.gather()?, ids, -1, false, false)?);
        }
        let (g, s) = (self.share(), self.share());
        let (ids_fwd, ids_bwd) = (ids.shallow_clone(), ids.shallow_clone());
        gather_partitioned(
            &self.shard,
            move || Ok(Tensor::f_embedding(&g.gather()?, &ids_fwd, -1, false, false)?),
            move |grad| s.scatter_rows(&ids_bwd, grad),
        )
    }

    /// [`WeightShard::lookup_rows`]'s backward: this rank's shard gradient from the rows'
    /// gradient `grad` (`[*ids.shape, width]`) of every rank.
    fn scatter_rows(&self, ids: &Tensor, grad: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| -> Result<Tensor> {
            let [rows, width] = self.shape[..] else {
                bail!("a row lookup of `{}`, which is not a matrix", self.name);
            };
            let world = self.group.world_size() as i64;
            let rank = self.group.rank() as i64;
            let len = shard_len(self.numel, world);
            let kind = self.shard.kind();
            let device = grad.device();
            let ids = ids.f_reshape([-1])?.f_to_kind(Kind::Int64)?.f_to_device(device)?;
            let grad = grad.f_reshape([-1, width])?.f_to_kind(kind)?;
            // The largest token count of any rank; the others pad to it.
            let n = ids.size()[0];
            let most = Tensor::from_slice(&[n]);
            self.group.all_reduce(&most, ReduceOp::MAX)?;
            let most = most.f_int64_value(&[0])?;
            let ids =
                Tensor::f_cat(&[ids, Tensor::f_full([most - n], -1, (Kind::Int64, device))?], 0)?;
            let grad = grad.f_constant_pad_nd([0, 0, 0, most - n])?;
            let all_ids = self.group.all_gather(&ids)?;
            let all_grads = self.group.all_gather(&grad)?;
            // This rank's elements [lo, hi) of the flattened matrix, in whole rows.
            let lo = (rank * len).min(self.numel);
            let hi = (lo + len).min(self.numel);
            let (row_lo, row_hi) = (lo / width, ((hi + width - 1) / width).min(rows));
            let mut block = Tensor::f_zeros([(row_hi - row_lo).max(0), width], (kind, device))?;
            for (ids, grad) in all_ids.iter().zip(&all_grads) {
                let ids = ids.f_to_device(device)?;
                let keep = ids.f_ge(row_lo)?.f_logical_and(&ids.f_lt(row_hi)?)?;
                let at = keep.f_nonzero()?.f_squeeze_dim(-1)?;
                let rows_here = ids.f_index_select(0, &at)?.f_sub_scalar(row_lo)?;
                let grads_here = grad.f_to_device(device)?.f_index_select(0, &at)?;
                let _ = block.f_index_add_(0, &rows_here, &grads_here)?;
            }
            let mine = block.f_reshape([-1])?.f_narrow(0, lo - row_lo * width, hi - lo)?;
            let mine =
                if hi - lo < len { mine.f_constant_pad_nd([0, len - (hi - lo)])? } else { mine };
            Ok(mine.f_div_scalar(world as f64)?.f_to_device(self.shard.device())?)
        })
        .with_context(|| format!("reduce-scattering the row gradients of `{}`", self.name))
    }

    /// `x Wᵀ + b` (see the module docs): gather and multiply without grad; with grad, a
    /// trainable weight runs [`partitioned_linear`] and a frozen one [`regather_linear`]; a
    /// bias that requires grad is added by ordinary autograd.
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if !grad_enabled() {
            return Ok(x.f_linear(&self.gather()?, bias)?);
        }
        if self.is_trainable() {
            let (g, s) = (self.share(), self.share());
            let y = partitioned_linear(
                x,
                &self.shard,
                move || g.gather(),
                move |grad| s.scatter_grad(grad),
            )?;
            return Ok(match bias {
                Some(b) => y.f_add(b)?,
                None => y,
            });
        }
        // Every rank must gather in backward for every layer, whatever its data: an input that
        // does not require grad (frozen embeddings on a rank whose batch has no image, while
        // another's carries the trainable merger's output) becomes a leaf that does, so that
        // no rank skips a backward gather the others make.
        let x = if x.requires_grad() {
            x.shallow_clone()
        } else {
            x.f_detach()?.set_requires_grad(true)
        };
        let g = self.share();
        match bias {
            Some(b) if b.requires_grad() => {
                Ok(regather_linear(&x, None, move || g.gather())?.f_add(b)?)
            }
            _ => regather_linear(&x, bias, move || g.gather()),
        }
    }

    /// The same shard (the same leaf: gradients reach one tensor), for a closure that outlives
    /// the borrow or a second user (a tied `lm_head`).
    pub fn share(&self) -> WeightShard {
        WeightShard {
            name: self.name.clone(),
            shard: self.shard.shallow_clone(),
            shape: self.shape.clone(),
            device: self.device,
            offload: self.offload,
            numel: self.numel,
            group: self.group.clone(),
        }
    }
}

/// Elements per rank and all-gather call of [`WeightShard::gather`] (32 MiB of fp32).
const GATHER_WINDOW: i64 = 1 << 23;

/// Elements per rank: `⌈numel / world⌉`.
pub fn shard_len(numel: i64, world: i64) -> i64 {
    (numel + world - 1) / world.max(1)
}

/// A tensor with `weight`'s shape, dtype and device and one element of storage (zero-strided),
/// standing in for a weight kept as a shard. Never requires grad.
pub fn stand_in(weight: &Tensor) -> Result<Tensor> {
    let ones = vec![1i64; weight.dim()];
    Ok(Tensor::f_zeros(ones.as_slice(), (weight.kind(), weight.device()))?
        .f_expand(weight.size(), false)?)
}

#[cfg(test)]
pub(crate) mod tests {
    //! An in-process group of ranks, one thread each, for tests that run every rank for real.
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    use ferrotune_plugin_api::{PluginError, PluginResult};

    use super::*;

    /// What the ranks of a [`ThreadGroup`] share: one slot per rank and a barrier.
    struct Shared {
        world: usize,
        state: Mutex<(Vec<Option<Tensor>>, usize, u64)>,
        turn: Condvar,
    }

    impl Shared {
        /// Waits until every rank arrives (a collective mismatch times out instead of hanging).
        fn barrier(&self) -> PluginResult<()> {
            let mut s = self.state.lock().unwrap();
            let generation = s.2;
            s.1 += 1;
            if s.1 == self.world {
                s.1 = 0;
                s.2 += 1;
                self.turn.notify_all();
                return Ok(());
            }
            while s.2 == generation {
                let (next, timeout) = self.turn.wait_timeout(s, Duration::from_secs(60)).unwrap();
                s = next;
                if timeout.timed_out() && s.2 == generation {
                    return Err(PluginError::runtime("a rank did not reach the collective"));
                }
            }
            Ok(())
        }

        /// Posts `t` as this rank's and returns every rank's (copies), in rank order.
        fn exchange(&self, rank: usize, t: &Tensor) -> PluginResult<Vec<Tensor>> {
            self.state.lock().unwrap().0[rank] = Some(t.detach().copy());
            self.barrier()?;
            let all =
                self.state.lock().unwrap().0.iter().map(|t| t.as_ref().unwrap().copy()).collect();
            self.barrier()?;
            Ok(all)
        }
    }

    /// One rank of an in-process group: each rank runs in its own thread.
    pub(crate) struct ThreadGroup {
        rank: usize,
        shared: Arc<Shared>,
        /// Collectives this rank made, by kind: (all_gather, reduce_scatter).
        pub counts: Mutex<(usize, usize)>,
    }

    impl ThreadGroup {
        /// The `world` ranks of one group.
        pub(crate) fn ranks(world: usize) -> Vec<Arc<ThreadGroup>> {
            let shared = Arc::new(Shared {
                world,
                state: Mutex::new(((0..world).map(|_| None).collect(), 0, 0)),
                turn: Condvar::new(),
            });
            (0..world)
                .map(|rank| {
                    Arc::new(ThreadGroup {
                        rank,
                        shared: shared.clone(),
                        counts: Mutex::new((0, 0)),
                    })
                })
                .collect()
        }
    }

    impl Collectives for ThreadGroup {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.shared.world
        }
        /// MAX only (a row lookup's token counts), through an exchange.
        fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> PluginResult<()> {
            assert_eq!(op, ReduceOp::MAX);
            let all = self.shared.exchange(self.rank, t)?;
            let mut max = all[0].shallow_clone();
            for other in &all[1..] {
                max = max.maximum(other);
            }
            t.shallow_clone().copy_(&max);
            Ok(())
        }
        fn broadcast(&self, _: &Tensor, _: usize) -> PluginResult<()> {
            unreachable!("not used by partitioned weights")
        }
        fn all_gather(&self, t: &Tensor) -> PluginResult<Vec<Tensor>> {
            self.counts.lock().unwrap().0 += 1;
            self.shared.exchange(self.rank, t)
        }
        fn reduce_scatter(
            &self,
            output: &Tensor,
            input: &Tensor,
            op: ReduceOp,
        ) -> PluginResult<()> {
            assert_eq!(op, ReduceOp::AVG);
            self.counts.lock().unwrap().1 += 1;
            let all = self.shared.exchange(self.rank, input)?;
            if all.iter().any(|t| t.size() != input.size()) {
                return Err(PluginError::runtime("reduce_scatter: ranks disagree on the shape"));
            }
            let sum = all.iter().skip(1).fold(all[0].shallow_clone(), |a, b| a + b);
            let world = self.shared.world as i64;
            let len = input.size()[0] / world;
            let mine = sum.narrow(0, self.rank as i64 * len, len) / world as f64;
            tch::no_grad(|| output.shallow_clone().copy_(&mine));
            Ok(())
        }
        fn barrier(&self) -> PluginResult<()> {
            self.shared.barrier()
        }
    }

    /// Two real ranks: each keeps its half (rank 1's padded), gathers the whole weight, and
    /// receives the average of both ranks' gradients restricted to its half.
    #[test]
    fn two_ranks_gather_the_weight_and_average_their_gradients() {
        let w = Tensor::randn([5, 3], (Kind::Double, Device::Cpu));
        let grads = [
            Tensor::randn([5, 3], (Kind::Double, Device::Cpu)),
            Tensor::randn([5, 3], (Kind::Double, Device::Cpu)),
        ];
        let mean = ((&grads[0] + &grads[1]) / 2.0).reshape([-1]);
        let want = [
            mean.narrow(0, 0, 8),
            Tensor::cat(
                &[mean.narrow(0, 8, 7), Tensor::zeros([1], (Kind::Double, Device::Cpu))],
                0,
            ),
        ];
        let handles: Vec<_> = ThreadGroup::ranks(2)
            .into_iter()
            .zip(grads.iter().map(|g| g.copy()))
            .map(|(group, grad)| {
                let w = w.copy();
                std::thread::spawn(move || {
                    let s = WeightShard::new("w", &w, group, false, true).unwrap();
                    assert!(s.is_trainable());
                    assert_eq!(s.tensor().size(), [8]);
                    let whole = s.gather().unwrap();
                    let diff = f64::try_from((&whole - &w).abs().max()).unwrap();
                    (diff, s.scatter_grad(&grad).unwrap())
                })
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            let (diff, got) = h.join().unwrap();
            assert_eq!(diff, 0.0, "rank {rank} gathers the weight");
            assert!(f64::try_from((got - &want[rank]).abs().max()).unwrap() < 1e-15, "rank {rank}");
        }
    }

    #[test]
    fn a_stand_in_has_the_shape_and_no_storage() {
        let w = Tensor::ones([4, 6], (Kind::BFloat16, Device::Cpu));
        let s = stand_in(&w).unwrap();
        assert_eq!((s.size(), s.stride(), s.kind()), (vec![4, 6], vec![0, 0], Kind::BFloat16));
        assert_eq!(shard_len(15, 2), 8);
        assert_eq!(shard_len(16, 4), 4);
    }
}
