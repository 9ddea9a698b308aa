//! `ferrotune plugins` (the search path and what it holds) and `init-model`.
use anyhow::Result;
use ferrotune_plugin_api::fingerprint::BuildFingerprint;

use super::args::InitModelArgs;
use crate::device;
use crate::plugins::{self, DirSource, Registry, SearchPath};

pub fn init_model(a: InitModelArgs) -> Result<()> {
    use crate::model::init;
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
    println!(
        "special tokens: bos {}, eos {}, pad {}",
        id(r.bos_token_id),
        id(r.eos_token_id),
        id(r.pad_token_id)
    );
    Ok(())
}

pub fn print_plugins(search: &SearchPath, registry: &Registry) {
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
        println!(
            "{:<24} {:<10} {:<8} {:<12} {}",
            p.name,
            p.kind.to_string(),
            p.version,
            status,
            lib.path.display()
        );
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

/// `plugins --json`: the host, the search path, every plugin as [`plugins::plugins_json`] gives
/// it (with its config schema) plus where it came from, and the refused libraries.
pub fn plugins_json(search: &SearchPath, registry: &Registry) -> serde_json::Value {
    let mut listed = plugins::plugins_json(registry);
    let libraries = registry.plugins().map(|(lib, _)| lib);
    if let Some(entries) = listed["plugins"].as_array_mut() {
        for (entry, lib) in entries.iter_mut().zip(libraries) {
            entry["file"] = lib.path.display().to_string().into();
            entry["built_with"] = lib.fingerprint.to_string().into();
            entry["compatible"] = true.into();
        }
    }
    serde_json::json!({
        "host": BuildFingerprint::current().to_string(),
        "search_path": search.dirs.iter().map(|(d, _)| d.display().to_string()).collect::<Vec<_>>(),
        "plugins": listed["plugins"].take(),
        "refused": registry.refused.iter().map(|e| serde_json::json!({
            "file": e.path().display().to_string(),
            "compatible": false,
            "reason": e.to_string(),
        })).collect::<Vec<_>>(),
    })
}
