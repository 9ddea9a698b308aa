//! Dataset plugins: read one on-disk format into canonical [`Sample`]s.
use abi_stable::sabi_trait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RBox, RResult, RStr, RString, RVec};
use abi_stable::StableAbi;

use crate::error::{guard, PluginError, PluginResult};
use crate::sample::Sample;
use crate::Plugin;

/// What to open: a file or folder, and a split name (`train`, `test`).
#[derive(Clone, Debug, PartialEq)]
pub struct DataSource {
    pub path: String,
    pub split: String,
}

/// A data set format configured for a run.
pub trait DatasetFormat: Send + 'static {
    fn open(&self, source: &DataSource) -> PluginResult<Box<dyn SampleReader>>;
}

/// Random access to the samples of one opened split.
pub trait SampleReader: Send {
    fn len(&self) -> PluginResult<u64>;
    /// Sample `index`; an error names the file and the record.
    fn get(&self, index: u64) -> PluginResult<Sample>;
}

/// A split held in memory, in order: the reader most formats need once they have parsed a
/// file.
pub struct SampleList(pub Vec<Sample>);

impl SampleReader for SampleList {
    fn len(&self) -> PluginResult<u64> {
        Ok(self.0.len() as u64)
    }
    fn get(&self, index: u64) -> PluginResult<Sample> {
        self.0.get(index as usize).cloned().ok_or_else(|| {
            PluginError::invalid(format!("sample {index} out of range (0..{})", self.0.len()))
        })
    }
}

/// A sample on the wire: its JSON and the blobs its images point to.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiSample {
    pub json: RString,
    pub blobs: RVec<RVec<u8>>,
}

impl FfiSample {
    pub fn from_sample(s: Sample) -> PluginResult<Self> {
        let json = serde_json::to_string(&s)
            .map_err(|e| PluginError::runtime(format!("sample to JSON: {e}")))?;
        Ok(Self { json: json.into(), blobs: s.blobs.into_iter().map(RVec::from).collect() })
    }
    pub fn into_sample(self) -> PluginResult<Sample> {
        let mut s: Sample = serde_json::from_str(self.json.as_str())
            .map_err(|e| PluginError::invalid(format!("sample JSON from plugin: {e}")))?;
        s.blobs = self.blobs.into_iter().map(RVec::into_vec).collect();
        Ok(s)
    }
}

#[sabi_trait]
pub trait FfiDatasetFormat: Send {
    #[sabi(last_prefix_field)]
    fn open(&self, path: RStr<'_>, split: RStr<'_>) -> RResult<SampleReaderBox, PluginError>;
}

pub type DatasetFormatBox = FfiDatasetFormat_TO<'static, RBox<()>>;

#[sabi_trait]
pub trait FfiSampleReader: Send {
    fn len(&self) -> RResult<u64, PluginError>;
    #[sabi(last_prefix_field)]
    fn get(&self, index: u64) -> RResult<FfiSample, PluginError>;
}

pub type SampleReaderBox = FfiSampleReader_TO<'static, RBox<()>>;

struct DatasetFormatBridge<T>(T);

impl<T: DatasetFormat> FfiDatasetFormat for DatasetFormatBridge<T> {
    fn open(&self, path: RStr<'_>, split: RStr<'_>) -> RResult<SampleReaderBox, PluginError> {
        guard(|| {
            let source =
                DataSource { path: path.as_str().to_string(), split: split.as_str().to_string() };
            let reader = self.0.open(&source)?;
            Ok(FfiSampleReader_TO::from_value(SampleReaderBridge(reader), TD_Opaque))
        })
    }
}

struct SampleReaderBridge(Box<dyn SampleReader>);

impl FfiSampleReader for SampleReaderBridge {
    fn len(&self) -> RResult<u64, PluginError> {
        guard(|| self.0.len())
    }
    fn get(&self, index: u64) -> RResult<FfiSample, PluginError> {
        guard(|| FfiSample::from_sample(self.0.get(index)?))
    }
}

/// Plugin side of `export_plugin!`.
pub fn create<T: Plugin + DatasetFormat>(
    config_json: RStr<'_>,
) -> RResult<DatasetFormatBox, PluginError> {
    guard(|| {
        let d = T::from_config(config_json.as_str())
            .map_err(|e| e.context(format!("plugin `{}`", T::NAME)))?;
        Ok(FfiDatasetFormat_TO::from_value(DatasetFormatBridge(d), TD_Opaque))
    })
}

/// Host side: a data set format living in a plugin.
pub struct DatasetFormatHandle(pub DatasetFormatBox);

impl DatasetFormat for DatasetFormatHandle {
    fn open(&self, source: &DataSource) -> PluginResult<Box<dyn SampleReader>> {
        let r =
            self.0.open(source.path.as_str().into(), source.split.as_str().into()).into_result()?;
        Ok(Box::new(SampleReaderHandle(r)))
    }
}

/// Host side: an opened split.
pub struct SampleReaderHandle(pub SampleReaderBox);

impl SampleReader for SampleReaderHandle {
    fn len(&self) -> PluginResult<u64> {
        self.0.len().into_result()
    }
    fn get(&self, index: u64) -> PluginResult<Sample> {
        self.0.get(index).into_result()?.into_sample()
    }
}
