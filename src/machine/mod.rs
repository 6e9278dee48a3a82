//! The machine under the server: process CPU, memory, threads and file descriptors (the
//! standard `process_*` series), per-device memory against its budget, bytes per protocol,
//! open connections, and GPUs through NVML where there are any.
//!
//! - This file: the process's figures (read with `metrics-process`, not by parsing `/proc`
//!   here), each device's memory as the budgets account it, and what a scrape of `/metrics`
//!   refreshes ([`refresh`], then [`render_extra`]).
//! - `traffic.rs`: bytes in and out and open connections per protocol, counted where each
//!   protocol moves them.
//! - `cpu_share.rs`: the share of its usable cores the process used over a span, which the
//!   door's admission limit reads.
//! - `gpu.rs`: utilisation and memory of each GPU from NVML, loaded at run time; a machine
//!   without a GPU or without the library has no GPU series, and says so in one log line.

pub mod cpu_share;
pub mod gpu;
pub mod traffic;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use metrics::Gauge;
use serde::Serialize;

use crate::actors::budget::Budgets;
use crate::manifest::Device;

/// The process's figures now, for the status page and the admin API.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MachineSnapshot {
    /// User + system CPU time of the process since it started.
    pub cpu_seconds_total: f64,
    pub resident_memory_bytes: u64,
    pub threads: u64,
    pub open_fds: u64,
    /// Cores the process may run on.
    pub cores: usize,
    pub virtual_memory_bytes: u64,
    /// The open-file limit (soft); 0: unlimited.
    pub max_fds: u64,
    /// When the process started, in seconds since the Unix epoch.
    pub start_time_seconds: u64,
}

/// Reads the process's figures now (a few reads of `/proc/self` on Linux).
pub fn snapshot() -> MachineSnapshot {
    let figures = metrics_process::collector::collect();
    MachineSnapshot {
        cpu_seconds_total: figures.cpu_seconds_total.unwrap_or(0.0),
        resident_memory_bytes: figures.resident_memory_bytes.unwrap_or(0),
        threads: figures.threads.unwrap_or(0),
        open_fds: figures.open_fds.unwrap_or(0),
        cores: cpu_share::usable_cores(),
        virtual_memory_bytes: figures.virtual_memory_bytes.unwrap_or(0),
        max_fds: figures.max_fds.unwrap_or(0),
        start_time_seconds: figures.start_time_seconds.unwrap_or(0),
    }
}

/// The standard process series that are gauges (described in `telemetry/describe.rs`);
/// `process_cpu_seconds_total`, a counter with a fractional value, is written by
/// [`render_extra`].
pub const PROCESS_GAUGES: [&str; 6] = [
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_threads",
    "process_start_time_seconds",
];

/// Handles of the process gauges, in [`PROCESS_GAUGES`]' order, made once the recorder is in.
struct ProcessGauges([Gauge; 6]);

static PROCESS: OnceLock<ProcessGauges> = OnceLock::new();
/// The last CPU seconds read, as f64 bits, for [`render_extra`].
static CPU_SECONDS: AtomicU64 = AtomicU64::new(0);

/// Makes the handles of every series this module keeps, once the metrics recorder is
/// installed (a handle made before it would record nowhere), and puts the series at their
/// first values: bytes and connections at 0, the process's figures as they are now.
pub fn install() {
    PROCESS.get_or_init(|| ProcessGauges(PROCESS_GAUGES.map(|name| metrics::gauge!(name))));
    traffic::install();
    refresh_process();
}

/// Reads the process's figures into their series.
fn refresh_process() {
    let figures = snapshot();
    CPU_SECONDS.store(figures.cpu_seconds_total.to_bits(), Ordering::Relaxed);
    let Some(ProcessGauges(gauges)) = PROCESS.get() else {
        return;
    };
    let values = [
        figures.resident_memory_bytes,
        figures.virtual_memory_bytes,
        figures.open_fds,
        figures.max_fds,
        figures.threads,
        figures.start_time_seconds,
    ];
    for (gauge, value) in gauges.iter().zip(values) {
        gauge.set(value as f64);
    }
}

/// What the server hands `/metrics` to read the devices' memory from.
pub struct Machine {
    pub budgets: Arc<Budgets>,
}

impl Machine {
    /// The budgets' devices, with their series at their values now (so that they are there
    /// before the first scrape).
    pub fn new(budgets: Arc<Budgets>) -> Machine {
        let machine = Machine { budgets };
        machine.refresh_devices();
        machine
    }

    /// Each device's memory in use (as the budgets estimate it) and its budget. The CPU's is
    /// always there; a GPU's once it is in use or NVML sees it, and from then on (at 0 when
    /// its replicas are gone). A GPU whose VRAM is not budgeted has no budget series.
    fn refresh_devices(&self) {
        const MIB: f64 = (1u64 << 20) as f64;
        // GPUs whose series exist: once there, a series stays (at 0 when unused).
        static SEEN: AtomicU32 = AtomicU32::new(0);
        let memory = &self.budgets.memory;
        let visible = gpu::count().min(32);
        let mut seen = SEEN.load(Ordering::Relaxed) | ((1u64 << visible) - 1) as u32;
        for n in 0..32 {
            if memory.in_use_mb(Device::Cuda(n)) > 0 {
                seen |= 1 << n;
            }
        }
        SEEN.fetch_or(seen, Ordering::Relaxed);
        let cpu = std::iter::once(("cpu".to_string(), Device::Cpu));
        let gpus = (0..32)
            .filter(|n| seen & (1 << n) != 0)
            .map(|n| (format!("cuda:{n}"), Device::Cuda(n)));
        for (label, device) in cpu.chain(gpus) {
            metrics::gauge!("streamserve_device_memory_bytes", "device" => label.clone())
                .set(memory.in_use_mb(device) as f64 * MIB);
            if let Some(budget) = memory.budget_mb(device) {
                metrics::gauge!("streamserve_device_memory_budget_bytes", "device" => label)
                    .set(budget as f64 * MIB);
            }
        }
    }
}

/// Brings the series a scrape reads up to date: the process's figures, the devices' memory
/// (when the server handed its [`Machine`]) and the GPUs (waiting at most [`gpu::WAIT`]).
pub async fn refresh(machine: Option<&Machine>) {
    refresh_process();
    if let Some(machine) = machine {
        machine.refresh_devices();
    }
    gpu::refresh().await;
}

/// Text the exporter cannot write, appended to its rendering: `process_cpu_seconds_total`, a
/// counter with a fractional value (the `metrics` crate's counters are whole numbers, and
/// whole CPU seconds would hide a second of CPU from `rate()`).
pub fn render_extra(out: &mut String) {
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let seconds = f64::from_bits(CPU_SECONDS.load(Ordering::Relaxed));
    let _ = write!(
        out,
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
         # TYPE process_cpu_seconds_total counter\n\
         process_cpu_seconds_total {seconds}\n"
    );
}
