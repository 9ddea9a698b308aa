//! `CausalLM::save_pretrained_with` against transformers 5: a tiny random Qwen2 saved in
//! shards into a folder that already holds a run's files loads in `AutoModelForCausalLM` with
//! the logits ferrotune computes, and its index and shard files are those transformers'
//! own `save_pretrained(max_shard_size=...)` writes for the same model.
use std::path::Path;

use ferrotune::model::save::{parse_size, read_model_tensors, SaveOptions};
use ferrotune::model::{CausalLM, ForwardArgs, InitOptions};
use ferrotune::peft::PeftModel;
use ferrotune_tests::{relative_error, repo_root, run_python, temp_dir, write_tiny_tokenizer};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;
/// Small enough that the tiny model (about 420 KB in fp32) takes several shards.
const MAX_SHARD_SIZE: &str = "100KB";

fn weight_files(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("model"))
        .collect();
    n.sort();
    n
}

#[test]
fn a_sharded_save_into_a_run_folder_loads_in_transformers_with_the_same_logits() {
    ferrotune_tests::one_torch_thread();
    let root = temp_dir("save-sharded");
    write_tiny_tokenizer(&root.join("tok"), 200);
    let mut init = InitOptions::preset("tiny", root.join("tok"), root.join("model")).unwrap();
    init.dtype = Kind::Float;
    init.seed = 3;
    let source = ferrotune::model::write_random_model(&init).unwrap().dir;
    let model = CausalLM::load(&source, Device::Cpu, Kind::Float).unwrap();

    // A run's output folder with an earlier single-file save in it.
    let run = root.join("run");
    std::fs::create_dir_all(run.join("checkpoint-2")).unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{\"step\": 2}\n").unwrap();
    let earlier = SaveOptions { into_existing: true, ..SaveOptions::default() };
    model.save_pretrained_with(None, &run, &source, &earlier).unwrap();
    assert_eq!(weight_files(&run), ["model.safetensors"]);

    let opts = SaveOptions { max_shard_bytes: parse_size(MAX_SHARD_SIZE).unwrap(), ..earlier };
    model.save_pretrained_with(None, &run, &source, &opts).unwrap();
    let files = weight_files(&run);
    assert!(files.len() >= 4, "at least 3 shards and the index: {files:?}");
    assert!(!files.contains(&"model.safetensors".to_string()), "the earlier file is gone");
    assert!(run.join("metrics.jsonl").is_file() && run.join("checkpoint-2").is_dir());

    let out = root.join("transformers");
    let script = repo_root().join("tests/python/save_pretrained_check.py");
    run_python(&[script.as_os_str(), run.as_os_str(), MAX_SHARD_SIZE.as_ref(), out.as_os_str()]);

    // transformers splits the same model into the same files, with the same index.
    let hf = out.join("hf");
    assert_eq!(weight_files(&hf), files, "the same weight files");
    let index = |d: &Path| std::fs::read_to_string(d.join("model.safetensors.index.json")).unwrap();
    assert_eq!(index(&run), index(&hf), "the index, byte for byte");
    for f in files.iter().filter(|f| f.ends_with(".safetensors")) {
        let keys = |d: &Path| -> Vec<(String, Vec<i64>)> {
            ferrotune::util::safetensors::read_header(&d.join(f))
                .unwrap()
                .into_iter()
                .map(|e| (e.key, e.shape))
                .collect()
        };
        assert_eq!(keys(&run), keys(&hf), "{f}: the same tensors");
    }
    let ours = read_model_tensors(&run).unwrap();
    let theirs = read_model_tensors(&hf).unwrap();
    assert_eq!(ours.len(), theirs.len());
    for ((k, a), (_, b)) in ours.iter().zip(&theirs) {
        assert!(a.equal(b), "{k}: transformers saves the weights it loaded from ours");
    }

    let got = Tensor::read_safetensors(out.join("logits.safetensors")).unwrap();
    let get = |name: &str| got.iter().find(|(n, _)| n == name).unwrap().1.shallow_clone();
    let reloaded = PeftModel::new(CausalLM::load(&run, Device::Cpu, Kind::Float).unwrap());
    let logits = reloaded.forward(ForwardArgs::ids(&get("ids"))).unwrap();
    let err = relative_error(&logits, &get("logits"));
    eprintln!("sharded save in transformers vs ferrotune: relative logit error {err:.2e}");
    assert!(err <= TOLERANCE, "{err}");
    let original = PeftModel::new(model).forward(ForwardArgs::ids(&get("ids"))).unwrap();
    assert!(logits.equal(&original), "the sharded save reloads as the model saved");
    std::fs::remove_dir_all(root).ok();
}
