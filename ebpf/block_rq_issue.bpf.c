// SPDX-License-Identifier: GPL-2.0
/* block_rq_issue: remember when and by whom a traced request was issued. Part of tern.bpf.c. */

SEC("tp_btf/block_rq_issue")
int BPF_PROG(block_rq_issue, struct request *rq)
{
	struct inflight f = {};
	__u32 dev = disk_dev(BPF_CORE_READ(rq, q, disk));
	__u64 key = (__u64)rq;

	if (dev_mode(dev) != TERN_DEV_REQUEST)
		return 0;
	f.pid = bpf_get_current_pid_tgid() >> 32;
	if (!pid_wanted(f.pid))
		return 0;
	/* Kept in flight, marked, so its completion is not taken for a stranger's. */
	f.skip = own_read(f.pid, BPF_CORE_READ(rq, cmd_flags));
	f.ts_ns = bpf_ktime_get_ns();
	bpf_get_current_comm(&f.comm, sizeof(f.comm));
	/* A full map loses only the latency and issuer of this request, never the request. */
	bpf_map_update_elem(&inflight, &key, &f, BPF_ANY);
	return 0;
}
