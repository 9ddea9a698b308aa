//! Decoder-only language models read from Hugging Face directories (Llama, Qwen2, Mistral, and
//! Qwen2-VL with its vision tower), their checkpoint loading, saving (`save_pretrained`), and random initialisation of new ones
//! (`init-model`), and ZeRO stage 3's partitioning of their weights over ranks ([`partition`]).
pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod init;
pub mod linear;
pub mod llama;
pub mod partition;
pub mod qwen2vl;
pub mod save;
pub mod target;
pub mod weights;

pub use config::{Architecture, LlamaConfig, Rope, SUPPORTED_ARCHITECTURES};
pub use init::{write_random_model, InitOptions, InitReport};
pub use llama::{CausalLM, ForwardArgs, Input, KvCache, Output, PromptInput};
pub use qwen2vl::{Qwen2VLConfig, VideoInputs, VisionConfig, VisionInputs};
