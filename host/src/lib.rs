//! ferrotune's host: loads plugins through the stable ABI and composes them into runs.
//!
//! The host owns model architectures, tokenization, the trainer and the CLI; every PEFT
//! method, objective, data set format and memory strategy is a plugin (see
//! `ferrotune-plugin-api`).
//!
//! Layers, each importing only from those below it (the README's "How the host is laid out"):
//! `cli` → `board` → `bench`, `serve` → `train` → `generate` → `peft` → `data` → `dist` → `model` →
//! `vision`, `text` → `util`, with `plugins`, `device` and `selfcheck` beside them.

pub mod bench;
pub mod board;
pub mod cli;
pub mod data;
pub mod device;
pub mod dist;
pub mod generate;
pub mod model;
pub mod peft;
pub mod plugins;
pub mod selfcheck;
pub mod serve;
pub mod text;
pub mod train;
pub mod util;
pub mod vision;

pub use ferrotune_plugin_api as api;
