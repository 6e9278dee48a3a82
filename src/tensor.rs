//! Typed tensors as they travel through the server: one `Vec<T>` per tensor, row-major,
//! so that packing a batch is one `extend_from_slice` per request and splitting it is one
//! slice copy per request.

use std::fmt;
use std::ops::Range;

use serde::{Serialize, Serializer};

/// The Open Inference Protocol's tensor datatypes that streamserve can hand to ONNX Runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp32,
    Fp64,
}

impl DataType {
    pub const ALL: [DataType; 11] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp32,
        DataType::Fp64,
    ];

    /// The protocol's name for the type (`"FP32"`, `"INT64"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
        }
    }

    pub fn parse(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|dt| dt.as_str() == name)
    }

    /// Bytes per element in the binary tensor data extension (little-endian, BOOL as one byte).
    pub fn element_size(self) -> usize {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for DataType {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Row-major tensor contents, one variant per [`DataType`].
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    Bool(Vec<bool>),
    Uint8(Vec<u8>),
    Uint16(Vec<u16>),
    Uint32(Vec<u32>),
    Uint64(Vec<u64>),
    Int8(Vec<i8>),
    Int16(Vec<i16>),
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
}

/// Runs `$body` with `$v` bound to the inner `Vec<T>` of a [`TensorData`], whatever `T` is.
#[macro_export]
macro_rules! with_tensor_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::tensor::TensorData::Bool($v) => $body,
            $crate::tensor::TensorData::Uint8($v) => $body,
            $crate::tensor::TensorData::Uint16($v) => $body,
            $crate::tensor::TensorData::Uint32($v) => $body,
            $crate::tensor::TensorData::Uint64($v) => $body,
            $crate::tensor::TensorData::Int8($v) => $body,
            $crate::tensor::TensorData::Int16($v) => $body,
            $crate::tensor::TensorData::Int32($v) => $body,
            $crate::tensor::TensorData::Int64($v) => $body,
            $crate::tensor::TensorData::Fp32($v) => $body,
            $crate::tensor::TensorData::Fp64($v) => $body,
        }
    };
}

/// Runs `$body` with the type alias `$t` set to the element type of a [`DataType`], and
/// `$wrap` naming the matching [`TensorData`] constructor.
#[macro_export]
macro_rules! with_element_type {
    ($dt:expr, $t:ident, $wrap:ident => $body:expr) => {
        match $dt {
            $crate::tensor::DataType::Bool => {
                type $t = bool;
                use $crate::tensor::TensorData::Bool as $wrap;
                $body
            }
            $crate::tensor::DataType::Uint8 => {
                type $t = u8;
                use $crate::tensor::TensorData::Uint8 as $wrap;
                $body
            }
            $crate::tensor::DataType::Uint16 => {
                type $t = u16;
                use $crate::tensor::TensorData::Uint16 as $wrap;
                $body
            }
            $crate::tensor::DataType::Uint32 => {
                type $t = u32;
                use $crate::tensor::TensorData::Uint32 as $wrap;
                $body
            }
            $crate::tensor::DataType::Uint64 => {
                type $t = u64;
                use $crate::tensor::TensorData::Uint64 as $wrap;
                $body
            }
            $crate::tensor::DataType::Int8 => {
                type $t = i8;
                use $crate::tensor::TensorData::Int8 as $wrap;
                $body
            }
            $crate::tensor::DataType::Int16 => {
                type $t = i16;
                use $crate::tensor::TensorData::Int16 as $wrap;
                $body
            }
            $crate::tensor::DataType::Int32 => {
                type $t = i32;
                use $crate::tensor::TensorData::Int32 as $wrap;
                $body
            }
            $crate::tensor::DataType::Int64 => {
                type $t = i64;
                use $crate::tensor::TensorData::Int64 as $wrap;
                $body
            }
            $crate::tensor::DataType::Fp32 => {
                type $t = f32;
                use $crate::tensor::TensorData::Fp32 as $wrap;
                $body
            }
            $crate::tensor::DataType::Fp64 => {
                type $t = f64;
                use $crate::tensor::TensorData::Fp64 as $wrap;
                $body
            }
        }
    };
}

impl TensorData {
    pub fn datatype(&self) -> DataType {
        match self {
            TensorData::Bool(_) => DataType::Bool,
            TensorData::Uint8(_) => DataType::Uint8,
            TensorData::Uint16(_) => DataType::Uint16,
            TensorData::Uint32(_) => DataType::Uint32,
            TensorData::Uint64(_) => DataType::Uint64,
            TensorData::Int8(_) => DataType::Int8,
            TensorData::Int16(_) => DataType::Int16,
            TensorData::Int32(_) => DataType::Int32,
            TensorData::Int64(_) => DataType::Int64,
            TensorData::Fp32(_) => DataType::Fp32,
            TensorData::Fp64(_) => DataType::Fp64,
        }
    }

    pub fn len(&self) -> usize {
        with_tensor_data!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An empty tensor of `datatype` with room for `capacity` elements.
    pub fn with_capacity(datatype: DataType, capacity: usize) -> TensorData {
        with_element_type!(datatype, T, Wrap => Wrap(Vec::<T>::with_capacity(capacity)))
    }

    /// Appends `other`'s elements `range`. Both must have the same datatype (the router only
    /// batches requests that were validated against the same model input).
    pub fn extend_from_range(&mut self, other: &TensorData, range: Range<usize>) {
        macro_rules! arms {
            ($($variant:ident),*) => {
                match (self, other) {
                    $((TensorData::$variant(a), TensorData::$variant(b)) => a.extend_from_slice(&b[range]),)*
                    (a, b) => panic!("extend_from_range: {} into {}", b.datatype(), a.datatype()),
                }
            };
        }
        arms!(Bool, Uint8, Uint16, Uint32, Uint64, Int8, Int16, Int32, Int64, Fp32, Fp64)
    }

    /// Decodes the binary tensor data extension's raw little-endian bytes.
    pub fn from_le_bytes(datatype: DataType, bytes: &[u8]) -> Result<TensorData, String> {
        let size = datatype.element_size();
        if !bytes.len().is_multiple_of(size) {
            return Err(format!(
                "{} bytes is not a whole number of {} elements ({} bytes each)",
                bytes.len(),
                datatype,
                size
            ));
        }
        if datatype == DataType::Bool {
            return bytes
                .iter()
                .map(|b| match b {
                    0 => Ok(false),
                    1 => Ok(true),
                    other => Err(format!("BOOL byte must be 0 or 1, got {other}")),
                })
                .collect::<Result<Vec<bool>, String>>()
                .map(TensorData::Bool);
        }
        macro_rules! decode {
            ($t:ty, $variant:ident) => {
                TensorData::$variant(
                    bytes
                        .chunks_exact(size)
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk size")))
                        .collect(),
                )
            };
        }
        Ok(match datatype {
            DataType::Bool => unreachable!("handled above"),
            DataType::Uint8 => TensorData::Uint8(bytes.to_vec()),
            DataType::Int8 => decode!(i8, Int8),
            DataType::Uint16 => decode!(u16, Uint16),
            DataType::Int16 => decode!(i16, Int16),
            DataType::Uint32 => decode!(u32, Uint32),
            DataType::Int32 => decode!(i32, Int32),
            DataType::Fp32 => decode!(f32, Fp32),
            DataType::Uint64 => decode!(u64, Uint64),
            DataType::Int64 => decode!(i64, Int64),
            DataType::Fp64 => decode!(f64, Fp64),
        })
    }

    /// Appends the elements as raw little-endian bytes (the binary tensor data extension).
    pub fn write_le_bytes(&self, out: &mut Vec<u8>) {
        out.reserve(self.len() * self.datatype().element_size());
        match self {
            TensorData::Bool(v) => out.extend(v.iter().map(|&b| b as u8)),
            TensorData::Uint8(v) => out.extend_from_slice(v),
            TensorData::Uint16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Uint32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Uint64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Int8(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Int16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Int32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Int64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Fp32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Fp64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }
}

impl Serialize for TensorData {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        with_tensor_data!(self, v => v.serialize(serializer))
    }
}

/// A tensor with its name and concrete shape.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

/// Number of elements a concrete shape holds (`None` on overflow or a negative dimension).
pub fn element_count(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    })
}

/// `n` elements of `dt` as little-endian bytes, each valid for the type (for tests).
#[cfg(test)]
pub(crate) fn sample_le_bytes(dt: DataType, n: usize) -> Vec<u8> {
    (0..dt.element_size() * n)
        .map(|i| {
            if dt == DataType::Bool {
                (i % 2) as u8
            } else {
                i as u8
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn le_bytes_round_trip_every_type() {
        for dt in DataType::ALL {
            let bytes = sample_le_bytes(dt, 3);
            let data = TensorData::from_le_bytes(dt, &bytes).unwrap();
            assert_eq!(data.datatype(), dt);
            assert_eq!(data.len(), 3);
            let mut out = Vec::new();
            data.write_le_bytes(&mut out);
            assert_eq!(out, bytes, "{dt}");
        }
    }

    #[test]
    fn odd_byte_counts_are_refused() {
        assert!(TensorData::from_le_bytes(DataType::Fp32, &[0; 7]).is_err());
        assert!(TensorData::from_le_bytes(DataType::Bool, &[2]).is_err());
    }

    #[test]
    fn extend_from_ranges() {
        let mut a = TensorData::with_capacity(DataType::Fp32, 4);
        a.extend_from_range(&TensorData::Fp32(vec![1.0, 2.0]), 0..2);
        a.extend_from_range(&TensorData::Fp32(vec![0.0, 3.0, 4.0]), 1..3);
        assert_eq!(a, TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.0]));
    }

    #[test]
    fn element_counts() {
        assert_eq!(element_count(&[2, 3]), Some(6));
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[-1, 3]), None);
        assert_eq!(element_count(&[i64::MAX, 4]), None);
    }
}
