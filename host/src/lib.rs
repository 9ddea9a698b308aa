//! ferrotune's host: loads plugins through the stable ABI and composes them into runs.
//!
//! The host owns model architectures, tokenization, the trainer and the CLI; every PEFT
//! method, objective, data set format and memory strategy is a plugin (see
//! `ferrotune-plugin-api`).

pub mod adapters;
pub mod atomic;
pub mod bench;
pub mod bench_memory;
pub mod checkpoint;
pub mod collectives;
pub mod data;
pub mod device;
pub mod dist_check;
pub mod generate;
pub mod launch;
pub mod linear;
pub mod model;
pub mod non_lora;
pub mod peft;
pub mod pipeline;
pub mod plot;
pub mod plugins;
pub mod quant;
pub mod rng;
pub mod selfcheck;
pub mod serve;
pub mod text;
pub mod train;
pub mod vision;

pub use ferrotune_plugin_api as api;
