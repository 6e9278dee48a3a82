//! `.npy` input for batch jobs: a job runs JSON Lines of KServe v2 requests, so a NumPy array
//! given as input is converted once into a staged JSON Lines file (line i is `array[i]`, keyed
//! `i`) that the job then runs unchanged. Everything the header tells (dtype, order, shape,
//! length) is checked before the first line is written, so a bad input fails at once with
//! what to fix; the data is streamed, one row in memory at a time, so an array larger than
//! memory converts as well as a small one.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use npyz::{DType, NpyFile, NpyHeader, Order, TypeChar};
use serde::Serialize;

use super::MAX_LINE_BYTES;
use crate::tensor::DataType;

/// Headers numpy writes for plain dtypes are ~128 bytes (its own reader refuses over 10 000);
/// a header claiming more is read no further than this.
const MAX_HEADER_BYTES: u64 = 1 << 20;

/// Why a `.npy` input cannot become a job's rows: `input.npy: <kind>`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", .path.display())]
pub struct NpyError {
    pub path: PathBuf,
    pub kind: NpyErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum NpyErrorKind {
    #[error("cannot read it: {0}")]
    Read(io::Error),
    #[error("not a .npy file: {0}")]
    NotNpy(String),
    #[error(
        "its header is {0} bytes; a job reads headers of at most {MAX_HEADER_BYTES} \
         (numpy writes ~128 for plain dtypes)"
    )]
    HeaderTooLong(u64),
    #[error("a 0-dimensional array has no rows")]
    ZeroDimensional,
    #[error("dtype '{dtype}' ({kind}) is not supported; use float, int, uint or bool")]
    Dtype { dtype: String, kind: &'static str },
    #[error(
        "the array is stored in Fortran order, which cannot be read row by row; \
         save it in C order: np.save(path, np.ascontiguousarray(a))"
    )]
    FortranOrder,
    #[error("shape {0:?} has rows of no elements: nothing to send")]
    EmptyRows(Vec<u64>),
    #[error("shape {shape:?} is too large: {reason}")]
    TooLarge { shape: Vec<u64>, reason: String },
    #[error("the file is cut short: shape {shape:?} needs {needed} bytes of data, it has {found}")]
    Truncated {
        shape: Vec<u64>,
        needed: u64,
        found: u64,
    },
    #[error("row {row}: {reason}")]
    BadRow { row: u64, reason: String },
    #[error("cannot write its rows to {}: {source}", .out.display())]
    Write { out: PathBuf, source: io::Error },
    #[error("the job was stopped while its rows were written")]
    Stopped,
}

use NpyErrorKind as Kind;

/// Converts a `.npy` array into JSON Lines rows for the job runner: row i = `array[i]`
/// sent as input `input_name` with shape [1, rest...], key = i (a JSON number), one line each:
/// {"key": 0, "inputs": [{"name": "features", "shape": [1, 256], "datatype": "FP32", "data": [..flat..]}]}
/// Returns the number of rows written. Streams: never holds the whole array in memory.
///
/// `out` is created (truncated if it exists), written through a buffer and fsynced; on an
/// error it is removed. A float row holding NaN or an infinity fails, naming the row: JSON
/// has no such numbers. `stopped` is asked between rows: true ends the conversion
/// ([`NpyErrorKind::Stopped`]), so that a job cancelled while staging a large array stops.
pub(super) fn npy_to_jsonl(
    npy: &Path,
    input_name: &str,
    out: &Path,
    stopped: &dyn Fn() -> bool,
) -> Result<u64, NpyError> {
    convert(npy, input_name, out, stopped).map_err(|kind| NpyError {
        path: npy.to_owned(),
        kind,
    })
}

fn convert(
    npy: &Path,
    input_name: &str,
    out: &Path,
    stopped: &dyn Fn() -> bool,
) -> Result<u64, Kind> {
    let file = File::open(npy).map_err(Kind::Read)?;
    let file_len = file.metadata().map_err(Kind::Read)?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let header = read_header(&mut reader)?;
    let data_start = reader.stream_position().map_err(Kind::Read)?;
    let plan = plan(&header, file_len.saturating_sub(data_start))?;
    let npy_file = NpyFile::with_header(header, reader);
    let out_file = File::create(out).map_err(|source| write_err(out, source))?;
    let mut w = BufWriter::with_capacity(1 << 20, out_file);
    let written = match plan.datatype {
        DataType::Bool => write_rows::<bool>(npy_file, &plan, input_name, out, &mut w, stopped),
        DataType::Uint8 => write_rows::<u8>(npy_file, &plan, input_name, out, &mut w, stopped),
        DataType::Uint16 => write_rows::<u16>(npy_file, &plan, input_name, out, &mut w, stopped),
        DataType::Uint32 => write_rows::<u32>(npy_file, &plan, input_name, out, &mut w, stopped),
        DataType::Uint64 => write_rows::<u64>(npy_file, &plan, input_name, out, &mut w, stopped),
        DataType::Int8 => write_rows::<i8>(npy_file, &plan, input_name, out, &mut w, stopped),
        DataType::Int16 => write_rows::<i16>(npy_file, &plan, input_name, out, &mut w, stopped),
        DataType::Int32 => write_rows::<i32>(npy_file, &plan, input_name, out, &mut w, stopped),
        DataType::Int64 => write_rows::<i64>(npy_file, &plan, input_name, out, &mut w, stopped),
        DataType::Fp32 => write_rows::<f32>(npy_file, &plan, input_name, out, &mut w, stopped),
        DataType::Fp64 => write_rows::<f64>(npy_file, &plan, input_name, out, &mut w, stopped),
    }
    .and_then(|()| w.into_inner().map_err(|e| write_err(out, e.into_error())))
    .and_then(|file| file.sync_all().map_err(|e| write_err(out, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(out);
    }
    written.map(|()| plan.rows)
}

fn write_err(out: &Path, source: io::Error) -> Kind {
    let out = out.to_owned();
    Kind::Write { out, source }
}

/// The header, read no further than [`MAX_HEADER_BYTES`]. npyz multiplies the shape's
/// dimensions unchecked (a panic in debug builds), so that is caught here too.
fn read_header(reader: &mut BufReader<File>) -> Result<NpyHeader, Kind> {
    // Without this a longer header reads as cut short at the bound, which it is not.
    let declared = io::BufRead::fill_buf(reader).map_err(Kind::Read)?;
    if let Some(length) = declared_header_bytes(declared).filter(|&n| n > MAX_HEADER_BYTES) {
        return Err(Kind::HeaderTooLong(length));
    }
    let bounded = reader.by_ref().take(MAX_HEADER_BYTES);
    match catch_unwind(AssertUnwindSafe(|| NpyHeader::from_reader(bounded))) {
        Ok(Ok(header)) => Ok(header),
        Ok(Err(e)) => Err(match e.kind() {
            io::ErrorKind::InvalidData => Kind::NotNpy(e.to_string()),
            io::ErrorKind::UnexpectedEof => Kind::NotNpy("its header is cut short".into()),
            _ => Kind::Read(e),
        }),
        Err(_) => Err(Kind::NotNpy(
            "its shape has too many elements to count".into(),
        )),
    }
}

/// The header's length with its preamble, as a file that starts like a `.npy` declares it:
/// the magic, the format version, then the length in 2 bytes (version 1) or 4 (2 and 3).
fn declared_header_bytes(start: &[u8]) -> Option<u64> {
    let rest = start.strip_prefix(b"\x93NUMPY")?;
    match rest {
        [1, _, a, b, ..] => Some(10 + u64::from(u16::from_le_bytes([*a, *b]))),
        [2 | 3, _, a, b, c, d, ..] => Some(12 + u64::from(u32::from_le_bytes([*a, *b, *c, *d]))),
        _ => None,
    }
}

/// What the header says, checked against what a job can run and against the file's length.
struct Plan {
    datatype: DataType,
    rows: u64,
    /// Elements in one row (the product of the shape after its first dimension).
    row_len: usize,
    /// `[1, rest...]`: each row's tensor shape.
    row_shape: Vec<u64>,
}

fn plan(header: &NpyHeader, data_bytes: u64) -> Result<Plan, Kind> {
    let shape = header.shape().to_vec();
    let dtype = header.dtype();
    let (datatype, size) = datatype(&dtype).map_err(|kind| Kind::Dtype {
        dtype: match &dtype {
            DType::Plain(ty) => ty.to_string(),
            _ => dtype.descr(),
        },
        kind,
    })?;
    let Some((&rows, rest)) = shape.split_first() else {
        return Err(Kind::ZeroDimensional);
    };
    // Fortran order strides a row across the file; its bytes are C order's when at most one
    // dimension is longer than 1 (or there are none).
    let ordered = shape.iter().filter(|&&d| d > 1).count() <= 1 || shape.contains(&0);
    if header.order() == Order::Fortran && !ordered {
        return Err(Kind::FortranOrder);
    }
    let too_large = |reason: String| Kind::TooLarge {
        shape: shape.clone(),
        reason,
    };
    let row_len = (rest.iter().try_fold(1u64, |n, &d| n.checked_mul(d)))
        .ok_or_else(|| too_large("a row has too many elements to count".into()))?;
    // (n, 0) is a valid array, but its rows are no tensors, and a header of a few bytes could
    // claim any number of them.
    if row_len == 0 && rows > 0 {
        return Err(Kind::EmptyRows(shape));
    }
    // An element is at least two bytes of JSON ("0,"); a longer line is one no job reads.
    if row_len.saturating_mul(2) > MAX_LINE_BYTES as u64 {
        return Err(too_large(format!(
            "a row of {row_len} elements does not fit a job's line ({MAX_LINE_BYTES} bytes)"
        )));
    }
    let needed = (rows.checked_mul(row_len)).and_then(|n| n.checked_mul(size));
    let needed = needed.ok_or_else(|| too_large("it has too many bytes to count".into()))?;
    if needed > data_bytes {
        let found = data_bytes;
        return Err(Kind::Truncated {
            shape,
            needed,
            found,
        });
    }
    Ok(Plan {
        datatype,
        rows,
        row_len: row_len as usize,
        row_shape: std::iter::once(1).chain(rest.iter().copied()).collect(),
    })
}

/// The KServe v2 datatype of a plain numpy dtype and its element size in bytes, or what kind
/// of dtype it is, for the error.
fn datatype(dtype: &DType) -> Result<(DataType, u64), &'static str> {
    let DType::Plain(ty) = dtype else {
        return Err("structured");
    };
    let datatype = match (ty.type_char(), ty.size_field()) {
        (TypeChar::Bool, 1) => DataType::Bool,
        (TypeChar::Int, 1) => DataType::Int8,
        (TypeChar::Int, 2) => DataType::Int16,
        (TypeChar::Int, 4) => DataType::Int32,
        (TypeChar::Int, 8) => DataType::Int64,
        (TypeChar::Uint, 1) => DataType::Uint8,
        (TypeChar::Uint, 2) => DataType::Uint16,
        (TypeChar::Uint, 4) => DataType::Uint32,
        (TypeChar::Uint, 8) => DataType::Uint64,
        (TypeChar::Float, 4) => DataType::Fp32,
        (TypeChar::Float, 8) => DataType::Fp64,
        (TypeChar::Float, 2) => {
            return Err("half precision: the server takes no FP16; cast to float32")
        }
        (TypeChar::Float, _) => return Err("extended precision; cast to float64"),
        (TypeChar::Complex, _) => return Err("complex"),
        (TypeChar::TimeDelta | TypeChar::DateTime, _) => return Err("date or time"),
        (TypeChar::ByteStr | TypeChar::UnicodeStr, _) => return Err("string"),
        (TypeChar::Object, _) => return Err("Python objects"),
        _ => return Err("raw bytes"),
    };
    Ok((datatype, ty.size_field()))
}

/// A numpy element as one JSON value.
trait Element: npyz::Deserialize + Serialize + Copy {
    /// A float's value, which may be one JSON cannot carry (NaN, infinities).
    fn float(self) -> Option<f64> {
        None
    }
}

impl Element for f32 {
    fn float(self) -> Option<f64> {
        Some(self.into())
    }
}

impl Element for f64 {
    fn float(self) -> Option<f64> {
        Some(self)
    }
}

macro_rules! exact_element {
    ($($t:ty),*) => {$(impl Element for $t {})*};
}
exact_element!(bool, u8, u16, u32, u64, i8, i16, i32, i64);

#[derive(Serialize)]
struct Line<'a, T> {
    key: u64,
    inputs: [Input<'a, T>; 1],
}

#[derive(Serialize)]
struct Input<'a, T> {
    name: &'a str,
    shape: &'a [u64],
    datatype: DataType,
    data: &'a [T],
}

fn write_rows<T: Element>(
    npy: NpyFile<BufReader<File>>,
    plan: &Plan,
    input_name: &str,
    out: &Path,
    writer: &mut impl Write,
    stopped: &dyn Fn() -> bool,
) -> Result<(), Kind> {
    let bad_row = |row: u64, reason: String| Kind::BadRow { row, reason };
    let mut elements = npy.data::<T>().map_err(|e| Kind::NotNpy(e.to_string()))?;
    let (mut data, mut line) = (Vec::with_capacity(plan.row_len), Vec::new());
    for row in 0..plan.rows {
        if stopped() {
            return Err(Kind::Stopped);
        }
        data.clear();
        for _ in 0..plan.row_len {
            match elements.next() {
                Some(Ok(value)) => data.push(value),
                Some(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                    return Err(bad_row(row, e.to_string()))
                }
                Some(Err(e)) => return Err(Kind::Read(e)),
                None => return Err(bad_row(row, "the data ends early".into())),
            }
        }
        let floats = data.iter().map(|v| v.float().unwrap_or_default());
        if let Some((at, what)) = floats.enumerate().find(|(_, v)| !v.is_finite()) {
            let reason = format!(
                "element {at} is {what}, which JSON cannot carry; replace NaN and infinities first"
            );
            return Err(bad_row(row, reason));
        }
        let inputs = [Input {
            name: input_name,
            shape: &plan.row_shape,
            datatype: plan.datatype,
            data: &data,
        }];
        line.clear();
        serde_json::to_writer(&mut line, &Line { key: row, inputs }).expect("JSON to memory");
        if line.len() > MAX_LINE_BYTES {
            let reason = format!("its JSON line is longer than {MAX_LINE_BYTES} bytes");
            return Err(bad_row(row, reason));
        }
        line.push(b'\n');
        writer.write_all(&line).map_err(|e| write_err(out, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use npyz::Order::{Fortran, C};
    use npyz::{WriteOptions, WriterBuilder};
    use serde_json::Value;

    /// A fresh directory for one test, removed when dropped.
    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    impl Dir {
        fn new(test: &str) -> Dir {
            let name = format!("streamserve-npy-{}-{test}", std::process::id());
            let dir = std::env::temp_dir().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        /// An array written by npyz: a header for `dtype` and `shape`, then `data`.
        fn npy<T: npyz::Serialize>(&self, dtype: &str, shape: &[u64], data: &[T]) -> PathBuf {
            let path = self.0.join("input.npy");
            let mut writer = WriteOptions::new()
                .dtype(DType::Plain(dtype.parse().unwrap()))
                .shape(shape)
                .writer(BufWriter::new(File::create(&path).unwrap()))
                .begin_nd()
                .unwrap();
            data.iter().for_each(|value| writer.push(value).unwrap());
            writer.finish().unwrap();
            path
        }

        /// An npyz header in `order`, then `data` as it is.
        fn raw(&self, dtype: &str, shape: &[u64], order: Order, data: &[u8]) -> PathBuf {
            let path = self.0.join("input.npy");
            let mut file = WriteOptions::new_header_only()
                .dtype(DType::Plain(dtype.parse().unwrap()))
                .shape(shape)
                .order(order)
                .writer(File::create(&path).unwrap())
                .write_header_only()
                .unwrap();
            file.write_all(data).unwrap();
            path
        }

        /// The lines `npy` becomes.
        fn lines(&self, npy: &Path) -> Result<String, NpyError> {
            let out = self.0.join("rows.jsonl");
            let rows = npy_to_jsonl(npy, "features", &out, &|| false)?;
            let text = std::fs::read_to_string(&out).unwrap();
            assert_eq!(text.lines().count() as u64, rows);
            Ok(text)
        }

        /// Line `i` of what `npy` becomes, checked for its key and name: "shape datatype data".
        fn row(&self, npy: &Path, i: usize) -> String {
            let line: Value =
                serde_json::from_str(self.lines(npy).unwrap().lines().nth(i).unwrap()).unwrap();
            assert_eq!(
                (line["key"].as_u64(), line["inputs"][0]["name"].as_str()),
                (Some(i as u64), Some("features"))
            );
            let input = &line["inputs"][0];
            format!(
                "{} {} {}",
                input["shape"],
                input["datatype"].as_str().unwrap(),
                input["data"]
            )
        }

        fn fails(&self, npy: &Path, expected: &str) {
            let err = self.lines(npy).unwrap_err().to_string();
            assert!(!self.0.join("rows.jsonl").exists(), "{err}: output left");
            assert!(err.starts_with(&format!("{}: ", npy.display())), "{err}");
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn f4_2d_rows_are_compact_lines_with_shortest_floats() {
        let dir = Dir::new("f4");
        let npy = dir.npy("<f4", &[2, 3], &[0.1f32, -2.5, 1e-7, 3.4e38, 0.0, 7.0]);
        // Each f32 in its own shortest form, not its f64 widening (0.10000000149011612).
        let row = |key, data| {
            format!(
                r#"{{"key":{key},"inputs":[{{"name":"features","shape":[1,3],"datatype":"FP32","data":{data}}}]}}"#
            )
        };
        let expected = format!(
            "{}\n{}\n",
            row(0, "[0.1,-2.5,1e-7]"),
            row(1, "[3.4e+38,0.0,7.0]")
        );
        assert_eq!(dir.lines(&npy).unwrap(), expected);
    }

    #[test]
    fn rows_of_each_rank_dtype_and_byte_order() {
        let dir = Dir::new("kinds");
        let data: Vec<i64> = (-6..5).chain([i64::MAX]).collect();
        let npy = dir.npy("<i8", &[2, 3, 2], &data);
        assert_eq!(dir.row(&npy, 0), "[1,3,2] INT64 [-6,-5,-4,-3,-2,-1]");
        assert_eq!(
            dir.row(&npy, 1),
            "[1,3,2] INT64 [0,1,2,3,4,9223372036854775807]"
        );
        let npy = dir.npy("|b1", &[2, 2], &[true, false, false, true]);
        assert_eq!(dir.row(&npy, 1), "[1,2] BOOL [false,true]");
        let npy = dir.npy(">i4", &[2, 2], &[1i32, -2, 70000, 4]);
        assert_eq!(dir.row(&npy, 1), "[1,2] INT32 [70000,4]");
        let npy = dir.npy(">f8", &[1, 2], &[0.1f64, -1e300]);
        assert_eq!(dir.row(&npy, 0), "[1,2] FP64 [0.1,-1e+300]");
        // 1-D: each row is a scalar of shape [1].
        assert_eq!(
            dir.row(&dir.npy(">u2", &[3], &[7u16, 8, 65535]), 2),
            "[1] UINT16 [65535]"
        );
        // Fortran order is read where its bytes are C order's.
        let bytes: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            dir.row(&dir.raw("<f4", &[2, 1], Fortran, &bytes), 1),
            "[1,1] FP32 [2.0]"
        );
        // No rows is an empty file: whether a job may be empty is the caller's to say.
        assert_eq!(dir.lines(&dir.npy::<u8>("|u1", &[0, 4], &[])).unwrap(), "");
    }

    #[test]
    fn what_cannot_become_rows_says_why() {
        let dir = Dir::new("errors");
        dir.fails(
            &dir.npy("<f4", &[], &[1.0f32]),
            "a 0-dimensional array has no rows",
        );
        let complex = "dtype '<c8' (complex) is not supported; use float, int, uint or bool";
        dir.fails(&dir.raw("<c8", &[2], C, &[0; 16]), complex);
        dir.fails(
            &dir.raw("<f2", &[2], C, &[0; 4]),
            "dtype '<f2' (half precision: the server takes no FP16",
        );
        dir.fails(
            &dir.raw("|u1", &[2, 3], Fortran, &[0; 6]),
            "the array is stored in Fortran order",
        );
        let short = "the file is cut short: shape [4, 2] needs 16 bytes of data, it has 10";
        dir.fails(&dir.raw("<i2", &[4, 2], C, &[0; 10]), short);
        dir.fails(
            &dir.raw("<i2", &[3, 0], C, &[]),
            "shape [3, 0] has rows of no elements",
        );
        dir.fails(
            &dir.raw("<i2", &[1, 1 << 40], C, &[]),
            "does not fit a job's line",
        );
        dir.fails(
            &dir.raw("|b1", &[2], C, &[1, 7]),
            "row 1: invalid value for bool: 7",
        );
        dir.fails(
            &dir.npy("<f4", &[3, 2], &[1.0f32, 2.0, 3.0, f32::NAN, 5.0, 6.0]),
            "row 1: element 1 is NaN, which JSON cannot",
        );
        dir.fails(
            &dir.npy(">f8", &[2], &[1.0f64, f64::NEG_INFINITY]),
            "row 1: element 0 is -inf",
        );

        let npy = dir.0.join("input.npy");
        std::fs::write(&npy, "key,value\n1,2\n").unwrap();
        dir.fails(&npy, "not a .npy file: magic not found for NPY file");
        std::fs::write(&npy, b"\x93NUMPY\x01\x00\x76\x00{'descr': '<f4'").unwrap();
        dir.fails(&npy, "not a .npy file: its header is cut short");
        // A header past the bound says so, in either format version's length field.
        std::fs::write(&npy, b"\x93NUMPY\x02\x00\x00\x00\x00\x03{'descr'").unwrap();
        dir.fails(
            &npy,
            "its header is 50331660 bytes; a job reads headers of at most",
        );
        std::fs::write(&npy, b"\x93NUMPY\x01\x00\xff\xff{'descr'").unwrap();
        dir.fails(&npy, "not a .npy file: its header is cut short");
        // A shape whose product overflows (npyz's writer cannot write it) is caught where npyz
        // counts it (debug builds), or as the empty rows it wraps to (release).
        let dict = "{'descr': '<i2', 'fortran_order': False, 'shape': (1 << 40, 1 << 40, 0), }";
        let dict = dict.replace("1 << 40", &(1u64 << 40).to_string());
        let mut header = b"\x93NUMPY\x01\x00\x76\x00".to_vec();
        header.extend(format!("{dict:<117}\n").as_bytes());
        std::fs::write(&npy, header).unwrap();
        let err = dir.lines(&npy).unwrap_err().to_string();
        assert!(
            err.contains("not a .npy file") || err.contains("no elements"),
            "{err}"
        );
    }

    #[test]
    fn a_stopped_conversion_ends_and_leaves_no_rows() {
        let dir = Dir::new("stopped");
        let npy = dir.npy("<f4", &[3, 2], &[0f32, 1., 2., 3., 4., 5.]);
        let out = dir.0.join("rows.jsonl");
        let asked = std::cell::Cell::new(0);
        let stopped = || {
            asked.set(asked.get() + 1);
            asked.get() > 1
        };
        let err = npy_to_jsonl(&npy, "features", &out, &stopped).unwrap_err();
        assert!(matches!(err.kind, Kind::Stopped), "{err}");
        assert!(!out.exists(), "the half-written rows are removed");
    }
}
