//! `init-model`: writes a randomly initialised Hugging Face model directory (config.json,
//! model.safetensors, the tokenizer files, generation_config.json) that transformers and
//! [`CausalLM::load`](super::CausalLM::load) both load. A Qwen2-VL model
//! (`Qwen2VLForConditionalGeneration`) gets transformers 5's nested config.json, its vision
//! weights (under the keys transformers 5.24's `save_pretrained` writes: `visual.*`,
//! `model.layers.*`), and Qwen2-VL's standard `preprocessor_config.json`; a Qwen2.5-VL model
//! (`Qwen2_5_VLForConditionalGeneration`, preset `tiny-vl25`) likewise, with its windowed
//! RMSNorm / SwiGLU tower and a `video_preprocessor_config.json` too.
//!
//! Weights follow transformers' `_init_weights`: linear and convolution weights and embeddings
//! ~ N(0, 0.02) (`initializer_range`), biases 0, RMSNorm and LayerNorm weights 1 (LayerNorm
//! biases 0), the padding token's embedding row 0. The
//! random numbers come from a seeded generator of our own (SplitMix64 + Box–Muller), so a seed
//! gives the same model on every machine and libtorch's global generator is left alone.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

use super::config::{Architecture, LlamaConfig};
use super::qwen2vl::{Qwen2VLConfig, LANGUAGE_MODEL};
use crate::util::rng::SplitMix64;

/// What to write. Build one with [`InitOptions::preset`] and adjust fields.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The folder to write (created; refused when it already holds a model, unless `overwrite`).
    pub out_dir: PathBuf,
    /// A `tokenizer.json`, or a folder holding one (its `tokenizer_config.json`,
    /// `special_tokens_map.json` and `chat_template.jinja` are copied too when present).
    pub tokenizer: PathBuf,
    /// `Qwen2` (q/k/v biases) or `Llama` (none); `Mistral` is accepted too.
    pub arch: Architecture,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// Must divide `num_attention_heads`.
    pub num_key_value_heads: i64,
    pub intermediate_size: i64,
    /// Default: the tokenizer's vocabulary, added tokens included.
    pub vocab_size: Option<i64>,
    pub tie_word_embeddings: bool,
    /// RoPE base (10000 for Llama 2, 1e6 for Qwen2).
    pub rope_theta: f64,
    pub max_position_embeddings: i64,
    pub seed: u64,
    /// Float or BFloat16 (Half works too): the dtype of model.safetensors.
    pub dtype: Kind,
    /// Replace a model already in `out_dir`.
    pub overwrite: bool,
    /// Qwen2-VL's vision tower and M-RoPE split (used when `arch` is `Qwen2VL`; `None` there
    /// means [`VisionInitOptions::tiny`] with a split derived from the head size).
    pub vision: Option<VisionInitOptions>,
}

/// The vision side of a random Qwen2-VL model (patch 14, temporal patch 2 and merge size 2
/// are Qwen2-VL's fixed values; the merger's output width is the text `hidden_size`).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionInitOptions {
    /// Vision blocks (32 in Qwen2-VL).
    pub depth: i64,
    /// Width of the vision blocks (1280); `embed_dim / num_heads` must be a multiple of 4.
    pub embed_dim: i64,
    pub num_heads: i64,
    /// MLP width = `embed_dim × mlp_ratio` (4).
    pub mlp_ratio: i64,
    /// Frequencies per temporal / height / width axis; sums to `head_dim / 2`. `None`: a
    /// quarter for time, the rest split between height and width (Qwen2-VL's 16/24/24 of 64).
    pub mrope_section: Option<Vec<i64>>,
    /// Qwen2.5-VL: the attention window's side in pixels (112; a multiple of 28 = merge ×
    /// patch). Qwen2-VL ignores it, and the next two.
    pub window_size: i64,
    /// Qwen2.5-VL: the blocks attending over whole frames (the others use windows).
    pub fullatt_block_indexes: Vec<i64>,
    /// Qwen2.5-VL: temporal positions per second of video (2 in Qwen2.5-VL's checkpoints).
    pub tokens_per_second: i64,
}

impl VisionInitOptions {
    /// Depth 2, embed_dim 32, 2 heads, mlp_ratio 2 (the `tiny-vl` preset); for Qwen2.5-VL
    /// (`tiny-vl25`) windows of 56 pixels (2 × 2 merged tokens), block 0 windowed and block 1
    /// full attention, 2 tokens per second.
    pub fn tiny() -> Self {
        Self {
            depth: 2,
            embed_dim: 32,
            num_heads: 2,
            mlp_ratio: 2,
            mrope_section: None,
            window_size: 56,
            fullatt_block_indexes: vec![1],
            tokens_per_second: 2,
        }
    }
}

/// Qwen2-VL's split of `head_dim / 2` rotary frequencies: a quarter temporal, the rest halved
/// between height and width (`[16, 24, 24]` for head_dim 128, `[2, 3, 3]` for 16).
pub fn default_mrope_section(head_dim: i64) -> Vec<i64> {
    let half = head_dim / 2;
    let t = half / 4;
    let h = (half - t) / 2;
    vec![t, h, half - t - h]
}

/// Names of the presets of [`InitOptions::preset`].
pub const PRESETS: [&str; 5] = ["tiny", "small", "tiny-vl", "tiny-vl25", "qwen2-0.5b"];

impl InitOptions {
    /// `tiny`: hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 176 (tests, seconds).
    /// `small`: hidden 512, 8 layers, 8 heads, 2 kv heads, intermediate 1408 (benchmarks).
    /// `tiny-vl`: Qwen2-VL with the `tiny` decoder (M-RoPE split [2, 3, 3]) and a vision tower
    /// of depth 2, embed_dim 32, 2 heads, mlp_ratio 2.
    /// `tiny-vl25`: Qwen2.5-VL with the same sizes (SwiGLU width 64), 56-pixel windows, block 1
    /// full attention, tokens_per_second 2.
    /// `qwen2-0.5b`: Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 kv heads,
    /// intermediate 4864; ~494M parameters with Qwen's 151k vocabulary), for memory benchmarks.
    /// All: tied embeddings, rope_theta 1e6, 2048 positions, bf16, seed 0; Qwen2 unless VL.
    pub fn preset(
        name: &str,
        tokenizer: impl Into<PathBuf>,
        out_dir: impl Into<PathBuf>,
    ) -> Result<Self> {
        let (hidden, layers, heads, kv, inter) = match name {
            "tiny" | "tiny-vl" | "tiny-vl25" => (64, 2, 4, 2, 176),
            "small" => (512, 8, 8, 2, 1408),
            "qwen2-0.5b" => (896, 24, 14, 2, 4864),
            other => bail!("unknown model preset `{other}` (presets: {})", PRESETS.join(", ")),
        };
        Ok(Self {
            out_dir: out_dir.into(),
            tokenizer: tokenizer.into(),
            arch: match name {
                "tiny-vl" => Architecture::Qwen2VL,
                "tiny-vl25" => Architecture::Qwen25VL,
                _ => Architecture::Qwen2,
            },
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            intermediate_size: inter,
            vocab_size: None,
            tie_word_embeddings: true,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 2048,
            seed: 0,
            dtype: Kind::BFloat16,
            overwrite: false,
            vision: name.starts_with("tiny-vl").then(|| VisionInitOptions {
                mrope_section: Some(vec![2, 3, 3]),
                ..VisionInitOptions::tiny()
            }),
        })
    }
}

/// `qwen2`, `llama`, `mistral`, `qwen2_vl` or `qwen2_5_vl` (also the Hugging Face class names).
pub fn parse_arch(name: &str) -> Result<Architecture> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "qwen2" | "qwen2forcausallm" => Architecture::Qwen2,
        "llama" | "llamaforcausallm" => Architecture::Llama,
        "mistral" | "mistralforcausallm" => Architecture::Mistral,
        "qwen2_vl" | "qwen2-vl" | "qwen2vl" | "qwen2vlforconditionalgeneration" => {
            Architecture::Qwen2VL
        }
        "qwen2_5_vl" | "qwen2.5-vl" | "qwen25vl" | "qwen2_5_vlforconditionalgeneration" => {
            Architecture::Qwen25VL
        }
        _ => bail!("unknown architecture `{name}` (qwen2, llama, mistral, qwen2_vl, qwen2_5_vl)"),
    })
}

/// The ids of Qwen2-VL's vision tokens in a tokenizer: `<|image_pad|>`, `<|video_pad|>`,
/// `<|vision_start|>`, `<|vision_end|>` (151655, 151656, 151652, 151653 in Qwen2-VL's own).
pub fn vision_token_ids(tokenizer: &Path) -> Result<[i64; 4]> {
    let file = tokenizer_json(tokenizer)?;
    let tok = tokenizers::Tokenizer::from_file(&file)
        .map_err(|e| anyhow::anyhow!("{} is not a readable tokenizer.json: {e}", file.display()))?;
    let names = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"];
    let missing: Vec<&str> =
        names.iter().copied().filter(|n| tok.token_to_id(n).is_none()).collect();
    if !missing.is_empty() {
        bail!(
            "init-model: a Qwen2-VL model needs the vision tokens {} in its tokenizer, but {} lacks {}; \
             use Qwen2-VL's tokenizer (or add them as special tokens)",
            names.join(", "),
            file.display(),
            missing.join(", ")
        );
    }
    Ok(names.map(|n| tok.token_to_id(n).expect("checked above") as i64))
}

/// Qwen2-VL's standard `preprocessor_config.json` (Qwen2-VL-7B-Instruct's values).
pub fn qwen2vl_preprocessor_config() -> Value {
    json!({
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "max_pixels": 12845056,
        "min_pixels": 3136,
        "merge_size": 2,
        "patch_size": 14,
        "processor_class": "Qwen2VLProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": 12845056, "shortest_edge": 3136},
        "temporal_patch_size": 2
    })
}

/// The chat template Qwen2-VL and Qwen2.5-VL ship (byte-identical in both; trl's
/// `chat_templates/qwen2_5_vl.jinja`): string contents as ChatML, and content lists whose image
/// and video entries become `<|vision_start|><|image_pad|><|vision_end|>` and
/// `<|vision_start|><|video_pad|><|vision_end|>` (`Picture N: ` / `Video N: ` before them with
/// `add_vision_id`).
pub const QWEN_VL_CHAT_TEMPLATE: &str = concat!(
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}",
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}",
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}",
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}",
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}",
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}",
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>",
    "{% elif content['type'] == 'video' or 'video' in content %}",
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}",
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>",
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n",
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
);

/// Qwen2.5-VL's `preprocessor_config.json`: Qwen2-VL's, for `Qwen2_5_VLProcessor`.
pub fn qwen25vl_preprocessor_config() -> Value {
    let mut c = qwen2vl_preprocessor_config();
    c["processor_class"] = json!("Qwen2_5_VLProcessor");
    c
}

/// The `video_preprocessor_config.json` of a Qwen2-VL / Qwen2.5-VL model: transformers 5.24's
/// `Qwen2VLVideoProcessor` class defaults (frames of 100352 to 602112 pixels, 4 to 768 frames,
/// no frame sampling).
pub fn qwen2vl_video_preprocessor_config(processor_class: &str) -> Value {
    json!({
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "do_sample_frames": false,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "max_frames": 768,
        "merge_size": 2,
        "min_frames": 4,
        "patch_size": 14,
        "processor_class": processor_class,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": 602112, "shortest_edge": 100352},
        "temporal_patch_size": 2,
        "video_processor_type": "Qwen2VLVideoProcessor"
    })
}

/// `f32`/`float32`, `bf16`/`bfloat16`, `f16`/`float16`.
pub fn parse_dtype(name: &str) -> Result<Kind> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" | "float" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "fp16" | "float16" | "half" => Kind::Half,
        _ => bail!("unknown dtype `{name}` (f32, bf16, f16)"),
    })
}

/// What [`write_random_model`] wrote.
#[derive(Debug, Clone)]
pub struct InitReport {
    pub dir: PathBuf,
    pub config: LlamaConfig,
    pub parameters: i64,
    pub files: Vec<String>,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
    pub pad_token_id: Option<i64>,
}

/// The special tokens of a tokenizer, as ids.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<i64>,
    pub eos: Option<i64>,
    pub pad: Option<i64>,
    /// Largest id + 1, added tokens included.
    pub vocab_size: i64,
}

/// Finds `tokenizer.json` from a file or folder path.
fn tokenizer_json(path: &Path) -> Result<PathBuf> {
    let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
    if !file.is_file() {
        bail!(
            "tokenizer: {} does not exist (give a tokenizer.json or a folder holding one)",
            file.display()
        );
    }
    Ok(file)
}

/// Reads the vocabulary size and the bos/eos/pad ids of a tokenizer: names from
/// `tokenizer_config.json` (else `special_tokens_map.json`) next to it, else well-known special
/// tokens among the tokenizer's added tokens; ids from the tokenizer itself.
pub fn special_tokens(tokenizer: &Path) -> Result<SpecialTokens> {
    let file = tokenizer_json(tokenizer)?;
    let tok = tokenizers::Tokenizer::from_file(&file)
        .map_err(|e| anyhow::anyhow!("{} is not a readable tokenizer.json: {e}", file.display()))?;
    let vocab = tok.get_vocab(true);
    let vocab_size = vocab.values().map(|&i| i as i64 + 1).max().unwrap_or(0);
    let folder = file.parent().unwrap_or(Path::new("."));
    let mut named: HashMap<&str, Option<String>> = HashMap::new();
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let p = folder.join(name);
        if !p.is_file() {
            continue;
        }
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&p)?)
            .with_context(|| format!("{} is not valid JSON", p.display()))?;
        for key in ["bos", "eos", "pad"] {
            // A key that is present decides, even as null (Qwen2 declares `bos_token: null`);
            // tokenizer_config.json (read second) wins.
            match v.get(format!("{key}_token")) {
                Some(Value::String(s)) => named.insert(key, Some(s.clone())),
                Some(Value::Object(o)) => {
                    named.insert(key, o.get("content").and_then(|c| c.as_str()).map(str::to_string))
                }
                Some(Value::Null) => named.insert(key, None),
                _ => None,
            };
        }
    }
    // Fallback names only match special added tokens, never ordinary vocabulary entries
    // (Qwen2's BPE vocabulary has a plain `<s>`).
    let added = tok.get_added_tokens_decoder();
    let special_id = |name: &str| {
        added.iter().find(|(_, t)| t.special && t.content == name).map(|(&i, _)| i as i64)
    };
    let id_of = |key: &str, fallbacks: &[&str]| -> Option<i64> {
        match named.get(key) {
            Some(Some(name)) => tok.token_to_id(name).map(|i| i as i64),
            Some(None) => None,
            None => fallbacks.iter().find_map(|n| special_id(n)),
        }
    };
    Ok(SpecialTokens {
        bos: id_of("bos", &["<|begin_of_text|>", "<s>", "<bos>", "[BOS]"]),
        eos: id_of(
            "eos",
            &[
                "<|endoftext|>",
                "<|end_of_text|>",
                "</s>",
                "<eos>",
                "[EOS]",
                "<|im_end|>",
                "<|eot_id|>",
            ],
        ),
        pad: id_of("pad", &["<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>"]),
        vocab_size,
    })
}

fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        other => {
            bail!("init-model: dtype {other:?} is not supported (float32, bfloat16 or float16)")
        }
    })
}

/// The config.json of a model described by `opts`.
fn config_json(opts: &InitOptions, vocab: i64, special: &SpecialTokens) -> Result<Value> {
    let head_dim = opts.hidden_size / opts.num_attention_heads;
    let mut c = json!({
        "architectures": [opts.arch.hf_name()],
        "model_type": opts.arch.model_type(),
        "hidden_size": opts.hidden_size,
        "intermediate_size": opts.intermediate_size,
        "num_hidden_layers": opts.num_hidden_layers,
        "num_attention_heads": opts.num_attention_heads,
        "num_key_value_heads": opts.num_key_value_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": opts.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": opts.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": opts.rope_theta},
        "attention_dropout": 0.0,
        "tie_word_embeddings": opts.tie_word_embeddings,
        "use_cache": true,
        "vocab_size": vocab,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "torch_dtype": dtype_name(opts.dtype)?,
    });
    let extra = match opts.arch {
        Architecture::Llama => {
            json!({"attention_bias": false, "mlp_bias": false, "pretraining_tp": 1})
        }
        Architecture::Qwen2 => json!({
            "use_sliding_window": false, "sliding_window": null, "max_window_layers": opts.num_hidden_layers,
            "layer_types": vec!["full_attention"; opts.num_hidden_layers.max(0) as usize],
        }),
        Architecture::Mistral => json!({"sliding_window": null}),
        // `--arch` offers no Qwen3 (its per-head q/k norms are not generated here).
        Architecture::Qwen3 => bail!("init-model does not make Qwen3 checkpoints"),
        Architecture::Qwen2VL | Architecture::Qwen25VL => return qwen2vl_config_json(opts, c),
    };
    c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    Ok(c)
}

/// The vision options of `opts` (its own, else the tiny ones with the default M-RoPE split).
fn vision_options(opts: &InitOptions) -> VisionInitOptions {
    let mut v = opts.vision.clone().unwrap_or_else(VisionInitOptions::tiny);
    if v.mrope_section.is_none() {
        v.mrope_section = Some(default_mrope_section(opts.hidden_size / opts.num_attention_heads));
    }
    v
}

/// transformers 5's nested Qwen2-VL (or Qwen2.5-VL) config.json around the text keys `text` (a
/// Qwen2 config).
fn qwen2vl_config_json(opts: &InitOptions, text: Value) -> Result<Value> {
    let v = vision_options(opts);
    let [image, video, start, end] = vision_token_ids(&opts.tokenizer)?;
    let mut text = text;
    let t = text.as_object_mut().expect("an object");
    for key in ["architectures", "rope_theta", "torch_dtype", "tie_word_embeddings", "head_dim"] {
        t.remove(key);
    }
    let qwen25 = opts.arch == Architecture::Qwen25VL;
    let model_type = opts.arch.model_type();
    t.insert("model_type".into(), json!(format!("{model_type}_text")));
    t.insert("rope_parameters".into(), json!({"rope_type": "default", "rope_theta": opts.rope_theta, "mrope_section": v.mrope_section}));
    t.extend(
        json!({
            "use_sliding_window": false, "sliding_window": null, "max_window_layers": opts.num_hidden_layers,
            "layer_types": vec!["full_attention"; opts.num_hidden_layers.max(0) as usize],
        })
        .as_object()
        .unwrap()
        .clone(),
    );
    let vision = if qwen25 {
        json!({
            "model_type": "qwen2_5_vl_vision",
            "depth": v.depth,
            "hidden_size": v.embed_dim,
            "out_hidden_size": opts.hidden_size,
            "intermediate_size": v.embed_dim * v.mlp_ratio,
            "hidden_act": "silu",
            "num_heads": v.num_heads,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": v.tokens_per_second,
            "window_size": v.window_size,
            "fullatt_block_indexes": v.fullatt_block_indexes,
            "initializer_range": 0.02,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"}
        })
    } else {
        json!({
            "model_type": "qwen2_vl_vision",
            "depth": v.depth,
            "embed_dim": v.embed_dim,
            "hidden_size": opts.hidden_size,
            "hidden_act": "quick_gelu",
            "mlp_ratio": v.mlp_ratio,
            "num_heads": v.num_heads,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": 0.02,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"}
        })
    };
    Ok(json!({
        "architectures": [opts.arch.hf_name()],
        "model_type": model_type,
        "dtype": dtype_name(opts.dtype)?,
        "image_token_id": image,
        "video_token_id": video,
        "vision_start_token_id": start,
        "vision_end_token_id": end,
        "tie_word_embeddings": opts.tie_word_embeddings,
        "text_config": text,
        "vision_config": vision
    }))
}

fn check_options(opts: &InitOptions) -> Result<()> {
    for (name, v) in [
        ("hidden", opts.hidden_size),
        ("layers", opts.num_hidden_layers),
        ("heads", opts.num_attention_heads),
        ("kv_heads", opts.num_key_value_heads),
        ("intermediate", opts.intermediate_size),
        ("max_position_embeddings", opts.max_position_embeddings),
    ] {
        if v <= 0 {
            bail!("init-model: `{name}` must be positive, got {v}");
        }
    }
    if opts.hidden_size % opts.num_attention_heads != 0 {
        bail!(
            "init-model: hidden ({}) must be a multiple of heads ({})",
            opts.hidden_size,
            opts.num_attention_heads
        );
    }
    if (opts.hidden_size / opts.num_attention_heads) % 2 != 0 {
        bail!(
            "init-model: hidden / heads must be even (rotary embeddings), got {}",
            opts.hidden_size / opts.num_attention_heads
        );
    }
    if opts.num_attention_heads % opts.num_key_value_heads != 0 {
        bail!(
            "init-model: kv_heads ({}) must divide heads ({})",
            opts.num_key_value_heads,
            opts.num_attention_heads
        );
    }
    if opts.rope_theta.is_nan() || opts.rope_theta <= 0.0 {
        bail!("init-model: rope_theta must be positive, got {}", opts.rope_theta);
    }
    dtype_name(opts.dtype)?;
    Ok(())
}

/// The tensors of a model with `config`, in checkpoint order: `(key, shape, init)`.
enum Init {
    Normal,
    Zeros,
    Ones,
}

fn parameter_list(cfg: &LlamaConfig, vl: Option<&Qwen2VLConfig>) -> Vec<(String, Vec<i64>, Init)> {
    let (h, kv, d, hidden, inter, vocab) = (
        cfg.num_attention_heads,
        cfg.num_kv_heads(),
        cfg.head_dim(),
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let linear =
        |p: &mut Vec<(String, Vec<i64>, Init)>, path: String, out: i64, inp: i64, bias: bool| {
            p.push((format!("{path}.weight"), vec![out, inp], Init::Normal));
            if bias {
                p.push((format!("{path}.bias"), vec![out], Init::Zeros));
            }
        };
    // LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL's, weight only).
    let rms = vl.is_some_and(|vl| vl.vision_config.qwen25);
    let norm = |p: &mut Vec<(String, Vec<i64>, Init)>, path: String, dim: i64| {
        p.push((format!("{path}.weight"), vec![dim], Init::Ones));
        if !rms {
            p.push((format!("{path}.bias"), vec![dim], Init::Zeros));
        }
    };
    let mut p = Vec::new();
    if let Some(vl) = vl {
        let v = &vl.vision_config;
        let (e, mlp, merged) = (
            v.embed_dim,
            v.mlp_hidden_dim(),
            v.embed_dim * v.spatial_merge_size * v.spatial_merge_size,
        );
        let pe = vec![e, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size];
        p.push(("model.visual.patch_embed.proj.weight".to_string(), pe, Init::Normal));
        for b in 0..v.depth {
            let bp = format!("model.visual.blocks.{b}");
            norm(&mut p, format!("{bp}.norm1"), e);
            norm(&mut p, format!("{bp}.norm2"), e);
            linear(&mut p, format!("{bp}.attn.qkv"), 3 * e, e, true);
            linear(&mut p, format!("{bp}.attn.proj"), e, e, true);
            if rms {
                linear(&mut p, format!("{bp}.mlp.gate_proj"), mlp, e, true);
                linear(&mut p, format!("{bp}.mlp.up_proj"), mlp, e, true);
                linear(&mut p, format!("{bp}.mlp.down_proj"), e, mlp, true);
            } else {
                linear(&mut p, format!("{bp}.mlp.fc1"), mlp, e, true);
                linear(&mut p, format!("{bp}.mlp.fc2"), e, mlp, true);
            }
        }
        norm(&mut p, "model.visual.merger.ln_q".to_string(), e);
        linear(&mut p, "model.visual.merger.mlp.0".to_string(), merged, merged, true);
        linear(&mut p, "model.visual.merger.mlp.2".to_string(), v.hidden_size, merged, true);
    }
    let m = if vl.is_some() { LANGUAGE_MODEL } else { "model" };
    p.push((format!("{m}.embed_tokens.weight"), vec![vocab, hidden], Init::Normal));
    for l in 0..cfg.num_hidden_layers {
        let a = format!("{m}.layers.{l}.self_attn");
        linear(&mut p, format!("{a}.q_proj"), h * d, hidden, cfg.qkv_bias());
        linear(&mut p, format!("{a}.k_proj"), kv * d, hidden, cfg.qkv_bias());
        linear(&mut p, format!("{a}.v_proj"), kv * d, hidden, cfg.qkv_bias());
        linear(&mut p, format!("{a}.o_proj"), hidden, h * d, cfg.o_bias());
        let mp = format!("{m}.layers.{l}.mlp");
        linear(&mut p, format!("{mp}.gate_proj"), inter, hidden, cfg.mlp_bias());
        linear(&mut p, format!("{mp}.up_proj"), inter, hidden, cfg.mlp_bias());
        linear(&mut p, format!("{mp}.down_proj"), hidden, inter, cfg.mlp_bias());
        p.push((format!("{m}.layers.{l}.input_layernorm.weight"), vec![hidden], Init::Ones));
        p.push((
            format!("{m}.layers.{l}.post_attention_layernorm.weight"),
            vec![hidden],
            Init::Ones,
        ));
    }
    p.push((format!("{m}.norm.weight"), vec![hidden], Init::Ones));
    if !cfg.tie_word_embeddings {
        linear(&mut p, "lm_head".to_string(), vocab, hidden, false);
    }
    p
}

/// Every tensor of the new model, drawn from one seeded generator in checkpoint order (the
/// padding token's embedding row zero), with the number of parameters.
fn random_tensors(
    opts: &InitOptions,
    config: &LlamaConfig,
    vl: Option<&Qwen2VLConfig>,
    special: &SpecialTokens,
    vocab: i64,
) -> Result<(Vec<(String, Tensor)>, i64)> {
    let mut rng = SplitMix64(opts.seed);
    let std = config.initializer_range;
    let mut tensors = Vec::new();
    let mut parameters = 0i64;
    for (key, shape, init) in parameter_list(config, vl) {
        let n: i64 = shape.iter().product();
        parameters += n;
        let t = match init {
            Init::Normal => {
                let mut values = rng.normal(n as usize, std);
                if key.ends_with("embed_tokens.weight") {
                    if let Some(pad) = special.pad.filter(|&p| p < vocab) {
                        let row = (pad * config.hidden_size) as usize;
                        values[row..row + config.hidden_size as usize]
                            .iter_mut()
                            .for_each(|v| *v = 0.0);
                    }
                }
                Tensor::f_from_slice(&values)?.f_view(shape.as_slice())?
            }
            Init::Zeros => Tensor::f_zeros(shape.as_slice(), (Kind::Float, tch::Device::Cpu))?,
            Init::Ones => Tensor::f_ones(shape.as_slice(), (Kind::Float, tch::Device::Cpu))?,
        };
        // Qwen2-VL tensors are written as transformers' save_pretrained writes them.
        let key = if vl.is_some() { super::qwen2vl::saved_key(&key) } else { key };
        tensors.push((key, t.f_to_kind(opts.dtype)?));
    }
    Ok((tensors, parameters))
}

/// Writes a randomly initialised model directory (see the module docs).
pub fn write_random_model(opts: &InitOptions) -> Result<InitReport> {
    check_options(opts)?;
    let tokenizer_file = tokenizer_json(&opts.tokenizer)?;
    let special = special_tokens(&tokenizer_file)?;
    let vocab = opts.vocab_size.unwrap_or(special.vocab_size);
    if vocab < special.vocab_size {
        bail!(
            "init-model: vocab_size {vocab} is smaller than the tokenizer's {} tokens ({})",
            special.vocab_size,
            tokenizer_file.display()
        );
    }
    if vocab <= 0 {
        bail!("init-model: the tokenizer {} has no tokens", tokenizer_file.display());
    }
    let dir = &opts.out_dir;
    if dir.join("config.json").exists() && !opts.overwrite {
        bail!("init-model: {} already holds a model (config.json); choose another folder or overwrite", dir.display());
    }
    if opts.arch.is_qwen_vl() {
        vision_token_ids(&tokenizer_file)?; // refuse a tokenizer without them before writing anything
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let config_value = config_json(opts, vocab, &special)?;
    let config_text = serde_json::to_string_pretty(&config_value)?;
    let config = LlamaConfig::from_json(&config_text, &dir.join("config.json"))?;
    let vl = match opts.arch {
        Architecture::Qwen2VL | Architecture::Qwen25VL => Some(Qwen2VLConfig::from_value(
            &config_value,
            &dir.join("config.json"),
            config.hidden_size,
        )?),
        _ => None,
    };

    let (tensors, parameters) = random_tensors(opts, &config, vl.as_ref(), &special, vocab)?;
    // A shard index left by an earlier model would take precedence over nothing, but confuses.
    let _ = std::fs::remove_file(dir.join("model.safetensors.index.json"));
    crate::util::safetensors::write(&dir.join("model.safetensors"), &tensors)?;
    std::fs::write(dir.join("config.json"), config_text + "\n")?;

    let mut generation = serde_json::Map::new();
    for (k, v) in [
        ("bos_token_id", special.bos),
        ("eos_token_id", special.eos),
        ("pad_token_id", special.pad),
    ] {
        if let Some(v) = v {
            generation.insert(k.to_string(), json!(v));
        }
    }
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::to_string_pretty(&Value::Object(generation))? + "\n",
    )?;

    let mut files = vec![
        "config.json".to_string(),
        "model.safetensors".to_string(),
        "generation_config.json".to_string(),
    ];
    if vl.is_some() {
        let (images, processor) = if opts.arch == Architecture::Qwen25VL {
            (qwen25vl_preprocessor_config(), "Qwen2_5_VLProcessor")
        } else {
            (qwen2vl_preprocessor_config(), "Qwen2VLProcessor")
        };
        std::fs::write(
            dir.join("preprocessor_config.json"),
            serde_json::to_string_pretty(&images)? + "\n",
        )?;
        files.push("preprocessor_config.json".to_string());
        if opts.arch == Architecture::Qwen25VL {
            std::fs::write(
                dir.join("video_preprocessor_config.json"),
                serde_json::to_string_pretty(&qwen2vl_video_preprocessor_config(processor))? + "\n",
            )?;
            files.push("video_preprocessor_config.json".to_string());
        }
    }
    let folder = tokenizer_file.parent().unwrap_or(Path::new("."));
    // Qwen2.5-VL gets its own chat template (images and videos in content lists) unless the
    // tokenizer folder brings one as a file (copied below; a file wins over tokenizer_config's).
    if opts.arch == Architecture::Qwen25VL && !folder.join("chat_template.jinja").is_file() {
        std::fs::write(dir.join("chat_template.jinja"), QWEN_VL_CHAT_TEMPLATE)?;
        files.push("chat_template.jinja".to_string());
    }
    std::fs::copy(&tokenizer_file, dir.join("tokenizer.json")).with_context(|| {
        format!("cannot copy {} into {}", tokenizer_file.display(), dir.display())
    })?;
    files.push("tokenizer.json".to_string());
    for name in ["tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"] {
        let src = folder.join(name);
        if src.is_file() {
            std::fs::copy(&src, dir.join(name))
                .with_context(|| format!("cannot copy {}", src.display()))?;
            files.push(name.to_string());
        }
    }
    tracing::info!(
        "wrote a random {} with {parameters} parameters to {}",
        opts.arch.hf_name(),
        dir.display()
    );
    Ok(InitReport {
        dir: dir.clone(),
        config,
        parameters,
        files,
        bos_token_id: special.bos,
        eos_token_id: special.eos,
        pad_token_id: special.pad,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_draws_have_the_right_moments() {
        let v = SplitMix64(7).normal(100_000, 0.02);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 3e-4, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 3e-4, "std {}", var.sqrt());
        assert_eq!(SplitMix64(7).normal(5, 1.0), SplitMix64(7).normal(5, 1.0));
        assert_ne!(SplitMix64(7).normal(5, 1.0), SplitMix64(8).normal(5, 1.0));
    }

    #[test]
    fn presets() {
        let t = InitOptions::preset("tiny", "t.json", "out").unwrap();
        assert_eq!(
            (
                t.hidden_size,
                t.num_hidden_layers,
                t.num_attention_heads,
                t.num_key_value_heads,
                t.intermediate_size
            ),
            (64, 2, 4, 2, 176)
        );
        let s = InitOptions::preset("small", "t.json", "out").unwrap();
        assert_eq!(
            (
                s.hidden_size,
                s.num_hidden_layers,
                s.num_attention_heads,
                s.num_key_value_heads,
                s.intermediate_size
            ),
            (512, 8, 8, 2, 1408)
        );
        assert!(InitOptions::preset("huge", "t.json", "out")
            .unwrap_err()
            .to_string()
            .contains("tiny, small"));
        assert_eq!(parse_arch("Llama").unwrap(), Architecture::Llama);
        assert_eq!(parse_dtype("bf16").unwrap(), Kind::BFloat16);
        assert!(parse_dtype("int8").unwrap_err().to_string().contains("f32, bf16"));
    }
}
