//! The one reader and writer of safetensors files in the host: checkpoints, adapters,
//! optimizer state and merged models all go through it.
//!
//! Reading checks the header first (each entry's dtype, shape and byte range against the file,
//! so a truncated or corrupt file fails before any tensor is read) and then reads each tensor
//! from its byte range straight into the tensor's storage, one at a time. Writing adds
//! `{"format": "pt"}` metadata, as transformers writes it.
//!
//! [`non_finite_counts`] is the one finiteness check of what is read or written (model
//! weights as they load, adapters as they load and save, merged models as they save): one
//! pass in bounded chunks, so a check never doubles a tensor's memory.
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

/// Elements one step of [`non_finite_counts`] scans: its temporary flags take at most this
/// many bytes (16 MiB), whatever the tensor's size.
const FINITE_CHUNK: i64 = 1 << 24;

/// Whether `kind` is a floating-point kind (the only ones that can hold NaN or Inf).
pub fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}

/// `(NaN count, ±Inf count)` of a floating-point tensor, or `None` when every value is finite
/// (always for other kinds). One `isfinite` pass over slices of the first dimension of at most
/// [`FINITE_CHUNK`] elements (no copy of the tensor, any layout); the counts are computed only
/// when something is not finite.
pub fn non_finite_counts(t: &Tensor) -> Result<Option<(i64, i64)>> {
    if !is_float(t.kind()) || t.numel() == 0 {
        return Ok(None);
    }
    let all_finite =
        |t: &Tensor| -> Result<bool> { Ok(t.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0) };
    let finite = if t.dim() == 0 {
        all_finite(t)?
    } else {
        let rows = t.size()[0];
        let per_row = (t.numel() as i64 / rows.max(1)).max(1);
        let step = (FINITE_CHUNK / per_row).max(1);
        let mut start = 0;
        let mut finite = true;
        while finite && start < rows {
            let n = step.min(rows - start);
            finite = all_finite(&t.f_narrow(0, start, n)?)?;
            start += n;
        }
        finite
    };
    if finite {
        return Ok(None);
    }
    let count =
        |flags: Tensor| -> Result<i64> { Ok(flags.f_sum(Kind::Int64)?.f_int64_value(&[])?) };
    Ok(Some((count(t.f_isnan()?)?, count(t.f_isinf()?)?)))
}

/// `holds 3 NaN and 1 infinite value(s) of 64`: the counts of [`non_finite_counts`], for
/// messages.
pub fn describe_non_finite((nan, inf): (i64, i64), numel: usize) -> String {
    format!("holds {nan} NaN and {inf} infinite value(s) of {numel}")
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

    #[test]
    fn non_finite_values_are_counted_in_any_layout_and_size() {
        let o = (Kind::Float, Device::Cpu);
        assert_eq!(non_finite_counts(&Tensor::ones([3, 4], o)).unwrap(), None);
        assert_eq!(non_finite_counts(&Tensor::from_slice(&[1i64, 2])).unwrap(), None, "not float");
        assert_eq!(non_finite_counts(&Tensor::from(f64::NAN)).unwrap(), Some((1, 0)), "0-dim");
        // a transposed view, the bad values in the last column (the last chunk of rows)
        let t = Tensor::zeros([5, 3], o);
        let _ = t.get(4).get(2).fill_(f64::NAN);
        let _ = t.get(0).get(2).fill_(f64::NEG_INFINITY);
        assert_eq!(non_finite_counts(&t.transpose(0, 1)).unwrap(), Some((1, 1)));
        // more rows than one chunk holds: the last row is scanned too
        let big = Tensor::zeros([FINITE_CHUNK / 2 + 1, 2], (Kind::BFloat16, Device::Cpu));
        assert_eq!(non_finite_counts(&big).unwrap(), None);
        let _ = big.get(FINITE_CHUNK / 2).get(1).fill_(f64::INFINITY);
        assert_eq!(non_finite_counts(&big).unwrap(), Some((0, 1)));
        assert_eq!(describe_non_finite((2, 1), 6), "holds 2 NaN and 1 infinite value(s) of 6");
    }
}
