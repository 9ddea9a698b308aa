//! `ferrotune eval CONFIG`: a run's held-out numbers, for the base model and for a trained
//! adapter: the eval loss of the config's objective over a split (the `test` split by
//! default), through the trainer's own eval step, and with `--generate` the mean score of
//! each reward plugin over completions generated for the split's prompts (their images
//! included), through the same generation path as GRPO.
//!
//! ```text
//! ferrotune eval examples/story_lora_demo.yaml --adapter target/demo/story-lora --with-base \
//!     --generate --reward story_grounding
//! ```
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferrotune_plugin_api::kinds::objective::PROMPT_ROWS;
use ferrotune_plugin_api::{Batch, ObjectiveContext, RewardInput};
use serde_json::{json, Value};

use crate::data::layout::{Item, Layout};
use crate::plugins::Registry;
use crate::train::config::{OnBadSample, RewardSection, TrainConfig};
use crate::train::context::{load_rewards, BatchContext};
use crate::train::Run;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The run's YAML config (model, adapter section, objective, data).
    pub config: PathBuf,
    /// A trained adapter directory (what `train` wrote in output_dir); without it, the base
    /// model.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// With --adapter: evaluate the base model too, first (a table of both).
    #[arg(long)]
    pub with_base: bool,
    /// The data set split to evaluate on (the config's `data.split` is the training one).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Also generate a completion for each row's prompt and score it with the reward plugins.
    #[arg(long)]
    pub generate: bool,
    /// A reward plugin to score completions with (repeat for several; default: the config's
    /// `rewards:` list). Implies --generate.
    #[arg(long = "reward", value_name = "PLUGIN")]
    pub rewards: Vec<String>,
    /// Longest completion (within `data.cutoff_len`).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// One JSON line per model instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// The numbers of one model on the split.
#[derive(Debug, Clone)]
pub struct EvalReport {
    pub model: String,
    pub rows: usize,
    pub eval_loss: f64,
    /// The objective's eval metrics (`mean_token_accuracy`, …).
    pub metrics: Vec<(String, f64)>,
    /// Each reward plugin's mean score over the generated completions, in config order.
    pub rewards: Vec<(String, f64)>,
    pub completions: usize,
}

impl EvalReport {
    pub fn json(&self) -> Value {
        let mut v = json!({
            "model": self.model,
            "rows": self.rows,
            "eval_loss": self.eval_loss,
            "completions": self.completions,
        });
        for (k, x) in &self.metrics {
            v[format!("eval/{k}")] = json!(x);
        }
        for (k, x) in &self.rewards {
            v[format!("reward/{k}")] = json!(x);
        }
        v
    }
}

pub fn run(a: &EvalArgs, registry: &Registry) -> Result<()> {
    let base = TrainConfig::from_file(&a.config)?;
    let rewards = reward_sections(a, &base)?;
    let mut models: Vec<Option<PathBuf>> = Vec::new();
    if a.adapter.is_none() || a.with_base {
        models.push(None);
    }
    models.extend(a.adapter.clone().map(Some));
    let mut reports = Vec::new();
    for adapter in models {
        let report = evaluate(a, &base, &rewards, adapter.as_ref(), registry)?;
        if a.json {
            println!("{}", report.json());
        }
        reports.push(report);
    }
    if !a.json {
        print_table(&reports, &a.split);
    }
    Ok(())
}

/// The reward plugins to score with: `--reward`, else the config's `rewards:` with --generate.
fn reward_sections(a: &EvalArgs, cfg: &TrainConfig) -> Result<Vec<RewardSection>> {
    if !a.rewards.is_empty() {
        return Ok(a
            .rewards
            .iter()
            .map(|plugin| RewardSection {
                plugin: plugin.clone(),
                model: None,
                adapter: None,
                weight: 1.0,
                name: None,
                config: Default::default(),
            })
            .collect());
    }
    if a.generate && cfg.rewards.is_empty() {
        bail!(
            "--generate scores completions with reward plugins, and {} has no `rewards:` list; name one with --reward PLUGIN",
            a.config.display()
        );
    }
    Ok(if a.generate { cfg.rewards.clone() } else { Vec::new() })
}

/// One model's numbers: the config read with the split as its data (no eval share, no
/// packing, no steps), `adapter_init` = the adapter.
fn evaluate(
    a: &EvalArgs,
    base: &TrainConfig,
    rewards: &[RewardSection],
    adapter: Option<&PathBuf>,
    registry: &Registry,
) -> Result<EvalReport> {
    let mut cfg = base.clone();
    cfg.data.split = a.split.clone();
    cfg.data.eval_ratio = 0.0;
    cfg.data.packing = false;
    cfg.adapter_init = adapter.cloned();
    // Reward plugins are loaded here, not by the run: an objective that does not generate
    // refuses them.
    cfg.rewards.clear();
    let model = match adapter {
        Some(dir) => format!("adapter {}", dir.display()),
        None => "base model".to_string(),
    };
    let mut run = Run::setup(&cfg, registry, None)
        .with_context(|| format!("setting up the {model} on split `{}`", a.split))?;
    let (eval_loss, metrics) = run.evaluate_all()?;
    let rows = run.data_rows();
    let mut report =
        EvalReport { model, rows, eval_loss, metrics, rewards: Vec::new(), completions: 0 };
    if !rewards.is_empty() {
        let mut scored = cfg.clone();
        scored.rewards = rewards.to_vec();
        let loaded = load_rewards(&scored, registry)?;
        let (scores, n) = reward_means(a, &cfg, &run, &loaded, registry)?;
        report.rewards = scores;
        report.completions = n;
    }
    Ok(report)
}

/// Generates one completion per prompt of the split (its images included) and returns each
/// reward plugin's mean score, and the number of completions.
fn reward_means(
    a: &EvalArgs,
    cfg: &TrainConfig,
    run: &Run<'_>,
    rewards: &[crate::train::LoadedReward],
    registry: &Registry,
) -> Result<(Vec<(String, f64)>, usize)> {
    let ctx = run.policy(rewards);
    let tok = ctx.tokenizer;
    let mut prompt_cfg = cfg.clone();
    prompt_cfg.data.on_bad_sample = OnBadSample::Skip;
    let prepared = crate::train::data::prepare_data(
        &prompt_cfg,
        registry,
        tok,
        run.image_prep(),
        Layout::Prompts,
    )?;
    if prepared.items.is_empty() {
        bail!("no row of split `{}` of {} has a usable prompt", a.split, cfg.data.path.display());
    }
    let options = |rows: usize| {
        json!({
            "max_new_tokens": a.max_new_tokens,
            "temperature": a.temperature,
            "seed": a.seed,
            PROMPT_ROWS: (0..rows).collect::<Vec<_>>(),
        })
    };
    let mut sums = vec![0f64; rewards.len()];
    let mut n = 0usize;
    for chunk in prepared.items.chunks(cfg.training.micro_batch_size.max(1)) {
        let items: Vec<&Item> = chunk.iter().map(|(_, i)| i).collect();
        let (tensors, meta) =
            crate::data::collate(Layout::Prompts, &items, run.pad_id(), run.image_prep())?;
        let batch = Batch {
            tensors: crate::train::step::on_device(tensors, run.device())?,
            meta_json: Value::Object(meta).to_string(),
        };
        let rows: Vec<(&Vec<i64>, &String, &Value)> = items
            .iter()
            .map(|i| match i {
                Item::Prompt { ids, text, sample, .. } => Ok((ids, text, sample)),
                _ => bail!("internal: a row of another layout among the prompts"),
            })
            .collect::<Result<_>>()?;
        let prompts: Vec<Vec<i64>> = rows.iter().map(|(ids, _, _)| (*ids).clone()).collect();
        let batch_ctx = BatchContext::new(&ctx, &batch);
        let completions =
            tch::no_grad(|| batch_ctx.generate(&prompts, &options(prompts.len()).to_string()))?;
        let mut inputs = Vec::with_capacity(rows.len());
        for ((_, text, sample), completion) in rows.iter().zip(&completions) {
            inputs.push(RewardInput {
                prompt: (*text).clone(),
                completion: ctx.decode(completion)?,
                sample_json: sample.to_string(),
            });
        }
        for (k, scores) in ctx.rewards(&inputs)?.into_iter().enumerate() {
            sums[k] += scores.scores.iter().sum::<f64>();
        }
        n += inputs.len();
    }
    let means = rewards.iter().zip(sums).map(|(r, s)| (r.name.clone(), s / n as f64)).collect();
    Ok((means, n))
}

fn print_table(reports: &[EvalReport], split: &str) {
    let Some(first) = reports.first() else { return };
    let reward_names: Vec<&str> = first.rewards.iter().map(|(k, _)| k.as_str()).collect();
    let width = reports.iter().map(|r| r.model.len()).max().unwrap_or(0).max(10);
    let mut header = format!("{:<width$}  {:>10}", format!("split `{split}`"), "eval loss");
    for name in &reward_names {
        header.push_str(&format!("  {name:>w$}", w = name.len().max(8)));
    }
    println!("{header}");
    for r in reports {
        let mut line = format!("{:<width$}  {:>10.4}", r.model, r.eval_loss);
        for (name, (_, v)) in reward_names.iter().zip(&r.rewards) {
            line.push_str(&format!("  {v:>w$.4}", w = name.len().max(8)));
        }
        println!("{line}");
    }
    println!(
        "({} rows; eval loss through the trainer's eval step{})",
        first.rows,
        if reward_names.is_empty() {
            String::new()
        } else {
            format!(
                "; rewards: the mean over {} generated completions, one per prompt",
                first.completions
            )
        }
    );
}
