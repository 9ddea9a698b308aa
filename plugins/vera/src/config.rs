//! The `vera` configuration: the keys of peft 0.21's `VeraConfig` this plugin implements, their
//! validation (errors name the key), which layers are targeted, and the `adapter_config.json`
//! peft loads.
//!
//! Example (`adapter: {plugin: vera, ...}` in a run config):
//! ```text
//! {"r": 256,                      # larger than a LoRA rank: only r + out values train per layer
//!  "target_modules": ["q_proj", "v_proj"], "d_initial": 0.1, "projection_prng_key": 0}
//! ```
use ferrotune_plugin_api::targets::{ModuleSet, Targets};
use ferrotune_plugin_api::{PluginError, PluginResult};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

/// Configuration of the `vera` adapter method. Field names are peft's `VeraConfig` keys.
#[derive(Deserialize, JsonSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct VeraConfig {
    /// Rank of the shared random projections (`vera_A` `[r, in]`, `vera_B` `[out, r]`). Default
    /// 256 (peft's); typical 64–1024: far higher than a LoRA rank, since only `vera_lambda_d`
    /// (`r` values) and `vera_lambda_b` (`out` values) train per layer.
    #[serde(default = "default_r")]
    #[schemars(range(min = 1))]
    pub r: i64,
    /// Which linear layers are adapted: module names (a layer matches when its full name
    /// equals one or ends with `.` + one), a regex the full name must match entirely, or
    /// `"all-linear"`. Default `["q_proj", "v_proj"]` (peft's default for Llama and Qwen2).
    #[serde(default = "default_target_modules")]
    pub target_modules: ModuleSet,
    /// Seed of the projections (torch's CPU generator, reproduced exactly). Default 0.
    #[serde(default)]
    pub projection_prng_key: i64,
    /// Whether `vera_A` / `vera_B` are saved beside the vectors (`base_model.vera_A`,
    /// `base_model.vera_B`). Default true: a directory then loads the same everywhere;
    /// false regenerates them from `projection_prng_key`.
    #[serde(default = "default_true")]
    pub save_projection: bool,
    /// Dropout probability on the VeRA branch's input, in training only. Default 0.0; in [0, 1).
    #[serde(default)]
    #[schemars(range(min = 0), extend("exclusiveMaximum" = 1))]
    pub vera_dropout: f64,
    /// The value `vera_lambda_d` starts at (with `init_weights`). Default 0.1; ≤ 0.1 recommended.
    #[serde(default = "default_d_initial")]
    pub d_initial: f64,
    /// Whether the base weight is stored `[in, out]`. Only `false` (the default) is supported.
    #[serde(default)]
    #[schemars(extend("const" = false))]
    pub fan_in_fan_out: bool,
    /// Which biases train. Only `"none"` (the default) is supported.
    #[serde(default = "default_bias")]
    #[schemars(extend("enum" = ["none"]))]
    pub bias: String,
    /// ModuleSet trained in full and saved beside the adapter (`["lm_head"]`); never adapted.
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// `true` (default): `vera_lambda_b` = 0, `vera_lambda_d` = `d_initial` (the adapted model
    /// is the base model); `false`: `vera_lambda_b` = 1, `vera_lambda_d` ~ N(0, 1) (for tests).
    #[serde(default = "default_true")]
    pub init_weights: bool,
    #[serde(skip)]
    targeting: Option<Targets>,
}

fn default_r() -> i64 {
    256
}

fn default_true() -> bool {
    true
}

fn default_d_initial() -> f64 {
    0.1
}

fn default_bias() -> String {
    "none".into()
}

fn default_target_modules() -> ModuleSet {
    ModuleSet::Names(vec!["q_proj".into(), "v_proj".into()])
}

impl VeraConfig {
    pub fn from_json(config_json: &str) -> PluginResult<Self> {
        let mut cfg: Self = ferrotune_plugin_api::parse_config(config_json)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&mut self) -> PluginResult<()> {
        if self.r < 1 {
            return Err(PluginError::config(
                "r",
                format!("must be a positive integer, got {}", self.r),
            ));
        }
        if !(0.0..1.0).contains(&self.vera_dropout) {
            return Err(PluginError::config(
                "vera_dropout",
                format!("must be in [0, 1), got {}", self.vera_dropout),
            ));
        }
        if !self.d_initial.is_finite() {
            return Err(PluginError::config(
                "d_initial",
                format!("must be finite, got {}", self.d_initial),
            ));
        }
        if self.fan_in_fan_out {
            return Err(PluginError::config(
                "fan_in_fan_out",
                "only false is supported: the host's linear layers store their weight as [out, in]",
            ));
        }
        if self.bias != "none" {
            return Err(PluginError::config(
                "bias",
                format!(
                    "only \"none\" is supported, got \"{}\" (peft's \"all\" / \"vera_only\" train the base biases)",
                    self.bias
                ),
            ));
        }
        self.targeting = Some(Targets::new(&self.target_modules, &self.modules_to_save)?);
        Ok(())
    }

    pub fn targets(&self, module: &str) -> bool {
        self.targeting.as_ref().is_some_and(|t| t.targets(module))
    }

    pub fn peft_config(&self) -> Value {
        let target_modules = self.target_modules.to_json();
        json!({
            "peft_type": "VERA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": null,
            "revision": null,
            "inference_mode": true,
            "r": self.r,
            "target_modules": target_modules,
            "projection_prng_key": self.projection_prng_key,
            "save_projection": self.save_projection,
            "vera_dropout": self.vera_dropout,
            "d_initial": self.d_initial,
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": self.bias,
            "modules_to_save": if self.modules_to_save.is_empty() { Value::Null } else { json!(self.modules_to_save) },
            "init_weights": self.init_weights,
            "layers_to_transform": null,
            "layers_pattern": null,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        VeraConfig::from_json(json).unwrap_err().message().to_string()
    }

    #[test]
    fn defaults_are_peft_s() {
        let c = VeraConfig::from_json("{}").unwrap();
        assert_eq!((c.r, c.projection_prng_key), (256, 0));
        assert!(c.save_projection && c.init_weights && !c.fan_in_fan_out);
        assert_eq!((c.vera_dropout, c.d_initial, c.bias.as_str()), (0.0, 0.1, "none"));
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
        assert!(!c.targets("model.layers.0.self_attn.k_proj"));
        let c = VeraConfig::from_json(
            r#"{"target_modules": "all-linear", "modules_to_save": ["o_proj"]}"#,
        )
        .unwrap();
        assert!(c.targets("model.layers.0.mlp.down_proj") && !c.targets("lm_head"));
        assert!(!c.targets("model.layers.0.self_attn.o_proj"), "a saved module is never adapted");
    }

    #[test]
    fn config_errors_name_the_key() {
        for (json, key) in [
            (r#"{"r": 0}"#, "`r`"),
            (r#"{"r": 2.5}"#, "`r`"),
            (r#"{"target_modules": []}"#, "`target_modules`"),
            (r#"{"target_modules": "q_proj("}"#, "`target_modules`"),
            (r#"{"vera_dropout": 1.0}"#, "`vera_dropout`"),
            (r#"{"fan_in_fan_out": true}"#, "`fan_in_fan_out`"),
            (r#"{"bias": "all"}"#, "`bias`"),
            (r#"{"save_projection": "yes"}"#, "`save_projection`"),
            (r#"{"modules_to_save": ["a("]}"#, "`modules_to_save[0]`"),
            (r#"{"lora_alpha": 8}"#, "`lora_alpha`"),
        ] {
            assert!(err(json).contains(key), "{json}: {}", err(json));
        }
    }
}
