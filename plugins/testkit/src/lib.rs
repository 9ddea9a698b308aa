//! The test kit: one small, real plugin of every kind, used by the boundary tests, the
//! `selfcheck` verb and the demo. Not meant for training runs: the production plugins
//! (lora, sft, …) live in their own crates.
use ferrotune_plugin_api::prelude::*;
use serde::Deserialize;
use std::io::BufRead;

// ---------------------------------------------------------------- adapter

/// `y = base(x) + (alpha / rank) · x Aᵀ Bᵀ`, with both A and B random (unlike LoRA's
/// zero B) so that gradients reach both from the first step.
pub struct LowRank {
    cfg: LowRankConfig,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct LowRankConfig {
    /// Rank of the update; default 2.
    #[serde(default = "default_rank")]
    rank: i64,
    /// Scale numerator; default = rank (scale 1).
    alpha: Option<f64>,
    /// Layer-name suffixes to adapt; empty = every linear layer.
    #[serde(default)]
    target_modules: Vec<String>,
}

fn default_rank() -> i64 {
    2
}

impl Plugin for LowRank {
    const NAME: &'static str = "testkit-lowrank";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "test adapter: trainable low-rank update with random A and B";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: LowRankConfig = parse_config(config_json)?;
        if cfg.rank < 1 {
            return Err(PluginError::config(
                "rank",
                format!("must be at least 1, got {}", cfg.rank),
            ));
        }
        Ok(Self { cfg })
    }
}

impl AdapterMethod for LowRank {
    fn targets(&self, module: &str) -> PluginResult<bool> {
        Ok(self.cfg.target_modules.is_empty()
            || self.cfg.target_modules.iter().any(|t| module.ends_with(t.as_str())))
    }
    fn adapt_linear(
        &self,
        _module: &str,
        base: &dyn BaseLinear,
    ) -> PluginResult<Box<dyn AdapterLayer>> {
        let w = base.weight()?;
        let (out_f, in_f) = base.shape()?;
        let opts = (w.kind(), w.device());
        let r = self.cfg.rank;
        let a = (Tensor::f_randn([r, in_f], opts)? * (1.0 / (in_f as f64).sqrt()))
            .set_requires_grad(true);
        let b = (Tensor::f_randn([out_f, r], opts)? * 0.1).set_requires_grad(true);
        let scale = self.cfg.alpha.unwrap_or(r as f64) / r as f64;
        Ok(Box::new(LowRankLayer { a, b, scale }))
    }
    fn peft_config(&self) -> PluginResult<String> {
        Ok(serde_json::json!({
            "peft_type": "TESTKIT_LOWRANK",
            "r": self.cfg.rank,
            "alpha": self.cfg.alpha.unwrap_or(self.cfg.rank as f64),
            "target_modules": self.cfg.target_modules,
        })
        .to_string())
    }
    fn capabilities(&self) -> Vec<String> {
        vec!["merge".into()]
    }
}

struct LowRankLayer {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl LowRankLayer {
    fn delta(&self) -> PluginResult<Tensor> {
        Ok(self.b.f_matmul(&self.a)? * self.scale)
    }
}

impl AdapterLayer for LowRankLayer {
    fn forward(&self, x: &Tensor, base: &dyn BaseLinear, _train: bool) -> PluginResult<Tensor> {
        let y = base.forward(x)?;
        let update = x.f_matmul(&self.a.tr())?.f_matmul(&self.b.tr())? * self.scale;
        Ok(y.f_add(&update)?)
    }
    fn parameters(&self) -> PluginResult<Vec<TrainParam>> {
        Ok(vec![
            TrainParam::new("lowrank_A.weight", self.a.shallow_clone()),
            TrainParam::new("lowrank_B.weight", self.b.shallow_clone()),
        ])
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        Ok(vec![
            ("lowrank_A.weight".into(), self.a.detach().copy()),
            ("lowrank_B.weight".into(), self.b.detach().copy()),
        ])
    }
    fn load_state_dict(&self, tensors: Vec<(String, Tensor)>) -> PluginResult<()> {
        for (name, t) in tensors {
            let dst = match name.as_str() {
                "lowrank_A.weight" => &self.a,
                "lowrank_B.weight" => &self.b,
                other => {
                    return Err(PluginError::invalid(format!(
                        "unexpected tensor `{other}` in adapter state"
                    )))
                }
            };
            if dst.size() != t.size() {
                return Err(PluginError::invalid(format!(
                    "`{name}`: shape {:?}, expected {:?}",
                    t.size(),
                    dst.size()
                )));
            }
            tch::no_grad(|| dst.shallow_clone().f_copy_(&t))?;
        }
        Ok(())
    }
    fn merged_weight(&self, base_weight: &Tensor) -> PluginResult<Tensor> {
        tch::no_grad(|| -> PluginResult<Tensor> {
            Ok(base_weight.f_add(&self.delta()?.f_to_kind(base_weight.kind())?)?)
        })
    }
    fn unmerged_weight(&self, merged_weight: &Tensor) -> PluginResult<Tensor> {
        tch::no_grad(|| -> PluginResult<Tensor> {
            Ok(merged_weight.f_sub(&self.delta()?.f_to_kind(merged_weight.kind())?)?)
        })
    }
}

// ---------------------------------------------------------------- quantizer

/// Stores frozen weights in bfloat16 (half the bytes of fp32) and computes in the input's dtype.
pub struct Bf16Storage;

impl Plugin for Bf16Storage {
    const NAME: &'static str = "testkit-bf16";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "test quantizer: keeps frozen weights in bfloat16";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Empty {}
        let _: Empty = parse_config(config_json)?;
        Ok(Self)
    }
}

impl Quantizer for Bf16Storage {
    fn quantize(&self, _module: &str, weight: &Tensor) -> PluginResult<Box<dyn QuantizedWeight>> {
        Ok(Box::new(Bf16Weight(weight.detach().f_to_kind(Kind::BFloat16)?)))
    }
}

struct Bf16Weight(Tensor);

impl QuantizedWeight for Bf16Weight {
    fn shape(&self) -> PluginResult<Vec<i64>> {
        Ok(self.0.size())
    }
    fn dequantize(&self, dtype: Kind) -> PluginResult<Tensor> {
        Ok(self.0.f_to_kind(dtype)?)
    }
    fn linear(&self, x: &Tensor) -> PluginResult<Tensor> {
        Ok(x.f_matmul(&self.0.f_to_kind(x.kind())?.tr())?)
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        Ok(vec![("weight".into(), self.0.shallow_clone())])
    }
    fn storage_bytes(&self) -> PluginResult<u64> {
        Ok((self.0.numel() * 2) as u64)
    }
}

// ---------------------------------------------------------------- objective

/// Next-token cross-entropy over positions whose label is not -100, summed and divided by
/// the number of such tokens.
pub struct MaskedCrossEntropy;

impl Plugin for MaskedCrossEntropy {
    const NAME: &'static str = "testkit-masked-ce";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "test objective: masked next-token cross-entropy";
    fn from_config(_config_json: &str) -> PluginResult<Self> {
        Ok(Self)
    }
}

impl Objective for MaskedCrossEntropy {
    fn loss(&mut self, batch: &Batch, ctx: &dyn ObjectiveContext) -> PluginResult<LossOutput> {
        let input_ids = batch.get("input_ids")?;
        let labels = batch.get("labels")?;
        let out = ctx
            .forward(&[("input_ids".to_string(), input_ids.shallow_clone())], ForwardFlags::NONE)?;
        let logits = out
            .into_iter()
            .find(|(n, _)| n == "logits")
            .map(|(_, t)| t)
            .ok_or_else(|| PluginError::invalid("model forward returned no `logits`"))?;
        let (b, t, v) = logits.size3()?;
        let shifted = logits.f_narrow(1, 0, t - 1)?.f_reshape([b * (t - 1), v])?;
        let targets = labels.f_narrow(1, 1, t - 1)?.f_reshape([b * (t - 1)])?;
        let num_items = targets.f_ne(-100)?.f_sum(Kind::Int64)?.int64_value(&[]);
        let loss_sum = shifted.f_log_softmax(-1, Kind::Float)?.f_nll_loss::<Tensor>(
            &targets,
            None,
            tch::Reduction::Sum,
            -100,
        )?;
        let loss = loss_sum / (num_items.max(1) as f64);
        let value = loss.double_value(&[]);
        Ok(LossOutput { loss, num_items, metrics: vec![("loss".into(), value)] })
    }
}

// ---------------------------------------------------------------- reward

/// `per_char · len(completion)` (characters).
pub struct LengthReward {
    per_char: f64,
}

impl Plugin for LengthReward {
    const NAME: &'static str = "testkit-length";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "test reward: proportional to completion length";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Cfg {
            #[serde(default = "one")]
            per_char: f64,
        }
        fn one() -> f64 {
            1.0
        }
        let cfg: Cfg = parse_config(config_json)?;
        if !cfg.per_char.is_finite() {
            return Err(PluginError::config("per_char", "must be finite"));
        }
        Ok(Self { per_char: cfg.per_char })
    }
}

impl Reward for LengthReward {
    fn score(&self, inputs: &[RewardInput]) -> PluginResult<Vec<f64>> {
        Ok(inputs.iter().map(|i| i.completion.chars().count() as f64 * self.per_char).collect())
    }
}

/// Misbehaves on purpose, to prove the boundary contains it: panics when scoring (or when
/// built, with `{"panic_in_config": true}`), or returns a wrong number of scores or NaN.
pub struct Misbehaving {
    mode: String,
}

impl Plugin for Misbehaving {
    const NAME: &'static str = "testkit-misbehaving";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "test reward that panics or answers wrongly, for boundary tests";
    fn from_config(config_json: &str) -> PluginResult<Self> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Cfg {
            #[serde(default)]
            panic_in_config: bool,
            /// `panic` (default), `wrong_count` or `nan`.
            #[serde(default)]
            mode: Option<String>,
        }
        let cfg: Cfg = parse_config(config_json)?;
        if cfg.panic_in_config {
            panic!("asked to panic while reading its config");
        }
        Ok(Self { mode: cfg.mode.unwrap_or_else(|| "panic".into()) })
    }
}

impl Reward for Misbehaving {
    fn score(&self, inputs: &[RewardInput]) -> PluginResult<Vec<f64>> {
        match self.mode.as_str() {
            "wrong_count" => Ok(vec![0.0; inputs.len() + 1]),
            "nan" => Ok(vec![f64::NAN; inputs.len()]),
            _ => {
                let v: Vec<f64> = Vec::new();
                // An index out of bounds: a real bug's panic, not a `panic!` call.
                Ok(vec![v[inputs.len()]])
            }
        }
    }
}

// ---------------------------------------------------------------- dataset

/// JSON Lines, one canonical sample per line (`{"messages": [...], "images": [...]}`).
pub struct JsonlSamples;

impl Plugin for JsonlSamples {
    const NAME: &'static str = "testkit-jsonl";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "test dataset: canonical samples as JSON lines";
    fn from_config(_config_json: &str) -> PluginResult<Self> {
        Ok(Self)
    }
}

impl DatasetFormat for JsonlSamples {
    fn open(&self, source: &DataSource) -> PluginResult<Box<dyn SampleReader>> {
        let file = std::fs::File::open(&source.path)
            .map_err(|e| PluginError::invalid(format!("{}: {e}", source.path)))?;
        let mut samples = Vec::new();
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line =
                line.map_err(|e| PluginError::runtime(format!("{}:{}: {e}", source.path, i + 1)))?;
            if line.trim().is_empty() {
                continue;
            }
            let s: Sample = serde_json::from_str(&line)
                .map_err(|e| PluginError::invalid(format!("{}:{}: {e}", source.path, i + 1)))?;
            samples.push(s);
        }
        Ok(Box::new(SampleList(samples)))
    }
}

// ---------------------------------------------------------------- memory

/// Plain SGD on one device (gradients averaged across ranks when there are several),
/// with optional global-norm clipping and decoupled weight decay.
pub struct Sgd {
    params: Vec<TrainParam>,
    clip: Option<f64>,
    weight_decay: f64,
}

impl Plugin for Sgd {
    const NAME: &'static str = "testkit-sgd";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "test memory strategy: SGD with clipping";
    fn from_config(_config_json: &str) -> PluginResult<Self> {
        Ok(Self { params: Vec::new(), clip: None, weight_decay: 0.0 })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SgdOptions {
    #[serde(default)]
    max_grad_norm: Option<f64>,
    #[serde(default)]
    weight_decay: f64,
}

impl MemoryStrategy for Sgd {
    fn setup(
        &mut self,
        params: Vec<TrainParam>,
        optimizer_json: &str,
        _device: Device,
        _comm: &dyn Collectives,
    ) -> PluginResult<()> {
        let opts: SgdOptions = parse_config(optimizer_json)?;
        self.params = params;
        self.clip = opts.max_grad_norm;
        self.weight_decay = opts.weight_decay;
        Ok(())
    }
    fn step(&mut self, lr: f64, comm: &dyn Collectives) -> PluginResult<StepReport> {
        let grads: Vec<Option<Tensor>> = self
            .params
            .iter()
            .map(|p| {
                let g = p.tensor.grad();
                g.defined().then_some(g)
            })
            .collect();
        if comm.world_size() > 1 {
            for g in grads.iter().flatten() {
                comm.all_reduce(g, ReduceOp::AVG)?;
            }
        }
        let mut sq = 0.0;
        for g in grads.iter().flatten() {
            sq += g.f_pow_tensor_scalar(2)?.f_sum(Kind::Double)?.double_value(&[]);
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            self.zero_grad()?;
            return Ok(StepReport { grad_norm: norm, skipped: true, metrics: vec![] });
        }
        let clip_coef = match self.clip {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        tch::no_grad(|| -> PluginResult<()> {
            for (p, g) in self.params.iter().zip(&grads) {
                let Some(g) = g else { continue };
                let plr = lr * p.lr_scale;
                let mut t = p.tensor.shallow_clone();
                if self.weight_decay != 0.0 {
                    let _ =
                        t.f_mul_scalar_(1.0 - plr * self.weight_decay * p.weight_decay_scale)?;
                }
                let _ = t.f_sub_(&(g * (plr * clip_coef)))?;
            }
            Ok(())
        })?;
        self.zero_grad()?;
        Ok(StepReport {
            grad_norm: norm,
            skipped: false,
            metrics: vec![("clip_coef".into(), clip_coef)],
        })
    }
    fn zero_grad(&mut self) -> PluginResult<()> {
        ferrotune_plugin_api::optim::zero_grads(self.params.iter().map(|p| &p.tensor))
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        Ok(Vec::new()) // SGD without momentum has no state.
    }
    fn load_state_dict(&mut self, state: Vec<(String, Tensor)>) -> PluginResult<()> {
        match state.first() {
            None => Ok(()),
            Some((name, _)) => Err(PluginError::invalid(format!("SGD has no state, got `{name}`"))),
        }
    }
}

export_plugin!(
    adapter: LowRank,
    quantizer: Bf16Storage,
    objective: MaskedCrossEntropy,
    reward: LengthReward,
    reward: Misbehaving,
    dataset: JsonlSamples,
    memory: Sgd,
);
