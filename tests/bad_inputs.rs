//! Hostile but realistic inputs, one case per class of bad input (issue "Hardening"): each
//! case asserts the exit status (or HTTP status), that the message names the file, key, row or
//! request field at fault, and that nothing was half-written or lost. Run after
//! `cargo build --workspace` (the cases run the built `ferrotune` binary and plugins).
//!
//! The README's "bad input → answer" table counts the cases of each module.
#[path = "bad_inputs/adapters.rs"]
mod adapters;
#[path = "bad_inputs/data.rs"]
mod data;
#[path = "bad_inputs/plugins.rs"]
mod plugins;
#[path = "bad_inputs/serve.rs"]
mod serve;
#[path = "bad_inputs/train.rs"]
mod train;
