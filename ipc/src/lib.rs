//! keepnet-ipc: the shared-memory layer every keepnet process talks through.
//!
//! * [`Region`]: a memfd-backed shared mapping with a checked header. The supervisor creates
//!   every region; servers and apps only map them (DESIGN rule 1).
//! * [`ring`]: single-producer single-consumer rings of [`Pod`] slots living in a region.
//! * [`pool`]: fixed-size buffers with headroom, an ownership table for crash reclamation, and
//!   the [`Descriptor`] that names a buffer on a ring.
//! * [`Doorbell`]: spin-then-park notification on a futex in shared memory.
//! * [`Generation`]: a per-endpoint generation counter in shared memory (DESIGN rule 7).
//!
//! Everything placed in a region is `#[repr(C)]` plain data addressed by offsets, never
//! pointers, and every index written by a peer is bounds-checked before use.

pub mod doorbell;
pub mod fdpass;
pub mod generation;
pub mod layout;
pub mod pod;
pub mod pool;
pub mod region;
pub mod ring;

pub use doorbell::{new_eventfd, Doorbell, SpinPolicy, WaitOutcome};
pub use generation::Generation;
pub use layout::RegionLayout;
pub use pod::Pod;
pub use pool::{
    BufRef, BufferPool, DescError, Descriptor, EndpointId, FreeList, PoolError, Retakes,
};
pub use region::{Region, RegionError, RegionKind, SharedU64};
pub use ring::{process_alive, Consumer, Producer, PushError, Ring, RingError};
