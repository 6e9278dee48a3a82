//! Stacking requests into one model call and splitting its outputs back: one copy of every
//! element each way. Pure functions on tensors.

use crate::tensor::{NamedTensor, TensorData};

/// Concatenates tensors along `axis` (each holding `row_counts[j]` rows there) into one
/// tensor with `rows` rows: one copy of every element.
pub fn stack(
    parts: &[&NamedTensor],
    row_counts: &[usize],
    axis: usize,
    rows: usize,
) -> (Vec<i64>, TensorData) {
    let mut shape = parts[0].shape.clone();
    shape[axis] = rows as i64;
    let outer: usize = shape[..axis].iter().map(|&d| d as usize).product();
    let inner: usize = shape[axis + 1..].iter().map(|&d| d as usize).product();
    let mut data = TensorData::with_capacity(parts[0].data.datatype(), outer * rows * inner);
    for o in 0..outer {
        for (part, &n) in parts.iter().zip(row_counts) {
            let block = n * inner;
            data.extend_from_range(&part.data, o * block..(o + 1) * block);
        }
    }
    (shape, data)
}

/// The `count` rows from `offset` along `axis` of a batched output.
pub fn unstack(
    output: &NamedTensor,
    axis: usize,
    rows: usize,
    offset: usize,
    count: usize,
) -> NamedTensor {
    let outer: usize = output.shape[..axis].iter().map(|&d| d as usize).product();
    let inner: usize = output.shape[axis + 1..]
        .iter()
        .map(|&d| d as usize)
        .product();
    let mut data = TensorData::with_capacity(output.data.datatype(), outer * count * inner);
    for o in 0..outer {
        let start = (o * rows + offset) * inner;
        data.extend_from_range(&output.data, start..start + count * inner);
    }
    let mut shape = output.shape.clone();
    shape[axis] = count as i64;
    NamedTensor {
        name: output.name.clone(),
        shape,
        data,
    }
}

pub fn placeholder() -> NamedTensor {
    NamedTensor {
        name: String::new(),
        shape: Vec::new(),
        data: TensorData::Bool(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(shape: Vec<i64>, data: Vec<f32>) -> NamedTensor {
        NamedTensor {
            name: "t".into(),
            shape,
            data: TensorData::Fp32(data),
        }
    }

    #[test]
    fn stacking_along_axis_1_round_trips() {
        // Two requests with state [2, rows, 2]: 1 row and 2 rows.
        let a = tensor(vec![2, 1, 2], vec![1., 2., 3., 4.]);
        let b = tensor(vec![2, 2, 2], vec![5., 6., 7., 8., 9., 10., 11., 12.]);
        let (shape, data) = stack(&[&a, &b], &[1, 2], 1, 3);
        assert_eq!(shape, vec![2, 3, 2]);
        assert_eq!(
            data,
            TensorData::Fp32(vec![1., 2., 5., 6., 7., 8., 3., 4., 9., 10., 11., 12.])
        );
        let packed = NamedTensor {
            name: "t".into(),
            shape,
            data,
        };
        assert_eq!(unstack(&packed, 1, 3, 0, 1), a);
        assert_eq!(unstack(&packed, 1, 3, 1, 2), b);
    }

    #[test]
    fn stacking_along_axis_0_is_concatenation() {
        let a = tensor(vec![1, 2], vec![1., 2.]);
        let b = tensor(vec![2, 2], vec![3., 4., 5., 6.]);
        let (shape, data) = stack(&[&a, &b], &[1, 2], 0, 3);
        assert_eq!(shape, vec![3, 2]);
        assert_eq!(data, TensorData::Fp32(vec![1., 2., 3., 4., 5., 6.]));
        let packed = NamedTensor {
            name: "t".into(),
            shape,
            data,
        };
        assert_eq!(unstack(&packed, 0, 3, 1, 2), b);
    }
}
