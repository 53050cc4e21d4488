// SPDX-License-Identifier: GPL-2.0
/* block_rq_issue: remember what a traced request is, when and by whom it was issued. Part of tern.bpf.c. */

/*
 * A request's in-flight record still there when the request is issued
 * again: its completion never reached block_rq_complete's run (the kernel
 * lost that run; see docs/tracer.md), yet it did complete, as the request
 * was freed and reused. Reported now, marked unseen, so the write is not
 * lost with it.
 */
static __always_inline void report_unseen(struct tern_inflight *old, __u64 now)
{
	struct tern_block_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		count_lost(TERN_LOST_BLOCK);
		return;
	}
	e->ts_ns = old->ts_ns;
	e->sector = old->sector;
	e->latency_ns = now - old->ts_ns;
	e->kind = TERN_KIND_BLOCK;
	e->dev = old->dev;
	e->bytes = old->bytes;
	e->pid = old->pid;
	e->op = old->op;
	e->flags = old->flags | TERN_BF_UNSEEN;
	__builtin_memcpy(e->comm, old->comm, sizeof(e->comm));
	submit(e);
}

SEC("tp_btf/block_rq_issue")
int BPF_PROG(block_rq_issue, struct request *rq)
{
	struct tern_inflight f = {};
	struct tern_inflight *old;
	__u32 dev = disk_dev(BPF_CORE_READ(rq, q, disk));
	__u64 key = (__u64)rq;
	__u32 opf;

	if (dev_mode(dev) != TERN_DEV_REQUEST)
		return 0;
	opf = BPF_CORE_READ(rq, cmd_flags);
	f.ts_ns = bpf_ktime_get_ns();
	f.sector = BPF_CORE_READ(rq, __sector);
	f.seen = f.sector;
	f.bytes = BPF_CORE_READ(rq, __data_len);
	f.dev = dev;
	f.pid = bpf_get_current_pid_tgid() >> 32;
	decode_opf(opf, &f.op, &f.flags);
	old = bpf_map_lookup_elem(&inflight, &key);
	/* The same request issued again (a requeue) is not a lost completion. */
	if (old && !old->skip &&
	    !(old->sector == f.sector && old->bytes == f.bytes && old->op == f.op))
		report_unseen(old, f.ts_ns);
	if (!pid_wanted(f.pid)) {
		if (old)
			bpf_map_delete_elem(&inflight, &key);
		return 0;
	}
	/* Kept in flight, marked, so its completion is not taken for a stranger's. */
	f.skip = own_read(f.pid, opf);
	bpf_get_current_comm(&f.comm, sizeof(f.comm));
	/* A full map loses only the latency and issuer of this request, never the request. */
	bpf_map_update_elem(&inflight, &key, &f, BPF_ANY);
	return 0;
}
