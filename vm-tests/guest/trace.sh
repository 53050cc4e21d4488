# Sourced by /init for tern.scenario=trace: Tern's tracer inside the guest,
# on its virtio disk, while dd writes known 4 KiB O_DIRECT blocks
# (tern.blocks=N,N,...); the recorded writes go to the console as CSV rows.
wait_disk
[ -e /sys/kernel/btf/vmlinux ] || die "no /sys/kernel/btf/vmlinux"
mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
tern trace --device /dev/vda --duration 300s --out /tmp/t.trace > /tmp/trace.log 2>&1 &
tracer=$!
# The tracer prints its first progress line once attached and reading.
i=0
until grep -q "tern trace:" /tmp/trace.log; do
    kill -0 $tracer 2>/dev/null || { cat /tmp/trace.log; die "tern trace exited"; }
    i=$((i + 1))
    [ $i -gt 1200 ] && die "tern trace never attached"
    sleep 0.1
done
say "tracer attached"
for b in $(arg tern.blocks | tr , ' '); do
    dd if=/dev/urandom of=/dev/vda bs=4096 count=1 seek="$b" oflag=direct 2>/dev/null || die "dd block $b"
done
kill -TERM $tracer
wait $tracer || { cat /tmp/trace.log; die "tern trace failed"; }
tern trace export --format csv /tmp/t.trace --out /tmp/t.csv || die "tern trace export"
grep ',write,' /tmp/t.csv | while read -r l; do say "csv $l"; done
say "trace done"
