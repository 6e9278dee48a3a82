//! Input rules: what a model accepts beyond its ONNX signature, from the manifest's `inputs`
//! declarations ([`InputDecl`]) resolved against the loaded model, and the per-request
//! checks that apply them. ONNX files often declare dynamic dimensions that the model really
//! needs fixed, or a scalar of which only some values work; without these rules such a
//! request reaches ONNX Runtime and fails deep inside the graph.

use std::fmt::Write as _;

use serde::Serialize;

use crate::manifest::{AllowedValue, BatchAxis, InputDecl, ModelEntry};
use crate::runtime::TensorSpec;
use crate::tensor::{DataType, NamedTensor, TensorData};

/// The rules of one input (same order as the model's inputs). Default: none.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InputRule {
    /// Shapes the input may have (`-1`: any size); empty: the model's own shape.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shapes: Vec<Vec<i64>>,
    /// Values every element must be one of; empty: any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<AllowedValue>,
    /// The input whose value picks the shape (`shapes[i]` goes with its `values[i]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paired_with: Option<String>,
    #[serde(skip)]
    pub paired: Option<usize>,
}

impl InputRule {
    pub fn is_empty(&self) -> bool {
        self.shapes.is_empty() && self.values.is_empty()
    }
}

/// Resolves the manifest's declarations against the model's inputs, and makes each declared
/// input's spec advertise its first declared shape (what metadata shows). Errors say why the
/// declaration does not fit the model; the model is then refused.
pub fn resolve(
    entry: &ModelEntry,
    inputs: &mut [TensorSpec],
    axes: &[BatchAxis],
) -> Result<Vec<InputRule>, String> {
    let mut rules = vec![InputRule::default(); inputs.len()];
    let position = |name: &str| inputs.iter().position(|s| s.name == name);
    for (name, decl) in &entry.inputs {
        let Some(i) = position(name) else {
            let names: Vec<&str> = inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(format!(
                "the manifest declares input '{name}', which the model does not have (inputs: {})",
                names.join(", ")
            ));
        };
        let spec = &inputs[i];
        check_decl(name, decl, spec, axes[i], entry.batching.max_batch_size > 0)?;
        let paired = match &decl.paired_with {
            None => None,
            Some(other) => {
                let j = position(other).ok_or_else(|| {
                    format!(
                        "inputs.{name}.paired_with names '{other}', which the model does not have"
                    )
                })?;
                let target = &inputs[j].shape;
                if target.iter().any(|&d| d != 1) {
                    return Err(format!(
                        "inputs.{name} is paired_with '{other}', which must hold one value (shape [] or [1]), \
                         but the model declares {target:?}"
                    ));
                }
                Some(j)
            }
        };
        rules[i] = InputRule {
            shapes: decl.shapes.clone(),
            values: decl.values.clone(),
            paired_with: decl.paired_with.clone(),
            paired,
        };
    }
    for (spec, rule) in inputs.iter_mut().zip(&rules) {
        if let Some(first) = rule.shapes.first() {
            spec.shape = first.clone();
        }
    }
    Ok(rules)
}

fn check_decl(
    name: &str,
    decl: &InputDecl,
    spec: &TensorSpec,
    axis: BatchAxis,
    batched: bool,
) -> Result<(), String> {
    for shape in &decl.shapes {
        // The model's fixed dimensions must stay as they are; its dynamic ones may be fixed.
        if !fits(shape, &spec.shape) {
            return Err(format!(
                "inputs.{name}: shape {shape:?} does not fit the model's {:?}",
                spec.shape
            ));
        }
        if let (true, BatchAxis::Axis(k)) = (batched, axis) {
            if shape.get(k) != Some(&-1) {
                return Err(format!(
                    "inputs.{name}: shape {shape:?} must keep -1 on batch axis {k}"
                ));
            }
        }
    }
    if decl.values.is_empty() {
        return Ok(());
    }
    let (lo, hi) = match spec.datatype {
        DataType::Bool => {
            return Err(format!(
                "inputs.{name}: values cannot restrict a BOOL input"
            ))
        }
        DataType::Fp32 | DataType::Fp64 => return Ok(()),
        DataType::Uint8 => (0, u8::MAX as i128),
        DataType::Uint16 => (0, u16::MAX as i128),
        DataType::Uint32 => (0, u32::MAX as i128),
        DataType::Uint64 => (0, u64::MAX as i128),
        DataType::Int8 => (i8::MIN as i128, i8::MAX as i128),
        DataType::Int16 => (i16::MIN as i128, i16::MAX as i128),
        DataType::Int32 => (i32::MIN as i128, i32::MAX as i128),
        DataType::Int64 => (i64::MIN as i128, i64::MAX as i128),
    };
    for v in &decl.values {
        let ok = match *v {
            AllowedValue::Int(x) => (lo..=hi).contains(&(x as i128)),
            AllowedValue::Float(f) => f.fract() == 0.0 && f >= lo as f64 && f <= hi as f64,
        };
        if !ok {
            return Err(format!(
                "inputs.{name}: value {v} is not a valid {}",
                spec.datatype
            ));
        }
    }
    Ok(())
}

/// Whether `shape` is an instance of `pattern` (`-1` there: any size).
fn fits(shape: &[i64], pattern: &[i64]) -> bool {
    shape.len() == pattern.len() && shape.iter().zip(pattern).all(|(&s, &p)| p < 0 || s == p)
}

/// Checks a tensor's shape against an input's declared shapes, when it has more than one (a
/// single declared shape is the input's spec, checked dimension by dimension by the caller).
pub fn check_shapes(
    model: &str,
    specs: &[TensorSpec],
    rules: &[InputRule],
    i: usize,
    tensor: &NamedTensor,
) -> Result<(), String> {
    let rule = &rules[i];
    if rule.shapes.iter().any(|p| fits(&tensor.shape, p)) {
        return Ok(());
    }
    let mut accepted = String::new();
    for (k, shape) in rule.shapes.iter().enumerate() {
        if k > 0 {
            accepted.push_str(if k + 1 == rule.shapes.len() {
                " or "
            } else {
                ", "
            });
        }
        let _ = write!(accepted, "{shape:?}");
        if let Some(j) = rule.paired {
            let _ = write!(
                accepted,
                " (with {} = {})",
                specs[j].name, rules[j].values[k]
            );
        }
    }
    Err(format!(
        "input '{}' has shape {:?}, but model '{model}' takes {accepted} (-1: any size)",
        tensor.name, tensor.shape
    ))
}

/// Checks that an input whose shape is paired with another input's value has the shape that
/// goes with that value. Runs after every input passed its own checks.
pub fn check_pairing(
    specs: &[TensorSpec],
    rules: &[InputRule],
    i: usize,
    tensors: &[NamedTensor],
) -> Result<(), String> {
    let rule = &rules[i];
    let Some(j) = rule.paired else {
        return Ok(());
    };
    let Ok(Some(k)) = value_index(&rules[j].values, &tensors[j].data) else {
        return Ok(()); // a value outside the list was refused by check_values already
    };
    let (tensor, expected) = (&tensors[i], &rule.shapes[k]);
    if fits(&tensor.shape, expected) {
        return Ok(());
    }
    let other = &specs[j].name;
    let value = rules[j].values[k];
    let goes_with = rule
        .shapes
        .iter()
        .position(|p| fits(&tensor.shape, p))
        .map(|m| format!(", which goes with {other} = {}", rules[j].values[m]))
        .unwrap_or_default();
    Err(format!(
        "input '{}' has shape {:?}{goes_with}, but {other} is {value}: with {other} = {value} it must be {expected:?} (-1: any size)",
        tensor.name, tensor.shape
    ))
}

/// Checks that every element of `data` is one of `values`; the reason names the first that
/// is not.
pub fn check_values(name: &str, values: &[AllowedValue], data: &TensorData) -> Result<(), String> {
    if values.is_empty() {
        return Ok(());
    }
    let Err((element, shown)) = value_index(values, data) else {
        return Ok(());
    };
    let list: Vec<String> = values.iter().map(ToString::to_string).collect();
    Err(if data.len() == 1 {
        format!(
            "input '{name}' must be one of {}; got {shown}",
            list.join(", ")
        )
    } else {
        format!(
            "input '{name}' element {element} is {shown}, but every element must be one of {}",
            list.join(", ")
        )
    })
}

/// An input filled with `value` (zeros without one): for smoke tests of a freshly loaded
/// model, which must pass the rules as any request does.
pub fn filled(datatype: DataType, count: usize, value: Option<AllowedValue>) -> TensorData {
    macro_rules! fill {
        ($($variant:ident => $t:ty),*) => {
            match datatype {
                DataType::Bool => TensorData::Bool(vec![false; count]),
                $(DataType::$variant => TensorData::$variant(vec![
                    match value {
                        None => 0 as $t,
                        Some(AllowedValue::Int(v)) => v as $t,
                        Some(AllowedValue::Float(v)) => v as $t,
                    };
                    count
                ]),)*
            }
        };
    }
    fill!(Uint8 => u8, Uint16 => u16, Uint32 => u32, Uint64 => u64, Int8 => i8, Int16 => i16,
          Int32 => i32, Int64 => i64, Fp32 => f32, Fp64 => f64)
}

/// Index in `values` of the first element of `data` (all elements must be listed), or the
/// first element that is not: its position and how it reads.
fn value_index(
    values: &[AllowedValue],
    data: &TensorData,
) -> Result<Option<usize>, (usize, String)> {
    macro_rules! scan {
        ($v:expr, $matches:expr) => {{
            let mut first = None;
            for (i, x) in $v.iter().enumerate() {
                match values.iter().position(|a| $matches(a, *x)) {
                    Some(k) => {
                        first.get_or_insert(k);
                    }
                    None => return Err((i, x.to_string())),
                }
            }
            Ok(first)
        }};
    }
    fn int(a: &AllowedValue, x: i128) -> bool {
        matches!(*a, AllowedValue::Int(v) if v as i128 == x)
            || matches!(*a, AllowedValue::Float(v) if v == x as f64)
    }
    fn float(a: &AllowedValue, x: f64) -> bool {
        match *a {
            AllowedValue::Int(v) => v as f64 == x,
            AllowedValue::Float(v) => v == x,
        }
    }
    match data {
        TensorData::Bool(v) => scan!(v, |a, x: bool| int(a, x as i128)),
        TensorData::Uint8(v) => scan!(v, |a, x: u8| int(a, x as i128)),
        TensorData::Uint16(v) => scan!(v, |a, x: u16| int(a, x as i128)),
        TensorData::Uint32(v) => scan!(v, |a, x: u32| int(a, x as i128)),
        TensorData::Uint64(v) => scan!(v, |a, x: u64| int(a, x as i128)),
        TensorData::Int8(v) => scan!(v, |a, x: i8| int(a, x as i128)),
        TensorData::Int16(v) => scan!(v, |a, x: i16| int(a, x as i128)),
        TensorData::Int32(v) => scan!(v, |a, x: i32| int(a, x as i128)),
        TensorData::Int64(v) => scan!(v, |a, x: i64| int(a, x as i128)),
        TensorData::Fp32(v) => scan!(v, |a, x: f32| float(a, x as f64)),
        TensorData::Fp64(v) => scan!(v, |a, x: f64| float(a, x)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use super::*;
    use crate::manifest::Manifest;

    const HASH: &str = "00000000000000000000000000000000000000000000000000000000000000aa";

    pub(crate) fn entry(extra: &str) -> ModelEntry {
        let text = format!(
            "[[models]]\nname='vad'\nversion='1'\nfile='f'\nsha256='{HASH}'\nmax_batch_size=4\n{extra}\n"
        );
        Manifest::parse(Path::new("/m"), &text)
            .unwrap()
            .models
            .remove(0)
    }

    pub(crate) fn vad_specs() -> Vec<TensorSpec> {
        let spec = |name: &str, datatype, shape: &[i64]| TensorSpec {
            name: name.into(),
            datatype,
            shape: shape.to_vec(),
        };
        vec![
            spec("input", DataType::Fp32, &[-1, -1]),
            spec("state", DataType::Fp32, &[2, -1, 128]),
            spec("sr", DataType::Int64, &[]),
        ]
    }

    pub(crate) const VAD: &str =
        "inputs.input = { shapes = [[-1, 576], [-1, 288]], paired_with = 'sr' }\n\
                                  inputs.sr = { values = [16000, 8000] }";

    fn axes() -> Vec<BatchAxis> {
        vec![BatchAxis::Axis(0), BatchAxis::Axis(1), BatchAxis::Shared]
    }

    #[test]
    fn declarations_resolve_and_advertise_the_first_shape() {
        let mut specs = vad_specs();
        let rules = resolve(&entry(VAD), &mut specs, &axes()).unwrap();
        assert_eq!(specs[0].shape, vec![-1, 576]);
        assert_eq!(
            specs[1].shape,
            vec![2, -1, 128],
            "undeclared inputs keep the model's shape"
        );
        assert_eq!(rules[0].paired, Some(2));
        assert_eq!(
            rules[2].values,
            vec![AllowedValue::Int(16000), AllowedValue::Int(8000)]
        );
        assert!(rules[1].is_empty());
        assert_eq!(
            serde_json::to_value(&rules[0]).unwrap(),
            serde_json::json!({"shapes": [[-1, 576], [-1, 288]], "paired_with": "sr"})
        );
    }

    #[test]
    fn declarations_that_do_not_fit_the_model_are_refused() {
        let refused = |decls: &str| {
            resolve(&entry(decls), &mut vad_specs(), &axes())
                .unwrap_err()
                .to_string()
        };
        assert!(refused("inputs.audio = { shapes = [[-1, 576]] }")
            .contains("does not have (inputs: input, state, sr)"));
        assert!(refused("inputs.input = { shapes = [[-1, 576, 1]] }").contains("does not fit"));
        assert!(refused("inputs.state = { shapes = [[3, -1, 128]] }").contains("does not fit"));
        assert!(
            refused("inputs.input = { shapes = [[1, 576]] }").contains("keep -1 on batch axis 0")
        );
        assert!(refused("inputs.sr = { values = [1.5] }").contains("not a valid INT64"));
        assert!(refused("inputs.state = { shapes = [[2, -1, 128]], paired_with = 'input' }\ninputs.input = { values = [1] }")
            .contains("must hold one value"));
        // Integral floats are fine for integer inputs.
        assert!(resolve(
            &entry("inputs.sr = { values = [16000.0] }"),
            &mut vad_specs(),
            &axes()
        )
        .is_ok());
    }

    #[test]
    fn values_are_compared_by_value() {
        let values = [AllowedValue::Int(16000), AllowedValue::Float(0.5)];
        assert!(check_values("sr", &values, &TensorData::Int64(vec![16000])).is_ok());
        assert!(check_values("sr", &values, &TensorData::Fp32(vec![0.5, 16000.0])).is_ok());
        let err = check_values("sr", &values, &TensorData::Int64(vec![12345])).unwrap_err();
        assert_eq!(err, "input 'sr' must be one of 16000, 0.5; got 12345");
        let err = check_values("c", &values, &TensorData::Uint8(vec![7, 7])).unwrap_err();
        assert!(err.contains("element 0 is 7"), "{err}");
    }

    #[test]
    fn fills_with_the_first_value() {
        assert_eq!(
            filled(DataType::Int64, 1, Some(AllowedValue::Int(16000))),
            TensorData::Int64(vec![16000])
        );
        assert_eq!(
            filled(DataType::Fp32, 2, None),
            TensorData::Fp32(vec![0.0; 2])
        );
        assert_eq!(
            filled(DataType::Bool, 1, None),
            TensorData::Bool(vec![false])
        );
    }
}
