//! The one reader and writer of safetensors files in the host: checkpoints, adapters,
//! optimizer state and merged models all go through it.
//!
//! Reading checks the header first (each entry's dtype, shape and byte range against the file,
//! so a truncated or corrupt file fails before any tensor is read) and then reads each tensor
//! from its byte range straight into the tensor's storage, one at a time. Writing adds
//! `{"format": "pt"}` metadata, as transformers writes it.
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};

/// One tensor of a safetensors file, as its header describes it.
#[derive(Debug, Clone)]
pub struct HeaderEntry {
    pub key: String,
    /// The dtype as the file names it (`F32`, `BF16`, `I64`, …).
    pub dtype_name: String,
    /// The dtype, `None` for one libtorch has no kind for.
    pub kind: Option<Kind>,
    pub shape: Vec<i64>,
    /// Byte range in the file (header included).
    pub begin: u64,
    pub end: u64,
}

/// The libtorch kind of a safetensors dtype name.
fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F64" => Kind::Double,
        "F32" => Kind::Float,
        "BF16" => Kind::BFloat16,
        "F16" => Kind::Half,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        _ => return None,
    })
}

/// The message of a file that is not a readable safetensors file.
fn unreadable(file: &Path, why: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{} is not a readable safetensors file ({why}): it is truncated or corrupt; re-save or re-download it", file.display())
}

/// Reads and checks the header of `file` (not its tensors): every entry's byte range holds
/// exactly its elements and lies inside the file. Entries come sorted by key.
pub fn read_header(file: &Path) -> Result<Vec<HeaderEntry>> {
    let mut f =
        std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let file_len = f.metadata().with_context(|| format!("cannot read {}", file.display()))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| unreadable(file, format!("its header length: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 || 8 + len > file_len {
        return Err(unreadable(file, format!("a header of {len} bytes in a file of {file_len}")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| unreadable(file, e))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| unreadable(file, e))?;
    let data_start = 8 + len;
    let mut out = Vec::with_capacity(header.len());
    for (key, info) in header {
        if key == "__metadata__" {
            continue;
        }
        let dtype_name = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("").to_string();
        let kind = kind_of(&dtype_name);
        let shape: Option<Vec<i64>> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as i64)).collect());
        let shape = shape
            .ok_or_else(|| unreadable(file, format!("tensor `{key}` has no valid `shape`")))?;
        let offsets: Option<Vec<u64>> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect());
        let (begin, end) = match offsets.as_deref() {
            Some([b, e]) if b <= e => (data_start + b, data_start + e),
            _ => {
                return Err(unreadable(file, format!("tensor `{key}` has no valid `data_offsets`")))
            }
        };
        if let Some(kind) = kind {
            let bytes = shape.iter().product::<i64>() as u64 * kind.elt_size_in_bytes() as u64;
            if end - begin != bytes {
                return Err(unreadable(file, format!("tensor `{key}` of shape {shape:?} ({dtype_name}) spans {} bytes, not {bytes}", end - begin)));
            }
        }
        if end > file_len {
            return Err(unreadable(
                file,
                format!("tensor `{key}` ends at byte {end} of a file of {file_len}"),
            ));
        }
        out.push(HeaderEntry { key, dtype_name, kind, shape, begin, end });
    }
    Ok(out)
}

/// Reads the tensor `entry` describes from its byte range of `file`, as a CPU tensor of the
/// stored dtype.
pub fn read_tensor(file: &Path, entry: &HeaderEntry) -> Result<Tensor> {
    let key = &entry.key;
    let context = || format!("cannot load tensor `{key}` from {}", file.display());
    let Some(kind) = entry.kind else {
        bail!(
            "tensor `{key}` in {} has dtype `{}`, which libtorch cannot hold",
            file.display(),
            entry.dtype_name
        );
    };
    let f = std::fs::File::open(file).with_context(context)?;
    // Read straight into the tensor's storage: no second copy of the bytes, which for the
    // largest tensor (an embedding) would add its size to the loading peak.
    let t = Tensor::f_empty(&entry.shape, (kind, Device::Cpu)).with_context(context)?;
    let len = (entry.end - entry.begin) as usize;
    if len > 0 {
        anyhow::ensure!(
            t.numel() * kind.elt_size_in_bytes() == len,
            "tensor `{key}`: {len} bytes for shape {:?} of {kind:?}",
            entry.shape
        );
        // SAFETY: `t` is a new contiguous CPU tensor of exactly `len` bytes (checked just
        // above), not shared with anything yet; every byte is written before it is read.
        let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, len) };
        f.read_exact_at(buf, entry.begin).with_context(context)?;
    }
    Ok(t)
}

/// Every tensor of `file` (CPU, stored dtypes), sorted by key; the header is checked first.
pub fn read(file: &Path) -> Result<Vec<(String, Tensor)>> {
    read_header(file)?.into_iter().map(|e| Ok((e.key.clone(), read_tensor(file, &e)?))).collect()
}

/// Writes `tensors` to `path` (contiguous CPU copies of each, one at a time), with
/// `{"format": "pt"}` metadata. Not atomic: see `util::atomic::write_with`.
pub fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut buffers: Vec<(String, ::safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let dtype: ::safetensors::Dtype = t
            .kind()
            .try_into()
            .with_context(|| format!("tensor `{name}`: dtype {:?}", t.kind()))?;
        let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, t.numel())?;
        buffers.push((name.clone(), dtype, t.size().iter().map(|&d| d as usize).collect(), bytes));
    }
    let views = buffers
        .iter()
        .map(|(n, dt, shape, bytes)| {
            Ok((n.as_str(), ::safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)?))
        })
        .collect::<Result<Vec<_>, ::safetensors::SafeTensorError>>()
        .map_err(|e| anyhow!("cannot build safetensors views: {e}"))?;
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    ::safetensors::tensor::serialize_to_file(views, &metadata, path)
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_of_every_kind_and_a_truncated_file() {
        let dir = std::env::temp_dir().join(format!("ferrotune-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let tensors = vec![
            (
                "b".to_string(),
                Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]).transpose(0, 1),
            ),
            ("a".to_string(), Tensor::from_slice(&[1i64, -2, 3])),
            ("c".to_string(), Tensor::ones([4], (Kind::BFloat16, Device::Cpu))),
            ("s".to_string(), Tensor::from(2.5f64)),
        ];
        write(&path, &tensors).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(
            back.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c", "s"],
            "sorted by key"
        );
        for (k, t) in &back {
            let (_, want) = tensors.iter().find(|(n, _)| n == k).unwrap();
            assert_eq!((t.kind(), t.size()), (want.kind(), want.size()), "{k}");
            assert!(t.equal(want), "{k}");
        }
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("t.safetensors") && e.contains("truncated or corrupt"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }
}
