// SPDX-License-Identifier: GPL-2.0
/* block_rq_complete: one event per request (per completed part), with its latency. Part of tern.bpf.c. */

SEC("tp_btf/block_rq_complete")
int BPF_PROG(block_rq_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	struct tern_block_event *e;
	struct tern_inflight *f;
	__u32 dev = disk_dev(BPF_CORE_READ(rq, q, disk));
	__u64 key = (__u64)rq;
	__u64 now;
	__u32 op, flags;

	if (dev_mode(dev) != TERN_DEV_REQUEST)
		return 0;
	f = bpf_map_lookup_elem(&inflight, &key);
	/* With a pid filter, a request we did not see issued belongs to another pid. */
	if (!f && filter_pids_on)
		return 0;
	if (f && f->skip) {
		if (nr_bytes >= BPF_CORE_READ(rq, __data_len))
			bpf_map_delete_elem(&inflight, &key);
		/* Only a read is ever the tracer's own. Anything else under a skip
		 * entry is a reused request whose earlier completion the kernel
		 * skipped: it is reported, never dropped. */
		if ((BPF_CORE_READ(rq, cmd_flags) & 0xff) ==
		    bpf_core_enum_value(enum req_op, REQ_OP_READ))
			return 0;
		f = NULL;
	}

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_lost(TERN_LOST_BLOCK);
		if (f && nr_bytes >= BPF_CORE_READ(rq, __data_len))
			bpf_map_delete_elem(&inflight, &key);
		return 0;
	}
	now = bpf_ktime_get_ns();
	decode_opf(BPF_CORE_READ(rq, cmd_flags), &op, &flags);
	if (error)
		flags |= TERN_BF_ERROR;
	e->kind = TERN_KIND_BLOCK;
	e->dev = dev;
	e->sector = BPF_CORE_READ(rq, __sector);
	e->bytes = nr_bytes;
	e->op = op;
	if (f) {
		__u64 at = e->sector;
		__u64 end = at + (nr_bytes >> 9);
		__u64 from = f->seen < at ? f->seen : at;
		int last = nr_bytes >= BPF_CORE_READ(rq, __data_len);

		e->ts_ns = f->ts_ns;
		e->latency_ns = now - f->ts_ns;
		e->pid = f->pid;
		__builtin_memcpy(e->comm, f->comm, sizeof(e->comm));
		/*
		 * A completion of this request never reached this program (see
		 * docs/tracer.md), and a later one did: a part before this one
		 * (`seen` behind it), or the request's data itself, when this is
		 * the second, empty completion of a FUA write on a disk without
		 * FUA (after its post-flush, with the request's start restored).
		 * The part not seen is reported with this one, marked unseen.
		 */
		if (last && end < f->sector + (f->bytes >> 9))
			end = f->sector + (f->bytes >> 9);
		if ((from < at || end > at + (nr_bytes >> 9)) && end - from <= (1u << 22)) {
			e->sector = from;
			e->bytes = (__u32)((end - from) << 9);
			flags |= TERN_BF_UNSEEN;
		}
		f->seen = end;
		/* Partial completions keep the entry for the rest of the request. */
		if (last)
			bpf_map_delete_elem(&inflight, &key);
	} else {
		e->ts_ns = now;
		e->latency_ns = 0;
		e->pid = 0;
		__builtin_memset(e->comm, 0, sizeof(e->comm));
		flags |= TERN_BF_NO_ISSUE;
	}
	e->flags = flags;
	submit(e);
	return 0;
}
