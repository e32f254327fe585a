//! Pinning the calling process to one CPU.

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

use crate::error::{Context, Error, Result};

/// The CPUs this process may run on, in increasing order.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// The process's current CPU mask, to restore later.
pub fn current_mask() -> Result<CpuSet> {
    sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")
}

/// Restores a mask saved with [`current_mask`].
pub fn restore_mask(mask: &CpuSet) -> Result<()> {
    sched_setaffinity(Pid::from_raw(0), mask).context("restoring the CPU mask")
}

/// Pins the whole calling process (its current thread; threads started later inherit it) to
/// `cpu`.
pub fn pin_to(cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)
        .map_err(|_| Error::Unsupported(format!("CPU {cpu} is out of range")))?;
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning to CPU {cpu}"))
}
