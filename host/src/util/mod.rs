//! Small pieces every part of the host uses: atomic file writes, a seeded generator, this
//! process's memory figures (and giving freed memory back), and the safetensors reader and
//! writer.
pub mod alloc;
pub mod atomic;
pub mod procfs;
pub mod rng;
pub mod safetensors;
