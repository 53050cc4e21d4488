// SPDX-License-Identifier: GPL-2.0
/*
 * Tern's tracer as one BPF object: the maps, the loader-set filters and the
 * shared emit path live here; each hook has its own .bpf.c, included below.
 * One object (not one per hook) because the hooks must share one ring buffer
 * and the request issue/complete pair shares the in-flight map; libbpf-style
 * static linking of several objects would need extern maps, which aya does
 * not load.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "tern_event.h"

char LICENSE[] SEC("license") = "GPL";

/* Filters, set by the loader before load so the verifier prunes the disabled paths. */
const volatile __u32 filter_pids_on = 0;
/*
 * The tracer's own thread group (0: none). Its reads are Tern copying the
 * disk, not the workload, and never enter a trace. Its writes do: writeback
 * and freezes that Tern triggers write other processes' dirty pages.
 */
const volatile __u32 self_tgid = 0;
const volatile __u64 fault_addr_lo = 0;
const volatile __u64 fault_addr_hi = ~0ULL;
/* Wake the reader only once this much data waits; it also polls on a short timer. */
const volatile __u64 wakeup_bytes = 256 * 1024;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 * 1024 * 1024); /* the loader sets the real size */
} events SEC(".maps");

/* Devices to trace (kernel dev_t of the whole disk) -> TERN_DEV_REQUEST or TERN_DEV_BIO. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} devices SEC(".maps");

/* Thread groups to trace; consulted only when filter_pids_on (faults: always). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} pids SEC(".maps");

/* Issued requests by request pointer; deleted at their (final) completion. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct tern_inflight);
} inflight SEC(".maps");

/* Events dropped because the ring was full, per CPU and per slot (TERN_LOST_*). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TERN_LOST_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

static __always_inline void count_lost(__u32 slot)
{
	__u64 *n = bpf_map_lookup_elem(&lost, &slot);

	if (n)
		*n += 1;
}

static __always_inline void submit(void *e)
{
	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);

	bpf_ringbuf_submit(e, avail >= wakeup_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

static __always_inline __u32 dev_mode(__u32 dev)
{
	__u32 *mode = bpf_map_lookup_elem(&devices, &dev);

	return mode ? *mode : 0;
}

static __always_inline int pid_wanted(__u32 tgid)
{
	if (!filter_pids_on)
		return 1;
	return bpf_map_lookup_elem(&pids, &tgid) != NULL;
}

/* A read issued by the tracer's own process (see self_tgid). */
static __always_inline int own_read(__u32 tgid, __u32 opf)
{
	return self_tgid && tgid == self_tgid &&
	       (opf & 0xff) == bpf_core_enum_value(enum req_op, REQ_OP_READ);
}

static __always_inline __u32 disk_dev(struct gendisk *disk)
{
	__u32 major = BPF_CORE_READ(disk, major);
	__u32 minor = BPF_CORE_READ(disk, first_minor);

	return (major << 20) | minor;
}

/* Block op and flags from a request's or bio's opf word. */
static __always_inline void decode_opf(__u32 opf, __u32 *op, __u32 *flags)
{
	__u32 kop = opf & 0xff; /* REQ_OP_MASK: REQ_OP_BITS is 8 */
	__u32 f = 0;

	if (kop == bpf_core_enum_value(enum req_op, REQ_OP_READ))
		*op = TERN_OP_READ;
	else if (kop == bpf_core_enum_value(enum req_op, REQ_OP_WRITE))
		*op = TERN_OP_WRITE;
	else if (kop == bpf_core_enum_value(enum req_op, REQ_OP_FLUSH))
		*op = TERN_OP_FLUSH;
	else if (kop == bpf_core_enum_value(enum req_op, REQ_OP_DISCARD))
		*op = TERN_OP_DISCARD;
	else if (kop == bpf_core_enum_value(enum req_op, REQ_OP_WRITE_ZEROES))
		*op = TERN_OP_WRITE_ZEROES;
	else
		*op = TERN_OP_OTHER;

	if (opf & (1U << bpf_core_enum_value(enum req_flag_bits, __REQ_SYNC)))
		f |= TERN_BF_SYNC;
	if (opf & (1U << bpf_core_enum_value(enum req_flag_bits, __REQ_FUA)))
		f |= TERN_BF_FUA;
	if (opf & (1U << bpf_core_enum_value(enum req_flag_bits, __REQ_META)))
		f |= TERN_BF_META;
	if (opf & (1U << bpf_core_enum_value(enum req_flag_bits, __REQ_PREFLUSH)))
		f |= TERN_BF_PREFLUSH;
	*flags = f;
}

#include "block_rq_issue.bpf.c"
#include "block_rq_complete.bpf.c"
#include "block_bio_queue.bpf.c"
#include "page_fault_user.bpf.c"
