//! Qwen2-VL's and Qwen2.5-VL's vision tower (`model.visual`): a ViT over 14×14×2 patches with
//! 2-D rotary embeddings, attention within each image frame, and a patch merger that joins 2×2
//! patches into one token of the text decoder's width.
//!
//! Patch embedding: a `Conv3d` whose kernel equals its stride (run as libtorch's conv3d, so it
//! is bit-for-bit transformers' `PatchEmbed`). Blocks: pre-LayerNorm (eps 1e-6) attention with
//! a fused `qkv` and 2-D RoPE computed in fp32 (`apply_rotary_pos_emb_vision`), then an MLP
//! `fc1 → act (quick_gelu) → fc2`. Merger: LayerNorm `ln_q`, the `m²` patches of each block
//! concatenated, `mlp.0 → GELU → mlp.2`. Every linear is a [`FrozenLinear`] named by its
//! transformers 5 module path (`model.visual.blocks.0.attn.qkv`, `model.visual.merger.mlp.0`).
//!
//! Qwen2.5-VL's tower differs in: RMSNorm (eps 1e-6, weight only) for `norm1`, `norm2` and the
//! merger's `ln_q`; a SwiGLU MLP with biases (`mlp.gate_proj`, `mlp.up_proj`, `mlp.down_proj`,
//! `hidden_act` silu); and window attention: the merged tokens of each frame are reordered
//! window by window (windows of `window_size / merge / patch` merged tokens a side, the
//! `window_index` permutation of `get_vision_window_index`), the blocks not in
//! `fullatt_block_indexes` attend within a window, the others within a frame, and the merger's
//! output is put back in image order (the inverse permutation).
//!
//! Reference: transformers `models/qwen2_vl/modeling_qwen2_vl.py`,
//! `models/qwen2_5_vl/modeling_qwen2_5_vl.py` and `vision_utils.py`.
use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::config::VisionConfig;
use crate::model::linear::{FrozenLinear, LinearMode};
use crate::model::llama::linear;
use crate::model::weights::Weights;

/// The vision tower's module path in transformers 5 checkpoints.
pub const VISUAL: &str = "model.visual";

/// `torch.nn.LayerNorm` with weight and bias (Qwen2-VL), or Qwen2.5-VL's RMSNorm (weight only);
/// eps 1e-6 both.
pub(crate) struct LayerNorm {
    pub(crate) weight: Tensor,
    /// `None`: an RMSNorm.
    pub(crate) bias: Option<Tensor>,
    pub(crate) name: String,
}

impl LayerNorm {
    fn new(w: &mut Weights, path: &str, dim: i64, rms: bool, why: &str) -> Result<Self> {
        let weight = w.take(&format!("{path}.weight"), &[dim], why)?;
        let bias = if rms { None } else { Some(w.take(&format!("{path}.bias"), &[dim], why)?) };
        Ok(Self { weight, bias, name: path.into() })
    }

    /// The kind of norm, for `module_names`.
    fn what(&self) -> &'static str {
        if self.bias.is_some() {
            "a LayerNorm"
        } else {
            "an RMSNorm"
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(bias) => Ok(x.f_layer_norm(
                [self.weight.size()[0]],
                Some(&self.weight),
                Some(bias),
                1e-6,
                false,
            )?),
            // `Qwen2_5_VLRMSNorm`: the decoder's RMSNorm with eps 1e-6.
            None => crate::model::llama::rms_norm(x, &self.weight, 1e-6),
        }
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
    /// Qwen2-VL: `mlp.fc1`, `mlp.fc2`; Qwen2.5-VL: `mlp.gate_proj`, `mlp.up_proj`,
    /// `mlp.down_proj`.
    pub(crate) mlp: Vec<FrozenLinear>,
}

impl VisionBlock {
    fn linears(&self) -> impl Iterator<Item = &FrozenLinear> {
        [&self.qkv, &self.proj].into_iter().chain(self.mlp.iter())
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = &mut FrozenLinear> {
        [&mut self.qkv, &mut self.proj].into_iter().chain(self.mlp.iter_mut())
    }
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
        let (e, mlp, rms) = (cfg.embed_dim, cfg.mlp_hidden_dim(), cfg.qwen25);
        let (ek, ok) = cfg.width_keys();
        let ew = format!("vision_config.{ek}");
        let patch_embed = w.take(
            &format!("{VISUAL}.patch_embed.proj.weight"),
            &[e, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size],
            &format!(
                "vision_config: {ek}, in_channels, temporal_patch_size, patch_size, patch_size"
            ),
        )?;
        let mut blocks = Vec::with_capacity(cfg.depth as usize);
        for b in 0..cfg.depth {
            let p = format!("{VISUAL}.blocks.{b}");
            let lin = |w: &mut Weights, name: &str, out: i64, inp: i64, why: &str| {
                linear(w, &format!("{p}.{name}"), out, inp, true, why)
            };
            let mlp_layers = if cfg.qwen25 {
                let why_in = format!("vision_config.intermediate_size, {ek}");
                vec![
                    lin(w, "mlp.gate_proj", mlp, e, &why_in)?,
                    lin(w, "mlp.up_proj", mlp, e, &why_in)?,
                    lin(w, "mlp.down_proj", e, mlp, &format!("{ek}, intermediate_size"))?,
                ]
            } else {
                vec![
                    lin(w, "mlp.fc1", mlp, e, "embed_dim × mlp_ratio, embed_dim")?,
                    lin(w, "mlp.fc2", e, mlp, "embed_dim, embed_dim × mlp_ratio")?,
                ]
            };
            blocks.push(VisionBlock {
                norm1: LayerNorm::new(w, &format!("{p}.norm1"), e, rms, &ew)?,
                norm2: LayerNorm::new(w, &format!("{p}.norm2"), e, rms, &ew)?,
                qkv: lin(w, "attn.qkv", 3 * e, e, &format!("3 × {ew}, {ek}"))?,
                proj: lin(w, "attn.proj", e, e, &format!("{ew}, {ek}"))?,
                mlp: mlp_layers,
            });
        }
        let merged = e * cfg.spatial_merge_size * cfg.spatial_merge_size;
        let m = format!("{VISUAL}.merger");
        let ln_q = LayerNorm::new(w, &format!("{m}.ln_q"), e, rms, &ew)?;
        let merger_fc1 = linear(
            w,
            &format!("{m}.mlp.0"),
            merged,
            merged,
            true,
            &format!("{ek} × spatial_merge_size², same"),
        )?;
        let merger_fc2 = linear(
            w,
            &format!("{m}.mlp.2"),
            cfg.hidden_size,
            merged,
            true,
            &format!("vision_config.{ok}, {ek} × spatial_merge_size²"),
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
            if let Some(b) = &n.bias {
                out.push((format!("{}.bias", n.name), b.shallow_clone()));
            }
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
            for l in b.linears() {
                lin(&mut out, l);
            }
        }
        norm(&mut out, &self.ln_q);
        lin(&mut out, &self.merger_fc1);
        lin(&mut out, &self.merger_fc2);
        out
    }

    /// The linear layers in model order (each block's qkv, proj and MLP linears: fc1, fc2 for
    /// Qwen2-VL, gate_proj, up_proj, down_proj for Qwen2.5-VL; then the merger's).
    pub fn linears(&self) -> Vec<&FrozenLinear> {
        let mut out: Vec<&FrozenLinear> = self.blocks.iter().flat_map(|b| b.linears()).collect();
        out.extend([&self.merger_fc1, &self.merger_fc2]);
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut FrozenLinear> {
        let mut out: Vec<&mut FrozenLinear> = Vec::new();
        for b in &mut self.blocks {
            out.extend(b.linears_mut());
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
            out.push((b.norm1.name.clone(), b.norm1.what()));
            out.push((b.norm2.name.clone(), b.norm2.what()));
            out.push((format!("{p}.attn"), "a vision attention block"));
            out.push((b.qkv.name.clone(), "a linear layer"));
            out.push((b.proj.name.clone(), "a linear layer"));
            out.push((format!("{p}.mlp"), "a vision MLP"));
            if self.cfg.qwen25 {
                out.extend(b.mlp.iter().map(|l| (l.name.clone(), "a linear layer")));
                out.push((format!("{p}.mlp.act_fn"), "an activation"));
            } else {
                out.push((b.mlp[0].name.clone(), "a linear layer"));
                out.push((format!("{p}.mlp.act"), "an activation"));
                out.push((b.mlp[1].name.clone(), "a linear layer"));
            }
        }
        out.push((format!("{v}.merger"), "the patch merger"));
        out.push((self.ln_q.name.clone(), self.ln_q.what()));
        out.push((format!("{v}.merger.mlp"), "the merger MLP"));
        out.push((self.merger_fc1.name.clone(), "a linear layer"));
        out.push((format!("{v}.merger.mlp.1"), "an activation"));
        out.push((self.merger_fc2.name.clone(), "a linear layer"));
        out
    }

    /// Checks `pixel_values` `[sum t·h·w, C·T·P·P]` against `grids` (`[t, h, w]` in patches).
    pub fn check_inputs(&self, pixel_values: &Tensor, grids: &[[i64; 3]]) -> Result<()> {
        self.check_inputs_of(pixel_values, grids, "image")
    }

    /// [`VisionTower::check_inputs`] for `what` (`image`, `video`), named so in messages.
    fn check_inputs_of(&self, pixel_values: &Tensor, grids: &[[i64; 3]], what: &str) -> Result<()> {
        let m = self.cfg.spatial_merge_size;
        let (grid_key, pixels_key) = match what {
            "video" => ("video_grid_thw", "pixel_values_videos"),
            _ => ("image_grid_thw", "pixel_values"),
        };
        for (i, &[t, h, w]) in grids.iter().enumerate() {
            if t <= 0 || h <= 0 || w <= 0 || h % m != 0 || w % m != 0 {
                bail!("{what} {i}: {grid_key} [{t}, {h}, {w}] must be positive, with h and w multiples of spatial_merge_size {m}");
            }
        }
        let patches: i64 = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let want = [patches, self.cfg.patch_values()];
        if pixel_values.size() != want {
            bail!(
                "{pixels_key} must be [sum of t·h·w over the {what}s, in_channels·temporal_patch_size·patch_size²] = {want:?} for {grid_key} {grids:?}, got {:?}",
                pixel_values.size()
            );
        }
        Ok(())
    }

    /// Qwen2.5-VL's `get_vision_window_index`: the order of the merged tokens window by window
    /// (`window_index`, over all `grids` in turn) and the length in patches of each non-empty
    /// window (`cu_window_seqlens` differences). `None` for Qwen2-VL.
    pub fn window_index(&self, grids: &[[i64; 3]]) -> Option<(Vec<i64>, Vec<i64>)> {
        let win = self.cfg.merger_window()?;
        let m = self.cfg.spatial_merge_size;
        let unit = m * m;
        let (mut order, mut lens, mut base) = (Vec::new(), Vec::new(), 0i64);
        for &[t, h, w] in grids {
            let (lh, lw) = (h / m, w / m);
            // transformers pads each side up by a whole window more than needed: the extra
            // windows are empty and dropped (unique_consecutive of cu_window_seqlens).
            let (nh, nw) = (lh / win + 1, lw / win + 1);
            for ti in 0..t {
                for wh in 0..nh {
                    for ww in 0..nw {
                        let before = order.len();
                        for r in wh * win..((wh + 1) * win).min(lh) {
                            for c in ww * win..((ww + 1) * win).min(lw) {
                                order.push(base + ti * lh * lw + r * lw + c);
                            }
                        }
                        let n = (order.len() - before) as i64;
                        if n > 0 {
                            lens.push(n * unit);
                        }
                    }
                }
            }
            base += t * lh * lw;
        }
        Some((order, lens))
    }

    /// Embeddings `[sum t·h·w / m², hidden_size]` (model dtype) of images, in order.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        grids: &[[i64; 3]],
        mode: LinearMode<'_>,
    ) -> Result<Tensor> {
        self.forward_of(pixel_values, grids, mode, "image")
    }

    /// Embeddings of videos (`pixel_values_videos`, `video_grid_thw`), in order: the same
    /// tower, every temporal patch a frame.
    pub fn forward_videos(
        &self,
        pixel_values: &Tensor,
        grids: &[[i64; 3]],
        mode: LinearMode<'_>,
    ) -> Result<Tensor> {
        self.forward_of(pixel_values, grids, mode, "video")
    }

    fn forward_of(
        &self,
        pixel_values: &Tensor,
        grids: &[[i64; 3]],
        mode: LinearMode<'_>,
        what: &str,
    ) -> Result<Tensor> {
        self.check_inputs_of(pixel_values, grids, what)?;
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
        // and the frame lengths full attention is restricted to (`get_vision_cu_seqlens`).
        let m = c.spatial_merge_size;
        let unit = m * m;
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
        // Qwen2.5-VL: patches (and their positions) reordered window by window, merge unit by
        // merge unit (`permute_input_for_window_attn`); frames stay contiguous.
        let window = self.window_index(grids);
        let mut inverse = None;
        let windows = match &window {
            Some((order, lens)) => {
                let index = Tensor::f_from_slice(order)?.f_to_device(device)?;
                x = x.f_view([n / unit, unit, e])?.f_index_select(0, &index)?.f_view([n, e])?;
                let per_unit = (2 * unit) as usize;
                pos = order
                    .iter()
                    .flat_map(|&k| pos[k as usize * per_unit..(k as usize + 1) * per_unit].to_vec())
                    .collect();
                inverse = Some(index.f_argsort(0, false)?);
                lens.clone()
            }
            None => frames.clone(),
        };
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
            let segments = if c.full_attention_block(i as i64) { &frames } else { &windows };
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
                let mut outs = Vec::with_capacity(segments.len());
                let mut start = 0;
                for &len in segments {
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
                let h = b.norm2.forward(&x1)?;
                let out = match b.mlp.as_slice() {
                    [gate, up, down] => {
                        let g = self.act.forward(&gate.forward(&h, mode)?)?;
                        down.forward(&g.f_mul(&up.forward(&h, mode)?)?, mode)?
                    }
                    [fc1, fc2] => fc2.forward(&self.act.forward(&fc1.forward(&h, mode)?)?, mode)?,
                    other => bail!("a vision MLP has {} linear layers", other.len()),
                };
                Ok(x1.f_add(&out)?)
            };
            x = block().with_context(|| format!("{VISUAL}.blocks.{i}"))?;
        }
        let merger = || -> Result<Tensor> {
            let merged = self.ln_q.forward(&x)?.f_view([-1, e * m * m])?;
            let h = self.merger_fc1.forward(&merged, mode)?.f_gelu("none")?;
            let out = self.merger_fc2.forward(&h, mode)?;
            Ok(match &inverse {
                Some(inv) => out.f_index_select(0, inv)?,
                None => out,
            })
        };
        merger().with_context(|| format!("{VISUAL}.merger"))
    }
}
