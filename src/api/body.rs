//! Reading a request body, for every surface that takes one (inference, WAV segments): the
//! size limit (refused from `Content-Length` before a byte is buffered, and again as bytes
//! arrive, after decompression too: a gzip body is inflated a block at a time into a buffer
//! that refuses to grow past the limit, so a small body cannot expand without bound), the
//! memory all bodies may hold together ([`BodyMemory`], counted as bytes arrive, not as they
//! are announced), and clean errors for bodies that are too slow (the door's pace, see
//! `door.rs`), cut short, or not valid gzip/deflate.

use std::io::{self, Write as _};
use std::sync::Arc;
use std::time::Instant;

use actix_web::error::PayloadError;
use actix_web::http::header::{self, ContentEncoding};
use actix_web::{web, HttpRequest};
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

mod model_limit;

pub use model_limit::model_body_limit;

use super::door::{self, BodyPace};
use crate::error::ServeError;

/// Bodies reserve memory in steps of this many KiB, so a body of many small chunks does not
/// touch the semaphore for each.
const STEP_KIB: usize = 64;

/// The most a body's buffer is given before its bytes arrive. A `Content-Length` is only a
/// promise: a client that announces 60 MB and sends nothing must not get 60 MB (nor hold the
/// memory bound) for it. Larger bodies grow the buffer as they arrive.
const MAX_PREALLOCATED: usize = 1 << 20;

/// The memory that request bodies being read, decoded and answered may hold together. A body
/// that would take more gets 503 with Retry-After as soon as its bytes would pass the bound:
/// eight 63 MB bodies at the same time cannot add half a gigabyte to the process and hold every
/// other client up meanwhile. Only bytes received (or inflated) count, so connections that
/// announce large bodies and send nothing cannot fill the bound for others.
#[derive(Clone)]
pub struct BodyMemory {
    kib: Arc<Semaphore>,
    limit_mb: u64,
    /// The whole bound in bytes: no one body can ever hold more than this.
    limit_bytes: usize,
}

impl BodyMemory {
    pub fn new(limit_mb: u64) -> BodyMemory {
        let kib = usize::try_from(limit_mb.saturating_mul(1024))
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        BodyMemory {
            kib: Arc::new(Semaphore::new(kib)),
            limit_mb,
            limit_bytes: kib.saturating_mul(1024),
        }
    }

    /// The refusal for a body of `size` bytes where `max_bytes` is its size limit, if it is
    /// larger than that or than the whole bound. A body larger than the bound could never be
    /// read, so it gets 413 (never 503 + Retry-After, which a client would obey for ever).
    fn refuse_size(&self, size: usize, max_bytes: usize) -> Option<ServeError> {
        if size > max_bytes {
            Some(ServeError::PayloadTooLarge {
                size,
                limit: max_bytes,
            })
        } else if size > self.limit_bytes {
            Some(ServeError::LargerThanBodyMemory {
                size,
                limit_mb: self.limit_mb,
            })
        } else {
            None
        }
    }

    /// Grows `held` to cover `bytes`.
    fn reserve(
        &self,
        held: &mut Option<OwnedSemaphorePermit>,
        bytes: usize,
    ) -> Result<(), ServeError> {
        let have = held.as_ref().map_or(0, |p| p.num_permits());
        let want = bytes.div_ceil(1024).div_ceil(STEP_KIB) * STEP_KIB;
        if want <= have {
            return Ok(());
        }
        let more = u32::try_from(want - have).map_err(|_| self.full())?;
        let permit = self
            .kib
            .clone()
            .try_acquire_many_owned(more)
            .map_err(|_| self.full())?;
        match held {
            Some(h) => h.merge(permit),
            None => *held = Some(permit),
        }
        Ok(())
    }

    /// Reserves memory for `bytes` of a request that arrived by other means than [`read`]
    /// (a gRPC message, which tonic has already received whole), until the hold is dropped:
    /// its decoded copies count against the same bound as REST bodies.
    pub fn hold(&self, bytes: usize) -> Result<MemoryHold, ServeError> {
        if let Some(refused) = self.refuse_size(bytes, usize::MAX) {
            return Err(refused);
        }
        let mut held = None;
        self.reserve(&mut held, bytes)?;
        Ok(MemoryHold { _reserved: held })
    }

    fn full(&self) -> ServeError {
        metrics::counter!("streamserve_body_memory_refusals_total").increment(1);
        ServeError::BodyMemoryFull {
            limit_mb: self.limit_mb,
        }
    }
}

/// Memory reserved by [`BodyMemory::hold`], given back when this is dropped.
pub struct MemoryHold {
    _reserved: Option<OwnedSemaphorePermit>,
}

/// The memory the messages of one stream hold together: a gRPC stream's requests from when
/// they are read until they are answered, and its answers until the transport takes them.
/// Counted as one sum, in the same steps as a body, so that 64 small messages in flight hold
/// 64 KiB, not 64 steps.
pub struct StreamHold {
    memory: BodyMemory,
    bytes: usize,
    reserved: Option<OwnedSemaphorePermit>,
}

impl StreamHold {
    pub fn new(memory: &BodyMemory) -> StreamHold {
        StreamHold {
            memory: memory.clone(),
            bytes: 0,
            reserved: None,
        }
    }

    /// Counts `bytes` more, or refuses them and counts nothing: 503 `BodyMemoryFull` while
    /// the bound is full, 413 for one message larger than the whole bound.
    pub fn add(&mut self, bytes: usize) -> Result<(), ServeError> {
        if let Some(refused) = self.memory.refuse_size(bytes, usize::MAX) {
            return Err(refused);
        }
        let sum = self.bytes.saturating_add(bytes);
        self.memory.reserve(&mut self.reserved, sum)?;
        self.bytes = sum;
        Ok(())
    }

    /// Counts `bytes` fewer, giving back the steps no longer needed.
    pub fn remove(&mut self, bytes: usize) {
        self.bytes = self.bytes.saturating_sub(bytes);
        let keep = self.bytes.div_ceil(1024).div_ceil(STEP_KIB) * STEP_KIB;
        if let Some(reserved) = &mut self.reserved {
            let spare = reserved.num_permits().saturating_sub(keep);
            drop(reserved.split(spare));
        }
    }
}

/// A body read whole, with the memory reservation it holds until it is dropped.
pub struct Body {
    pub bytes: web::BytesMut,
    _reserved: Option<OwnedSemaphorePermit>,
}

/// What reading a body needs from the server's configuration.
pub struct BodyLimits<'a> {
    pub max_bytes: usize,
    pub memory: &'a BodyMemory,
    pub pace: BodyPace,
}

/// A small control request's JSON body (admin, repository), where no body (or only
/// whitespace) means every field's default; `what` names the request in the error.
pub fn json_or_default<T: serde::de::DeserializeOwned + Default>(
    bytes: &[u8],
    what: &str,
) -> Result<T, ServeError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| ServeError::invalid(format!("malformed {what}: {e}")))
}

/// Reads the body, decompressing it per `Content-Encoding` (gzip or deflate, as Triton's
/// clients send with `request_compression_algorithm`). `max_bytes` bounds the decompressed size.
pub async fn read(
    req: &HttpRequest,
    body: web::Payload,
    limits: &BodyLimits<'_>,
) -> Result<Body, ServeError> {
    let limit = limits.max_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<usize>().ok());
    if let Some(refused) = declared.and_then(|size| limits.memory.refuse_size(size, limit)) {
        return Err(refused);
    }
    let encoding = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("").trim().to_ascii_lowercase());
    let coding = match encoding.as_deref() {
        None | Some("identity") | Some("") => None,
        Some("gzip") | Some("x-gzip") => Some(ContentEncoding::Gzip),
        Some("deflate") => Some(ContentEncoding::Deflate),
        Some(other) => return Err(ServeError::UnsupportedEncoding(other.to_string())),
    };
    let reader = Reader {
        limits,
        capacity: declared
            .unwrap_or(8 * 1024)
            .min(limit)
            .min(MAX_PREALLOCATED),
        encoding: encoding.as_deref().filter(|_| coding.is_some()),
    };
    match coding {
        None => reader.collect(body).await,
        Some(coding) => reader.inflate(body, coding).await,
    }
}

struct Reader<'a> {
    limits: &'a BodyLimits<'a>,
    capacity: usize,
    encoding: Option<&'a str>,
}

impl Reader<'_> {
    async fn collect<S>(&self, mut stream: S) -> Result<Body, ServeError>
    where
        S: futures_util::Stream<Item = Result<web::Bytes, PayloadError>> + Unpin,
    {
        let started = Instant::now();
        let limit = self.limits.max_bytes;
        let mut reserved = None;
        let mut buf = web::BytesMut::with_capacity(self.capacity);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.payload_error(e, buf.len(), started))?;
            let size = buf.len() + chunk.len();
            if let Some(refused) = self.limits.memory.refuse_size(size, limit) {
                return Err(refused);
            }
            self.limits.memory.reserve(&mut reserved, size)?;
            buf.extend_from_slice(&chunk);
        }
        Ok(Body {
            bytes: buf,
            _reserved: reserved,
        })
    }

    /// Reads a gzip or deflate body, inflating each chunk as it arrives (chunks of 2 KiB and
    /// more on the blocking pool, as actix's own decoder does, so a large body does not stall
    /// the connection's HTTP thread).
    async fn inflate(
        &self,
        mut stream: web::Payload,
        coding: ContentEncoding,
    ) -> Result<Body, ServeError> {
        let started = Instant::now();
        let inflated = Inflated {
            buf: web::BytesMut::with_capacity(self.capacity),
            max_bytes: self.limits.max_bytes,
            memory: self.limits.memory.clone(),
            reserved: None,
            refused: None,
        };
        let mut decoder = match coding {
            ContentEncoding::Gzip => {
                Decoder::Gzip(Box::new(flate2::write::GzDecoder::new(inflated)))
            }
            _ => Decoder::Deflate(Box::new(flate2::write::ZlibDecoder::new(inflated))),
        };
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| self.payload_error(e, decoder.inflated().buf.len(), started))?;
            let written = if chunk.len() < IN_PLACE {
                decoder.write_all(&chunk)
            } else {
                let (back, written) = tokio::task::spawn_blocking(move || {
                    let written = decoder.write_all(&chunk);
                    (decoder, written)
                })
                .await
                // A task that did not finish was cancelled by the runtime shutting down.
                .map_err(|e| match e.is_cancelled() {
                    true => ServeError::ShuttingDown,
                    false => ServeError::invalid("the request body could not be decoded"),
                })?;
                decoder = back;
                written
            };
            if written.is_err() {
                return Err(self.decode_error(decoder.inflated()));
            }
        }
        if decoder.finish().is_err() {
            return Err(self.decode_error(decoder.inflated()));
        }
        let inflated = decoder.inflated();
        Ok(Body {
            bytes: std::mem::take(&mut inflated.buf),
            _reserved: inflated.reserved.take(),
        })
    }

    /// Why inflating stopped: the limit or the memory bound, or else data that is not what
    /// its `Content-Encoding` says.
    fn decode_error(&self, inflated: &mut Inflated) -> ServeError {
        inflated.refused.take().unwrap_or_else(|| {
            let encoding = self.encoding.unwrap_or("compressed");
            ServeError::invalid(format!(
                "the request body is not valid {encoding} data (Content-Encoding: {encoding})"
            ))
        })
    }

    /// A clean, client-facing reason for a failed read (the framework's Display for these
    /// carries Rust debug text).
    fn payload_error(&self, error: PayloadError, received: usize, started: Instant) -> ServeError {
        if door::is_body_timeout(&error) {
            metrics::counter!("streamserve_body_timeouts_total").increment(1);
            return ServeError::BodyTimeout {
                received,
                elapsed: started.elapsed(),
                deadline: self.limits.pace.deadline,
                min_rate: self.limits.pace.min_bytes_per_sec,
            };
        }
        match (error, self.encoding) {
            (PayloadError::Overflow, _) => ServeError::PayloadTooLarge {
                size: received,
                limit: self.limits.max_bytes,
            },
            // Decompression reports a corrupt stream in several ways, none a client can act on
            // better than this.
            (_, Some(encoding)) => ServeError::invalid(format!(
                "the request body is not valid {encoding} data (Content-Encoding: {encoding})"
            )),
            (PayloadError::Incomplete(_), None) => {
                ServeError::invalid("the request body ended before its declared length")
            }
            (_, None) => ServeError::invalid("the request body could not be read"),
        }
    }
}

/// Chunks smaller than this are inflated on the HTTP thread (actix's threshold).
const IN_PLACE: usize = 2049;

/// A compressed body's decoder, writing what it inflates into an [`Inflated`].
enum Decoder {
    Gzip(Box<flate2::write::GzDecoder<Inflated>>),
    Deflate(Box<flate2::write::ZlibDecoder<Inflated>>),
}

impl Decoder {
    fn write_all(&mut self, chunk: &[u8]) -> io::Result<()> {
        match self {
            Decoder::Gzip(d) => d.write_all(chunk),
            Decoder::Deflate(d) => d.write_all(chunk),
        }
    }

    fn inflated(&mut self) -> &mut Inflated {
        match self {
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Deflate(d) => d.get_mut(),
        }
    }

    /// Writes out what is left and checks the stream's end (gzip's checksum and length).
    fn finish(&mut self) -> io::Result<()> {
        match self {
            Decoder::Gzip(d) => d.try_finish(),
            Decoder::Deflate(d) => d.try_finish(),
        }
    }
}

/// Where a compressed body inflates to. It refuses a block that would take the body past its
/// size limit or the memory bound, so inflating stops there (at most one block, 32 KiB,
/// beyond the limit), not after the whole body has been inflated.
struct Inflated {
    buf: web::BytesMut,
    max_bytes: usize,
    memory: BodyMemory,
    reserved: Option<OwnedSemaphorePermit>,
    /// Why the last block was refused, for the client.
    refused: Option<ServeError>,
}

impl io::Write for Inflated {
    fn write(&mut self, block: &[u8]) -> io::Result<usize> {
        let size = self.buf.len() + block.len();
        let refused = self
            .memory
            .refuse_size(size, self.max_bytes)
            .or_else(|| self.memory.reserve(&mut self.reserved, size).err());
        if let Some(refused) = refused {
            self.refused = Some(refused);
            return Err(io::Error::other("the body's inflated size was refused"));
        }
        self.buf.extend_from_slice(block);
        Ok(block.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::StatusCode;
    use actix_web::ResponseError as _;

    #[test]
    fn a_stream_holds_the_sum_of_its_messages_and_gives_back_what_it_no_longer_needs() {
        let memory = BodyMemory::new(1);
        let mut stream = StreamHold::new(&memory);
        for _ in 0..64 {
            stream.add(100).unwrap();
        }
        assert_eq!(stream.reserved.as_ref().unwrap().num_permits(), STEP_KIB);
        stream.add(900 * 1024).unwrap();
        let refused = stream.add(200 * 1024).unwrap_err();
        assert!(matches!(refused, ServeError::BodyMemoryFull { .. }));
        assert_eq!(
            stream.bytes,
            64 * 100 + 900 * 1024,
            "a refusal counts nothing"
        );
        stream.remove(900 * 1024);
        assert_eq!(stream.reserved.as_ref().unwrap().num_permits(), STEP_KIB);
        // What it gave back, others can hold.
        let mut other = None;
        memory.reserve(&mut other, 900 * 1024).unwrap();
        stream.remove(64 * 100);
        assert_eq!(stream.reserved.as_ref().unwrap().num_permits(), 0);
    }

    #[test]
    fn memory_is_reserved_in_steps_and_refused_past_the_bound() {
        let memory = BodyMemory::new(1);
        let mut a = None;
        memory.reserve(&mut a, 1).unwrap();
        assert_eq!(a.as_ref().unwrap().num_permits(), STEP_KIB);
        memory.reserve(&mut a, 600 * 1024).unwrap();
        assert_eq!(a.as_ref().unwrap().num_permits(), 640);
        let mut b = None;
        let refused = memory.reserve(&mut b, 512 * 1024).unwrap_err();
        assert!(matches!(
            refused,
            ServeError::BodyMemoryFull { limit_mb: 1 }
        ));
        drop(a);
        memory.reserve(&mut b, 512 * 1024).unwrap();
    }

    /// A body or message larger than the whole bound would get 503 + Retry-After on every
    /// try; it gets the size refusal instead, and a full bound stays the 503 it was.
    #[test]
    fn larger_than_the_whole_bound_is_too_large_not_try_again() {
        let memory = BodyMemory::new(1);
        let over = (1 << 20) + 1;
        assert!(memory.refuse_size(1 << 20, 64 << 20).is_none());
        assert!(matches!(
            memory.refuse_size(over, 64 << 20),
            Some(ServeError::LargerThanBodyMemory { size, limit_mb: 1 }) if size == over
        ));
        assert!(matches!(
            memory.refuse_size(over, 1000),
            Some(ServeError::PayloadTooLarge { limit: 1000, .. })
        ));
        let refused = memory.hold(over).err().unwrap();
        assert_eq!(refused.status_code(), StatusCode::PAYLOAD_TOO_LARGE);
        let mut stream = StreamHold::new(&memory);
        let refused = stream.add(over).unwrap_err();
        assert!(matches!(refused, ServeError::LargerThanBodyMemory { .. }));
        stream.add(600 * 1024).unwrap();
        let refused = stream.add(600 * 1024).unwrap_err();
        assert!(matches!(refused, ServeError::BodyMemoryFull { .. }));
    }
}
