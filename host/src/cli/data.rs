//! `ferrotune data preview` and `data check`: training data as the trainer will see it.
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use super::args::DataPreviewArgs;
use crate::plugins::Registry;

pub fn preview(registry: &Registry, a: &DataPreviewArgs) -> Result<()> {
    use crate::data::{preview, read_rows, EncodeOptions};
    use ferrotune_plugin_api::Objective;
    let (tok, prep, rows, opts, path) = match &a.config_file {
        Some(config) => {
            let cfg = crate::train::config::TrainConfig::from_file(config)?;
            let tok = crate::text::Tokenizer::from_dir(&cfg.model)?;
            let prep = crate::train::image_prep(&cfg, &tok)?;
            let rows = crate::train::config_rows(&cfg, registry)?;
            let what = crate::data::registry::describe(&cfg.data);
            (tok, prep, rows, crate::train::encode_options(&cfg), what.into())
        }
        None => {
            let (Some(model), Some(dataset), Some(data)) = (&a.model, &a.dataset, &a.data) else {
                anyhow::bail!(
                    "data preview needs a training config, or all of --model, --dataset and --data"
                );
            };
            let tok = crate::text::Tokenizer::from_dir(model)?;
            // --model may be a tokenizer folder alone: then there are no image settings.
            let prep = if model.join("config.json").is_file() {
                crate::data::ImagePrep::for_model_dir(model, &tok)?
            } else {
                None
            };
            let rows = read_rows(registry, dataset, &a.config, data, "train")?;
            let opts = EncodeOptions {
                cutoff_len: a.cutoff_len,
                train_on_prompt: a.train_on_prompt,
                mask_history: a.mask_history,
            };
            (tok, prep, rows, opts, data.clone())
        }
    };
    println!(
        "{} samples in {}; showing {}; labelled tokens in «…»",
        rows.len(),
        path.display(),
        a.n.min(rows.len())
    );
    if let Some(config) = &a.config_file {
        // Objectives other than SFT: the rows as that objective's batches hold them.
        let cfg = crate::train::config::TrainConfig::from_file(config)?;
        let objective = registry.objective(&cfg.objective.plugin, &cfg.objective.config_json())?;
        let layout =
            crate::data::layout::Layout::from_needs(&cfg.objective.plugin, &objective.needs())?;
        if layout != crate::data::layout::Layout::Sequences {
            let rows: Vec<_> = rows.into_iter().take(a.n).collect();
            let prepared = crate::data::layout::prepare(layout, rows, &tok, prep.as_ref(), &opts)?;
            println!("objective `{}`: rows as {}", cfg.objective.plugin, layout.name());
            for (i, e) in &prepared.sequences() {
                println!(
                    "=== {i} ({} tokens, {} labelled)",
                    e.input_ids.len(),
                    e.num_label_tokens()
                );
                println!("{}", crate::data::compress_image_pads(&preview(&tok, e)));
            }
            for (i, why) in prepared.bad.iter().chain(&prepared.skipped) {
                println!("=== {i}: not trainable: {why}");
            }
            return Ok(());
        }
    }
    for (i, row) in rows.into_iter().take(a.n).enumerate() {
        let sample = match row {
            Ok(s) => s,
            Err(e) => {
                println!("=== {i}: refused by the dataset plugin: {e}");
                continue;
            }
        };
        let id = sample.id.clone().unwrap_or_else(|| "(no id)".into());
        match crate::data::encode_multimodal(&tok, prep.as_ref(), sample, &opts) {
            Ok(e) => {
                let truncated =
                    e.truncated_from.map(|n| format!(", truncated from {n}")).unwrap_or_default();
                let videos = e.images.iter().filter(|im| im.video.is_some()).count();
                let images = match (e.images.len() - videos, videos) {
                    (0, 0) => String::new(),
                    (n, 0) => format!(", {n} image(s)"),
                    (0, v) => format!(", {v} video(s)"),
                    (n, v) => format!(", {n} image(s), {v} video(s)"),
                };
                println!(
                    "=== {i}: {id} ({} tokens, {} labelled{truncated}{images})",
                    e.input_ids.len(),
                    e.num_label_tokens()
                );
                for (k, im) in e.images.iter().filter(|im| im.video.is_none()).enumerate() {
                    println!("  image {k}: {}", im.describe());
                }
                for (k, im) in e.images.iter().filter(|im| im.video.is_some()).enumerate() {
                    println!("  video {k}: {}", im.describe());
                }
                println!("{}", crate::data::compress_image_pads(&preview(&tok, &e)));
            }
            Err(err) => println!("=== {i}: {id}: not trainable: {err:#}"),
        }
    }
    Ok(())
}

pub fn check(registry: &Registry, config: &Path, json: bool) -> Result<ExitCode> {
    let (cfg, report) = crate::train::review_data(registry, config)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for n in &report.notes {
            println!("row {}: {}: {}", n.row, n.level, n.message);
        }
        println!(
            "{}: {} rows, {} usable, {} with errors, {} skipped, {} warnings; {} images ({} image tokens){}, {} label tokens, longest {} tokens (cutoff_len {})",
            report.path.display(),
            report.rows,
            report.usable,
            report.errors,
            report.skipped,
            report.warnings,
            report.images,
            report.image_tokens,
            if report.videos == 0 {
                String::new()
            } else {
                format!(
                    ", {} videos ({} of {} frames kept, {} video tokens)",
                    report.videos,
                    report.video_frames,
                    report.video_frames_total,
                    report.video_tokens
                )
            },
            report.label_tokens,
            report.max_tokens,
            cfg.data.cutoff_len
        );
        for d in &report.datasets {
            println!(
                "data set {}: {} rows, {} usable, {} with errors, {} skipped, {} warnings",
                d.name, d.rows, d.usable, d.errors, d.skipped, d.warnings
            );
        }
        if let Some(p) = &report.packing {
            println!("packing (data.packing): {}", p.describe());
        }
        if report.errors > 0 {
            println!(
                "{}",
                match cfg.data.on_bad_sample {
                    crate::train::config::OnBadSample::Stop =>
                        "training would stop before its first step (data.on_bad_sample: stop)",
                    crate::train::config::OnBadSample::Skip =>
                        "training would skip these rows (data.on_bad_sample: skip)",
                }
            );
        }
    }
    Ok(if crate::train::would_stop(&cfg, &report) { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
