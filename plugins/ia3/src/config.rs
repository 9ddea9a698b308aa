//! The `ia3` configuration: the keys of peft 0.21's `IA3Config` this plugin implements, their
//! validation (errors name the key), which layers are targeted and which of them are
//! feed-forward, and the `adapter_config.json` peft loads.
//!
//! Example (`adapter: {plugin: ia3, ...}` in a run config):
//! ```text
//! {"target_modules": ["k_proj", "v_proj", "down_proj"],
//!  "feedforward_modules": ["down_proj"]}   # must be a subset of target_modules
//! ```
use ferrotune_plugin_api::targets::{ModuleSet, Targets};
use ferrotune_plugin_api::{PluginError, PluginResult};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

/// Configuration of the `ia3` adapter method. Field names are peft's `IA3Config` keys.
#[derive(Deserialize, JsonSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Ia3Config {
    /// Which linear layers are adapted: module names (a layer matches when its full name
    /// equals one or ends with `.` + one), a regex the full name must match entirely, or
    /// `"all-linear"`. Default `["k_proj", "v_proj", "down_proj"]` (peft's default for Llama
    /// and Qwen2).
    #[serde(default = "default_target_modules")]
    pub target_modules: ModuleSet,
    /// Which targeted layers scale their input (`base(x · l)`, `l` `[1, in]`) instead of their
    /// output (`base(x) · l`, `l` `[out, 1]`): module names (a layer's full name ends with one,
    /// peft's plain `endswith`) or a full-match regex. Names must be a subset of
    /// `target_modules` names. Default `["down_proj"]` (peft's default for Llama and Qwen2).
    #[serde(default = "default_feedforward_modules")]
    pub feedforward_modules: ModuleSet,
    /// `true` (default): the vectors start at ones (the adapted model is the base model);
    /// `false`: standard normal (for tests).
    #[serde(default = "default_true")]
    pub init_ia3_weights: bool,
    /// ModuleSet trained in full and saved beside the adapter (`["lm_head"]`); never adapted.
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// Whether the base weight is stored `[in, out]`. Only `false` (the default) is supported.
    #[serde(default)]
    #[schemars(extend("const" = false))]
    pub fan_in_fan_out: bool,
    #[serde(skip)]
    targeting: Option<Targets>,
}

fn default_true() -> bool {
    true
}

fn default_target_modules() -> ModuleSet {
    ModuleSet::Names(vec!["k_proj".into(), "v_proj".into(), "down_proj".into()])
}

fn default_feedforward_modules() -> ModuleSet {
    ModuleSet::Names(vec!["down_proj".into()])
}

impl Ia3Config {
    pub fn from_json(config_json: &str) -> PluginResult<Self> {
        let mut cfg: Self = ferrotune_plugin_api::parse_config(config_json)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&mut self) -> PluginResult<()> {
        if self.fan_in_fan_out {
            return Err(PluginError::config(
                "fan_in_fan_out",
                "only false is supported: the host's linear layers store their weight as [out, in]",
            ));
        }
        if matches!(self.feedforward_modules, ModuleSet::AllLinear) {
            return Err(PluginError::config(
                "feedforward_modules",
                "\"all-linear\" is not a feed-forward module set; name the modules or give a regex",
            ));
        }
        // peft checks the subset only when both are lists.
        if let (ModuleSet::Names(ff), ModuleSet::Names(targets)) =
            (&self.feedforward_modules, &self.target_modules)
        {
            if let Some(m) = ff.iter().find(|m| !targets.contains(m)) {
                return Err(PluginError::config(
                    "feedforward_modules",
                    format!("`{m}` is not in `target_modules`: feedforward_modules must be a subset of target_modules"),
                ));
            }
        }
        self.targeting = Some(Targets::new(&self.target_modules, &self.modules_to_save)?);
        Ok(())
    }

    pub fn targets(&self, module: &str) -> bool {
        self.targeting.as_ref().is_some_and(|t| t.targets(module))
    }

    /// Whether the targeted layer `module` is feed-forward (scales its input), peft's
    /// `_check_target_module_feedforward`: a regex must match the full name, a name must end
    /// it (plain `endswith`, as peft).
    pub fn is_feedforward(&self, module: &str) -> bool {
        match &self.feedforward_modules {
            ModuleSet::Names(names) => names.iter().any(|n| module.ends_with(n.as_str())),
            ModuleSet::Pattern { anchored, .. } => anchored.is_match(module),
            ModuleSet::AllLinear => false,
        }
    }

    pub fn peft_config(&self) -> Value {
        json!({
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": null,
            "revision": null,
            "inference_mode": true,
            "target_modules": self.target_modules.to_json(),
            "exclude_modules": null,
            "feedforward_modules": self.feedforward_modules.to_json(),
            "fan_in_fan_out": self.fan_in_fan_out,
            "modules_to_save": if self.modules_to_save.is_empty() { Value::Null } else { json!(self.modules_to_save) },
            "init_ia3_weights": self.init_ia3_weights,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        Ia3Config::from_json(json).unwrap_err().message().to_string()
    }

    #[test]
    fn defaults_and_feedforward_matching_are_peft_s() {
        let c = Ia3Config::from_json("{}").unwrap();
        assert!(c.init_ia3_weights && !c.fan_in_fan_out);
        assert!(c.targets("model.layers.0.self_attn.k_proj"));
        assert!(!c.targets("model.layers.0.self_attn.q_proj"));
        assert!(c.is_feedforward("model.layers.0.mlp.down_proj"));
        assert!(!c.is_feedforward("model.layers.0.self_attn.v_proj"));
        let c = Ia3Config::from_json(
            r#"{"target_modules": ".*proj", "feedforward_modules": ".*mlp\\..*"}"#,
        )
        .unwrap();
        assert!(c.is_feedforward("model.layers.0.mlp.up_proj"));
        assert!(!c.is_feedforward("model.layers.0.self_attn.o_proj"));
    }

    #[test]
    fn config_errors_name_the_key() {
        for (json, key) in [
            (r#"{"target_modules": []}"#, "`target_modules`"),
            (r#"{"target_modules": ["q_proj", 3]}"#, "`target_modules`"),
            (r#"{"target_modules": "q_proj("}"#, "`target_modules`"),
            (
                r#"{"target_modules": ["q_proj"], "feedforward_modules": ["down_proj"]}"#,
                "`feedforward_modules`",
            ),
            (r#"{"feedforward_modules": "all-linear"}"#, "`feedforward_modules`"),
            (r#"{"fan_in_fan_out": true}"#, "`fan_in_fan_out`"),
            (r#"{"init_ia3_weights": "yes"}"#, "`init_ia3_weights`"),
            (r#"{"modules_to_save": ["a("]}"#, "`modules_to_save[0]`"),
            (r#"{"r": 8}"#, "`r`"),
        ] {
            assert!(err(json).contains(key), "{json}: {}", err(json));
        }
    }
}
