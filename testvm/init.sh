#!/bin/sh
# /init of the hyperkeep test VM (busybox only). Loads the modules, starts acpid (power button ->
# clean unmount + power off) and the guest agent, mounts /dev/vda and appends numbered, checksummed
# records to /mnt/records.log with a sync after each one, so a backup's consistency can be
# checked from outside: every line is "rec NNNNNNNN <sha256 of 'hk-record-N'>".
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /var/run
for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m.ko 2>/dev/null
done
# Let the devices appear (no udev: devtmpfs creates the nodes).
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do usleep 50000; i=$((i+1)); done

# Power button (ACPI, from QMP system_powerdown) -> /etc/acpi/PWRF/00000080 -> poweroff-clean.
cat > /bin/poweroff-clean <<'PO'
#!/bin/sh
echo "HK-POWEROFF" > /dev/console
[ -f /run/writer.pid ] && kill $(cat /run/writer.pid) 2>/dev/null
sleep 0.2
sync
umount /mnt 2>/dev/null || { sleep 1; sync; umount /mnt; }
echo "HK-UNMOUNTED" > /dev/console
poweroff -f
PO
chmod 755 /bin/poweroff-clean
# acpid opens the /dev/input/event* nodes present when it starts: wait for the power button's.
i=0
while [ $i -lt 100 ]; do
    pb=""
    for d in /sys/class/input/event*; do
        grep -qs "Power Button" $d/device/name && pb=/dev/$(basename $d)
    done
    [ -n "$pb" ] && [ -c "$pb" ] && break
    usleep 50000; i=$((i+1))
done
acpid -c /etc/acpi -l /run/acpid.log

# The guest agent: find the virtio-serial port by name (there is no udev to make the symlink).
port=""
i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ -f "$p/name" ] && [ "$(cat $p/name)" = org.qemu.guest_agent.0 ] && port=/dev/$(basename $p)
    done
    [ -n "$port" ] || usleep 50000
    i=$((i+1))
done
if [ -n "$port" ]; then
    /usr/sbin/qemu-ga -m virtio-serial -p "$port" -t /run -d -f /run/qemu-ga.pid
else
    echo "HK-NO-AGENT-PORT" > /dev/console
fi

mkdir -p /mnt
if ! mount -t ext4 /dev/vda /mnt; then
    echo "HK-MOUNT-FAILED" > /dev/console
    exec sh
fi
(
    n=0
    [ -f /mnt/records.log ] && n=$(wc -l < /mnt/records.log)
    while true; do
        n=$((n+1))
        sum=$(echo -n "hk-record-$n" | sha256sum | cut -c1-64)
        printf 'rec %08d %s\n' $n $sum >> /mnt/records.log
        sync
        # Printed after the sync: a record announced here is durable on the disk.
        [ $((n % 10)) = 0 ] && echo "HK-REC $n" > /dev/console
        usleep 20000
    done
) &
echo $! > /run/writer.pid
echo "HK-BOOTED" > /dev/console
while true; do sleep 3600; done
