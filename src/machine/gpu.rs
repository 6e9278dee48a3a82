//! GPU utilisation and memory from NVML, for `/metrics` on a GPU host. NVML is loaded at run
//! time (`nvml-wrapper` opens `libnvidia-ml`), once: a machine without a GPU, a driver or the
//! library gets one log line and no GPU series, never an error. A scrape reads the GPUs on a
//! blocking thread and waits at most [`WAIT`] for them: a GPU that hangs its driver leaves the
//! last figures in place instead of holding the scrape (and one stuck read is never joined by
//! another).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use metrics::Gauge;
use nvml_wrapper::Nvml;

/// Longest a scrape waits for NVML.
pub const WAIT: Duration = Duration::from_millis(250);

/// The series of one GPU, by its NVML index.
struct GpuSeries {
    utilization: Gauge,
    memory_used: Gauge,
    memory_total: Gauge,
}

struct Gpus {
    nvml: Nvml,
    series: Vec<GpuSeries>,
    /// A read is in flight (a scrape that timed out left it running).
    reading: AtomicBool,
}

static GPUS: OnceLock<Option<Gpus>> = OnceLock::new();

/// Opens NVML (once per process; later calls return at once) and reads the GPUs a first time.
/// Needs the metrics recorder installed.
pub fn init() {
    GPUS.get_or_init(|| {
        // `libnvidia-ml.so.1`, the name the driver installs.
        let nvml = match Nvml::init() {
            Ok(nvml) => nvml,
            Err(e) => {
                tracing::info!(reason = %e, "no NVML (no NVIDIA GPU, driver or libnvidia-ml): no GPU metrics");
                return None;
            }
        };
        let count = match nvml.device_count() {
            Ok(count) => count,
            Err(e) => {
                tracing::info!(reason = %e, "NVML cannot count the GPUs: no GPU metrics");
                return None;
            }
        };
        let series = (0..count)
            .map(|i| {
                let gpu = i.to_string();
                GpuSeries {
                    utilization: metrics::gauge!("streamserve_gpu_utilization_ratio", "gpu" => gpu.clone()),
                    memory_used: metrics::gauge!("streamserve_gpu_memory_used_bytes", "gpu" => gpu.clone()),
                    memory_total: metrics::gauge!("streamserve_gpu_memory_total_bytes", "gpu" => gpu),
                }
            })
            .collect();
        tracing::info!(gpus = count, "NVML loaded: GPU utilisation and memory in /metrics");
        let gpus = Gpus {
            nvml,
            series,
            reading: AtomicBool::new(false),
        };
        gpus.read();
        Some(gpus)
    });
}

/// GPUs NVML sees (0 without NVML).
pub fn count() -> usize {
    match GPUS.get() {
        Some(Some(gpus)) => gpus.series.len(),
        _ => 0,
    }
}

impl Gpus {
    /// Reads every GPU into its series; a GPU that does not answer keeps its last figures.
    fn read(&self) {
        for (i, series) in self.series.iter().enumerate() {
            let Ok(device) = self.nvml.device_by_index(i as u32) else {
                continue;
            };
            if let Ok(rates) = device.utilization_rates() {
                series.utilization.set(f64::from(rates.gpu) / 100.0);
            }
            if let Ok(memory) = device.memory_info() {
                series.memory_used.set(memory.used as f64);
                series.memory_total.set(memory.total as f64);
            }
        }
    }
}

/// Reads the GPUs for a scrape, waiting at most [`WAIT`].
pub async fn refresh() {
    let Some(Some(gpus)) = GPUS.get() else {
        return;
    };
    if gpus.reading.swap(true, Ordering::AcqRel) {
        return; // the last read is still stuck in the driver
    }
    let read = tokio::task::spawn_blocking(move || {
        gpus.read();
        gpus.reading.store(false, Ordering::Release);
    });
    let _ = tokio::time::timeout(WAIT, read).await;
}
