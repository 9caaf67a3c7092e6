#!/bin/bash
# Smoke test of real OpenZFS inside the openzfs-vm VM (scripts/openzfs-vm check
# runs it there). Exercises what zchunk relies on: send/receive, send -nP size
# estimates, resumable receive (-s, receive_resume_token, send -t), bookmarks
# and holds. Then probes the environment tests run in (python, sshd, netns).
# Exit 0 only if every ZFS step and /usr/bin/python3 worked; the other probes
# are reported (PROBE ok/FAIL) without failing the check.
set -u
export LC_ALL=C
fails=0
pass() { printf 'PASS  %s\n' "$*"; }
failed() { printf 'FAIL  %s\n' "$*"; fails=$((fails + 1)); }
step() {  # step DESCRIPTION CMD... : run CMD, PASS/FAIL on its status
    local d=$1; shift
    local out
    if out=$("$@" 2>&1); then pass "$d"; else failed "$d"; printf '%s\n' "$out" | sed 's/^/      /'; fi
}
probe() {  # probe DESCRIPTION CMD...
    local d=$1; shift
    local out
    if out=$("$@" 2>&1); then printf 'PROBE ok    %s\n' "$d"
    else printf 'PROBE FAIL  %s\n' "$d"; printf '%s\n' "$out" | tail -5 | sed 's/^/      /'; fi
}

[[ $(id -u) == 0 ]] || { echo "must run as root (inside the VM)"; exit 2; }
[[ -e /dev/zfs ]] || { echo "no /dev/zfs: run me with scripts/openzfs-vm run"; exit 2; }

echo "== zfs version"
zfs version || failed "zfs version"
uname -r

W=$(mktemp -d /tmp/zfs-check.XXXXXX)
SRC=zcsrc$$ DST=zcdst$$
cleanup() {
    zpool destroy -f "$SRC" 2>/dev/null
    zpool destroy -f "$DST" 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT

echo "== pools and datasets"
truncate -s 1G "$W/src.img" "$W/dst.img"
step "zpool create on a sparse file" zpool create -f -O mountpoint="$W/src" "$SRC" "$W/src.img"
# atime=off: reading the received files (cmp) must not count as modifying them
step "zpool create (target)" zpool create -f -O mountpoint="$W/dst" -O atime=off "$DST" "$W/dst.img"
step "zfs create" zfs create "$SRC/data"
step "write 64 MiB" dd if=/dev/urandom of="$W/src/data/blob" bs=1M count=64 status=none
sync
step "zfs snapshot" zfs snapshot "$SRC/data@s1"

echo "== full send | receive"
t0=$(date +%s%N)
step "zfs send | zfs receive" bash -c "set -o pipefail; zfs send $SRC/data@s1 | zfs receive $DST/full"
echo "      ($(( ($(date +%s%N) - t0) / 1000000 )) ms for 64 MiB)"
g1=$(zfs get -Hp -o value guid "$SRC/data@s1")
g2=$(zfs get -Hp -o value guid "$DST/full@s1" 2>/dev/null)
if [[ -n $g1 && $g1 == "$g2" ]]; then pass "guid of received snapshot matches ($g1)"; else failed "guid $g1 != $g2"; fi
if cmp -s "$W/src/data/blob" "$W/dst/full/blob"; then pass "received data identical"; else failed "received data differs"; fi

echo "== send -nP (size estimate)"
est=$(zfs send -nP "$SRC/data@s1" 2>&1)
printf '%s\n' "$est" | sed 's/^/      /'
size=$(awk '$1=="size"{print $2}' <<<"$est")
if [[ $size =~ ^[0-9]+$ ]] && ((size > 60 * 1024 * 1024)); then pass "send -nP size $size"; else failed "send -nP size '$size'"; fi

echo "== resumable receive: interrupt, token, send -t"
mkfifo "$W/pipe"
zfs receive -s "$DST/part" < "$W/pipe" &
rpid=$!
# Feed ~24 MiB of the stream, then keep the pipe open (the receive waits for
# more) and kill the receive, as a dropped link would.
(zfs send "$SRC/data@s1" | head -c $((24 * 1024 * 1024)); sleep 30) > "$W/pipe" &
fpid=$!
for _ in $(seq 1 100); do  # until the receive has read ~20 MiB (10 s at most)
    rchar=$(awk '$1=="rchar:"{print $2}' /proc/$rpid/io 2>/dev/null)
    [[ -z $rchar ]] || ((rchar > 20 * 1024 * 1024)) && break
    sleep 0.1
done
printf '      receive read %s bytes before the kill\n' "${rchar:-?}"
kill -TERM $rpid 2>/dev/null
wait $rpid 2>/dev/null
kill $fpid 2>/dev/null; pkill -P $fpid 2>/dev/null; wait $fpid 2>/dev/null
token=$(zfs get -Hp -o value receive_resume_token "$DST/part" 2>/dev/null)
if [[ -n $token && $token != - ]]; then pass "receive_resume_token after killed receive (${#token} chars)"
else failed "no receive_resume_token (got '$token')"; fi
step "zfs send -nP -t TOKEN" bash -c "zfs send -nP -t '$token' | grep -E '^(resume|size)'"
zfs send -nvt "$token" 2>&1 | sed 's/^/      /' | head -3
step "zfs send -t TOKEN | zfs receive -s (resume)" \
    bash -c "set -o pipefail; zfs send -t '$token' | zfs receive -s $DST/part"
g3=$(zfs get -Hp -o value guid "$DST/part@s1" 2>/dev/null)
if [[ $g3 == "$g1" ]]; then pass "resumed snapshot guid matches"; else failed "resumed guid '$g3' != $g1"; fi
if cmp -s "$W/src/data/blob" "$W/dst/part/blob"; then pass "resumed data identical"; else failed "resumed data differs"; fi
# zfs receive -A discards a partial state
zfs send "$SRC/data@s1" | head -c $((8 * 1024 * 1024)) | zfs receive -s "$DST/abort" 2>/dev/null
step "zfs receive -A (abort partial receive)" zfs receive -A "$DST/abort"

echo "== bookmarks and incrementals"
step "zfs bookmark" zfs bookmark "$SRC/data@s1" "$SRC/data#b1"
step "list bookmarks" bash -c "zfs list -H -t bookmark -o name,guid | grep -q '#b1'"
dd if=/dev/urandom of="$W/src/data/blob2" bs=1M count=8 status=none
step "zfs snapshot @s2" zfs snapshot "$SRC/data@s2"
step "zfs destroy @s1 (bookmark remains)" zfs destroy "$SRC/data@s1"
step "incremental send from bookmark | receive" \
    bash -c "set -o pipefail; zfs send -i '$SRC/data#b1' $SRC/data@s2 | zfs receive $DST/full"
step "incremental -I send -nP" bash -c "zfs snapshot $SRC/data@s3 && zfs send -nP -I $SRC/data@s2 $SRC/data@s3 | grep -q '^size'"

echo "== holds"
step "zfs hold" zfs hold zchunk "$SRC/data@s2"
step "zfs holds" bash -c "zfs holds -H $SRC/data@s2 | grep -q zchunk"
if zfs destroy "$SRC/data@s2" 2>/dev/null; then failed "destroy of a held snapshot succeeded"
else pass "destroy of a held snapshot refused"; fi
step "zfs release" zfs release zchunk "$SRC/data@s2"
step "destroy after release" zfs destroy "$SRC/data@s2"

echo "== raw and compressed sends"
step "zfs send -c | receive" bash -c "set -o pipefail; zfs send -c $SRC/data@s3 | zfs receive $DST/comp"
step "zfs send -w (raw) | receive" bash -c "set -o pipefail; zfs send -w $SRC/data@s3 | zfs receive $DST/raw"

echo "== pools"
zpool list -o name,size,alloc,health "$SRC" "$DST" | sed 's/^/      /'

echo "== environment probes"
step "/usr/bin/python3 runs" /usr/bin/python3 -c 'import sys; print(sys.version)'
probe "/usr/bin/python3 has zstandard, xxhash (Debian python3-zstandard, python3-xxhash)" \
    /usr/bin/python3 -c 'import zstandard, xxhash'
for venv in "${ZCHUNK_VENV:-}" /work/main/.venv "$PWD/.venv"; do
    [[ -n $venv && -x $venv/bin/python ]] || continue
    probe "$venv/bin/python imports asyncssh, zstandard, xxhash" \
        "$venv/bin/python" -c 'import asyncssh, zstandard, xxhash'
    break
done
probe "loopback up" bash -c "ip -o link show lo | grep -q 'UP'"
probe "ip netns add + veth pair" bash -c '
    set -e; ip netns add zcvm1; ip netns add zcvm2
    ip link add zcv1 type veth peer name zcv2
    ip link set zcv1 netns zcvm1; ip link set zcv2 netns zcvm2
    ip -n zcvm1 addr add 10.231.0.1/30 dev zcv1; ip -n zcvm2 addr add 10.231.0.2/30 dev zcv2
    ip -n zcvm1 link set zcv1 up; ip -n zcvm2 link set zcv2 up
    ip -n zcvm1 link set lo up; ip -n zcvm2 link set lo up
    ip netns exec zcvm2 python3 -c "
import socket; s = socket.socket(); s.bind((\"10.231.0.2\", 7070)); s.listen()
c, _ = s.accept(); c.sendall(b\"pong\")" &
    sleep 1
    ip netns exec zcvm1 python3 -c "
import socket; s = socket.create_connection((\"10.231.0.2\", 7070), 5); assert s.recv(4) == b\"pong\""
    wait
    ip netns del zcvm1; ip netns del zcvm2'
probe "tc qdisc tbf" bash -c 'ip link add zcd0 type dummy && tc qdisc add dev zcd0 root tbf rate 10mbit burst 32kb latency 50ms; rc=$?; ip link del zcd0; exit $rc'
probe "tc qdisc netem" bash -c 'ip link add zcd0 type dummy && tc qdisc add dev zcd0 root netem delay 20ms; rc=$?; ip link del zcd0; exit $rc'
probe "iptables statistic + REJECT tcp-reset" bash -c '
    iptables -A OUTPUT -o lo -p tcp --dport 9 -m statistic --mode random --probability 0.5 -j DROP &&
    iptables -A OUTPUT -o lo -p tcp --dport 9 -j REJECT --reject-with tcp-reset &&
    iptables -F OUTPUT'
probe "sshd on 127.0.0.1 (key login)" bash -c '
    set -e; d=$(mktemp -d); mkdir -p /run/sshd
    ssh-keygen -q -t ed25519 -N "" -f $d/host; ssh-keygen -q -t ed25519 -N "" -f $d/user
    cp $d/user.pub $d/authorized_keys
    /usr/sbin/sshd -f /dev/null -o ListenAddress=127.0.0.1:2222 -o HostKey=$d/host \
        -o AuthorizedKeysFile=$d/authorized_keys -o StrictModes=no -o PidFile=$d/pid \
        -o PermitRootLogin=prohibit-password
    for i in $(seq 50); do [ -s $d/pid ] && break; sleep 0.1; done
    out=$(ssh -p 2222 -i $d/user -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o BatchMode=yes root@127.0.0.1 "zfs version | head -1" 2>/dev/null)
    kill $(cat $d/pid); rm -rf $d
    echo "$out"; case $out in zfs-2.*) ;; *) exit 1 ;; esac'

echo
if ((fails)); then echo "openzfs-vm check: $fails FAILED"; exit 1; fi
echo "openzfs-vm check: all ZFS steps passed"
