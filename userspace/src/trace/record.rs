//! What a trace says, in domain terms: block requests, page faults, gaps.

use serde::{Deserialize, Serialize};
use tern_common as abi;

/// A block operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    Other,
}

impl Op {
    pub const ALL: [Op; 6] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Discard,
        Op::WriteZeroes,
        Op::Other,
    ];

    /// From the ABI's `TERN_OP_*`; unknown values are `Other`, never an error.
    pub fn from_abi(op: u32) -> Op {
        match op {
            abi::TERN_OP_READ => Op::Read,
            abi::TERN_OP_WRITE => Op::Write,
            abi::TERN_OP_FLUSH => Op::Flush,
            abi::TERN_OP_DISCARD => Op::Discard,
            abi::TERN_OP_WRITE_ZEROES => Op::WriteZeroes,
            _ => Op::Other,
        }
    }

    #[expect(
        clippy::cast_possible_truncation,
        reason = "the ABI's TERN_OP_* are 0..=5 (ebpf/tern_event.h)"
    )]
    pub fn code(self) -> u8 {
        match self {
            Op::Read => abi::TERN_OP_READ as u8,
            Op::Write => abi::TERN_OP_WRITE as u8,
            Op::Flush => abi::TERN_OP_FLUSH as u8,
            Op::Discard => abi::TERN_OP_DISCARD as u8,
            Op::WriteZeroes => abi::TERN_OP_WRITE_ZEROES as u8,
            Op::Other => abi::TERN_OP_OTHER as u8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write-zeroes",
            Op::Other => "other",
        }
    }

    pub fn from_name(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == s)
    }

    /// Does this operation change the data on the disk?
    pub fn modifies(self) -> bool {
        matches!(self, Op::Write | Op::Discard | Op::WriteZeroes)
    }
}

/// Block flags (`TERN_BF_*`), kept as the ABI's bit set.
pub mod block_flags {
    use tern_common as abi;
    pub const SYNC: u32 = abi::TERN_BF_SYNC;
    pub const FUA: u32 = abi::TERN_BF_FUA;
    pub const META: u32 = abi::TERN_BF_META;
    pub const PREFLUSH: u32 = abi::TERN_BF_PREFLUSH;
    pub const NO_ISSUE: u32 = abi::TERN_BF_NO_ISSUE;
    pub const ERROR: u32 = abi::TERN_BF_ERROR;
    /// Its completion never reached the tracer; recovered from its in-flight record.
    pub const UNSEEN: u32 = abi::TERN_BF_UNSEEN;

    const NAMES: [(u32, &str); 7] = [
        (SYNC, "sync"),
        (FUA, "fua"),
        (META, "meta"),
        (PREFLUSH, "preflush"),
        (NO_ISSUE, "no-issue"),
        (ERROR, "error"),
        (UNSEEN, "unseen"),
    ];

    /// `sync|fua`, or empty.
    pub fn format(flags: u32) -> String {
        NAMES
            .iter()
            .filter(|(bit, _)| flags & bit != 0)
            .map(|(_, name)| *name)
            .collect::<Vec<_>>()
            .join("|")
    }

    /// The inverse of [`format`]; unknown names give `None`.
    pub fn parse(s: &str) -> Option<u32> {
        let mut flags = 0;
        for part in s.split('|').filter(|p| !p.is_empty()) {
            flags |= NAMES.iter().find(|(_, name)| *name == part)?.0;
        }
        Some(flags)
    }
}

/// Fault flags (`TERN_FF_*`).
pub mod fault_flags {
    use tern_common as abi;
    pub const PRESENT: u32 = abi::TERN_FF_PRESENT;
    pub const WRITE: u32 = abi::TERN_FF_WRITE;
    pub const INSTR: u32 = abi::TERN_FF_INSTR;
}

/// One block request, in the trace's coordinates (device or image bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRecord {
    /// Nanoseconds since the trace started (issue time).
    pub ts_ns: u64,
    /// Byte offset on the traced target.
    pub offset: u64,
    /// Issue to completion; 0 when unknown.
    pub latency_ns: u64,
    pub len: u32,
    pub pid: u32,
    pub flags: u32,
    /// Index of the target in the header's `targets`.
    pub target: u16,
    pub op: Op,
}

/// One user page fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRecord {
    pub ts_ns: u64,
    pub address: u64,
    pub ip: u64,
    pub pid: u32,
    pub tid: u32,
    pub flags: u32,
}

impl FaultRecord {
    pub fn is_write(&self) -> bool {
        self.flags & fault_flags::WRITE != 0
    }
    pub fn is_present(&self) -> bool {
        self.flags & fault_flags::PRESENT != 0
    }
}

/// A window in which the kernel dropped events: anything may have happened there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub start_ns: u64,
    pub end_ns: u64,
    pub lost_block: u64,
    pub lost_fault: u64,
}

/// A process name, recorded once per pid before its first event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessRecord {
    pub ts_ns: u64,
    pub pid: u32,
    pub comm: String,
}

/// CPU over one sampling interval of one CPU target (`TraceHeader::cpu_targets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuRecord {
    /// The end of the interval.
    pub ts_ns: u64,
    pub target: u16,
    pub interval_ns: u64,
    /// CPU time used in the interval (summed over CPUs: 2 s in 1 s is two cores).
    pub usage_ns: u64,
    /// Time runnable but waiting for a CPU (`None`: not measured here).
    pub wait_ns: Option<u64>,
    /// Time held back by a CPU limit (`None`: no limit controller).
    pub throttled_ns: Option<u64>,
}

/// Totals written when a trace is closed cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndRecord {
    pub ts_ns: u64,
    pub block_events: u64,
    pub fault_events: u64,
    pub lost_events: u64,
    /// Device requests that fell outside the traced image (file-system metadata, other files).
    pub outside_image: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Block(BlockRecord),
    Fault(FaultRecord),
    Gap(Gap),
    Process(ProcessRecord),
    Cpu(CpuRecord),
    End(EndRecord),
}

impl Record {
    pub fn ts_ns(&self) -> u64 {
        match self {
            Record::Block(b) => b.ts_ns,
            Record::Fault(f) => f.ts_ns,
            Record::Gap(g) => g.start_ns,
            Record::Process(p) => p.ts_ns,
            Record::Cpu(c) => c.ts_ns,
            Record::End(e) => e.ts_ns,
        }
    }
}
