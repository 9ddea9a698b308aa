//! Finding, loading and instantiating plugins.
//!
//! Libraries are loaded one by one, none of them trusted until checked:
//! 1. Before the file is opened, its dynamic symbol table (ELF) must export
//!    `ferrotune_plugin_manifest` as a function in executable code, and abi_stable's header
//!    as a data object of the right size in a loaded segment.
//! 2. After `dlopen`, the resolved symbols must be this file's own, and the manifest the
//!    function returns is read only where the library's loaded, readable segments (from
//!    `dl_iterate_phdr`) hold it: the magic first, then the layout (a newer one is refused
//!    by number), then the fixed size of that layout, then each string (NUL-terminated
//!    within bounds, UTF-8). The build fingerprint is compared with the host's.
//! 3. Only a compatible library goes on to abi_stable's header and layout check
//!    (`lib_header_from_path` + `init_root_module`).
//!
//! What is not guarded: a manifest function or library initialiser that itself crashes
//! (plugin directories are trusted to hold code, the way PATH is). Loaded libraries are never unloaded
//! (libtorch keeps global state, and plugin objects may live until exit). Every failure is
//! a [`LoadError`] value; the process keeps running.
use std::collections::BTreeSet;
use std::ffi::c_char;
use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibHeader, LibraryError, ROOT_MODULE_LOADER_NAME};
use abi_stable::std_types::{RResult, RStr};
use ferrotune_plugin_api::fingerprint::{
    manifest_size, BuildFingerprint, Incompatibility, Manifest, MANIFEST_HEAD_SIZE,
    MANIFEST_LAYOUT, MANIFEST_MAGIC,
};
use ferrotune_plugin_api::kinds::adapter::AdapterMethodHandle;
use ferrotune_plugin_api::kinds::dataset::DatasetFormatHandle;
use ferrotune_plugin_api::kinds::memory::MemoryStrategyHandle;
use ferrotune_plugin_api::kinds::objective::ObjectiveHandle;
use ferrotune_plugin_api::kinds::quantizer::QuantizerHandle;
use ferrotune_plugin_api::kinds::reward::RewardHandle;
use ferrotune_plugin_api::module::{ConfigSchemaFn, CONFIG_SCHEMA_SYMBOL};
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

/// Why a library was not loaded. Each message names the file and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: no such file")]
    Missing { path: PathBuf },
    #[error("{path}: cannot be loaded as a shared library: {reason}")]
    NotLoadable { path: PathBuf, reason: String },
    #[error("{path}: not a ferrotune plugin (it exports no `ferrotune_plugin_manifest`; plugins end their lib.rs with `export_plugin!`)")]
    NotAPlugin { path: PathBuf },
    /// An exported symbol is missing, of the wrong type or in the wrong place (read from the
    /// file's dynamic symbol table before loading, or reported by the dynamic linker).
    #[error("{path}: cannot load symbol `{symbol}`: {reason}; rebuild the plugin with `export_plugin!` from ferrotune-plugin-api")]
    Symbol { path: PathBuf, symbol: String, reason: String },
    #[error("{path}: its `ferrotune_plugin_manifest` is unreadable: {reason}; rebuild the plugin with `export_plugin!` from ferrotune-plugin-api")]
    BadManifest { path: PathBuf, reason: String },
    #[error("{path}: manifest layout {layout} is newer than this host's {host}; upgrade ferrotune (or rebuild the plugin against this host's ferrotune-plugin-api)")]
    FutureManifest { path: PathBuf, layout: u32, host: u32 },
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
            | Self::Symbol { path, .. }
            | Self::BadManifest { path, .. }
            | Self::FutureManifest { path, .. }
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
    /// `ferrotune_plugin_config_schema`, where the library exports it.
    config_schema_fn: Option<ConfigSchemaFn>,
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
    // shared object that exports the manifest symbol as a function is ever opened.
    let exports = read_exports(&path)?;
    // SAFETY: loading a library runs its initialisers; plugin directories are trusted the
    // way PATH is.
    let lib = unsafe { libloading::Library::new(&path) }
        .map_err(|e| LoadError::NotLoadable { path: path.clone(), reason: e.to_string() })?;
    let (fingerprint, image) = read_manifest(&lib, &path, &exports)?;
    let host = BuildFingerprint::current();
    fingerprint.check_compatible_with(&host).map_err(|why| LoadError::Incompatible {
        path: path.clone(),
        plugin: fingerprint.clone(),
        why,
    })?;
    // abi_stable reads its header static before checking anything: check where it lies first.
    check_header_static(&lib, &path, &exports, image.as_ref())?;
    let config_schema_fn = config_schema_symbol(&lib, &exports, image.as_ref());
    // Keep the library loaded for the life of the process (so the function above stays valid).
    std::mem::forget(lib);
    let abi_err = |e: LibraryError| match e {
        LibraryError::OpenError { err, .. } => {
            LoadError::NotLoadable { path: path.clone(), reason: err.to_string() }
        }
        LibraryError::GetSymbolError { symbol, err, .. } => LoadError::Symbol {
            path: path.clone(),
            symbol: String::from_utf8_lossy(&symbol).trim_end_matches('\0').to_string(),
            reason: err.to_string(),
        },
        e => {
            let full = e.to_string();
            tracing::debug!(path = %path.display(), "abi_stable's full report:\n{full}");
            LoadError::Layout {
                path: path.clone(),
                summary: summarise(&full),
                host_api: host.api_version.clone(),
            }
        }
    };
    let header = lib_header_from_path(&path).map_err(abi_err)?;
    let module = header.init_root_module::<PluginModule_Ref>().map_err(abi_err)?;
    let plugins = (module.plugins())().into_vec();
    Ok(PluginLibrary { path, fingerprint, plugins, module, config_schema_fn })
}

/// The library's optional `ferrotune_plugin_config_schema` (see
/// [`CONFIG_SCHEMA_SYMBOL`]): `None` when it lacks it (built before it), or when the symbol the
/// dynamic linker resolves is not this file's function in code. It is only called after
/// abi_stable's layout check has passed, which covers every type in its signature.
fn config_schema_symbol(
    lib: &libloading::Library,
    exports: &Exports,
    image: Option<&mapped::Image>,
) -> Option<ConfigSchemaFn> {
    // ELF files say where it is; only then is it resolved, and it must resolve there.
    let file_addr = match (exports.manifest_fn, exports.config_schema_fn) {
        (Some(_), None) => return None,
        (_, at) => at,
    };
    // SAFETY: the file's symbol table says this is a function in executable code (ELF); its
    // signature is `ConfigSchemaFn` (export_plugin!), frozen for the plugin-API series.
    let f: ConfigSchemaFn = *unsafe { lib.get::<ConfigSchemaFn>(CONFIG_SCHEMA_SYMBOL) }.ok()?;
    match (file_addr, image) {
        (Some(at), Some(image)) if (f as usize).wrapping_sub(image.bias) as u64 != at => None,
        _ => Some(f),
    }
}

/// Where the file says its two exports are (ELF only; other formats are checked by name).
#[derive(Debug, Default)]
struct Exports {
    /// Address (relative to the load base) of the manifest function.
    manifest_fn: Option<u64>,
    /// Address (relative to the load base) of abi_stable's header static.
    header: Option<u64>,
    /// Address (relative to the load base) of the optional config-schema function, when the
    /// file exports it as a function in executable code.
    config_schema_fn: Option<u64>,
}

/// Checks, without loading it, that `path` is a shared object exporting the manifest symbol
/// as a function in executable code (and abi_stable's header as data), and says where they
/// are. Reads only the headers and the dynamic symbol table, not the whole file.
fn read_exports(path: &Path) -> Result<Exports, LoadError> {
    use object::elf::{FileHeader32, FileHeader64};
    use object::{Endianness, FileKind, ReadCache};
    let not_loadable = |reason: String| LoadError::NotLoadable { path: path.to_path_buf(), reason };
    let file = std::fs::File::open(path).map_err(|e| not_loadable(e.to_string()))?;
    let data = ReadCache::new(file);
    let kind = FileKind::parse(&data)
        .map_err(|e| not_loadable(format!("not an object file this platform loads ({e})")))?;
    let elf = match kind {
        FileKind::Elf64 => elf_exports::<FileHeader64<Endianness>>(&data, path),
        FileKind::Elf32 => elf_exports::<FileHeader32<Endianness>>(&data, path),
        _ => return exports_by_name(&data, path),
    };
    elf.map_err(|e| match e {
        ElfFault::Load(e) => e,
        ElfFault::Malformed(e) => not_loadable(format!("malformed ELF file ({e})")),
    })
}

enum ElfFault {
    Load(LoadError),
    Malformed(object::Error),
}

impl From<object::Error> for ElfFault {
    fn from(e: object::Error) -> Self {
        Self::Malformed(e)
    }
}

fn elf_exports<Elf>(
    data: &object::ReadCache<std::fs::File>,
    path: &Path,
) -> Result<Exports, ElfFault>
where
    Elf: object::read::elf::FileHeader<Endian = object::Endianness>,
{
    use object::elf;
    use object::read::elf::{ProgramHeader, SectionHeader, Sym};
    let symbol_fault = |symbol: &[u8], reason: String| {
        ElfFault::Load(LoadError::Symbol {
            path: path.to_path_buf(),
            symbol: String::from_utf8_lossy(symbol).into_owned(),
            reason,
        })
    };
    let header = Elf::parse(data)?;
    let endian = header.endian()?;
    if header.e_type(endian) != elf::ET_DYN {
        return Err(ElfFault::Load(LoadError::NotLoadable {
            path: path.to_path_buf(),
            reason: format!(
                "an ELF file of type {}, not a shared library",
                match header.e_type(endian) {
                    elf::ET_REL => "relocatable (an object file)".to_string(),
                    elf::ET_EXEC => "executable".to_string(),
                    elf::ET_CORE => "core dump".to_string(),
                    other => other.to_string(),
                }
            ),
        }));
    }
    let segments = header.program_headers(endian, data)?;
    let sections = header.sections(endian, data)?;
    let dynsym = sections.symbols(endian, data, elf::SHT_DYNSYM)?;
    let find = |name: &[u8]| {
        dynsym.iter().find(|s| {
            s.st_shndx(endian) != elf::SHN_UNDEF
                && dynsym.symbol_name(endian, s).is_ok_and(|n| n == name)
        })
    };
    // The loaded, readable (and optionally executable) segment holding `[at, at + len)`.
    let in_segment = |at: u64, len: u64, exec: bool| {
        segments.iter().any(|p| {
            let (start, size): (u64, u64) = (p.p_vaddr(endian).into(), p.p_memsz(endian).into());
            let flags = p.p_flags(endian);
            p.p_type(endian) == elf::PT_LOAD
                && flags & elf::PF_R != 0
                && (!exec || flags & elf::PF_X != 0)
                && at >= start
                && at.checked_add(len).is_some_and(|end| end <= start.saturating_add(size))
        })
    };
    let type_name = |t: u8| match t {
        elf::STT_NOTYPE => "an untyped symbol (STT_NOTYPE)".to_string(),
        elf::STT_OBJECT => "a data object (STT_OBJECT)".to_string(),
        elf::STT_FUNC => "a function (STT_FUNC)".to_string(),
        elf::STT_TLS => "a thread-local variable (STT_TLS)".to_string(),
        elf::STT_GNU_IFUNC => {
            "an indirect function (STT_GNU_IFUNC, whose resolver would run on lookup)".to_string()
        }
        elf::STT_COMMON => "a common block (STT_COMMON)".to_string(),
        t => format!("of ELF symbol type {t}"),
    };

    let manifest_name = &MANIFEST_SYMBOL[..MANIFEST_SYMBOL.len() - 1];
    let Some(manifest) = find(manifest_name) else {
        return Err(ElfFault::Load(LoadError::NotAPlugin { path: path.to_path_buf() }));
    };
    if manifest.st_type() != elf::STT_FUNC {
        return Err(symbol_fault(
            manifest_name,
            format!("it is {}, not a function", type_name(manifest.st_type())),
        ));
    }
    let shndx = manifest.st_shndx(endian);
    if shndx >= elf::SHN_LORESERVE {
        return Err(symbol_fault(
            manifest_name,
            "it is an absolute or special symbol, defined in no section".into(),
        ));
    }
    if let Ok(section) = sections.section(object::SectionIndex(usize::from(shndx))) {
        let flags: u64 = section.sh_flags(endian).into();
        if flags & u64::from(elf::SHF_EXECINSTR) == 0 {
            let name = sections.section_name(endian, section).unwrap_or(b"?");
            return Err(symbol_fault(
                manifest_name,
                format!(
                    "it is defined in section `{}`, which holds no code",
                    String::from_utf8_lossy(name)
                ),
            ));
        }
    }
    let manifest_at: u64 = manifest.st_value(endian).into();
    if !in_segment(manifest_at, 1, true) {
        return Err(symbol_fault(
            manifest_name,
            format!("its address 0x{manifest_at:x} is in no executable segment of the file"),
        ));
    }

    let header_name = ROOT_MODULE_LOADER_NAME.as_bytes();
    let Some(lib_header) = find(header_name) else {
        return Err(symbol_fault(
            header_name,
            "the library does not export it (it is not an abi_stable library)".into(),
        ));
    };
    let header_at: u64 = lib_header.st_value(endian).into();
    let need = std::mem::size_of::<LibHeader>() as u64;
    if lib_header.st_type() != elf::STT_OBJECT {
        return Err(symbol_fault(
            header_name,
            format!("it is {}, not a data object", type_name(lib_header.st_type())),
        ));
    }
    let header_size: u64 = lib_header.st_size(endian).into();
    if header_size < need || !in_segment(header_at, need, false) {
        return Err(symbol_fault(
            header_name,
            format!(
                "it is {header_size} bytes at 0x{header_at:x}, but abi_stable's header needs \
                 {need} bytes of loaded, readable data"
            ),
        ));
    }
    // Optional (libraries built before it lack it): taken only as a function in code.
    let schema_name = &CONFIG_SCHEMA_SYMBOL[..CONFIG_SCHEMA_SYMBOL.len() - 1];
    let config_schema_fn = find(schema_name)
        .filter(|s| s.st_type() == elf::STT_FUNC && s.st_shndx(endian) < elf::SHN_LORESERVE)
        .map(|s| s.st_value(endian).into())
        .filter(|at: &u64| in_segment(*at, 1, true));
    Ok(Exports { manifest_fn: Some(manifest_at), header: Some(header_at), config_schema_fn })
}

/// Non-ELF formats (Mach-O): the manifest symbol must be exported; nothing more is checked.
fn exports_by_name(
    data: &object::ReadCache<std::fs::File>,
    path: &Path,
) -> Result<Exports, LoadError> {
    use object::{Object, ObjectKind};
    let file = object::File::parse(data).map_err(|e| LoadError::NotLoadable {
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
        Ok(Exports::default())
    } else {
        Err(LoadError::NotAPlugin { path: path.to_path_buf() })
    }
}

/// Calls the manifest function and reads what it returns without trusting it: the pointer,
/// the head (magic, layout), the whole manifest and each string must lie in the library's
/// own readable memory before a byte of them is read. Returns the fingerprint and, where the
/// platform says, the library's loaded image.
fn read_manifest(
    lib: &libloading::Library,
    path: &Path,
    exports: &Exports,
) -> Result<(BuildFingerprint, Option<mapped::Image>), LoadError> {
    let symbol = String::from_utf8_lossy(&MANIFEST_SYMBOL[..MANIFEST_SYMBOL.len() - 1]).to_string();
    let bad_symbol = |reason: String| LoadError::Symbol {
        path: path.to_path_buf(),
        symbol: symbol.clone(),
        reason,
    };
    // SAFETY: the file's symbol table says this is a function in executable code (ELF); its
    // signature is `extern "C" fn() -> *const Manifest` (export_plugin!).
    let manifest_fn = unsafe { lib.get::<extern "C" fn() -> *const Manifest>(MANIFEST_SYMBOL) }
        .map_err(|e| bad_symbol(e.to_string()))?;
    let manifest_fn: extern "C" fn() -> *const Manifest = *manifest_fn;
    let fn_addr = manifest_fn as usize;
    let image = match exports.manifest_fn {
        Some(file_addr) if mapped::SUPPORTED => {
            let image = mapped::Image::containing_code(fn_addr).ok_or_else(|| {
                bad_symbol(format!(
                    "it resolved to 0x{fn_addr:x}, which is no loaded library's code"
                ))
            })?;
            if fn_addr.wrapping_sub(image.bias) as u64 != file_addr {
                return Err(bad_symbol(format!(
                    "the dynamic linker resolved it to {} rather than to this file's definition",
                    image.name
                )));
            }
            Some(image)
        }
        _ => None,
    };
    let Some(image) = image else {
        // Where the loaded segments cannot be listed, the manifest is read as before.
        // SAFETY: trusted as on any platform without dl_iterate_phdr.
        let fingerprint =
            unsafe { BuildFingerprint::from_manifest(manifest_fn()) }.ok_or_else(|| {
                LoadError::BadManifest {
                    path: path.to_path_buf(),
                    reason: "wrong magic or layout".into(),
                }
            })?;
        return Ok((fingerprint, None));
    };
    let manifest = manifest_fn();
    match validate_manifest(manifest, &image) {
        Ok(fingerprint) => Ok((fingerprint, Some(image))),
        Err(ManifestFault::Future(layout)) => Err(LoadError::FutureManifest {
            path: path.to_path_buf(),
            layout,
            host: MANIFEST_LAYOUT,
        }),
        Err(ManifestFault::Bad(reason)) => {
            Err(LoadError::BadManifest { path: path.to_path_buf(), reason })
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum ManifestFault {
    Future(u32),
    Bad(String),
}

/// The longest version string a manifest may hold.
const MAX_MANIFEST_STRING: usize = 256;

/// Reads the manifest at `p`, dereferencing only bytes that lie in `image`'s readable memory.
fn validate_manifest(
    p: *const Manifest,
    image: &mapped::Image,
) -> Result<BuildFingerprint, ManifestFault> {
    let bad = |s: String| Err(ManifestFault::Bad(s));
    let at = p as usize;
    if p.is_null() {
        return bad("it returned a null pointer".into());
    }
    if !p.is_aligned() {
        return bad(format!(
            "it returned 0x{at:x}, not aligned to {} bytes",
            std::mem::align_of::<Manifest>()
        ));
    }
    let Some(available) = image.readable_from(at) else {
        return bad(format!("it returned 0x{at:x}, outside the library's loaded memory"));
    };
    if available < MANIFEST_HEAD_SIZE {
        return bad(format!(
            "it is truncated: {available} bytes lie between 0x{at:x} and the end of the library's \
             memory, fewer than the {MANIFEST_HEAD_SIZE} of a manifest's magic and layout"
        ));
    }
    // SAFETY: the head's 12 bytes are readable (checked above) and 8-byte aligned.
    let (magic, layout) =
        unsafe { (std::ptr::read(at as *const u64), std::ptr::read((at + 8) as *const u32)) };
    if magic != MANIFEST_MAGIC {
        let shown: String = magic
            .to_be_bytes()
            .iter()
            .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
            .collect();
        return bad(format!(
            "wrong magic 0x{magic:016x} (\"{shown}\"; a manifest starts with \"FERROTUN\")"
        ));
    }
    if layout > MANIFEST_LAYOUT {
        return Err(ManifestFault::Future(layout));
    }
    let Some(size) = manifest_size(layout) else {
        return bad(format!("manifest layout {layout} does not exist (layouts start at 1)"));
    };
    if available < size {
        return bad(format!(
            "it is truncated: only {available} of its {size} bytes (layout {layout}) lie in the \
             library's loaded memory"
        ));
    }
    // SAFETY: all `size` bytes of a known layout are readable (checked above); the pointer
    // fields are read as plain values, not followed.
    let m = unsafe { std::ptr::read(p) };
    if m.cxx11_abi > 1 {
        return bad(format!("field `cxx11_abi` is {}, not 0 or 1", m.cxx11_abi));
    }
    let string = |field: &str, s: *const c_char| -> Result<String, ManifestFault> {
        let at = s as usize;
        if s.is_null() {
            return Err(ManifestFault::Bad(format!("field `{field}` is a null pointer")));
        }
        let Some(available) = image.readable_from(at) else {
            return Err(ManifestFault::Bad(format!(
                "field `{field}` points to 0x{at:x}, outside the library's loaded memory"
            )));
        };
        let len = available.min(MAX_MANIFEST_STRING + 1);
        // SAFETY: `len` bytes from `at` lie in a readable segment of the library.
        let bytes = unsafe { std::slice::from_raw_parts(s as *const u8, len) };
        let Some(end) = bytes.iter().position(|&b| b == 0) else {
            return Err(ManifestFault::Bad(format!(
                "field `{field}` is not NUL-terminated within {} bytes",
                len.min(MAX_MANIFEST_STRING)
            )));
        };
        std::str::from_utf8(&bytes[..end])
            .map(str::to_string)
            .map_err(|e| ManifestFault::Bad(format!("field `{field}` is not UTF-8 ({e})")))
    };
    Ok(BuildFingerprint {
        api_version: string("api_version", m.api_version)?,
        tch_version: string("tch_version", m.tch_version)?,
        libtorch_version: string("libtorch_version", m.libtorch_version)?,
        cxx11_abi: m.cxx11_abi == 1,
    })
}

/// abi_stable dereferences its header static as soon as it finds it: check that the symbol
/// the dynamic linker resolves is this file's, aligned, and wholly in readable memory.
fn check_header_static(
    lib: &libloading::Library,
    path: &Path,
    exports: &Exports,
    image: Option<&mapped::Image>,
) -> Result<(), LoadError> {
    let (Some(file_addr), Some(image)) = (exports.header, image) else { return Ok(()) };
    let bad = |reason: String| LoadError::Symbol {
        path: path.to_path_buf(),
        symbol: ROOT_MODULE_LOADER_NAME.to_string(),
        reason,
    };
    let name = format!("{ROOT_MODULE_LOADER_NAME}\0");
    // SAFETY: only the symbol's address is taken; nothing is read through it here.
    let at = unsafe { lib.get::<*const u8>(name.as_bytes()) }
        .map(|s| *s as usize)
        .map_err(|e| bad(e.to_string()))?;
    let need = std::mem::size_of::<LibHeader>();
    if at.wrapping_sub(image.bias) as u64 != file_addr {
        return Err(bad(format!(
            "the dynamic linker resolved it to 0x{at:x}, not to this file's definition"
        )));
    }
    if !(at as *const LibHeader).is_aligned()
        || !matches!(image.readable_from(at), Some(n) if n >= need)
    {
        return Err(bad(format!(
            "0x{at:x} is not {need} aligned, readable bytes of the library's memory"
        )));
    }
    Ok(())
}

/// The memory a loaded library occupies, from the dynamic linker's own program headers
/// (`dl_iterate_phdr`): what the manifest checks measure pointers against.
mod mapped {
    /// Whether this platform can list a loaded library's segments.
    pub const SUPPORTED: bool = cfg!(all(target_os = "linux", target_pointer_width = "64"));

    /// One loaded library: its load bias and readable segments (start..end, absolute).
    #[derive(Debug)]
    pub struct Image {
        pub bias: usize,
        pub name: String,
        pub readable: Vec<std::ops::Range<usize>>,
    }

    impl Image {
        /// How many bytes from `at` to the end of the readable segment holding it.
        pub fn readable_from(&self, at: usize) -> Option<usize> {
            self.readable.iter().find(|r| r.contains(&at)).map(|r| r.end - at)
        }
    }

    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    mod imp {
        use std::ffi::{c_char, c_int, c_void, CStr};

        use super::Image;

        const PT_LOAD: u32 = 1;
        const PF_X: u32 = 1;
        const PF_R: u32 = 4;

        /// `Elf64_Phdr`.
        #[repr(C)]
        struct Phdr {
            p_type: u32,
            p_flags: u32,
            _p_offset: u64,
            p_vaddr: u64,
            _p_paddr: u64,
            _p_filesz: u64,
            p_memsz: u64,
            _p_align: u64,
        }

        /// The leading, stable fields of glibc's / musl's `struct dl_phdr_info`.
        #[repr(C)]
        struct DlPhdrInfo {
            addr: usize,
            name: *const c_char,
            phdr: *const Phdr,
            phnum: u16,
        }

        extern "C" {
            fn dl_iterate_phdr(
                callback: extern "C" fn(*mut DlPhdrInfo, usize, *mut c_void) -> c_int,
                data: *mut c_void,
            ) -> c_int;
        }

        struct Search {
            code: usize,
            found: Option<Image>,
        }

        extern "C" fn visit(info: *mut DlPhdrInfo, _size: usize, data: *mut c_void) -> c_int {
            // SAFETY: the dynamic linker passes a valid info whose phdr array has phnum
            // entries; `data` is the `Search` handed to dl_iterate_phdr below.
            let (info, search) = unsafe { (&*info, &mut *(data as *mut Search)) };
            let phdrs = if info.phdr.is_null() {
                &[][..]
            } else {
                unsafe { std::slice::from_raw_parts(info.phdr, usize::from(info.phnum)) }
            };
            let range = |p: &Phdr| {
                let start = info.addr.wrapping_add(p.p_vaddr as usize);
                start..start.saturating_add(p.p_memsz as usize)
            };
            let holds_code = phdrs.iter().any(|p| {
                p.p_type == PT_LOAD && p.p_flags & PF_X != 0 && range(p).contains(&search.code)
            });
            if !holds_code {
                return 0;
            }
            let name = if info.name.is_null() {
                "the main program".to_string()
            } else {
                // SAFETY: a NUL-terminated name owned by the dynamic linker.
                unsafe { CStr::from_ptr(info.name) }.to_string_lossy().into_owned()
            };
            search.found = Some(Image {
                bias: info.addr,
                name: if name.is_empty() { "the main program".into() } else { name },
                readable: phdrs
                    .iter()
                    .filter(|p| p.p_type == PT_LOAD && p.p_flags & PF_R != 0)
                    .map(range)
                    .collect(),
            });
            1
        }

        /// The loaded object whose executable segments hold address `code`.
        pub fn containing_code(code: usize) -> Option<Image> {
            let mut search = Search { code, found: None };
            // SAFETY: `visit` only reads what the dynamic linker hands it.
            unsafe { dl_iterate_phdr(visit, &mut search as *mut Search as *mut c_void) };
            search.found
        }
    }

    impl Image {
        /// The loaded object whose executable segments hold address `code`.
        #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
        pub fn containing_code(code: usize) -> Option<Image> {
            imp::containing_code(code)
        }
        #[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
        pub fn containing_code(_code: usize) -> Option<Image> {
            None
        }
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
    /// `refused` lists the libraries refused on the search path (one may have held it).
    #[error("no {kind} plugin named `{name}` is installed (installed {kind} plugins: {available}){refused}; see `ferrotune plugins`")]
    Unknown { kind: PluginKind, name: String, available: String, refused: String },
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
                refused: match self.refused.len() {
                    0 => String::new(),
                    n => format!(
                        "; {n} plugin {} refused and may hold it: {}",
                        if n == 1 { "library was" } else { "libraries were" },
                        self.refused.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
                    ),
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

    /// The JSON Schema of plugin `name`'s config keys (the first library exporting it): `None`
    /// when the plugin declares none or its library was built before plugins exported
    /// `ferrotune_plugin_config_schema`. Text that is not a JSON object is the plugin's
    /// error, named.
    pub fn config_schema(
        &self,
        kind: PluginKind,
        name: &str,
    ) -> Result<Option<serde_json::Value>, CreateError> {
        let (lib, _) = self.find(kind, name)?;
        library_config_schema(lib, kind, name)
    }
}

/// Plugin `name` of `kind` in `lib`: its config schema (see [`Registry::config_schema`]).
fn library_config_schema(
    lib: &PluginLibrary,
    kind: PluginKind,
    name: &str,
) -> Result<Option<serde_json::Value>, CreateError> {
    let fail =
        |error| CreateError::Plugin { kind, name: name.into(), path: lib.path.clone(), error };
    let Some(f) = lib.config_schema_fn else { return Ok(None) };
    let text = f(kind, name.into()).into_result().map_err(fail)?;
    if text.is_empty() {
        return Ok(None);
    }
    match serde_json::from_str::<serde_json::Value>(text.as_str()) {
        Ok(v) if v.is_object() => Ok(Some(v)),
        Ok(v) => Err(fail(PluginError::invalid(format!(
            "config schema is not a JSON object: {}",
            v.to_string().chars().take(80).collect::<String>()
        )))),
        Err(e) => Err(fail(PluginError::invalid(format!("config schema is not JSON: {e}")))),
    }
}

/// Every plugin in search order as `ferrotune plugins --json` prints it (and the board's
/// `GET /api/plugins` serves it): `{"plugins": [{name, kind, version, description, library,
/// schema}]}`, `schema` null when the plugin declares none. A schema the plugin cannot give
/// is null too, with the reason in `schema_error`. Shadowed plugins (a name exported again
/// by a later library) are listed with `"shadowed": true`.
pub fn plugins_json(registry: &Registry) -> serde_json::Value {
    let mut seen = BTreeSet::new();
    let plugins: Vec<serde_json::Value> = registry
        .plugins()
        .map(|(lib, p)| {
            let shadowed = !seen.insert((p.kind, p.name.as_str()));
            let mut entry = serde_json::json!({
                "name": p.name.as_str(),
                "kind": p.kind.to_string(),
                "version": p.version.as_str(),
                "description": p.description.as_str(),
                "library": lib.path.display().to_string(),
                "schema": null,
                "shadowed": shadowed,
            });
            match library_config_schema(lib, p.kind, p.name.as_str()) {
                Ok(schema) => entry["schema"] = schema.into(),
                Err(e) => entry["schema_error"] = e.to_string().into(),
            }
            entry
        })
        .collect();
    serde_json::json!({ "plugins": plugins })
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

    /// A manifest in a buffer standing for a library's memory: `readable` bytes of it.
    fn check(m: &Manifest, readable: usize) -> Result<BuildFingerprint, ManifestFault> {
        let at = m as *const Manifest as usize;
        let image = mapped::Image {
            bias: 0,
            name: "test".into(),
            readable: std::iter::once(at..at + readable).collect(),
        };
        validate_manifest(m, &image)
    }

    #[test]
    fn manifest_is_read_only_within_the_library() {
        let whole = std::mem::size_of::<Manifest>();
        let own = || Manifest { ..ferrotune_plugin_api::fingerprint::BUILD_MANIFEST };
        // The build's own manifest reads back when its strings lie in the image too.
        let own_strings = |m: &Manifest| {
            let at = m as *const Manifest as usize;
            let mut ranges: Vec<_> = std::iter::once(at..at + whole).collect();
            for p in [m.api_version, m.tch_version, m.libtorch_version] {
                ranges.push(p as usize..p as usize + 64);
            }
            mapped::Image { bias: 0, name: "test".into(), readable: ranges }
        };
        let m = own();
        assert_eq!(validate_manifest(&m, &own_strings(&m)), Ok(BuildFingerprint::current()));
        // ...but not when they lie outside it.
        let e = check(&m, whole).unwrap_err();
        assert!(
            matches!(&e, ManifestFault::Bad(s) if s.contains("field `api_version` points to")),
            "{e:?}"
        );
        // Truncated: the head is read, the rest is not.
        let e = check(&m, whole - 1).unwrap_err();
        assert!(
            matches!(&e, ManifestFault::Bad(s) if s.contains(&format!("only {} of its {whole} bytes", whole - 1))),
            "{e:?}"
        );
        let e = check(&m, MANIFEST_HEAD_SIZE - 1).unwrap_err();
        assert!(matches!(&e, ManifestFault::Bad(s) if s.contains("truncated")), "{e:?}");
        // A future layout is refused by number with only its head readable.
        let future = Manifest { manifest_layout: MANIFEST_LAYOUT + 1, ..own() };
        assert_eq!(
            check(&future, MANIFEST_HEAD_SIZE),
            Err(ManifestFault::Future(MANIFEST_LAYOUT + 1))
        );
        let zero = Manifest { manifest_layout: 0, ..own() };
        assert!(
            matches!(check(&zero, whole), Err(ManifestFault::Bad(s)) if s.contains("layout 0"))
        );
        let magic = Manifest { magic: 7, ..own() };
        assert!(
            matches!(check(&magic, whole), Err(ManifestFault::Bad(s)) if s.contains("wrong magic"))
        );
        let abi = Manifest { cxx11_abi: 2, ..own() };
        assert!(
            matches!(check(&abi, whole), Err(ManifestFault::Bad(s)) if s.contains("cxx11_abi"))
        );
        let null = Manifest { tch_version: std::ptr::null(), ..own() };
        let mut image = own_strings(&null);
        image.readable.retain(|r| r.start != 0);
        assert!(
            matches!(validate_manifest(&null, &image), Err(ManifestFault::Bad(s)) if s.contains("`tch_version` is a null pointer"))
        );
        // A pointer outside the image is never dereferenced (this one is not even mapped).
        let image = mapped::Image { bias: 0, name: "test".into(), readable: vec![] };
        let e = validate_manifest(0x7ff0_dead_bee0 as *const Manifest, &image).unwrap_err();
        assert!(
            matches!(&e, ManifestFault::Bad(s) if s.contains("outside the library's loaded memory")),
            "{e:?}"
        );
    }

    /// This test binary's own code is found in its loaded image, with readable segments.
    #[test]
    fn loaded_image_holds_own_code() {
        if !mapped::SUPPORTED {
            return;
        }
        let f: fn() = loaded_image_holds_own_code;
        let image = mapped::Image::containing_code(f as usize).expect("own code is loaded");
        assert!(image.readable_from(f as usize).is_some_and(|n| n > 0));
        assert!(mapped::Image::containing_code(0x10).is_none());
    }

    #[test]
    fn summary_is_short() {
        let long = format!("Incompatible layout\n{}", "detail line\n".repeat(500));
        let s = summarise(&long);
        assert!(s.starts_with("Incompatible layout") && s.len() < 300, "{s}");
    }
}
