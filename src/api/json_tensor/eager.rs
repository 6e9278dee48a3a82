//! The one-pass input reader: an input object of an inference request whose `data` is parsed
//! into a typed vector as the request is read, when its `datatype` and `shape` come first (the
//! order Triton's clients write). Anything unusual makes it fail, and `kserve::decode` reads
//! the request again the two-pass way (`data` set aside, then [`super::parse`]), so that
//! every refusal keeps its exact message. The typed parsing itself is [`TypedData`]'s.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::TypedData;
use crate::tensor::{DataType, TensorData};

/// An input's `data`: set aside as text, or parsed already.
pub(crate) enum InputData<'a> {
    Raw(&'a RawValue),
    Parsed(TensorData),
}

/// An input as `InputJson` (in `kserve.rs`) reads it, except that `data` that
/// comes after a known `datatype` and a `shape` (the order Triton's clients write) is parsed
/// as it is read: one pass over the numbers instead of two, which was a third of the JSON
/// decoding of a 1-row request (perf, docs/efficiency.md). It fails on anything unusual (a
/// repeated key, `null` data, data that does not parse); the request is then read again as
/// before, so that every refusal keeps its exact message and order.
pub(crate) struct EagerInput<'a> {
    pub(crate) name: String,
    pub(crate) shape: Vec<i64>,
    pub(crate) datatype: String,
    pub(crate) parameters: Option<Map<String, Value>>,
    pub(crate) data: Option<InputData<'a>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for EagerInput<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EagerVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for EagerVisitor<'a> {
            type Value = EagerInput<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an input object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EagerInput<'a>, A::Error> {
                use serde::de::Error;
                let (mut name, mut shape, mut datatype) = (None, None::<Vec<i64>>, None::<String>);
                let (mut parameters, mut data, mut data_seen) = (None, None, false);
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let repeated = match &*key {
                        "name" => name.replace(map.next_value()?).is_some(),
                        "shape" => shape.replace(map.next_value()?).is_some(),
                        "datatype" => datatype.replace(map.next_value()?).is_some(),
                        "parameters" => parameters.replace(map.next_value()?).is_some(),
                        "data" => {
                            let known = datatype.as_deref().and_then(DataType::parse);
                            data = match (known, shape.as_deref()) {
                                (Some(datatype), Some(shape)) => {
                                    Some(InputData::Parsed(JSON_TEXT_LEN.with(|text_budget| {
                                        map.next_value_seed(TypedData {
                                            datatype,
                                            shape,
                                            text_budget,
                                        })
                                    })?))
                                }
                                // `null` is no data, as `InputJson` reads it.
                                _ => map.next_value::<Option<&RawValue>>()?.map(InputData::Raw),
                            };
                            std::mem::replace(&mut data_seen, true)
                        }
                        _ => map.next_value::<serde::de::IgnoredAny>().map(|_| false)?,
                    };
                    if repeated {
                        return Err(A::Error::custom("repeated key"));
                    }
                }
                let missing = || A::Error::custom("missing key");
                Ok(EagerInput {
                    name: name.ok_or_else(missing)?,
                    shape: shape.ok_or_else(missing)?,
                    datatype: datatype.ok_or_else(missing)?,
                    parameters: parameters.flatten(),
                    data,
                })
            }
        }
        deserializer.deserialize_map(EagerVisitor(PhantomData))
    }
}

thread_local! {
    /// What is left of the JSON text `kserve::decode` is reading, after what earlier inputs
    /// reserved: the most the next input's data can hold, which bounds what is reserved for it
    /// (as [`super::parse`] bounds each input by its own text), so that a request of many
    /// inputs cannot reserve many times its size. A `Deserialize` impl has no other way to
    /// learn it.
    pub(crate) static JSON_TEXT_LEN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}
