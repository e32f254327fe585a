//! The marker for data that may live in shared memory.

/// Plain data that may be placed in a shared region and copied between processes.
///
/// # Safety
///
/// An implementor promises all of the following:
/// * it is `#[repr(C)]` or `#[repr(transparent)]` (a fixed, documented layout);
/// * every bit pattern of its size is a valid value (a peer may write anything), so it holds
///   no `bool`, `char`, enum, reference or `NonZero*` whose invalid patterns would be UB;
/// * it holds no pointer, reference, file descriptor or anything else meaningful only inside
///   one process: positions are expressed as offsets;
/// * it has no `Drop` (it is `Copy`) and no interior mutability other than atomics.
pub unsafe trait Pod: Copy + Send + Sync + 'static {}

// SAFETY: primitive integers and arrays of them are repr-stable and valid for every bit pattern.
unsafe impl Pod for u8 {}
// SAFETY: as above.
unsafe impl Pod for u16 {}
// SAFETY: as above.
unsafe impl Pod for u32 {}
// SAFETY: as above.
unsafe impl Pod for u64 {}
// SAFETY: as above.
unsafe impl Pod for i64 {}
// SAFETY: an array of Pod values is Pod: same layout rules, every element valid for any bits.
unsafe impl<T: Pod, const N: usize> Pod for [T; N] {}
