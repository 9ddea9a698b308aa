//! `export_plugin!`: turns a plugin crate into a loadable ferrotune library.

/// The symbol name abi_stable looks up for a library's header (checked by a test against
/// `abi_stable::library::ROOT_MODULE_LOADER_NAME`).
pub const ROOT_MODULE_LOADER_SYMBOL: &str = "_1as_0lib_1header_0root_bmodule_bloader";

/// Exports the plugins of this library. One line at the end of a plugin's `lib.rs`:
///
/// ```text
/// export_plugin!(adapter: LowRank, reward: LengthReward);
/// ```
///
/// Each entry is `kind: Type` with kind one of `adapter`, `quantizer`, `objective`,
/// `reward`, `dataset`, `memory`; `Type` implements [`Plugin`](crate::Plugin) and that
/// kind's trait. The macro exports the manifest symbol (`ferrotune_plugin_manifest`) and the
/// abi_stable root module; every call into the library is guarded, so a panic becomes an
/// error value. The plugin crate needs no direct dependency on abi_stable. A complete
/// example is in the crate documentation.
#[macro_export]
macro_rules! export_plugin {
    ($($kind:ident : $ty:ty),+ $(,)?) => {
        /// The build fingerprint of this library (frozen C layout; see plugin-api).
        #[no_mangle]
        pub extern "C" fn ferrotune_plugin_manifest() -> *const $crate::fingerprint::Manifest {
            &$crate::fingerprint::BUILD_MANIFEST
        }

        #[doc(hidden)]
        // A library without a plugin of some kind never reads that constructor's config.
        #[allow(unused_variables)]
        pub mod __ferrotune_exports {
            #[allow(unused_imports)]
            use super::*;
            use $crate::__private::{RResult, RStr, RVec};
            use $crate::PluginError;

            pub extern "C" fn plugins() -> RVec<$crate::PluginInfo> {
                let mut v = RVec::new();
                $( v.push($crate::macros::info::<$ty>($crate::export_plugin!(@kind $kind))); )+
                v
            }
            pub extern "C" fn create_adapter(name: RStr<'_>, cfg: RStr<'_>) -> RResult<$crate::kinds::adapter::AdapterMethodBox, PluginError> {
                $( $crate::export_plugin!(@create adapter, $kind, $ty, name, cfg); )+
                $crate::macros::not_found($crate::PluginKind::ADAPTER, name)
            }
            pub extern "C" fn create_quantizer(name: RStr<'_>, cfg: RStr<'_>) -> RResult<$crate::kinds::quantizer::QuantizerBox, PluginError> {
                $( $crate::export_plugin!(@create quantizer, $kind, $ty, name, cfg); )+
                $crate::macros::not_found($crate::PluginKind::QUANTIZER, name)
            }
            pub extern "C" fn create_objective(name: RStr<'_>, cfg: RStr<'_>) -> RResult<$crate::kinds::objective::ObjectiveBox, PluginError> {
                $( $crate::export_plugin!(@create objective, $kind, $ty, name, cfg); )+
                $crate::macros::not_found($crate::PluginKind::OBJECTIVE, name)
            }
            pub extern "C" fn create_reward(name: RStr<'_>, cfg: RStr<'_>) -> RResult<$crate::kinds::reward::RewardBox, PluginError> {
                $( $crate::export_plugin!(@create reward, $kind, $ty, name, cfg); )+
                $crate::macros::not_found($crate::PluginKind::REWARD, name)
            }
            pub extern "C" fn create_dataset(name: RStr<'_>, cfg: RStr<'_>) -> RResult<$crate::kinds::dataset::DatasetFormatBox, PluginError> {
                $( $crate::export_plugin!(@create dataset, $kind, $ty, name, cfg); )+
                $crate::macros::not_found($crate::PluginKind::DATASET, name)
            }
            pub extern "C" fn create_memory(name: RStr<'_>, cfg: RStr<'_>) -> RResult<$crate::kinds::memory::MemoryStrategyBox, PluginError> {
                $( $crate::export_plugin!(@create memory, $kind, $ty, name, cfg); )+
                $crate::macros::not_found($crate::PluginKind::MEMORY, name)
            }
            pub extern "C" fn memory_capabilities(name: RStr<'_>, cfg: RStr<'_>) -> RResult<RVec<$crate::__private::RString>, PluginError> {
                $( $crate::export_plugin!(@caps $kind, $ty, name, cfg); )+
                $crate::macros::not_found($crate::PluginKind::MEMORY, name)
            }

            /// `ferrotune_plugin_config_schema` (plugin-api's `CONFIG_SCHEMA_SYMBOL`): the config schema of
            /// each plugin this library exports.
            #[no_mangle]
            pub extern "C" fn ferrotune_plugin_config_schema(kind: $crate::PluginKind, name: RStr<'_>) -> RResult<$crate::__private::RString, PluginError> {
                $( if kind == $crate::export_plugin!(@kind $kind) && name.as_str() == <$ty as $crate::Plugin>::NAME {
                    return $crate::macros::config_schema::<$ty>();
                } )+
                $crate::macros::not_found(kind, name)
            }

            pub fn root_module() -> $crate::PluginModule_Ref {
                $crate::__private::PrefixTypeTrait::leak_into_prefix($crate::PluginModule {
                    plugins,
                    create_adapter,
                    create_quantizer,
                    create_objective,
                    create_reward,
                    create_dataset,
                    create_memory,
                    memory_capabilities,
                })
            }

            extern "C" fn erased_root_module() -> $crate::__private::abi_stable::library::RootModuleResult {
                $crate::__private::abi_stable::library::__call_root_module_loader(root_module)
            }

            // What `#[abi_stable::export_root_module]` generates, spelled through this crate so
            // that plugins need no direct abi_stable dependency.
            #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
            pub static LIB_HEADER: $crate::__private::abi_stable::library::LibHeader = unsafe {
                $crate::__private::abi_stable::library::LibHeader::from_constructor::<$crate::PluginModule_Ref>(
                    erased_root_module,
                    $crate::__private::abi_stable::library::CheckTypeLayout::Yes,
                )
            };
        }
    };

    (@kind adapter) => { $crate::PluginKind::ADAPTER };
    (@kind quantizer) => { $crate::PluginKind::QUANTIZER };
    (@kind objective) => { $crate::PluginKind::OBJECTIVE };
    (@kind reward) => { $crate::PluginKind::REWARD };
    (@kind dataset) => { $crate::PluginKind::DATASET };
    (@kind memory) => { $crate::PluginKind::MEMORY };
    (@kind $other:ident) => {
        compile_error!(concat!("unknown plugin kind `", stringify!($other),
            "`: use adapter, quantizer, objective, reward, dataset or memory"))
    };

    (@create adapter, adapter, $ty:ty, $name:ident, $cfg:ident) => {
        if $name.as_str() == <$ty as $crate::Plugin>::NAME { return $crate::kinds::adapter::create::<$ty>($cfg); }
    };
    (@create quantizer, quantizer, $ty:ty, $name:ident, $cfg:ident) => {
        if $name.as_str() == <$ty as $crate::Plugin>::NAME { return $crate::kinds::quantizer::create::<$ty>($cfg); }
    };
    (@create objective, objective, $ty:ty, $name:ident, $cfg:ident) => {
        if $name.as_str() == <$ty as $crate::Plugin>::NAME { return $crate::kinds::objective::create::<$ty>($cfg); }
    };
    (@create reward, reward, $ty:ty, $name:ident, $cfg:ident) => {
        if $name.as_str() == <$ty as $crate::Plugin>::NAME { return $crate::kinds::reward::create::<$ty>($cfg); }
    };
    (@create dataset, dataset, $ty:ty, $name:ident, $cfg:ident) => {
        if $name.as_str() == <$ty as $crate::Plugin>::NAME { return $crate::kinds::dataset::create::<$ty>($cfg); }
    };
    (@create memory, memory, $ty:ty, $name:ident, $cfg:ident) => {
        if $name.as_str() == <$ty as $crate::Plugin>::NAME { return $crate::kinds::memory::create::<$ty>($cfg); }
    };
    (@create $want:ident, $kind:ident, $ty:ty, $name:ident, $cfg:ident) => {};

    (@caps memory, $ty:ty, $name:ident, $cfg:ident) => {
        if $name.as_str() == <$ty as $crate::Plugin>::NAME { return $crate::kinds::memory::capabilities::<$ty>($cfg); }
    };
    (@caps $kind:ident, $ty:ty, $name:ident, $cfg:ident) => {};
}

use abi_stable::std_types::{RResult, RStr, RString};

use crate::{guard, ErrorCode, Plugin, PluginError, PluginInfo, PluginKind};

#[doc(hidden)]
pub fn info<T: Plugin>(kind: PluginKind) -> PluginInfo {
    PluginInfo {
        name: T::NAME.into(),
        kind,
        version: T::VERSION.into(),
        description: T::DESCRIPTION.into(),
    }
}

/// Plugin side of the `ferrotune_plugin_config_schema` symbol: plugin `T`'s schema as JSON
/// text, empty when it declares none.
#[doc(hidden)]
pub fn config_schema<T: Plugin>() -> RResult<RString, PluginError> {
    guard(|| Ok(T::config_schema().map(|s| s.to_string()).unwrap_or_default().into()))
}

#[doc(hidden)]
pub fn not_found<T>(kind: PluginKind, name: RStr<'_>) -> RResult<T, PluginError> {
    RResult::RErr(PluginError::new(
        ErrorCode::NOT_FOUND,
        format!("this library exports no {kind} plugin named `{name}`"),
    ))
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use crate::{ErrorCode, PluginKind};
    use serde::Deserialize;

    #[test]
    fn loader_symbol_matches_abi_stable() {
        assert_eq!(super::ROOT_MODULE_LOADER_SYMBOL, abi_stable::library::ROOT_MODULE_LOADER_NAME);
    }

    /// A reward with a schema.
    #[derive(Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct Scaled {
        /// Multiplies the score.
        #[serde(default)]
        scale: f64,
    }
    impl Plugin for Scaled {
        const NAME: &'static str = "scaled";
        const VERSION: &'static str = "0";
        const DESCRIPTION: &'static str = "declares its schema";
        fn from_config(config_json: &str) -> PluginResult<Self> {
            parse_config(config_json)
        }
        fn config_schema() -> Option<serde_json::Value> {
            Some(schema_of::<Self>())
        }
    }
    impl Reward for Scaled {
        fn score(&self, inputs: &[RewardInput]) -> PluginResult<Vec<f64>> {
            Ok(vec![self.scale; inputs.len()])
        }
    }

    /// A reward as plugins were before schemas: none declared.
    pub struct Plain;
    impl Plugin for Plain {
        const NAME: &'static str = "plain";
        const VERSION: &'static str = "0";
        const DESCRIPTION: &'static str = "declares no schema";
        fn from_config(_: &str) -> PluginResult<Self> {
            Ok(Plain)
        }
    }
    impl Reward for Plain {
        fn score(&self, inputs: &[RewardInput]) -> PluginResult<Vec<f64>> {
            Ok(vec![0.0; inputs.len()])
        }
    }

    /// A schema that panics is an error value, not an unwinding across `extern "C"`.
    pub struct Panicky;
    impl Plugin for Panicky {
        const NAME: &'static str = "panicky";
        const VERSION: &'static str = "0";
        const DESCRIPTION: &'static str = "panics for its schema";
        fn from_config(_: &str) -> PluginResult<Self> {
            Ok(Panicky)
        }
        fn config_schema() -> Option<serde_json::Value> {
            panic!("no schema today")
        }
    }
    impl Reward for Panicky {
        fn score(&self, _: &[RewardInput]) -> PluginResult<Vec<f64>> {
            Ok(Vec::new())
        }
    }

    crate::export_plugin!(reward: Scaled, reward: Plain, reward: Panicky);

    #[test]
    fn exported_config_schema_answers_per_plugin() {
        let f: crate::module::ConfigSchemaFn = __ferrotune_exports::ferrotune_plugin_config_schema;
        let text = f(PluginKind::REWARD, "scaled".into()).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(v, schema_of::<Scaled>());
        assert_eq!(v["properties"]["scale"]["default"], 0.0);
        assert_eq!(v["properties"]["scale"]["description"], "Multiplies the score.");
        assert_eq!(f(PluginKind::REWARD, "plain".into()).unwrap().as_str(), "");
        let e = f(PluginKind::REWARD, "panicky".into()).unwrap_err();
        assert_eq!(e.code, ErrorCode::PANIC);
        assert!(e.message().contains("no schema today"), "{e}");
        let e = f(PluginKind::ADAPTER, "scaled".into()).unwrap_err();
        assert_eq!(e.code, ErrorCode::NOT_FOUND);
        assert!(e.message().contains("no adapter plugin named `scaled`"), "{e}");
    }
}
