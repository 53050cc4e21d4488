// SPDX-License-Identifier: GPL-2.0
/* exceptions:page_fault_user for the traced pids, optionally one address range. Part of tern.bpf.c. */

#define X86_PF_PROT 0x1
#define X86_PF_WRITE 0x2
#define X86_PF_INSTR 0x10

SEC("tp_btf/page_fault_user")
int BPF_PROG(page_fault_user, unsigned long address, struct pt_regs *regs, unsigned long error_code)
{
	struct tern_fault_event *e;
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	__u32 flags = 0;

	if (!bpf_map_lookup_elem(&pids, &tgid))
		return 0;
	if (address < fault_addr_lo || address >= fault_addr_hi)
		return 0;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_lost(TERN_LOST_FAULT);
		return 0;
	}
	if (error_code & X86_PF_PROT)
		flags |= TERN_FF_PRESENT;
	if (error_code & X86_PF_WRITE)
		flags |= TERN_FF_WRITE;
	if (error_code & X86_PF_INSTR)
		flags |= TERN_FF_INSTR;
	e->ts_ns = bpf_ktime_get_ns();
	e->address = address;
	e->ip = BPF_CORE_READ(regs, ip);
	e->kind = TERN_KIND_FAULT;
	e->pid = tgid;
	e->tid = (__u32)id;
	e->flags = flags;
	submit(e);
	return 0;
}
