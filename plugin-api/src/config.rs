//! Plugin configuration: JSON text in, a typed struct out, errors that name the key.
use crate::error::{PluginError, PluginResult};
use serde::de::DeserializeOwned;

/// Parses a plugin's JSON configuration into `T`.
///
/// Use `#[serde(deny_unknown_fields)]` on `T` so a misspelt key is an error. The error names
/// the path of the offending key (`config key `target_modules[2]`: invalid type …`).
pub fn parse_config<T: DeserializeOwned>(config_json: &str) -> PluginResult<T> {
    let text = if config_json.trim().is_empty() { "{}" } else { config_json };
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." { "(top level)".to_string() } else { path };
        // serde_json appends "at line 1 column N" of the JSON text, which the host built from
        // the user's YAML: a position there means nothing to the user, the key path does.
        let msg = e.inner().to_string();
        let msg = msg.find(" at line ").map_or(msg.as_str(), |i| &msg[..i]).to_string();
        PluginError::config(&key, msg)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        r: u32,
        #[serde(default)]
        targets: Vec<String>,
    }

    #[test]
    fn names_the_offending_key() {
        let e = parse_config::<Cfg>(r#"{"r": "eight"}"#).unwrap_err();
        assert!(e.message().contains("`r`"), "{e}");
        let e = parse_config::<Cfg>(r#"{"r": 8, "targets": ["a", 3]}"#).unwrap_err();
        assert!(e.message().contains("targets[1]"), "{e}");
        let e = parse_config::<Cfg>(r#"{"r": 8, "rr": 1}"#).unwrap_err();
        assert!(e.message().contains("unknown field `rr`"), "{e}");
        let e = parse_config::<Cfg>("{}").unwrap_err();
        assert!(e.message().contains("missing field `r`"), "{e}");
        assert!(!e.message().contains("at line"), "positions in host-built JSON are noise: {e}");
        let ok = parse_config::<Cfg>(r#"{"r": 8, "targets": ["q"]}"#).unwrap();
        assert_eq!((ok.r, ok.targets), (8, vec!["q".to_string()]));
    }
}
