//! Placing several structures in one region: a bump allocator of offsets.

use crate::region::HEADER_SIZE;

/// Computes offsets for structures placed one after another in a region. Both the creator and
/// every opener run the same sequence of `place` calls and so agree on every offset.
#[derive(Clone, Copy, Debug)]
pub struct RegionLayout {
    next: usize,
}

impl Default for RegionLayout {
    fn default() -> Self {
        Self::new()
    }
}

impl RegionLayout {
    /// A layout whose first structure goes right after the region header.
    pub const fn new() -> Self {
        RegionLayout { next: HEADER_SIZE }
    }

    /// Reserves `len` bytes aligned to `align` (a power of two) and returns their offset.
    pub fn place(&mut self, len: usize, align: usize) -> usize {
        debug_assert!(align.is_power_of_two());
        let off = (self.next + align - 1) & !(align - 1);
        self.next = off + len;
        off
    }

    /// The region size needed for everything placed so far, rounded up to a page.
    pub fn size(&self) -> usize {
        (self.next + 4095) & !4095
    }
}
