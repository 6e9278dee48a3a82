//! The largest body a request to one model can need, from its inputs at `max_batch_size` rows
//! as a client's JSON encoder writes them at their most verbose, so that a larger body is
//! refused from its `Content-Length` before a byte of it is read or parsed.

use crate::manifest::BatchAxis;
use crate::model::ModelInfo;

/// The largest body a request to this model can need, so that a bigger one is refused from
/// its `Content-Length` before it is read or parsed: every input at max_batch_size rows written
/// as JSON at its most verbose ([`pretty_json_bytes`]), plus room for names and parameters.
/// `None` where an input has a free dimension besides its batch axis: then only
/// `--max-body-bytes` bounds it.
pub fn model_body_limit(info: &ModelInfo) -> Option<usize> {
    const ENVELOPE: usize = 64 * 1024;
    let rows = info.batching.max_batch_size.max(1);
    let mut bytes = ENVELOPE;
    for (spec, axis) in info.inputs.iter().zip(&info.input_axes) {
        // Called per request: the dimensions are walked, not collected.
        let dims = spec
            .shape
            .iter()
            .enumerate()
            .map(|(i, &dim)| match usize::try_from(dim) {
                Ok(fixed) => Some(fixed),
                Err(_) if info.batched() && *axis == BatchAxis::Axis(i) => Some(rows),
                Err(_) => None,
            });
        bytes = bytes.checked_add(pretty_json_bytes(dims)?)?;
    }
    Some(bytes)
}

/// The most bytes a client's JSON encoder writes for a tensor of `dims` as nested `data`:
/// every number at its longest (24 bytes: a 17-digit float with sign, point and exponent)
/// with its separator, on a line of its own, indented 4 spaces a level (`json.dumps(indent=4)`,
/// `JSON.stringify(x, null, 4)`), and every nested array's brackets on lines of their own. A
/// flat 48 bytes an element refused valid pretty-printed requests to models whose inner axes
/// are short (`ww_embedding`'s `[64, 76, 32, 1]`: 66 bytes an element at indent 2).
fn pretty_json_bytes(dims: impl IntoIterator<Item = Option<usize>>) -> Option<usize> {
    const NUMBER: usize = 24 + 2;
    const INDENT: usize = 4;
    // The request object, `inputs`, the input and its `data` hold the outermost array.
    const OUTER_LEVELS: usize = 4;
    let line = |level: usize| INDENT * (OUTER_LEVELS + level);
    let (mut arrays, mut bytes, mut rank) = (1usize, 0usize, 0usize);
    for dim in dims {
        // Each array of this level: "[" and "]," on lines of their own.
        bytes = bytes.checked_add(arrays.checked_mul(2 * line(rank) + 5)?)?;
        arrays = arrays.checked_mul(dim?)?;
        rank += 1;
    }
    bytes.checked_add(arrays.checked_mul(NUMBER + line(rank))?)
}

#[cfg(test)]
mod tests {
    use super::pretty_json_bytes;
    use serde::Serialize;
    use serde_json::{json, Value};

    /// `dims` filled with a number as long as JSON spells an `f32`, nested.
    fn nested(dims: &[usize]) -> Value {
        match dims.split_first() {
            None => json!(-0.123_456_789_012_345_68_f64),
            Some((&n, rest)) => Value::Array((0..n).map(|_| nested(rest)).collect()),
        }
    }

    fn pretty(value: &Value, indent: &[u8]) -> usize {
        let mut out = Vec::new();
        let formatter = serde_json::ser::PrettyFormatter::with_indent(indent);
        let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
        value.serialize(&mut serializer).unwrap();
        out.len()
    }

    #[test]
    fn a_pretty_printed_request_fits_its_models_bound() {
        for dims in [
            vec![64, 76, 32, 1],
            vec![64, 256],
            vec![8, 1, 1, 1, 1],
            vec![1],
        ] {
            let data = nested(&dims);
            let request =
                json!({"inputs": [{"name": "x", "shape": dims, "datatype": "FP32", "data": data}]});
            let bound = pretty_json_bytes(dims.iter().copied().map(Some)).unwrap();
            for indent in [&b""[..], b"  ", b"    ", b"\t"] {
                // The name, shape and datatype are the envelope's (64 KiB in the limit).
                let written = pretty(&request, indent).saturating_sub(1024);
                assert!(
                    written <= bound,
                    "{dims:?} at indent {indent:?}: {written} > {bound}"
                );
            }
        }
        assert_eq!(
            pretty_json_bytes([Some(usize::MAX), Some(2)]),
            None,
            "overflow is no bound"
        );
        assert_eq!(
            pretty_json_bytes([Some(2), None]),
            None,
            "a free dimension is no bound"
        );
    }
}
