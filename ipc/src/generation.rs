//! Per-endpoint generation counters in shared memory (DESIGN rule 7).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::region::{Region, RegionError, SharedU64};

/// A generation counter living in a region. Each restart or update of an endpoint bumps it;
/// peers that see a new value know to redo their setup.
#[derive(Clone, Debug)]
pub struct Generation {
    cell: SharedU64,
}

impl Generation {
    /// Bytes a generation counter takes in a region (one cache line, so that it shares no line
    /// with hot data).
    pub const SIZE: usize = 64;
    /// Alignment it needs.
    pub const ALIGN: usize = 64;

    /// Attaches to the counter at `offset`; a fresh (zeroed) region holds generation 0.
    pub fn attach(region: &Region, offset: usize) -> Result<Generation, RegionError> {
        region.ptr_at(offset, Self::SIZE, Self::ALIGN)?;
        Ok(Generation {
            cell: SharedU64::at(region, offset)?,
        })
    }

    fn cell(&self) -> &AtomicU64 {
        self.cell.atomic()
    }

    /// The current generation.
    pub fn get(&self) -> u64 {
        self.cell().load(Ordering::Acquire)
    }

    /// Bumps the generation and returns the new value.
    pub fn bump(&self) -> u64 {
        self.cell().fetch_add(1, Ordering::AcqRel) + 1
    }
}
