// SPDX-License-Identifier: GPL-2.0
/*
 * block_bio_queue: bio-based devices (zram, dm, md) never issue requests, so
 * their I/O is seen here, at queue time, in the submitter's context. Request-
 * based devices are skipped: their requests are counted at completion.
 * Part of tern.bpf.c.
 */

SEC("tp_btf/block_bio_queue")
int BPF_PROG(block_bio_queue, struct bio *bio)
{
	struct tern_block_event *e;
	__u32 dev = disk_dev(BPF_CORE_READ(bio, bi_bdev, bd_disk));
	__u32 pid, op, flags;

	if (dev_mode(dev) != TERN_DEV_BIO)
		return 0;
	pid = bpf_get_current_pid_tgid() >> 32;
	if (!pid_wanted(pid) || own_read(pid, BPF_CORE_READ(bio, bi_opf)))
		return 0;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_lost(TERN_LOST_BLOCK);
		return 0;
	}
	decode_opf(BPF_CORE_READ(bio, bi_opf), &op, &flags);
	e->ts_ns = bpf_ktime_get_ns();
	e->sector = BPF_CORE_READ(bio, bi_iter.bi_sector);
	e->latency_ns = 0;
	e->kind = TERN_KIND_BIO;
	e->dev = dev;
	e->bytes = BPF_CORE_READ(bio, bi_iter.bi_size);
	e->pid = pid;
	e->op = op;
	e->flags = flags;
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	submit(e);
	return 0;
}
