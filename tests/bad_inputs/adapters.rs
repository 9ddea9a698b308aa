//! Bad-input cases: adapters and the weights they meet. Each case breaks one thing of a good
//! PEFT directory (LoRA r=4 on q_proj/v_proj of a tiny Qwen2, A and B perturbed) or of the
//! base model, runs `generate --adapter` or `merge` (the CLI paths; `serve` loads through the
//! same `PeftModel::load_peft_adapter_as`), and asserts exit status 1, a message naming the
//! file and the key or tensor at fault, and that nothing was written.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferrotune::model::CausalLM;
use ferrotune::peft::PeftModel;
use ferrotune::util::safetensors;
use ferrotune_tests::*;
use tch::{Device, Kind};

/// The adapter every case starts from.
const LORA: &str = r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}"#;
/// A tensor of it.
const V_PROJ_B: &str = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";

struct Fixture {
    work: PathBuf,
    model: PathBuf,
    adapter: PathBuf,
}

/// A tiny model (tokenizer included) and a good adapter on it, made once for every case.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let f = text_fixture("bad-adapters", 40, 3, 1, 1);
        let registry = registry();
        let mut model = PeftModel::new(CausalLM::load(&f.model, Device::Cpu, Kind::Float).unwrap());
        let method = registry.adapter("lora", LORA).unwrap();
        model.attach_adapter("default", Box::new(method)).unwrap();
        perturb_adapter(&mut model, 5, 0.1);
        let adapter = f.work.join("good-adapter");
        model.save_peft_adapter(&adapter).unwrap();
        Fixture { work: f.work, model: f.model, adapter }
    })
}

/// A copy of the good adapter under `tag`, its config changed by `edit`.
fn adapter_with_config(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let f = fixture();
    let dir = f.work.join(tag);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(f.adapter.join(name), dir.join(name)).unwrap();
    }
    let path = dir.join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    dir
}

/// Rewrites the safetensors file `file` with one value of tensor `key` set to `value`.
fn poison(file: &Path, key: &str, value: f64) {
    let tensors = safetensors::read(file).unwrap();
    let t = &tensors.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no `{key}`")).1;
    let _ = t.view([-1]).get(t.numel() as i64 / 2).fill_(value);
    safetensors::write(file, &tensors).unwrap();
}

/// What a run of the CLI gave: its output, wall time and peak resident memory (VmHWM, read
/// from /proc every few milliseconds while it runs).
struct Run {
    status: Option<i32>,
    stderr: String,
    stdout: String,
    wall: Duration,
    peak_rss: u64,
}

fn run(args: &[&str]) -> Run {
    let start = Instant::now();
    let mut child = Command::new(ferrotune_bin())
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("FERROTUNE_PLUGIN_PATH")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ferrotune");
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_rss = 0;
    // stdout and stderr are read on threads so that a full pipe never stalls the child
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            r.read_to_string(&mut s).unwrap();
            s
        })
    };
    let (out, err) = (read(Box::new(out)), read(Box::new(err)));
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_file) {
            if let Some(kb) = text.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
                let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                peak_rss = peak_rss.max(kb * 1024);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "ferrotune {args:?} hangs");
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        status: status.code(),
        stderr: err.join().unwrap(),
        stdout: out.join().unwrap(),
        wall: start.elapsed(),
        peak_rss,
    }
}

fn generate(model: &Path, adapter: &Path) -> Run {
    run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "w1 w2",
        "--max-new-tokens",
        "2",
        "--greedy",
    ])
}

/// `merge` into a new folder under the adapter; returns the run and that folder.
fn merge(adapter: &Path) -> (Run, PathBuf) {
    let out = adapter
        .with_file_name(format!("{}-merged", adapter.file_name().unwrap().to_string_lossy()));
    let _ = std::fs::remove_dir_all(&out);
    let o = run(&[
        "merge",
        "--model",
        fixture().model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    (o, out)
}

/// Exit status 1 and every one of `names` in the message.
fn assert_refused(what: &str, o: &Run, names: &[&str]) {
    assert_eq!(o.status, Some(1), "{what}: exit status; stderr: {}", o.stderr);
    for n in names {
        assert!(o.stderr.contains(n), "{what}: stderr does not name {n}: {}", o.stderr);
    }
    assert!(
        !o.stderr.contains("libtorch") && !o.stderr.contains("panicked"),
        "{what}: {}",
        o.stderr
    );
}

/// Nothing at `out`, and no staging folder beside it.
fn assert_nothing_written(what: &str, out: &Path) {
    assert!(!out.exists(), "{what}: {} was written", out.display());
    let parent = out.parent().unwrap();
    let stem = out.file_name().unwrap().to_string_lossy().into_owned();
    let left: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&stem))
        .collect();
    assert!(left.is_empty(), "{what}: left behind {left:?}");
}

#[test]
fn the_good_adapter_loads_merges_and_generates() {
    // the other cases' control: every refusal below comes from what they broke
    let f = fixture();
    let o = generate(&f.model, &f.adapter);
    assert_eq!(o.status, Some(0), "{}", o.stderr);
    assert!(!o.stdout.trim().is_empty());
    println!(
        "generate --adapter with the good adapter: {:.2} s, peak RSS {:.0} MiB",
        o.wall.as_secs_f64(),
        o.peak_rss as f64 / (1 << 20) as f64
    );
    let (o, out) = merge(&f.adapter);
    assert_eq!(o.status, Some(0), "{}", o.stderr);
    assert!(out.join("model.safetensors").is_file());
}

#[test]
fn a_rank_of_a_billion_is_refused_fast_before_anything_is_allocated() {
    let dir = adapter_with_config("rank-1e9", |c| c["r"] = 1_000_000_000.into());
    let config = dir.join("adapter_config.json");
    let config = config.to_str().unwrap();
    let g = generate(&fixture().model, &dir);
    let (m, out) = merge(&dir);
    for (what, o) in [("generate --adapter", &g), ("merge", &m)] {
        assert_refused(what, o, &[config, "`r` = 1000000000", "min(out, in)"]);
        println!(
            "{what} with r = 1e9: refused in {:.2} s, peak RSS {:.0} MiB",
            o.wall.as_secs_f64(),
            o.peak_rss as f64 / (1 << 20) as f64
        );
        assert!(o.wall < Duration::from_secs(20), "{what}: {:?}", o.wall);
        assert!(o.peak_rss < 1 << 30, "{what}: peak RSS {} bytes", o.peak_rss);
    }
    assert_nothing_written("merge", &out);
}

#[test]
fn a_tensor_whose_shape_disagrees_with_the_config_is_refused_by_name() {
    // the file holds rank-4 tensors, the config says 2
    let dir = adapter_with_config("rank-mismatch", |c| c["r"] = 2.into());
    let weights = dir.join("adapter_model.safetensors");
    let names = [
        weights.to_str().unwrap(),
        "mis-shaped",
        "`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` is [4, 64], this model's is [2, 64]",
        "`r` = 2",
        "adapter_config.json",
    ];
    assert_refused("generate --adapter", &generate(&fixture().model, &dir), &names);
    let (o, out) = merge(&dir);
    assert_refused("merge", &o, &names);
    assert_nothing_written("merge", &out);
}

#[test]
fn a_nan_in_the_adapter_is_refused_by_tensor_for_generate_and_merge() {
    let dir = adapter_with_config("nan-adapter", |_| {});
    let weights = dir.join("adapter_model.safetensors");
    poison(&weights, V_PROJ_B, f64::NAN);
    let names = [weights.to_str().unwrap(), V_PROJ_B, "1 NaN and 0 infinite value(s)"];
    assert_refused("generate --adapter", &generate(&fixture().model, &dir), &names);
    let (o, out) = merge(&dir);
    assert_refused("merge", &o, &names);
    assert_nothing_written("merge", &out);
}

#[test]
fn a_model_with_a_nan_weight_is_refused_by_tensor_at_load() {
    let f = fixture();
    let model = f.work.join("nan-model");
    let _ = std::fs::remove_dir_all(&model);
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(&f.model).unwrap().flatten() {
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let weights = model.join("model.safetensors");
    let key = "model.layers.0.mlp.down_proj.weight";
    poison(&weights, key, f64::INFINITY);
    let o = generate(&model, &f.adapter);
    assert_refused(
        "generate",
        &o,
        &[weights.to_str().unwrap(), &format!("`{key}`"), "0 NaN and 1 infinite value(s)"],
    );
    assert!(o.stdout.is_empty(), "nothing generated: {}", o.stdout);
}

#[test]
fn a_target_module_the_model_lacks_is_refused_by_name() {
    let dir = adapter_with_config("no-such-module", |c| {
        c["target_modules"] = serde_json::json!(["q_proj", "v_proj", "c_attn"]);
    });
    let names = [
        dir.join("adapter_config.json"),
        PathBuf::from("`target_modules`"),
        PathBuf::from("`c_attn`"),
    ];
    let names: Vec<&str> = names.iter().map(|p| p.to_str().unwrap()).collect();
    assert_refused("generate --adapter", &generate(&fixture().model, &dir), &names);
    let (o, out) = merge(&dir);
    assert_refused("merge", &o, &names);
    assert_nothing_written("merge", &out);
}

#[test]
fn an_adapter_tensor_of_another_dtype_is_refused_by_name() {
    let dir = adapter_with_config("int-adapter", |_| {});
    let weights = dir.join("adapter_model.safetensors");
    let mut tensors = safetensors::read(&weights).unwrap();
    for (k, t) in tensors.iter_mut() {
        if k == V_PROJ_B {
            *t = t.to_kind(Kind::Int64);
        }
    }
    safetensors::write(&weights, &tensors).unwrap();
    assert_refused(
        "generate --adapter",
        &generate(&fixture().model, &dir),
        &[weights.to_str().unwrap(), V_PROJ_B, "`I64`"],
    );
}

#[test]
fn a_lora_alpha_that_is_not_positive_is_refused_by_key() {
    let dir = adapter_with_config("alpha-zero", |c| c["lora_alpha"] = 0.into());
    let config = dir.join("adapter_config.json");
    assert_refused(
        "generate --adapter",
        &generate(&fixture().model, &dir),
        &[config.to_str().unwrap(), "`lora_alpha`", "positive"],
    );
}
