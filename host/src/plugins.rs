//! Finding, loading and instantiating plugins.
//!
//! Libraries are loaded one by one: first the frozen C manifest (`ferrotune_plugin_manifest`)
//! is read through libloading and the build fingerprint compared with the host's; only a
//! compatible library goes on to abi_stable's header and layout check
//! (`lib_header_from_path` + `init_root_module`). Loaded libraries are never unloaded
//! (libtorch keeps global state, and plugin objects may live until exit). Every failure is
//! a [`LoadError`] value; the process keeps running.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibraryError};
use abi_stable::std_types::{RResult, RStr};
use ferrotune_plugin_api::fingerprint::{BuildFingerprint, Incompatibility, Manifest};
use ferrotune_plugin_api::kinds::adapter::AdapterMethodHandle;
use ferrotune_plugin_api::kinds::dataset::DatasetFormatHandle;
use ferrotune_plugin_api::kinds::memory::MemoryStrategyHandle;
use ferrotune_plugin_api::kinds::objective::ObjectiveHandle;
use ferrotune_plugin_api::kinds::quantizer::QuantizerHandle;
use ferrotune_plugin_api::kinds::reward::RewardHandle;
use ferrotune_plugin_api::{PluginError, PluginInfo, PluginKind, PluginModule_Ref};

/// The environment variable holding extra plugin directories (`:`-separated).
pub const PLUGIN_PATH_VAR: &str = "FERROTUNE_PLUGIN_PATH";
/// The C symbol every plugin library exports (see `export_plugin!`).
pub const MANIFEST_SYMBOL: &[u8] = b"ferrotune_plugin_manifest\0";

/// Where a search directory came from (shown by `ferrotune plugins`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirSource {
    Flag,
    Env,
    Default,
}

/// The ordered list of directories searched for plugins: `--plugin-dir` flags, then
/// `FERROTUNE_PLUGIN_PATH`, then the defaults (the executable's folder, where the workspace
/// build puts plugins, and its `plugins/` subfolder, used by release bundles).
#[derive(Clone, Debug, Default)]
pub struct SearchPath {
    pub dirs: Vec<(PathBuf, DirSource)>,
}

impl SearchPath {
    pub fn new(flag_dirs: &[PathBuf], env_value: Option<&str>, include_defaults: bool) -> Self {
        let mut dirs: Vec<(PathBuf, DirSource)> =
            flag_dirs.iter().map(|d| (d.clone(), DirSource::Flag)).collect();
        if let Some(v) = env_value {
            dirs.extend(
                std::env::split_paths(v)
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(|p| (p, DirSource::Env)),
            );
        }
        if include_defaults {
            if let Some(exe_dir) =
                std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf))
            {
                dirs.push((exe_dir.join("plugins"), DirSource::Default));
                dirs.push((exe_dir, DirSource::Default));
            }
        }
        Self { dirs }
    }

    /// Flags, the environment variable and the defaults.
    pub fn from_env(flag_dirs: &[PathBuf]) -> Self {
        Self::new(flag_dirs, std::env::var(PLUGIN_PATH_VAR).ok().as_deref(), true)
    }

    /// Shared-library files in the search directories, in search order, each once.
    pub fn candidates(&self) -> Vec<PathBuf> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (dir, _) in &self.dirs {
            let Ok(entries) = std::fs::read_dir(dir) else { continue };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_shared_library(p))
                .collect();
            files.sort();
            for f in files {
                let key = f.canonicalize().unwrap_or_else(|_| f.clone());
                if seen.insert(key) {
                    out.push(f);
                }
            }
        }
        out
    }
}

fn is_shared_library(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("so" | "dylib" | "dll"))
}

/// Why a library was not loaded. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: no such file")]
    Missing { path: PathBuf },
    #[error("{path}: cannot be loaded as a shared library: {reason}")]
    NotLoadable { path: PathBuf, reason: String },
    #[error("{path}: not a ferrotune plugin (it exports no `ferrotune_plugin_manifest`; plugins end their lib.rs with `export_plugin!`)")]
    NotAPlugin { path: PathBuf },
    #[error("{path}: its `ferrotune_plugin_manifest` is unreadable (wrong magic or layout); rebuild it with `export_plugin!` from ferrotune-plugin-api")]
    BadManifest { path: PathBuf },
    #[error("{path}: refused: {why} (plugin built with {plugin})")]
    Incompatible { path: PathBuf, plugin: BuildFingerprint, why: Incompatibility },
    #[error("{path}: its types do not match this host's plugin-api ({summary}); rebuild the plugin against ferrotune-plugin-api {host_api}")]
    Layout { path: PathBuf, summary: String, host_api: String },
}

impl LoadError {
    pub fn path(&self) -> &Path {
        match self {
            Self::Missing { path }
            | Self::NotLoadable { path, .. }
            | Self::NotAPlugin { path }
            | Self::BadManifest { path }
            | Self::Incompatible { path, .. }
            | Self::Layout { path, .. } => path,
        }
    }
}

/// A loaded, compatible plugin library.
pub struct PluginLibrary {
    pub path: PathBuf,
    pub fingerprint: BuildFingerprint,
    pub plugins: Vec<PluginInfo>,
    module: PluginModule_Ref,
}

impl std::fmt::Debug for PluginLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginLibrary")
            .field("path", &self.path)
            .field("plugins", &self.plugins)
            .finish()
    }
}

/// Loads one library (see the module docs for the order of checks).
pub fn load_library(path: &Path) -> Result<PluginLibrary, LoadError> {
    let path = path.to_path_buf();
    if !path.exists() {
        return Err(LoadError::Missing { path });
    }
    // Look before loading: dlopen runs a library's initialisers, and some libraries abort
    // the process when loaded twice (a copy of libc10.so re-registers its flags). Only a
    // shared object that exports the manifest symbol is ever opened.
    exports_manifest(&path)?;
    // SAFETY: loading a library runs its initialisers; plugin directories are trusted the
    // way PATH is.
    let lib = unsafe { libloading::Library::new(&path) }
        .map_err(|e| LoadError::NotLoadable { path: path.clone(), reason: e.to_string() })?;
    let fingerprint = {
        // SAFETY: the symbol, when present, is `extern "C" fn() -> *const Manifest` (export_plugin!).
        let manifest = unsafe { lib.get::<extern "C" fn() -> *const Manifest>(MANIFEST_SYMBOL) }
            .map_err(|_| LoadError::NotAPlugin { path: path.clone() })?;
        // SAFETY: the manifest has a frozen C layout with 'static strings.
        unsafe { BuildFingerprint::from_manifest(manifest()) }
            .ok_or_else(|| LoadError::BadManifest { path: path.clone() })?
    };
    let host = BuildFingerprint::current();
    fingerprint.check_compatible_with(&host).map_err(|why| LoadError::Incompatible {
        path: path.clone(),
        plugin: fingerprint.clone(),
        why,
    })?;
    // Keep the library loaded for the life of the process.
    std::mem::forget(lib);
    let layout_err = |e: LibraryError| {
        let full = e.to_string();
        tracing::debug!(path = %path.display(), "abi_stable's full report:\n{full}");
        LoadError::Layout {
            path: path.clone(),
            summary: summarise(&full),
            host_api: host.api_version.clone(),
        }
    };
    let header = lib_header_from_path(&path).map_err(layout_err)?;
    let module = header.init_root_module::<PluginModule_Ref>().map_err(layout_err)?;
    let plugins = (module.plugins())().into_vec();
    Ok(PluginLibrary { path, fingerprint, plugins, module })
}

/// Checks, without loading it, that `path` is a shared object exporting the manifest symbol.
fn exports_manifest(path: &Path) -> Result<(), LoadError> {
    use object::{Object, ObjectKind};
    let data = std::fs::read(path)
        .map_err(|e| LoadError::NotLoadable { path: path.to_path_buf(), reason: e.to_string() })?;
    let file = object::File::parse(&*data).map_err(|e| LoadError::NotLoadable {
        path: path.to_path_buf(),
        reason: format!("not an object file this platform loads ({e})"),
    })?;
    if file.kind() != ObjectKind::Dynamic {
        return Err(LoadError::NotLoadable {
            path: path.to_path_buf(),
            reason: format!("a {:?} object, not a shared library", file.kind()),
        });
    }
    let wanted = &MANIFEST_SYMBOL[..MANIFEST_SYMBOL.len() - 1];
    let exported = file
        .exports()
        .map(|exports| {
            exports
                .iter()
                .any(|e| e.name() == wanted || e.name().strip_prefix(b"_") == Some(wanted))
        })
        .unwrap_or(false);
    if exported {
        Ok(())
    } else {
        Err(LoadError::NotAPlugin { path: path.to_path_buf() })
    }
}

/// abi_stable's layout errors run to hundreds of lines: keep the first meaningful one.
fn summarise(full: &str) -> String {
    let line = full.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("layout mismatch");
    let mut s: String = line.chars().take(200).collect();
    if line.chars().count() > 200 || full.lines().count() > 1 {
        s.push_str(" … (RUST_LOG=debug shows abi_stable's full report)");
    }
    s
}

/// A plugin that cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("no {kind} plugin named `{name}` is installed (installed {kind} plugins: {available}); see `ferrotune plugins`")]
    Unknown { kind: PluginKind, name: String, available: String },
    /// The plugin's error is part of the message, not a `source()`: an error chain printed with
    /// `{:#}` would say it twice.
    #[error("{kind} plugin `{name}` ({path}): {error}")]
    Plugin { kind: PluginKind, name: String, path: PathBuf, error: PluginError },
}

/// Every library found on a search path: the loaded ones and the refused ones.
#[derive(Default)]
pub struct Registry {
    pub libraries: Vec<PluginLibrary>,
    pub refused: Vec<LoadError>,
}

impl Registry {
    /// Tries every candidate on the search path.
    pub fn discover(search: &SearchPath) -> Self {
        let mut reg = Self::default();
        for path in search.candidates() {
            reg.add(&path);
        }
        reg
    }

    /// Loads one library into the registry; a failure is recorded, never fatal.
    pub fn add(&mut self, path: &Path) -> Option<&PluginLibrary> {
        match load_library(path) {
            Ok(lib) => {
                tracing::debug!(path = %lib.path.display(), plugins = lib.plugins.len(), "loaded plugin library");
                self.libraries.push(lib);
                self.libraries.last()
            }
            Err(e) => {
                tracing::debug!("refused {e}");
                self.refused.push(e);
                None
            }
        }
    }

    /// Every (library, plugin) in search order.
    pub fn plugins(&self) -> impl Iterator<Item = (&PluginLibrary, &PluginInfo)> {
        self.libraries.iter().flat_map(|l| l.plugins.iter().map(move |p| (l, p)))
    }

    /// The first library exporting plugin `name` of `kind` (later ones are shadowed).
    pub fn find(
        &self,
        kind: PluginKind,
        name: &str,
    ) -> Result<(&PluginLibrary, &PluginInfo), CreateError> {
        self.plugins().find(|(_, p)| p.kind == kind && p.name.as_str() == name).ok_or_else(|| {
            let names: BTreeSet<&str> = self
                .plugins()
                .filter(|(_, p)| p.kind == kind)
                .map(|(_, p)| p.name.as_str())
                .collect();
            CreateError::Unknown {
                kind,
                name: name.to_string(),
                available: if names.is_empty() {
                    "none".into()
                } else {
                    names.into_iter().collect::<Vec<_>>().join(", ")
                },
            }
        })
    }

    fn create<T>(
        &self,
        kind: PluginKind,
        name: &str,
        config_json: &str,
        constructor: impl FnOnce(
            &PluginModule_Ref,
        )
            -> extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<T, PluginError>,
    ) -> Result<T, CreateError> {
        let (lib, _) = self.find(kind, name)?;
        constructor(&lib.module)(name.into(), config_json.into()).into_result().map_err(|error| {
            CreateError::Plugin { kind, name: name.into(), path: lib.path.clone(), error }
        })
    }

    pub fn adapter(
        &self,
        name: &str,
        config_json: &str,
    ) -> Result<AdapterMethodHandle, CreateError> {
        self.create(PluginKind::ADAPTER, name, config_json, |m| m.create_adapter())
            .map(AdapterMethodHandle)
    }
    pub fn quantizer(&self, name: &str, config_json: &str) -> Result<QuantizerHandle, CreateError> {
        self.create(PluginKind::QUANTIZER, name, config_json, |m| m.create_quantizer())
            .map(QuantizerHandle)
    }
    pub fn objective(&self, name: &str, config_json: &str) -> Result<ObjectiveHandle, CreateError> {
        self.create(PluginKind::OBJECTIVE, name, config_json, |m| m.create_objective())
            .map(ObjectiveHandle)
    }
    pub fn reward(&self, name: &str, config_json: &str) -> Result<RewardHandle, CreateError> {
        self.create(PluginKind::REWARD, name, config_json, |m| m.create_reward()).map(RewardHandle)
    }
    pub fn dataset(
        &self,
        name: &str,
        config_json: &str,
    ) -> Result<DatasetFormatHandle, CreateError> {
        self.create(PluginKind::DATASET, name, config_json, |m| m.create_dataset())
            .map(DatasetFormatHandle)
    }
    pub fn memory(
        &self,
        name: &str,
        config_json: &str,
    ) -> Result<MemoryStrategyHandle, CreateError> {
        self.create(PluginKind::MEMORY, name, config_json, |m| m.create_memory())
            .map(MemoryStrategyHandle)
    }
    /// The capabilities of memory plugin `name` under `config_json` (none for a library built
    /// before the root module had `memory_capabilities`).
    pub fn memory_capabilities(
        &self,
        name: &str,
        config_json: &str,
    ) -> Result<Vec<String>, CreateError> {
        let (lib, _) = self.find(PluginKind::MEMORY, name)?;
        let Some(f) = lib.module.memory_capabilities() else { return Ok(Vec::new()) };
        f(name.into(), config_json.into())
            .into_result()
            .map(|v| v.into_iter().map(|s| s.into_string()).collect())
            .map_err(|error| CreateError::Plugin {
                kind: PluginKind::MEMORY,
                name: name.into(),
                path: lib.path.clone(),
                error,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_path_order_and_env_splitting() {
        let sp = SearchPath::new(&[PathBuf::from("/a")], Some("/b::/c"), false);
        let dirs: Vec<_> = sp.dirs.iter().map(|(d, s)| (d.to_str().unwrap(), s.clone())).collect();
        assert_eq!(
            dirs,
            vec![("/a", DirSource::Flag), ("/b", DirSource::Env), ("/c", DirSource::Env)]
        );
    }

    #[test]
    fn missing_and_non_library_files_are_errors() {
        let e = load_library(Path::new("/nonexistent/libx.so")).unwrap_err();
        assert!(matches!(e, LoadError::Missing { .. }), "{e}");
        let dir = std::env::temp_dir().join(format!("ferrotune-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("libjunk.so");
        std::fs::write(&junk, b"not an ELF file").unwrap();
        let e = load_library(&junk).unwrap_err();
        assert!(matches!(e, LoadError::NotLoadable { .. }), "{e}");
        assert!(e.to_string().contains("libjunk.so"));
        let reg = Registry::discover(&SearchPath::new(std::slice::from_ref(&dir), None, false));
        assert!(reg.libraries.is_empty());
        assert_eq!(reg.refused.len(), 1);
        let e = reg.find(PluginKind::ADAPTER, "lora").unwrap_err().to_string();
        assert!(e.contains("no adapter plugin named `lora`") && e.contains("none"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn summary_is_short() {
        let long = format!("Incompatible layout\n{}", "detail line\n".repeat(500));
        let s = summarise(&long);
        assert!(s.starts_with("Incompatible layout") && s.len() < 300, "{s}");
    }
}
