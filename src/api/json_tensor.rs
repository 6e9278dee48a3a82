//! JSON tensor `data`: parsed straight into a typed vector (no intermediate
//! `serde_json::Value` tree: for large tensors that tree costs more than the inference), with
//! the nesting checked against the shape as it goes, and written back with non-finite floats
//! spelt out. The one-pass input reader, [`EagerInput`], which parses an input's `data` as the
//! request is read when its datatype and shape come first, is in `json_tensor/eager.rs`. The
//! rest of the KServe wire format is in `kserve.rs`.
//!
//! `data` may be flat (every number directly in the outer array, as Triton's clients send it)
//! or nested exactly as the shape; a ragged or wrongly nested array is refused, naming where.
//! A number that does not fit the datatype is refused, FP32 overflow included (`as` would make
//! it an infinity). JSON has no NaN or infinity: outputs holding them are written `"NaN"`,
//! `"Infinity"` and `"-Infinity"` (the proto3 JSON mapping of KServe's gRPC protocol, which
//! numpy parses too), never `null`.

mod eager;

use std::fmt;

use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

pub(crate) use self::eager::{EagerInput, InputData, JSON_TEXT_LEN};
use crate::tensor::{element_count, DataType, TensorData};
use crate::with_element_type;

/// Parses one input's `data` as `datatype`, checking its nesting against `shape` (element
/// count is checked by validation, against the shape, for flat and nested data alike).
pub fn parse(raw: &RawValue, datatype: DataType, shape: &[i64]) -> Result<TensorData, String> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let budget = std::cell::Cell::new(raw.get().len());
    TypedData {
        datatype,
        shape,
        text_budget: &budget,
    }
    .deserialize(&mut de)
    .map_err(|e| e.to_string())
}

/// `data` read as `datatype` straight from the request's JSON, where its datatype and shape
/// are already known (what [`parse`] does with data read aside first).
pub struct TypedData<'s> {
    pub datatype: DataType,
    pub shape: &'s [i64],
    /// Bytes of JSON text not yet spoken for: bounds what is reserved for the data, and is
    /// lowered by what this reserves, so that the inputs of one request together reserve no
    /// more than its text can hold.
    pub text_budget: &'s std::cell::Cell<usize>,
}

impl<'de> DeserializeSeed<'de> for TypedData<'_> {
    type Value = TensorData;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<TensorData, D::Error> {
        // The shape is only declared: reserve no more than the JSON text can hold (every
        // element takes at least a digit and a separator), or a 73-byte request could reserve
        // 128 MiB.
        let budget = self.text_budget.get();
        let capacity = element_count(self.shape).unwrap_or(0).min(budget / 2 + 1);
        self.text_budget.set(budget.saturating_sub(capacity * 2));
        let mut nesting = Nesting {
            shape: self.shape,
            // A shape with a negative dimension is refused by validation, with its own reason.
            check: self.shape.iter().all(|&d| d >= 0),
            nested: None,
            path: Vec::new(),
        };
        with_element_type!(self.datatype, T, Wrap => {
            let mut out: Vec<T> = Vec::with_capacity(capacity);
            Flatten { out: &mut out, nesting: &mut nesting, depth: 0 }.deserialize(deserializer)?;
            Ok(Wrap(out))
        })
    }
}

/// A tensor element that can be read from a JSON number or boolean, exactly.
trait JsonElement: Sized {
    const DATATYPE: DataType;
    fn from_i64(v: i64) -> Option<Self>;
    fn from_u64(v: u64) -> Option<Self>;
    fn from_f64(v: f64) -> Option<Self>;
    fn from_bool(_: bool) -> Option<Self> {
        None
    }
    /// Why a value that does not convert is refused.
    fn refusal() -> String {
        format!("is not a valid {}", Self::DATATYPE)
    }
}

macro_rules! integer_element {
    ($($t:ty => $dt:ident),*) => {$(
        impl JsonElement for $t {
            const DATATYPE: DataType = DataType::$dt;
            fn from_i64(v: i64) -> Option<Self> { <$t>::try_from(v).ok() }
            fn from_u64(v: u64) -> Option<Self> { <$t>::try_from(v).ok() }
            // Integral floats such as 3.0 are accepted; 3.5 is not. The upper bound is the
            // first power of two past the type, exclusive: `MAX as f64` rounds up to it for
            // the 64-bit types, and `as` would then saturate 2^63 to i64::MAX silently.
            fn from_f64(v: f64) -> Option<Self> {
                let past_max = 2f64.powi(<$t>::BITS as i32 - i32::from(<$t>::MIN != 0));
                if v.fract() == 0.0 && v >= <$t>::MIN as f64 && v < past_max { Some(v as $t) } else { None }
            }
        }
    )*};
}
integer_element!(u8 => Uint8, u16 => Uint16, u32 => Uint32, u64 => Uint64, i8 => Int8, i16 => Int16, i32 => Int32, i64 => Int64);

macro_rules! float_element {
    ($($t:ty => $dt:ident),*) => {$(
        impl JsonElement for $t {
            const DATATYPE: DataType = DataType::$dt;
            fn from_i64(v: i64) -> Option<Self> { Some(v as $t) }
            fn from_u64(v: u64) -> Option<Self> { Some(v as $t) }
            // `as` turns a value beyond the type's range into an infinity: refuse it instead
            // (JSON cannot express NaN or infinities, so a finite number must stay finite).
            fn from_f64(v: f64) -> Option<Self> { Some(v as $t).filter(|x| x.is_finite()) }
            fn refusal() -> String {
                format!("is out of range for {} (finite, at most {:e} in magnitude)", Self::DATATYPE, <$t>::MAX)
            }
        }
    )*};
}
float_element!(f32 => Fp32, f64 => Fp64);

impl JsonElement for bool {
    const DATATYPE: DataType = DataType::Bool;
    fn from_i64(_: i64) -> Option<Self> {
        None
    }
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
    fn from_f64(_: f64) -> Option<Self> {
        None
    }
    fn from_bool(v: bool) -> Option<Self> {
        Some(v)
    }
}

/// How a tensor's JSON `data` must be nested: flat (every number directly in the outer
/// array) or exactly as the shape, decided by the first element. Checked while parsing, so a
/// ragged array is refused without building a tree of it.
struct Nesting<'s> {
    shape: &'s [i64],
    check: bool,
    /// Unknown until the outer array's first element: `Some(true)` when it is an array.
    nested: Option<bool>,
    /// The index being read at each depth, for messages.
    path: Vec<usize>,
}

impl Nesting<'_> {
    /// Where the element at `depth` is: `data[1][0]`.
    fn at(&self, depth: usize) -> String {
        let mut at = String::from("data");
        for i in &self.path[..depth.min(self.path.len())] {
            at.push_str(&format!("[{i}]"));
        }
        at
    }

    /// A scalar arrives at `depth` (how many arrays enclose it).
    fn scalar(&mut self, depth: usize) -> Result<(), String> {
        if !self.check || depth == 0 {
            return Ok(()); // a bare number: flat data of one element
        }
        match self.nested {
            None => self.nested = Some(false),
            Some(false) => {}
            Some(true) if depth == self.shape.len() => {}
            Some(true) => {
                return Err(format!(
                    "{} is a number, but shape {:?} needs an array of {} there",
                    self.at(depth),
                    self.shape,
                    self.shape[depth]
                ))
            }
        }
        Ok(())
    }

    /// An array starts at `depth`.
    fn array(&mut self, depth: usize) -> Result<(), String> {
        if !self.check || depth == 0 {
            return Ok(());
        }
        match self.nested {
            None => self.nested = Some(true),
            Some(true) => {}
            Some(false) => {
                return Err(format!(
                    "{} is an array, but data[0] is a number: send the data flat, or nested exactly as shape {:?}",
                    self.at(depth),
                    self.shape
                ))
            }
        }
        if depth >= self.shape.len() {
            return Err(format!(
                "{} is an array, but shape {:?} has only {}",
                self.at(depth),
                self.shape,
                plural(self.shape.len(), "dimension")
            ));
        }
        Ok(())
    }

    /// The array at `depth` has `count` elements so far (`done`: all of them).
    fn count(&self, depth: usize, count: usize, done: bool) -> Result<(), String> {
        if !self.check || self.nested != Some(true) {
            return Ok(());
        }
        let want = self.shape[depth] as u64;
        if (count as u64) > want || (done && count as u64 != want) {
            return Err(format!(
                "{} has {}{}, but shape {:?} needs {want} on axis {depth}",
                self.at(depth),
                if done { "" } else { "at least " },
                plural(count, "element"),
                self.shape
            ));
        }
        Ok(())
    }
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Appends every scalar of a JSON array to `out`, in row-major order, checking its nesting.
struct Flatten<'v, 's, T> {
    out: &'v mut Vec<T>,
    nesting: &'v mut Nesting<'s>,
    depth: usize,
}

impl<'de, T: JsonElement> DeserializeSeed<'de> for Flatten<'_, '_, T> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, T: JsonElement> Visitor<'de> for Flatten<'_, '_, T> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an array of {} values", T::DATATYPE)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        use serde::de::Error;
        let Flatten {
            out,
            nesting,
            depth,
        } = self;
        nesting.array(depth).map_err(A::Error::custom)?;
        nesting.path.push(0);
        let mut count = 0;
        loop {
            nesting.path[depth] = count;
            let child = Flatten {
                out: &mut *out,
                nesting: &mut *nesting,
                depth: depth + 1,
            };
            if seq.next_element_seed(child)?.is_none() {
                break;
            }
            count += 1;
            nesting
                .count(depth, count, false)
                .map_err(A::Error::custom)?;
        }
        nesting.path.pop();
        nesting.count(depth, count, true).map_err(A::Error::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.push(T::from_i64(v), v)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.push(T::from_u64(v), v)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.push(T::from_f64(v), Float(v))
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        if T::DATATYPE != DataType::Bool {
            return Err(E::custom(format!(
                "element {} ({v}) is a boolean, not a valid {}",
                self.out.len(),
                T::DATATYPE
            )));
        }
        self.push(T::from_bool(v), v)
    }
}

impl<T: JsonElement> Flatten<'_, '_, T> {
    fn push<E: serde::de::Error>(
        self,
        value: Option<T>,
        shown: impl fmt::Display,
    ) -> Result<(), E> {
        self.nesting.scalar(self.depth).map_err(E::custom)?;
        match value {
            Some(v) => {
                self.out.push(v);
                Ok(())
            }
            None => Err(E::custom(format!(
                "element {} ({shown}) {}",
                self.out.len(),
                T::refusal()
            ))),
        }
    }
}

/// A JSON number as a message shows it: `1e39`, not forty digits.
struct Float(f64);

impl fmt::Display for Float {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.0.abs();
        if a >= 1e16 || (a != 0.0 && a < 1e-6) {
            write!(f, "{:e}", self.0)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// A tensor's data as JSON: as [`TensorData`] serialises, except that non-finite floats
/// become `"NaN"`, `"Infinity"` or `"-Infinity"` (serde_json would write `null`).
pub struct JsonData<'a>(pub &'a TensorData);

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        fn floats<S: Serializer, F: Copy + Into<f64> + Serialize>(
            v: &[F],
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            let mut seq = serializer.serialize_seq(Some(v.len()))?;
            for &x in v {
                let f: f64 = x.into();
                match f {
                    f if f.is_finite() => seq.serialize_element(&x)?,
                    f if f.is_nan() => seq.serialize_element("NaN")?,
                    f if f > 0.0 => seq.serialize_element("Infinity")?,
                    _ => seq.serialize_element("-Infinity")?,
                }
            }
            seq.end()
        }
        match self.0 {
            TensorData::Fp32(v) if !v.iter().all(|x| x.is_finite()) => floats(v, serializer),
            TensorData::Fp64(v) if !v.iter().all(|x| x.is_finite()) => floats(v, serializer),
            data => data.serialize(serializer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_as(datatype: DataType, shape: &str, data: &str) -> Result<TensorData, String> {
        let shape: Vec<i64> = serde_json::from_str(shape).unwrap();
        let raw: &RawValue = serde_json::from_str(data).unwrap();
        parse(raw, datatype, &shape)
    }

    fn data(shape: &str, data: &str) -> Result<TensorData, String> {
        parse_as(DataType::Int32, shape, data)
    }

    #[test]
    fn nested_data_must_match_the_shape() {
        let four = TensorData::Int32(vec![1, 2, 3, 4]);
        assert_eq!(data("[2,2]", "[[1,2],[3,4]]").unwrap(), four);
        assert_eq!(
            data("[2,2]", "[1,2,3,4]").unwrap(),
            four,
            "flat data stays accepted"
        );
        assert_eq!(data("[1,2,2]", "[[[1,2],[3,4]]]").unwrap(), four);
        assert_eq!(data("[]", "7").unwrap(), TensorData::Int32(vec![7]));
        assert_eq!(data("[]", "[7]").unwrap(), TensorData::Int32(vec![7]));
        let cases = [
            (
                "[2,2]",
                "[[1,2],[3]]",
                "data[1] has 1 element, but shape [2, 2] needs 2 on axis 1",
            ),
            (
                "[2,2]",
                "[[1,2,3],[4]]",
                "data[0] has at least 3 elements, but shape [2, 2] needs 2 on axis 1",
            ),
            (
                "[2,2]",
                "[[1,2],[3,4],[5,6]]",
                "data has at least 3 elements, but shape [2, 2] needs 2 on axis 0",
            ),
            ("[2,2]", "[[1,2,3,4]]", "data[0] has at least 3 elements"),
            (
                "[2,2]",
                "[[1,2],3]",
                "data[1] is a number, but shape [2, 2] needs an array of 2 there",
            ),
            (
                "[2,2]",
                "[1,[2,3],4]",
                "data[1] is an array, but data[0] is a number",
            ),
            (
                "[1,1]",
                "[[[1]]]",
                "data[0][0] is an array, but shape [1, 1] has only 2 dimensions",
            ),
            (
                "[2]",
                "[[1],[2]]",
                "data[0] is an array, but shape [2] has only 1 dimension",
            ),
            ("[1,2,2]", "[[[1,2],[3]]]", "data[0][1] has 1 element,"),
        ];
        for (shape, json, needle) in cases {
            let err = data(shape, json).unwrap_err();
            assert!(err.contains(needle), "{shape} {json}: {err}");
        }
    }

    fn fp(datatype: &str, data: &str) -> Result<TensorData, String> {
        parse_as(DataType::parse(datatype).unwrap(), "[2]", data)
    }

    #[test]
    fn floats_out_of_range_are_refused_not_made_infinite() {
        for data in [
            "[0, 1e39]",
            "[0, -1e39]",
            "[0, 1000000000000000000000000000000000000000]",
        ] {
            let err = fp("FP32", data).unwrap_err();
            assert!(
                err.contains("element 1 (") && err.contains("out of range for FP32"),
                "{data}: {err}"
            );
        }
        assert!(fp("FP32", "[0, 1e39]").unwrap_err().contains("(1e39)"));
        assert_eq!(
            fp("FP32", "[3.4e38, -3.4e38]").unwrap(),
            TensorData::Fp32(vec![3.4e38, -3.4e38])
        );
        assert_eq!(
            fp("FP64", "[1e39, 1e300]").unwrap(),
            TensorData::Fp64(vec![1e39, 1e300])
        );
        // Beyond FP64, serde_json itself refuses the number.
        let err = fp("FP64", "[0, 1e400]").unwrap_err();
        assert!(err.contains("out of range"), "{err}");
        for text in [r#"[0, "NaN"]"#, r#"[0, "Infinity"]"#] {
            assert!(fp("FP32", text)
                .unwrap_err()
                .contains("invalid type: string"));
        }
    }

    #[test]
    fn integral_floats_past_an_integer_type_are_refused_not_saturated() {
        // 2^63 and 2^64 are where `MAX as f64` rounds to for the 64-bit types.
        for (datatype, data) in [
            ("INT64", "[0, 9223372036854775808.0]"),
            ("INT64", "[0, 9.2233720368547758e18]"),
            ("INT64", "[0, -9223372036854777856.0]"),
            ("UINT64", "[0, 18446744073709551616.0]"),
            ("INT32", "[0, 2147483648.0]"),
            ("UINT8", "[0, 256.0]"),
            ("UINT8", "[0, -1.0]"),
        ] {
            let err = fp(datatype, data).unwrap_err();
            assert!(
                err.contains(&format!("is not a valid {datatype}")),
                "{data}: {err}"
            );
        }
        assert_eq!(
            fp("INT64", "[-9223372036854775808.0, 9223372036854774784.0]").unwrap(),
            TensorData::Int64(vec![i64::MIN, 9_223_372_036_854_774_784])
        );
        assert_eq!(
            fp("UINT8", "[255.0, 0.0]").unwrap(),
            TensorData::Uint8(vec![255, 0])
        );
        assert_eq!(
            fp("INT32", "[2147483647.0, -2147483648.0]").unwrap(),
            TensorData::Int32(vec![i32::MAX, i32::MIN])
        );
    }

    #[test]
    fn booleans_are_refused_for_numeric_types_as_booleans() {
        let err = fp("FP32", "[true, 1.0]").unwrap_err();
        assert!(
            err.contains("element 0 (true) is a boolean, not a valid FP32"),
            "{err}"
        );
        let err = fp("INT32", "[1, false]").unwrap_err();
        assert!(err.contains("element 1 (false) is a boolean"), "{err}");
        assert_eq!(
            fp("BOOL", "[true, false]").unwrap(),
            TensorData::Bool(vec![true, false])
        );
    }

    #[test]
    fn non_finite_outputs_are_spelt_out_in_json() {
        let json = |data: TensorData| serde_json::to_string(&JsonData(&data)).unwrap();
        assert_eq!(
            json(TensorData::Fp32(vec![
                1.5,
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY
            ])),
            r#"[1.5,"NaN","Infinity","-Infinity"]"#
        );
        assert_eq!(
            json(TensorData::Fp64(vec![f64::NAN, -0.25])),
            r#"["NaN",-0.25]"#
        );
        assert_eq!(json(TensorData::Fp32(vec![1.5, 2.0])), "[1.5,2.0]");
        assert_eq!(json(TensorData::Int64(vec![-3])), "[-3]");
        // Binary outputs carry the bits as they are.
        let mut bytes = Vec::new();
        TensorData::Fp32(vec![f32::NAN]).write_le_bytes(&mut bytes);
        assert!(f32::from_le_bytes(bytes.try_into().unwrap()).is_nan());
    }
}
