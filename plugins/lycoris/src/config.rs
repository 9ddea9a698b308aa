//! The `loha` / `lokr` configuration: the keys of peft 0.21's `LoHaConfig` and `LoKrConfig`
//! (both `LycorisConfig`s) this crate implements, their validation (errors name the key), which
//! layers are targeted, and the `adapter_config.json` peft loads.
//!
//! Example (`adapter: {plugin: lokr, ...}` in a run config):
//! ```text
//! {"r": 8, "alpha": 8,                    # the update is scaled by alpha / r
//!  "target_modules": ["q_proj", "v_proj"], # or "all-linear", or a full-match regex
//!  "decompose_both": false, "decompose_factor": -1}   # LoKr only
//! ```
use ferrotune_plugin_api::targets::{ModuleSet, Targets};
use ferrotune_plugin_api::{PluginError, PluginResult};
use regex::Regex;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Value};

/// Which of the two methods a configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Low-rank Hadamard product: `ΔW = (W1a·W1b) ⊙ (W2a·W2b) · alpha / r`.
    LoHa,
    /// Low-rank Kronecker product: `ΔW = W1 ⊗ W2 · alpha / r`, each factor full or low-rank.
    LoKr,
}

impl Method {
    /// peft's `peft_type`.
    pub fn peft_type(self) -> &'static str {
        match self {
            Method::LoHa => "LOHA",
            Method::LoKr => "LOKR",
        }
    }
}

/// How the factors start (`init_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitWeights {
    /// `true` (default): the update starts at zero (LoHa: `hada_w2_b` = 0; LoKr: `lokr_w1` or
    /// `lokr_w1_a` = 0), every other factor kaiming-uniform as `nn.Linear`.
    Default,
    /// `false`: every factor kaiming-uniform (the update is not zero at the start; for tests).
    Random,
    /// `"lycoris"` (LoKr only): the LyCORIS repository's way, `lokr_w2` or `lokr_w2_b` = 0.
    Lycoris,
}

/// Configuration of the `loha` and `lokr` adapter methods. Field names are peft's
/// `LoHaConfig` / `LoKrConfig` keys.
#[derive(Deserialize, JsonSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LycorisConfig {
    /// Rank of each low-rank factor. Default 8; typical 4–32. Must be at least 1.
    #[serde(default = "default_r")]
    #[schemars(range(min = 1))]
    pub r: i64,
    /// Scale numerator: the update is multiplied by `alpha / r`. Default 8; typical r.
    #[serde(default = "default_alpha")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub alpha: f64,
    /// In training, each output row of the update is dropped with this probability (LoHa then
    /// rescales the kept rows by 1 / their fraction; LoKr only with `rank_dropout_scale`).
    /// Default 0.0; must be in [0, 1).
    #[serde(default)]
    #[schemars(range(min = 0), extend("exclusiveMaximum" = 1))]
    pub rank_dropout: f64,
    /// In training, the whole update of a layer is skipped with this probability (no
    /// rescaling). Default 0.0; must be in [0, 1].
    #[serde(default)]
    #[schemars(range(min = 0, max = 1))]
    pub module_dropout: f64,
    /// peft's "Proposition 3" decomposition of convolution kernels; it has no effect on linear
    /// layers (the only layers this host adapts), as in peft. Accepted at either value and
    /// written back. Default false.
    #[serde(default)]
    pub use_effective_conv2d: bool,
    /// Which linear layers are adapted: module names (a layer matches when its full name
    /// equals one or ends with `.` + one), a regex the full name must match entirely, or
    /// `"all-linear"` (every linear layer but `lm_head`). Default `["q_proj", "v_proj"]`
    /// (peft's default for Llama and Qwen2).
    #[serde(default = "default_target_modules")]
    pub target_modules: ModuleSet,
    /// `true` (default), `false`, or for LoKr `"lycoris"`; see [`InitWeights`].
    #[serde(default = "default_init", deserialize_with = "deserialize_init")]
    #[schemars(schema_with = "init_schema")]
    pub init_weights: InitWeights,
    /// ModuleSet trained in full and saved beside the adapter (`["lm_head"]`); never adapted.
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// Per-layer ranks overriding `r`: `{pattern: rank}`, a layer takes the rank of the
    /// pattern that matches the end of its name after a dot (peft's `get_pattern_key`,
    /// `(.*\.)?(pattern)$`), e.g. `{"down_proj": 16}`. Default `{}`. Two patterns giving one
    /// layer different values are refused (peft takes the first in file order).
    #[serde(default, deserialize_with = "deserialize_ranks")]
    #[schemars(schema_with = "ranks_schema")]
    pub rank_pattern: Patterns<i64>,
    /// Per-layer alphas overriding `alpha`, matched as `rank_pattern`. Default `{}`.
    #[serde(default, deserialize_with = "deserialize_alphas")]
    #[schemars(schema_with = "alphas_schema")]
    pub alpha_pattern: Patterns<f64>,
    /// LoKr: also decompose the left factor `W1` into `lokr_w1_a · lokr_w1_b` when `r` is
    /// below half its larger side. Default false.
    #[serde(default)]
    pub decompose_both: Option<bool>,
    /// LoKr: the factor the layer's widths are split by (peft's `factorization`); -1
    /// (default) splits each width near its square root.
    #[serde(default)]
    pub decompose_factor: Option<i64>,
    /// LoKr: rescale the rows kept by `rank_dropout` by 1 / their fraction. Default false.
    #[serde(default)]
    pub rank_dropout_scale: Option<bool>,
    #[serde(skip, default = "default_method")]
    pub method: Method,
    #[serde(skip)]
    targeting: Option<Targets>,
}

fn default_r() -> i64 {
    8
}

fn default_alpha() -> f64 {
    8.0
}

fn default_init() -> InitWeights {
    InitWeights::Default
}

fn default_method() -> Method {
    Method::LoHa
}

fn default_target_modules() -> ModuleSet {
    ModuleSet::Names(vec!["q_proj".into(), "v_proj".into()])
}

/// Written as peft writes it (a schema's `default`).
impl Serialize for InitWeights {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            InitWeights::Default => s.serialize_bool(true),
            InitWeights::Random => s.serialize_bool(false),
            InitWeights::Lycoris => s.serialize_str("lycoris"),
        }
    }
}

fn init_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"anyOf": [{"type": "boolean"}, {"type": "string", "enum": ["lycoris"]}]})
}

fn ranks_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}})
}

fn alphas_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "object", "additionalProperties": {"type": "number", "exclusiveMinimum": 0}})
}

fn deserialize_init<'de, D: Deserializer<'de>>(d: D) -> Result<InitWeights, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        Value::Bool(true) => Ok(InitWeights::Default),
        Value::Bool(false) => Ok(InitWeights::Random),
        Value::String(s) if s.eq_ignore_ascii_case("lycoris") => Ok(InitWeights::Lycoris),
        other => Err(D::Error::custom(format!(
            "expected true, false or \"lycoris\" (LoKr), got {other}"
        ))),
    }
}

/// `{pattern: value}` overrides of a per-layer setting (`rank_pattern`, `alpha_pattern`).
#[derive(Debug, Clone)]
pub struct Patterns<T>(Vec<(String, Regex, T)>);

impl<T> Default for Patterns<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Copy + PartialEq + std::fmt::Display + serde::Serialize> Patterns<T> {
    /// The value for layer `module`, `default` when no pattern matches; `key` names the
    /// configuration key in errors.
    pub fn value_for(&self, module: &str, default: T, key: &str) -> PluginResult<T> {
        let hits: Vec<&(String, Regex, T)> =
            self.0.iter().filter(|(_, re, _)| re.is_match(module)).collect();
        match hits.as_slice() {
            [] => Ok(default),
            [(_, _, v), rest @ ..] if rest.iter().all(|h| h.2 == *v) => Ok(*v),
            _ => Err(PluginError::config(
                key,
                format!(
                    "patterns {} all match `{module}` with different values; peft would take the first in file order, \
                     which a JSON object does not keep: leave one",
                    hits.iter().map(|h| format!("`{}` ({})", h.0, h.2)).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    fn to_json(&self) -> Value {
        Value::Object(self.0.iter().map(|(k, _, v)| (k.clone(), json!(v))).collect())
    }
}

/// Written as peft writes it (a schema's `default`).
impl<T: Copy + PartialEq + std::fmt::Display + Serialize> Serialize for Patterns<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

fn deserialize_patterns<'de, D: Deserializer<'de>, T>(
    d: D,
    value: impl Fn(&Value) -> Option<T>,
    what: &str,
) -> Result<Patterns<T>, D::Error> {
    use serde::de::Error;
    let map = serde_json::Map::<String, Value>::deserialize(d)?;
    map.into_iter()
        .map(|(k, v)| {
            let re = Regex::new(&format!(r"^(?:.*\.)?(?:{k})$"))
                .map_err(|e| D::Error::custom(format!("`{k}` is not a valid pattern: {e}")))?;
            let val =
                value(&v).ok_or_else(|| D::Error::custom(format!("`{k}`: {v} is not {what}")))?;
            Ok((k, re, val))
        })
        .collect::<Result<_, _>>()
        .map(Patterns)
}

fn deserialize_ranks<'de, D: Deserializer<'de>>(d: D) -> Result<Patterns<i64>, D::Error> {
    deserialize_patterns(d, |v| v.as_i64().filter(|r| *r >= 1), "a positive integer rank")
}

fn deserialize_alphas<'de, D: Deserializer<'de>>(d: D) -> Result<Patterns<f64>, D::Error> {
    deserialize_patterns(
        d,
        |v| v.as_f64().filter(|a| a.is_finite() && *a > 0.0),
        "a positive alpha",
    )
}

impl LycorisConfig {
    /// Parses and validates the configuration of `method`.
    pub fn from_json(config_json: &str, method: Method) -> PluginResult<Self> {
        let mut cfg: Self = ferrotune_plugin_api::parse_config(config_json)?;
        cfg.method = method;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&mut self) -> PluginResult<()> {
        if self.r < 1 {
            return Err(PluginError::config("r", format!("{} must be a positive integer", self.r)));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(PluginError::config("alpha", format!("{} must be positive", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.rank_dropout) {
            return Err(PluginError::config(
                "rank_dropout",
                format!(
                    "{} must be in [0, 1) (1 would drop every row of the update)",
                    self.rank_dropout
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.module_dropout) {
            return Err(PluginError::config(
                "module_dropout",
                format!("{} must be in [0, 1]", self.module_dropout),
            ));
        }
        if self.method == Method::LoHa {
            for (key, set) in [
                ("decompose_both", self.decompose_both.is_some()),
                ("decompose_factor", self.decompose_factor.is_some()),
                ("rank_dropout_scale", self.rank_dropout_scale.is_some()),
            ] {
                if set {
                    return Err(PluginError::config(
                        key,
                        "is a LoKr key (plugin `lokr`); LoHa (peft's LoHaConfig) has no such key",
                    ));
                }
            }
            if self.init_weights == InitWeights::Lycoris {
                return Err(PluginError::config(
                    "init_weights",
                    "\"lycoris\" is LoKr's; LoHa takes true or false",
                ));
            }
        }
        self.targeting = Some(Targets::new(&self.target_modules, &self.modules_to_save)?);
        Ok(())
    }

    /// The rank of layer `module` (`rank_pattern`, else `r`).
    pub fn rank_for(&self, module: &str) -> PluginResult<i64> {
        self.rank_pattern.value_for(module, self.r, "rank_pattern")
    }

    /// `alpha / r` of layer `module` (`alpha_pattern` and `rank_pattern`, else `alpha` and
    /// `r`), peft's `scaling`.
    pub fn scaling_for(&self, module: &str) -> PluginResult<f64> {
        let alpha = self.alpha_pattern.value_for(module, self.alpha, "alpha_pattern")?;
        Ok(alpha / self.rank_for(module)? as f64)
    }

    pub fn decompose_both(&self) -> bool {
        self.decompose_both.unwrap_or(false)
    }

    pub fn decompose_factor(&self) -> i64 {
        self.decompose_factor.unwrap_or(-1)
    }

    pub fn rank_dropout_scale(&self) -> bool {
        self.rank_dropout_scale.unwrap_or(false)
    }

    /// Whether the layer at checkpoint path `module` is adapted.
    pub fn targets(&self, module: &str) -> bool {
        self.targeting.as_ref().is_some_and(|t| t.targets(module))
    }

    /// The `adapter_config.json` peft 0.21 writes for this configuration.
    pub fn peft_config(&self) -> Value {
        let init = match self.init_weights {
            InitWeights::Default => json!(true),
            InitWeights::Random => json!(false),
            InitWeights::Lycoris => json!("lycoris"),
        };
        let mut v = json!({
            "peft_type": self.method.peft_type(),
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": null,
            "revision": null,
            "inference_mode": true,
            "rank_pattern": self.rank_pattern.to_json(),
            "alpha_pattern": self.alpha_pattern.to_json(),
            "r": self.r,
            "alpha": self.alpha,
            "rank_dropout": self.rank_dropout,
            "module_dropout": self.module_dropout,
            "use_effective_conv2d": self.use_effective_conv2d,
            "target_modules": self.target_modules.to_json(),
            "exclude_modules": null,
            "init_weights": init,
            "layers_to_transform": null,
            "layers_pattern": null,
            "modules_to_save": if self.modules_to_save.is_empty() { Value::Null } else { json!(self.modules_to_save) },
        });
        if self.method == Method::LoKr {
            v["decompose_both"] = json!(self.decompose_both());
            v["decompose_factor"] = json!(self.decompose_factor());
            v["rank_dropout_scale"] = json!(self.rank_dropout_scale());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str, method: Method) -> String {
        LycorisConfig::from_json(json, method).unwrap_err().message().to_string()
    }

    #[test]
    fn defaults_are_peft_s() {
        for method in [Method::LoHa, Method::LoKr] {
            let c = LycorisConfig::from_json("{}", method).unwrap();
            let q = "model.layers.0.self_attn.q_proj";
            assert_eq!((c.rank_for(q).unwrap(), c.scaling_for(q).unwrap()), (8, 1.0));
            assert_eq!(c.init_weights, InitWeights::Default);
            assert!(c.targets("model.layers.0.self_attn.q_proj"));
            assert!(!c.targets("model.layers.0.self_attn.k_proj"));
            assert_eq!(c.peft_config()["peft_type"], method.peft_type());
        }
        let c = LycorisConfig::from_json("{}", Method::LoKr).unwrap();
        assert!(!c.decompose_both() && c.decompose_factor() == -1 && !c.rank_dropout_scale());
        assert_eq!(c.peft_config()["decompose_factor"], -1);
        assert!(LycorisConfig::from_json("{}", Method::LoHa).unwrap().peft_config()
            ["decompose_both"]
            .is_null());
        let c = LycorisConfig::from_json(
            r#"{"target_modules": "all-linear", "modules_to_save": ["lm_head"], "init_weights": "lycoris"}"#,
            Method::LoKr,
        )
        .unwrap();
        assert!(c.targets("model.layers.1.mlp.down_proj") && !c.targets("lm_head"));
        assert_eq!(c.peft_config()["init_weights"], "lycoris");
    }

    #[test]
    fn patterns_match_as_peft_s_get_pattern_key() {
        let c = LycorisConfig::from_json(
            r#"{"r": 4, "alpha": 8, "rank_pattern": {"down_proj": 2, "layers\\.1\\.self_attn\\.q_proj": 6},
                "alpha_pattern": {"v_proj": 3}}"#,
            Method::LoKr,
        )
        .unwrap();
        let m = |s: &str| format!("model.layers.{s}");
        assert_eq!(c.rank_for(&m("0.mlp.down_proj")).unwrap(), 2);
        assert_eq!(c.rank_for(&m("0.self_attn.q_proj")).unwrap(), 4);
        assert_eq!(c.rank_for(&m("1.self_attn.q_proj")).unwrap(), 6);
        assert_eq!(c.rank_for("down_proj").unwrap(), 2, "a whole name matches");
        assert_eq!(c.rank_for(&m("0.mlp.xdown_proj")).unwrap(), 4, "a pattern starts after a dot");
        assert_eq!(c.scaling_for(&m("0.self_attn.v_proj")).unwrap(), 0.75);
        assert_eq!(c.scaling_for(&m("0.mlp.down_proj")).unwrap(), 4.0);
        let v = c.peft_config();
        assert_eq!(v["rank_pattern"]["down_proj"], 2);
        assert_eq!(v["alpha_pattern"]["v_proj"], 3.0);
        let c = LycorisConfig::from_json(
            r#"{"rank_pattern": {"proj": 2, "q_proj": 3, "k_proj": 2}}"#,
            Method::LoHa,
        )
        .unwrap();
        assert_eq!(
            c.rank_for(&m("0.self_attn.v_proj")).unwrap(),
            8,
            "`proj` alone is no name's end after a dot"
        );
        assert_eq!(c.rank_for(&m("0.self_attn.q_proj")).unwrap(), 3);
        let c = LycorisConfig::from_json(
            r#"{"rank_pattern": {".*_proj": 2, "q_proj": 3}}"#,
            Method::LoHa,
        )
        .unwrap();
        let e = c.rank_for(&m("0.self_attn.q_proj")).unwrap_err();
        assert!(
            e.message().contains("`rank_pattern`") && e.message().contains("`q_proj` (3)"),
            "{e}"
        );
        assert_eq!(c.rank_for(&m("0.self_attn.k_proj")).unwrap(), 2);
    }

    #[test]
    fn config_errors_name_the_key() {
        for (json, method, key) in [
            (r#"{"r": 0}"#, Method::LoHa, "`r`"),
            (r#"{"r": 2.5}"#, Method::LoKr, "`r`"),
            (r#"{"alpha": -1}"#, Method::LoHa, "`alpha`"),
            (r#"{"rank_dropout": 1.0}"#, Method::LoKr, "`rank_dropout`"),
            (r#"{"module_dropout": -0.1}"#, Method::LoHa, "`module_dropout`"),
            (r#"{"target_modules": []}"#, Method::LoKr, "`target_modules`"),
            (r#"{"target_modules": "q_proj("}"#, Method::LoHa, "`target_modules`"),
            (r#"{"decompose_both": true}"#, Method::LoHa, "`decompose_both`"),
            (r#"{"decompose_factor": 4}"#, Method::LoHa, "`decompose_factor`"),
            (r#"{"init_weights": "lycoris"}"#, Method::LoHa, "`init_weights`"),
            (r#"{"init_weights": "gaussian"}"#, Method::LoKr, "`init_weights`"),
            (r#"{"modules_to_save": ["a("]}"#, Method::LoKr, "`modules_to_save[0]`"),
            (r#"{"lora_alpha": 8}"#, Method::LoHa, "`lora_alpha`"),
            (r#"{"rank_pattern": {"q_proj": 0}}"#, Method::LoKr, "`rank_pattern`"),
            (r#"{"rank_pattern": {"q_proj(": 2}}"#, Method::LoHa, "`rank_pattern`"),
            (r#"{"alpha_pattern": {"q_proj": "x"}}"#, Method::LoHa, "`alpha_pattern`"),
        ] {
            let e = err(json, method);
            assert!(e.contains(key), "{json}: {e}");
        }
    }
}
