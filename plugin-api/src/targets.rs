//! Which linear layers an adapter method adapts, by peft's rules, for adapter plugins to share:
//! `target_modules` as a [`ModuleSet`] (module names, a full-match regex, or `"all-linear"`)
//! and `modules_to_save`, whose modules are never adapted ([`Targets`]).
use std::borrow::Cow;

use regex::Regex;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Value};

use crate::error::{PluginError, PluginResult};
use crate::kinds::adapter::module_name_matches;

/// The `target_modules` value that means every linear layer but the output head.
pub const ALL_LINEAR: &str = "all-linear";
/// The output head `all-linear` leaves out (peft leaves out the model's output embedding).
pub const OUTPUT_HEAD: &str = "lm_head";
/// A sequence classifier's head, which `all-linear` leaves out too (peft's `SEQ_CLS` task
/// trains it in full through `modules_to_save`).
pub const SCORE_HEAD: &str = "score";

/// A set of modules as a peft configuration gives it.
#[derive(Debug, Clone)]
pub enum ModuleSet {
    /// Module names: a layer matches when its full name equals one or ends with `.` + one.
    Names(Vec<String>),
    /// A regex the full name must match entirely (peft's `re.fullmatch`).
    Pattern { source: String, anchored: Regex },
    /// Every linear layer but the output head (and a sequence classifier's `score`).
    AllLinear,
}

impl ModuleSet {
    /// A list of module names.
    pub fn names(names: &[&str]) -> Self {
        ModuleSet::Names(names.iter().map(|n| n.to_string()).collect())
    }

    /// The value as peft writes it in `adapter_config.json`.
    pub fn to_json(&self) -> Value {
        match self {
            ModuleSet::Names(names) => json!(names),
            ModuleSet::Pattern { source, .. } => json!(source),
            ModuleSet::AllLinear => json!(ALL_LINEAR),
        }
    }

    /// Whether the layer at checkpoint path `module` is in the set.
    pub fn matches(&self, module: &str) -> bool {
        match self {
            ModuleSet::Names(names) => names.iter().any(|t| module_name_matches(module, t)),
            ModuleSet::Pattern { anchored, .. } => anchored.is_match(module),
            ModuleSet::AllLinear => {
                !module_name_matches(module, OUTPUT_HEAD) && module != SCORE_HEAD
            }
        }
    }
}

impl<'de> Deserialize<'de> for ModuleSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(s) if s.eq_ignore_ascii_case(ALL_LINEAR) => Ok(ModuleSet::AllLinear),
            Value::String(s) => {
                let anchored = Regex::new(&format!("^(?:{s})$"))
                    .map_err(|e| D::Error::custom(format!("`{s}` is not a valid regex: {e}")))?;
                Ok(ModuleSet::Pattern { source: s, anchored })
            }
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) if !s.is_empty() => Ok(s),
                    other => Err(D::Error::custom(format!(
                        "item {i} must be a non-empty module name, got {other}"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(ModuleSet::Names),
            other => Err(D::Error::custom(format!(
                "expected a list of module names, a regex string or \"all-linear\", got {other}"
            ))),
        }
    }
}

/// Written as peft writes it (a schema's `default`).
impl Serialize for ModuleSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl JsonSchema for ModuleSet {
    fn schema_name() -> Cow<'static, str> {
        "ModuleSet".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "anyOf": [
                {"type": "array", "items": {"type": "string", "minLength": 1},
                 "description": "module names: a layer matches when its full name equals one or ends with `.` + one"},
                {"type": "string",
                 "description": "\"all-linear\" (every linear layer but the output head), or a regex the full module name must match"}
            ]
        })
    }
}

/// `target_modules` and `modules_to_save` together: what an adapter method's `targets()` answers.
#[derive(Debug, Clone)]
pub struct Targets {
    target_modules: ModuleSet,
    saved: Vec<Regex>,
}

impl Targets {
    /// Checks `target_modules` (a list must name something) and compiles peft's pattern for each
    /// `modules_to_save` entry (`(^|.*\.){m}($|\..*)`); errors name the key.
    pub fn new(target_modules: &ModuleSet, modules_to_save: &[String]) -> PluginResult<Self> {
        if matches!(target_modules, ModuleSet::Names(n) if n.is_empty()) {
            return Err(PluginError::config(
                "target_modules",
                "is empty: name at least one module, or use \"all-linear\"",
            ));
        }
        let saved = modules_to_save
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Regex::new(&format!(r"^(?:.*\.)?(?:{m})(?:\..*)?$")).map_err(|e| {
                    PluginError::config(
                        &format!("modules_to_save[{i}]"),
                        format!("`{m}` is not a valid pattern: {e}"),
                    )
                })
            })
            .collect::<PluginResult<_>>()?;
        Ok(Self { target_modules: target_modules.clone(), saved })
    }

    /// Whether the layer at this checkpoint path is adapted. As in peft, a module listed in
    /// `modules_to_save` (or inside one) never is.
    pub fn targets(&self, module: &str) -> bool {
        !self.saved.iter().any(|p| p.is_match(module)) && self.target_modules.matches(module)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: Value) -> Result<ModuleSet, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    #[test]
    fn module_sets_follow_peft() {
        let q = "model.layers.0.self_attn.q_proj";
        assert!(set(json!(["q_proj"])).unwrap().matches(q));
        assert!(!set(json!(["proj"])).unwrap().matches(q), "a name ends the path after a dot");
        assert!(set(json!(".*self_attn\\.q_proj")).unwrap().matches(q));
        assert!(!set(json!("self_attn\\.q_proj")).unwrap().matches(q), "a regex matches it all");
        let all = set(json!("all-linear")).unwrap();
        assert!(all.matches(q) && !all.matches("lm_head"));
        assert_eq!(all.to_json(), json!("all-linear"));
        assert!(set(json!("(")).unwrap_err().contains("not a valid regex"));
        assert!(set(json!([""])).unwrap_err().contains("item 0"));
        assert!(set(json!(3)).unwrap_err().contains("expected a list"));
        let t = Targets::new(&ModuleSet::AllLinear, &["q_proj".into()]).unwrap();
        assert!(!t.targets(q) && t.targets("model.layers.0.self_attn.k_proj"));
        let e = Targets::new(&ModuleSet::Names(vec![]), &[]).unwrap_err().to_string();
        assert!(e.contains("target_modules"), "{e}");
        let e = Targets::new(&ModuleSet::AllLinear, &["(".into()]).unwrap_err().to_string();
        assert!(e.contains("modules_to_save[0]"), "{e}");
    }
}
