#!/bin/busybox sh
# The guest's /init: a static busybox, the kernel's virtio and ext4 modules,
# and one scenario chosen on the kernel command line (tern.scenario=NAME).
# Every line the host parses starts with "tern-vm:".
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

say() { echo "tern-vm: $*"; }
die() { say "FAIL $*"; poweroff -f; }
arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1="*) echo "${w#*=}" ;; esac
    done
}

for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done
say "kernel $(uname -r)"

# Waits for /dev/$1 (vda when not given: trace.sh calls it so).
wait_disk() {
    dev=${1:-vda}
    i=0
    while [ ! -b "/dev/$dev" ]; do
        i=$((i + 1))
        [ $i -gt 500 ] && die "no /dev/$dev"
        sleep 0.02
    done
}

# With tern.reads=1, reads beside the writes (the disk's /random, seeded by
# the host): 1 MiB at a random place every second and the whole file every
# 20 s, O_DIRECT so each reaches the disk; until the workload stops.
reader() {
    [ -e /mnt/random ] || die "tern.reads=1 needs /random on the disk"
    mib=$(($(stat -c %s /mnt/random) >> 20))
    [ "$mib" -gt 0 ] || die "tern.reads=1 needs /random of 1 MiB at least"
    r=0
    while [ ! -e /tmp/stop ]; do
        dd if=/mnt/random of=/dev/null bs=64k count=16 skip=$(((RANDOM % mib) * 16)) \
            iflag=direct 2>/dev/null || die "read /random"
        if [ $((r % 20)) -eq 0 ]; then
            dd if=/mnt/random of=/dev/null bs=1M iflag=direct 2>/dev/null || die "scan /random"
        fi
        r=$((r + 1))
        sleep 1
    done
}

# One tick's writes in the workload directory $1: rewrites file $2 of 32 with
# random data, records its checksum, the counter $3 and the uptime $4.
write_tick() {
    dd if=/dev/urandom of="$1/f$2" bs=4k count=4 2>/dev/null
    sha256sum "$1/f$2" > "$1/sum$2"
    echo "$3" > "$1/counter"
    echo "$3 $4" >> "$1/ticks"
}

# Checks the workload directory $1: every checksum, and that its counter has
# no hole.
verify_dir() {
    for s in "$1"/sum*; do
        sha256sum -c -s "$s" || die "checksum $s"
    done
    awk -v first="$(head -n1 "$1/ticks" | cut -d' ' -f1)" \
        '$1 != first + NR - 1 { exit 1 }' "$1/ticks" || die "counter has a hole in $1"
}

# A write workload on the ext4 disk: every tick rewrites one of 32 files with
# random data, records its checksum, the counter and the guest's uptime, and
# syncs. A line on the serial console stops it; then every checksum and the
# counter's continuity are verified and the guest powers off. With
# tern.disks=2, the second disk (/dev/vdb, ext4) gets the same writes every
# tick and the same checks.
workload() {
    wait_disk vda
    mount -t ext4 /dev/vda /mnt || die "mount /dev/vda"
    mkdir -p /mnt/w
    dirs=/mnt/w
    if [ "$(arg tern.disks)" = 2 ]; then
        wait_disk vdb
        mkdir -p /mnt2
        mount -t ext4 /dev/vdb /mnt2 || die "mount /dev/vdb"
        mkdir -p /mnt2/w
        dirs="/mnt/w /mnt2/w"
    fi
    # The host writes one line on ttyS0 to stop the workload.
    (read -r _line < /dev/ttyS0; touch /tmp/stop) &
    rpid=
    if [ "$(arg tern.reads)" = 1 ]; then
        reader &
        rpid=$!
    fi
    n=$(cat /mnt/w/counter 2>/dev/null || echo 0)
    say "workload start n=$n"
    while [ ! -e /tmp/stop ]; do
        n=$((n + 1))
        t=$(cut -d' ' -f1 /proc/uptime)
        i=$((n % 32))
        for d in $dirs; do
            write_tick "$d" $i $n "$t"
        done
        sync
        say "tick $n $t"
    done
    say "stopping n=$n"
    [ -n "$rpid" ] && wait "$rpid"
    for d in $dirs; do
        verify_dir "$d"
    done
    gap=$(awk 'NR > 1 { g = $2 - p; if (g > m) m = g } { p = $2 } END { printf "%.2f", m }' /mnt/w/ticks)
    if [ -d /mnt2/w ]; then
        n2=$(cat /mnt2/w/counter)
        umount /mnt2 || die "umount /mnt2"
        say "VERIFY OK vdb n=$n2"
    fi
    umount /mnt || die "umount"
    say "VERIFY OK n=$n maxgap=$gap"
}

case "$(arg tern.scenario)" in
workload) workload ;;
trace) . /trace.sh ;;
*) say "FAIL unknown scenario '$(arg tern.scenario)'" ;;
esac
say "poweroff"
sync
poweroff -f
