//! Tensors across the plugin boundary.
//!
//! # The ownership rule (the only one)
//! Both sides link the same libtorch, so a tensor crosses as a pointer to libtorch's own
//! tensor object (tch's `C_tensor`); autograd, devices and storage are shared.
//!
//! * [`TensorRef<'a>`] **borrows**. The callee may read it and use it in autograd
//!   operations during the call. It never frees it and never keeps it after the call
//!   returns; to keep the tensor, it takes its own reference with [`TensorRef::to_tensor`]
//!   (a shallow clone: same storage, same autograd node, a new handle it owns).
//! * [`OwnedTensor`] **transfers**. The receiver owns the handle: it converts it once with
//!   [`OwnedTensor::into_tensor`], or dropping it frees the handle. The sender gave up its
//!   handle (it usually sends a shallow clone and keeps the original).
//!
//! Freeing on the other side of the boundary is sound because there is one libtorch and one
//! C++ allocator in the process (plugins never link libtorch statically).
use abi_stable::std_types::RString;
use abi_stable::StableAbi;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use tch::{Device, Kind, Tensor};

use crate::error::{PluginError, PluginResult};

/// libtorch's tensor object, never looked into from Rust.
#[repr(C)]
#[derive(StableAbi)]
pub struct OpaqueTensor {
    _private: [u8; 0],
}

fn raw(t: &Tensor) -> NonNull<OpaqueTensor> {
    NonNull::new(t.as_ptr() as *mut OpaqueTensor).expect("tch tensors are never null")
}

/// A tensor borrowed for the duration of one call (see the module docs).
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone)]
pub struct TensorRef<'a> {
    ptr: NonNull<OpaqueTensor>,
    _borrow: PhantomData<&'a ()>,
}

impl<'a> TensorRef<'a> {
    pub fn new(t: &'a Tensor) -> Self {
        Self { ptr: raw(t), _borrow: PhantomData }
    }

    /// A `Tensor` view of the borrowed handle; it is never freed through this view.
    pub fn borrow(&self) -> BorrowedTensor<'a> {
        // SAFETY: ptr came from a live tch::Tensor borrowed for 'a; ManuallyDrop keeps us
        // from freeing a handle we do not own.
        let t = unsafe { Tensor::from_ptr(self.ptr.as_ptr() as *mut torch_sys::C_tensor) };
        BorrowedTensor { inner: ManuallyDrop::new(t), _borrow: PhantomData }
    }

    /// Borrows an owned handle without taking it.
    pub fn from_owned(t: &'a OwnedTensor) -> Self {
        Self { ptr: t.ptr, _borrow: PhantomData }
    }

    /// Takes an owned reference (shallow clone) that may outlive the call.
    pub fn to_tensor(&self) -> Tensor {
        self.borrow().shallow_clone()
    }
}

/// A borrowed tensor usable as `&Tensor`.
pub struct BorrowedTensor<'a> {
    inner: ManuallyDrop<Tensor>,
    _borrow: PhantomData<&'a Tensor>,
}

impl std::ops::Deref for BorrowedTensor<'_> {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.inner
    }
}

/// A tensor handle whose ownership is transferred to the receiver (see the module docs).
#[repr(transparent)]
#[derive(StableAbi)]
pub struct OwnedTensor {
    ptr: NonNull<OpaqueTensor>,
}

// SAFETY: a libtorch tensor handle may be moved between threads (tch::Tensor is Send).
unsafe impl Send for OwnedTensor {}

impl OwnedTensor {
    /// Gives up `t`'s handle to whoever receives this value.
    pub fn new(t: Tensor) -> Self {
        let t = ManuallyDrop::new(t);
        Self { ptr: raw(&t) }
    }

    /// Takes ownership of the handle as a `tch::Tensor`.
    pub fn into_tensor(self) -> Tensor {
        let me = ManuallyDrop::new(self);
        // SAFETY: we own the handle and hand it to exactly one Tensor.
        unsafe { Tensor::from_ptr(me.ptr.as_ptr() as *mut torch_sys::C_tensor) }
    }
}

impl Drop for OwnedTensor {
    fn drop(&mut self) {
        // SAFETY: we own the handle; rebuilding the Tensor and dropping it frees it once.
        drop(unsafe { Tensor::from_ptr(self.ptr.as_ptr() as *mut torch_sys::C_tensor) });
    }
}

/// A named owned tensor (state dicts, batches, parameters).
#[repr(C)]
#[derive(StableAbi)]
pub struct NamedTensor {
    pub name: RString,
    pub tensor: OwnedTensor,
}

impl NamedTensor {
    pub fn new(name: impl Into<String>, t: Tensor) -> Self {
        Self { name: RString::from(name.into()), tensor: OwnedTensor::new(t) }
    }
    pub fn into_pair(self) -> (String, Tensor) {
        (self.name.into_string(), self.tensor.into_tensor())
    }
}

/// Moves `(name, tensor)` pairs across.
pub fn named_to_ffi(v: Vec<(String, Tensor)>) -> abi_stable::std_types::RVec<NamedTensor> {
    v.into_iter().map(|(n, t)| NamedTensor::new(n, t)).collect()
}

/// Shallow-clones borrowed `(name, tensor)` pairs across.
pub fn named_refs_to_ffi(v: &[(String, Tensor)]) -> abi_stable::std_types::RVec<NamedTensor> {
    v.iter().map(|(n, t)| NamedTensor::new(n.clone(), t.shallow_clone())).collect()
}

pub fn named_from_ffi(v: abi_stable::std_types::RVec<NamedTensor>) -> Vec<(String, Tensor)> {
    v.into_iter().map(NamedTensor::into_pair).collect()
}

/// A libtorch scalar type as its c10 `ScalarType` number.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub struct DType(pub i32);

impl DType {
    pub fn from_kind(k: Kind) -> Self {
        Self(match k {
            Kind::Uint8 => 0,
            Kind::Int8 => 1,
            Kind::Int16 => 2,
            Kind::Int => 3,
            Kind::Int64 => 4,
            Kind::Half => 5,
            Kind::Float => 6,
            Kind::Double => 7,
            Kind::ComplexHalf => 8,
            Kind::ComplexFloat => 9,
            Kind::ComplexDouble => 10,
            Kind::Bool => 11,
            Kind::QInt8 => 12,
            Kind::QUInt8 => 13,
            Kind::QInt32 => 14,
            Kind::BFloat16 => 15,
            Kind::Float8e5m2 => 23,
            Kind::Float8e4m3fn => 24,
            Kind::Float8e5m2fnuz => 25,
            Kind::Float8e4m3fnuz => 26,
        })
    }

    pub fn to_kind(self) -> PluginResult<Kind> {
        Ok(match self.0 {
            0 => Kind::Uint8,
            1 => Kind::Int8,
            2 => Kind::Int16,
            3 => Kind::Int,
            4 => Kind::Int64,
            5 => Kind::Half,
            6 => Kind::Float,
            7 => Kind::Double,
            8 => Kind::ComplexHalf,
            9 => Kind::ComplexFloat,
            10 => Kind::ComplexDouble,
            11 => Kind::Bool,
            12 => Kind::QInt8,
            13 => Kind::QUInt8,
            14 => Kind::QInt32,
            15 => Kind::BFloat16,
            23 => Kind::Float8e5m2,
            24 => Kind::Float8e4m3fn,
            25 => Kind::Float8e5m2fnuz,
            26 => Kind::Float8e4m3fnuz,
            v => return Err(PluginError::invalid(format!("unknown scalar type code {v}"))),
        })
    }
}

/// A device as libtorch numbers it: -1 CPU, N ≥ 0 CUDA device N, -2 MPS, -3 Vulkan.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub struct DeviceCode(pub i32);

impl DeviceCode {
    pub fn from_device(d: Device) -> Self {
        Self(match d {
            Device::Cpu => -1,
            Device::Cuda(i) => i as i32,
            Device::Mps => -2,
            Device::Vulkan => -3,
        })
    }
    pub fn to_device(self) -> PluginResult<Device> {
        Ok(match self.0 {
            -1 => Device::Cpu,
            -2 => Device::Mps,
            -3 => Device::Vulkan,
            i if i >= 0 => Device::Cuda(i as usize),
            v => return Err(PluginError::invalid(format!("unknown device code {v}"))),
        })
    }
}

/// Parses `cpu`, `cuda`, `cuda:N` (what configs and `--device` accept).
pub fn parse_device(text: &str) -> PluginResult<Device> {
    let t = text.trim().to_ascii_lowercase();
    match t.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => Ok(Device::Cuda(0)),
        "mps" => Ok(Device::Mps),
        _ => match t.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Device::Cuda(i)),
            _ => Err(PluginError::invalid(format!(
                "unknown device `{text}`: use cpu, cuda or cuda:N"
            ))),
        },
    }
}

/// `cpu`, `cuda:0`: the inverse of [`parse_device`].
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_round_trip_keeps_storage_and_autograd() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
        let across = OwnedTensor::new(a.shallow_clone()).into_tensor();
        let loss = (&across * &across).sum(Kind::Float);
        loss.backward();
        let g: Vec<f32> = Vec::try_from(a.grad()).unwrap();
        assert_eq!(g, vec![2.0, 4.0, 6.0]);
    }

    #[test]
    fn borrowed_view_does_not_free() {
        let a = Tensor::from_slice(&[5i64, 6]);
        {
            let r = TensorRef::new(&a);
            let view = r.borrow();
            assert_eq!(view.int64_value(&[1]), 6);
            let kept = r.to_tensor();
            drop(view);
            assert_eq!(kept.int64_value(&[0]), 5);
        }
        assert_eq!(a.int64_value(&[0]), 5, "the owner's handle is still valid");
    }

    #[test]
    fn codes_round_trip() {
        for k in [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Int64, Kind::Bool, Kind::Uint8] {
            assert_eq!(DType::from_kind(k).to_kind().unwrap(), k);
        }
        for d in [Device::Cpu, Device::Cuda(0), Device::Cuda(3)] {
            assert_eq!(DeviceCode::from_device(d).to_device().unwrap(), d);
            assert_eq!(parse_device(&device_name(d)).unwrap(), d);
        }
        assert_eq!(parse_device("cuda").unwrap(), Device::Cuda(0));
        assert!(parse_device("tpu").unwrap_err().message().contains("tpu"));
    }
}
