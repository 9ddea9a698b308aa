//! Qwen2-VL's vision tower (`model.visual`): a ViT over 14×14×2 patches with 2-D rotary
//! embeddings, attention within each image frame, and a patch merger that joins 2×2 patches
//! into one token of the text decoder's width.
//!
//! Patch embedding: a `Conv3d` whose kernel equals its stride (run as libtorch's conv3d, so it
//! is bit-for-bit transformers' `PatchEmbed`). Blocks: pre-LayerNorm (eps 1e-6) attention with
//! a fused `qkv` and 2-D RoPE computed in fp32 (`apply_rotary_pos_emb_vision`), then an MLP
//! `fc1 → act (quick_gelu) → fc2`. Merger: LayerNorm `ln_q`, the `m²` patches of each block
//! concatenated, `mlp.0 → GELU → mlp.2`. Every linear is a [`FrozenLinear`] named by its
//! transformers 5 module path (`model.visual.blocks.0.attn.qkv`, `model.visual.merger.mlp.0`).
//!
//! Reference: transformers `models/qwen2_vl/modeling_qwen2_vl.py` and `vision_utils.py`.
use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::config::VisionConfig;
use crate::model::linear::{FrozenLinear, LinearMode};
use crate::model::llama::linear;
use crate::model::weights::Weights;

/// The vision tower's module path in transformers 5 checkpoints.
pub const VISUAL: &str = "model.visual";

/// `torch.nn.LayerNorm` with weight and bias.
pub(crate) struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) name: String,
}

impl LayerNorm {
    fn new(w: &mut Weights, path: &str, dim: i64, why: &str) -> Result<Self> {
        Ok(Self {
            weight: w.take(&format!("{path}.weight"), &[dim], why)?,
            bias: w.take(&format!("{path}.bias"), &[dim], why)?,
            name: path.into(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_layer_norm(
            [self.weight.size()[0]],
            Some(&self.weight),
            Some(&self.bias),
            1e-6,
            false,
        )?)
    }
}

/// The vision MLP's activation (`vision_config.hidden_act`).
#[derive(Debug, Clone, Copy)]
enum Activation {
    /// `x · sigmoid(1.702 x)`.
    QuickGelu,
    Gelu,
    GeluTanh,
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::Gelu,
            "gelu_pytorch_tanh" => Self::GeluTanh,
            "silu" => Self::Silu,
            other => bail!("vision_config.hidden_act `{other}` is not supported"),
        })
    }

    fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::QuickGelu => x.f_mul(&x.f_mul_scalar(1.702)?.f_sigmoid()?)?,
            Self::Gelu => x.f_gelu("none")?,
            Self::GeluTanh => x.f_gelu("tanh")?,
            Self::Silu => x.f_silu()?,
        })
    }
}

pub(crate) struct VisionBlock {
    pub(crate) norm1: LayerNorm,
    pub(crate) norm2: LayerNorm,
    pub(crate) qkv: FrozenLinear,
    pub(crate) proj: FrozenLinear,
    pub(crate) fc1: FrozenLinear,
    pub(crate) fc2: FrozenLinear,
}

/// The vision tower: patch embedding, blocks, merger.
pub struct VisionTower {
    cfg: VisionConfig,
    /// `[embed_dim, in_channels, temporal_patch_size, patch_size, patch_size]`.
    pub(crate) patch_embed: Tensor,
    pub(crate) blocks: Vec<VisionBlock>,
    pub(crate) ln_q: LayerNorm,
    pub(crate) merger_fc1: FrozenLinear,
    pub(crate) merger_fc2: FrozenLinear,
    inv_freq: Tensor,
    act: Activation,
    dtype: Kind,
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    Ok(Tensor::f_cat(&[x.f_narrow(-1, half, half)?.f_neg()?, x.f_narrow(-1, 0, half)?], -1)?)
}

impl VisionTower {
    /// Takes the `model.visual.*` tensors of `cfg` from `w`.
    pub fn new(cfg: &VisionConfig, w: &mut Weights, device: Device, dtype: Kind) -> Result<Self> {
        let (e, mlp) = (cfg.embed_dim, cfg.mlp_hidden_dim());
        let patch_embed = w.take(
            &format!("{VISUAL}.patch_embed.proj.weight"),
            &[e, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size],
            "vision_config: embed_dim, in_channels, temporal_patch_size, patch_size, patch_size",
        )?;
        let mut blocks = Vec::with_capacity(cfg.depth as usize);
        for b in 0..cfg.depth {
            let p = format!("{VISUAL}.blocks.{b}");
            blocks.push(VisionBlock {
                norm1: LayerNorm::new(w, &format!("{p}.norm1"), e, "vision_config.embed_dim")?,
                norm2: LayerNorm::new(w, &format!("{p}.norm2"), e, "vision_config.embed_dim")?,
                qkv: linear(
                    w,
                    &format!("{p}.attn.qkv"),
                    3 * e,
                    e,
                    true,
                    "3 × vision_config.embed_dim, embed_dim",
                )?,
                proj: linear(
                    w,
                    &format!("{p}.attn.proj"),
                    e,
                    e,
                    true,
                    "vision_config.embed_dim, embed_dim",
                )?,
                fc1: linear(
                    w,
                    &format!("{p}.mlp.fc1"),
                    mlp,
                    e,
                    true,
                    "embed_dim × mlp_ratio, embed_dim",
                )?,
                fc2: linear(
                    w,
                    &format!("{p}.mlp.fc2"),
                    e,
                    mlp,
                    true,
                    "embed_dim, embed_dim × mlp_ratio",
                )?,
            });
        }
        let merged = e * cfg.spatial_merge_size * cfg.spatial_merge_size;
        let m = format!("{VISUAL}.merger");
        let ln_q = LayerNorm::new(w, &format!("{m}.ln_q"), e, "vision_config.embed_dim")?;
        let merger_fc1 = linear(
            w,
            &format!("{m}.mlp.0"),
            merged,
            merged,
            true,
            "embed_dim × spatial_merge_size², same",
        )?;
        let merger_fc2 = linear(
            w,
            &format!("{m}.mlp.2"),
            cfg.hidden_size,
            merged,
            true,
            "hidden_size, embed_dim × spatial_merge_size²",
        )?;
        // transformers' `compute_axial_rope_parameters`: head_dim / 4 frequencies of base theta
        // over head_dim / 2, shared by the height and width axes.
        let spatial = cfg.head_dim() / 2;
        let exponents = Tensor::f_arange_start_step(0, spatial, 2, (Kind::Int64, Device::Cpu))?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(spatial)?;
        let inv_freq = Tensor::f_pow_scalar(cfg.rope_theta(), &exponents)?
            .f_reciprocal()?
            .f_to_device(device)?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed,
            blocks,
            ln_q,
            merger_fc1,
            merger_fc2,
            inv_freq,
            act: Activation::parse(&cfg.hidden_act)?,
            dtype,
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Merged tokens per image: `t · h · w / m²`.
    pub fn merged_tokens(&self, grid: &[i64; 3]) -> i64 {
        let m = self.cfg.spatial_merge_size;
        grid[0] * grid[1] * grid[2] / (m * m)
    }

    /// Every weight under its checkpoint key, in transformers' order.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out =
            vec![(format!("{VISUAL}.patch_embed.proj.weight"), self.patch_embed.shallow_clone())];
        let norm = |out: &mut Vec<(String, Tensor)>, n: &LayerNorm| {
            out.push((format!("{}.weight", n.name), n.weight.shallow_clone()));
            out.push((format!("{}.bias", n.name), n.bias.shallow_clone()));
        };
        let lin = |out: &mut Vec<(String, Tensor)>, l: &FrozenLinear| {
            out.push((format!("{}.weight", l.name), l.weight.shallow_clone()));
            if let Some(b) = &l.bias {
                out.push((format!("{}.bias", l.name), b.shallow_clone()));
            }
        };
        for b in &self.blocks {
            norm(&mut out, &b.norm1);
            norm(&mut out, &b.norm2);
            for l in [&b.qkv, &b.proj, &b.fc1, &b.fc2] {
                lin(&mut out, l);
            }
        }
        norm(&mut out, &self.ln_q);
        lin(&mut out, &self.merger_fc1);
        lin(&mut out, &self.merger_fc2);
        out
    }

    /// The linear layers in model order (blocks' qkv, proj, fc1, fc2, then the merger's).
    pub fn linears(&self) -> Vec<&FrozenLinear> {
        let mut out: Vec<&FrozenLinear> =
            self.blocks.iter().flat_map(|b| [&b.qkv, &b.proj, &b.fc1, &b.fc2]).collect();
        out.extend([&self.merger_fc1, &self.merger_fc2]);
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut FrozenLinear> {
        let mut out: Vec<&mut FrozenLinear> = Vec::new();
        for b in &mut self.blocks {
            out.extend([&mut b.qkv, &mut b.proj, &mut b.fc1, &mut b.fc2]);
        }
        out.extend([&mut self.merger_fc1, &mut self.merger_fc2]);
        out
    }

    /// transformers' `named_modules()` paths of the tower, each with what it is.
    pub fn module_names(&self) -> Vec<(String, &'static str)> {
        let v = VISUAL;
        let mut out = vec![
            (v.to_string(), "the vision tower"),
            (format!("{v}.patch_embed"), "the patch embedding"),
            (format!("{v}.patch_embed.proj"), "a 3-D convolution"),
            (format!("{v}.rotary_pos_emb"), "the vision rotary embedding"),
            (format!("{v}.blocks"), "the list of vision blocks"),
        ];
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("{v}.blocks.{i}");
            out.push((p.clone(), "a vision block"));
            out.push((format!("{p}.norm1"), "a LayerNorm"));
            out.push((format!("{p}.norm2"), "a LayerNorm"));
            out.push((format!("{p}.attn"), "a vision attention block"));
            out.push((b.qkv.name.clone(), "a linear layer"));
            out.push((b.proj.name.clone(), "a linear layer"));
            out.push((format!("{p}.mlp"), "a vision MLP"));
            out.push((b.fc1.name.clone(), "a linear layer"));
            out.push((format!("{p}.mlp.act"), "an activation"));
            out.push((b.fc2.name.clone(), "a linear layer"));
        }
        out.push((format!("{v}.merger"), "the patch merger"));
        out.push((self.ln_q.name.clone(), "a LayerNorm"));
        out.push((format!("{v}.merger.mlp"), "the merger MLP"));
        out.push((self.merger_fc1.name.clone(), "a linear layer"));
        out.push((format!("{v}.merger.mlp.1"), "an activation"));
        out.push((self.merger_fc2.name.clone(), "a linear layer"));
        out
    }

    /// Checks `pixel_values` `[sum t·h·w, C·T·P·P]` against `grids` (`[t, h, w]` in patches).
    pub fn check_inputs(&self, pixel_values: &Tensor, grids: &[[i64; 3]]) -> Result<()> {
        let m = self.cfg.spatial_merge_size;
        for (i, &[t, h, w]) in grids.iter().enumerate() {
            if t <= 0 || h <= 0 || w <= 0 || h % m != 0 || w % m != 0 {
                bail!("image {i}: image_grid_thw [{t}, {h}, {w}] must be positive, with h and w multiples of spatial_merge_size {m}");
            }
        }
        let patches: i64 = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let want = [patches, self.cfg.patch_values()];
        if pixel_values.size() != want {
            bail!(
                "pixel_values must be [sum of t·h·w over the images, in_channels·temporal_patch_size·patch_size²] = {want:?} for image_grid_thw {grids:?}, got {:?}",
                pixel_values.size()
            );
        }
        Ok(())
    }

    /// Image embeddings `[sum t·h·w / m², hidden_size]` (model dtype), the images in order.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        grids: &[[i64; 3]],
        mode: LinearMode<'_>,
    ) -> Result<Tensor> {
        self.check_inputs(pixel_values, grids)?;
        let c = &self.cfg;
        let device = self.patch_embed.device();
        let (e, heads, hd) = (c.embed_dim, c.num_heads, c.head_dim());
        let x = pixel_values.f_to_device(device)?.f_to_kind(self.dtype)?.f_view([
            -1,
            c.in_channels,
            c.temporal_patch_size,
            c.patch_size,
            c.patch_size,
        ])?;
        let stride = [c.temporal_patch_size, c.patch_size, c.patch_size];
        let mut x = x
            .f_conv3d(&self.patch_embed, None::<Tensor>, stride, [0, 0, 0], [1, 1, 1], 1)?
            .f_view([-1, e])?;
        let n = x.size()[0];

        // (h, w) of every patch, block-major over m × m merge blocks (`get_vision_position_ids`),
        // and the frame lengths attention is restricted to (`get_vision_cu_seqlens`).
        let m = c.spatial_merge_size;
        let mut pos: Vec<i64> = Vec::with_capacity(2 * n as usize);
        let mut frames: Vec<i64> = Vec::new();
        for &[t, h, w] in grids {
            let mut frame = Vec::with_capacity(2 * (h * w) as usize);
            for bh in 0..h / m {
                for bw in 0..w / m {
                    for ih in 0..m {
                        for iw in 0..m {
                            frame.extend([bh * m + ih, bw * m + iw]);
                        }
                    }
                }
            }
            for _ in 0..t {
                pos.extend_from_slice(&frame);
                frames.push(h * w);
            }
        }
        let pos = Tensor::f_from_slice(&pos)?.f_view([n, 2])?.f_to_device(device)?;
        let freqs = pos.f_unsqueeze(-1)?.f_to_kind(Kind::Float)?.f_mul(&self.inv_freq)?; // [N, 2, hd/4]
        let hw = Tensor::f_cat(&[freqs.f_select(1, 0)?, freqs.f_select(1, 1)?], -1)?;
        let emb = Tensor::f_cat(&[&hw, &hw], -1)?; // [N, hd]
        let (cos, sin) = (emb.f_cos()?.f_unsqueeze(-2)?, emb.f_sin()?.f_unsqueeze(-2)?);
        let rope = |t: &Tensor| -> Result<Tensor> {
            let f = t.f_to_kind(Kind::Float)?;
            Ok(f.f_mul(&cos)?.f_add(&rotate_half(&f)?.f_mul(&sin)?)?.f_to_kind(t.kind())?)
        };
        let scale = (hd as f64).powf(-0.5);

        for (i, b) in self.blocks.iter().enumerate() {
            let block = || -> Result<Tensor> {
                let h = b.norm1.forward(&x)?;
                let qkv = b
                    .qkv
                    .forward(&h, mode)?
                    .f_reshape([n, 3, heads, hd])?
                    .f_permute([1, 0, 2, 3])?;
                let q = rope(&qkv.f_select(0, 0)?)?.f_transpose(0, 1)?.f_unsqueeze(0)?; // [1, heads, N, hd]
                let k = rope(&qkv.f_select(0, 1)?)?.f_transpose(0, 1)?.f_unsqueeze(0)?;
                let v = qkv.f_select(0, 2)?.f_transpose(0, 1)?.f_unsqueeze(0)?;
                let mut outs = Vec::with_capacity(frames.len());
                let mut start = 0;
                for &len in &frames {
                    let part = |t: &Tensor| t.f_narrow(2, start, len);
                    let y = Tensor::f_scaled_dot_product_attention(
                        &part(&q)?,
                        &part(&k)?,
                        &part(&v)?,
                        None::<Tensor>,
                        0.0,
                        false,
                        scale,
                        false,
                    )?;
                    outs.push(y.f_transpose(1, 2)?); // [1, len, heads, hd]
                    start += len;
                }
                let y = Tensor::f_cat(&outs, 1)?.f_reshape([n, e])?;
                let x1 = x.f_add(&b.proj.forward(&y, mode)?)?;
                let h = self.act.forward(&b.fc1.forward(&b.norm2.forward(&x1)?, mode)?)?;
                Ok(x1.f_add(&b.fc2.forward(&h, mode)?)?)
            };
            x = block().with_context(|| format!("{VISUAL}.blocks.{i}"))?;
        }
        let merged = self.ln_q.forward(&x)?.f_view([-1, e * m * m])?;
        let h = self.merger_fc1.forward(&merged, mode)?.f_gelu("none")?;
        self.merger_fc2.forward(&h, mode).with_context(|| format!("{VISUAL}.merger"))
    }
}
