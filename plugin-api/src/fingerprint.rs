//! The build fingerprint every plugin library carries, and the compatibility rule.
//!
//! It lives in a plain C symbol, `ferrotune_plugin_manifest`, returning a pointer to a
//! [`Manifest`] whose layout is frozen forever (new fields may only be appended and are
//! announced by `manifest_layout`). The host reads it before anything else, so a plugin
//! built against another plugin-API or libtorch is refused with both versions named,
//! rather than with abi_stable's layout diff or a crash.
//!
//! The host does not trust the manifest: it reads the 12-byte head (magic, then layout)
//! only once the pointer is known to lie in the library's readable memory, refuses a
//! layout newer than its own [`MANIFEST_LAYOUT`] by number, and reads exactly
//! [`manifest_size`] bytes for a layout it knows. The layout number doubles as the size
//! field: every layout has one fixed size, so a separate size field would say nothing more
//! (and a host never reads a newer layout's prefix).
use std::ffi::{c_char, CStr};

/// "FERROTUN" in ASCII: marks a ferrotune manifest.
pub const MANIFEST_MAGIC: u64 = u64::from_be_bytes(*b"FERROTUN");
/// Layout version of [`Manifest`]; bump only when appending fields.
pub const MANIFEST_LAYOUT: u32 = 1;
/// The tch version this crate is pinned to (workspace `Cargo.toml`).
pub const TCH_VERSION: &str = "0.24.0";
/// The libtorch version found at build time, e.g. `2.11.0+cu130`.
pub const LIBTORCH_VERSION: &str = env!("FERROTUNE_LIBTORCH_VERSION");
/// Whether libtorch (and so tch's C++ shim) uses the C++11 std::string ABI.
pub const CXX11_ABI: bool = matches!(env!("FERROTUNE_CXX11_ABI").as_bytes(), b"1");

/// Bytes of every layout's head: `magic` (u64) then `manifest_layout` (u32).
pub const MANIFEST_HEAD_SIZE: usize = 12;

/// The size in bytes of a manifest of layout `layout`; `None` for a layout this build does
/// not know (0, or newer than [`MANIFEST_LAYOUT`]). Append a line here with each new layout.
pub const fn manifest_size(layout: u32) -> Option<usize> {
    match layout {
        1 => Some(std::mem::size_of::<Manifest>()),
        _ => None,
    }
}

/// The frozen C layout of a library's manifest.
#[repr(C)]
pub struct Manifest {
    pub magic: u64,
    pub manifest_layout: u32,
    pub cxx11_abi: u32,
    pub api_version: *const c_char,
    pub tch_version: *const c_char,
    pub libtorch_version: *const c_char,
}

// SAFETY: the pointers point to immutable 'static NUL-terminated strings.
unsafe impl Sync for Manifest {}

/// The manifest of whatever is built against this copy of the crate. `export_plugin!`
/// exports a pointer to it.
pub static BUILD_MANIFEST: Manifest = Manifest {
    magic: MANIFEST_MAGIC,
    manifest_layout: MANIFEST_LAYOUT,
    cxx11_abi: CXX11_ABI as u32,
    api_version: concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char,
    tch_version: c"0.24.0".as_ptr(),
    libtorch_version: concat!(env!("FERROTUNE_LIBTORCH_VERSION"), "\0").as_ptr() as *const c_char,
};

/// The owned, readable form of a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildFingerprint {
    pub api_version: String,
    pub tch_version: String,
    pub libtorch_version: String,
    pub cxx11_abi: bool,
}

impl std::fmt::Display for BuildFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "plugin-api {}, tch {}, libtorch {}, C++11 ABI {}",
            self.api_version,
            self.tch_version,
            self.libtorch_version,
            if self.cxx11_abi { "on" } else { "off" }
        )
    }
}

impl BuildFingerprint {
    /// The fingerprint of this build (the host's, when called from the host).
    pub fn current() -> Self {
        // SAFETY: BUILD_MANIFEST is a valid manifest with 'static strings.
        unsafe { Self::from_manifest(&BUILD_MANIFEST) }.expect("own manifest is valid")
    }

    /// Reads a trusted manifest (this build's own). `None` when the magic or layout is not one
    /// this code knows. The host reads a plugin's manifest through its own checks instead.
    ///
    /// # Safety
    /// `m` must point to a live `Manifest` whose string pointers are NUL-terminated.
    pub unsafe fn from_manifest(m: *const Manifest) -> Option<Self> {
        let m = m.as_ref()?;
        if m.magic != MANIFEST_MAGIC || manifest_size(m.manifest_layout).is_none() {
            return None;
        }
        let s = |p: *const c_char| {
            if p.is_null() {
                None
            } else {
                Some(CStr::from_ptr(p).to_string_lossy().into_owned())
            }
        };
        Some(Self {
            api_version: s(m.api_version)?,
            tch_version: s(m.tch_version)?,
            libtorch_version: s(m.libtorch_version)?,
            cxx11_abi: m.cxx11_abi != 0,
        })
    }

    /// Whether a plugin with fingerprint `self` may be loaded by a host with `host`.
    /// The error says what differs, naming both sides, and what to do.
    pub fn check_compatible_with(&self, host: &BuildFingerprint) -> Result<(), Incompatibility> {
        if !same_api_series(&self.api_version, &host.api_version) {
            return Err(Incompatibility::PluginApi {
                plugin: self.api_version.clone(),
                host: host.api_version.clone(),
            });
        }
        let base = |v: &str| v.split('+').next().unwrap_or(v).trim().to_string();
        if base(&self.libtorch_version) != base(&host.libtorch_version) {
            return Err(Incompatibility::Libtorch {
                plugin: self.libtorch_version.clone(),
                host: host.libtorch_version.clone(),
            });
        }
        if self.tch_version != host.tch_version {
            return Err(Incompatibility::Tch {
                plugin: self.tch_version.clone(),
                host: host.tch_version.clone(),
            });
        }
        if self.cxx11_abi != host.cxx11_abi {
            return Err(Incompatibility::CxxAbi { plugin: self.cxx11_abi, host: host.cxx11_abi });
        }
        Ok(())
    }
}

/// Why a plugin's build does not match the host's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incompatibility {
    PluginApi { plugin: String, host: String },
    Libtorch { plugin: String, host: String },
    Tch { plugin: String, host: String },
    CxxAbi { plugin: bool, host: bool },
}

impl std::fmt::Display for Incompatibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PluginApi { plugin, host } => write!(
                f,
                "built against ferrotune-plugin-api {plugin}, but this host speaks {host}; \
                 rebuild the plugin against ferrotune-plugin-api {}",
                series(host)
            ),
            Self::Libtorch { plugin, host } => write!(
                f,
                "built against libtorch {plugin}, but this host runs libtorch {host}; \
                 rebuild the plugin with the same torch (LIBTORCH_USE_PYTORCH=1 and torch=={})",
                host.split('+').next().unwrap_or(host)
            ),
            Self::Tch { plugin, host } => {
                write!(f, "built with tch {plugin}, but this host uses tch {host}; rebuild with tch ={host}")
            }
            Self::CxxAbi { plugin, host } => write!(
                f,
                "built with _GLIBCXX_USE_CXX11_ABI={}, but this host uses {}; rebuild against the host's libtorch",
                *plugin as u8, *host as u8
            ),
        }
    }
}

/// "0.1.x" for 0.1.3, "2.x" for 2.4.0: the series a version is compatible with.
pub fn series(version: &str) -> String {
    let parts: Vec<&str> = version.split('.').collect();
    match parts.as_slice() {
        ["0", minor, ..] => format!("0.{minor}.x"),
        [major, ..] => format!("{major}.x"),
        _ => version.to_string(),
    }
}

/// Cargo's semver compatibility: same major, and for 0.x the same minor.
pub fn same_api_series(a: &str, b: &str) -> bool {
    series(a) == series(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_manifest_round_trips() {
        let fp = BuildFingerprint::current();
        assert_eq!(fp.api_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(fp.tch_version, TCH_VERSION);
        assert!(fp.libtorch_version.starts_with("2.11.0"), "{fp}");
        fp.check_compatible_with(&fp).unwrap();
    }

    #[test]
    fn compatibility_rule() {
        let host = BuildFingerprint::current();
        let mut p = host.clone();
        p.api_version = "0.2.7".into();
        assert!(p.check_compatible_with(&host).is_ok());
        p.api_version = "0.1.0".into();
        let e = p.check_compatible_with(&host).unwrap_err().to_string();
        assert!(e.contains("0.1.0") && e.contains(&host.api_version), "{e}");
        let mut p = host.clone();
        p.libtorch_version = "2.11.0+cpu".into();
        assert!(p.check_compatible_with(&host).is_ok(), "CPU and CUDA builds of one version mix");
        p.libtorch_version = "2.10.0".into();
        let e = p.check_compatible_with(&host).unwrap_err().to_string();
        assert!(e.contains("2.10.0") && e.contains(&host.libtorch_version), "{e}");
        let mut p = host.clone();
        p.cxx11_abi = !p.cxx11_abi;
        assert!(p.check_compatible_with(&host).is_err());
    }

    #[test]
    fn layout_sizes() {
        assert_eq!(manifest_size(0), None);
        assert_eq!(manifest_size(MANIFEST_LAYOUT), Some(std::mem::size_of::<Manifest>()));
        assert_eq!(manifest_size(MANIFEST_LAYOUT + 1), None);
        // Layout 1 is frozen: 8 + 4 + 4 + three pointers.
        assert_eq!(manifest_size(1), Some(16 + 3 * std::mem::size_of::<usize>()));
        assert_eq!(std::mem::offset_of!(Manifest, api_version), 16);
        assert!(MANIFEST_HEAD_SIZE <= std::mem::offset_of!(Manifest, cxx11_abi));
    }

    #[test]
    fn series_rule() {
        assert!(same_api_series("0.1.0", "0.1.9"));
        assert!(!same_api_series("0.1.0", "0.2.0"));
        assert!(same_api_series("1.2.0", "1.0.0"));
        assert!(!same_api_series("1.0.0", "2.0.0"));
    }
}
