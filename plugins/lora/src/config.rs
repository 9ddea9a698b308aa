//! The `lora` configuration: the keys of peft's `LoraConfig` this plugin implements, their
//! validation (errors name the key), which layers are targeted, and the
//! `adapter_config.json` peft 0.21 loads.
//!
//! Example (`adapter: {plugin: lora, ...}` in a run config):
//! ```text
//! {"r": 16, "lora_alpha": 32,            # usually 2 * r
//!  "target_modules": "all-linear",       # or ["q_proj", "v_proj"], or a full-match regex
//!  "use_dora": false, "init_lora_weights": true}
//! ```
use ferrotune_plugin_api::targets::{ModuleSet, Targets};
use ferrotune_plugin_api::{PluginError, PluginResult};
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Value};
use std::borrow::Cow;

/// Configuration of the `lora` adapter method. Field names are peft's `LoraConfig` keys.
#[derive(Deserialize, JsonSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update `B·A`. Default 8; typical 4–64 (larger for harder tasks, more
    /// memory).
    #[serde(default = "default_r")]
    #[schemars(range(min = 1))]
    pub r: i64,
    /// Scale numerator: the update is `lora_alpha / r · B·A` (`/ √r` with `use_rslora`).
    /// Default 8; typical r to 2·r. Must be positive.
    #[serde(default = "default_lora_alpha")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub lora_alpha: f64,
    /// Dropout probability on the LoRA branch's input, in training only. Default 0.0;
    /// typical 0.0–0.1; must be in [0, 1).
    #[serde(default)]
    #[schemars(range(min = 0), extend("exclusiveMaximum" = 1))]
    pub lora_dropout: f64,
    /// Which linear layers are adapted: a list of module names, each matching a layer whose
    /// full name equals it or ends with `.` + it (`["q_proj", "v_proj"]`); or a string, a
    /// regex that must match the full name (`".*layers\.[0-3]\..*proj"`); or `"all-linear"`,
    /// every linear layer but `lm_head`. Default `["q_proj", "v_proj"]` (peft's default for
    /// Llama and Qwen2).
    #[serde(default = "default_target_modules")]
    pub target_modules: ModuleSet,
    /// rsLoRA: scale by `lora_alpha / √r` instead of `lora_alpha / r`, which keeps the update's
    /// size stable as r grows. Default false; worth it for r ≥ 32.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA: a trainable magnitude per output row on top of the LoRA direction update
    /// (`m / ‖W + ΔW‖ · (W + ΔW)`). Default false. Costs one extra `[out, in]` norm per step;
    /// rows of a batch cannot use different DoRA adapters (no `mixed_batch`).
    #[serde(default)]
    pub use_dora: bool,
    /// How A and B start: `true` (default) = A kaiming-uniform (as `nn.Linear`), B = 0;
    /// `"gaussian"` = A ~ N(0, 1/r), B = 0; `"pissa"` = the top-r singular triplets of W, the
    /// base weight becomes the residual; `"olora"` = from the QR decomposition of W, the base
    /// weight becomes the residual; `false` = A and B both as `nn.Linear` (the update is not
    /// zero at the start; for tests). `"default"` is accepted as a synonym of `true`.
    #[serde(default, deserialize_with = "deserialize_init")]
    pub init_lora_weights: InitLoraWeights,
    /// LoRA+: B (and DoRA's magnitude vector, as peft's LoRA+ optimizer groups it) learns
    /// this many times faster than A. Default none (1×); typical 4–16.
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub loraplus_lr_ratio: Option<f64>,
    /// LoftQ's settings (peft's `LoftQConfig`), used with `init_lora_weights: loftq`:
    /// `loftq_bits` (4: NF4, the only one supported) and `loftq_iter` (alternating
    /// quantize/SVD steps, default 1; more lower ‖W − (Q + B·A)‖). Default `{}` = both defaults.
    #[serde(default)]
    pub loftq_config: LoftqConfig,
    /// Modules trained in full and saved beside the adapter (`["lm_head"]`, `["embed_tokens"]`;
    /// names match as `target_modules` names do). Recorded in the PEFT config; the host makes
    /// the trainable copies (linear layers and the token embedding). As in peft, such a module
    /// is never adapted, even when `target_modules` names it. Default none.
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// Which biases are trained. Only `"none"` (the default) is supported.
    #[serde(default = "default_bias")]
    #[schemars(extend("enum" = ["none"]))]
    pub bias: String,
    /// Whether the base weight is stored `[in, out]` (GPT-2's Conv1D). Only `false` (the
    /// default) is supported: the host's linear layers are `[out, in]`.
    #[serde(default)]
    #[schemars(extend("const" = false))]
    pub fan_in_fan_out: bool,
    /// `modules_to_save` compiled (filled by `from_json`).
    #[serde(skip)]
    targeting: Option<Targets>,
}

/// peft's `LoftQConfig`.
#[derive(Deserialize, Serialize, JsonSchema, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoftqConfig {
    /// Bits of the quantized base: 4 (NF4). Default 4.
    #[serde(default = "default_loftq_bits")]
    pub loftq_bits: i64,
    /// Alternating quantize / SVD iterations. Default 1; typical 1–5.
    #[serde(default = "default_loftq_iter")]
    pub loftq_iter: i64,
}

impl Default for LoftqConfig {
    fn default() -> Self {
        Self { loftq_bits: default_loftq_bits(), loftq_iter: default_loftq_iter() }
    }
}

fn default_loftq_bits() -> i64 {
    4
}

fn default_loftq_iter() -> i64 {
    1
}

fn default_r() -> i64 {
    8
}

fn default_lora_alpha() -> f64 {
    8.0
}

fn default_target_modules() -> ModuleSet {
    ModuleSet::Names(vec!["q_proj".into(), "v_proj".into()])
}

fn default_bias() -> String {
    "none".into()
}

/// How A and B are initialised (`init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitLoraWeights {
    /// `true`: A kaiming-uniform with a = √5 (as `nn.Linear`), B = 0.
    #[default]
    Default,
    /// `false`: A and B both kaiming-uniform (a non-zero update from the start).
    Random,
    /// `"gaussian"`: A ~ N(0, 1/r), B = 0.
    Gaussian,
    /// `"pissa"`: A = √(S/scale)·Vᵀ, B = U·√(S/scale) over the top r singular values; the base
    /// weight becomes W − scale·B·A.
    Pissa,
    /// `"olora"`: W = QR; A = R[:r], B = Q[:, :r]; the base weight becomes W − scale·B·A.
    Olora,
    /// `"loftq"`: LoftQ (https://arxiv.org/abs/2310.08659), peft's `loftq_init`: alternately
    /// NF4-quantize and take the rank-r SVD of the residual (`loftq_config.loftq_iter` times);
    /// A = R, B = L with W ≈ Q + B·A, and the base weight becomes Q.
    Loftq,
}

impl InitLoraWeights {
    /// Whether this initialisation rewrites the base weight (to W − scale·B·A).
    pub fn rewrites_base(self) -> bool {
        matches!(self, Self::Pissa | Self::Olora | Self::Loftq)
    }

    /// The value peft's `LoraConfig.init_lora_weights` takes for it.
    pub fn peft_value(self) -> Value {
        match self {
            Self::Default => json!(true),
            Self::Random => json!(false),
            Self::Gaussian => json!("gaussian"),
            Self::Pissa => json!("pissa"),
            Self::Olora => json!("olora"),
            Self::Loftq => json!("loftq"),
        }
    }
}

/// Written as peft writes it (a schema's `default`).
impl Serialize for InitLoraWeights {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.peft_value().serialize(s)
    }
}

impl JsonSchema for InitLoraWeights {
    fn schema_name() -> Cow<'static, str> {
        "InitLoraWeights".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "anyOf": [
                {"type": "boolean"},
                {"type": "string", "enum": ["default", "gaussian", "pissa", "olora", "loftq"]}
            ]
        })
    }
}

fn deserialize_init<'de, D: Deserializer<'de>>(d: D) -> Result<InitLoraWeights, D::Error> {
    use serde::de::Error;
    let v = Value::deserialize(d)?;
    match &v {
        Value::Bool(true) => Ok(InitLoraWeights::Default),
        Value::Bool(false) => Ok(InitLoraWeights::Random),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "default" => Ok(InitLoraWeights::Default),
            "gaussian" => Ok(InitLoraWeights::Gaussian),
            "pissa" => Ok(InitLoraWeights::Pissa),
            "olora" => Ok(InitLoraWeights::Olora),
            "loftq" => Ok(InitLoraWeights::Loftq),
            other if other.starts_with("pissa_niter_") => Err(D::Error::custom(format!(
                "`{s}` (randomised SVD) is not supported; use \"pissa\" (exact SVD)"
            ))),
            _ => Err(D::Error::custom(format!(
                "`{s}` is not supported; use true, false, \"gaussian\", \"pissa\", \"olora\" or \"loftq\""
            ))),
        },
        other => Err(D::Error::custom(format!(
            "expected true, false, \"gaussian\", \"pissa\", \"olora\" or \"loftq\", got {other}"
        ))),
    }
}

impl LoraConfig {
    /// Parses and validates the JSON configuration; errors name the key.
    pub fn from_json(config_json: &str) -> PluginResult<Self> {
        let mut cfg: Self = ferrotune_plugin_api::parse_config(config_json)?;
        cfg.validate()?;
        cfg.targeting = Some(Targets::new(&cfg.target_modules, &cfg.modules_to_save)?);
        Ok(cfg)
    }

    fn validate(&self) -> PluginResult<()> {
        if self.r < 1 {
            return Err(PluginError::config("r", format!("must be at least 1, got {}", self.r)));
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(PluginError::config(
                "lora_alpha",
                format!("must be a positive number, got {}", self.lora_alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PluginError::config(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            ));
        }
        if let Some(ratio) = self.loraplus_lr_ratio {
            if !(ratio.is_finite() && ratio > 0.0) {
                return Err(PluginError::config(
                    "loraplus_lr_ratio",
                    format!("must be a positive number, got {ratio}"),
                ));
            }
        }
        if self.bias != "none" {
            return Err(PluginError::config(
                "bias",
                format!("only \"none\" is supported, got \"{}\" (training biases is not implemented yet)", self.bias),
            ));
        }
        if self.fan_in_fan_out {
            return Err(PluginError::config(
                "fan_in_fan_out",
                "only false is supported: the host's linear layers store their weight as [out, in]",
            ));
        }
        if self.init_lora_weights == InitLoraWeights::Loftq {
            if self.loftq_config.loftq_bits != 4 {
                return Err(PluginError::config(
                    "loftq_config.loftq_bits",
                    format!("only 4 (NF4) is supported, got {}", self.loftq_config.loftq_bits),
                ));
            }
            if self.loftq_config.loftq_iter < 1 {
                return Err(PluginError::config(
                    "loftq_config.loftq_iter",
                    format!("must be at least 1, got {}", self.loftq_config.loftq_iter),
                ));
            }
            if self.use_dora {
                return Err(PluginError::config(
                    "use_dora",
                    "DoRA with init_lora_weights \"loftq\" is not supported",
                ));
            }
        }
        Ok(())
    }

    /// `lora_alpha / r`, or `lora_alpha / √r` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// The learning-rate multiplier of B (LoRA+).
    pub fn b_lr_scale(&self) -> f64 {
        self.loraplus_lr_ratio.unwrap_or(1.0)
    }

    /// Whether the layer at this checkpoint path is adapted. As in peft, a module listed in
    /// `modules_to_save` (or inside one) never is.
    pub fn targets(&self, module: &str) -> bool {
        self.targeting.as_ref().is_some_and(|t| t.targets(module))
    }

    /// The `adapter_config.json` of a PEFT directory holding this adapter (peft 0.21 loads it
    /// with `PeftConfig.from_pretrained` and `LoraConfig(**json)`).
    pub fn peft_config(&self) -> Value {
        let target_modules = self.target_modules.to_json();
        // peft types lora_alpha as int; keep whole numbers whole in the file.
        let lora_alpha = if self.lora_alpha.fract() == 0.0 && self.lora_alpha.abs() < 1e15 {
            json!(self.lora_alpha as i64)
        } else {
            json!(self.lora_alpha)
        };
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": null,
            "revision": null,
            "inference_mode": true,
            "r": self.r,
            "lora_alpha": lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": target_modules,
            "exclude_modules": null,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": self.init_lora_weights.peft_value(),
            "bias": self.bias,
            "lora_bias": false,
            "fan_in_fan_out": self.fan_in_fan_out,
            "modules_to_save": if self.modules_to_save.is_empty() { Value::Null } else { json!(self.modules_to_save) },
            "layers_to_transform": null,
            "layers_pattern": null,
            "loftq_config": if self.init_lora_weights == InitLoraWeights::Loftq {
                json!({"loftq_bits": self.loftq_config.loftq_bits, "loftq_iter": self.loftq_config.loftq_iter})
            } else {
                json!({})
            },
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        LoraConfig::from_json(json).unwrap_err().message().to_string()
    }

    #[test]
    fn defaults_are_peft_defaults() {
        let c = LoraConfig::from_json("{}").unwrap();
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (8, 8.0, 0.0));
        assert_eq!(c.init_lora_weights, InitLoraWeights::Default);
        assert!(!c.use_rslora && !c.use_dora && !c.fan_in_fan_out);
        assert_eq!(c.bias, "none");
        assert_eq!(c.scaling(), 1.0);
        assert!(
            c.targets("model.layers.0.self_attn.q_proj")
                && !c.targets("model.layers.0.self_attn.k_proj")
        );
    }

    #[test]
    fn config_errors_name_the_key() {
        for (json, key) in [
            (r#"{"r": 0}"#, "`r`"),
            (r#"{"r": "eight"}"#, "`r`"),
            (r#"{"lora_alpha": -1}"#, "`lora_alpha`"),
            (r#"{"lora_dropout": 1.0}"#, "`lora_dropout`"),
            (r#"{"lora_dropout": -0.1}"#, "`lora_dropout`"),
            (r#"{"target_modules": []}"#, "`target_modules`"),
            (r#"{"target_modules": ["q_proj", 3]}"#, "`target_modules`"),
            (r#"{"target_modules": "q_proj("}"#, "`target_modules`"),
            (r#"{"target_modules": 7}"#, "`target_modules`"),
            (r#"{"init_lora_weights": "pissa_niter_4"}"#, "`init_lora_weights`"),
            (r#"{"init_lora_weights": 1}"#, "`init_lora_weights`"),
            (r#"{"bias": "all"}"#, "`bias`"),
            (r#"{"bias": "lora_only"}"#, "`bias`"),
            (r#"{"fan_in_fan_out": true}"#, "`fan_in_fan_out`"),
            (r#"{"loraplus_lr_ratio": 0}"#, "`loraplus_lr_ratio`"),
            (r#"{"modules_to_save": ["lm_head", "a("]}"#, "`modules_to_save[1]`"),
            (r#"{"use_dora": "yes"}"#, "`use_dora`"),
        ] {
            let m = err(json);
            assert!(m.contains(key), "{json}: error `{m}` does not name {key}");
        }
        let m = err(r#"{"rank": 8}"#);
        assert!(m.contains("unknown field `rank`"), "{m}");
        assert!(err(r#"{"init_lora_weights": "pissa_niter_4"}"#).contains("\"pissa\""));
    }

    #[test]
    fn rslora_scales_by_root_r() {
        let plain = LoraConfig::from_json(r#"{"r": 16, "lora_alpha": 32}"#).unwrap();
        let rs =
            LoraConfig::from_json(r#"{"r": 16, "lora_alpha": 32, "use_rslora": true}"#).unwrap();
        assert_eq!(plain.scaling(), 2.0);
        assert_eq!(rs.scaling(), 8.0);
        let rs = LoraConfig::from_json(r#"{"r": 2, "lora_alpha": 1, "use_rslora": true}"#).unwrap();
        assert!((rs.scaling() - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-15);
    }

    #[test]
    fn suffix_targets_match_whole_dotted_names() {
        let c = LoraConfig::from_json(r#"{"target_modules": ["q_proj", "mlp.up_proj"]}"#).unwrap();
        assert!(c.targets("q_proj"));
        assert!(c.targets("model.layers.3.self_attn.q_proj"));
        assert!(c.targets("model.layers.3.mlp.up_proj"));
        assert!(!c.targets("model.layers.3.self_attn.qq_proj"), "a suffix must start at a dot");
        assert!(!c.targets("model.layers.3.self_attn.q_proj.lora_A"));
        assert!(!c.targets("model.layers.3.other_mlp.up_proj"));
        assert!(!c.targets("model.layers.3.self_attn.v_proj"));
    }

    #[test]
    fn all_linear_leaves_out_the_head() {
        let c = LoraConfig::from_json(r#"{"target_modules": "ALL-LINEAR"}"#).unwrap();
        assert!(matches!(c.target_modules, ModuleSet::AllLinear));
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
        assert!(c.targets("model.layers.0.mlp.down_proj"));
        assert!(!c.targets("lm_head"));
        assert!(!c.targets("model.lm_head"));
        assert!(c.targets("model.lm_head_proj"));
    }

    #[test]
    fn regex_targets_must_match_the_full_name() {
        let c = LoraConfig::from_json(r#"{"target_modules": ".*layers\\.[01]\\..*(q|v)_proj"}"#)
            .unwrap();
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
        assert!(c.targets("model.layers.1.self_attn.v_proj"));
        assert!(!c.targets("model.layers.2.self_attn.q_proj"));
        assert!(!c.targets("model.layers.0.self_attn.k_proj"));
        // full match: a pattern matching only a prefix does not target
        let c = LoraConfig::from_json(r#"{"target_modules": "model\\.layers\\.0"}"#).unwrap();
        assert!(c.targets("model.layers.0") && !c.targets("model.layers.0.self_attn.q_proj"));
        // a plain name given as a string is a regex, so it must equal the full name
        let c = LoraConfig::from_json(r#"{"target_modules": "q_proj"}"#).unwrap();
        assert!(c.targets("q_proj") && !c.targets("model.layers.0.self_attn.q_proj"));
    }

    #[test]
    fn modules_to_save_are_never_adapted() {
        let c = LoraConfig::from_json(
            r#"{"target_modules": ["q_proj", "lm_head"], "modules_to_save": ["lm_head"]}"#,
        )
        .unwrap();
        assert!(!c.targets("lm_head"));
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
        assert_eq!(c.peft_config()["modules_to_save"], json!(["lm_head"]));
    }

    #[test]
    fn peft_config_carries_every_key() {
        let c = LoraConfig::from_json(
            r#"{"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": "all-linear",
                "use_rslora": true, "use_dora": true, "init_lora_weights": "pissa", "loraplus_lr_ratio": 16}"#,
        )
        .unwrap();
        let p = c.peft_config();
        assert_eq!(p["peft_type"], "LORA");
        assert_eq!(p["task_type"], "CAUSAL_LM");
        assert_eq!(p["r"], 4);
        assert_eq!(p["lora_alpha"], json!(8));
        assert_eq!(p["lora_dropout"], json!(0.05));
        assert_eq!(p["target_modules"], "all-linear");
        assert_eq!(p["use_rslora"], true);
        assert_eq!(p["use_dora"], true);
        assert_eq!(p["init_lora_weights"], "pissa");
        assert_eq!(p["bias"], "none");
        assert_eq!(p["fan_in_fan_out"], false);
        assert!(
            p["modules_to_save"].is_null()
                && p["base_model_name_or_path"].is_null()
                && p["revision"].is_null()
        );
        assert!(p.get("loraplus_lr_ratio").is_none(), "an optimizer setting, not a LoraConfig key");
        assert_eq!(
            LoraConfig::from_json(r#"{"init_lora_weights": "default"}"#).unwrap().peft_config()
                ["init_lora_weights"],
            true
        );
        assert_eq!(
            LoraConfig::from_json(r#"{"lora_alpha": 2.5}"#).unwrap().peft_config()["lora_alpha"],
            json!(2.5)
        );
    }
}
