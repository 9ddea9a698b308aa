//! The root module a plugin library exports, and what it says about its plugins.
#![allow(non_camel_case_types)]
use abi_stable::library::RootModule;
use abi_stable::package_version_strings;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RResult, RStr, RString, RVec};
use abi_stable::StableAbi;

use crate::error::PluginError;
use crate::kinds::adapter::AdapterMethodBox;
use crate::kinds::dataset::DatasetFormatBox;
use crate::kinds::memory::MemoryStrategyBox;
use crate::kinds::objective::ObjectiveBox;
use crate::kinds::quantizer::QuantizerBox;
use crate::kinds::reward::RewardBox;

/// The kind of a plugin, as a number so new kinds can be added without breaking the ABI.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PluginKind(pub u32);

impl PluginKind {
    /// How a frozen base layer is adapted (LoRA, DoRA, IA3, …).
    pub const ADAPTER: Self = Self(1);
    /// How a frozen base weight is stored and applied (NF4, int8).
    pub const QUANTIZER: Self = Self(2);
    /// The loss of one training step (SFT, DPO, GRPO, …).
    pub const OBJECTIVE: Self = Self(3);
    /// Scores completions for online objectives.
    pub const REWARD: Self = Self(4);
    /// Reads one on-disk format into canonical samples.
    pub const DATASET: Self = Self(5);
    /// Where parameters, gradients and optimizer state live; the optimizer step.
    pub const MEMORY: Self = Self(6);

    pub const ALL: [Self; 6] = [
        Self::ADAPTER,
        Self::QUANTIZER,
        Self::OBJECTIVE,
        Self::REWARD,
        Self::DATASET,
        Self::MEMORY,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::ADAPTER => "adapter",
            Self::QUANTIZER => "quantizer",
            Self::OBJECTIVE => "objective",
            Self::REWARD => "reward",
            Self::DATASET => "dataset",
            Self::MEMORY => "memory",
            _ => "unknown",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == text)
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            "unknown" => write!(f, "unknown kind #{}", self.0),
            n => f.write_str(n),
        }
    }
}

/// What a library says about one plugin it exports.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct PluginInfo {
    pub name: RString,
    pub kind: PluginKind,
    pub version: RString,
    pub description: RString,
}

/// The root module of a plugin library (an abi_stable prefix type: fields may be appended
/// after `create_memory`, read by the host as `Option`s). abi_stable lets an older host load
/// a library with more fields, but refuses a library with fewer fields than the host's: a
/// field appended here makes libraries built before it unloadable, so it needs a new
/// plugin-API series. An optional capability that older libraries must keep loading without
/// is a separate C symbol instead (see [`CONFIG_SCHEMA_SYMBOL`]).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModule_Ref)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// The plugins this library exports.
    pub plugins: extern "C" fn() -> RVec<PluginInfo>,
    pub create_adapter: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<AdapterMethodBox, PluginError>,
    pub create_quantizer: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<QuantizerBox, PluginError>,
    pub create_objective: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<ObjectiveBox, PluginError>,
    pub create_reward: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<RewardBox, PluginError>,
    pub create_dataset: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<DatasetFormatBox, PluginError>,
    #[sabi(last_prefix_field)]
    pub create_memory: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<MemoryStrategyBox, PluginError>,
    /// The capabilities of memory plugin `name` configured by the JSON (appended after the
    /// prefix: `None` for libraries built before it, which then report none).
    #[sabi(missing_field(option))]
    pub memory_capabilities:
        extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<RVec<RString>, PluginError>,
}

/// The plain C symbol through which a library gives its plugins' config schemas
/// ([`ConfigSchemaFn`]). Optional: a library built before it lacks it and its plugins report
/// no schema.
///
/// Not a field of [`PluginModule`]: abi_stable refuses a library whose root module has fewer
/// fields than the host's (`check_fields`: the interface may not have more fields than the
/// implementation), so a new field would lock out every library built before it. A new
/// symbol does not; the host looks it up only after the manifest and abi_stable's layout
/// check have passed, so every type in its signature has been checked already (`PluginKind`
/// and `RString` through `PluginInfo`, `RStr` and `RResult<_, PluginError>` through the
/// constructors). Its signature is frozen for the plugin-API series.
pub const CONFIG_SCHEMA_SYMBOL: &[u8] = b"ferrotune_plugin_config_schema\0";

/// The signature of [`CONFIG_SCHEMA_SYMBOL`]: the JSON Schema of the config keys of plugin
/// `name` of `kind`, as JSON text; empty when the plugin declares none.
pub type ConfigSchemaFn = extern "C" fn(PluginKind, RStr<'_>) -> RResult<RString, PluginError>;

impl RootModule for PluginModule_Ref {
    abi_stable::declare_root_module_statics! {PluginModule_Ref}
    const BASE_NAME: &'static str = "ferrotune_plugin";
    const NAME: &'static str = "ferrotune_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
