//! The `ferrotune` command line: [`args`] holds what clap parses, [`run`] hands each verb to
//! the library function that does its work and prints what it returns.
pub mod args;
pub mod data;
pub mod eval;
pub mod import;
pub mod info;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::plugins::{Registry, SearchPath};
use crate::{device, selfcheck};
use args::{
    BenchCommand, BenchTrainArgs, Cli, Command, DataCommand, GenerateArgs, LaunchArgs, MergeArgs,
    ServeArgs,
};

/// Runs one command line; `Ok` carries the exit status of a command that can fail a check.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let search = SearchPath::from_env(&cli.global.plugin_dirs);
    let plugin_args = || -> Vec<String> {
        cli.global
            .plugin_dirs
            .iter()
            .flat_map(|d| ["--plugin-dir".to_string(), d.display().to_string()])
            .collect()
    };
    match cli.command {
        Command::Plugins { json } => {
            let registry = Registry::discover(&search);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info::plugins_json(&search, &registry))?
                );
            } else {
                info::print_plugins(&search, &registry);
            }
        }
        Command::Doctor => {
            for (k, v) in device::doctor_report() {
                println!("{k:<26} {v}");
            }
        }
        Command::Selfcheck { device } => {
            let device = device::resolve(&device)?;
            let report = selfcheck::run(&Registry::discover(&search), device)?;
            for line in report.lines() {
                println!("{line}");
            }
            return Ok(if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        Command::DistCheck(a) => {
            let opts = crate::dist::check::CheckOptions {
                backend: a.backend,
                device: a.device,
                numel: a.numel,
                iters: a.iters,
            };
            let report = crate::dist::check::run(&opts)?;
            println!("{}", serde_json::to_string(&report.json)?);
            return Ok(if report.passed { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        Command::InitModel(a) => info::init_model(*a)?,
        Command::Launch(a) => launch(*a, plugin_args())?,
        Command::Train { config, resume, overwrite_output_dir } => {
            train(&config, resume, overwrite_output_dir, &search)?
        }
        Command::Generate(a) => generate(&a, &search)?,
        Command::Eval(a) => eval::run(&a, &Registry::discover(&search))?,
        Command::Merge(a) => merge(&a, &search)?,
        Command::Serve(a) => serve(*a, search)?,
        Command::Board(a) => crate::board::board(crate::board::BoardOptions {
            runs: a.runs,
            models: a.models,
            data: a.data,
            host: a.host,
            port: a.port,
            token: a.token,
            device: a.dev.device()?,
            dtype: a.dev.dtype()?,
            plugin_args: plugin_args(),
            search,
        })?,
        Command::Bench { what } => bench(what, &search, plugin_args())?,
        Command::Data { what: DataCommand::Preview(a) } => {
            data::preview(&Registry::discover(&search), &a)?
        }
        Command::Data { what: DataCommand::Check { config, json } } => {
            return data::check(&Registry::discover(&search), &config, json);
        }
        Command::Config { what: args::ConfigCommand::Import(a) } => import::run(&a)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn launch(a: LaunchArgs, mut args: Vec<String>) -> Result<()> {
    let timeout = match a.timeout {
        Some(t) if t > 0.0 && t.is_finite() => Some(std::time::Duration::from_secs_f64(t)),
        Some(t) => bail!("--timeout must be a positive number of seconds, got {t}"),
        None => None,
    };
    args.extend(a.command);
    crate::dist::launch::launch(&crate::dist::launch::LaunchOptions {
        nproc: a.nproc,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: a.master_addr,
        master_port: a.master_port,
        args,
        timeout,
    })
}

fn train(
    config: &std::path::Path,
    resume: Option<String>,
    overwrite_output_dir: bool,
    search: &SearchPath,
) -> Result<()> {
    // An LLaMA-Factory YAML (model_name_or_path, stage, …; no `model:`) is translated first.
    let (mut cfg, resume) = match import::translate_if_llamafactory(config)? {
        Some((cfg, lf_resume)) => (cfg, resume.or(lf_resume)),
        None => (crate::train::config::TrainConfig::from_file(config)?, resume),
    };
    cfg.training.overwrite_output_dir |= overwrite_output_dir;
    let registry = Registry::discover(search);
    let resume = resume.map(|r| {
        if r == "latest" {
            crate::train::Resume::Latest
        } else {
            crate::train::Resume::Path(r.into())
        }
    });
    let summary = crate::train::train(&cfg, &registry, resume)?;
    eprintln!(
        "done: {} steps, loss {:.4} -> {:.4}{}; {} in {}",
        summary.steps,
        summary.first_loss.unwrap_or(f64::NAN),
        summary.last_loss.unwrap_or(f64::NAN),
        summary.eval_loss.map(|l| format!(", eval loss {l:.4}")).unwrap_or_default(),
        match cfg.finetuning() {
            crate::train::config::Finetuning::Adapter => "adapter",
            _ => "model",
        },
        summary.output_dir.display()
    );
    Ok(())
}

fn generate(a: &GenerateArgs, search: &SearchPath) -> Result<()> {
    let mut generator =
        crate::generate::pipeline::TextGenerator::load(&a.model, a.dev.device()?, a.dev.dtype()?)?;
    if let Some(dir) = &a.adapter {
        let report = generator.apply_adapter(dir, &Registry::discover(search))?;
        tracing::info!("{}", report.summary());
    }
    if let Some(max) = a.max_image_pixels {
        match generator.images.as_mut() {
            Some(prep) if max >= 1 => prep.max_image_pixels = Some(max),
            Some(_) => bail!("--max-image-pixels must be at least 1"),
            None => bail!(
                "--max-image-pixels needs a vision-language model; {} has no vision tower",
                a.model.display()
            ),
        }
    }
    let prompt = generator.prompt_with_media(
        &a.prompt,
        &a.images,
        &a.videos,
        a.chat,
        a.system.as_deref(),
    )?;
    let choice = crate::generate::pipeline::SamplingChoice {
        greedy: a.greedy,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        max_new_tokens: a.max_new_tokens,
        seed: a.seed,
    };
    let params = generator.sampling_params(&choice);
    let prompts = [prompt.ids];
    let out = match a.logprobs {
        Some(k) => {
            generator.complete_with_logprobs(&prompts, prompt.images.as_ref(), &params, k)?
        }
        None => generator.complete_mm(&prompts, prompt.images.as_ref(), &params)?,
    }
    .remove(0);
    if a.json {
        let mut json = serde_json::json!({"text": out.text, "token_ids": out.token_ids});
        if a.logprobs.is_some() {
            let entry = |id: i64, lp: f32| serde_json::json!({"token_id": id, "token": generator.token_text(id), "logprob": lp});
            json["logprobs"] = out
                .logprobs
                .iter()
                .map(|t| {
                    let mut e = entry(t.token_id, t.logprob);
                    e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                    e
                })
                .collect();
        }
        println!("{json}");
    } else {
        println!("{}", out.text);
    }
    Ok(())
}

fn merge(a: &MergeArgs, search: &SearchPath) -> Result<()> {
    use crate::peft::{merge, non_lora};
    let opts = merge::MergeOptions {
        model: a.model.clone(),
        adapter: a.adapter.clone(),
        out: a.out.clone(),
        device: device::resolve(&a.device)?,
        dtype: a.dtype.as_deref().map(crate::model::init::parse_dtype).transpose()?,
        merge_base: a.merge_base,
    };
    let report = merge::merge(&opts, &Registry::discover(search))?;
    if !report.restored.is_empty() {
        println!(
            "restored {} full weight(s) trained beside the adapter ({})",
            report.restored.len(),
            non_lora::NON_LORA_FILE
        );
    }
    if let Some((record, error)) = &report.quantized {
        println!(
            "quantized run ({} on {} modules): merged into the {} base; logits vs the adapter-applied quantized model on {} probe tokens: max |diff| {:.3e}, mean |diff| {:.3e}",
            record.quantization.plugin,
            record.modules.len(),
            error.merge_base,
            error.probe_tokens,
            error.max_abs_logit_diff,
            error.mean_abs_logit_diff
        );
        println!("{}", serde_json::json!({"merge_error": error}));
    }
    println!(
        "merged {} ({} module(s){}) into {}: wrote {}",
        a.adapter.display(),
        report.merged.len(),
        if report.untied_lm_head { "; lm_head untied from the embeddings" } else { "" },
        a.model.display(),
        a.out.display()
    );
    tracing::info!("{}", report.attach.summary());
    Ok(())
}

fn serve(a: ServeArgs, search: SearchPath) -> Result<()> {
    let adapters = a
        .adapters
        .iter()
        .map(|s| match s.split_once('=') {
            Some((n, d)) if !n.is_empty() && !d.is_empty() => Ok((n.to_string(), PathBuf::from(d))),
            _ => bail!("--adapter `{s}`: expected NAME=DIR"),
        })
        .collect::<Result<Vec<_>>>()?;
    crate::serve::serve(crate::serve::ServeOptions {
        model: a.model,
        adapters,
        adapter_dir: a.adapter_dir,
        host: a.host,
        port: a.port,
        api_key: a.api_key,
        max_batch: a.max_batch,
        max_adapters: a.max_adapters,
        adapter_grace: std::time::Duration::from_secs(a.adapter_grace_secs),
        max_tokens_limit: a.max_tokens_limit,
        max_body_bytes: a.max_body_bytes,
        max_images: a.max_images,
        max_videos: a.max_videos,
        video_dir: a.video_dir,
        image_max_pixels: a.image_max_pixels,
        max_image_pixels: a.max_image_pixels,
        image_workers: a
            .image_workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get().min(4))),
        image_timeout: std::time::Duration::from_secs(a.image_timeout_secs),
        connections: crate::serve::listener::ConnLimits {
            max_connections: a.max_connections,
            header_timeout: std::time::Duration::from_secs(a.header_timeout_secs),
        },
        served_model_name: a.served_model_name,
        device: a.dev.device()?,
        dtype: a.dev.dtype()?,
        search,
    })
}

fn bench(what: BenchCommand, search: &SearchPath, plugin_args: Vec<String>) -> Result<()> {
    let result = match what {
        BenchCommand::Generate { model, batch, prompt_len, new_tokens, repeats, dev } => {
            let model = crate::peft::PeftModel::new(crate::model::CausalLM::load(
                &model,
                dev.device()?,
                dev.dtype()?,
            )?);
            let opts = crate::bench::GenerateBench { batch, prompt_len, new_tokens, repeats };
            serde_json::to_string(&crate::bench::bench_generate(&model, &opts)?)?
        }
        BenchCommand::Serve { model, requests, prompt_len, new_tokens, rank, repeats, dev } => {
            let opts =
                crate::serve::bench::ServeBench { requests, prompt_len, new_tokens, rank, repeats };
            let result = crate::serve::bench::bench_serve(
                &model,
                &Registry::discover(search),
                dev.device()?,
                dev.dtype()?,
                &opts,
            )?;
            serde_json::to_string(&result)?
        }
        BenchCommand::Train(a) => bench_train(&a, search)?,
        BenchCommand::Memory {
            model,
            work,
            steps,
            micro_batch_size,
            ranks,
            ckpt_model,
            ckpt_batch,
            ckpt_seq_len,
            finetuning,
            gradient_checkpointing,
        } => {
            let exe = std::env::current_exe().context("cannot find this ferrotune binary")?;
            let opts = crate::bench::memory::MemoryBench {
                model,
                work,
                steps,
                micro_batch_size,
                ranks,
                ckpt_model,
                ckpt_batch,
                ckpt_seq_len,
                plugin_args,
                full: match finetuning.as_str() {
                    "adapter" => false,
                    "full" => true,
                    other => anyhow::bail!("--finetuning `{other}`: adapter or full"),
                },
                gradient_checkpointing,
            };
            crate::bench::memory::bench_memory(&exe, &opts, |line| println!("{line}"))?;
            return Ok(());
        }
    };
    println!("{result}");
    Ok(())
}

fn bench_train(a: &BenchTrainArgs, search: &SearchPath) -> Result<String> {
    if let Some(n) = a.threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        tch::set_num_threads(n);
    }
    let opts = crate::bench::TrainBench {
        batch: a.batch,
        seq_len: a.seq_len,
        steps: a.steps,
        warmup: a.warmup,
        rank: a.rank,
        alpha: a.alpha.unwrap_or(2.0 * a.rank as f64),
        lr: a.lr,
        seed: a.seed,
        gradient_checkpointing: a.gradient_checkpointing,
        quantization: a
            .quantization
            .as_deref()
            .map(|j| {
                serde_json::from_str(j)
                    .with_context(|| format!("--quantization: `{j}` is not a quantization section"))
            })
            .transpose()?,
        memory_phases: a.memory_phases,
        lengths: a.lengths.as_deref().map(crate::bench::read_lengths).transpose()?,
        packing: a.packing,
    };
    let source = match (&a.model, &a.config) {
        (_, Some(config)) => crate::bench::BenchSource::Config(config.clone()),
        (Some(model), None) => crate::bench::BenchSource::Model(model.clone()),
        (None, None) => anyhow::bail!("bench train needs --model or --config"),
    };
    let result = crate::bench::bench_train(
        &source,
        &Registry::discover(search),
        a.dev.device()?,
        a.dev.dtype()?,
        &opts,
    )?;
    Ok(serde_json::to_string(&result)?)
}
