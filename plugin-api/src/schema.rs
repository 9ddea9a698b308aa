//! Config schemas: the JSON Schema of a plugin's configuration keys, which
//! `ferrotune plugins --json` prints and the board builds its forms from.
//!
//! A plugin derives [`JsonSchema`] next to `Deserialize` on its config struct and returns
//! [`schema_of`] from [`Plugin::config_schema`]; schemars reads
//! the serde attributes (`default`, `rename`, `deny_unknown_fields`, untagged enums), so the
//! schema follows what [`parse_config`](crate::parse_config) accepts. Doc comments become
//! `description`s, `#[schemars(range(min = 1))]` a `minimum`. [`assert_schema_matches`] checks
//! a schema against the plugin's own parser (for a plugin's unit tests).
use serde_json::{Map, Value};

use crate::Plugin;

pub use schemars::JsonSchema;

/// The JSON Schema (draft 2020-12) of config type `T`, normalised so that the top level
/// always has `"type": "object"`, `properties` (every accepted key) and `required`.
pub fn schema_of<T: JsonSchema>() -> Value {
    let mut schema = schemars::SchemaGenerator::default().into_root_schema_for::<T>().to_value();
    if let Value::Object(top) = &mut schema {
        top.entry("type").or_insert_with(|| Value::from("object"));
        top.entry("properties").or_insert_with(|| Value::Object(Map::new()));
        top.entry("required").or_insert_with(|| Value::Array(Vec::new()));
    }
    schema
}

/// Whether a property's schema admits `null` (an `Option` key: absent means none).
fn admits_null(prop: &Value) -> bool {
    let ty_null = |t: &Value| match t {
        Value::String(s) => s == "null",
        Value::Array(a) => a.iter().any(|t| t == "null"),
        _ => false,
    };
    prop.get("type").is_some_and(ty_null)
        || ["anyOf", "oneOf"].iter().any(|k| {
            prop.get(*k).and_then(Value::as_array).is_some_and(|alts| alts.iter().any(admits_null))
        })
}

/// A value just outside a bound of the property, with the bound's name, if it has one.
fn out_of_range(prop: &Value) -> Vec<(&'static str, Value)> {
    let integer = match prop.get("type") {
        Some(Value::String(s)) => s == "integer",
        Some(Value::Array(a)) => a.iter().any(|t| t == "integer"),
        _ => false,
    };
    let step = if integer { 1.0 } else { 0.5 };
    let num = |v: f64| {
        if integer {
            Value::from(v as i64)
        } else {
            Value::from(v)
        }
    };
    let mut out = Vec::new();
    let bound = |k: &str| prop.get(k).and_then(Value::as_f64);
    if let Some(m) = bound("minimum") {
        out.push(("minimum", num(m - step)));
    }
    if let Some(m) = bound("maximum") {
        out.push(("maximum", num(m + step)));
    }
    if let Some(m) = bound("exclusiveMinimum") {
        out.push(("exclusiveMinimum", num(m)));
    }
    if let Some(m) = bound("exclusiveMaximum") {
        out.push(("exclusiveMaximum", num(m)));
    }
    out
}

/// Checks plugin `P`'s schema against its own parser, panicking with what disagrees:
/// * the top level is an object schema whose `properties` list the keys;
/// * every key that is not `required` has a `default`, or admits `null`;
/// * the defaults, plus `required_values` for keys without one, build the plugin;
/// * with `additionalProperties: false`, an unknown key is refused;
/// * each `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum` of a top-level key: a
///   value just outside it (on top of the defaults) is refused, by an error naming the key.
///
/// Returns the schema for further checks.
pub fn assert_schema_matches<P: Plugin>(required_values: Value) -> Value {
    let name = P::NAME;
    let schema = P::config_schema().unwrap_or_else(|| panic!("plugin `{name}` has no schema"));
    assert_eq!(schema["type"], "object", "plugin `{name}`: top level must be an object schema");
    let props = schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("plugin `{name}`: schema has no `properties`: {schema}"));
    let required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap_or_else(|| panic!("plugin `{name}`: schema has no `required` list"))
        .iter()
        .map(|v| v.as_str().expect("required names are strings"))
        .collect();
    let given = required_values.as_object().cloned().unwrap_or_default();
    let mut config = Map::new();
    for (key, prop) in props {
        match prop.get("default") {
            Some(d) => {
                config.insert(key.clone(), d.clone());
            }
            None => assert!(
                required.contains(&key.as_str()) || admits_null(prop) || given.contains_key(key),
                "plugin `{name}`: key `{key}` is optional but its schema gives no default: {prop}"
            ),
        }
    }
    for (key, value) in given {
        assert!(props.contains_key(&key), "plugin `{name}`: `{key}` is not in the schema");
        config.insert(key, value);
    }
    for key in &required {
        assert!(config.contains_key(*key), "plugin `{name}`: pass a value for required `{key}`");
    }
    let text = Value::Object(config.clone()).to_string();
    if let Err(e) = P::from_config(&text) {
        panic!("plugin `{name}` refuses its schema's defaults {text}: {e}");
    }
    if schema.get("additionalProperties") == Some(&Value::Bool(false)) {
        let mut extra = config.clone();
        extra.insert("__not_a_key__".into(), Value::from(1));
        assert!(
            P::from_config(&Value::Object(extra).to_string()).is_err(),
            "plugin `{name}`: the schema forbids unknown keys but the plugin accepts one"
        );
    }
    for (key, prop) in props {
        for (bound, value) in out_of_range(prop) {
            let mut bad = config.clone();
            bad.insert(key.clone(), value.clone());
            match P::from_config(&Value::Object(bad).to_string()) {
                Ok(_) => panic!(
                    "plugin `{name}`: the schema's {bound} of `{key}` forbids {value}, \
                     but the plugin accepts it"
                ),
                Err(e) => assert!(
                    e.to_string().contains(key.as_str()),
                    "plugin `{name}`: refusing `{key}`: {value}, the error does not name the key: {e}"
                ),
            }
        }
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_config, PluginResult};
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    /// A nested struct and an untagged enum, as plugin configs have.
    #[derive(Deserialize, Serialize, JsonSchema, Debug, Clone, PartialEq)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }

    /// A test plugin's config (some fields are only there for the schema).
    #[allow(dead_code)]
    #[derive(Deserialize, JsonSchema, Debug)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        /// The rank.
        #[serde(default = "eight")]
        #[schemars(range(min = 1))]
        r: i64,
        /// In [0, 1).
        #[serde(default)]
        #[schemars(range(min = 0.0), extend("exclusiveMaximum" = 1.0))]
        dropout: f64,
        #[serde(default = "names")]
        names: OneOrMany,
        #[serde(default)]
        ratio: Option<f64>,
        path: String,
    }

    fn eight() -> i64 {
        8
    }
    fn names() -> OneOrMany {
        OneOrMany::Many(vec!["q".into()])
    }

    struct Checked(#[allow(dead_code)] Cfg);
    impl Plugin for Checked {
        const NAME: &'static str = "checked";
        const VERSION: &'static str = "0";
        const DESCRIPTION: &'static str = "refuses what its schema forbids";
        fn from_config(config_json: &str) -> PluginResult<Self> {
            let c: Cfg = parse_config(config_json)?;
            if c.r < 1 {
                return Err(crate::PluginError::config("r", "must be at least 1"));
            }
            if !(0.0..1.0).contains(&c.dropout) {
                return Err(crate::PluginError::config("dropout", "must be in [0, 1)"));
            }
            Ok(Self(c))
        }
        fn config_schema() -> Option<Value> {
            Some(schema_of::<Cfg>())
        }
    }

    /// Same schema, but the parser forgets the range of `r`.
    struct Lax;
    impl Plugin for Lax {
        const NAME: &'static str = "lax";
        const VERSION: &'static str = "0";
        const DESCRIPTION: &'static str = "accepts r = 0";
        fn from_config(config_json: &str) -> PluginResult<Self> {
            let c: Cfg = parse_config(config_json)?;
            Checked::from_config(&json!({"r": 1, "dropout": c.dropout, "path": c.path}).to_string())
                .map(|_| Lax)
        }
        fn config_schema() -> Option<Value> {
            Some(schema_of::<Cfg>())
        }
    }

    struct NoSchema;
    impl Plugin for NoSchema {
        const NAME: &'static str = "none";
        const VERSION: &'static str = "0";
        const DESCRIPTION: &'static str = "declares no schema";
        fn from_config(_: &str) -> PluginResult<Self> {
            Ok(NoSchema)
        }
    }

    #[test]
    fn schema_lists_keys_defaults_and_bounds() {
        let s = assert_schema_matches::<Checked>(json!({"path": "/data"}));
        assert_eq!(s["type"], "object");
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["required"], json!(["path"]));
        let p = &s["properties"];
        assert_eq!(p.as_object().unwrap().len(), 5);
        assert_eq!((&p["r"]["default"], &p["r"]["minimum"]), (&json!(8), &json!(1)));
        assert_eq!(p["r"]["description"], "The rank.");
        assert_eq!(p["dropout"]["exclusiveMaximum"], json!(1.0));
        assert_eq!(p["names"]["default"], json!(["q"]));
        assert_eq!(p["ratio"]["default"], Value::Null);
        assert_eq!(s["$defs"]["OneOrMany"]["anyOf"].as_array().map(Vec::len), Some(2));
        assert_eq!(NoSchema::config_schema(), None);
    }

    #[test]
    #[should_panic(expected = "the schema's minimum of `r` forbids 0, but the plugin accepts it")]
    fn a_bound_the_parser_ignores_is_caught() {
        assert_schema_matches::<Lax>(json!({"path": "/data"}));
    }

    #[test]
    #[should_panic(expected = "pass a value for required `path`")]
    fn required_keys_must_be_given() {
        assert_schema_matches::<Checked>(json!({}));
    }

    #[test]
    fn an_empty_config_is_an_object_schema() {
        #[derive(Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields)]
        struct NoOptions {}
        let s = schema_of::<NoOptions>();
        assert_eq!(
            (&s["type"], &s["properties"], &s["required"]),
            (&json!("object"), &json!({}), &json!([]))
        );
    }
}
