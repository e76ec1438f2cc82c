#!/bin/sh
# Guest init, stage 2: exec'd by /sbin/usbccid-init (PID 1) once /share (9p) is mounted.
# The host copies this folder to <share>/boot/ at every boot.
#
# Sets up the system (udev, vhci-hcd, eth0 10.0.2.15/24 via 10.0.2.2, pcscd), writes
# /share/out/ready (via the runner), then runs the scenario loop (/share/boot/scenario_runner.py):
# each /share/in/NNN.sh becomes /share/out/NNN.json, until /share/in/poweroff appears.
# Whatever happens, it ends with poweroff -f; the host kills QEMU if that never comes.
PATH=/share/boot/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
LANG=C.UTF-8
USBCCID_HOST=10.0.2.2      # the host's 127.0.0.1 as seen from the guest
IDLE_TIMEOUT=3600          # the scenario loop ends after this long without a scenario
START_PCSCD=1              # start pcscd before the first scenario
[ -f /share/boot/config ] && . /share/boot/config    # written by the host (tests/vm/guest.py)
export PATH HOME LANG USBCCID_HOST
log() { echo "guest-init: $*" >/dev/console; }
t_start=$(cut -d' ' -f1 /proc/uptime)

mkdir -p /run /tmp /dev/pts /dev/shm
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
hostname usbccid-guest
ip link set lo up

# udev: pcscd's hotplug (libudev) needs it to see readers that appear on vhci-hcd.
log "starting udevd"
/lib/systemd/systemd-udevd --daemon --resolve-names=never
udevadm trigger --action=add --type=subsystems
udevadm trigger --action=add --type=devices
timeout 60 udevadm settle --timeout=50 || log "udevadm settle timed out"

modprobe vhci-hcd || log "modprobe vhci-hcd FAILED"

# QEMU user networking: the host's loopback is 10.0.2.2, DNS 10.0.2.3.
for i in $(seq 1 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2

mkdir -p /share/in /share/out /share/files
if [ "$START_PCSCD" = 1 ]; then pcscd-start || log "pcscd-start FAILED"; fi

t_ready=$(cut -d' ' -f1 /proc/uptime)
uname -r >/share/out/.ready.tmp
echo "uptime_at_init=$t_start uptime_ready=$t_ready" >>/share/out/.ready.tmp
log "set up after ${t_ready}s of guest uptime; starting the scenario loop"

# The runner renames .ready.tmp to ready once it polls for scenarios.
python3 -I /share/boot/scenario_runner.py --idle "$IDLE_TIMEOUT" \
    --ready /share/out/.ready.tmp /share/in /share/out >/dev/console 2>&1 \
    || log "runner exited with $?"

log "powering off"
sync
poweroff -f 2>/dev/null || busybox poweroff -f
echo o >/proc/sysrq-trigger
sleep 10
