//! kn-relay: the smallest real server, used by the runtime tests. It moves `u64` slots from
//! ring `in` to ring `out` (both in region `rings`) and keeps a count and a running sum as
//! private state, which it snapshots and restores across a live update.
#![deny(unsafe_code)]

use keepnet_ipc::{Consumer, Producer, RegionKind, Ring};
use keepnet_server::codec;
use keepnet_server::{Boot, Progress, Server, ServerError};
use serde::{Deserialize, Serialize};

/// Offsets of the two rings in the `rings` region (shared with the tests).
pub const IN_OFF: usize = 128;
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize, Default, Debug)]
struct State {
    relayed: u64,
    sum: u64,
}

struct Relay {
    input: Consumer<u64>,
    output: Producer<u64>,
    state: State,
    batch: Vec<u64>,
}

impl Server for Relay {
    fn poll(&mut self) -> Result<Progress, ServerError> {
        let room = self.output.free_slots()?.min(self.batch.len());
        if room == 0 {
            return Ok(Progress::IDLE);
        }
        self.input.rewind();
        let n = self.input.read(&mut self.batch[..room])?;
        if n == 0 {
            return Ok(Progress::IDLE);
        }
        let pushed = self.output.push_slice(&self.batch[..n])?;
        // Commit only what went out: a crash before this line replays, never loses.
        self.input.commit(pushed)?;
        for v in &self.batch[..pushed] {
            self.state.relayed += 1;
            self.state.sum = self.state.sum.wrapping_add(*v);
        }
        Ok(Progress(pushed as u64))
    }

    fn has_work(&mut self) -> bool {
        self.input.has_data()
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, ServerError> {
        codec::encode("relay", FORMAT, env!("CARGO_PKG_VERSION"), &self.state)
            .map_err(|e| ServerError::Snapshot(e.to_string()))
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), ServerError> {
        let snap = codec::decode(snapshot, "relay", 1..=FORMAT)
            .map_err(|e| ServerError::Restore(e.to_string()))?;
        self.state = snap
            .state()
            .map_err(|e| ServerError::Restore(e.to_string()))?;
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    keepnet_server::main("relay", |boot: &mut Boot| {
        let rings = boot.region("rings", RegionKind::RINGS)?;
        let cap = 1024;
        let out_off = IN_OFF + Ring::<u64>::size_in_region(cap);
        let input = Ring::<u64>::open(&rings, IN_OFF, 1)?.consumer()?;
        let output = Ring::<u64>::open(&rings, out_off, 2)?.producer()?;
        Ok(Relay {
            input,
            output,
            state: State::default(),
            batch: vec![0; 64],
        })
    })
}
