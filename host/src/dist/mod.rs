//! Several processes training one model: the c10d process group (Gloo, NCCL) behind the
//! plugin API's `Collectives`, the `launch` verb that starts the ranks, and `dist-check`.
pub mod check;
pub mod collectives;
pub mod launch;

use tch::Device;

/// The device of this rank of a run: [`resolve`], except that a plain `cuda` (no index) in a
/// launched run means `cuda:LOCAL_RANK`, one GPU per local rank as torchrun users expect
/// (`torch.cuda.set_device(local_rank)`). An explicit `cuda:N` is kept as written.
pub fn resolve_for_rank(text: &str) -> anyhow::Result<Device> {
    let local_rank = collectives::RankEnv::from_lookup_keeping(|k| std::env::var(k).ok(), true)?
        .map(|e| e.local_rank);
    crate::device::resolve_for_local_rank(text, local_rank)
}
