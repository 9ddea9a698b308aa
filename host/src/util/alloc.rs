//! Giving freed memory back to the system at chosen points. The `ferrotune` binary runs on
//! jemalloc configured never to purge freed pages (see `main.rs`: a step frees and reallocates
//! the same large buffers, which page faults would slow), so its resident size is the largest
//! it has ever been. After one-off peaks — loading a whole model before ZeRO-3 partitions it,
//! writing a checkpoint — [`release_free_memory`] asks the allocator to return what is free.
//! A run that offloads to host memory (`offload_optimizer` / `offload_param: cpu`) calls
//! [`return_freed_memory`] once: from then on the allocator purges freed pages within a
//! second, so its resident size follows what is live (a step's transient buffers are then
//! faulted in afresh: slower on CPU).
//!
//! The binary installs the hooks ([`set_hooks`]); elsewhere (tests linking the library with
//! the system allocator) they do nothing.
use std::sync::OnceLock;

static RELEASE: OnceLock<fn()> = OnceLock::new();
static RETURN_FREED: OnceLock<fn()> = OnceLock::new();

/// Installs the allocator's purge and its switch to purging at once (once; later calls are
/// ignored).
pub fn set_hooks(release: fn(), return_freed: fn()) {
    let _ = RELEASE.set(release);
    let _ = RETURN_FREED.set(return_freed);
}

/// From now on, freed pages go back to the system within a second (and what is free now, at
/// once).
pub fn return_freed_memory() {
    if let Some(f) = RETURN_FREED.get() {
        f();
    }
    release_free_memory();
}

/// Returns the allocator's free pages to the system, when a hook is installed.
pub fn release_free_memory() {
    if let Some(release) = RELEASE.get() {
        release();
    }
}
