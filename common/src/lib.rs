//! The kernel/user event ABI of Tern's tracer and the compiled eBPF object.
//!
//! The types and constants are generated at build time from
//! `ebpf/tern_event.h` by bindgen; this crate only adds size checks and
//! small accessors, so the C and Rust sides cannot drift.
#![no_std]

#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    dead_code,
    clippy::pedantic,
    clippy::all
)]
mod abi {
    include!(concat!(env!("OUT_DIR"), "/event_abi.rs"));
}

pub use abi::*;

/// A block request (request-based devices, at completion) or bio (bio-based devices, at queue).
pub type BlockEvent = abi::tern_block_event;
/// A user page fault.
pub type FaultEvent = abi::tern_fault_event;
/// A request issued and not yet seen complete (the `inflight` map's value).
pub type InFlight = abi::tern_inflight;

const _: () = assert!(core::mem::size_of::<BlockEvent>() == 64);
const _: () = assert!(core::mem::size_of::<FaultEvent>() == 40);
const _: () = assert!(core::mem::size_of::<InFlight>() == 64);
const _: () = assert!(core::mem::offset_of!(BlockEvent, kind) == TERN_KIND_OFFSET as usize);
const _: () = assert!(core::mem::offset_of!(FaultEvent, kind) == TERN_KIND_OFFSET as usize);

/// Bytes aligned for the ELF parser, which reads the object in place.
#[repr(C, align(32))]
struct Aligned<B: ?Sized>(B);

static OBJECT: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/tern.bpf.o")));

/// The compiled eBPF object (CO-RE: one object for every kernel with BTF).
pub static BPF_OBJECT: &[u8] = &OBJECT.0;

/// The kind of a raw ring-buffer record, read before its type is known.
pub fn event_kind(raw: &[u8]) -> Option<u32> {
    let at = TERN_KIND_OFFSET as usize;
    let bytes = raw.get(at..at + 4)?;
    Some(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// The command name of an event as text (up to the first NUL).
pub fn comm_str(comm: &[core::ffi::c_char; TERN_COMM_LEN as usize]) -> &str {
    let bytes: &[u8] = bytemuck::cast_slice(comm.as_slice());
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..end]).unwrap_or("?")
}
