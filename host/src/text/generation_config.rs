//! Decoding defaults of a model folder: `generation_config.json`, read as transformers'
//! `GenerationConfig` reads it.
//!
//! Field names are the file's keys. When the file is absent, transformers derives the
//! config from the model's `config.json` (`GenerationConfig.from_model_config`): the token
//! ids come from there and everything else keeps its default; [`GenerationConfig::from_dir`]
//! does the same. Keys ferrotune does not use are ignored, as transformers keeps them as
//! plain attributes. Reference:
//! <https://huggingface.co/docs/transformers/main/en/main_classes/text_generation>.
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value as Json;

use super::tokenizer::Tokenizer;

pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
pub const MODEL_CONFIG_FILE: &str = "config.json";

/// Decoding settings.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// Ids that end generation; `eos_token_id` given as an int or a list. Default: none
    /// (then the tokenizer's eos, see [`GenerationConfig::with_tokenizer_defaults`]).
    pub eos_token_id: Vec<i64>,
    /// Padding id for batched generation. Default: none.
    pub pad_token_id: Option<i64>,
    /// Default: none.
    pub bos_token_id: Option<i64>,
    /// Sample (true) or pick the most likely token (false, greedy). Default false.
    pub do_sample: bool,
    /// Softmax temperature when sampling, > 0. Default 1.0; chat models ship 0.6–0.8.
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]. Default 1.0 (off); typical 0.8–0.95.
    pub top_p: f64,
    /// Keep the k most likely tokens; 0 turns it off. Default 50; typical 20–50.
    pub top_k: i64,
    /// Most tokens to generate. Default: none (the caller decides).
    pub max_new_tokens: Option<usize>,
    /// Penalty > 1 for tokens already in the sequence (CTRL). Default 1.0 (off); 1.05–1.2.
    pub repetition_penalty: f64,
}

impl Default for GenerationConfig {
    /// transformers' `GenerationConfig()` defaults.
    fn default() -> Self {
        Self {
            eos_token_id: Vec::new(),
            pad_token_id: None,
            bos_token_id: None,
            do_sample: false,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 50,
            max_new_tokens: None,
            repetition_penalty: 1.0,
        }
    }
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; without it, the token ids of `dir/config.json`
    /// (when present) over the defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(GENERATION_CONFIG_FILE);
        if path.is_file() {
            return Self::from_file(&path);
        }
        let model_config = dir.join(MODEL_CONFIG_FILE);
        if model_config.is_file() {
            let json = read_json(&model_config)?;
            let mut cfg = Self::default();
            cfg.read_token_ids(&json, &model_config)?;
            return Ok(cfg);
        }
        Ok(Self::default())
    }

    /// Reads one `generation_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(&read_json(path)?, path)
    }

    /// Parses a `generation_config.json` document; `file` names it in errors.
    pub fn from_json(json: &Json, file: &Path) -> Result<Self> {
        let f = file.display();
        let obj = json
            .as_object()
            .ok_or_else(|| anyhow!("{f}: expected a JSON object at the top level"))?;
        let mut cfg = Self::default();
        cfg.read_token_ids(json, file)?;
        let number = |key: &str| -> Result<Option<f64>> {
            match obj.get(key) {
                None | Some(Json::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| anyhow!("{f}: key `{key}`: expected a number, found {v}")),
            }
        };
        if let Some(v) = obj.get("do_sample").filter(|v| !v.is_null()) {
            cfg.do_sample = v.as_bool().ok_or_else(|| {
                anyhow!("{f}: key `do_sample`: expected true or false, found {v}")
            })?;
        }
        if let Some(t) = number("temperature")? {
            if !(t >= 0.0 && t.is_finite()) {
                bail!("{f}: key `temperature`: must be a finite number >= 0, found {t}");
            }
            cfg.temperature = t;
        }
        if let Some(p) = number("top_p")? {
            if !(0.0..=1.0).contains(&p) {
                bail!("{f}: key `top_p`: must be in [0, 1], found {p}");
            }
            cfg.top_p = p;
        }
        if let Some(r) = number("repetition_penalty")? {
            if !(r > 0.0 && r.is_finite()) {
                bail!("{f}: key `repetition_penalty`: must be a finite number > 0, found {r}");
            }
            cfg.repetition_penalty = r;
        }
        if let Some(v) = obj.get("top_k").filter(|v| !v.is_null()) {
            cfg.top_k = v
                .as_i64()
                .filter(|k| *k >= 0)
                .ok_or_else(|| anyhow!("{f}: key `top_k`: expected an integer >= 0, found {v}"))?;
        }
        if let Some(v) = obj.get("max_new_tokens").filter(|v| !v.is_null()) {
            let n = v.as_u64().ok_or_else(|| {
                anyhow!("{f}: key `max_new_tokens`: expected an integer >= 0 or null, found {v}")
            })?;
            cfg.max_new_tokens = Some(
                usize::try_from(n)
                    .map_err(|_| anyhow!("{f}: key `max_new_tokens`: {n} is too large"))?,
            );
        }
        Ok(cfg)
    }

    /// `eos_token_id` (int, list or null), `pad_token_id`, `bos_token_id` of a config.
    fn read_token_ids(&mut self, json: &Json, file: &Path) -> Result<()> {
        let f = file.display();
        let id = |key: &str, v: &Json| -> Result<i64> {
            v.as_i64().filter(|i| *i >= 0).ok_or_else(|| {
                anyhow!("{f}: key `{key}`: expected a token id (an integer >= 0), found {v}")
            })
        };
        match json.get("eos_token_id") {
            None | Some(Json::Null) => {}
            Some(Json::Array(items)) => {
                self.eos_token_id = items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| id(&format!("eos_token_id[{i}]"), v))
                    .collect::<Result<_>>()?;
            }
            Some(v) => self.eos_token_id = vec![id("eos_token_id", v)?],
        }
        for (key, slot) in
            [("pad_token_id", &mut self.pad_token_id), ("bos_token_id", &mut self.bos_token_id)]
        {
            match json.get(key) {
                None | Some(Json::Null) => {}
                Some(v) => *slot = Some(id(key, v)?),
            }
        }
        Ok(())
    }

    /// The ids that end generation.
    pub fn eos_token_ids(&self) -> Vec<i64> {
        self.eos_token_id.clone()
    }

    /// Fills what the model folder's generation config leaves open from the tokenizer: the
    /// eos ids become the tokenizer's eos token when the config names none, and the pad id
    /// the tokenizer's pad token when the config has none.
    pub fn with_tokenizer_defaults(mut self, tokenizer: &Tokenizer) -> Self {
        if self.eos_token_id.is_empty() {
            self.eos_token_id.extend(tokenizer.eos_token_id());
        }
        if self.pad_token_id.is_none() {
            self.pad_token_id = tokenizer.pad_token_id();
        }
        self
    }
}

fn read_json(path: &Path) -> Result<Json> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(tag: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ferrotune-genconf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn qwen2_instruct_generation_config() {
        // Qwen/Qwen2-7B-Instruct's generation_config.json.
        let text = r#"{"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": true,
            "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7,
            "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}"#;
        let cfg = GenerationConfig::from_dir(&dir_with("qwen", &[(GENERATION_CONFIG_FILE, text)]))
            .unwrap();
        assert_eq!(cfg.eos_token_ids(), vec![151645, 151643]);
        assert_eq!((cfg.pad_token_id, cfg.bos_token_id), (Some(151643), Some(151643)));
        assert!(cfg.do_sample);
        assert_eq!(
            (cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty),
            (0.7, 0.8, 20, 1.05)
        );
        assert_eq!(cfg.max_new_tokens, None);
    }

    #[test]
    fn eos_as_a_single_int_and_defaults() {
        let cfg = GenerationConfig::from_dir(&dir_with(
            "int",
            &[(GENERATION_CONFIG_FILE, r#"{"eos_token_id": 2, "max_new_tokens": 64}"#)],
        ))
        .unwrap();
        assert_eq!(cfg.eos_token_ids(), vec![2]);
        assert_eq!(cfg.max_new_tokens, Some(64));
        assert_eq!(
            (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty),
            (false, 1.0, 1.0, 50, 1.0)
        );
    }

    #[test]
    fn absent_file_uses_config_json_ids_then_defaults() {
        let cfg = GenerationConfig::from_dir(&dir_with(
            "model",
            &[(MODEL_CONFIG_FILE, r#"{"eos_token_id": 7, "bos_token_id": 1, "hidden_size": 8}"#)],
        ))
        .unwrap();
        assert_eq!((cfg.eos_token_ids(), cfg.bos_token_id), (vec![7], Some(1)));
        assert_eq!(
            GenerationConfig::from_dir(&dir_with("empty", &[])).unwrap(),
            GenerationConfig::default()
        );
    }

    #[test]
    fn bad_values_name_file_and_key() {
        for (text, key) in [
            (r#"{"eos_token_id": "x"}"#, "`eos_token_id`"),
            (r#"{"eos_token_id": [1, -2]}"#, "`eos_token_id[1]`"),
            (r#"{"temperature": -1}"#, "`temperature`"),
            (r#"{"top_p": 1.5}"#, "`top_p`"),
            (r#"{"top_k": 2.5}"#, "`top_k`"),
            (r#"{"do_sample": "yes"}"#, "`do_sample`"),
            (r#"{"max_new_tokens": -5}"#, "`max_new_tokens`"),
            (r#"{"repetition_penalty": 0}"#, "`repetition_penalty`"),
        ] {
            let err =
                GenerationConfig::from_dir(&dir_with("bad", &[(GENERATION_CONFIG_FILE, text)]))
                    .unwrap_err()
                    .to_string();
            assert!(err.contains(GENERATION_CONFIG_FILE) && err.contains(key), "{text}: {err}");
        }
    }
}
