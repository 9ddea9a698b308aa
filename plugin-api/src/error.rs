//! Errors that cross the plugin boundary, and the panic guard every FFI entry point uses.
use abi_stable::std_types::{RResult, RString};
use abi_stable::StableAbi;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What went wrong, as a number so that new codes can be added without breaking the ABI.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// A configuration value is missing, unknown or invalid; the message names the key.
    pub const CONFIG: Self = Self(1);
    /// An argument (a tensor's shape, a name) is not what the call accepts.
    pub const INVALID: Self = Self(2);
    /// The plugin does not support what was asked.
    pub const UNSUPPORTED: Self = Self(3);
    /// The call panicked; the panic was caught at the boundary.
    pub const PANIC: Self = Self(4);
    /// Any other failure (libtorch errors, I/O).
    pub const RUNTIME: Self = Self(5);
    /// No plugin of that name and kind in the library.
    pub const NOT_FOUND: Self = Self(6);

    pub fn label(self) -> &'static str {
        match self {
            Self::CONFIG => "config",
            Self::INVALID => "invalid argument",
            Self::UNSUPPORTED => "unsupported",
            Self::PANIC => "panic",
            Self::RUNTIME => "runtime",
            Self::NOT_FOUND => "not found",
            _ => "error",
        }
    }
}

/// An error value that crosses the boundary: a code and a message for a person.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct PluginError {
    pub code: ErrorCode,
    pub message: RString,
}

pub type PluginResult<T> = Result<T, PluginError>;

impl PluginError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: RString::from(message.into()) }
    }
    /// A configuration error that names the key: "config key `r`: must be at least 1".
    pub fn config(key: &str, message: impl fmt::Display) -> Self {
        Self::new(ErrorCode::CONFIG, format!("config key `{key}`: {message}"))
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::INVALID, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::UNSUPPORTED, message)
    }
    pub fn runtime(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::RUNTIME, message)
    }
    pub fn message(&self) -> &str {
        self.message.as_str()
    }
    /// Prefixes the message with context ("plugin `lora`: …").
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = RString::from(format!("{context}: {}", self.message));
        self
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.code.label(), self.message)
    }
}

impl std::error::Error for PluginError {}

impl From<tch::TchError> for PluginError {
    fn from(e: tch::TchError) -> Self {
        Self::runtime(format!("libtorch: {e}"))
    }
}

/// Runs `f`, turning a panic into a [`PluginError`] with code [`ErrorCode::PANIC`].
///
/// Every FFI entry point, on both sides of the boundary, goes through this: a panic must
/// never unwind across `extern "C"` (that aborts the whole process).
pub fn guard<T>(f: impl FnOnce() -> PluginResult<T>) -> RResult<T, PluginError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(e),
        Err(payload) => {
            let text = if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "(non-string panic payload)".to_string()
            };
            RResult::RErr(PluginError::new(ErrorCode::PANIC, format!("panicked: {text}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_turns_panics_into_errors() {
        let r: RResult<(), _> = guard(|| panic!("boom {}", 7));
        let e = r.into_result().unwrap_err();
        assert_eq!(e.code, ErrorCode::PANIC);
        assert!(e.message().contains("boom 7"), "{}", e);
        let ok = guard(|| Ok(3)).into_result().unwrap();
        assert_eq!(ok, 3);
    }

    #[test]
    fn tch_errors_convert() {
        let a = tch::Tensor::zeros([2, 3], (tch::Kind::Float, tch::Device::Cpu));
        let b = tch::Tensor::zeros([4, 5], (tch::Kind::Float, tch::Device::Cpu));
        let e: PluginError = a.f_matmul(&b).unwrap_err().into();
        assert_eq!(e.code, ErrorCode::RUNTIME);
        assert!(e.message().contains("libtorch"));
    }
}
