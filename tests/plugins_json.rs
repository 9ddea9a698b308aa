//! `ferrotune plugins --json` lists every plugin with the JSON Schema of its config keys
//! (`schema`, null for plugins that declare none), the same listing the board serves
//! (`ferrotune::plugins::plugins_json`); each schema's defaults build the plugin through the
//! host, across the plugin boundary; a library built before plugins exported schemas still
//! loads, its plugins listed with none.
use std::ffi::CString;
use std::path::Path;

use ferrotune::plugins::{plugins_json, Registry, SearchPath};
use ferrotune_plugin_api::module::CONFIG_SCHEMA_SYMBOL;
use ferrotune_plugin_api::PluginKind;
use ferrotune_tests::*;
use serde_json::{json, Map, Value};

/// The CLI's listing, parsed.
fn listed() -> Vec<Value> {
    let out = ferrotune(&["plugins", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    v["plugins"].as_array().expect("a `plugins` list").clone()
}

fn find<'a>(plugins: &'a [Value], name: &str) -> &'a Value {
    plugins
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("`{name}` is not listed: {plugins:?}"))
}

/// Values for the keys a plugin requires that have no default.
fn required_values(name: &str) -> Value {
    match name {
        "prompt_tuning" | "p_tuning" | "prefix_tuning" => json!({"num_virtual_tokens": 4}),
        "length" => json!({"mode": "target", "target": 10}),
        "format" => json!({"required_tags": ["answer"]}),
        _ => json!({}),
    }
}

#[test]
fn every_shipped_plugin_lists_a_schema_and_testkit_none() {
    let plugins = listed();
    for p in &plugins {
        for key in ["name", "kind", "version", "description", "library"] {
            assert!(p[key].is_string(), "`{key}` of {p}");
        }
        let name = p["name"].as_str().unwrap();
        let schema = &p["schema"];
        if name.starts_with("testkit-") {
            // The test kit declares no schemas: listed, with null.
            assert!(schema.is_null(), "{name}: {schema}");
            continue;
        }
        assert!(p["schema_error"].is_null(), "{name}: {}", p["schema_error"]);
        assert_eq!(schema["type"], "object", "{name}: {schema}");
        let props = schema["properties"].as_object().unwrap_or_else(|| panic!("{name}: {schema}"));
        assert!(schema["required"].is_array(), "{name}: {schema}");
        for (key, prop) in props {
            assert!(prop.is_object(), "{name}.{key}: {prop}");
        }
    }
    for name in ["sft", "dpo", "grpo", "alpaca", "sharegpt", "single", "zero", "lora"] {
        assert!(find(&plugins, name)["schema"].is_object(), "{name}");
    }
    let lora = &find(&plugins, "lora")["schema"]["properties"];
    assert_eq!((&lora["r"]["default"], &lora["r"]["minimum"]), (&json!(8), &json!(1)));
    assert_eq!(lora["lora_dropout"]["exclusiveMaximum"], 1);
    assert!(lora["r"]["description"].as_str().is_some_and(|d| d.contains("Rank")));
    // ZeRO-2 is `zero` with `stage: 2`, in the schema's range.
    let stage = &find(&plugins, "zero")["schema"]["properties"]["stage"];
    assert_eq!(
        (&stage["default"], &stage["minimum"], &stage["maximum"]),
        (&json!(1), &json!(1), &json!(3))
    );
    assert_eq!(find(&plugins, "single")["schema"]["properties"], json!({}));
    assert_eq!(find(&plugins, "grpo")["schema"]["properties"]["num_generations"]["minimum"], 2);
}

/// The in-process listing (what the board serves) is the CLI's, and every schema's defaults
/// (plus values for keys without one) build the plugin through the registry, while a value
/// the schema puts out of range is refused there too.
#[test]
fn schema_defaults_build_each_plugin_through_the_host() {
    let registry = registry();
    let in_process = plugins_json(&registry);
    let cli = listed();
    let mut built = 0;
    for p in in_process["plugins"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let kind = PluginKind::parse(p["kind"].as_str().unwrap()).unwrap();
        assert_eq!(p["schema"], find(&cli, name)["schema"], "{name}: CLI and in-process differ");
        assert_eq!(registry.config_schema(kind, name).unwrap().unwrap_or(Value::Null), p["schema"]);
        let Some(props) = p["schema"]["properties"].as_object() else { continue };
        let mut config: Map<String, Value> = props
            .iter()
            .filter_map(|(k, prop)| prop.get("default").map(|d| (k.clone(), d.clone())))
            .collect();
        config.extend(required_values(name).as_object().unwrap().clone());
        let text = Value::Object(config).to_string();
        let create = |cfg: &str| -> Result<(), String> {
            let e = |e: ferrotune::plugins::CreateError| e.to_string();
            match kind {
                PluginKind::ADAPTER => registry.adapter(name, cfg).map(drop).map_err(e),
                PluginKind::QUANTIZER => registry.quantizer(name, cfg).map(drop).map_err(e),
                PluginKind::OBJECTIVE => registry.objective(name, cfg).map(drop).map_err(e),
                PluginKind::REWARD => registry.reward(name, cfg).map(drop).map_err(e),
                PluginKind::DATASET => registry.dataset(name, cfg).map(drop).map_err(e),
                PluginKind::MEMORY => registry.memory(name, cfg).map(drop).map_err(e),
                other => panic!("unexpected kind {other}"),
            }
        };
        create(&text)
            .unwrap_or_else(|e| panic!("{name} refuses its schema's defaults {text}: {e}"));
        built += 1;
    }
    assert!(built >= 29, "only {built} plugins built from their schemas");
    let e = registry.adapter("lora", r#"{"r": 0}"#).err().expect("r = 0 is refused").to_string();
    assert!(e.contains("`r`"), "{e}");
    assert!(registry.config_schema(PluginKind::ADAPTER, "no-such-plugin").is_err());
}

/// Whether the loaded library at `path` exports the config-schema symbol (`dlsym` on the
/// library's own handle: it searches the library and its dependencies, never another plugin).
fn exports_schema_symbol(path: &Path) -> bool {
    let name = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: RTLD_NOLOAD only returns a handle to a library this process already loaded.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    assert!(!handle.is_null(), "{} is not loaded", path.display());
    // SAFETY: only the symbol's address is looked up.
    let f = unsafe { libc::dlsym(handle, CONFIG_SCHEMA_SYMBOL.as_ptr().cast()) };
    // SAFETY: drops the reference RTLD_NOLOAD took; the registry keeps its own.
    unsafe { libc::dlclose(handle) };
    !f.is_null()
}

/// A library as built before `ferrotune_plugin_config_schema` existed (the plugin-api copy's
/// macro exports no such symbol; its root module is the same) loads in this host, its
/// plugins work, and they report no schema, in the registry and in `plugins --json`.
#[test]
fn a_library_built_before_schemas_loads_and_reports_none() {
    let old = ferrotune_tests::external::build_external_plugin("before-schemas", &|api| {
        let macros = api.join("src/macros.rs");
        let text = std::fs::read_to_string(&macros).unwrap();
        let exported =
            "#[no_mangle]\n            pub extern \"C\" fn ferrotune_plugin_config_schema";
        assert!(text.contains(exported), "export_plugin! no longer exports the symbol this way");
        let text = text.replacen(exported, "pub extern \"C\" fn ferrotune_plugin_config_schema", 1);
        std::fs::write(&macros, text).unwrap();
        // The stand-in shares this build's root module, so it stands for older libraries only
        // while that module keeps the fields they were built with (abi_stable refuses a library
        // with fewer fields than the host's).
        let module = std::fs::read_to_string(api.join("src/module.rs")).unwrap();
        let body = module.split("pub struct PluginModule {").nth(1).unwrap();
        let body = &body[..body.find("\n}").unwrap()];
        let fields: Vec<&str> =
            body.lines().filter_map(|l| l.trim().strip_prefix("pub ")?.split(':').next()).collect();
        assert_eq!(
            fields,
            [
                "plugins",
                "create_adapter",
                "create_quantizer",
                "create_objective",
                "create_reward",
                "create_dataset",
                "create_memory",
                "memory_capabilities"
            ],
            "a field appended to PluginModule locks out every 0.2 library built before it"
        );
    });
    let dir = temp_dir("plugins-json-old");
    let lib = dir.join("libexternal_before_schemas.so");
    std::fs::copy(&old, &lib).unwrap();
    let mut registry = Registry::discover(&SearchPath::new(&[build_dir()], None, false));
    assert!(
        registry.add(&lib).is_some(),
        "refused: {:?}",
        registry.refused.last().map(|e| e.to_string())
    );
    assert!(!exports_schema_symbol(&lib), "the stand-in for an older library exports the symbol");
    assert!(exports_schema_symbol(&build_dir().join("libferrotune_lora.so")));
    assert_eq!(registry.config_schema(PluginKind::REWARD, "external-contains").unwrap(), None);
    assert!(registry.config_schema(PluginKind::ADAPTER, "lora").unwrap().is_some());
    assert!(registry.reward("external-contains", r#"{"needle": "cat"}"#).is_ok());

    let out = ferrotune(&["plugins", "--json", "--plugin-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["refused"], json!([]), "{}", v["refused"]);
    let old_plugins: Vec<&Value> = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["library"].as_str().is_some_and(|l| l.ends_with("libexternal_before_schemas.so"))
        })
        .collect();
    assert_eq!(old_plugins.len(), 2, "{v}");
    for p in old_plugins {
        assert!(p["schema"].is_null() && p["schema_error"].is_null(), "{p}");
    }
    std::fs::remove_dir_all(dir).ok();
}
