//! The text side of a model folder, equal to transformers: the tokenizer
//! (`tokenizer.json` + `tokenizer_config.json`), its chat template and the decoding
//! defaults (`generation_config.json`).
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use ferrotune::text::{GenerationConfig, Tokenizer};
//! use ferrotune_plugin_api::Message;
//! let dir = std::path::Path::new("assets/qwen2-tokenizer");
//! let tok = Tokenizer::from_dir(dir)?;
//! let prompt = tok.apply_chat_template(&[Message::new("user", "Hi!")], true)?;
//! let ids = tok.encode(&prompt, false)?;
//! let gen = GenerationConfig::from_dir(dir)?.with_tokenizer_defaults(&tok);
//! assert_eq!(gen.eos_token_ids(), vec![151645]);
//! # let _ = ids; Ok(()) }
//! ```
mod chat_template;
mod generation_config;
pub mod pyformat;
mod tokenizer;
pub mod tool_calls;

pub use chat_template::{ChatTemplate, DEFAULT_TEMPLATE, TOOL_USE_TEMPLATE};
pub use generation_config::{GenerationConfig, GENERATION_CONFIG_FILE, MODEL_CONFIG_FILE};
pub use tokenizer::{
    SpecialTokens, Tokenizer, CHAT_TEMPLATES_DIR, CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
};
