/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The one kernel/user ABI of Tern's tracer. common/ generates its Rust
 * mirror from this file at build time (bindgen), so the two cannot drift.
 *
 * Rules: no bools or enums in structs (u8/u32 with named constants), fields
 * ordered largest first so there is no padding, and every event type keeps
 * `kind` at the same offset (TERN_KIND_OFFSET) so the reader can tell them
 * apart before it knows the type.
 */
#ifndef TERN_EVENT_H
#define TERN_EVENT_H

#ifndef __VMLINUX_H__
#include <linux/types.h>
#endif

#define TERN_COMM_LEN 16

/* Event kinds (`kind` field). */
#define TERN_KIND_BLOCK 1 /* a request-based device's request, emitted at completion */
#define TERN_KIND_BIO 2   /* a bio-based device's bio (zram, dm, md), emitted at queue */
#define TERN_KIND_FAULT 3 /* a user page fault */

/* Byte offset of `kind` in every event. */
#define TERN_KIND_OFFSET 24

/* Block operations (`op` field). */
#define TERN_OP_READ 0
#define TERN_OP_WRITE 1
#define TERN_OP_FLUSH 2
#define TERN_OP_DISCARD 3
#define TERN_OP_WRITE_ZEROES 4
#define TERN_OP_OTHER 5

/* Block flags (`flags` field, a bit set). */
#define TERN_BF_SYNC 0x1
#define TERN_BF_FUA 0x2
#define TERN_BF_META 0x4
#define TERN_BF_PREFLUSH 0x8
/* Completed with no issue seen (issued before the trace started): latency unknown. */
#define TERN_BF_NO_ISSUE 0x10
/* Completed with an error status. */
#define TERN_BF_ERROR 0x20
/*
 * Its completion never reached the tracer (the kernel lost that run of the
 * completion hook): reported from its in-flight record when the request was
 * reused, or when the disk had nothing in flight. ts_ns is the issue; the
 * completion came before ts_ns + latency_ns.
 */
#define TERN_BF_UNSEEN 0x40

/* Fault flags (`flags` field), from the x86 page-fault error code. */
#define TERN_FF_PRESENT 0x1 /* protection fault on a present page */
#define TERN_FF_WRITE 0x2
#define TERN_FF_INSTR 0x4

/* Values of the device filter map: how the device is traced. */
#define TERN_DEV_REQUEST 1 /* request-based: block_rq_issue/complete */
#define TERN_DEV_BIO 2     /* bio-based: block_bio_queue */

/* Slots of the per-CPU `lost` array: events dropped because the ring was full. */
#define TERN_LOST_BLOCK 0
#define TERN_LOST_FAULT 1
#define TERN_LOST_SLOTS 2

struct tern_block_event {
	__u64 ts_ns;      /* issue time, CLOCK_MONOTONIC (bpf_ktime_get_ns) */
	__u64 sector;     /* 512-byte sector on the whole disk */
	__u64 latency_ns; /* issue to completion; 0 when unknown */
	__u32 kind;       /* TERN_KIND_BLOCK or TERN_KIND_BIO */
	__u32 dev;        /* kernel dev_t: major << 20 | minor */
	__u32 bytes;
	__u32 pid;        /* thread group of the issuer */
	__u32 op;         /* TERN_OP_* */
	__u32 flags;      /* TERN_BF_* */
	char comm[TERN_COMM_LEN];
};

/*
 * A request issued and not yet seen complete, in the `inflight` map (keyed
 * by the request's address). Userspace reads it back when the kernel's
 * counts say a completion was lost.
 */
struct tern_inflight {
	__u64 ts_ns;  /* issue time */
	__u64 sector; /* the whole request, as issued */
	__u64 seen;   /* completions reported up to this sector */
	__u32 bytes;
	__u32 dev;    /* kernel dev_t: major << 20 | minor */
	__u32 pid;    /* thread group of the issuer */
	__u32 op;     /* TERN_OP_* */
	__u32 flags;  /* TERN_BF_* */
	__u32 skip;   /* the tracer's own read: complete it silently */
	char comm[TERN_COMM_LEN];
};

struct tern_fault_event {
	__u64 ts_ns;
	__u64 address;
	__u64 ip;
	__u32 kind;  /* TERN_KIND_FAULT */
	__u32 pid;   /* thread group */
	__u32 tid;
	__u32 flags; /* TERN_FF_* */
};

#endif /* TERN_EVENT_H */
