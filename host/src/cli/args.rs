//! The command line's arguments (clap): one struct per verb, and [`DeviceArgs`], the
//! `--device` / `--dtype` pair every verb that builds a model shares.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use tch::{Device, Kind};

/// `--device` and `--dtype` of a verb that builds a model.
#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32 or bf16 (the frozen base; trainable tensors stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl DeviceArgs {
    /// The device, checked to be usable by this process.
    pub fn device(&self) -> Result<Device> {
        crate::device::resolve(&self.device)
    }

    /// The dtype of the model's weights.
    pub fn dtype(&self) -> Result<Kind> {
        crate::model::init::parse_dtype(&self.dtype)
    }
}

#[derive(Parser)]
#[command(
    name = "ferrotune",
    version,
    about = "Fine-tune LLMs and VLMs on libtorch; every method is a plugin"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args)]
pub struct Global {
    /// Extra directory to search for plugin libraries (repeatable; searched before
    /// FERROTUNE_PLUGIN_PATH and the default folder next to the executable).
    #[arg(long = "plugin-dir", global = true, value_name = "DIR")]
    pub plugin_dirs: Vec<PathBuf>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Subcommand)]
pub enum Command {
    /// List plugin libraries on the search path: name, kind, version, file, compatibility.
    Plugins {
        /// Print JSON instead of a table, with each plugin's config schema.
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
        /// Start a new run in an output_dir that holds an earlier run (checkpoints, adapter,
        /// metrics.jsonl), deleting that run's files first (`training.overwrite_output_dir`).
        /// Without it such a run is refused. Ignored with --resume.
        #[arg(long)]
        overwrite_output_dir: bool,
    },
    /// Start this node's ranks of a multi-process run with torchrun's environment (RANK,
    /// WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): `launch --nproc 2 train config.yaml`.
    /// Output lines carry a `[rank i]` prefix; a failing rank stops the others.
    Launch(Box<LaunchArgs>),
    /// Generate text from a model directory (KV cache; greedy or seeded sampling), optionally
    /// through a PEFT adapter directory.
    Generate(Box<GenerateArgs>),
    /// A run's held-out numbers for the base model and a trained adapter: the eval loss on a
    /// split (default `test`) through the trainer's eval step, and with --generate the mean
    /// reward-plugin scores of completions generated for its prompts.
    Eval(Box<super::eval::EvalArgs>),
    /// Merge a PEFT adapter directory into a model and write the merged Hugging Face model
    /// directory (config, weights, tokenizer files) that transformers loads.
    Merge(Box<MergeArgs>),
    /// Serve a model over an OpenAI-compatible HTTP API, with PEFT adapters loaded, unloaded
    /// and chosen per request (`model` field), batched together (README: serving).
    Serve(Box<ServeArgs>),
    /// A local web app: runs with live curves, a new-run form from the plugins' schemas, data
    /// preview, and chat with the runs' adapters (README: board).
    Board(Box<BoardArgs>),
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
    /// Run configs from other trainers: `config import llamafactory LF.yaml` or
    /// `config import qwen-vl-finetune finetune.sh` writes the equivalent ferrotune config.
    Config {
        #[command(subcommand)]
        what: ConfigCommand,
    },
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Translate an LLaMA-Factory YAML config or a Qwen2-VL-Finetune `finetune*.sh` script into
    /// a ferrotune run config: the YAML goes to stdout (or --out, written atomically), every key
    /// that could not be translated is listed with its reason on stderr.
    Import(ImportArgs),
}

#[derive(Args)]
pub struct ImportArgs {
    /// What the file is: `llamafactory` (a YAML config of `llamafactory-cli train`) or
    /// `qwen-vl-finetune` (a `finetune*.sh` launching `src/train/train_*.py`).
    #[arg(value_enum)]
    pub format: crate::cli::import::ImportFormat,
    /// The LLaMA-Factory YAML or the Qwen2-VL-Finetune shell script.
    pub file: PathBuf,
    /// Write the config to this file (atomically) instead of stdout. Relative paths of the
    /// source (read from the current directory, as those trainers read them) are rewritten to
    /// stay right from this file's folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The `device:` of the config (default: cuda when this machine has CUDA, else cpu).
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Args)]
pub struct DistCheckArgs {
    /// gloo or nccl (default: FERROTUNE_DIST_BACKEND, else nccl for a CUDA device, gloo for cpu).
    #[arg(long)]
    pub backend: Option<String>,
    /// cpu, cuda (= cuda:LOCAL_RANK) or cuda:N (default: cuda with --backend nccl, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// f32 elements of the timed all-reduce.
    #[arg(long, default_value_t = 1 << 22)]
    pub numel: usize,
    /// Timed all-reduce repetitions.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
}

#[derive(Subcommand)]
pub enum DataCommand {
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
pub struct DataPreviewArgs {
    /// A training config (YAML): its model, data section and encoding options.
    #[arg(value_name = "CONFIG")]
    pub config_file: Option<PathBuf>,
    /// A model (or tokenizer) directory: tokenizer.json, tokenizer_config.json with a chat template.
    #[arg(long, conflicts_with = "config_file")]
    pub model: Option<PathBuf>,
    /// The dataset plugin (`alpaca`, `sharegpt`, …; see `ferrotune plugins`).
    #[arg(long, conflicts_with = "config_file")]
    pub dataset: Option<String>,
    /// A data file or folder.
    #[arg(long, conflicts_with = "config_file")]
    pub data: Option<PathBuf>,
    /// The plugin's configuration, JSON (with --dataset).
    #[arg(long, default_value = "{}")]
    pub config: String,
    /// How many samples to show.
    #[arg(short = 'n', long, default_value_t = 3)]
    pub n: usize,
    #[arg(long, default_value_t = 2048)]
    pub cutoff_len: usize,
    #[arg(long)]
    pub train_on_prompt: bool,
    #[arg(long)]
    pub mask_history: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// A Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors, written by
    /// ferrotune or by peft) applied on top of the model without merging it.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The text to continue (with --chat: the user turn).
    #[arg(long)]
    pub prompt: String,
    /// An image for a vision-language model (Qwen2-VL); repeat for several, in order. With
    /// --chat they open the user turn; without, they fill `<image>` placeholders of the
    /// prompt (or go before it).
    #[arg(long = "image", value_name = "FILE")]
    pub images: Vec<PathBuf>,
    /// A video for a vision-language model: a video file (mp4, webm, mkv, avi, mov; needs a
    /// build with the `ffmpeg` feature) or a folder of frames (PNG, JPEG, WebP, BMP, in
    /// file-name order); repeat for several, in order. Frames are sampled and sized as
    /// qwen-vl-utils does (the model's video_preprocessor_config.json, else 2 fps). With
    /// --chat they follow the images in the user turn; without, they fill `<video>`
    /// placeholders of the prompt (or go before it).
    #[arg(long = "video", value_name = "PATH")]
    pub videos: Vec<PathBuf>,
    /// Refuse --image files whose header announces more pixels (width × height), before
    /// decoding (default: 4 × the model's max_pixels, at least 1048576).
    #[arg(long, value_name = "N")]
    pub max_image_pixels: Option<u64>,
    /// Render the prompt as a user turn with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system turn before the prompt (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Default: generation_config.json's max_new_tokens, else 128.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Argmax decoding (the default unless generation_config.json says do_sample or a
    /// sampling flag is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    pub greedy: bool,
    /// Sampling temperature (typical 0.6–1.0); implies sampling.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this total probability, in (0, 1].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print {"text": …, "token_ids": […]} instead of the text.
    #[arg(long)]
    pub json: bool,
    /// With --json: add "logprobs", one entry per new token {token_id, token, logprob,
    /// top_logprobs: [{token_id, token, logprob}] (the K most likely, most likely first)}.
    /// Log-probabilities of the model's raw distribution (log_softmax of the logits, before
    /// temperature / top-k / top-p), as vLLM's default and transformers' output_logits.
    #[arg(long, value_name = "K", requires = "json")]
    pub logprobs: Option<usize>,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

#[derive(Args)]
pub struct MergeArgs {
    /// The base model: a Hugging Face model directory (config.json, safetensors, tokenizer).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The PEFT adapter directory to merge (adapter_config.json + adapter_model.safetensors,
    /// written by ferrotune or by peft).
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,
    /// The merged model directory to write (must not exist or be empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// dtype of the written weights: f32 or bf16 (f16 also accepted). Default: each weight's
    /// dtype in the base model. The merge itself is computed in f32.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Where to compute the merge: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// For an adapter trained on a quantized base (its folder has quantization.json): merge
    /// into the `original` full-precision weights or the `dequantized` ones it was trained
    /// against (default). Either way the max/mean absolute logit difference of the merged
    /// model against the adapter-applied quantized model on a probe batch is printed.
    #[arg(long, value_enum)]
    pub merge_base: Option<crate::peft::quant::MergeBase>,
}

#[derive(Args)]
pub struct BoardArgs {
    /// Run output directories: listed, and where new runs go (created when missing).
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    /// Model folders offered in the pickers and for chat.
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// Data files, folders and LLaMA-Factory dataset_info.json registries offered in the pickers.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 = any free port (the URL printed says which).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// The access token (default: a random one, printed in the URL).
    #[arg(long)]
    pub token: Option<String>,
    /// Where chat runs the model.
    #[command(flatten)]
    pub dev: DeviceArgs,
}

#[derive(Args)]
pub struct ServeArgs {
    /// The base model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// An adapter loaded at start, NAME=DIR (repeatable; a PEFT directory from anywhere).
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<String>,
    /// The only folder the API (`POST /v1/adapters`, `/v1/load_lora_adapter`) may load
    /// adapters from; without it the API loads none.
    #[arg(long, value_name = "DIR")]
    pub adapter_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 = any free port (the address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes.
    #[arg(long, env = "FERROTUNE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests decoded together at most (more wait in a queue).
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Adapters loaded at most; one more evicts the least recently used adapter that has no
    /// running or queued request and was not loaded or used within --adapter-grace-secs; when
    /// none can go, the load is refused with 429 `adapter_capacity`.
    #[arg(long, default_value_t = 8)]
    pub max_adapters: usize,
    /// Seconds after its load or last use during which an adapter is never evicted.
    #[arg(long, default_value_t = 10)]
    pub adapter_grace_secs: u64,
    /// The largest `max_tokens` a request may ask for (and the cap of the default).
    #[arg(long, default_value_t = 1024)]
    pub max_tokens_limit: usize,
    /// The largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Image content parts (base64 data URLs) a chat request may hold at most (a
    /// vision-language model; each image is resized within its preprocessor_config.json
    /// min_pixels..max_pixels). Images count against --max-body-bytes.
    #[arg(long, default_value_t = 8)]
    pub max_images: usize,
    /// Video content parts (`video_url`) a chat request may hold at most.
    #[arg(long, default_value_t = 2)]
    pub max_videos: usize,
    /// The only folder a `video_url` part may name by path (a video file or a folder of
    /// frames inside it, no link out); without it, videos come as base64 data URLs only.
    #[arg(long, value_name = "DIR")]
    pub video_dir: Option<PathBuf>,
    /// Resize every image to at most this many pixels (default: the model's
    /// preprocessor_config.json max_pixels, 12845056 for Qwen2-VL: up to 16384 tokens an image).
    #[arg(long)]
    pub image_max_pixels: Option<u64>,
    /// Refuse images whose header announces more pixels (width × height), before decoding
    /// (default: 4 × the pixels images are resized to, at least 1048576; 64000000 when
    /// unknown).
    #[arg(long)]
    pub max_image_pixels: Option<u64>,
    /// Images decoded and resized at once, beside the model (default: the CPU count, at most 4).
    #[arg(long)]
    pub image_workers: Option<usize>,
    /// Seconds one image may take to be decoded and resized, waiting for a worker included.
    #[arg(long, default_value_t = 30)]
    pub image_timeout_secs: u64,
    /// Open connections at most; beyond, a connection still waiting for its request headers
    /// is closed to make room, else the new one gets 503.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a connection has to send its request headers before it is closed.
    #[arg(long, default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// The base model's name in requests and /v1/models (default: the model folder's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

#[derive(Subcommand)]
pub enum BenchCommand {
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
        #[command(flatten)]
        dev: DeviceArgs,
    },
    /// LoRA SFT training tokens/s and peak RSS on a model directory: the `lora` (all linear
    /// layers, no dropout), `sft` and `single` (AdamW, clipping at 1.0) plugins, the trainer's
    /// optimizer step, fixed synthetic batches (labels = ids but the first quarter of each
    /// row, −100 as prompt tokens); prints one JSON line with the keys of
    /// bench/train_transformers.py.
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
        /// `full`: the full fine-tuning table instead (every weight trains; ddp, zero 1/2/3,
        /// zero-3 with offload_optimizer, and with offload_param too; per rank parameter,
        /// gradient and optimizer-state bytes and peak RSS); no activation-checkpointing step.
        #[arg(long, default_value = "adapter")]
        finetuning: String,
        /// Launched runs recompute each decoder layer in backward (what lets ZeRO-3 hold one
        /// gathered layer at a time).
        #[arg(long)]
        gradient_checkpointing: bool,
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
        #[command(flatten)]
        dev: DeviceArgs,
    },
}

#[derive(Args)]
pub struct LaunchArgs {
    /// Ranks to start on this node.
    #[arg(long, default_value_t = 1)]
    pub nproc: usize,
    /// Nodes in the run (each runs `launch` with its --node-rank).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0..nnodes.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0 (it hosts the rendezvous store).
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Rendezvous port on node 0 (default: a free port; required with --nnodes > 1).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Seconds the rendezvous and each collective may take (FERROTUNE_DIST_TIMEOUT; default 300).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// The command each rank runs, e.g. `train config.yaml`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

#[derive(Args)]
pub struct BenchTrainArgs {
    /// The model directory synthetic rows train on.
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    pub model: Option<PathBuf>,
    /// Instead of --model: a run config whose model, data set, device and dtype the bench
    /// trains on (max_steps, micro-batch --batch and packing set by the bench).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed optimizer steps before the timed ones.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: i64,
    /// LoRA alpha (default 2 × rank).
    #[arg(long)]
    pub alpha: Option<f64>,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Recompute each decoder layer in backward (activation checkpointing): compare
    /// peak_rss_mb with and without.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Intra-op threads of libtorch (default: libtorch's own choice).
    #[arg(long)]
    pub threads: Option<i32>,
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// QLoRA: a `quantization:` section as JSON (`{"plugin": "nf4"}`; the plugin's keys and
    /// `skip_modules` as in a run config). Adds the packed and bf16 bytes of the quantized base.
    #[arg(long)]
    pub quantization: Option<String>,
    /// Report the set-up's peak RSS, the RSS after it and the training steps' own peak
    /// (`make bench-quant` runs with it).
    #[arg(long)]
    pub memory_phases: bool,
    /// Variable-length rows: a file of token counts (row r gets the r-th, cycling; cut at
    /// --seq-len), e.g. host/src/bench/alpaca_lengths.txt.
    #[arg(long)]
    pub lengths: Option<PathBuf>,
    /// Pack rows (the trainer's `data.packing: true`).
    #[arg(long)]
    pub packing: bool,
}

#[derive(Args)]
pub struct InitModelArgs {
    /// A tokenizer.json, or a folder holding one (tokenizer_config.json and
    /// special_tokens_map.json next to it are copied too).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// The folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// tiny (hidden 64, 2 layers), small (hidden 512, 8 layers) or tiny-vl (Qwen2-VL: the tiny
    /// decoder and a 2-block vision tower); the flags below override it.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// qwen2, llama, mistral or qwen2_vl (needs a tokenizer with Qwen2-VL's vision tokens).
    /// Default: qwen2 (qwen2_vl for the tiny-vl preset).
    #[arg(long)]
    pub arch: Option<String>,
    #[arg(long)]
    pub hidden: Option<i64>,
    #[arg(long)]
    pub layers: Option<i64>,
    #[arg(long)]
    pub heads: Option<i64>,
    #[arg(long)]
    pub kv_heads: Option<i64>,
    #[arg(long)]
    pub intermediate: Option<i64>,
    /// Default: the tokenizer's vocabulary size, added tokens included.
    #[arg(long)]
    pub vocab: Option<i64>,
    /// Tie lm_head to the embeddings (true/false). Default: true.
    #[arg(long)]
    pub tie_embeddings: Option<bool>,
    #[arg(long)]
    pub rope_theta: Option<f64>,
    #[arg(long)]
    pub max_position_embeddings: Option<i64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// f32, bf16 or f16. Default: bf16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Replace a model already in --out.
    #[arg(long)]
    pub force: bool,
}
