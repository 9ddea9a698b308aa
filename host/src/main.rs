//! `ferrotune`: the command line.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use ferrotune::plugins::{DirSource, Registry, SearchPath};
use ferrotune::{device, selfcheck};
use ferrotune_plugin_api::fingerprint::BuildFingerprint;

/// The process's allocator, libtorch's included (the binary exports `malloc`, `free`, … so the
/// libraries it loads use them too): jemalloc, keeping freed pages for reuse instead of
/// returning them to the system (no decay purging, as Intel's PyTorch-on-CPU tuning advice has
/// it). A training step frees and allocates the same large buffers every step (logits-sized,
/// hundreds of MiB): glibc maps each afresh (page faults, zeroing and unmapping every step) and
/// its heap keeps more resident; on `make bench-train` glibc was 10–15 % slower with a 30 %
/// higher peak RSS. `MALLOC_CONF` in the environment still overrides these options.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's compiled-in options (read at its first allocation): never purge freed pages, and
/// serve large allocations from the ordinary arenas (no eagerly purged "oversize" arena).
#[cfg(target_os = "linux")]
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static malloc_conf: &[u8; 57] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:0\0";

#[derive(Parser)]
#[command(name = "ferrotune", version, about = "Fine-tune LLMs and VLMs on libtorch; every method is a plugin")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// Extra directory to search for plugin libraries (repeatable; searched before
    /// FERROTUNE_PLUGIN_PATH and the default folder next to the executable).
    #[arg(long = "plugin-dir", global = true, value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// List plugin libraries on the search path: name, kind, version, file, compatibility.
    Plugins {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Report the libtorch this build uses and whether CUDA is available.
    Doctor,
    /// Check the plugin boundary: autograd through a plugin, and a host optimizer step
    /// seen by the plugin (uses the test-kit plugins).
    Selfcheck {
        /// Device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Check the distributed process group: join it (under `ferrotune launch --nproc N`, or
    /// alone as a world of one that still uses the real backend), run every collective
    /// (all_reduce sum/avg/max/min, broadcast, all_gather, reduce_scatter, barrier) on tensors
    /// with known results, time an all-reduce, and print one JSON line per rank. Exit status 1
    /// when a check fails. `launch --nproc 1 dist-check --backend nccl` checks NCCL on one GPU.
    DistCheck(DistCheckArgs),
    /// Write a randomly initialised Llama/Qwen2 model directory (config.json,
    /// model.safetensors, tokenizer files, generation_config.json) that transformers loads.
    InitModel(Box<InitModelArgs>),
    /// Fine-tune with the plugins a YAML config names (README: config reference).
    Train {
        /// The run's YAML config.
        config: PathBuf,
        /// Continue exactly from the newest checkpoint-N in output_dir, or from the given
        /// checkpoint folder.
        #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "CHECKPOINT")]
        resume: Option<String>,
    },
    /// Start this node's ranks of a multi-process run with torchrun's environment (RANK,
    /// WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): `launch --nproc 2 train config.yaml`.
    /// Output lines carry a `[rank i]` prefix; a failing rank stops the others.
    Launch(Box<LaunchArgs>),
    /// Generate text from a model directory (KV cache; greedy or seeded sampling), optionally
    /// through a PEFT adapter directory.
    Generate(Box<GenerateArgs>),
    /// Merge a PEFT adapter directory into a model and write the merged Hugging Face model
    /// directory (config, weights, tokenizer files) that transformers loads.
    Merge(Box<MergeArgs>),
    /// Serve a model over an OpenAI-compatible HTTP API, with PEFT adapters loaded, unloaded
    /// and chosen per request (`model` field), batched together (README: serving).
    Serve(Box<ServeArgs>),
    /// Benchmarks that print numbers (see `make bench-generate` for the side-by-side run).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Inspect training data as the trainer will see it.
    Data {
        #[command(subcommand)]
        what: DataCommand,
    },
}

#[derive(Args)]
struct DistCheckArgs {
    /// gloo or nccl (default: FERROTUNE_DIST_BACKEND, else nccl for a CUDA device, gloo for cpu).
    #[arg(long)]
    backend: Option<String>,
    /// cpu, cuda (= cuda:LOCAL_RANK) or cuda:N (default: cuda with --backend nccl, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// f32 elements of the timed all-reduce.
    #[arg(long, default_value_t = 1 << 22)]
    numel: usize,
    /// Timed all-reduce repetitions.
    #[arg(long, default_value_t = 10)]
    iters: usize,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Show what the model will see: samples encoded with the model's chat template, trained
    /// (labelled) tokens wrapped in «…», image blocks summarised. From a training config
    /// (`data preview config.yaml -n 2`), or from --model/--dataset/--data.
    Preview(Box<DataPreviewArgs>),
    /// Check every row of a training config's data before training: rows a dataset plugin
    /// refuses, `<image>` placeholders that do not match the images, missing or unreadable
    /// images, truncation that cuts an image block or drops every label, labels without an
    /// end-of-turn token, images shrunk to max_pixels. Exit status 1 when a row cannot be used.
    Check {
        /// The training config (YAML) whose `model` and `data` sections are checked.
        config: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct DataPreviewArgs {
    /// A training config (YAML): its model, data section and encoding options.
    #[arg(value_name = "CONFIG")]
    config_file: Option<PathBuf>,
    /// A model (or tokenizer) directory: tokenizer.json, tokenizer_config.json with a chat template.
    #[arg(long, conflicts_with = "config_file")]
    model: Option<PathBuf>,
    /// The dataset plugin (`alpaca`, `sharegpt`, …; see `ferrotune plugins`).
    #[arg(long, conflicts_with = "config_file")]
    dataset: Option<String>,
    /// A data file or folder.
    #[arg(long, conflicts_with = "config_file")]
    data: Option<PathBuf>,
    /// The plugin's configuration, JSON (with --dataset).
    #[arg(long, default_value = "{}")]
    config: String,
    /// How many samples to show.
    #[arg(short = 'n', long, default_value_t = 3)]
    n: usize,
    #[arg(long, default_value_t = 2048)]
    cutoff_len: usize,
    #[arg(long)]
    train_on_prompt: bool,
    #[arg(long)]
    mask_history: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// A Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors, written by
    /// ferrotune or by peft) applied on top of the model without merging it.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// The text to continue (with --chat: the user turn).
    #[arg(long)]
    prompt: String,
    /// An image for a vision-language model (Qwen2-VL); repeat for several, in order. With
    /// --chat they open the user turn; without, they fill `<image>` placeholders of the
    /// prompt (or go before it).
    #[arg(long = "image", value_name = "FILE")]
    images: Vec<PathBuf>,
    /// Render the prompt as a user turn with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// A system turn before the prompt (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Default: generation_config.json's max_new_tokens, else 128.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Argmax decoding (the default unless generation_config.json says do_sample or a
    /// sampling flag is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    /// Sampling temperature (typical 0.6–1.0); implies sampling.
    #[arg(long)]
    temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this total probability, in (0, 1].
    #[arg(long)]
    top_p: Option<f64>,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long)]
    top_k: Option<usize>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print {"text": …, "token_ids": […]} instead of the text.
    #[arg(long)]
    json: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Args)]
struct MergeArgs {
    /// The base model: a Hugging Face model directory (config.json, safetensors, tokenizer).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The PEFT adapter directory to merge (adapter_config.json + adapter_model.safetensors,
    /// written by ferrotune or by peft).
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// The merged model directory to write (must not exist or be empty).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// dtype of the written weights: f32 or bf16 (f16 also accepted). Default: each weight's
    /// dtype in the base model. The merge itself is computed in f32.
    #[arg(long)]
    dtype: Option<String>,
    /// Where to compute the merge: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// For an adapter trained on a quantized base (its folder has quantization.json): merge
    /// into the `original` full-precision weights or the `dequantized` ones it was trained
    /// against (default). Either way the max/mean absolute logit difference of the merged
    /// model against the adapter-applied quantized model on a probe batch is printed.
    #[arg(long, value_enum)]
    merge_base: Option<ferrotune::quant::MergeBase>,
}

#[derive(Args)]
struct ServeArgs {
    /// The base model directory.
    #[arg(long)]
    model: PathBuf,
    /// An adapter loaded at start, NAME=DIR (repeatable; a PEFT directory from anywhere).
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    /// The only folder the API (`POST /v1/adapters`, `/v1/load_lora_adapter`) may load
    /// adapters from; without it the API loads none.
    #[arg(long, value_name = "DIR")]
    adapter_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 = any free port (the address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes.
    #[arg(long, env = "FERROTUNE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Requests decoded together at most (more wait in a queue).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Adapters loaded at most; one more evicts the least recently used idle adapter.
    #[arg(long, default_value_t = 8)]
    max_adapters: usize,
    /// The largest `max_tokens` a request may ask for (and the cap of the default).
    #[arg(long, default_value_t = 1024)]
    max_tokens_limit: usize,
    /// The largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Image content parts (base64 data URLs) a chat request may hold at most (a
    /// vision-language model; each image is resized within its preprocessor_config.json
    /// min_pixels..max_pixels). Images count against --max-body-bytes.
    #[arg(long, default_value_t = 8)]
    max_images: usize,
    /// Resize every image to at most this many pixels (default: the model's
    /// preprocessor_config.json max_pixels, 12845056 for Qwen2-VL: up to 16384 tokens an image).
    #[arg(long)]
    image_max_pixels: Option<u64>,
    /// The base model's name in requests and /v1/models (default: the model folder's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode tokens/s of greedy KV-cache generation on a model directory; prints
    /// one JSON line with the keys of bench/generate_transformers.py.
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// The best of this many runs is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// LoRA SFT training tokens/s and peak RSS on a model directory: the `lora` (all linear
    /// layers, no dropout), `sft` and `single` (AdamW, clipping at 1.0) plugins, the trainer's
    /// optimizer step, fixed synthetic batches (labels = ids); prints one JSON line with the
    /// keys of bench/train_transformers.py.
    Train(Box<BenchTrainArgs>),
    /// Per-rank memory of ddp and zero stages 1-3 on 1 and 2 ranks (optimizer state,
    /// trainable and frozen parameter bytes, peak RSS), then peak RSS of one long-sequence
    /// step with and without activation checkpointing; one JSON line per measurement.
    Memory {
        /// A model directory with its tokenizer (`make bench-memory` writes one).
        #[arg(long)]
        model: PathBuf,
        /// Where configs, synthetic data and run outputs go.
        #[arg(long, default_value = "target/bench/memory")]
        work: PathBuf,
        /// Optimizer steps of each launched run.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        micro_batch_size: usize,
        /// Rank counts to launch, comma-separated.
        #[arg(long, default_value = "1,2", value_delimiter = ',')]
        ranks: Vec<usize>,
        /// The model of the activation-checkpointing step (default: --model); any vocabulary
        /// (its ids are synthetic), a small one keeps the logits from dominating.
        #[arg(long)]
        ckpt_model: Option<PathBuf>,
        /// Rows of the activation-checkpointing step.
        #[arg(long, default_value_t = 2)]
        ckpt_batch: usize,
        /// Tokens per row of the activation-checkpointing step.
        #[arg(long, default_value_t = 2048)]
        ckpt_seq_len: usize,
    },
    /// Decode tokens/s of one batch of N requests all on one LoRA adapter vs the same N on N
    /// different adapters (mixed batch, S-LoRA style) vs the base alone; one JSON line.
    Serve {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 8)]
        requests: usize,
        #[arg(long, default_value_t = 32)]
        prompt_len: usize,
        #[arg(long, default_value_t = 32)]
        new_tokens: usize,
        #[arg(long, default_value_t = 16)]
        rank: i64,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
}

#[derive(Args)]
struct LaunchArgs {
    /// Ranks to start on this node.
    #[arg(long, default_value_t = 1)]
    nproc: usize,
    /// Nodes in the run (each runs `launch` with its --node-rank).
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index, 0..nnodes.
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Address of node 0 (it hosts the rendezvous store).
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Rendezvous port on node 0 (default: a free port; required with --nnodes > 1).
    #[arg(long)]
    master_port: Option<u16>,
    /// Seconds the rendezvous and each collective may take (FERROTUNE_DIST_TIMEOUT; default 300).
    #[arg(long)]
    timeout: Option<f64>,
    /// The command each rank runs, e.g. `train config.yaml`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Args)]
struct BenchTrainArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed optimizer steps before the timed ones.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: i64,
    /// LoRA alpha (default 2 × rank).
    #[arg(long)]
    alpha: Option<f64>,
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Recompute each decoder layer in backward (activation checkpointing): compare
    /// peak_rss_mb with and without.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Intra-op threads of libtorch (default: libtorch's own choice).
    #[arg(long)]
    threads: Option<i32>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 or bf16 (the frozen base; adapters stay f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// QLoRA: a `quantization:` section as JSON (`{"plugin": "nf4"}`; the plugin's keys and
    /// `skip_modules` as in a run config). Adds the packed and bf16 bytes of the quantized base.
    #[arg(long)]
    quantization: Option<String>,
    /// Report the set-up's peak RSS, the RSS after it and the training steps' own peak
    /// (`make bench-quant` runs with it).
    #[arg(long)]
    memory_phases: bool,
}

#[derive(Args)]
struct InitModelArgs {
    /// A tokenizer.json, or a folder holding one (tokenizer_config.json and
    /// special_tokens_map.json next to it are copied too).
    #[arg(long)]
    tokenizer: PathBuf,
    /// The folder to write.
    #[arg(long)]
    out: PathBuf,
    /// tiny (hidden 64, 2 layers), small (hidden 512, 8 layers) or tiny-vl (Qwen2-VL: the tiny
    /// decoder and a 2-block vision tower); the flags below override it.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// qwen2, llama, mistral or qwen2_vl (needs a tokenizer with Qwen2-VL's vision tokens).
    /// Default: qwen2 (qwen2_vl for the tiny-vl preset).
    #[arg(long)]
    arch: Option<String>,
    #[arg(long)]
    hidden: Option<i64>,
    #[arg(long)]
    layers: Option<i64>,
    #[arg(long)]
    heads: Option<i64>,
    #[arg(long)]
    kv_heads: Option<i64>,
    #[arg(long)]
    intermediate: Option<i64>,
    /// Default: the tokenizer's vocabulary size, added tokens included.
    #[arg(long)]
    vocab: Option<i64>,
    /// Tie lm_head to the embeddings (true/false). Default: true.
    #[arg(long)]
    tie_embeddings: Option<bool>,
    #[arg(long)]
    rope_theta: Option<f64>,
    #[arg(long)]
    max_position_embeddings: Option<i64>,
    #[arg(long)]
    seed: Option<u64>,
    /// f32, bf16 or f16. Default: bf16.
    #[arg(long)]
    dtype: Option<String>,
    /// Replace a model already in --out.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn run(cli: Cli) -> Result<ExitCode> {
    let search = SearchPath::from_env(&cli.global.plugin_dirs);
    match cli.command {
        Command::Plugins { json } => {
            let registry = Registry::discover(&search);
            if json {
                println!("{}", serde_json::to_string_pretty(&plugins_json(&search, &registry))?);
            } else {
                print_plugins(&search, &registry);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor => {
            for (k, v) in device::doctor_report() {
                println!("{k:<26} {v}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Selfcheck { device } => {
            let device = device::resolve(&device)?;
            let registry = Registry::discover(&search);
            let report = selfcheck::run(&registry, device)?;
            for line in report.lines() {
                println!("{line}");
            }
            Ok(if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::DistCheck(a) => {
            let report = ferrotune::dist_check::run(&ferrotune::dist_check::CheckOptions {
                backend: a.backend,
                device: a.device,
                numel: a.numel,
                iters: a.iters,
            })?;
            println!("{}", serde_json::to_string(&report.json)?);
            Ok(if report.passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::InitModel(args) => {
            init_model(*args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Launch(a) => {
            let timeout = match a.timeout {
                Some(t) if t > 0.0 && t.is_finite() => Some(std::time::Duration::from_secs_f64(t)),
                Some(t) => anyhow::bail!("--timeout must be a positive number of seconds, got {t}"),
                None => None,
            };
            let mut args: Vec<String> = cli.global.plugin_dirs.iter().flat_map(|d| ["--plugin-dir".to_string(), d.display().to_string()]).collect();
            args.extend(a.command);
            ferrotune::launch::launch(&ferrotune::launch::LaunchOptions {
                nproc: a.nproc,
                nnodes: a.nnodes,
                node_rank: a.node_rank,
                master_addr: a.master_addr,
                master_port: a.master_port,
                args,
                timeout,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Train { config, resume } => {
            let cfg = ferrotune::train::config::TrainConfig::from_file(&config)?;
            let registry = Registry::discover(&search);
            let resume = resume.map(|r| {
                if r == "latest" { ferrotune::train::Resume::Latest } else { ferrotune::train::Resume::Path(r.into()) }
            });
            let summary = ferrotune::train::train(&cfg, &registry, resume)?;
            eprintln!(
                "done: {} steps, loss {:.4} -> {:.4}{}; adapter in {}",
                summary.steps,
                summary.first_loss.unwrap_or(f64::NAN),
                summary.last_loss.unwrap_or(f64::NAN),
                summary.eval_loss.map(|l| format!(", eval loss {l:.4}")).unwrap_or_default(),
                summary.output_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate(a) => {
            let device = device::resolve(&a.device)?;
            let dtype = ferrotune::model::init::parse_dtype(&a.dtype)?;
            let mut generator = ferrotune::pipeline::TextGenerator::load(&a.model, device, dtype)?;
            if let Some(dir) = &a.adapter {
                let report = generator.apply_adapter(dir, &Registry::discover(&search))?;
                tracing::info!("{}", report.summary());
            }
            let prompt = generator.prompt_with_images(&a.prompt, &a.images, a.chat, a.system.as_deref())?;
            let choice = ferrotune::pipeline::SamplingChoice {
                greedy: a.greedy,
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                max_new_tokens: a.max_new_tokens,
                seed: a.seed,
            };
            let params = generator.sampling_params(&choice);
            let out = generator.complete_mm(&[prompt.ids], prompt.images.as_ref(), &params)?.remove(0);
            if a.json {
                println!("{}", serde_json::json!({"text": out.text, "token_ids": out.token_ids}));
            } else {
                println!("{}", out.text);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Merge(a) => {
            let device = device::resolve(&a.device)?;
            let dtype = a.dtype.as_deref().map(ferrotune::model::init::parse_dtype).transpose()?;
            if a.out.exists() && std::fs::read_dir(&a.out).map(|mut d| d.next().is_some()).unwrap_or(true) {
                anyhow::bail!("{} already exists and is not empty; choose a new folder for the merged model", a.out.display());
            }
            let mut model = ferrotune::model::CausalLM::load(&a.model, device, tch::Kind::Float)?;
            let registry = Registry::discover(&search);
            let report = model.load_peft_adapter(&a.adapter, &registry)?;
            let restored = ferrotune::non_lora::load_into(&model, &a.adapter)?;
            if !restored.is_empty() {
                println!("restored {} full weight(s) trained beside the adapter ({})", restored.len(), ferrotune::non_lora::NON_LORA_FILE);
            }
            let merged = match ferrotune::quant::read_record(&a.adapter)? {
                None => {
                    if a.merge_base.is_some() {
                        anyhow::bail!("--merge-base: {} has no {}: its run did not quantize the base", a.adapter.display(), ferrotune::quant::QUANTIZATION_FILE);
                    }
                    model.merge_adapter()?
                }
                Some(record) => {
                    let originals = ferrotune::quant::dense_weights_of(&model, &record);
                    ferrotune::quant::apply_record(&mut model, &a.adapter, &registry)?;
                    let modules = model.adapted_modules().into_iter().chain(model.saved_modules()).map(str::to_string).collect();
                    let error = ferrotune::quant::merge_quantized(&mut model, originals, a.merge_base.unwrap_or(ferrotune::quant::MergeBase::Dequantized))?;
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
                    modules
                }
            };
            model.save_pretrained(&a.out, &a.model, dtype)?;
            println!(
                "merged {} ({} module(s){}) into {}: wrote {}",
                a.adapter.display(),
                merged.len(),
                if model.lm_head_is_tied() || !model.config().tie_word_embeddings { "" } else { "; lm_head untied from the embeddings" },
                a.model.display(),
                a.out.display()
            );
            tracing::info!("{}", report.summary());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { what: BenchCommand::Generate { model, batch, prompt_len, new_tokens, repeats, device, dtype } } => {
            let device = device::resolve(&device)?;
            let dtype = ferrotune::model::init::parse_dtype(&dtype)?;
            let model = ferrotune::model::CausalLM::load(&model, device, dtype)?;
            let opts = ferrotune::bench::GenerateBench { batch, prompt_len, new_tokens, repeats };
            let result = ferrotune::bench::bench_generate(&model, &opts)?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(a) => {
            let adapters = a
                .adapters
                .iter()
                .map(|s| match s.split_once('=') {
                    Some((n, d)) if !n.is_empty() && !d.is_empty() => Ok((n.to_string(), PathBuf::from(d))),
                    _ => anyhow::bail!("--adapter `{s}`: expected NAME=DIR"),
                })
                .collect::<Result<Vec<_>>>()?;
            ferrotune::serve::serve(ferrotune::serve::ServeOptions {
                model: a.model,
                adapters,
                adapter_dir: a.adapter_dir,
                host: a.host,
                port: a.port,
                api_key: a.api_key,
                max_batch: a.max_batch,
                max_adapters: a.max_adapters,
                max_tokens_limit: a.max_tokens_limit,
                max_body_bytes: a.max_body_bytes,
                max_images: a.max_images,
                image_max_pixels: a.image_max_pixels,
                served_model_name: a.served_model_name,
                device: device::resolve(&a.device)?,
                dtype: ferrotune::model::init::parse_dtype(&a.dtype)?,
                search,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { what: BenchCommand::Serve { model, requests, prompt_len, new_tokens, rank, repeats, device, dtype } } => {
            let device = device::resolve(&device)?;
            let dtype = ferrotune::model::init::parse_dtype(&dtype)?;
            let opts = ferrotune::serve::bench::ServeBench { requests, prompt_len, new_tokens, rank, repeats };
            let result = ferrotune::serve::bench::bench_serve(&model, &Registry::discover(&search), device, dtype, &opts)?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { what: BenchCommand::Train(a) } => {
            if let Some(n) = a.threads {
                anyhow::ensure!(n > 0, "--threads must be at least 1");
                tch::set_num_threads(n);
            }
            let device = device::resolve(&a.device)?;
            let dtype = ferrotune::model::init::parse_dtype(&a.dtype)?;
            let registry = Registry::discover(&search);
            let opts = ferrotune::bench::TrainBench {
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
                    .map(|j| serde_json::from_str(j).with_context(|| format!("--quantization: `{j}` is not a quantization section")))
                    .transpose()?,
                memory_phases: a.memory_phases,
            };
            let result = ferrotune::bench::bench_train(&a.model, &registry, device, dtype, &opts)?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { what: BenchCommand::Memory { model, work, steps, micro_batch_size, ranks, ckpt_model, ckpt_batch, ckpt_seq_len } } => {
            let exe = std::env::current_exe().context("cannot find this ferrotune binary")?;
            let plugin_args = cli.global.plugin_dirs.iter().flat_map(|d| ["--plugin-dir".to_string(), d.display().to_string()]).collect();
            let opts = ferrotune::bench_memory::MemoryBench { model, work, steps, micro_batch_size, ranks, ckpt_model, ckpt_batch, ckpt_seq_len, plugin_args };
            ferrotune::bench_memory::bench_memory(&exe, &opts, |line| println!("{line}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Data { what: DataCommand::Preview(a) } => {
            data_preview(&Registry::discover(&search), &a)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Data { what: DataCommand::Check { config, json } } => data_check(&Registry::discover(&search), &config, json),
    }
}

fn data_preview(registry: &Registry, a: &DataPreviewArgs) -> Result<()> {
    use ferrotune::data::{preview, read_rows, EncodeOptions};
    use ferrotune_plugin_api::Objective;
    let (tok, prep, rows, opts, path) = match &a.config_file {
        Some(config) => {
            let cfg = ferrotune::train::config::TrainConfig::from_file(config)?;
            let tok = ferrotune::text::Tokenizer::from_dir(&cfg.model)?;
            let prep = ferrotune::train::image_prep(&cfg, &tok)?;
            let config_json = serde_json::Value::Object(cfg.data.config.clone()).to_string();
            let rows = read_rows(registry, &cfg.data.plugin, &config_json, &cfg.data.path, &cfg.data.split)?;
            (tok, prep, rows, ferrotune::train::encode_options(&cfg), cfg.data.path.clone())
        }
        None => {
            let (Some(model), Some(dataset), Some(data)) = (&a.model, &a.dataset, &a.data) else {
                anyhow::bail!("data preview needs a training config, or all of --model, --dataset and --data");
            };
            let tok = ferrotune::text::Tokenizer::from_dir(model)?;
            // --model may be a tokenizer folder alone: then there are no image settings.
            let prep = if model.join("config.json").is_file() { ferrotune::data::ImagePrep::for_model_dir(model, &tok)? } else { None };
            let rows = read_rows(registry, dataset, &a.config, data, "train")?;
            let opts = EncodeOptions { cutoff_len: a.cutoff_len, train_on_prompt: a.train_on_prompt, mask_history: a.mask_history };
            (tok, prep, rows, opts, data.clone())
        }
    };
    println!("{} samples in {}; showing {}; labelled tokens in «…»", rows.len(), path.display(), a.n.min(rows.len()));
    if let Some(config) = &a.config_file {
        // Objectives other than SFT: the rows as that objective's batches hold them.
        let cfg = ferrotune::train::config::TrainConfig::from_file(config)?;
        let objective = registry.objective(&cfg.objective.plugin, &cfg.objective.config_json())?;
        let layout = ferrotune::train::layout::Layout::from_needs(&cfg.objective.plugin, &objective.needs())?;
        if layout != ferrotune::train::layout::Layout::Sequences {
            let rows: Vec<_> = rows.into_iter().take(a.n).collect();
            let prepared = ferrotune::train::layout::prepare(layout, rows, &tok, prep.as_ref(), &opts)?.into_prepared();
            println!("objective `{}`: rows as {}", cfg.objective.plugin, layout.name());
            for (i, e) in &prepared.encoded {
                println!("=== {i} ({} tokens, {} labelled)", e.input_ids.len(), e.num_label_tokens());
                println!("{}", compress_image_pads(&preview(&tok, e)));
            }
            for (i, why) in prepared.bad.iter().chain(&prepared.no_labels) {
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
        match ferrotune::data::encode_multimodal(&tok, prep.as_ref(), sample, &opts) {
            Ok(e) => {
                let truncated = e.truncated_from.map(|n| format!(", truncated from {n}")).unwrap_or_default();
                let images = if e.images.is_empty() { String::new() } else { format!(", {} image(s)", e.images.len()) };
                println!("=== {i}: {id} ({} tokens, {} labelled{truncated}{images})", e.input_ids.len(), e.num_label_tokens());
                for (k, im) in e.images.iter().enumerate() {
                    println!("  image {k}: {}", im.describe());
                }
                println!("{}", compress_image_pads(&preview(&tok, &e)));
            }
            Err(err) => println!("=== {i}: {id}: not trainable: {err:#}"),
        }
    }
    Ok(())
}

/// Runs of `<|image_pad|>` shown as `<|image_pad|>×N`.
fn compress_image_pads(text: &str) -> String {
    const PAD: &str = "<|image_pad|>";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(PAD) {
        out.push_str(&rest[..at]);
        let mut n = 0;
        rest = &rest[at..];
        while let Some(r) = rest.strip_prefix(PAD) {
            n += 1;
            rest = r;
        }
        out.push_str(&format!("{PAD}×{n}"));
    }
    out.push_str(rest);
    out
}

fn data_check(registry: &Registry, config: &Path, json: bool) -> Result<ExitCode> {
    let cfg = ferrotune::train::config::TrainConfig::from_file(config)?;
    let tok = ferrotune::text::Tokenizer::from_dir(&cfg.model)?;
    let prep = ferrotune::train::image_prep(&cfg, &tok)?;
    let prepared = ferrotune::train::read_data(&cfg, registry, &tok, prep.as_ref())?;
    let report = ferrotune::data::check::review(&prepared, &tok, cfg.data.path.clone());
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for n in &report.notes {
            println!("row {}: {}: {}", n.row, n.level, n.message);
        }
        println!(
            "{}: {} rows, {} usable, {} with errors, {} skipped, {} warnings; {} images ({} image tokens), {} label tokens, longest {} tokens (cutoff_len {})",
            report.path.display(),
            report.rows,
            report.usable,
            report.errors,
            report.skipped,
            report.warnings,
            report.images,
            report.image_tokens,
            report.label_tokens,
            report.max_tokens,
            cfg.data.cutoff_len
        );
        if report.errors > 0 {
            println!(
                "{}",
                match cfg.data.on_bad_sample {
                    ferrotune::train::config::OnBadSample::Stop => "training would stop before its first step (data.on_bad_sample: stop)",
                    ferrotune::train::config::OnBadSample::Skip => "training would skip these rows (data.on_bad_sample: skip)",
                }
            );
        }
    }
    Ok(if report.errors > 0 && cfg.data.on_bad_sample == ferrotune::train::config::OnBadSample::Stop { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn init_model(a: InitModelArgs) -> Result<()> {
    use ferrotune::model::init;
    let mut o = init::InitOptions::preset(&a.preset, a.tokenizer, a.out)?;
    if let Some(v) = a.arch {
        o.arch = init::parse_arch(&v)?;
    }
    if let Some(v) = a.dtype {
        o.dtype = init::parse_dtype(&v)?;
    }
    o.hidden_size = a.hidden.unwrap_or(o.hidden_size);
    o.num_hidden_layers = a.layers.unwrap_or(o.num_hidden_layers);
    o.num_attention_heads = a.heads.unwrap_or(o.num_attention_heads);
    o.num_key_value_heads = a.kv_heads.unwrap_or(o.num_key_value_heads);
    o.intermediate_size = a.intermediate.unwrap_or(o.intermediate_size);
    o.vocab_size = a.vocab.or(o.vocab_size);
    o.tie_word_embeddings = a.tie_embeddings.unwrap_or(o.tie_word_embeddings);
    o.rope_theta = a.rope_theta.unwrap_or(o.rope_theta);
    o.max_position_embeddings = a.max_position_embeddings.unwrap_or(o.max_position_embeddings);
    o.seed = a.seed.unwrap_or(o.seed);
    o.overwrite = a.force;
    let r = init::write_random_model(&o)?;
    let c = &r.config;
    println!(
        "wrote {} ({} parameters: hidden {}, {} layers, {} heads / {} kv heads, intermediate {}, vocab {}) to {}",
        c.architecture().hf_name(),
        r.parameters,
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_kv_heads(),
        c.intermediate_size,
        c.vocab_size,
        r.dir.display()
    );
    let id = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "none".into());
    println!("files: {}", r.files.join(", "));
    println!("special tokens: bos {}, eos {}, pad {}", id(r.bos_token_id), id(r.eos_token_id), id(r.pad_token_id));
    Ok(())
}

fn print_plugins(search: &SearchPath, registry: &Registry) {
    let fp = BuildFingerprint::current();
    println!("host: {fp}; {}", device::runtime_summary());
    println!("search path:");
    for (dir, source) in &search.dirs {
        let src = match source {
            DirSource::Flag => "--plugin-dir",
            DirSource::Env => "FERROTUNE_PLUGIN_PATH",
            DirSource::Default => "default",
        };
        println!("  {} ({src}{})", dir.display(), if dir.is_dir() { "" } else { ", missing" });
    }
    println!();
    let mut seen = std::collections::HashSet::new();
    println!("{:<24} {:<10} {:<8} {:<12} FILE", "NAME", "KIND", "VERSION", "STATUS");
    for (lib, p) in registry.plugins() {
        let status = if seen.insert((p.kind, p.name.to_string())) { "ok" } else { "shadowed" };
        println!("{:<24} {:<10} {:<8} {:<12} {}", p.name, p.kind.to_string(), p.version, status, lib.path.display());
    }
    if registry.libraries.is_empty() {
        println!("(no compatible plugin libraries found)");
    }
    if !registry.refused.is_empty() {
        println!();
        println!("refused:");
        for e in &registry.refused {
            println!("  {e}");
        }
    }
}

fn plugins_json(search: &SearchPath, registry: &Registry) -> serde_json::Value {
    serde_json::json!({
        "host": BuildFingerprint::current().to_string(),
        "search_path": search.dirs.iter().map(|(d, _)| d.display().to_string()).collect::<Vec<_>>(),
        "plugins": registry.plugins().map(|(lib, p)| serde_json::json!({
            "name": p.name.as_str(),
            "kind": p.kind.to_string(),
            "version": p.version.as_str(),
            "description": p.description.as_str(),
            "file": lib.path.display().to_string(),
            "built_with": lib.fingerprint.to_string(),
            "compatible": true,
        })).collect::<Vec<_>>(),
        "refused": registry.refused.iter().map(|e| serde_json::json!({
            "file": e.path().display().to_string(),
            "compatible": false,
            "reason": e.to_string(),
        })).collect::<Vec<_>>(),
    })
}
