//! Adapters inside the model: attaching an adapter plugin to the linear layers it targets,
//! its trainable parameters and state dict under peft's names, and merging it into the
//! weights. PEFT directories are in `peft/mod.rs`, merged model directories in `model/save.rs`;
//! the adapters live in [`PeftModel`] (`peft/model.rs`).
//!
//! A model holds adapters by name (peft's first one is `default`); one is active at a time,
//! and [`PeftModel::forward`] runs it. [`PeftModel::mode`] with
//! [`ForwardFlags::DISABLE_ADAPTER`](ferrotune_plugin_api::ForwardFlags) runs the base model
//! alone (the reference model of DPO) without a second copy of the weights.
//!
//! Names are peft's: a trainable tensor or a saved tensor of module `m` is called
//! `base_model.model.<m>.<name the plugin gives>` (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
//! The method's own tensors (`AdapterMethod::root_state_dict`: a prompt method's
//! `prompt_embeddings`, VeRA's shared projections `base_model.vera_A` / `base_model.vera_B`)
//! keep the full key the method gives. In a [`super::PeftMethod`] row's `layer_tensors`, a
//! name starting with [`SHARED_STATE_PREFIX`] is such a tensor, read by several layers: the
//! header check expects it once, at the largest size any layer reads.
//!
//! `modules_to_save` (read from the method's `peft_config()`) is the host's, as peft's
//! `ModulesToSaveWrapper` is peft's: each named module (a linear layer, `lm_head` included, or
//! `model.embed_tokens`) gets a trainable full copy in the module's dtype, used while the
//! adapter runs; the original stays for adapter-disabled passes. The copy's tensors are
//! trained, saved and loaded as `base_model.model.<m>.weight` (and `.bias`), peft's saved
//! keys, and merging makes the copy the module's weight. A tied `lm_head` and the embedding
//! each get a copy of their own when both are named, as in peft: the originals stay tied, the
//! trained copies are two tensors, and a merge unties the head. peft never adapts a saved
//! module (LoRA leaves it out of its targets, as peft does); a method that targets one anyway
//! is an error.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::{
    module_name_matches, AdapterLayer, AdapterMethod, ModelInfo, PromptKind, PromptSpec, TrainParam,
};
use serde_json::Value;
use tch::Tensor;

use super::PeftModel;
use crate::model::linear::LinearBase;
use crate::model::llama::SCORE_HEAD;

/// What peft puts before a module path in parameter and state-dict names.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// The name peft gives the first adapter, and the one PEFT directories are loaded as.
pub const DEFAULT_ADAPTER: &str = "default";
/// Capability: `merged_weight` / `unmerged_weight` are exact, the adapter can be merged.
pub const CAP_MERGE: &str = "merge";
/// Capability: right after `adapt_linear` the host sets the base weight to
/// `layer.unmerged_weight(W)` (PiSSA, OLoRA: the base becomes the residual).
pub const CAP_INIT_REWRITES_BASE: &str = "init_rewrites_base";
/// Capability: the adapter's forward is `base.forward(x)` plus a part computed from `x` alone,
/// so rows of one batch may run different adapters (`serve`'s mixed batches).
pub const CAP_MIXED_BATCH: &str = "mixed_batch";

/// The full peft name of tensor `name` of module `module`.
pub fn peft_key(module: &str, name: &str) -> String {
    format!("{PEFT_PREFIX}{module}.{name}")
}

/// What a name in a [`super::PeftMethod`] row's `layer_tensors` starts with when the tensor is
/// the method's own, shared by its layers (see the module docs); peft keeps such state on its
/// tuner (`base_model.<name>`).
pub const SHARED_STATE_PREFIX: &str = "base_model.";

/// The full name of tensor `name` a row lists for the layer at `module`: [`peft_key`], or
/// `name` itself for shared state ([`SHARED_STATE_PREFIX`]).
pub fn state_key(module: &str, name: &str) -> String {
    if name.starts_with(SHARED_STATE_PREFIX) {
        name.to_string()
    } else {
        peft_key(module, name)
    }
}

/// peft's `task_type` of a sequence classifier's adapter (a reward model).
pub const SEQ_CLS_TASK: &str = "SEQ_CLS";
/// The head name peft adds to a `SEQ_CLS` adapter's `modules_to_save` beside `score`.
const SEQ_CLS_CLASSIFIER: &str = "classifier";

/// The key of a PEFT configuration naming the modules trained in full (peft's `modules_to_save`).
pub const MODULES_TO_SAVE: &str = "modules_to_save";

/// An adapter attached to a model.
pub(crate) struct AttachedAdapter {
    name: String,
    method: Box<dyn AdapterMethod>,
    /// Checkpoint paths of the adapted linear layers, in model order.
    modules: Vec<String>,
    /// Checkpoint paths of the modules it keeps a trainable copy of (`modules_to_save`), in
    /// model order.
    saved: Vec<String>,
    capabilities: Vec<String>,
    /// A prompt-learning method's shape, asked once at attach (forwards read it).
    prompt: Option<PromptSpec>,
}

/// The adapters of a model and the active one.
#[derive(Default)]
pub(crate) struct AdapterSet {
    entries: Vec<AttachedAdapter>,
    active: Option<String>,
}

impl AdapterSet {
    fn get(&self, name: &str) -> Option<&AttachedAdapter> {
        self.entries.iter().find(|a| a.name == name)
    }
}

/// What an adapter holds at one module.
enum Part<'a> {
    /// The plugin's layer on a linear layer.
    Layer(&'a dyn AdapterLayer),
    /// A trainable copy of a linear layer (`modules_to_save`).
    LinearCopy(&'a LinearBase),
    /// A trainable copy of the embedding matrix (`modules_to_save`).
    EmbedCopy(&'a Tensor),
}

impl Part<'_> {
    /// A copy's tensors (shallow clones), named relative to the module as peft saves them.
    fn copy_tensors(&self) -> Vec<(&'static str, Tensor)> {
        match self {
            Part::Layer(_) => Vec::new(),
            Part::LinearCopy(c) => std::iter::once(("weight", c.weight.shallow_clone()))
                .chain(c.bias.as_ref().map(|b| ("bias", b.shallow_clone())))
                .collect(),
            Part::EmbedCopy(t) => vec![("weight", t.shallow_clone())],
        }
    }

    /// Trainable tensors, names relative to the module.
    fn parameters(&self) -> Result<Vec<TrainParam>> {
        match self {
            Part::Layer(layer) => Ok(layer.parameters()?),
            // weight decay as transformers' Trainer applies it: none on biases.
            _ => Ok(self
                .copy_tensors()
                .into_iter()
                .map(|(n, t)| TrainParam {
                    weight_decay_scale: if n == "bias" { 0.0 } else { 1.0 },
                    ..TrainParam::new(n, t)
                })
                .collect()),
        }
    }

    /// Saved state, names relative to the module (detached copies).
    fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Part::Layer(layer) => Ok(layer.state_dict()?),
            _ => self
                .copy_tensors()
                .into_iter()
                .map(|(n, t)| Ok((n.to_string(), t.f_detach_copy()?)))
                .collect(),
        }
    }

    /// Copies a saved state in (the keys were checked against `state_dict`).
    fn load_state_dict(&self, tensors: Vec<(String, Tensor)>) -> Result<()> {
        match self {
            Part::Layer(layer) => Ok(tch::no_grad(|| layer.load_state_dict(tensors))?),
            _ => {
                let live = self.copy_tensors();
                for (n, t) in tensors {
                    let (_, dst) = live
                        .iter()
                        .find(|(m, _)| *m == n)
                        .with_context(|| format!("no tensor `{n}` in the copy"))?;
                    tch::no_grad(|| dst.shallow_clone().f_copy_(&t))?;
                }
                Ok(())
            }
        }
    }
}

/// `modules_to_save` of a method's PEFT configuration (absent or null: none).
fn modules_to_save(name: &str, method: &dyn AdapterMethod) -> Result<Vec<String>> {
    let config = method.peft_config().with_context(|| format!("adapter `{name}`: peft_config"))?;
    let config: Value = serde_json::from_str(&config)
        .with_context(|| format!("adapter `{name}`: its peft_config() is not JSON: {config}"))?;
    match config.get(MODULES_TO_SAVE) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                other => bail!(
                    "adapter `{name}`: `{MODULES_TO_SAVE}` must list module names, got {other}"
                ),
            })
            .collect(),
        Some(other) => bail!(
            "adapter `{name}`: `{MODULES_TO_SAVE}` must be a list of module names, got {other}"
        ),
    }
}

/// What [`PeftModel::attach_adapter`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachReport {
    pub adapter: String,
    /// Each adapted module (checkpoint path) with its number of trainable values.
    pub modules: Vec<(String, i64)>,
    /// Trainable values in all.
    pub trainable_parameters: i64,
    /// Each module kept as a trainable full copy (`modules_to_save`) with its number of values.
    pub saved_modules: Vec<(String, i64)>,
    /// The base weights the initialisation rewrote (PiSSA/OLoRA); empty otherwise.
    pub rewritten_base: Vec<String>,
    /// Whether a tied `lm_head` got a weight of its own (its base was rewritten).
    pub untied_lm_head: bool,
    pub capabilities: Vec<String>,
}

impl AttachReport {
    /// One line for people: `adapter default: 4 modules, 4,096 trainable parameters`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "adapter `{}`: {} module(s), {} trainable parameters",
            self.adapter,
            self.modules.len(),
            self.trainable_parameters
        );
        if !self.saved_modules.is_empty() {
            let names: Vec<&str> = self.saved_modules.iter().map(|(m, _)| m.as_str()).collect();
            s.push_str(&format!(", trainable copies of {} (modules_to_save)", names.join(", ")));
        }
        if !self.rewritten_base.is_empty() {
            s.push_str(&format!(
                ", base weight of {} module(s) rewritten by the initialisation",
                self.rewritten_base.len()
            ));
        }
        s
    }
}

/// `target_modules` as the method's `adapter_config.json` states it, for messages.
fn stated_targets(method: &dyn AdapterMethod) -> String {
    method
        .peft_config()
        .ok()
        .and_then(|c| serde_json::from_str::<Value>(&c).ok())
        .and_then(|c| c.get("target_modules").cloned())
        .map(|t| t.to_string())
        .unwrap_or_else(|| "(the method states none)".into())
}

fn few(names: &[String], n: usize) -> String {
    let mut s = names.iter().take(n).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > n {
        s.push_str(&format!(", … ({} in all)", names.len()));
    }
    s
}

/// What keeps the tensors `given` from being exactly the state `expected` (keys in model
/// order, with shapes): mis-shaped, missing and unexpected keys, one line naming them, or
/// `None` when they fit. A key given twice is an error.
fn state_mismatch(
    expected: &[(String, Vec<i64>)],
    given: &[(String, Vec<i64>)],
) -> Result<Option<String>> {
    let shapes: BTreeMap<&str, &Vec<i64>> = expected.iter().map(|(k, s)| (k.as_str(), s)).collect();
    let mut unexpected = Vec::new();
    let mut misshaped = Vec::new();
    let mut seen = BTreeSet::new();
    for (key, size) in given {
        if !seen.insert(key.as_str()) {
            bail!("adapter state: key `{key}` is given twice");
        }
        match shapes.get(key.as_str()) {
            None => unexpected.push(format!("`{key}` {size:?}")),
            Some(shape) if *shape != size => misshaped
                .push((key.as_str(), format!("`{key}` is {size:?}, this model's is {shape:?}"))),
            Some(_) => {}
        }
    }
    let missing: Vec<String> = expected
        .iter()
        .filter(|(k, _)| !seen.contains(k.as_str()))
        .map(|(k, _)| format!("`{k}`"))
        .collect();
    unexpected.sort();
    misshaped.sort_by_key(|(k, _)| expected.iter().position(|(o, _)| o == k));
    let misshaped: Vec<String> = misshaped.into_iter().map(|(_, m)| m).collect();
    if missing.is_empty() && unexpected.is_empty() && misshaped.is_empty() {
        return Ok(None);
    }
    let mut problems = Vec::new();
    if !misshaped.is_empty() {
        problems.push(format!("{} mis-shaped key(s): {}", misshaped.len(), few(&misshaped, 4)));
    }
    if !missing.is_empty() {
        problems.push(format!("{} missing key(s): {}", missing.len(), few(&missing, 4)));
    }
    if !unexpected.is_empty() {
        problems.push(format!("{} unexpected key(s): {}", unexpected.len(), few(&unexpected, 4)));
    }
    let hint = if misshaped.is_empty() { "" } else { " (an adapter made for another model?)" };
    Ok(Some(format!("{}{hint}", problems.join("; "))))
}

/// The tensors a saved adapter must hold for one adapted layer `[out, in]`, names relative to
/// the layer; an error names the configuration key that does not fit the layer. (A method's
/// row in [`crate::peft::PEFT_METHODS`].)
pub type LayerTensors =
    fn(config: &Value, module: &str, out: i64, inp: i64) -> Result<Vec<(String, Vec<i64>)>, String>;

impl PeftModel {
    /// Checks a saved adapter against this model before anything of it is allocated: the
    /// configuration of `method` (its `peft_config()`, read from `config_file`) against the
    /// model's modules (each `target_modules` name matches a linear layer, each adapted layer
    /// fits the configuration as the method's `row.layer_tensors` says: LoRA's `r` within the
    /// layer's widths),
    /// and the header of `weights_file` (`header`: names, dtypes and shapes only) against what
    /// the configuration and the model imply, the copies of `modules_to_save` included. Errors
    /// name the file and the key or tensor at fault.
    pub(crate) fn check_saved_adapter(
        &self,
        name: &str,
        method: &dyn AdapterMethod,
        row: &super::PeftMethod,
        config_file: &std::path::Path,
        weights_file: &std::path::Path,
        header: &[crate::util::safetensors::HeaderEntry],
    ) -> Result<()> {
        let (cf, wf) = (config_file.display(), weights_file.display());
        // A prompt-learning method adapts no layer: its own tensors are checked by name and
        // shape when they are loaded, against what it built from its configuration (its size
        // was bounded when it was attached).
        if method.prompt().with_context(|| format!("{cf}: adapter `{name}`: prompt"))?.is_some() {
            return super::refuse_non_float(header, weights_file);
        }
        let text =
            method.peft_config().with_context(|| format!("{cf}: adapter `{name}`: peft_config"))?;
        let config: Value = serde_json::from_str(&text)
            .with_context(|| format!("{cf}: the plugin's peft_config() is not JSON: {text}"))?;
        let saved = self
            .resolve_modules_to_save(name, &self.modules_to_save_of(name, method)?)
            .with_context(|| format!("{cf}: key `{MODULES_TO_SAVE}`"))?;
        let linears = self.linears();
        if let Some(Value::Array(names)) = config.get("target_modules") {
            for entry in names.iter().filter_map(Value::as_str) {
                if !linears.iter().any(|(m, _)| module_name_matches(m, entry)) {
                    let all: Vec<String> = linears.iter().map(|(n, _)| format!("`{n}`")).collect();
                    bail!(
                        "{cf}: key `target_modules` names `{entry}`, which matches no linear layer of this model (an adapter made \
                         for another architecture?); its linear layers are {}",
                        few(&all, 8)
                    );
                }
            }
        }
        let mut expected: Vec<(String, Vec<i64>)> = Vec::new();
        if saved.iter().any(|m| m == self.embed_tokens_path()) {
            expected
                .push((peft_key(self.embed_tokens_path(), "weight"), self.embed_tokens().size()));
        }
        let mut adapted = 0;
        for (module, lin) in &linears {
            let targeted = method
                .targets(module)
                .with_context(|| format!("adapter `{name}`: targets(`{module}`)"))?;
            let (out, inp) = (lin.out_features(), lin.in_features());
            if saved.iter().any(|m| m == module) {
                if targeted {
                    bail!(
                        "{cf}: `{module}` is both targeted (`target_modules`) and listed in `{MODULES_TO_SAVE}`; peft never adapts \
                         a module it saves in full"
                    );
                }
                expected.push((peft_key(module, "weight"), vec![out, inp]));
                if lin.bias.is_some() {
                    expected.push((peft_key(module, "bias"), vec![out]));
                }
            } else if targeted {
                adapted += 1;
                let tensors = (row.layer_tensors)(&config, module, out, inp)
                    .map_err(|e| anyhow::anyhow!("{cf}: {e}"))?;
                for (n, shape) in tensors {
                    let key = state_key(module, &n);
                    match expected.iter_mut().find(|(k, _)| *k == key) {
                        // shared state: each layer names the part it reads, the tensor covers
                        // them all (peft sizes VeRA's projections to the largest layer)
                        Some((_, have)) if have.len() == shape.len() => {
                            have.iter_mut().zip(&shape).for_each(|(h, s)| *h = (*h).max(*s))
                        }
                        Some((_, have)) => bail!(
                            "adapter `{name}`: shared tensor `{key}` is {have:?} for one layer and {shape:?} for `{module}`"
                        ),
                        None => expected.push((key, shape)),
                    }
                }
            }
        }
        if adapted == 0 {
            let all: Vec<String> = linears.iter().map(|(n, _)| format!("`{n}`")).collect();
            bail!(
                "{cf}: key `target_modules` = {} matches no linear layer of this model; its linear layers are {}",
                config.get("target_modules").map_or("(none)".to_string(), Value::to_string),
                few(&all, 8)
            );
        }
        if let Some(e) =
            header.iter().find(|e| !e.kind.is_some_and(crate::util::safetensors::is_float))
        {
            bail!(
                "{wf}: tensor `{}` has dtype `{}`; adapter tensors are floating point (F32, BF16, F16 or F64)",
                e.key,
                e.dtype_name
            );
        }
        let given: Vec<(String, Vec<i64>)> =
            header.iter().map(|e| (e.key.clone(), e.shape.clone())).collect();
        if let Some(problems) = state_mismatch(&expected, &given)? {
            let keys: Vec<String> = row
                .shape_keys
                .iter()
                .filter_map(|k| config.get(*k).map(|v| format!("`{k}` = {v}")))
                .collect();
            bail!(
                "loading {wf}: adapter state does not fit adapter `{name}` on this model ({adapted} modules adapted, {} saved in \
                 full): {problems}. The expected shapes follow from the model's layers{} in {cf}",
                saved.len(),
                if keys.is_empty() { String::new() } else { format!(" and {}", keys.join(", ")) }
            );
        }
        Ok(())
    }
}

impl PeftModel {
    /// Attaches adapter `name`: every linear layer whose checkpoint path `method` targets gets
    /// a layer of it (`lm_head` only when targeted), and every module its `modules_to_save`
    /// names a trainable copy (see the module docs). When the method has the capability
    /// `init_rewrites_base`, each adapted layer's base weight becomes `unmerged_weight(W)` (a
    /// tied `lm_head` then gets a weight of its own; the embeddings are left alone). The first
    /// adapter attached becomes the active one. On any error nothing stays attached.
    pub fn attach_adapter(
        &mut self,
        name: &str,
        method: Box<dyn AdapterMethod>,
    ) -> Result<AttachReport> {
        self.attach_keeping_originals(name, method).map(|(report, _)| report)
    }

    /// [`PeftModel::attach_adapter`], also returning the base weights it replaced (by module),
    /// so that [`PeftModel::detach_fresh_adapter`] can put them back exactly.
    pub(crate) fn attach_keeping_originals(
        &mut self,
        name: &str,
        method: Box<dyn AdapterMethod>,
    ) -> Result<(AttachReport, Vec<(String, Tensor)>)> {
        if name.is_empty() {
            bail!("an adapter needs a non-empty name");
        }
        if self.adapters.get(name).is_some() {
            bail!(
                "an adapter named `{name}` is already attached (attached: {})",
                self.adapter_names().join(", ")
            );
        }
        let saved =
            self.resolve_modules_to_save(name, &self.modules_to_save_of(name, method.as_ref())?)?;
        let prompt = method.prompt().with_context(|| format!("adapter `{name}`: prompt"))?;
        if let Some(p) = prompt {
            let max = self.config().max_position_embeddings;
            if p.num_virtual_tokens < 1 || p.num_virtual_tokens >= max {
                bail!(
                    "adapter `{name}`: num_virtual_tokens = {} must be between 1 and the model's max_position_embeddings - 1 = {}",
                    p.num_virtual_tokens,
                    max - 1
                );
            }
        }
        let capabilities = method.capabilities();
        let rewrites = capabilities.iter().any(|c| c == CAP_INIT_REWRITES_BASE);
        let was_tied = self.lm_head_is_tied();
        let mut report = AttachReport {
            adapter: name.to_string(),
            modules: Vec::new(),
            trainable_parameters: 0,
            saved_modules: Vec::new(),
            rewritten_base: Vec::new(),
            untied_lm_head: false,
            capabilities: capabilities.clone(),
        };
        // Original weights of rewritten layers, to put back if a later layer fails.
        let mut originals: Vec<(String, Tensor)> = Vec::new();
        let result = (|| -> Result<()> {
            let info = self.model_info(name, method.as_ref(), &saved)?;
            method.begin(&info).with_context(|| format!("adapter `{name}`: begin"))?;
            if saved.iter().any(|m| m == self.embed_tokens_path()) {
                let copy = self.embed_tokens().f_detach_copy()?.set_requires_grad(true);
                report
                    .saved_modules
                    .push((self.embed_tokens_path().to_string(), copy.numel() as i64));
                self.embed_copies.push((name.to_string(), copy));
            }
            for lin in self.linears_mut() {
                let module = lin.name.clone();
                let targeted = method
                    .targets(&module)
                    .with_context(|| format!("adapter `{name}`: targets(`{module}`)"))?;
                if saved.contains(&module) {
                    if targeted {
                        bail!(
                            "adapter `{name}`: `{module}` is both targeted by the adapter and listed in {MODULES_TO_SAVE}; peft never \
                             adapts a module it saves in full. Take it out of target_modules or out of {MODULES_TO_SAVE}"
                        );
                    }
                    let copy = lin.insert_copy(name)?;
                    let values = copy.weight.numel() as i64
                        + copy.bias.as_ref().map_or(0, |b| b.numel() as i64);
                    report.saved_modules.push((module, values));
                    continue;
                }
                if !targeted {
                    continue;
                }
                let layer = lin
                    .with_full_base(|base| method.adapt_linear(&module, base))?
                    .with_context(|| format!("adapter `{name}`: adapting `{module}`"))?;
                let params: i64 = layer
                    .parameters()
                    .with_context(|| format!("adapter `{name}`: parameters of `{module}`"))?
                    .iter()
                    .map(|p| p.tensor.numel() as i64)
                    .sum();
                if rewrites {
                    let dense = lin.dense_weight()?;
                    let rewritten = tch::no_grad(|| layer.unmerged_weight(&dense))
                        .with_context(|| format!("adapter `{name}`: the initial base weight of `{module}` (unmerged_weight)"))?;
                    if rewritten.size() != lin.weight.size() {
                        bail!("adapter `{name}`: unmerged_weight of `{module}` has shape {:?}, the layer {:?}", rewritten.size(), lin.weight.size());
                    }
                    originals.push((module.clone(), dense));
                    lin.set_base_weight(rewritten)?;
                    report.rewritten_base.push(module.clone());
                }
                lin.insert_adapter(name, layer);
                report.trainable_parameters += params;
                report.modules.push((module, params));
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.strip_adapter_layers(name, originals);
            return Err(e);
        }
        if report.modules.is_empty() && prompt.is_none() {
            self.strip_adapter_layers(name, originals);
            let all: Vec<String> = self.linears().iter().map(|(n, _)| format!("`{n}`")).collect();
            bail!(
                "adapter `{name}`: target_modules {} match no linear layer of this model{}; its linear layers are {}",
                stated_targets(method.as_ref()),
                if saved.is_empty() { String::new() } else { format!(" (modules in {MODULES_TO_SAVE} are never adapted: {})", saved.join(", ")) },
                few(&all, 8)
            );
        }
        report.trainable_parameters += report.saved_modules.iter().map(|(_, n)| n).sum::<i64>();
        match method.root_parameters() {
            Ok(own) => {
                report.trainable_parameters +=
                    own.iter().map(|p| p.tensor.numel() as i64).sum::<i64>()
            }
            Err(e) => {
                self.strip_adapter_layers(name, originals);
                return Err(
                    anyhow::Error::from(e).context(format!("adapter `{name}`: root_parameters"))
                );
            }
        }
        report.untied_lm_head = was_tied && !self.lm_head_is_tied();
        if report.untied_lm_head {
            tracing::info!("adapter `{name}` rewrote the base weight of the tied lm_head: lm_head now has a weight of its own");
        }
        tracing::info!("{}", report.summary());
        let modules = report.modules.iter().map(|(m, _)| m.clone()).collect();
        self.adapters.entries.push(AttachedAdapter {
            name: name.to_string(),
            method,
            modules,
            saved,
            capabilities,
            prompt,
        });
        if self.adapters.active.is_none() {
            self.adapters.active = Some(name.to_string());
        }
        Ok((report, originals))
    }

    /// The `modules_to_save` entries of `method` on this model. A model with a score head is a
    /// sequence classifier, and as peft's `SEQ_CLS` task does, its adapters always train a copy
    /// of the head: `score` is added when no entry names it, and peft's `classifier` (which it
    /// adds for other architectures' heads) is dropped when no module of this model has that
    /// name.
    fn modules_to_save_of(&self, name: &str, method: &dyn AdapterMethod) -> Result<Vec<String>> {
        let mut entries = modules_to_save(name, method)?;
        if self.score_head().is_some() {
            let modules = self.module_names();
            entries.retain(|e| {
                e != SEQ_CLS_CLASSIFIER || modules.iter().any(|(m, _)| module_name_matches(m, e))
            });
            if !entries.iter().any(|e| module_name_matches(SCORE_HEAD, e)) {
                entries.push(SCORE_HEAD.to_string());
            }
        }
        Ok(entries)
    }

    /// The modules `modules_to_save` names (each entry matches a module path as a target name
    /// does), in model order. An entry that matches nothing, or a module that is neither a
    /// linear layer nor the token embedding, is an error.
    fn resolve_modules_to_save(&self, name: &str, entries: &[String]) -> Result<Vec<String>> {
        let linears: BTreeSet<&str> = self.linears().into_iter().map(|(n, _)| n).collect();
        let modules = self.module_names();
        let mut saved = BTreeSet::new();
        for entry in entries {
            let hits: Vec<&(String, &str)> =
                modules.iter().filter(|(m, _)| module_name_matches(m, entry)).collect();
            if hits.is_empty() {
                bail!(
                    "adapter `{name}`: {MODULES_TO_SAVE} entry `{entry}` matches no module of this model (a module matches when its \
                     path equals the entry or ends with `.` + it); name a linear layer (`lm_head`, `q_proj`, ...) or `embed_tokens`"
                );
            }
            if let Some((m, what)) = hits
                .iter()
                .find(|(m, _)| m != self.embed_tokens_path() && !linears.contains(m.as_str()))
            {
                bail!(
                    "adapter `{name}`: {MODULES_TO_SAVE} entry `{entry}` names `{m}`, {what}; trainable copies are supported for \
                     linear layers (`lm_head` included) and `{}` only",
                    self.embed_tokens_path()
                );
            }
            saved.extend(hits.into_iter().map(|(m, _)| m.as_str()));
        }
        Ok(modules
            .iter()
            .filter(|(m, _)| saved.contains(m.as_str()))
            .map(|(m, _)| m.clone())
            .collect())
    }

    /// Takes adapter `name` off every layer (its copies too) and puts back the given original
    /// base weights.
    fn strip_adapter_layers(&mut self, name: &str, originals: Vec<(String, Tensor)>) {
        self.embed_copies.retain(|(n, _)| n != name);
        for lin in self.linears_mut() {
            lin.remove_adapter(name);
            lin.remove_copy(name);
            if let Some((_, w)) = originals.iter().find(|(m, _)| *m == lin.name) {
                if let Err(e) = lin.set_base_weight(w.shallow_clone()) {
                    tracing::warn!("putting back the base weight of `{}`: {e:#}", lin.name);
                }
            }
        }
    }

    /// Takes adapter `name` off again (a load that failed after attaching), putting back the
    /// base weights its initialisation replaced (`originals`, from `attach_keeping_originals`).
    pub(crate) fn detach_fresh_adapter(&mut self, name: &str, originals: Vec<(String, Tensor)>) {
        self.strip_adapter_layers(name, originals);
        self.adapters.entries.retain(|a| a.name != name);
        if self.adapters.active.as_deref() == Some(name) {
            self.adapters.active = self.adapters.entries.first().map(|a| a.name.clone());
        }
    }

    /// Takes adapter `name` off the model (its layers and copies; `serve` unloading an
    /// adapter). An adapter whose initialisation rewrote base weights (PiSSA, OLoRA) is
    /// refused: the original weights are gone, so it can only be merged or kept.
    pub fn remove_adapter(&mut self, name: &str) -> Result<()> {
        let Some(entry) = self.adapters.get(name) else {
            bail!(
                "no adapter named `{name}` is attached (attached: {})",
                none_if_empty(&self.adapter_names())
            );
        };
        if entry.capabilities.iter().any(|c| c == CAP_INIT_REWRITES_BASE) {
            bail!("adapter `{name}` rewrote base weights when it was attached ({CAP_INIT_REWRITES_BASE}); it cannot be removed");
        }
        self.detach_fresh_adapter(name, Vec::new());
        Ok(())
    }

    /// Whether rows running adapter `name` may share a batch with rows of other adapters
    /// ([`crate::model::linear::LinearMode::rows`]): its plugin declares [`CAP_MIXED_BATCH`] and it
    /// keeps no full copies of modules (`modules_to_save`). False for an unknown name.
    pub fn adapter_mixes(&self, name: &str) -> bool {
        self.adapters.get(name).is_some_and(|a| {
            a.saved.is_empty() && a.capabilities.iter().any(|c| c == CAP_MIXED_BATCH)
        })
    }

    /// Names of the attached adapters, in the order they were attached.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.entries.iter().map(|a| a.name.as_str()).collect()
    }

    /// The adapter [`PeftModel::forward`] runs, if any.
    pub fn active_adapter(&self) -> Option<&str> {
        self.adapters.active.as_deref()
    }

    /// Chooses the adapter [`PeftModel::forward`] runs (`None`: the base model).
    pub fn set_active_adapter(&mut self, name: Option<&str>) -> Result<()> {
        if let Some(n) = name {
            if self.adapters.get(n).is_none() {
                bail!(
                    "no adapter named `{n}` is attached (attached: {})",
                    none_if_empty(&self.adapter_names())
                );
            }
        }
        self.adapters.active = name.map(str::to_string);
        Ok(())
    }

    /// The modules the active adapter adapts (checkpoint paths, model order).
    pub fn adapted_modules(&self) -> Vec<&str> {
        self.adapters
            .active
            .as_deref()
            .and_then(|n| self.adapters.get(n))
            .map(|a| a.modules.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// The modules the active adapter keeps a trainable copy of (`modules_to_save`; checkpoint
    /// paths, model order).
    pub fn saved_modules(&self) -> Vec<&str> {
        self.adapters
            .active
            .as_deref()
            .and_then(|n| self.adapters.get(n))
            .map(|a| a.saved.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    fn active_entry(&self, what: &str) -> Result<&AttachedAdapter> {
        let name = self.adapters.active.as_deref().with_context(|| {
            format!("{what}: no adapter is active (attached: {}); attach one or call set_active_adapter", none_if_empty(&self.adapter_names()))
        })?;
        self.adapters
            .get(name)
            .with_context(|| format!("{what}: the active adapter `{name}` is not attached"))
    }

    /// What the active adapter holds at each module (plugin layers and copies), with the
    /// module paths, in model order.
    fn active_parts(&self, what: &str) -> Result<(&AttachedAdapter, Vec<(&str, Part<'_>)>)> {
        let entry = self.active_entry(what)?;
        let mut parts = Vec::with_capacity(entry.modules.len() + entry.saved.len());
        if let Some(copy) = self.embed_tokens_copy(&entry.name) {
            parts.push((self.embed_tokens_path(), Part::EmbedCopy(copy)));
        }
        for (module, lin) in self.linears() {
            if let Some(layer) = lin.adapter(&entry.name) {
                parts.push((module, Part::Layer(layer)));
            } else if let Some(copy) = lin.copy(&entry.name) {
                parts.push((module, Part::LinearCopy(copy)));
            }
        }
        Ok((entry, parts))
    }

    /// The active adapter's trainable tensors named `base_model.model.<module>.<name>`, with the
    /// plugin's learning-rate and weight-decay scales (LoRA+ gives B a larger learning rate),
    /// in model order. The copies of `modules_to_save` are `base_model.model.<module>.weight`
    /// (and `.bias`, without weight decay), learning rate ×1.
    pub fn trainable_parameters(&self) -> Result<Vec<TrainParam>> {
        let (entry, parts) = self.active_parts("trainable_parameters")?;
        let mut out: Vec<TrainParam> = entry
            .method
            .root_parameters()
            .with_context(|| format!("adapter `{}`: root_parameters", entry.name))?;
        for (module, part) in parts {
            let params = part
                .parameters()
                .with_context(|| format!("adapter `{}`: parameters of `{module}`", entry.name))?;
            out.extend(
                params.into_iter().map(|p| TrainParam { name: peft_key(module, &p.name), ..p }),
            );
        }
        Ok(out)
    }

    /// The active adapter's state under peft's full keys (`base_model.model.<module>.lora_A.weight`;
    /// `base_model.model.lm_head.weight` for a copy of `lm_head`), detached copies, what
    /// `adapter_model.safetensors` holds.
    pub fn adapter_state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let (entry, parts) = self.active_parts("adapter_state_dict")?;
        let mut out: Vec<(String, Tensor)> = entry
            .method
            .root_state_dict()
            .with_context(|| format!("adapter `{}`: root_state_dict", entry.name))?;
        for (module, part) in parts {
            let state = part
                .state_dict()
                .with_context(|| format!("adapter `{}`: state of `{module}`", entry.name))?;
            out.extend(state.into_iter().map(|(n, t)| (peft_key(module, &n), t)));
        }
        Ok(out)
    }

    /// Loads a state saved by [`PeftModel::adapter_state_dict`] or by peft into the active
    /// adapter (values are copied; dtypes and devices are converted). Every key must be there
    /// with its shape, and no other: missing, unexpected and mis-shaped keys are one error
    /// that names them.
    pub fn load_adapter_state_dict(&mut self, tensors: Vec<(String, Tensor)>) -> Result<()> {
        let (entry, parts) = self.active_parts("load_adapter_state_dict")?;
        // Expected keys in model order: part index, name relative to the module, shape.
        let mut expected: BTreeMap<String, (usize, String, Vec<i64>)> = BTreeMap::new();
        let mut order = Vec::new();
        // The method's own tensors (`root_state_dict`): reader `parts.len()`, full keys.
        for (k, t) in entry
            .method
            .root_state_dict()
            .with_context(|| format!("adapter `{}`: root_state_dict", entry.name))?
        {
            order.push(k.clone());
            expected.insert(k.clone(), (parts.len(), k, t.size()));
        }
        for (i, (module, part)) in parts.iter().enumerate() {
            for (n, t) in part
                .state_dict()
                .with_context(|| format!("adapter `{}`: state of `{module}`", entry.name))?
            {
                let key = peft_key(module, &n);
                order.push(key.clone());
                expected.insert(key, (i, n, t.size()));
            }
        }
        let given: Vec<(String, Vec<i64>)> =
            tensors.iter().map(|(k, t)| (k.clone(), t.size())).collect();
        let expected_list: Vec<(String, Vec<i64>)> =
            order.iter().map(|k| (k.clone(), expected[k].2.clone())).collect();
        if let Some(problems) = state_mismatch(&expected_list, &given)? {
            bail!(
                "adapter state does not fit adapter `{}` on this model ({} modules adapted, {} saved in full): {problems}",
                entry.name,
                entry.modules.len(),
                entry.saved.len(),
            );
        }
        let mut groups: Vec<Vec<(String, Tensor)>> =
            (0..=parts.len()).map(|_| Vec::new()).collect();
        for (key, t) in tensors {
            let (i, rel, _) = &expected[&key];
            groups[*i].push((rel.clone(), t));
        }
        let root = groups.pop().unwrap_or_default();
        if !root.is_empty() {
            tch::no_grad(|| entry.method.load_root_state_dict(root))
                .with_context(|| format!("adapter `{}`: loading its own tensors", entry.name))?;
        }
        for ((module, part), group) in parts.iter().zip(groups) {
            part.load_state_dict(group).with_context(|| {
                format!("adapter `{}`: loading the state of `{module}`", entry.name)
            })?;
        }
        Ok(())
    }

    /// Merges the active adapter into the weights: each adapted layer's base weight becomes
    /// `merged_weight(W)`, each module in `modules_to_save` becomes its trained copy, and the
    /// adapter is dropped. A tied `lm_head` gets a weight of its own when it or the embedding
    /// changes this way (the embeddings are otherwise left as they are). Returns the merged
    /// modules, adapted ones then saved ones.
    pub fn merge_adapter(&mut self) -> Result<Vec<String>> {
        let entry = self.active_entry("merge_adapter")?;
        let name = entry.name.clone();
        if let Some(p) = entry.prompt {
            bail!(
                "adapter `{name}` cannot be merged: it is a prompt-learning method ({} virtual tokens {}), which adds positions to \
                 the input instead of changing weights; serve or generate with the adapter instead",
                p.num_virtual_tokens,
                match p.kind {
                    PromptKind::VirtualTokens => "before the input embeddings",
                    PromptKind::KvPrefix => "of keys and values before every layer's own",
                }
            );
        }
        if !entry.capabilities.iter().any(|c| c == CAP_MERGE) {
            bail!("adapter `{name}` cannot be merged: its plugin does not declare the `{CAP_MERGE}` capability (it has: {})", none_if_empty(&entry.capabilities));
        }
        // Compute every merged weight first, so that a failure leaves the model untouched.
        let mut merged = Vec::new();
        for (module, lin) in self.linears() {
            if let Some(layer) = lin.adapter(&name) {
                let dense = lin.dense_weight()?;
                let w = tch::no_grad(|| layer.merged_weight(&dense))
                    .with_context(|| format!("adapter `{name}`: merging `{module}`"))?;
                if w.size() != lin.weight.size() {
                    bail!("adapter `{name}`: merged weight of `{module}` has shape {:?}, the layer {:?}", w.size(), lin.weight.size());
                }
                let old_bias = lin.base().bias.as_ref();
                let b = tch::no_grad(|| layer.merged_bias(old_bias))
                    .with_context(|| format!("adapter `{name}`: merging the bias of `{module}`"))?;
                let b = match (old_bias, b) {
                    (_, None) => None,
                    (None, Some(_)) => bail!(
                        "adapter `{name}`: merging would give `{module}` a bias, which the layer (and the model's config) does not have"
                    ),
                    (Some(old), Some(b)) => {
                        if b.size() != old.size() {
                            bail!("adapter `{name}`: merged bias of `{module}` has shape {:?}, the layer's {:?}", b.size(), old.size());
                        }
                        Some(b.f_to_kind(old.kind())?)
                    }
                };
                merged.push((module.to_string(), w.f_to_kind(lin.weight.kind())?, b));
            }
        }
        for lin in self.linears_mut() {
            if let Some(pos) = merged.iter().position(|(m, _, _)| *m == lin.name) {
                let (_, w, b) = merged.swap_remove(pos);
                lin.set_base_weight(w)?;
                if b.is_some() {
                    lin.base_mut().bias = b;
                }
                lin.remove_adapter(&name);
            }
            lin.merge_copy(&name);
        }
        if let Some(pos) = self.embed_copies.iter().position(|(n, _)| *n == name) {
            let (_, copy) = self.embed_copies.remove(pos);
            self.set_embed_tokens(copy.detach());
        }
        let pos = self
            .adapters
            .entries
            .iter()
            .position(|a| a.name == name)
            .expect("active adapter is attached");
        let entry = self.adapters.entries.remove(pos);
        self.adapters.active = None;
        tracing::info!("merged adapter `{name}` into {} module(s), {} saved module(s) replaced by their copies", entry.modules.len(), entry.saved.len());
        Ok(entry.modules.into_iter().chain(entry.saved).collect())
    }

    /// The `adapter_config.json` of the active adapter (the plugin's `peft_config()`).
    pub fn adapter_peft_config(&self) -> Result<Value> {
        let entry = self.active_entry("adapter_peft_config")?;
        let text = entry
            .method
            .peft_config()
            .with_context(|| format!("adapter `{}`: peft_config", entry.name))?;
        let mut config: Value = serde_json::from_str(&text).with_context(|| {
            format!("adapter `{}`: its peft_config() is not JSON: {text}", entry.name)
        })?;
        // A sequence classifier's adapter is peft's SEQ_CLS task, its head among the copies.
        if self.score_head().is_some() {
            if let Some(obj) = config.as_object_mut() {
                obj.insert("task_type".into(), Value::String(SEQ_CLS_TASK.into()));
                let mut saved: Vec<Value> = match obj.get(MODULES_TO_SAVE) {
                    Some(Value::Array(a)) => a.clone(),
                    _ => Vec::new(),
                };
                if !saved
                    .iter()
                    .any(|v| v.as_str().is_some_and(|e| module_name_matches(SCORE_HEAD, e)))
                {
                    saved.push(Value::String(SCORE_HEAD.into()));
                }
                obj.insert(MODULES_TO_SAVE.into(), Value::Array(saved));
            }
        }
        Ok(config)
    }
}

impl PeftModel {
    /// What [`AdapterMethod::begin`] is told about this model: the decoder's sizes and
    /// config, the linear layers `method` targets (not those in `saved`) and the frozen input
    /// embedding.
    fn model_info(
        &self,
        name: &str,
        method: &dyn AdapterMethod,
        saved: &[String],
    ) -> Result<ModelInfo> {
        let cfg = self.config();
        let mut linears = Vec::new();
        for (module, lin) in self.linears() {
            let targeted = method
                .targets(module)
                .with_context(|| format!("adapter `{name}`: targets(`{module}`)"))?;
            if targeted && !saved.iter().any(|m| m == module) {
                linears.push((module.to_string(), lin.out_features(), lin.in_features()));
            }
        }
        Ok(ModelInfo {
            config_json: serde_json::to_string(cfg)?,
            hidden_size: cfg.hidden_size,
            num_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.num_kv_heads(),
            head_dim: cfg.head_dim(),
            vocab_size: cfg.vocab_size,
            linears,
            word_embeddings: self.embed_tokens().detach(),
        })
    }

    /// The prompt-learning shape of adapter `name` (`None`: no such adapter, or one that adapts
    /// linear layers only).
    pub fn adapter_prompt(&self, name: &str) -> Option<PromptSpec> {
        self.adapters.get(name).and_then(|a| a.prompt)
    }

    /// Adapter `name`'s virtual tokens or key/value prefix (see [`PromptKind`]).
    pub(crate) fn adapter_prompt_forward(&self, name: &str, train: bool) -> Result<Tensor> {
        let a = self.adapters.get(name).with_context(|| format!("no adapter named `{name}`"))?;
        a.method.prompt_forward(train).with_context(|| format!("adapter `{name}`: prompt_forward"))
    }
}

fn none_if_empty<S: AsRef<str>>(names: &[S]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.iter().map(|s| s.as_ref()).collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::linear::LinearMode;
    use crate::model::weights::Weights;
    use crate::model::{CausalLM, ForwardArgs, LlamaConfig};
    use ferrotune_plugin_api::{AdapterLayer, BaseLinear, ForwardFlags, PluginError, PluginResult};
    use std::path::Path;
    use tch::{Device, Kind};

    /// A tiny tied Qwen2 in memory: hidden 8, 1 layer, vocab 16.
    pub(crate) fn tiny_model(tied: bool) -> PeftModel {
        let cfg = format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64, "vocab_size": 16,
               "tie_word_embeddings": {tied}, "rms_norm_eps": 1e-6}}"#
        );
        let config = LlamaConfig::from_json(&cfg, Path::new("config.json")).unwrap();
        tch::manual_seed(7);
        let o = (Kind::Float, Device::Cpu);
        let mut t: Vec<(String, Tensor)> =
            vec![("model.embed_tokens.weight".into(), Tensor::randn([16, 8], o))];
        let p = "model.layers.0";
        for (n, s) in [
            ("self_attn.q_proj", [8, 8]),
            ("self_attn.k_proj", [4, 8]),
            ("self_attn.v_proj", [4, 8]),
        ] {
            t.push((format!("{p}.{n}.weight"), Tensor::randn(s, o) * 0.3));
            t.push((format!("{p}.{n}.bias"), Tensor::randn([s[0]], o) * 0.1));
        }
        for (n, s) in [
            ("self_attn.o_proj", [8, 8]),
            ("mlp.gate_proj", [12, 8]),
            ("mlp.up_proj", [12, 8]),
            ("mlp.down_proj", [8, 12]),
        ] {
            t.push((format!("{p}.{n}.weight"), Tensor::randn(s, o) * 0.3));
        }
        for n in [
            format!("{p}.input_layernorm.weight"),
            format!("{p}.post_attention_layernorm.weight"),
            "model.norm.weight".into(),
        ] {
            t.push((n, Tensor::ones([8], o)));
        }
        if !tied {
            t.push(("lm_head.weight".into(), Tensor::randn([16, 8], o)));
        }
        let mut w = Weights::from_tensors(Path::new("memory"), t);
        PeftModel::new(CausalLM::from_weights(config, &mut w, Device::Cpu, Kind::Float).unwrap())
    }

    /// A test adapter: `y = base(x) + x Dᵀ` with a trainable `D` `[out, in]` (zero at init, or
    /// `W/2` with `halve`, which then rewrites the base to `W/2`: `init_rewrites_base`). Its
    /// `modules_to_save` goes into its peft config as stated; unlike LoRA it does not leave
    /// those modules out of its targets.
    pub(crate) struct Additive {
        pub targets: Vec<String>,
        pub halve: bool,
        pub merge: bool,
        pub modules_to_save: Vec<String>,
    }

    struct AdditiveLayer {
        d: Tensor,
    }

    impl AdapterMethod for Additive {
        fn targets(&self, module: &str) -> PluginResult<bool> {
            Ok(self.targets.iter().any(|t| module == t || module.ends_with(&format!(".{t}"))))
        }
        fn adapt_linear(
            &self,
            _module: &str,
            base: &dyn BaseLinear,
        ) -> PluginResult<Box<dyn AdapterLayer>> {
            let w = base.weight()?;
            let d = if self.halve { w.f_div_scalar(2.0)? } else { w.f_zeros_like()? };
            Ok(Box::new(AdditiveLayer { d: d.set_requires_grad(true) }))
        }
        fn peft_config(&self) -> PluginResult<String> {
            Ok(serde_json::json!({"peft_type": "ADDITIVE", "target_modules": self.targets, "modules_to_save": self.modules_to_save}).to_string())
        }
        fn capabilities(&self) -> Vec<String> {
            let mut c = Vec::new();
            if self.merge {
                c.push(CAP_MERGE.to_string());
            }
            if self.halve {
                c.push(CAP_INIT_REWRITES_BASE.to_string());
            }
            c
        }
    }

    impl AdapterLayer for AdditiveLayer {
        fn forward(&self, x: &Tensor, base: &dyn BaseLinear, train: bool) -> PluginResult<Tensor> {
            let x2 = if train { x.f_dropout(0.5, true)? } else { x.shallow_clone() };
            Ok(base.forward(x)?.f_add(&x2.f_linear::<Tensor>(&self.d, None)?)?)
        }
        fn parameters(&self) -> PluginResult<Vec<TrainParam>> {
            let mut p = TrainParam::new("delta", self.d.shallow_clone());
            p.lr_scale = 2.0;
            Ok(vec![p])
        }
        fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
            Ok(vec![("delta".into(), self.d.f_detach_copy()?)])
        }
        fn load_state_dict(&self, tensors: Vec<(String, Tensor)>) -> PluginResult<()> {
            for (n, t) in tensors {
                if n != "delta" {
                    return Err(PluginError::invalid(format!("unexpected `{n}`")));
                }
                self.d.shallow_clone().f_copy_(&t)?;
            }
            Ok(())
        }
        fn merged_weight(&self, w: &Tensor) -> PluginResult<Tensor> {
            Ok(w.f_add(&self.d)?)
        }
        fn unmerged_weight(&self, w: &Tensor) -> PluginResult<Tensor> {
            Ok(w.f_sub(&self.d)?)
        }
    }

    pub(crate) fn additive(targets: &[&str]) -> Box<Additive> {
        saving(targets, &[])
    }

    /// [`additive`] with `modules_to_save`.
    pub(crate) fn saving(targets: &[&str], modules_to_save: &[&str]) -> Box<Additive> {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Box::new(Additive {
            targets: strings(targets),
            halve: false,
            merge: true,
            modules_to_save: strings(modules_to_save),
        })
    }

    fn ids() -> Tensor {
        Tensor::from_slice(&[1i64, 5, 9, 3, 12, 0]).view([2, 3])
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Gives every adapter tensor a non-zero value, through load_adapter_state_dict.
    fn perturb(m: &mut PeftModel) {
        let sd: Vec<_> = m
            .adapter_state_dict()
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.randn_like() * 0.2))
            .collect();
        m.load_adapter_state_dict(sd).unwrap();
    }

    #[test]
    fn attach_targets_names_and_counts() {
        let mut m = tiny_model(true);
        let r = m.attach_adapter("default", additive(&["q_proj", "down_proj"])).unwrap();
        assert_eq!(
            r.modules,
            vec![
                ("model.layers.0.self_attn.q_proj".to_string(), 64),
                ("model.layers.0.mlp.down_proj".to_string(), 96)
            ]
        );
        assert_eq!(r.trainable_parameters, 160);
        assert_eq!(m.active_adapter(), Some("default"));
        let p = m.trainable_parameters().unwrap();
        let names: Vec<_> = p.iter().map(|p| (p.name.as_str(), p.lr_scale)).collect();
        assert_eq!(
            names,
            vec![
                ("base_model.model.model.layers.0.self_attn.q_proj.delta", 2.0),
                ("base_model.model.model.layers.0.mlp.down_proj.delta", 2.0)
            ]
        );
        assert!(p.iter().all(|p| p.tensor.requires_grad()));
        let keys: Vec<_> = m.adapter_state_dict().unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            vec![
                "base_model.model.model.layers.0.self_attn.q_proj.delta",
                "base_model.model.model.layers.0.mlp.down_proj.delta"
            ]
        );
        let e = m.attach_adapter("default", additive(&["q_proj"])).unwrap_err().to_string();
        assert!(e.contains("already attached"), "{e}");
    }

    #[test]
    fn targets_matching_nothing_name_the_targets_and_some_modules() {
        let mut m = tiny_model(true);
        let e = m.attach_adapter("x", additive(&["qkv_proj"])).unwrap_err().to_string();
        assert!(
            e.contains(r#"["qkv_proj"]"#)
                && e.contains("model.layers.0.self_attn.q_proj")
                && e.contains("lm_head"),
            "{e}"
        );
        assert!(m.adapter_names().is_empty() && m.active_adapter().is_none());
    }

    #[test]
    fn adapter_changes_the_forward_only_when_enabled() {
        let mut m = tiny_model(true);
        let base = m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap();
        m.attach_adapter("default", additive(&["q_proj", "v_proj", "down_proj", "lm_head"]))
            .unwrap();
        assert_eq!(
            max_diff(&m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap(), &base),
            0.0,
            "D = 0 at init"
        );
        perturb(&mut m);
        let adapted = m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap();
        assert!(max_diff(&adapted, &base) > 1e-3);
        let reference = m
            .forward(ForwardArgs::ids(&ids()).mode(m.mode(ForwardFlags::DISABLE_ADAPTER, false)))
            .unwrap();
        assert_eq!(max_diff(&reference, &base), 0.0, "DISABLE_ADAPTER runs the base model");
        assert_eq!(
            max_diff(&m.forward(ForwardArgs::ids(&ids()).mode(LinearMode::BASE)).unwrap(), &base),
            0.0
        );
        // the training flag reaches the adapter (dropout)
        let train =
            m.forward(ForwardArgs::ids(&ids()).mode(m.mode(ForwardFlags::NONE, true))).unwrap();
        assert!(max_diff(&train, &adapted) > 1e-4);
        // and an inactive adapter is not run
        m.set_active_adapter(None).unwrap();
        assert_eq!(
            max_diff(&m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap(), &base),
            0.0
        );
        assert!(m.set_active_adapter(Some("nope")).unwrap_err().to_string().contains("`nope`"));
        // the tied embedding is untouched by an adapter on lm_head
        assert!(m.lm_head_is_tied());
    }

    #[test]
    fn load_state_errors_name_the_keys() {
        let mut m = tiny_model(true);
        m.attach_adapter("default", additive(&["q_proj", "v_proj"])).unwrap();
        let good = m.adapter_state_dict().unwrap();
        let q = "base_model.model.model.layers.0.self_attn.q_proj.delta";
        let v = "base_model.model.model.layers.0.self_attn.v_proj.delta";
        let mut bad: Vec<_> = good.iter().map(|(k, t)| (k.clone(), t.copy())).collect();
        bad[1].1 = Tensor::zeros([5, 8], (Kind::Float, Device::Cpu));
        let _ = bad.remove(0);
        bad.push((
            "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight".into(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        ));
        let e = m.load_adapter_state_dict(bad).unwrap_err().to_string();
        assert!(e.contains(&format!("`{v}` is [5, 8], this model's is [4, 8]")), "{e}");
        assert!(e.contains(&format!("missing key(s): `{q}`")), "{e}");
        assert!(e.contains("unexpected key(s): `base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight`"), "{e}");
        m.load_adapter_state_dict(good).unwrap();
    }

    #[test]
    fn merge_equals_the_adapted_forward_and_unties_a_tied_head() {
        let mut m = tiny_model(true);
        let embed_before = m.embed_tokens().copy();
        m.attach_adapter("default", additive(&["q_proj", "up_proj", "lm_head"])).unwrap();
        perturb(&mut m);
        let adapted = m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap();
        let merged = m.merge_adapter().unwrap();
        assert_eq!(merged.len(), 3);
        assert!(m.adapter_names().is_empty() && m.active_adapter().is_none());
        assert!(
            max_diff(&m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap(), &adapted)
                < 1e-5
        );
        assert!(!m.lm_head_is_tied(), "the merged head has a weight of its own");
        assert_eq!(max_diff(m.embed_tokens(), &embed_before), 0.0, "the embeddings are unchanged");
        let keys: Vec<_> = m.named_weights().into_iter().map(|(k, _)| k).collect();
        assert!(keys.contains(&"lm_head.weight".to_string()));
        assert!(m.merge_adapter().unwrap_err().to_string().contains("no adapter is active"));
    }

    #[test]
    fn merge_needs_the_capability() {
        let mut m = tiny_model(false);
        m.attach_adapter("a", Box::new(Additive { merge: false, ..*additive(&["q_proj"]) }))
            .unwrap();
        let e = m.merge_adapter().unwrap_err().to_string();
        assert!(e.contains("`merge`"), "{e}");
        assert_eq!(m.adapter_names(), vec!["a"]);
    }

    #[test]
    fn init_rewrites_base_keeps_the_function_and_rolls_back_on_error() {
        let mut m = tiny_model(true);
        let base = m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap();
        let q_before = m.linears()[0].1.weight.copy();
        let r = m
            .attach_adapter(
                "p",
                Box::new(Additive { halve: true, ..*additive(&["q_proj", "lm_head"]) }),
            )
            .unwrap();
        assert_eq!(r.rewritten_base.len(), 2);
        assert!(r.untied_lm_head && !m.lm_head_is_tied());
        assert!(
            max_diff(&m.linears()[0].1.weight, &(&q_before / 2.0)) < 1e-7,
            "the base became the residual"
        );
        assert!(
            max_diff(&m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap(), &base)
                < 1e-5,
            "W_res + D = W"
        );
        // a failed load takes the fresh adapter off and gives the base weight back
        let originals =
            vec![("model.layers.0.self_attn.q_proj".to_string(), q_before.shallow_clone())];
        m.detach_fresh_adapter("p", originals);
        assert!(m.adapter_names().is_empty());
        assert_eq!(max_diff(&m.linears()[0].1.weight, &q_before), 0.0);
    }

    fn no_copies_left(m: &PeftModel) -> bool {
        m.embed_copies.is_empty() && m.linears().iter().all(|(_, l)| l.copy("default").is_none())
    }

    #[test]
    fn modules_to_save_train_full_copies_used_only_while_the_adapter_runs() {
        let mut m = tiny_model(true);
        let base = m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap();
        let r =
            m.attach_adapter("default", saving(&["q_proj"], &["lm_head", "embed_tokens"])).unwrap();
        assert_eq!(
            r.saved_modules,
            vec![("model.embed_tokens".to_string(), 128), ("lm_head".to_string(), 128)]
        );
        assert_eq!(r.modules, vec![("model.layers.0.self_attn.q_proj".to_string(), 64)]);
        assert_eq!(r.trainable_parameters, 64 + 2 * 128);
        assert_eq!(m.saved_modules(), vec!["model.embed_tokens", "lm_head"]);
        let p = m.trainable_parameters().unwrap();
        let names: Vec<_> =
            p.iter().map(|p| (p.name.as_str(), p.lr_scale, p.weight_decay_scale)).collect();
        assert_eq!(
            names,
            vec![
                ("base_model.model.model.embed_tokens.weight", 1.0, 1.0),
                ("base_model.model.model.layers.0.self_attn.q_proj.delta", 2.0, 1.0),
                ("base_model.model.lm_head.weight", 1.0, 1.0)
            ]
        );
        assert!(p.iter().all(|p| p.tensor.requires_grad()));
        // each a copy of its own: of each other, of the (tied) original
        let ptrs: BTreeSet<usize> = [&p[0].tensor, &p[2].tensor, m.embed_tokens()]
            .iter()
            .map(|t| t.data_ptr() as usize)
            .collect();
        assert_eq!(ptrs.len(), 3);
        assert_eq!(
            p[0].tensor.kind(),
            m.embed_tokens().kind(),
            "the copy keeps the module's dtype"
        );
        assert_eq!(
            max_diff(&m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap(), &base),
            0.0,
            "copies equal the originals at init"
        );

        perturb(&mut m);
        let adapted = m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap();
        assert!(max_diff(&adapted, &base) > 1e-3);
        // closed form: the logits are the hidden states times the copied head
        let head = m.linears().last().unwrap().1.copy("default").unwrap().weight.shallow_clone();
        let hidden = m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode()).hidden()).unwrap();
        assert!(max_diff(&adapted, &hidden.linear::<Tensor>(&head, None)) < 1e-6);
        assert!(max_diff(&head, m.embed_tokens()) > 1e-3, "the copy moved, the original did not");
        let disabled = m
            .forward(ForwardArgs::ids(&ids()).mode(m.mode(ForwardFlags::DISABLE_ADAPTER, false)))
            .unwrap();
        assert_eq!(max_diff(&disabled, &base), 0.0, "DISABLE_ADAPTER runs the originals");
        assert!(m.lm_head_is_tied());

        // gradients reach the copies
        m.forward(ForwardArgs::ids(&ids()).mode(m.mode(ForwardFlags::NONE, false)))
            .unwrap()
            .square()
            .sum(Kind::Float)
            .backward();
        for p in m.trainable_parameters().unwrap() {
            assert!(
                p.tensor.grad().defined()
                    && p.tensor.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{}",
                p.name
            );
        }
        assert!(!m.embed_tokens().grad().defined(), "the original is frozen");

        // the state round-trips under peft's keys
        let state = m.adapter_state_dict().unwrap();
        let keys: Vec<_> = state.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "base_model.model.model.embed_tokens.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.delta",
                "base_model.model.lm_head.weight"
            ]
        );
        // (not `perturb`: other tests re-seed the global generator meanwhile)
        m.load_adapter_state_dict(state.iter().map(|(k, t)| (k.clone(), t + 0.5)).collect())
            .unwrap();
        assert!(
            max_diff(&m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap(), &adapted)
                > 1e-3
        );
        m.load_adapter_state_dict(state).unwrap();
        assert_eq!(
            max_diff(&m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap(), &adapted),
            0.0
        );

        // merge: the copies become the weights, the head and the embedding part ways
        let merged = m.merge_adapter().unwrap();
        assert_eq!(
            merged,
            vec!["model.layers.0.self_attn.q_proj", "model.embed_tokens", "lm_head"]
        );
        assert!(
            max_diff(&m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap(), &adapted)
                < 1e-5
        );
        assert!(!m.lm_head_is_tied() && no_copies_left(&m));
        assert_eq!(max_diff(&m.linears().last().unwrap().1.weight, &head), 0.0);
        assert!(m.named_weights().iter().any(|(k, _)| k == "lm_head.weight"));
    }

    #[test]
    fn a_saved_embedding_unties_the_head_on_merge_and_a_saved_linear_keeps_its_bias() {
        let mut m = tiny_model(true);
        let embed = m.embed_tokens().copy();
        m.attach_adapter("default", saving(&["v_proj"], &["embed_tokens", "self_attn.q_proj"]))
            .unwrap();
        let p = m.trainable_parameters().unwrap();
        let names: Vec<_> = p.iter().map(|p| (p.name.as_str(), p.weight_decay_scale)).collect();
        assert_eq!(
            names,
            vec![
                ("base_model.model.model.embed_tokens.weight", 1.0),
                ("base_model.model.model.layers.0.self_attn.q_proj.weight", 1.0),
                ("base_model.model.model.layers.0.self_attn.q_proj.bias", 0.0),
                ("base_model.model.model.layers.0.self_attn.v_proj.delta", 1.0)
            ]
        );
        perturb(&mut m);
        let adapted = m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap();
        m.merge_adapter().unwrap();
        assert!(
            max_diff(&m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap(), &adapted)
                < 1e-5
        );
        assert!(!m.lm_head_is_tied(), "the head keeps the original embedding");
        assert_eq!(max_diff(&m.linears().last().unwrap().1.weight, &embed), 0.0);
        assert!(max_diff(m.embed_tokens(), &embed) > 1e-3);
    }

    #[test]
    fn modules_to_save_errors_name_the_entry_and_leave_nothing_attached() {
        for (saved, targets, want) in [
            (vec!["norm"], vec!["q_proj"], "names `model.norm`, an RMSNorm"),
            (vec!["mlp"], vec!["q_proj"], "names `model.layers.0.mlp`, an MLP block"),
            (vec!["head"], vec!["q_proj"], "entry `head` matches no module"),
            (vec!["lm_head", "q_proj"], vec!["q_proj"], "`model.layers.0.self_attn.q_proj` is both targeted by the adapter and listed in modules_to_save"),
            (vec!["lm_head"], vec!["lm_head"], "`lm_head` is both targeted"),
            (vec!["lm_head"], vec!["qkv_proj"], "modules in modules_to_save are never adapted: lm_head"),
        ] {
            let mut m = tiny_model(true);
            let base = m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap();
            let e = format!("{:#}", m.attach_adapter("default", saving(&targets, &saved)).unwrap_err());
            assert!(e.contains(want), "{saved:?}: {e}");
            assert!(m.adapter_names().is_empty() && no_copies_left(&m), "{saved:?}");
            assert_eq!(max_diff(&m.forward(ForwardArgs::ids(&ids()).mode(m.eval_mode())).unwrap(), &base), 0.0);
        }
        let mut m = tiny_model(false);
        m.attach_adapter("default", saving(&["q_proj"], &["lm_head"])).unwrap();
        let mut state = m.adapter_state_dict().unwrap();
        state[1].1 = Tensor::zeros([15, 8], (Kind::Float, Device::Cpu));
        let e = m.load_adapter_state_dict(state).unwrap_err().to_string();
        assert!(
            e.contains("`base_model.model.lm_head.weight` is [15, 8], this model's is [16, 8]")
                && e.contains("1 saved in full"),
            "{e}"
        );
    }

    #[test]
    fn named_weights_are_checkpoint_keys() {
        let m = tiny_model(true);
        let keys: Vec<_> = m.named_weights().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys.len(), 1 + 2 + 3 * 2 + 4 + 1, "{keys:?}");
        assert!(!keys.contains(&"lm_head.weight".to_string()), "a tied head is not saved");
        assert!(keys.contains(&"model.layers.0.self_attn.q_proj.bias".to_string()));
        assert_eq!(tiny_model(false).named_weights().last().unwrap().0, "lm_head.weight");
    }
}
