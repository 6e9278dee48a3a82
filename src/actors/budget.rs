//! The machine's budgets that every model's replicas share: CPU threads ([`CpuBudget`]) and
//! memory per device ([`MemoryBudget`]). The supervisor takes from them when it loads a version,
//! routers when they scale up, and both give back when replicas go. Plain atomics: taking never
//! blocks anyone.

use crate::manifest::Device;

/// Memory per device, in MiB: RAM for CPU replicas, VRAM for each GPU's. A version whose
/// replicas would not fit is refused when it loads, and autoscaling adds a replica only where it
/// fits, so models are packed onto devices by what they need. A replica is estimated at twice its
/// model file (weights plus ONNX Runtime's working memory). What is in use is counted on every
/// device, budgeted or not, for `/metrics`.
#[derive(Debug)]
pub struct MemoryBudget {
    ram: std::sync::atomic::AtomicI64,
    pub ram_total_mb: i64,
    vram: Vec<std::sync::atomic::AtomicI64>,
    /// Per GPU; 0: VRAM is not budgeted.
    pub vram_total_mb: i64,
    /// In use, in MiB: the CPU's RAM first, then each GPU's VRAM.
    in_use: Vec<std::sync::atomic::AtomicI64>,
}

impl MemoryBudget {
    pub fn new(ram_mb: u64, vram_mb_per_gpu: u64) -> MemoryBudget {
        MemoryBudget {
            ram: std::sync::atomic::AtomicI64::new(ram_mb as i64),
            ram_total_mb: ram_mb as i64,
            vram: (0..GPUS)
                .map(|_| std::sync::atomic::AtomicI64::new(vram_mb_per_gpu as i64))
                .collect(),
            vram_total_mb: vram_mb_per_gpu as i64,
            in_use: (0..=GPUS)
                .map(|_| std::sync::atomic::AtomicI64::new(0))
                .collect(),
        }
    }

    fn in_use_slot(&self, device: Device) -> Option<&std::sync::atomic::AtomicI64> {
        match device {
            Device::Cpu => self.in_use.first(),
            Device::Cuda(n) => usize::try_from(n).ok().and_then(|n| self.in_use.get(n + 1)),
        }
    }

    /// The estimate of what `device`'s loaded replicas hold, in MiB.
    pub fn in_use_mb(&self, device: Device) -> u64 {
        self.in_use_slot(device).map_or(0, |a| {
            a.load(std::sync::atomic::Ordering::Acquire).max(0) as u64
        })
    }

    /// `device`'s budget in MiB; `None`: not budgeted (a GPU when VRAM is not).
    pub fn budget_mb(&self, device: Device) -> Option<u64> {
        self.pool(device).map(|(_, total)| total.max(0) as u64)
    }

    fn pool(&self, device: Device) -> Option<(&std::sync::atomic::AtomicI64, i64)> {
        match device {
            Device::Cpu => Some((&self.ram, self.ram_total_mb)),
            Device::Cuda(n) if self.vram_total_mb > 0 => {
                self.vram.get(n as usize).map(|a| (a, self.vram_total_mb))
            }
            Device::Cuda(_) => None,
        }
    }

    /// Takes `mb` on `device` if it fits; the error says how much is left.
    pub fn try_take(&self, device: Device, mb: u64) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        let want = mb as i64;
        if let Some((pool, total)) = self.pool(device) {
            pool.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                (left >= want).then_some(left - want)
            })
            .map_err(|left| {
                format!(
                    "needs about {mb} MiB on {device}, {left} MiB of its {total} MiB budget left"
                )
            })?;
        }
        if let Some(in_use) = self.in_use_slot(device) {
            in_use.fetch_add(want, Ordering::AcqRel);
        }
        Ok(())
    }

    pub fn give_back(&self, device: Device, mb: u64) {
        if let Some((pool, _)) = self.pool(device) {
            pool.fetch_add(mb as i64, std::sync::atomic::Ordering::AcqRel);
        }
        if let Some(in_use) = self.in_use_slot(device) {
            in_use.fetch_sub(mb as i64, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// GPUs a budget keeps accounts for (`cuda:0` to `cuda:15`).
const GPUS: usize = 16;

/// Estimated memory of one replica of a model file, in MiB.
pub fn replica_memory_mb(model_file_bytes: u64) -> u64 {
    (model_file_bytes * 2).div_ceil(1 << 20)
}

/// What the machine has now, in MiB (`MemAvailable`), for a default RAM budget.
pub fn available_ram_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(u64::MAX >> 24, |kb| kb / 1024)
}

/// A budget of CPU threads (ONNX Runtime intra-op threads across all replicas). Routers take
/// from it to add replicas under load and give back when they scale down or unload, so models
/// share the machine by what they need. A plain atomic: taking never blocks anyone.
#[derive(Debug)]
pub struct CpuBudget {
    available: std::sync::atomic::AtomicI64,
    pub total: i64,
}

impl CpuBudget {
    pub fn new(total: usize) -> CpuBudget {
        CpuBudget {
            available: std::sync::atomic::AtomicI64::new(total as i64),
            total: total as i64,
        }
    }

    /// Takes `threads` if that many are left.
    pub fn try_take(&self, threads: usize) -> bool {
        use std::sync::atomic::Ordering;
        let threads = threads as i64;
        self.available
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                (left >= threads).then_some(left - threads)
            })
            .is_ok()
    }

    /// Takes `threads` even beyond the budget (a version's initial replicas); returns whether
    /// it fitted.
    pub fn take(&self, threads: usize) -> bool {
        self.available
            .fetch_sub(threads as i64, std::sync::atomic::Ordering::AcqRel)
            >= threads as i64
    }

    pub fn give_back(&self, threads: usize) {
        self.available
            .fetch_add(threads as i64, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn available(&self) -> i64 {
        self.available.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Both budgets, shared by the supervisor and every router.
#[derive(Debug)]
pub struct Budgets {
    pub cpu: CpuBudget,
    pub memory: MemoryBudget,
}

impl Budgets {
    pub fn new(cpu_threads: usize, ram_mb: u64, vram_mb_per_gpu: u64) -> Budgets {
        Budgets {
            cpu: CpuBudget::new(cpu_threads),
            memory: MemoryBudget::new(ram_mb, vram_mb_per_gpu),
        }
    }
}

impl Default for Budgets {
    /// Every CPU and the memory available now; VRAM not budgeted.
    fn default() -> Self {
        Budgets::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
            available_ram_mb(),
            0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is in use is counted on every device, budgeted or not; a refused take holds
    /// nothing.
    #[test]
    fn memory_in_use_follows_takes_and_gives() {
        let budget = MemoryBudget::new(100, 0);
        assert_eq!(budget.budget_mb(Device::Cpu), Some(100));
        assert_eq!(budget.budget_mb(Device::Cuda(0)), None, "VRAM not budgeted");
        budget.try_take(Device::Cpu, 60).unwrap();
        assert!(budget.try_take(Device::Cpu, 60).is_err());
        budget.try_take(Device::Cuda(1), 500).unwrap();
        assert_eq!(budget.in_use_mb(Device::Cpu), 60);
        assert_eq!(budget.in_use_mb(Device::Cuda(1)), 500);
        assert_eq!(budget.in_use_mb(Device::Cuda(0)), 0);
        budget.give_back(Device::Cpu, 60);
        budget.give_back(Device::Cuda(1), 500);
        assert_eq!(budget.in_use_mb(Device::Cpu), 0);
        assert_eq!(budget.in_use_mb(Device::Cuda(1)), 0);
        assert_eq!(
            budget.in_use_mb(Device::Cuda(99)),
            0,
            "beyond the GPUs kept"
        );
    }
}
