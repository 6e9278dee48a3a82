//! `loadgen protocols`'s options (with [`MlpClosedLoop`], the part `monitoring` and `jobs`
//! take too), and the four clients it compares: REST with JSON tensor data, REST with the
//! binary tensor data extension, gRPC `ModelInfer` (unary) and gRPC `ModelStreamInfer`
//! (streaming), all sending the same `mlp` request.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use crate::cli::{count, secs, BenchCommon};
use crate::rest::RestOptions;

/// The requests in flight one gRPC stream carries at most: the server reads no more of a
/// stream while this many of its requests are unanswered (`STREAM_IN_FLIGHT` in
/// `src/api/grpc/inference.rs`).
pub const SERVER_STREAM_IN_FLIGHT: usize = 64;

/// Other processes' CPU use, in cores, over a slice beyond which its round counts as contended
/// and is run again (once).
pub const CONTENDED_CORES: f64 = 0.3;

/// One client of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// `POST /v2/models/mlp/infer`, JSON tensor data in and out.
    RestJson,
    /// The same with the binary tensor data extension (raw little-endian f32 after the JSON).
    RestBinary,
    /// gRPC `ModelInfer`, the input in `raw_input_contents`, one call per request.
    GrpcUnary,
    /// gRPC `ModelStreamInfer`: several requests in flight on each bidirectional stream.
    GrpcStream,
}

impl Protocol {
    /// The name on the command line and in `results.json`.
    pub fn key(self) -> &'static str {
        match self {
            Protocol::RestJson => "rest-json",
            Protocol::RestBinary => "rest-binary",
            Protocol::GrpcUnary => "grpc-unary",
            Protocol::GrpcStream => "grpc-stream",
        }
    }

    /// The name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::RestJson => "REST JSON",
            Protocol::RestBinary => "REST binary",
            Protocol::GrpcUnary => "gRPC unary",
            Protocol::GrpcStream => "gRPC stream",
        }
    }
}

/// What `protocols`, `monitoring` and `jobs` share after their own options: the closed-loop
/// clients' timeout, the benchmarks' common options (the command line among them) and the
/// `mlp` file.
#[derive(Clone, Debug, clap::Args)]
pub struct MlpClosedLoop {
    /// Seconds to wait for one answer before counting it as a transport error.
    #[arg(long = "timeout-secs", value_name = "TIMEOUT_SECS", default_value = "30", value_parser = secs(1, 600))]
    pub request_timeout: Duration,
    #[command(flatten)]
    pub common: BenchCommon,
    /// The model file: `models/mlp/1/model.onnx` of this checkout.
    #[arg(skip = crate::bench::default_model_file())]
    pub model_file: PathBuf,
}

impl MlpClosedLoop {
    /// One slice of quiet closed-loop `mlp` REST load on the server at `addr`.
    pub fn rest_load(&self, addr: SocketAddr, slice: RestSlice) -> RestOptions {
        let RestSlice {
            concurrency,
            rows,
            binary,
            warmup,
            duration,
        } = slice;
        RestOptions {
            url: format!("http://{addr}"),
            model: "mlp".into(),
            concurrency,
            duration,
            warmup,
            rows,
            binary,
            quiet: true,
            request_timeout: self.request_timeout,
        }
    }
}

/// One slice of closed-loop REST load: requests in flight, rows per request, JSON or binary,
/// warm-up then the measured period.
#[derive(Clone, Copy, Debug)]
pub struct RestSlice {
    pub concurrency: usize,
    pub rows: usize,
    pub binary: bool,
    pub warmup: Duration,
    pub duration: Duration,
}

/// `loadgen protocols`'s options.
#[derive(Clone, Debug, clap::Args)]
pub struct ProtocolsOptions {
    /// The clients, comma-separated; the first is the baseline of the ratios.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "rest-json,rest-binary,grpc-unary,grpc-stream"
    )]
    pub protocols: Vec<Protocol>,
    /// Concurrency levels (requests in flight, closed loop), comma-separated.
    #[arg(long = "concurrency", value_name = "CONCURRENCY", value_delimiter = ',', default_values_t = [1usize, 8, 32, 64],
          value_parser = count(1, crate::rest::MAX_CONCURRENCY))]
    pub concurrencies: Vec<usize>,
    /// Measured seconds of each slice (one client, one level, one round).
    #[arg(long = "duration-secs", value_name = "DURATION_SECS", default_value = "2", value_parser = secs(1, 120))]
    pub duration: Duration,
    /// Unmeasured warm-up seconds before each slice's measured period.
    #[arg(long = "warmup-secs", value_name = "WARMUP_SECS", default_value = "1", value_parser = secs(0, 60))]
    pub warmup: Duration,
    /// Rounds per level: the clients run in the listed order, then in reverse, and so on, so
    /// that a slow drift of the machine weighs on every client alike.
    #[arg(long, default_value_t = 2, value_parser = count(1, 8))]
    pub rounds: usize,
    /// Rows per request (input [rows, 256]); at most the server's max_batch_size (64).
    #[arg(long, default_value_t = 1, value_parser = count(1, 64))]
    pub rows: usize,
    /// HTTP/2 connections (tonic channels) the gRPC clients spread their calls and streams
    /// over, round robin (REST opens one connection per request in flight).
    #[arg(long, default_value_t = 1, value_parser = count(1, 64))]
    pub grpc_connections: usize,
    /// Requests in flight per gRPC stream at most: a level of concurrency C runs ⌈C / W⌉
    /// streams sharing the C requests in flight (at most 64, the server's own bound per stream).
    #[arg(long, default_value_t = 64, value_parser = count(1, SERVER_STREAM_IN_FLIGHT))]
    pub stream_window: usize,
    /// The server's door admission (`adaptive`, as shipped and as in `bench`: a latency-driven
    /// limit that refuses with 429 beyond it; `static`: no door limit).
    #[arg(long, value_enum, default_value = "adaptive")]
    pub admission: streamserve::config::Admission,
    #[command(flatten)]
    pub mlp: MlpClosedLoop,
}

impl Default for ProtocolsOptions {
    fn default() -> Self {
        crate::cli::defaults()
    }
}

impl ProtocolsOptions {
    pub fn check(&self) -> anyhow::Result<()> {
        let p = &self.protocols;
        if p.is_empty() || (1..p.len()).any(|i| p[..i].contains(&p[i])) {
            bail!("give each protocol at most once, at least one");
        }
        if self.concurrencies.is_empty() || self.concurrencies.len() > 16 {
            bail!("give 1 to 16 concurrency levels");
        }
        if self.duration.is_zero() {
            bail!("the measured period must be longer than 0");
        }
        if self.rows == 0 || self.rows > 64 {
            bail!("rows must be 1..=64 (the server's max_batch_size)");
        }
        if self.stream_window == 0 || self.stream_window > SERVER_STREAM_IN_FLIGHT {
            bail!("stream window must be 1..={SERVER_STREAM_IN_FLIGHT}");
        }
        if self.grpc_connections == 0 || self.grpc_connections > 64 {
            bail!("gRPC connections must be 1..=64");
        }
        Ok(())
    }

    /// The baseline of the ratios: the first client listed.
    pub fn baseline(&self) -> Protocol {
        self.protocols[0]
    }

    /// The order of the clients in round `round` (from 0): as listed in even rounds, reversed
    /// in odd ones (A B C D, D C B A, ...), so that a linear drift over a level cancels out.
    pub fn order(&self, round: usize) -> Vec<Protocol> {
        super::alternating(&self.protocols, round)
    }

    /// Measured seconds and seconds in all (warm-up included) of the whole run's slices.
    pub fn planned_secs(&self) -> (f64, f64) {
        let slices = (self.concurrencies.len() * self.rounds * self.protocols.len()) as f64;
        let measured = self.duration.as_secs_f64();
        (
            slices * measured,
            slices * (measured + self.warmup.as_secs_f64()),
        )
    }
}

/// How `concurrency` requests in flight spread over gRPC streams of at most `window` each:
/// ⌈concurrency / window⌉ streams, their windows as even as can be (summing to `concurrency`).
pub fn stream_windows(concurrency: usize, window: usize) -> Vec<usize> {
    let window = window.max(1);
    let streams = concurrency.div_ceil(window).max(1);
    (0..streams)
        .map(|i| concurrency / streams + usize::from(i < concurrency % streams))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_the_checks_and_fit_in_two_minutes() {
        let o = ProtocolsOptions::default();
        o.check().unwrap();
        assert_eq!(o.baseline(), Protocol::RestJson);
        assert_eq!(o.concurrencies, [1, 8, 32, 64]);
        assert_eq!(
            o.order(1),
            [
                Protocol::GrpcStream,
                Protocol::GrpcUnary,
                Protocol::RestBinary,
                Protocol::RestJson
            ]
        );
        assert_eq!(o.order(2), o.protocols);
        let (measured, all) = o.planned_secs();
        assert_eq!(measured, 64.0);
        assert!(all <= 110.0, "{all} s of slices");
    }

    #[test]
    fn bad_options_are_refused() {
        let bad: [fn(&mut ProtocolsOptions); 5] = [
            |o| o.protocols.clear(),
            |o| o.protocols.push(Protocol::RestJson),
            |o| o.concurrencies.clear(),
            |o| o.stream_window = SERVER_STREAM_IN_FLIGHT + 1,
            |o| o.rows = 65,
        ];
        for change in bad {
            let mut o = ProtocolsOptions::default();
            change(&mut o);
            assert!(o.check().is_err(), "{o:?} was accepted");
        }
    }

    #[test]
    fn streams_share_the_requests_in_flight() {
        assert_eq!(stream_windows(1, 64), [1]);
        assert_eq!(stream_windows(64, 64), [64]);
        assert_eq!(stream_windows(65, 64), [33, 32]);
        assert_eq!(stream_windows(8, 1), [1; 8]);
        assert_eq!(stream_windows(10, 4), [4, 3, 3]);
        for (c, w) in [(1, 1), (7, 3), (100, 64), (1024, 64)] {
            let windows = stream_windows(c, w);
            assert_eq!(windows.iter().sum::<usize>(), c);
            assert!(windows.iter().all(|&n| n >= 1 && n <= w));
        }
    }

    #[test]
    fn the_scenario_file_gives_these_options() {
        let o: ProtocolsOptions =
            crate::scenario::bundled_options("protocols-mlp.toml", "protocols");
        o.check().unwrap();
        assert_eq!(o.protocols.len(), 4);
        assert_eq!(o.baseline(), Protocol::RestJson);
        assert_eq!((o.rounds, o.rows, o.grpc_connections), (2, 1, 1));
    }
}
