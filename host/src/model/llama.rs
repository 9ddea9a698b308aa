//! Llama-family decoder-only transformer: Llama 2/3, Qwen2 and Mistral, as transformers runs them,
//! and Qwen2-VL's decoder (with its vision tower from [`super::qwen2vl`]).
//!
//! Pre-norm blocks (RMSNorm computed in fp32), rotary position embeddings in the
//! `rotate_half` convention (default, linear and llama3 frequencies), grouped-query attention
//! through libtorch's scaled-dot-product attention with causal, padding and sliding-window
//! masks, a SwiGLU MLP, and an lm_head tied to the embeddings or not. Every linear layer is a
//! [`FrozenLinear`] named by its checkpoint path (`model.layers.0.self_attn.q_proj`; for
//! Qwen2-VL `model.language_model.layers.0.self_attn.q_proj` and `model.visual.blocks.0.attn.qkv`).
//! Qwen2-VL's multimodal rotary embedding (M-RoPE) splits the frequencies over 3-D positions
//! (`mrope_section`); image embeddings replace the `<|image_pad|>` tokens.
//!
//! Reference: transformers `models/llama/modeling_llama.py` (and the Qwen2 / Mistral copies).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::attention::{attend, build_mask, packed_segments, right_padded, Mask, Pattern};
use super::config::{LlamaConfig, Rope};
use super::partition::{stand_in, Group, WeightShard};
use super::qwen2vl::{
    self, rope_index_vision, Qwen2VLConfig, RopeInputs, VisionConfig, VisionInputs, VisionTower,
    LANGUAGE_MODEL,
};
use super::weights::Weights;
use crate::model::linear::{FrozenLinear, LinearMode};

/// Past keys and values of every layer, `[batch, kv_heads, past, head_dim]` each, for
/// incremental decoding. Positions are the columns of the attention mask passed to
/// [`CausalLM::forward`] (padding included).
///
/// For Qwen2-VL the prefill also stores each row's M-RoPE delta (transformers' `rope_deltas`):
/// later steps take position `cumsum(mask) - 1 + delta`.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    batch: i64,
    rope_deltas: Option<Vec<i64>>,
}

impl KvCache {
    pub fn new(num_layers: usize, batch: i64) -> Self {
        Self { layers: (0..num_layers).map(|_| None).collect(), batch, rope_deltas: None }
    }

    /// Qwen2-VL: each row's M-RoPE delta, set by the prefill (`None` before it, or for other models).
    pub fn rope_deltas(&self) -> Option<&[i64]> {
        self.rope_deltas.as_deref()
    }

    /// How many positions are cached.
    pub fn seq_len(&self) -> i64 {
        self.layers.first().and_then(|l| l.as_ref()).map(|(k, _)| k.size()[2]).unwrap_or(0)
    }

    pub fn batch(&self) -> i64 {
        self.batch
    }

    /// Layer `i`'s cached keys and values `[B, kv_heads, positions, head_dim]`.
    pub fn layer(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(i).and_then(Option::as_ref).map(|(k, v)| (k, v))
    }

    /// Forgets every cached position.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.rope_deltas = None;
    }

    /// Continuous batching (`serve`): appends the rows of `other` below this cache's rows. The
    /// shorter of the two is left-padded with zero positions to the other's length (the caller
    /// pads its attention mask the same way, with zeros, so those positions are never attended);
    /// an empty cache simply becomes `other`.
    pub fn append_rows(&mut self, other: KvCache) -> Result<()> {
        if self.batch == 0 {
            *self = other;
            return Ok(());
        }
        if other.layers.len() != self.layers.len() {
            bail!(
                "KV caches of {} and {} layers cannot be joined",
                self.layers.len(),
                other.layers.len()
            );
        }
        let (mine, theirs) = (self.seq_len(), other.seq_len());
        let width = mine.max(theirs);
        let pad = |t: Tensor, len: i64| -> Result<Tensor> {
            if len == width {
                return Ok(t);
            }
            let (b, h, _, d) = t.size4()?;
            let zeros = Tensor::f_zeros([b, h, width - len, d], (t.kind(), t.device()))?;
            Ok(Tensor::f_cat(&[zeros, t], 2)?)
        };
        for (slot, theirs_slot) in self.layers.iter_mut().zip(other.layers) {
            let ((k, v), (k2, v2)) = match (slot.take(), theirs_slot) {
                (Some(a), Some(b)) => (a, b),
                _ => bail!("KV caches can only be joined after their prefill"),
            };
            let k = Tensor::f_cat(&[pad(k, mine)?, pad(k2, theirs)?], 0)?;
            let v = Tensor::f_cat(&[pad(v, mine)?, pad(v2, theirs)?], 0)?;
            *slot = Some((k, v));
        }
        self.rope_deltas = match (self.rope_deltas.take(), other.rope_deltas) {
            (None, None) => None,
            (a, b) => {
                let mut a = a.unwrap_or_else(|| vec![0; self.batch as usize]);
                a.extend(b.unwrap_or_else(|| vec![0; other.batch as usize]));
                Some(a)
            }
        };
        self.batch += other.batch;
        Ok(())
    }

    /// Keeps only the rows `keep` (in that order) and the positions from `first` on: retiring
    /// finished rows of a running batch and dropping the leading columns that are padding in
    /// every row left.
    pub fn retain(&mut self, keep: &[i64], first: i64) -> Result<()> {
        let len = self.seq_len() - first;
        let idx = Tensor::f_from_slice(keep)?;
        for slot in self.layers.iter_mut() {
            if let Some((k, v)) = slot.take() {
                let idx = idx.f_to_device(k.device())?;
                *slot = Some((
                    k.f_index_select(0, &idx)?.f_narrow(2, first, len)?,
                    v.f_index_select(0, &idx)?.f_narrow(2, first, len)?,
                ));
            }
        }
        if let Some(d) = &mut self.rope_deltas {
            *d = keep.iter().map(|&i| d[i as usize]).collect();
        }
        self.batch = keep.len() as i64;
        Ok(())
    }

    /// Appends this step's keys/values of `layer` and returns all of them.
    fn update(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let slot =
            self.layers.get_mut(layer).context("KV cache has fewer layers than the model")?;
        let (k, v) = match slot.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::f_cat(&[pk, k], 2)?, Tensor::f_cat(&[pv, v], 2)?),
        };
        *slot = Some((k.shallow_clone(), v.shallow_clone()));
        Ok((k, v))
    }
}

/// RMSNorm: `x / sqrt(mean(x²) + eps) * weight`, computed in fp32 and cast back.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(w: &mut Weights, key: &str, cfg: &LlamaConfig) -> Result<Self> {
        Self::of_size(w, key, cfg, cfg.hidden_size, "hidden_size")
    }

    /// A norm over the last `size` features (Qwen3's per-head q/k norms: `head_dim`).
    fn of_size(
        w: &mut Weights,
        key: &str,
        cfg: &LlamaConfig,
        size: i64,
        why: &str,
    ) -> Result<Self> {
        Ok(Self { weight: w.take(&format!("{key}.weight"), &[size], why)?, eps: cfg.rms_norm_eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.weight, self.eps)
    }
}

/// transformers' RMSNorm (Llama's, Qwen2's, Qwen2.5-VL's vision `Qwen2_5_VLRMSNorm`):
/// `weight * (h * rsqrt(h.pow(2).mean(-1) + eps))` with `h` in fp32, cast back to `x`'s dtype
/// before the weight. libtorch's fused `rms_norm` (no weight) in fp32 is bit-identical to that
/// formula in value and gradient on CPU (checked over hidden sizes 64–3584 and input scales
/// 0.01–30) and about twice as fast forward + backward.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.f_to_kind(Kind::Float)?;
    let h =
        h.f_rms_norm([h.size().last().copied().unwrap_or(0)].as_slice(), None::<Tensor>, eps)?;
    Ok(weight.f_mul(&h.f_to_kind(x.kind())?)?)
}

/// Inverse frequencies of the rotary embedding (fp32, `[head_dim / 2]`), computed with the
/// same float32 operations as transformers' `ROPE_INIT_FUNCTIONS`.
pub fn rope_inv_freq(rope: Rope, head_dim: i64) -> Result<Tensor> {
    let exponents = Tensor::f_arange_start_step(0, head_dim, 2, (Kind::Int64, Device::Cpu))?
        .f_to_kind(Kind::Float)?
        .f_div_scalar(head_dim)?;
    let base = |theta: f64| -> Result<Tensor> {
        Ok(Tensor::f_pow_scalar(theta, &exponents)?.f_reciprocal()?)
    };
    Ok(match rope {
        Rope::Default { theta } => base(theta)?,
        Rope::Linear { theta, factor } => base(theta)?.f_div_scalar(factor)?,
        Rope::Llama3 {
            theta,
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let inv_freq = base(theta)?;
            let old_len = original_max_position_embeddings as f64;
            let low_freq_wavelen = old_len / low_freq_factor;
            let high_freq_wavelen = old_len / high_freq_factor;
            let wavelen = inv_freq.f_reciprocal()?.f_mul_scalar(2.0 * std::f64::consts::PI)?;
            // wavelen > low_freq_wavelen: divide by factor; below high_freq_wavelen: keep.
            let inv_freq_llama = inv_freq
                .f_div_scalar(factor)?
                .f_where_self(&wavelen.f_gt(low_freq_wavelen)?, &inv_freq)?;
            // In between: interpolate with a smooth factor.
            let smooth = wavelen
                .f_reciprocal()?
                .f_mul_scalar(old_len)?
                .f_sub_scalar(low_freq_factor)?
                .f_div_scalar(high_freq_factor - low_freq_factor)?;
            let smoothed = smooth
                .f_neg()?
                .f_add_scalar(1.0)?
                .f_mul(&inv_freq_llama)?
                .f_div_scalar(factor)?
                .f_add(&smooth.f_mul(&inv_freq_llama)?)?;
            let is_medium =
                wavelen.f_ge(high_freq_wavelen)?.f_logical_and(&wavelen.f_le(low_freq_wavelen)?)?;
            smoothed.f_where_self(&is_medium, &inv_freq_llama)?
        }
    })
}

/// cos/sin tables of the rotary embedding for given positions.
struct RotaryEmbedding {
    inv_freq: Tensor,
    /// Qwen2-VL: frequencies per temporal / height / width position (M-RoPE).
    mrope_section: Option<Vec<i64>>,
}

impl RotaryEmbedding {
    fn new(cfg: &LlamaConfig, device: Device) -> Result<Self> {
        let mrope_section = cfg.architecture().is_qwen_vl().then(|| cfg.mrope_section());
        Ok(Self {
            inv_freq: rope_inv_freq(cfg.rope()?, cfg.head_dim())?.f_to_device(device)?,
            mrope_section,
        })
    }

    /// `(cos, sin)`, each `[B, 1, T, head_dim]` in `dtype`, for position ids `[B, T]`, or
    /// `[3, B, T]` with M-RoPE (frequency chunk `i` of `mrope_section` follows axis `i % 3`, as
    /// transformers' `Qwen2VLRotaryEmbedding`).
    fn cos_sin(&self, position_ids: &Tensor, dtype: Kind) -> Result<(Tensor, Tensor)> {
        let mut freqs =
            position_ids.f_unsqueeze(-1)?.f_to_kind(Kind::Float)?.f_mul(&self.inv_freq)?;
        if let Some(section) = &self.mrope_section {
            if position_ids.dim() != 3 {
                bail!("M-RoPE needs [3, batch, seq] position ids, got {:?}", position_ids.size());
            }
            let chunks = freqs.f_split_with_sizes(section.as_slice(), -1)?;
            let picked = chunks
                .iter()
                .enumerate()
                .map(|(i, c)| c.f_select(0, (i % 3) as i64))
                .collect::<Result<Vec<_>, _>>()?;
            freqs = Tensor::f_cat(&picked, -1)?;
        }
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        let cos = emb.f_cos()?.f_to_kind(dtype)?.f_unsqueeze(1)?;
        let sin = emb.f_sin()?.f_to_kind(dtype)?.f_unsqueeze(1)?;
        Ok((cos, sin))
    }
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.f_narrow(-1, 0, half)?;
    let x2 = x.f_narrow(-1, half, half)?;
    Ok(Tensor::f_cat(&[x2.f_neg()?, x1], -1)?)
}

fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(x.f_mul(cos)?.f_add(&rotate_half(x)?.f_mul(sin)?)?)
}

struct Attention {
    q_proj: FrozenLinear,
    k_proj: FrozenLinear,
    v_proj: FrozenLinear,
    o_proj: FrozenLinear,
    /// Qwen3: RMSNorm over each head of q and of k (`self_attn.q_norm` / `k_norm`, `[head_dim]`),
    /// applied after the projection and before RoPE.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    sliding_window: Option<i64>,
}

/// Takes `{path}.weight` `[out, inp]` (and `{path}.bias`) as a [`FrozenLinear`] named `path`.
pub(crate) fn linear(
    w: &mut Weights,
    path: &str,
    out: i64,
    inp: i64,
    bias: bool,
    why: &str,
) -> Result<FrozenLinear> {
    let weight = w.take(&format!("{path}.weight"), &[out, inp], why)?;
    let bias = if bias { Some(w.take(&format!("{path}.bias"), &[out], why)?) } else { None };
    Ok(FrozenLinear::new(path, weight, bias))
}

impl Attention {
    fn new(cfg: &LlamaConfig, w: &mut Weights, path: &str, layer: i64) -> Result<Self> {
        let (h, kv, d, hidden) =
            (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim(), cfg.hidden_size);
        let qkv_bias = cfg.qkv_bias();
        let mut qk_norm = |name: &str| -> Result<Option<RmsNorm>> {
            cfg.qk_norm()
                .then(|| RmsNorm::of_size(w, &format!("{path}.{name}"), cfg, d, "head_dim"))
                .transpose()
        };
        let (q_norm, k_norm) = (qk_norm("q_norm")?, qk_norm("k_norm")?);
        Ok(Self {
            q_norm,
            k_norm,
            q_proj: linear(
                w,
                &format!("{path}.q_proj"),
                h * d,
                hidden,
                qkv_bias,
                "num_attention_heads × head_dim, hidden_size",
            )?,
            k_proj: linear(
                w,
                &format!("{path}.k_proj"),
                kv * d,
                hidden,
                qkv_bias,
                "num_key_value_heads × head_dim, hidden_size",
            )?,
            v_proj: linear(
                w,
                &format!("{path}.v_proj"),
                kv * d,
                hidden,
                qkv_bias,
                "num_key_value_heads × head_dim, hidden_size",
            )?,
            o_proj: linear(
                w,
                &format!("{path}.o_proj"),
                hidden,
                h * d,
                cfg.o_bias(),
                "hidden_size, num_attention_heads × head_dim",
            )?,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
            sliding_window: cfg.sliding_window_of_layer(layer),
        })
    }

    /// Qwen3's per-head norms with their module names (`q_norm`, `k_norm`; none for the
    /// other members), in transformers' parameter order (after `o_proj`).
    fn qk_norms(&self) -> impl Iterator<Item = (&'static str, &RmsNorm)> {
        [("q_norm", self.q_norm.as_ref()), ("k_norm", self.k_norm.as_ref())]
            .into_iter()
            .filter_map(|(name, n)| n.map(|n| (name, n)))
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Mask,
        cache: Option<(&mut KvCache, usize)>,
        mode: LinearMode<'_>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.size3()?;
        let heads = |proj: &FrozenLinear, n: i64, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let h = proj.forward(x, mode)?.f_view([b, t, n, self.head_dim])?;
            let h = match norm {
                Some(norm) => norm.forward(&h)?,
                None => h,
            };
            Ok(h.f_transpose(1, 2)?)
        };
        let q =
            apply_rotary(&heads(&self.q_proj, self.num_heads, self.q_norm.as_ref())?, cos, sin)?;
        let k =
            apply_rotary(&heads(&self.k_proj, self.num_kv_heads, self.k_norm.as_ref())?, cos, sin)?;
        let v = heads(&self.v_proj, self.num_kv_heads, None)?;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.update(layer, k, v)?,
            None => (k, v),
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let y = attend(&q, &k, &v, mask, scale)?;
        let y = y.f_transpose(1, 2)?.f_reshape([b, t, self.num_heads * self.head_dim])?;
        self.o_proj.forward(&y, mode)
    }
}

struct Mlp {
    gate_proj: FrozenLinear,
    up_proj: FrozenLinear,
    down_proj: FrozenLinear,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, w: &mut Weights, path: &str) -> Result<Self> {
        let (hidden, inter, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias());
        Ok(Self {
            gate_proj: linear(
                w,
                &format!("{path}.gate_proj"),
                inter,
                hidden,
                bias,
                "intermediate_size, hidden_size",
            )?,
            up_proj: linear(
                w,
                &format!("{path}.up_proj"),
                inter,
                hidden,
                bias,
                "intermediate_size, hidden_size",
            )?,
            down_proj: linear(
                w,
                &format!("{path}.down_proj"),
                hidden,
                inter,
                bias,
                "hidden_size, intermediate_size",
            )?,
        })
    }

    fn forward(&self, x: &Tensor, mode: LinearMode<'_>) -> Result<Tensor> {
        let gated =
            self.gate_proj.forward(x, mode)?.f_silu()?.f_mul(&self.up_proj.forward(x, mode)?)?;
        self.down_proj.forward(&gated, mode)
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &LlamaConfig, w: &mut Weights, prefix: &str, layer: i64) -> Result<Self> {
        let path = format!("{prefix}.layers.{layer}");
        Ok(Self {
            input_layernorm: RmsNorm::new(w, &format!("{path}.input_layernorm"), cfg)?,
            self_attn: Attention::new(cfg, w, &format!("{path}.self_attn"), layer)?,
            post_attention_layernorm: RmsNorm::new(
                w,
                &format!("{path}.post_attention_layernorm"),
                cfg,
            )?,
            mlp: Mlp::new(cfg, w, &format!("{path}.mlp"))?,
        })
    }

    /// The layer's seven linear layers (q, k, v, o, gate, up, down).
    fn linears_mut(&mut self) -> [&mut FrozenLinear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Mask,
        cache: Option<(&mut KvCache, usize)>,
        mode: LinearMode<'_>,
    ) -> Result<Tensor> {
        let x = x.f_add(&self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            cos,
            sin,
            mask,
            cache,
            mode,
        )?)?;
        Ok(x.f_add(&self.mlp.forward(&self.post_attention_layernorm.forward(&x)?, mode)?)?)
    }

    /// [`DecoderLayer::forward`] without a cache as a checkpointed block
    /// ([`crate::model::checkpoint`]): only `x` is kept, the layer is recomputed in backward.
    fn forward_checkpointed(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Mask,
        mode: LinearMode<'_>,
    ) -> Result<Tensor> {
        // The block's output needs a grad-requiring input to join the graph (the embedding
        // of the first layer is frozen): as transformers' `enable_input_require_grads`.
        let x = if x.requires_grad() {
            x.shallow_clone()
        } else {
            x.f_detach()?.set_requires_grad(true)
        };
        let layer = self as *const DecoderLayer as usize;
        let (cos, sin, mask) = (cos.shallow_clone(), sin.shallow_clone(), mask.shallow_clone());
        // Per-row adapters (serve) never train: a checkpointed block runs one adapter.
        let (adapter, train) = (mode.adapter.map(str::to_string), mode.train);
        crate::model::checkpoint::checkpoint(&[&x], move |xs| {
            // SAFETY: the model outlives the autograd graphs of its forward passes (see
            // `CausalLM::set_gradient_checkpointing`), so the layer is alive in backward.
            let layer = unsafe { &*(layer as *const DecoderLayer) };
            layer.forward(
                &xs[0],
                &cos,
                &sin,
                &mask,
                None,
                LinearMode { adapter: adapter.as_deref(), train, rows: None },
            )
        })
    }
}

/// The token embedding's checkpoint path (its weight is `model.embed_tokens.weight`) in
/// Llama-family models; Qwen2-VL's is `model.language_model.embed_tokens`
/// ([`CausalLM::embed_tokens_path`]).
pub const EMBED_TOKENS: &str = "model.embed_tokens";

/// The decoder's module path: `model` for Llama / Qwen2 / Mistral.
pub const DECODER: &str = "model";

/// Module path of a sequence-classification head (transformers' `…ForSequenceClassification`
/// keeps it beside the decoder: `score.weight`).
pub const SCORE_HEAD: &str = "score";
/// Module path of the value head PPO trains on the policy's hidden states (`v_head.weight`).
pub const VALUE_HEAD: &str = "v_head";

/// The text decoder: token embedding, decoder layers, final norm, `lm_head` and the rotary
/// embedding. It turns input embeddings into hidden states ([`Decoder::decode`]) and those
/// into logits ([`Decoder::head`]); it knows nothing of images or adapters.
pub struct Decoder {
    config: LlamaConfig,
    /// The decoder's module path ([`DECODER`] or Qwen2-VL's [`LANGUAGE_MODEL`]).
    prefix: String,
    /// `{prefix}.embed_tokens`.
    embed_path: String,
    /// The embedding matrix; a stand-in when `embed_shard` holds it.
    embed_tokens: Tensor,
    /// The embedding when partitioned over ranks ([`CausalLM::partition_trainable`]); a tied
    /// `lm_head` shares it.
    embed_shard: Option<WeightShard>,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: FrozenLinear,
    /// A sequence-classification head ([`SCORE_HEAD`], hidden → num_labels, no bias), read
    /// from a `…ForSequenceClassification` checkpoint or added by [`CausalLM::add_score_head`].
    score: Option<FrozenLinear>,
    /// PPO's value head ([`VALUE_HEAD`], `[1, hidden]`), added by
    /// [`CausalLM::add_value_head`]; a model weight that trains in full, never saved in a
    /// model directory.
    value_head: Option<Tensor>,
    rotary: RotaryEmbedding,
    device: Device,
    dtype: Kind,
    /// Recompute each decoder layer in backward (`set_gradient_checkpointing`).
    gradient_checkpointing: bool,
}

/// A Llama / Qwen2 / Mistral causal language model loaded from a Hugging Face directory, or a
/// Qwen2-VL one: a composition, as candle's LLaVA is, of a vision tower (with its merger) that
/// turns images into embeddings and the same [`Decoder`] (under `model.language_model`).
pub struct CausalLM {
    decoder: Decoder,
    /// Qwen2-VL: the vision tower and its config.
    vision: Option<(VisionTower, Qwen2VLConfig)>,
    /// The directory the model was loaded from (`base_model_name_or_path` of saved adapters).
    source_dir: Option<PathBuf>,
}

impl Decoder {
    /// Builds the decoder under module path `prefix` from `w`, handing each decoder-layer
    /// linear layer and an untied `lm_head` to `on_linear` as soon as it is built.
    fn new(
        config: LlamaConfig,
        w: &mut Weights,
        prefix: &str,
        device: Device,
        dtype: Kind,
        on_linear: &mut dyn FnMut(&mut FrozenLinear) -> Result<()>,
    ) -> Result<Self> {
        let prefix = prefix.to_string();
        let (vocab, hidden) = (config.vocab_size, config.hidden_size);
        let embed_tokens = w.take(
            &format!("{prefix}.embed_tokens.weight"),
            &[vocab, hidden],
            "vocab_size, hidden_size",
        )?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers as usize);
        for l in 0..config.num_hidden_layers {
            let mut layer = DecoderLayer::new(&config, w, &prefix, l)?;
            for lin in layer.linears_mut() {
                on_linear(lin)?;
            }
            layers.push(layer);
        }
        let norm = RmsNorm::new(w, &format!("{prefix}.norm"), &config)?;
        // A `…ForSequenceClassification` checkpoint: a score head and no lm_head.
        let score = w
            .take_if_present(
                &format!("{SCORE_HEAD}.weight"),
                &[1, hidden],
                "1 (a reward model's single label), hidden_size",
            )?
            .map(|t| FrozenLinear::new(SCORE_HEAD, t, None));
        let lm_head =
            if config.tie_word_embeddings || (score.is_some() && !w.contains("lm_head.weight")) {
                // transformers ties the head to the embeddings even when the file also has one.
                // A sequence classifier has no lm_head: the embedding stands in (its logits mean
                // nothing; its scores are what such a model is for).
                w.take_if_present("lm_head.weight", &[vocab, hidden], "vocab_size, hidden_size")?;
                FrozenLinear::new("lm_head", embed_tokens.shallow_clone(), None)
            } else {
                let mut head = linear(
                    w,
                    "lm_head",
                    vocab,
                    hidden,
                    false,
                    "vocab_size, hidden_size (tie_word_embeddings is false)",
                )?;
                on_linear(&mut head)?;
                head
            };
        let rotary = RotaryEmbedding::new(&config, device)?;
        Ok(Self {
            config,
            embed_path: format!("{prefix}.embed_tokens"),
            prefix,
            embed_tokens,
            embed_shard: None,
            layers,
            norm,
            lm_head,
            score,
            value_head: None,
            rotary,
            device,
            dtype,
            gradient_checkpointing: false,
        })
    }

    /// The decoder layers and the final norm over input embeddings `x` `[B, T, hidden]`.
    fn decode(
        &self,
        mut x: Tensor,
        position_ids: &Tensor,
        pattern: Pattern<'_>,
        mut cache: Option<&mut KvCache>,
        mode: LinearMode<'_>,
    ) -> Result<Tensor> {
        let t = x.size()[1];
        let (cos, sin) = self.rotary.cos_sin(position_ids, self.dtype)?;
        let full_mask = build_mask(pattern, t, None, self.device)?;
        let mut sliding_masks: Vec<(i64, Mask)> = Vec::new();
        for l in &self.layers {
            if let Some(w) = l.self_attn.sliding_window {
                if !sliding_masks.iter().any(|(sw, _)| *sw == w) {
                    sliding_masks.push((w, build_mask(pattern, t, Some(w), self.device)?));
                }
            }
        }
        let prefix = &self.prefix;
        for (i, layer) in self.layers.iter().enumerate() {
            let mask = match layer.self_attn.sliding_window {
                Some(w) => &sliding_masks.iter().find(|(sw, _)| *sw == w).expect("built above").1,
                None => &full_mask,
            };
            x = if self.gradient_checkpointing
                && cache.is_none()
                && crate::model::checkpoint::grad_enabled()
            {
                layer.forward_checkpointed(&x, &cos, &sin, mask, mode)
            } else {
                layer.forward(&x, &cos, &sin, mask, cache.as_deref_mut().map(|c| (c, i)), mode)
            }
            .with_context(|| format!("{prefix}.layers.{i}"))?;
        }
        self.norm.forward(&x)
    }

    /// The embeddings of token ids `[B, T]`, from the embedding matrix made whole for the
    /// lookup when it is partitioned and freed right after; its backward adds the rows'
    /// gradients into the shard without a dense gradient ([`WeightShard::lookup_rows`]).
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match &self.embed_shard {
            Some(shard) => shard.lookup_rows(ids)?,
            None => Tensor::f_embedding(&self.embed_tokens, ids, -1, false, false)?,
        })
    }

    /// Logits (f32) of hidden states: `lm_head` through `mode`.
    fn head(&self, hidden: &Tensor, mode: LinearMode<'_>) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden, mode)?.f_to_kind(Kind::Float)?)
    }
}

impl CausalLM {
    /// Loads `dir/config.json` and the safetensors weights (single file or sharded) as
    /// `dtype` (Float, BFloat16 or Half) on `device`.
    pub fn load(dir: &Path, device: Device, dtype: Kind) -> Result<Self> {
        Self::load_with(dir, device, dtype, &mut |_| Ok(()))
    }

    /// [`CausalLM::load`], handing each decoder-layer linear layer (q, k, v, o, gate, up,
    /// down) and an untied `lm_head` (not a tied one, which is the embedding, nor a vision
    /// tower's layers) to `on_linear` as soon as it is built, before the next layer is read:
    /// ZeRO stage 3 shards the weight there and QLoRA packs it, so loading never holds more
    /// than what those keep plus one layer's weights.
    pub fn load_with(
        dir: &Path,
        device: Device,
        dtype: Kind,
        on_linear: &mut dyn FnMut(&mut FrozenLinear) -> Result<()>,
    ) -> Result<Self> {
        let config = LlamaConfig::from_dir(dir)?;
        let vl = Qwen2VLConfig::from_dir(dir, config.hidden_size)?;
        let mut weights = Weights::load(dir, device, dtype)?;
        let mut model = Self::build(config, vl, &mut weights, device, dtype, on_linear)?;
        model.source_dir = Some(dir.to_path_buf());
        let unused = weights.remaining();
        if !unused.is_empty() {
            tracing::warn!(
                "{}: {} checkpoint tensor(s) not used by the model: {}",
                dir.display(),
                unused.len(),
                unused.join(", ")
            );
        }
        tracing::info!(
            "loaded {} from {} ({} layers, hidden {}, vocab {}, {dtype:?} on {device:?})",
            model.decoder.config.architecture().hf_name(),
            dir.display(),
            model.decoder.config.num_hidden_layers,
            model.decoder.config.hidden_size,
            model.decoder.config.vocab_size
        );
        Ok(model)
    }

    /// Builds the model from already loaded weights (taking the tensors it uses).
    pub fn from_weights(
        config: LlamaConfig,
        w: &mut Weights,
        device: Device,
        dtype: Kind,
    ) -> Result<Self> {
        Self::from_weights_with_vision(config, None, w, device, dtype)
    }

    /// [`CausalLM::from_weights`] for any architecture: a Qwen2-VL `config` needs `vl` (its
    /// vision config and token ids), the others take `None`. Qwen2-VL checkpoints in the older
    /// key layout are renamed to transformers 5's first.
    pub fn from_weights_with_vision(
        config: LlamaConfig,
        vl: Option<Qwen2VLConfig>,
        w: &mut Weights,
        device: Device,
        dtype: Kind,
    ) -> Result<Self> {
        Self::build(config, vl, w, device, dtype, &mut |_| Ok(()))
    }

    fn build(
        config: LlamaConfig,
        vl: Option<Qwen2VLConfig>,
        w: &mut Weights,
        device: Device,
        dtype: Kind,
        on_linear: &mut dyn FnMut(&mut FrozenLinear) -> Result<()>,
    ) -> Result<Self> {
        let is_vl = config.architecture().is_qwen_vl();
        let vision = match (is_vl, vl) {
            (true, Some(vl)) => {
                w.rename_keys(qwen2vl::rename_legacy_key)?;
                Some((VisionTower::new(&vl.vision_config, w, device, dtype)?, vl))
            }
            (true, None) => {
                bail!("a Qwen2-VL model needs its vision_config (load it with CausalLM::load)")
            }
            (false, Some(_)) => bail!(
                "a vision config was given for a {} model, which has no vision tower",
                config.architecture().hf_name()
            ),
            (false, None) => None,
        };
        let prefix = if is_vl { LANGUAGE_MODEL } else { DECODER };
        let decoder = Decoder::new(config, w, prefix, device, dtype, on_linear)?;
        Ok(Self { decoder, vision, source_dir: None })
    }

    /// Activation checkpointing: forward passes that record gradients and use no KV cache
    /// keep only each decoder layer's input and recompute the layer in backward
    /// (`training.gradient_checkpointing`). The vision tower is not checkpointed. The model
    /// must outlive the graphs of its forward passes (call backward before dropping it).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.decoder.gradient_checkpointing = on;
    }

    /// The text decoder's config (for Qwen2-VL its `text_config`, flattened).
    pub fn config(&self) -> &LlamaConfig {
        &self.decoder.config
    }

    /// Qwen2-VL: the vision tower's config (`None` for text-only models).
    pub fn vision_config(&self) -> Option<&VisionConfig> {
        self.vision.as_ref().map(|(_, c)| &c.vision_config)
    }

    /// Qwen2-VL / Qwen2.5-VL: the vision tower (`None` for text-only models).
    pub fn vision_tower(&self) -> Option<&VisionTower> {
        self.vision.as_ref().map(|(t, _)| t)
    }

    /// Qwen2-VL: the vision config and the image / video / vision-start / vision-end token ids.
    pub fn qwen2vl_config(&self) -> Option<&Qwen2VLConfig> {
        self.vision.as_ref().map(|(_, c)| c)
    }

    /// Qwen2-VL: the `<|image_pad|>` id that image embeddings replace.
    pub fn image_token_id(&self) -> Option<i64> {
        self.qwen2vl_config().map(|c| c.image_token_id)
    }

    /// Qwen2-VL: the `<|vision_start|>` id that opens an image block.
    pub fn vision_start_token_id(&self) -> Option<i64> {
        self.qwen2vl_config().map(|c| c.vision_start_token_id)
    }

    /// Qwen2-VL: how many patches per side the merger joins into one token (2).
    pub fn spatial_merge_size(&self) -> Option<i64> {
        self.vision_config().map(|c| c.spatial_merge_size)
    }

    /// The decoder's module path: `model`, or `model.language_model` for Qwen2-VL.
    pub fn decoder_path(&self) -> &str {
        &self.decoder.prefix
    }

    /// The token embedding's module path (`model.embed_tokens`, or
    /// `model.language_model.embed_tokens` for Qwen2-VL).
    pub fn embed_tokens_path(&self) -> &str {
        &self.decoder.embed_path
    }

    pub fn device(&self) -> Device {
        self.decoder.device
    }

    pub fn dtype(&self) -> Kind {
        self.decoder.dtype
    }

    /// The directory [`CausalLM::load`] read, if the model came from one.
    pub fn source_dir(&self) -> Option<&Path> {
        self.source_dir.as_deref()
    }

    /// Whether `lm_head` still shares the embedding tensor (merging or rewriting an adapted
    /// head, or merging a saved copy of either, gives it a tensor of its own).
    pub fn lm_head_is_tied(&self) -> bool {
        self.decoder.lm_head.weight.data_ptr() == self.decoder.embed_tokens.data_ptr()
    }

    /// Every weight under its checkpoint key, in model order (adapters not included: merge them
    /// first to have them in the weights). A tied `lm_head` is left out, as transformers saves it.
    ///
    /// A weight kept as a shard (ZeRO stage 3: frozen-sharded, or partitioned by
    /// [`CausalLM::partition_trainable`]) is listed as its stand-in: its shape, dtype and
    /// device, zero-strided, without its values and not requiring grad. Its values are in
    /// [`CausalLM::gathered_weights`], its trainable leaf in what `partition_trainable` returns.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        self.held_weights().into_iter().map(|(k, t, _)| (k, t)).collect()
    }

    /// [`CausalLM::named_weights`], each with its shard when it is kept as one.
    fn held_weights(&self) -> Vec<(String, Tensor, Option<&WeightShard>)> {
        let p = &self.decoder.prefix;
        let mut out: Vec<(String, Tensor, Option<&WeightShard>)> = Vec::new();
        if let Some((v, _)) = &self.vision {
            // The tower is never partitioned, but a frozen shard there would be found.
            let linears = v.linears();
            for (k, t) in v.named_weights() {
                let shard = linears
                    .iter()
                    .find(|l| k.strip_suffix(".weight") == Some(l.name.as_str()))
                    .and_then(|l| l.shard());
                out.push((k, t, shard));
            }
        }
        out.push((
            format!("{p}.embed_tokens.weight"),
            self.decoder.embed_tokens.shallow_clone(),
            self.decoder.embed_shard.as_ref(),
        ));
        fn linear<'a>(
            out: &mut Vec<(String, Tensor, Option<&'a WeightShard>)>,
            lin: &'a FrozenLinear,
        ) {
            out.push((format!("{}.weight", lin.name), lin.weight.shallow_clone(), lin.shard()));
            if let Some(b) = &lin.bias {
                out.push((format!("{}.bias", lin.name), b.shallow_clone(), None));
            }
        }
        for (i, l) in self.decoder.layers.iter().enumerate() {
            out.push((
                format!("{p}.layers.{i}.input_layernorm.weight"),
                l.input_layernorm.weight.shallow_clone(),
                None,
            ));
            let a = &l.self_attn;
            for lin in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj] {
                linear(&mut out, lin);
            }
            for (name, norm) in a.qk_norms() {
                let key = format!("{p}.layers.{i}.self_attn.{name}.weight");
                out.push((key, norm.weight.shallow_clone(), None));
            }
            out.push((
                format!("{p}.layers.{i}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.weight.shallow_clone(),
                None,
            ));
            let m = &l.mlp;
            for lin in [&m.gate_proj, &m.up_proj, &m.down_proj] {
                linear(&mut out, lin);
            }
        }
        out.push((format!("{p}.norm.weight"), self.decoder.norm.weight.shallow_clone(), None));
        if !self.lm_head_is_tied() {
            linear(&mut out, &self.decoder.lm_head);
        }
        if let Some(score) = &self.decoder.score {
            linear(&mut out, score);
        }
        if let Some(v) = &self.decoder.value_head {
            out.push((format!("{VALUE_HEAD}.weight"), v.shallow_clone(), None));
        }
        out
    }

    /// A fresh `[1, hidden]` head weight as transformers initialises a linear layer:
    /// normal(0, `initializer_range`), in the model's dtype and on its device (from libtorch's
    /// generator: every rank seeded alike draws the same).
    fn fresh_head(&self) -> Result<Tensor> {
        let c = &self.decoder.config;
        let w = Tensor::f_randn([1, c.hidden_size], (Kind::Float, Device::Cpu))?
            .f_mul_scalar(c.initializer_range)?;
        Ok(w.f_to_kind(self.dtype())?.f_to_device(self.device())?)
    }

    /// Adds a sequence-classification head `score` (hidden → 1, no bias, as a reward model's
    /// `…ForSequenceClassification`), initialised as transformers does, unless the model
    /// already has one (a sequence-classification checkpoint). Returns whether one was added.
    /// Frozen, like every base weight: an adapter trains a copy of it (`modules_to_save`),
    /// full fine-tuning the weight itself.
    pub fn add_score_head(&mut self) -> Result<bool> {
        if self.decoder.score.is_some() {
            return Ok(false);
        }
        let w = self.fresh_head()?;
        self.decoder.score = Some(FrozenLinear::new(SCORE_HEAD, w, None));
        Ok(true)
    }

    /// Takes the score head off again (an adapter that brought it failed to load).
    pub(crate) fn remove_score_head(&mut self) {
        self.decoder.score = None;
    }

    /// The sequence-classification head, if the model has one.
    pub fn score_head(&self) -> Option<&FrozenLinear> {
        self.decoder.score.as_ref()
    }

    /// Adds PPO's value head `v_head` (`[1, hidden]`, transformers' initialisation) if the
    /// model has none, and returns it (the model's own tensor: switching its `requires_grad`
    /// on trains what the forward uses).
    pub fn add_value_head(&mut self) -> Result<Tensor> {
        if self.decoder.value_head.is_none() {
            self.decoder.value_head = Some(self.fresh_head()?);
        }
        Ok(self.decoder.value_head.as_ref().expect("set above").shallow_clone())
    }

    /// The value head, if the model has one.
    pub fn value_head(&self) -> Option<&Tensor> {
        self.decoder.value_head.as_ref()
    }

    /// The score head at every position of final hidden states `[B, T, H]`: `[B, T]` fp32,
    /// through `mode` (an adapter's trainable copy of the head while it runs).
    pub fn scores(&self, hidden: &Tensor, mode: LinearMode<'_>) -> Result<Tensor> {
        let head = self.decoder.score.as_ref().context(
            "the model has no score head (`score`): it is added for objectives that need one (reward_model), or read from a \
             …ForSequenceClassification checkpoint",
        )?;
        Ok(head.forward(hidden, mode)?.f_to_kind(Kind::Float)?.f_select(-1, 0)?)
    }

    /// The value head at every position of final hidden states `[B, T, H]`: `[B, T]` fp32, on
    /// the hidden states detached (the value loss trains the head, not the model).
    pub fn values(&self, hidden: &Tensor) -> Result<Tensor> {
        let v = self.decoder.value_head.as_ref().context(
            "the model has no value head (`v_head`): it is added for objectives that need one (ppo)",
        )?;
        // The critic reads the policy's features without moving them: its loss trains the head
        // alone, as TRL's value model (a network of its own) leaves the policy alone.
        let h = hidden.f_detach()?;
        Ok(h.f_matmul(&v.f_to_kind(h.kind())?.f_tr()?)?.f_to_kind(Kind::Float)?.f_select(-1, 0)?)
    }

    /// ZeRO stage 3 for full fine-tuning: partitions over the ranks of `group` every large
    /// weight that currently requires grad (see [`crate::model::partition`]): each decoder
    /// layer's linear weights (`{decoder}.layers.N.*_proj.weight`), an untied `lm_head.weight`
    /// and the token embedding `{decoder}.embed_tokens.weight`, which a tied `lm_head` keeps
    /// sharing (one shard leaf; the gradients of both uses accumulate into it). Each rank keeps
    /// 1/world of each, in CPU memory when `offload`; the model's tensor becomes a stand-in (see
    /// [`CausalLM::named_weights`]). Not partitioned: 1-D tensors (biases, norms: they stay
    /// whole on every rank and the memory plugin reduces their gradients as in stage 2), frozen
    /// weights, and the vision tower and merger (a rank whose batch has no image skips them, so
    /// their gathers would deadlock the ranks that run them).
    ///
    /// Returns every partitioned weight's checkpoint key and its shard, the 1-D leaf that
    /// requires grad (what the optimizer steps instead of the weight; the trainable tensors
    /// taken from `named_weights()` before this call are no longer used by the model), in
    /// model order, those partitioned by an earlier call included. Every rank must call it with
    /// the same trainable weights. With one rank nothing is partitioned and the list is empty.
    ///
    /// Collective order: every forward gathers each partitioned weight where it is used (layer
    /// order), and backward gathers it again and reduce-scatters its gradient in autograd's
    /// order, the same on every rank when every rank runs the same forwards.
    pub fn partition_trainable(
        &mut self,
        group: Group,
        offload: bool,
    ) -> Result<Vec<(String, Tensor)>> {
        if group.world_size() <= 1 {
            return Ok(Vec::new());
        }
        let tied = self.lm_head_is_tied();
        let d = &mut self.decoder;
        if d.embed_shard.is_none() && d.embed_tokens.requires_grad() && d.embed_tokens.dim() == 2 {
            let key = format!("{}.weight", d.embed_path);
            let shard = WeightShard::new(key, &d.embed_tokens, group.clone(), offload, true)?;
            let stand_in = stand_in(&d.embed_tokens)?;
            if tied {
                // The same stand-in keeps `lm_head_is_tied` true.
                d.lm_head.set_shard(shard.share(), stand_in.shallow_clone());
            }
            d.embed_tokens = stand_in;
            d.embed_shard = Some(shard);
        }
        let mut linears: Vec<&mut FrozenLinear> =
            d.layers.iter_mut().flat_map(|l| l.linears_mut()).collect();
        if !tied {
            linears.push(&mut d.lm_head);
        }
        for lin in linears {
            if lin.weight.requires_grad() && lin.weight.dim() == 2 {
                lin.partition_weight(group.clone(), offload)
                    .with_context(|| format!("partitioning `{}.weight`", lin.name))?;
            }
        }
        Ok(self
            .held_weights()
            .into_iter()
            .filter_map(|(k, _, s)| {
                s.filter(|s| s.is_trainable()).map(|s| (k, s.tensor().shallow_clone()))
            })
            .collect())
    }

    /// Whether the weight under checkpoint key `key` is partitioned over ranks
    /// ([`CausalLM::partition_trainable`]). A tied `lm_head.weight` is the embedding's.
    pub fn is_partitioned(&self, key: &str) -> bool {
        let key = if key == "lm_head.weight" && self.lm_head_is_tied() {
            format!("{}.weight", self.decoder.embed_path)
        } else {
            key.to_string()
        };
        self.held_weights()
            .iter()
            .any(|(k, _, s)| *k == key && s.is_some_and(WeightShard::is_trainable))
    }

    /// [`CausalLM::named_weights`] with every weight kept as a shard (partitioned, or a frozen
    /// shard) gathered whole, outside autograd; the other tensors as they are. Gathering is a
    /// collective: every rank must call this, at the same point. Holds the whole model at once
    /// on the model's device; [`CausalLM::visit_gathered_weights`] holds one weight at a time.
    pub fn gathered_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        self.visit_gathered_weights(&mut |key, t| {
            out.push((key.to_string(), t));
            Ok(())
        })?;
        Ok(out)
    }

    /// Hands each of [`CausalLM::gathered_weights`] to `f` in turn, in model order, the whole
    /// weight dropped when `f` lets it go (rank 0 saves or copies it to the CPU, the other
    /// ranks drop it). Every rank must call this and gather the same weights: an error from
    /// `f` on one rank leaves the others waiting in their next gather.
    pub fn visit_gathered_weights(
        &self,
        f: &mut dyn FnMut(&str, Tensor) -> Result<()>,
    ) -> Result<()> {
        for (key, t, shard) in self.held_weights() {
            let t = match shard {
                Some(s) => s.gather()?,
                None => t,
            };
            f(&key, t)?;
        }
        Ok(())
    }

    /// Bytes of weights this rank holds: every tensor of [`CausalLM::named_weights`] (a tied
    /// `lm_head` once), a sharded or partitioned weight counted as its shard and a quantized
    /// one as its packed form ([`FrozenLinear::resident_bytes`]).
    pub fn resident_weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let linears = self.linears();
        let layer_keys: std::collections::HashSet<String> =
            linears.iter().map(|(n, _)| format!("{n}.weight")).collect();
        let linear_bytes: usize = linears
            .iter()
            .filter(|(n, _)| *n != "lm_head" || !self.lm_head_is_tied())
            .map(|(_, l)| l.resident_bytes())
            .sum();
        let biases: std::collections::HashSet<String> = linears
            .iter()
            .filter(|(_, l)| l.bias.is_some())
            .map(|(n, _)| format!("{n}.bias"))
            .collect();
        let others: usize = self
            .held_weights()
            .iter()
            .filter(|(k, _, _)| !layer_keys.contains(k) && !biases.contains(k))
            .map(|(_, t, s)| s.map_or_else(|| bytes(t), WeightShard::resident_bytes))
            .sum();
        linear_bytes + others
    }

    /// An empty KV cache for `batch` rows.
    pub fn new_cache(&self, batch: i64) -> KvCache {
        KvCache::new(self.decoder.layers.len(), batch)
    }

    /// The output head (`lm_head`, tied to the embeddings or not).
    pub fn lm_head(&self) -> &FrozenLinear {
        &self.decoder.lm_head
    }

    /// The input embedding matrix `[vocab_size, hidden_size]` (`model.embed_tokens.weight`, or
    /// Qwen2-VL's `model.language_model.embed_tokens.weight`); a stand-in without values when
    /// partitioned ([`CausalLM::partition_trainable`]).
    pub fn embed_tokens(&self) -> &Tensor {
        &self.decoder.embed_tokens
    }

    /// Replaces the embedding matrix by a new tensor (never in place: a tied `lm_head` keeps the
    /// old one, or the old one's shard, and so gets untied).
    pub(crate) fn set_embed_tokens(&mut self, weight: Tensor) {
        self.decoder.embed_tokens = weight.set_requires_grad(false);
        self.decoder.embed_shard = None;
    }

    /// Every module path as transformers' `named_modules()` gives it (`model`, `model.layers.0`,
    /// `model.layers.0.self_attn.q_proj`, `model.norm`, `lm_head`, ...; for Qwen2-VL the vision
    /// tower's `model.visual.*` first, then `model.language_model.*`), each with what it is.
    pub fn module_names(&self) -> Vec<(String, &'static str)> {
        let d = &self.decoder.prefix;
        let mut out = Vec::new();
        if let Some((v, _)) = &self.vision {
            out.push(("model".to_string(), "the multimodal model"));
            out.extend(v.module_names());
        }
        out.extend([
            (d.clone(), "the decoder"),
            (self.decoder.embed_path.clone(), "the token embedding"),
            (format!("{d}.layers"), "the list of layers"),
        ]);
        for (i, l) in self.decoder.layers.iter().enumerate() {
            let p = format!("{d}.layers.{i}");
            out.push((p.clone(), "a decoder layer"));
            out.push((format!("{p}.self_attn"), "an attention block"));
            let a = &l.self_attn;
            out.extend(
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]
                    .map(|lin| (lin.name.clone(), "a linear layer")),
            );
            out.extend(a.qk_norms().map(|(n, _)| (format!("{p}.self_attn.{n}"), "an RMSNorm")));
            out.push((format!("{p}.mlp"), "an MLP block"));
            let m = &l.mlp;
            out.extend(
                [&m.gate_proj, &m.up_proj, &m.down_proj]
                    .map(|lin| (lin.name.clone(), "a linear layer")),
            );
            out.push((format!("{p}.mlp.act_fn"), "an activation"));
            out.push((format!("{p}.input_layernorm"), "an RMSNorm"));
            out.push((format!("{p}.post_attention_layernorm"), "an RMSNorm"));
        }
        out.push((format!("{d}.norm"), "an RMSNorm"));
        out.push((format!("{d}.rotary_emb"), "the rotary embedding"));
        out.push((self.decoder.lm_head.name.clone(), "a linear layer"));
        if let Some(score) = &self.decoder.score {
            out.push((score.name.clone(), "a linear layer (the score head)"));
        }
        out
    }

    /// Every linear layer with its checkpoint path, in model order (Qwen2-VL's vision tower
    /// first: qkv, proj, fc1, fc2 of each block, then the merger's `mlp.0`, `mlp.2`; then q, k,
    /// v, o, gate, up, down of each layer, then `lm_head`). With tied embeddings `lm_head`
    /// shares the embedding.
    pub fn linears(&self) -> Vec<(&str, &FrozenLinear)> {
        let mut out = Vec::with_capacity(self.decoder.layers.len() * 7 + 1);
        if let Some((v, _)) = &self.vision {
            out.extend(v.linears().into_iter().map(|l| (l.name.as_str(), l)));
        }
        for l in &self.decoder.layers {
            let a = &l.self_attn;
            let m = &l.mlp;
            for lin in
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
            {
                out.push((lin.name.as_str(), lin));
            }
        }
        out.push((self.decoder.lm_head.name.as_str(), &self.decoder.lm_head));
        if let Some(score) = &self.decoder.score {
            out.push((score.name.as_str(), score));
        }
        out
    }

    /// Mutable access to every linear layer, in the order of [`CausalLM::linears`], for
    /// wrapping them (adapters, quantizers).
    pub fn linears_mut(&mut self) -> Vec<&mut FrozenLinear> {
        let mut out = Vec::with_capacity(self.decoder.layers.len() * 7 + 1);
        if let Some((v, _)) = &mut self.vision {
            out.extend(v.linears_mut());
        }
        for l in &mut self.decoder.layers {
            out.extend(l.linears_mut());
        }
        out.push(&mut self.decoder.lm_head);
        if let Some(score) = &mut self.decoder.score {
            out.push(score);
        }
        out
    }

    /// The one forward pass: logits, last-position logits or final hidden states (see
    /// [`ForwardArgs`]) for token ids or input embeddings.
    ///
    /// `attention_mask` is `[B, past + T]` (1 = token, 0 = padding; left padding for batches
    /// of different lengths); position ids default to `cumsum(mask) - 1` (0 on padding), as
    /// transformers' `generate` computes them, and for Qwen2-VL to the 3-D M-RoPE positions of
    /// `get_rope_index` (the prefill stores each row's delta in the cache). Without a mask every
    /// position is a token. With a `cache`, the input continues the cached positions and is
    /// appended to it. Images (Qwen2-VL, Qwen2.5-VL) replace the `<|image_pad|>` tokens in order
    /// (row 0's first), videos the `<|video_pad|>` tokens; both can only come with the first call
    /// on a cache (the prefill).
    pub fn forward(&self, args: ForwardArgs<'_>) -> Result<Tensor> {
        let ForwardArgs {
            input,
            attention_mask,
            position_ids,
            images,
            cache,
            mode,
            embed_tokens,
            output,
            prompt,
        } = args;
        let mode = mode.unwrap_or(LinearMode::BASE);
        let (b, t, input_ids) = match input {
            Input::Ids(ids) => {
                let (b, t) = self.check_ids(ids)?;
                (b, t, Some(ids.f_to_device(self.decoder.device)?))
            }
            Input::Embeds(e) => {
                let size = e.size();
                let &[b, t, h] = size.as_slice() else {
                    bail!("inputs_embeds must be [batch, seq, hidden_size], got shape {size:?}");
                };
                if b == 0 || t == 0 || h != self.decoder.config.hidden_size {
                    bail!("inputs_embeds must be [batch, seq, hidden_size = {}] and not empty, got {size:?}", self.decoder.config.hidden_size);
                }
                (b, t, None)
            }
        };
        let past = self.cached_positions(cache.as_deref(), b)?;
        // A prompt-learning adapter's positions go in at the prefill (or a pass without a cache);
        // later steps find them in the cache.
        let prompt = prompt.filter(|_| past == 0);
        let cfg = &self.decoder.config;
        let (virtual_tokens, kv_prefix) = match prompt {
            Some(PromptInput::VirtualTokens(v)) => {
                (Some(self.check_prompt(v, cfg.hidden_size, "virtual tokens")?), None)
            }
            Some(PromptInput::KvPrefix(p)) => {
                let width = cfg.num_hidden_layers * 2 * cfg.num_kv_heads() * cfg.head_dim();
                (None, Some(self.check_prompt(p, width, "key/value prefix")?))
            }
            None => (None, None),
        };
        let added = virtual_tokens.as_ref().or(kv_prefix.as_ref()).map_or(0, |p| p.size()[0]);
        if prompt.is_some() && position_ids.is_some() {
            bail!("a prompt-learning adapter adds {added} positions before the input, so it cannot run with explicit position ids (packed rows): turn packing off");
        }
        // The caller's mask covers the input only (widened here) or the prompt's positions too.
        let widened;
        let attention_mask = match attention_mask {
            Some(m) if added > 0 && m.size() == [b, t] => {
                let ones = Tensor::f_ones([b, added], (m.kind(), m.device()))?;
                widened = Tensor::f_cat(&[&ones, m], 1)?;
                Some(&widened)
            }
            other => other,
        };
        // Prefix tuning without a cache: one for this pass, holding the prefix.
        let mut local_cache = None;
        let mut cache = match cache {
            None if kv_prefix.is_some() => Some(local_cache.insert(self.new_cache(b))),
            other => other,
        };
        if let Some(prefix) = &kv_prefix {
            if images.is_some_and(|i| !i.is_empty()) {
                bail!("prefix tuning with images or videos is not supported (the prefix would shift Qwen2-VL's M-RoPE positions); use prompt tuning or LoRA");
            }
            let c = cache.as_deref_mut().context("a cache holds the prefix")?;
            self.seed_prefix(c, prefix)?;
        }
        let past = past + kv_prefix.as_ref().map_or(0, |p| p.size()[0]);
        let n_virtual = virtual_tokens.as_ref().map_or(0, |v| v.size()[0]);
        if let Some(m) = attention_mask {
            if m.size() != [b, past + n_virtual + t] {
                bail!("attention_mask must be [batch, past + seq] = [{b}, {}] (past {past}, seq {t}), got {:?}", past + n_virtual + t, m.size());
            }
        }
        let images = images.filter(|i| !i.is_empty());
        // The masks of the <|image_pad|> and <|video_pad|> tokens the features replace.
        let (image_mask, video_mask) = match (images, &self.vision, &input_ids) {
            (None, _, _) => (None, None),
            (Some(_), None, _) => bail!(
                "images or videos were given to a {} model, which has no vision tower (use a Qwen2-VL or Qwen2.5-VL model)",
                self.decoder.config.architecture().hf_name()
            ),
            (Some(_), Some(_), _) if past > 0 => {
                bail!("images and videos can only be given with the first call on a KV cache (the prefill); this cache holds {past} positions")
            }
            (Some(_), Some(_), None) => bail!(
                "images and videos need input_ids (their <|image_pad|> / <|video_pad|> tokens), not inputs_embeds"
            ),
            (Some(img), Some((tower, vl)), Some(ids)) => {
                let image = (!img.image_grid_thw.is_empty())
                    .then(|| {
                        self.vision_token_mask(ids, &img.image_grid_thw, tower, vl.image_token_id, "image")
                    })
                    .transpose()?;
                let video = match img.videos.as_ref().filter(|v| !v.grid_thw.is_empty()) {
                    Some(v) => {
                        Some(self.vision_token_mask(ids, &v.grid_thw, tower, vl.video_token_id, "video")?)
                    }
                    None => None,
                };
                (image, video)
            }
        };
        // An all-ones mask is no mask (transformers' `_ignore_causal_mask_sdpa`): SDPA then runs
        // its causal kernel with GQA instead of an explicit mask over repeated keys and values.
        // Position ids are the same either way.
        let key_valid = match attention_mask {
            Some(m) => {
                let valid = m.f_to_device(self.decoder.device)?.f_ne(0)?;
                if valid.f_all()?.f_int64_value(&[])? != 0 {
                    None
                } else {
                    Some(valid)
                }
            }
            None => None,
        };
        let position_ids_given = position_ids.is_some();
        let position_ids = match position_ids {
            Some(p) => {
                if p.size() != [b, t] && p.size() != [3, b, t] {
                    bail!("position_ids must be [batch, seq] or M-RoPE's [3, batch, seq] = [3, {b}, {t}], got {:?}", p.size());
                }
                let p = p.f_to_device(self.decoder.device)?;
                if self.vision.is_some() && p.dim() == 2 {
                    p.f_unsqueeze(0)?.f_expand([3, b, t], false)?
                } else {
                    p
                }
            }
            // Virtual tokens: plain positions over prompt and input (as transformers gives
            // peft's inputs_embeds: Qwen2-VL's M-RoPE cannot be built without input ids).
            None if n_virtual > 0 => self.default_positions(
                None,
                attention_mask,
                key_valid.as_ref(),
                images,
                past,
                (b, n_virtual + t),
                cache.as_deref_mut(),
            )?,
            None => self.default_positions(
                input_ids.as_ref(),
                attention_mask,
                key_valid.as_ref(),
                images,
                past,
                (b, t),
                cache.as_deref_mut(),
            )?,
        };
        let mut x = match (input, &input_ids) {
            (_, Some(ids)) => match embed_tokens {
                Some(e) => Tensor::f_embedding(e, ids, -1, false, false)?,
                None => self.decoder.embed(ids).context(self.decoder.embed_path.clone())?,
            },
            (Input::Embeds(e), None) => {
                e.f_to_device(self.decoder.device)?.f_to_kind(self.decoder.dtype)?
            }
            (Input::Ids(_), None) => unreachable!("ids were moved to the device above"),
        };
        if let (Some(img), Some(mask), Some((tower, _))) = (images, &image_mask, &self.vision) {
            let features = tower
                .forward(&img.pixel_values, &img.image_grid_thw, mode)
                .context("model.visual (images)")?
                .f_to_kind(x.kind())?;
            x = x.f_masked_scatter(&mask.f_unsqueeze(-1)?.f_expand_as(&x)?, &features)?;
        }
        let videos = images.and_then(|i| i.videos.as_ref());
        if let (Some(vid), Some(mask), Some((tower, _))) = (videos, &video_mask, &self.vision) {
            let features = tower
                .forward_videos(&vid.pixel_values, &vid.grid_thw, mode)
                .context("model.visual (videos)")?
                .f_to_kind(x.kind())?;
            x = x.f_masked_scatter(&mask.f_unsqueeze(-1)?.f_expand_as(&x)?, &features)?;
        }
        if let Some(v) = &virtual_tokens {
            let h = self.decoder.config.hidden_size;
            let v = v.f_to_kind(x.kind())?.f_unsqueeze(0)?.f_expand([b, n_virtual, h], false)?;
            x = Tensor::f_cat(&[&v, &x], 1)?;
        }
        // Masks: none for a right-padded batch without a cache, per sample for packed rows
        // (see `model::attention`).
        let fresh = past == 0 && cache.is_none();
        let mask_valid = match key_valid {
            Some(v) if fresh && right_padded(&v)? => None,
            other => other,
        };
        let segments = match (position_ids_given, &mask_valid) {
            (true, None) if fresh => packed_segments(&position_ids)?,
            _ => None,
        };
        let pattern = Pattern { key_valid: mask_valid.as_ref(), segments: segments.as_ref(), past };
        let mut hidden = self.decoder.decode(x, &position_ids, pattern, cache, mode)?;
        if n_virtual > 0 {
            // The virtual tokens' own outputs are not the caller's.
            hidden = hidden.f_narrow(1, n_virtual, t)?;
        }
        match output {
            Output::Hidden => Ok(hidden),
            Output::Logits => self.decoder.head(&hidden, mode),
            Output::LastLogits => {
                let last = hidden.f_select(1, t - 1)?;
                self.decoder.head(&last, mode)
            }
        }
    }

    /// Checks token ids: `[batch, seq]`, not empty, int64, inside the vocabulary.
    fn check_ids(&self, input_ids: &Tensor) -> Result<(i64, i64)> {
        let size = input_ids.size();
        let &[b, t] = size.as_slice() else {
            bail!("input_ids must be [batch, seq] token ids, got shape {size:?}");
        };
        if b == 0 || t == 0 {
            bail!("input_ids is empty (shape {size:?})");
        }
        if input_ids.kind() != Kind::Int64 {
            bail!("input_ids must be int64 token ids, got {:?}", input_ids.kind());
        }
        let (lo, hi) =
            (input_ids.f_min()?.f_int64_value(&[])?, input_ids.f_max()?.f_int64_value(&[])?);
        if lo < 0 || hi >= self.decoder.config.vocab_size {
            bail!(
                "token id {} is outside the vocabulary (vocab_size {})",
                if lo < 0 { lo } else { hi },
                self.decoder.config.vocab_size
            );
        }
        Ok((b, t))
    }

    /// How many positions `cache` holds (0 without one), after checking it fits `b` rows.
    fn cached_positions(&self, cache: Option<&KvCache>, b: i64) -> Result<i64> {
        let Some(c) = cache else { return Ok(0) };
        if c.batch() != b {
            bail!("KV cache is for batch {} but input_ids has {b} rows", c.batch());
        }
        if c.layers.len() != self.decoder.layers.len() {
            bail!(
                "KV cache has {} layers, the model {}",
                c.layers.len(),
                self.decoder.layers.len()
            );
        }
        Ok(c.seq_len())
    }

    /// Checks a prompt-learning adapter's `[n, width]` tensor (on the model's device).
    fn check_prompt(&self, p: &Tensor, width: i64, what: &str) -> Result<Tensor> {
        let size = p.size();
        match size.as_slice() {
            &[n, w] if n >= 1 && w == width => Ok(p.f_to_device(self.decoder.device)?),
            _ => bail!(
                "the adapter's {what} must be [num_virtual_tokens ≥ 1, {width}], got {size:?}"
            ),
        }
    }

    /// Puts prefix tuning's keys and values (`[n, layers · 2 · kv_heads · head_dim]`) into an
    /// empty cache, the same for every row.
    fn seed_prefix(&self, cache: &mut KvCache, prefix: &Tensor) -> Result<()> {
        let cfg = &self.decoder.config;
        let (layers, kv, hd) = (cfg.num_hidden_layers, cfg.num_kv_heads(), cfg.head_dim());
        let n = prefix.size()[0];
        let b = cache.batch();
        // [n, 2L, kv, hd] -> [2L, kv, n, hd] -> [2L, b, kv, n, hd]
        let p = prefix
            .f_to_kind(self.decoder.dtype)?
            .f_view([n, layers * 2, kv, hd])?
            .f_permute([1, 2, 0, 3])?
            .f_unsqueeze(1)?
            .f_expand([layers * 2, b, kv, n, hd], false)?;
        for l in 0..layers {
            let k = p.f_select(0, 2 * l)?.f_contiguous()?;
            let v = p.f_select(0, 2 * l + 1)?.f_contiguous()?;
            let _ = cache.update(l as usize, k, v)?;
        }
        Ok(())
    }

    /// Position ids when the caller gives none: `cumsum(mask) - 1` (or `past..past + t`); for
    /// Qwen2-VL the 3-D M-RoPE positions of transformers' `get_rope_index` at the prefill
    /// (keeping each row's delta in the cache) and the 1-D positions shifted by that delta later.
    #[allow(clippy::too_many_arguments)]
    fn default_positions(
        &self,
        input_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        key_valid: Option<&Tensor>,
        images: Option<&VisionInputs>,
        past: i64,
        (b, t): (i64, i64),
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let text_positions = match key_valid {
            Some(valid) => valid
                .f_cumsum(-1, Kind::Int64)?
                .f_sub_scalar(1)?
                .f_masked_fill(&valid.f_logical_not()?, 0)?
                .f_narrow(1, past, t)?,
            None => Tensor::f_arange_start(past, past + t, (Kind::Int64, self.decoder.device))?
                .f_unsqueeze(0)?
                .f_expand([b, t], false)?,
        };
        Ok(match (&self.vision, input_ids) {
            (None, _) => text_positions,
            // Qwen2-VL prefill (or no cache): transformers' `get_rope_index`, keeping the deltas.
            (Some((tower, vl)), Some(input_ids)) if past == 0 => {
                let ids: Vec<i64> =
                    Vec::try_from(&input_ids.f_reshape([-1])?.f_to_device(Device::Cpu)?)?;
                let mask: Option<Vec<i64>> = match attention_mask {
                    Some(m) => Some(Vec::try_from(
                        &m.f_ne(0)?
                            .f_to_kind(Kind::Int64)?
                            .f_reshape([-1])?
                            .f_to_device(Device::Cpu)?,
                    )?),
                    None => None,
                };
                let videos = images.and_then(|i| i.videos.as_ref());
                let inputs = RopeInputs {
                    image_grid_thw: images.map(|i| i.image_grid_thw.as_slice()).unwrap_or(&[]),
                    video_grid_thw: videos.map(|v| v.grid_thw.as_slice()).unwrap_or(&[]),
                    second_per_grid_ts: videos
                        .map(|v| v.second_per_grid_ts.as_slice())
                        .unwrap_or(&[]),
                    tokens_per_second: tower.config().video_tokens_per_second(),
                    image_token_id: vl.image_token_id,
                    video_token_id: vl.video_token_id,
                    spatial_merge_size: tower.config().spatial_merge_size,
                };
                let index =
                    rope_index_vision(&ids, b as usize, t as usize, mask.as_deref(), &inputs)?;
                if let Some(c) = cache {
                    c.rope_deltas = Some(index.deltas);
                }
                Tensor::f_from_slice(&index.positions)?
                    .f_view([3, b, t])?
                    .f_to_device(self.decoder.device)?
            }
            // Later steps (or embeddings in): 1-D positions shifted by each row's delta, on all three axes.
            (Some(_), _) => {
                let deltas = cache
                    .as_deref()
                    .and_then(|c| c.rope_deltas.clone())
                    .unwrap_or_else(|| vec![0; b as usize]);
                let deltas = Tensor::f_from_slice(&deltas)?
                    .f_view([b, 1])?
                    .f_to_device(self.decoder.device)?;
                text_positions.f_add(&deltas)?.f_unsqueeze(0)?.f_expand([3, b, t], false)?
            }
        })
    }

    /// Checks that the `<|image_pad|>` (or `<|video_pad|>`) tokens of `input_ids` are as many as
    /// the merged patches of the images (videos) of `grids`, and returns the mask of those tokens.
    /// `what` is `image` or `video`.
    fn vision_token_mask(
        &self,
        input_ids: &Tensor,
        grids: &[[i64; 3]],
        tower: &VisionTower,
        token_id: i64,
        what: &str,
    ) -> Result<Tensor> {
        let mask = input_ids.f_eq(token_id)?;
        let per_row: Vec<i64> = Vec::try_from(
            &mask.f_sum_dim_intlist(1, false, Kind::Int64)?.f_to_device(Device::Cpu)?,
        )?;
        let tokens: i64 = per_row.iter().sum();
        let per_item: Vec<i64> = grids.iter().map(|g| tower.merged_tokens(g)).collect();
        let patches: i64 = per_item.iter().sum();
        if tokens != patches {
            let token = if what == "video" { "<|video_pad|>" } else { "<|image_pad|>" };
            let m2 = tower.config().spatial_merge_size.pow(2);
            bail!(
                "input_ids hold {tokens} {what} tokens ({token}, id {token_id}; per row {per_row:?}) but the {} {what}(s) \
                 give {patches} merged patches (per {what} {per_item:?}, {what}_grid_thw {grids:?} / spatial_merge_size² {m2}): \
                 each {what} needs t·h·w / {m2} {what} tokens",
                grids.len(),
            );
        }
        Ok(mask)
    }
}

/// What a forward pass returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// Logits `[B, T, vocab]` in f32.
    #[default]
    Logits,
    /// Logits `[B, vocab]` (f32) of the last position only (what decoding needs).
    LastLogits,
    /// The final hidden states `[B, T, hidden]` (after the last norm), in the model dtype.
    Hidden,
}

/// What a forward pass reads: token ids `[B, T]` (i64), or input embeddings `[B, T, hidden]`.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    Ids(&'a Tensor),
    Embeds(&'a Tensor),
}

/// The arguments of [`CausalLM::forward`]: built from the input, then set with the builder
/// methods (`ForwardArgs::ids(&ids).mask(Some(&m)).cache(Some(&mut c)).last()`).
pub struct ForwardArgs<'a> {
    pub input: Input<'a>,
    /// `[B, past + T]`, 1 = token, 0 = padding (`None`: every position is a token).
    pub attention_mask: Option<&'a Tensor>,
    /// `[B, T]`, or `[3, B, T]` for Qwen2-VL's M-RoPE (`None`: computed from the mask).
    pub position_ids: Option<&'a Tensor>,
    /// Qwen2-VL / Qwen2.5-VL: the images and videos whose embeddings replace the
    /// `<|image_pad|>` and `<|video_pad|>` tokens.
    pub images: Option<&'a VisionInputs>,
    pub cache: Option<&'a mut KvCache>,
    /// The adapter and training mode of the linear layers (`None`: evaluation, through the
    /// active adapter of a [`crate::peft::PeftModel`], or the base model of a bare `CausalLM`).
    pub mode: Option<LinearMode<'a>>,
    /// The token embedding to look ids up in instead of the model's (an adapter's trainable
    /// copy, set by [`crate::peft::PeftModel::forward`]).
    pub embed_tokens: Option<&'a Tensor>,
    pub output: Output,
    /// A prompt-learning adapter's contribution (set by [`crate::peft::PeftModel::forward`]);
    /// used at the prefill or a pass without a cache, ignored once the cache holds positions.
    pub prompt: Option<PromptInput<'a>>,
}

/// What a prompt-learning adapter puts before the input.
#[derive(Clone, Copy)]
pub enum PromptInput<'a> {
    /// `[n, hidden]` embeddings before the input embeddings (prompt tuning, P-tuning): the
    /// outputs keep the input's positions only.
    VirtualTokens(&'a Tensor),
    /// `[n, num_layers · 2 · kv_heads · head_dim]` keys and values before every layer's own
    /// (prefix tuning, peft's layout: layer `l`'s keys at `2l`, values at `2l + 1`).
    KvPrefix(&'a Tensor),
}

impl<'a> ForwardArgs<'a> {
    fn from_input(input: Input<'a>) -> Self {
        Self {
            input,
            attention_mask: None,
            position_ids: None,
            images: None,
            cache: None,
            mode: None,
            embed_tokens: None,
            output: Output::Logits,
            prompt: None,
        }
    }

    /// A pass over token ids `[B, T]`.
    pub fn ids(input_ids: &'a Tensor) -> Self {
        Self::from_input(Input::Ids(input_ids))
    }

    /// A pass over input embeddings `[B, T, hidden]`.
    pub fn embeds(inputs_embeds: &'a Tensor) -> Self {
        Self::from_input(Input::Embeds(inputs_embeds))
    }

    pub fn mask(self, attention_mask: Option<&'a Tensor>) -> Self {
        Self { attention_mask, ..self }
    }

    pub fn positions(self, position_ids: Option<&'a Tensor>) -> Self {
        Self { position_ids, ..self }
    }

    pub fn images(self, images: Option<&'a VisionInputs>) -> Self {
        Self { images, ..self }
    }

    pub fn cache(self, cache: Option<&'a mut KvCache>) -> Self {
        Self { cache, ..self }
    }

    pub fn mode(self, mode: LinearMode<'a>) -> Self {
        Self { mode: Some(mode), ..self }
    }

    /// Return the last position's logits `[B, vocab]`.
    pub fn last(self) -> Self {
        Self { output: Output::LastLogits, ..self }
    }

    /// Return the final hidden states `[B, T, hidden]`.
    pub fn hidden(self) -> Self {
        Self { output: Output::Hidden, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-layer cache of `rows` × `len` positions whose values name their row and position.
    fn filled(rows: i64, len: i64, tag: f64) -> KvCache {
        let mut c = KvCache::new(1, rows);
        let k =
            Tensor::arange(rows * len, (Kind::Float, Device::Cpu)).view([rows, 1, len, 1]) + tag;
        let _ = c.update(0, k.shallow_clone(), -k).unwrap();
        c
    }

    #[test]
    fn caches_join_with_left_padding_and_keep_chosen_rows() {
        let mut a = filled(1, 3, 100.0);
        a.append_rows(filled(2, 5, 200.0)).unwrap();
        assert_eq!((a.batch(), a.seq_len()), (3, 5));
        let k = |c: &KvCache| -> Vec<f32> {
            Vec::try_from(&c.layers[0].as_ref().unwrap().0.reshape([-1])).unwrap()
        };
        assert_eq!(
            k(&a)[..5],
            [0.0, 0.0, 100.0, 101.0, 102.0],
            "the shorter row is left-padded with zeros"
        );
        assert_eq!(k(&a)[5..10], [200.0, 201.0, 202.0, 203.0, 204.0]);
        a.retain(&[2, 0], 2).unwrap();
        assert_eq!((a.batch(), a.seq_len()), (2, 3));
        assert_eq!(k(&a), [207.0, 208.0, 209.0, 100.0, 101.0, 102.0]);
        let v: Vec<f32> = Vec::try_from(&a.layers[0].as_ref().unwrap().1.reshape([-1])).unwrap();
        assert_eq!(v[0], -207.0);
        let mut empty = KvCache::new(1, 0);
        empty.append_rows(filled(1, 2, 0.0)).unwrap();
        assert_eq!((empty.batch(), empty.seq_len()), (1, 2));
    }

    /// The embeddings-in path and caller-given position ids reach the same decoder as ids do:
    /// looked-up embeddings give the ids' logits, the mask's own positions give the default
    /// ones, other positions change the result, and a mis-shaped position tensor is refused.
    #[test]
    fn embeddings_in_and_explicit_positions_match_the_ids_path() {
        let m = crate::peft::adapters::tests::tiny_model(false);
        let ids = Tensor::from_slice(&[1i64, 5, 3, 7, 2, 9]).view([2, 3]);
        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        let want = CausalLM::forward(&m, ForwardArgs::ids(&ids)).unwrap();
        let embeds = Tensor::embedding(m.embed_tokens(), &ids, -1, false, false);
        let got = CausalLM::forward(&m, ForwardArgs::embeds(&embeds)).unwrap();
        assert_eq!(diff(&got, &want), 0.0, "embeddings in = ids in");

        let mask = Tensor::from_slice(&[0i64, 1, 1, 1, 1, 1]).view([2, 3]);
        let default = CausalLM::forward(&m, ForwardArgs::ids(&ids).mask(Some(&mask))).unwrap();
        let pos = Tensor::from_slice(&[0i64, 0, 1, 0, 1, 2]).view([2, 3]);
        let given =
            CausalLM::forward(&m, ForwardArgs::ids(&ids).mask(Some(&mask)).positions(Some(&pos)));
        assert_eq!(diff(&given.unwrap(), &default), 0.0, "the mask's positions, given explicitly");
        let spread = Tensor::from_slice(&[0i64, 0, 3, 0, 2, 5]).view([2, 3]);
        let other = CausalLM::forward(
            &m,
            ForwardArgs::ids(&ids).mask(Some(&mask)).positions(Some(&spread)),
        );
        assert!(diff(&other.unwrap(), &default) > 1e-4, "other positions change the logits");
        let e = CausalLM::forward(&m, ForwardArgs::ids(&ids).positions(Some(&pos.view([6]))))
            .unwrap_err();
        assert!(e.to_string().contains("position_ids must be"), "{e}");
    }

    #[test]
    fn default_inv_freq_closed_form() {
        let f: Vec<f32> =
            Vec::try_from(&rope_inv_freq(Rope::Default { theta: 10000.0 }, 8).unwrap()).unwrap();
        let want: Vec<f32> = (0..4).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 8.0)).collect();
        for (a, b) in f.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{f:?} vs {want:?}");
        }
        let lin: Vec<f32> =
            Vec::try_from(&rope_inv_freq(Rope::Linear { theta: 10000.0, factor: 4.0 }, 8).unwrap())
                .unwrap();
        for (a, b) in lin.iter().zip(&f) {
            assert_eq!(*a, b / 4.0);
        }
    }

    #[test]
    fn llama3_inv_freq_bands() {
        // head_dim 16, theta 10000: wavelengths 6.3, 19.9, 62.8, 199, ... With an original
        // context of 32 (low factor 1, high factor 4): < 8 kept, > 32 divided by 8, between smoothed.
        let rope = Rope::Llama3 {
            theta: 10000.0,
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32,
        };
        let got: Vec<f32> = Vec::try_from(&rope_inv_freq(rope, 16).unwrap()).unwrap();
        let base: Vec<f64> = (0..8).map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / 16.0)).collect();
        for (i, (g, b)) in got.iter().zip(&base).enumerate() {
            let wavelen = 2.0 * std::f64::consts::PI / b;
            let want = if wavelen < 8.0 {
                *b
            } else if wavelen > 32.0 {
                b / 8.0
            } else {
                let s = (32.0 / wavelen - 1.0) / 3.0;
                (1.0 - s) * b / 8.0 + s * b
            };
            assert!((*g as f64 - want).abs() <= 1e-6 * want, "band {i}: {g} vs {want}");
        }
    }

    /// A 2-layer Qwen2 (q, k, v biases) of random weights, its head tied or not.
    fn tiny_weights(tied: bool) -> (LlamaConfig, Vec<(String, Tensor)>) {
        let cfg = format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
               "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64, "vocab_size": 16,
               "tie_word_embeddings": {tied}, "rms_norm_eps": 1e-6}}"#
        );
        let config = LlamaConfig::from_json(&cfg, Path::new("config.json")).unwrap();
        let o = (Kind::Float, Device::Cpu);
        let mut t = vec![("model.embed_tokens.weight".to_string(), Tensor::randn([16, 8], o))];
        for l in 0..2 {
            let p = format!("model.layers.{l}");
            for (n, s, bias) in [
                ("self_attn.q_proj", [8, 8], true),
                ("self_attn.k_proj", [4, 8], true),
                ("self_attn.v_proj", [4, 8], true),
                ("self_attn.o_proj", [8, 8], false),
                ("mlp.gate_proj", [12, 8], false),
                ("mlp.up_proj", [12, 8], false),
                ("mlp.down_proj", [8, 12], false),
            ] {
                t.push((format!("{p}.{n}.weight"), Tensor::randn(s, o) * 0.3));
                if bias {
                    t.push((format!("{p}.{n}.bias"), Tensor::randn([s[0]], o) * 0.1));
                }
            }
            for n in ["input_layernorm", "post_attention_layernorm"] {
                t.push((format!("{p}.{n}.weight"), Tensor::rand([8], o) + 0.5));
            }
        }
        t.push(("model.norm.weight".into(), Tensor::rand([8], o) + 0.5));
        if !tied {
            t.push(("lm_head.weight".into(), Tensor::randn([16, 8], o)));
        }
        (config, t)
    }

    /// The model of `weights` (copies) with every weight trainable, as full fine-tuning sets it.
    fn trainable_model(cfg: &LlamaConfig, weights: &[(String, Tensor)]) -> CausalLM {
        let copies = weights.iter().map(|(k, t)| (k.clone(), t.copy())).collect();
        let mut w = Weights::from_tensors(Path::new("memory"), copies);
        let m = CausalLM::from_weights(cfg.clone(), &mut w, Device::Cpu, Kind::Float).unwrap();
        for (_, t) in m.named_weights() {
            let _ = t.set_requires_grad(true);
        }
        m
    }

    /// Next-token cross-entropy of `ids`.
    fn lm_loss(m: &CausalLM, ids: &Tensor) -> Tensor {
        let logits = m.forward(ForwardArgs::ids(ids)).unwrap();
        let (_, t, v) = logits.size3().unwrap();
        logits
            .narrow(1, 0, t - 1)
            .reshape([-1, v])
            .cross_entropy_for_logits(&ids.narrow(1, 1, t - 1).reshape([-1]))
    }

    /// What one rank of the 2-rank run reports.
    struct RankRun {
        loss: f64,
        /// Partitioned keys and their shards' gradients, in the returned order.
        shard_grads: Vec<(String, Tensor)>,
        /// Gradients of the trainable tensors kept whole (biases, norms).
        whole_grads: Vec<(String, Tensor)>,
        gathered: Vec<(String, Tensor)>,
        /// (all-gathers, reduce-scatters) of the training step.
        counts: (usize, usize),
        /// Resident weight bytes before and after partitioning.
        resident: (usize, usize),
        tied_after: bool,
        stand_ins: bool,
    }

    /// Full fine-tuning with every large weight partitioned over two real ranks (a thread
    /// each), each on its own batch, against one process training on both batches (loss the
    /// mean of the two): each rank's shard gradient is its part of the whole gradient, the
    /// average of the two ranks' gradients of the tensors kept whole is theirs, and the
    /// gathered weights are the model's. Tied and untied heads, with and without gradient
    /// checkpointing; the collectives counted: one gather per weight in forward and one in
    /// backward (plus one in the recomputation), one reduce-scatter per use.
    #[test]
    fn partitioned_full_fine_tuning_on_two_ranks_matches_one_process() {
        use crate::model::partition::tests::ThreadGroup;
        let batches = [
            Tensor::from_slice(&[1i64, 5, 3, 7, 2, 9]).view([1, 6]),
            Tensor::from_slice(&[4i64, 4, 8, 1, 0, 15, 2, 11, 6, 13]).view([2, 5]),
        ];
        for (tied, checkpointing) in [(false, false), (true, false), (false, true), (true, true)] {
            let what = format!("tied {tied}, checkpointing {checkpointing}");
            let (cfg, weights) = tiny_weights(tied);
            let reference = trainable_model(&cfg, &weights);
            let ref_losses: Vec<Tensor> = batches.iter().map(|b| lm_loss(&reference, b)).collect();
            ((&ref_losses[0] + &ref_losses[1]) / 2.0).backward();
            let ref_grads: std::collections::HashMap<String, Tensor> =
                reference.named_weights().into_iter().map(|(k, t)| (k, t.grad().copy())).collect();

            let runs: Vec<RankRun> = ThreadGroup::ranks(2)
                .into_iter()
                .zip(batches.iter().map(|b| b.copy()))
                .map(|(group, ids)| {
                    let (cfg, weights) = (
                        cfg.clone(),
                        weights.iter().map(|(k, t)| (k.clone(), t.copy())).collect::<Vec<_>>(),
                    );
                    std::thread::spawn(move || {
                        let mut m = trainable_model(&cfg, &weights);
                        m.set_gradient_checkpointing(checkpointing);
                        let before = m.resident_weight_bytes();
                        let shards = m.partition_trainable(group.clone(), false).unwrap();
                        let stand_ins = shards.iter().all(|(k, _)| {
                            m.is_partitioned(k)
                                && m.named_weights().iter().any(|(n, t)| {
                                    n == k
                                        && !t.requires_grad()
                                        && t.stride().iter().all(|&s| s == 0)
                                })
                        });
                        let whole: Vec<(String, Tensor)> = m
                            .named_weights()
                            .into_iter()
                            .filter(|(_, t)| t.requires_grad())
                            .collect();
                        let loss = lm_loss(&m, &ids);
                        loss.backward();
                        let counts = *group.counts.lock().unwrap();
                        RankRun {
                            loss: loss.double_value(&[]),
                            shard_grads: shards
                                .iter()
                                .map(|(k, s)| (k.clone(), s.grad().copy()))
                                .collect(),
                            whole_grads: whole
                                .iter()
                                .map(|(k, t)| (k.clone(), t.grad().copy()))
                                .collect(),
                            gathered: m.gathered_weights().unwrap(),
                            counts,
                            resident: (before, m.resident_weight_bytes()),
                            tied_after: m.lm_head_is_tied(),
                            stand_ins,
                        }
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect();

            let mut expected_keys = vec!["model.embed_tokens.weight".to_string()];
            for l in 0..2 {
                for n in [
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                ] {
                    expected_keys.push(format!("model.layers.{l}.{n}.weight"));
                }
            }
            if !tied {
                expected_keys.push("lm_head.weight".into());
            }
            let numel = |k: &str| weights.iter().find(|(n, _)| n == k).unwrap().1.numel() as i64;
            let saved: i64 = expected_keys.iter().map(|k| numel(k) - (numel(k) + 1) / 2).sum();
            // As before the row lookup, plus its backward's two all-gathers (ids and row
            // gradients; its reduce-scatter is gone: 15, not 16).
            let gathers = 1 + 14 + 1 + 14 + 1 + 2 + if checkpointing { 14 } else { 0 };
            for (rank, run) in runs.iter().enumerate() {
                let keys: Vec<&String> = run.shard_grads.iter().map(|(k, _)| k).collect();
                assert_eq!(
                    keys,
                    expected_keys.iter().collect::<Vec<_>>(),
                    "{what}: partitioned, in model order"
                );
                assert!(run.stand_ins, "{what}: named_weights lists stand-ins");
                assert_eq!(run.tied_after, tied, "{what}: the head stays tied");
                assert!(
                    (run.loss - ref_losses[rank].double_value(&[])).abs() < 1e-5,
                    "{what}: rank {rank}'s loss"
                );
                assert_eq!(run.counts, (gathers, 15), "{what}: rank {rank}'s collectives");
                assert_eq!(
                    run.resident.0 - run.resident.1,
                    saved as usize * 4,
                    "{what}: resident bytes"
                );
                for (k, g) in &run.shard_grads {
                    let want = {
                        let flat = ref_grads[k].reshape([-1]);
                        let n = flat.size()[0];
                        let len = (n + 1) / 2;
                        Tensor::cat(
                            &[flat, Tensor::zeros([2 * len - n], (Kind::Float, Device::Cpu))],
                            0,
                        )
                        .narrow(0, rank as i64 * len, len)
                    };
                    let diff = f64::try_from((g - want).abs().max()).unwrap();
                    assert!(
                        diff < 1e-5,
                        "{what}: rank {rank}'s shard gradient of {k} is off by {diff}"
                    );
                }
                let names: Vec<String> =
                    reference.named_weights().into_iter().map(|(k, _)| k).collect();
                let gathered: Vec<String> = run.gathered.iter().map(|(k, _)| k.clone()).collect();
                assert_eq!(gathered, names, "{what}: gathered_weights follows named_weights");
                for (k, t) in &run.gathered {
                    let w = &weights.iter().find(|(n, _)| n == k).unwrap().1;
                    let diff = f64::try_from((t - w).abs().max()).unwrap();
                    assert_eq!(diff, 0.0, "{what}: gathered {k}");
                }
            }
            assert_eq!(runs[0].whole_grads.len(), 2 * 2 + 3 * 2 + 1, "norms and biases stay whole");
            for ((k, g0), (_, g1)) in runs[0].whole_grads.iter().zip(&runs[1].whole_grads) {
                let diff = f64::try_from(((g0 + g1) / 2.0 - &ref_grads[k]).abs().max()).unwrap();
                assert!(diff < 1e-5, "{what}: averaged gradient of {k} is off by {diff}");
            }
        }
    }

    /// With one rank nothing is partitioned; a frozen weight is never partitioned.
    #[test]
    fn one_rank_or_frozen_weights_are_not_partitioned() {
        use crate::model::partition::tests::ThreadGroup;
        let (cfg, weights) = tiny_weights(true);
        let mut m = trainable_model(&cfg, &weights);
        assert!(m.partition_trainable(ThreadGroup::ranks(1).remove(0), false).unwrap().is_empty());
        assert!(m.named_weights().iter().all(|(_, t)| t.requires_grad()));
        let mut w = Weights::from_tensors(Path::new("memory"), weights);
        let mut frozen = CausalLM::from_weights(cfg, &mut w, Device::Cpu, Kind::Float).unwrap();
        let bytes = frozen.resident_weight_bytes();
        let group = ThreadGroup::ranks(2).remove(0);
        assert!(frozen.partition_trainable(group, false).unwrap().is_empty());
        assert_eq!(frozen.resident_weight_bytes(), bytes);
        assert!(!frozen.is_partitioned("model.embed_tokens.weight"));
    }
}
