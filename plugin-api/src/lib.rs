//! The stable-ABI contract between the ferrotune host and its plugins.
//!
//! A plugin is a `cdylib` that depends on this crate (plus `tch` and ordinary crates, never
//! on the host). It implements [`Plugin`] and one kind trait per exported plugin, and ends
//! its `lib.rs` with one [`export_plugin!`] line:
//!
//! ```no_run
//! use ferrotune_plugin_api::prelude::*;
//! use serde::Deserialize;
//!
//! #[derive(Deserialize, JsonSchema)]
//! #[serde(deny_unknown_fields)]
//! pub struct Length {
//!     /// Reward per character of the completion.
//!     #[serde(default = "one")]
//!     per_char: f64,
//! }
//!
//! fn one() -> f64 {
//!     1.0
//! }
//!
//! impl Plugin for Length {
//!     const NAME: &'static str = "length";
//!     const VERSION: &'static str = "0.1.0";
//!     const DESCRIPTION: &'static str = "reward proportional to completion length";
//!     fn from_config(config_json: &str) -> PluginResult<Self> {
//!         parse_config(config_json)
//!     }
//!     fn config_schema() -> Option<serde_json::Value> {
//!         Some(schema_of::<Self>())
//!     }
//! }
//!
//! impl Reward for Length {
//!     fn score(&self, inputs: &[RewardInput]) -> PluginResult<Vec<f64>> {
//!         Ok(inputs.iter().map(|i| i.completion.len() as f64 * self.per_char).collect())
//!     }
//! }
//!
//! export_plugin!(reward: Length);
//! # fn main() {}
//! ```
//!
//! # What crosses the boundary
//! Only `abi_stable` types: `#[sabi_trait]` objects (the `Ffi*` traits), `RString`, `RVec`,
//! `RResult`, and `#[repr(C)]` structs. Plugin authors and the host never touch them
//! directly: each kind has a plain Rust trait (`AdapterMethod`, `Reward`, …) that takes
//! `tch::Tensor`s and returns [`PluginResult`]; a bridge turns an implementation into the FFI
//! object (catching panics), and a handle turns an FFI object back into an implementation of
//! the Rust trait. See [`tensor`] for the one ownership rule of tensors.
//!
//! # Compatibility and evolution
//! Every library carries a [`fingerprint::Manifest`] in a plain C symbol
//! (`ferrotune_plugin_manifest`) whose layout never changes. The host reads it first and
//! refuses, naming both sides, a plugin built against another plugin-API series (same major,
//! and for 0.x the same minor), another libtorch version, tch version or C++ ABI. Only then
//! does `abi_stable` check the type layouts.
//!
//! Within a plugin-API series changes are additive only:
//! * new capabilities of a kind are advertised through `capabilities()` strings;
//! * a field appended to the root module (after the `last_prefix_field`, read as an `Option`)
//!   lets an *older* host load newer plugins, but abi_stable refuses a library whose root
//!   module has fewer fields than the host's: new root-module fields (new kinds) are for a
//!   new series. An optional capability that older plugins must keep loading without is a
//!   new plain C symbol the host looks up after the layout check (see
//!   [`module::CONFIG_SCHEMA_SYMBOL`]);
//! * every `#[sabi_trait]` carries `#[sabi(last_prefix_field)]` on its last method from day
//!   one, so an older host can load a plugin whose trait gained a trailing method. A host
//!   whose trait gained a method cannot load older plugins (abi_stable refuses), so adding
//!   a method to an existing trait bumps the series (0.1 → 0.2) and plugins are rebuilt.
//! * [`Plugin`] itself never crosses the boundary: a provided fn added to it (such as
//!   [`Plugin::config_schema`]) reaches the host through such a symbol
//!   (`ferrotune_plugin_config_schema`), so a library built before it loads and reports none.

// sabi_trait expands impls inside a const block (abi_stable 0.11).
#![allow(non_local_definitions)]

pub mod blockwise;
pub mod config;
pub mod error;
pub mod fingerprint;
pub mod kinds;
pub mod module;
pub mod optim;
pub mod records;
pub mod sample;
pub mod schema;
pub mod targets;
pub mod tensor;

#[doc(hidden)]
pub mod macros;

pub use config::parse_config;
pub use error::{guard, ErrorCode, PluginError, PluginResult};
pub use fingerprint::{BuildFingerprint, Manifest};
pub use kinds::adapter::{
    module_name_matches, AdapterLayer, AdapterMethod, BaseLinear, ModelInfo, PromptKind, PromptSpec,
};
pub use kinds::dataset::{DataSource, DatasetFormat, SampleList, SampleReader};
pub use kinds::memory::{Collectives, MemoryStrategy, ReduceOp, StepReport};
pub use kinds::objective::{
    last_token_values, logps_from_logits, next_token_targets, take_output, target_logps, Batch,
    ForwardFlags, LossOutput, Objective, ObjectiveContext, RewardScores, TargetLogps,
    NEED_NUM_ITERATIONS, NEED_SCORE_HEAD, NEED_VALUE_HEAD, SCORES, TARGET_IDS, TARGET_TEMPERATURE,
    VALUES,
};
pub use kinds::quantizer::{QuantizedWeight, Quantizer};
pub use kinds::reward::{Reward, RewardInput};
pub use kinds::TrainParam;
pub use module::{PluginInfo, PluginKind, PluginModule, PluginModule_Ref};
pub use sample::{
    ImageSource, Message, Sample, VideoSource, FUNCTION_CALL_ROLE, IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
};
pub use schema::{schema_of, JsonSchema};
pub use tensor::{DType, DeviceCode, NamedTensor, OwnedTensor, TensorRef};

/// The version of this crate: the plugin-API version a plugin is built against.
pub const PLUGIN_API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Metadata and construction of one exported plugin. Pair it with exactly one kind trait.
pub trait Plugin: Sized + Send + 'static {
    /// The name a config uses to select this plugin (`adapter: {plugin: NAME}`).
    const NAME: &'static str;
    /// This plugin's own version (usually `env!("CARGO_PKG_VERSION")`).
    const VERSION: &'static str;
    /// One line for `ferrotune plugins`.
    const DESCRIPTION: &'static str;
    /// Builds the plugin from its configuration, JSON text. Errors name the offending key
    /// (see [`parse_config`]).
    fn from_config(config_json: &str) -> PluginResult<Self>;
    /// The JSON Schema of the keys `from_config` accepts (`ferrotune plugins --json`, the
    /// board's forms): an object schema whose `properties` list every key, with `default`s,
    /// bounds and doc comments as `description`s. Usually `Some(schema_of::<MyConfig>())` with
    /// `#[derive(Deserialize, JsonSchema)]` on the config struct (see [`schema`]); test it with
    /// [`schema::assert_schema_matches`]. `None` (the default) declares no schema.
    fn config_schema() -> Option<serde_json::Value> {
        None
    }
}

/// What a plugin's `lib.rs` usually needs.
pub mod prelude {
    pub use crate::schema::{schema_of, JsonSchema};
    pub use crate::{
        export_plugin, parse_config, AdapterLayer, AdapterMethod, BaseLinear, Batch, Collectives,
        DataSource, DatasetFormat, ForwardFlags, ImageSource, LossOutput, MemoryStrategy, Message,
        ModelInfo, Objective, ObjectiveContext, Plugin, PluginError, PluginResult, PromptKind,
        PromptSpec, QuantizedWeight, Quantizer, ReduceOp, Reward, RewardInput, Sample, SampleList,
        SampleReader, StepReport, TrainParam,
    };
    pub use tch::{Device, Kind, Tensor};
}

#[doc(hidden)]
pub mod __private {
    pub use abi_stable;
    pub use abi_stable::prefix_type::PrefixTypeTrait;
    pub use abi_stable::std_types::{RResult, RStr, RString, RVec};
    pub use schemars;
}
