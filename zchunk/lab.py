"""The real parts zchunk is tested, demonstrated and benchmarked against.

- ``ZfsFuse`` and ``Pool``: real ZFS (zfs-fuse, pool v23) on sparse files;
- ``Sshd``: a real OpenSSH server with generated host and user keys;
- ``Wan``: network namespaces "src" and "dst" hanging off the root namespace by
  veth pairs, where the kernel makes the faults: ``tbf`` limits rate, iptables
  drops packets at random or resets a port, ``ip link set down`` unplugs the NIC.

Every class is a context manager that undoes exactly what it did: processes it
started are stopped by pid (SIGTERM, wait, SIGKILL), devices, namespaces and
firewall rules it added are deleted, files it created are removed.  Nothing
here points at an address outside loopback and the namespaces it creates: the
namespaces only get routes to each other, never a default route.

Standard library only (plus the system tools), so ``zchunk demo`` and the
benchmarks can use it without test dependencies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

ZFS_SOCKET = Path("/var/run/zfs/zfs_socket")
SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
LOCK_FILE = Path("/run/zchunk-lab.lock")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: What a remote host needs to run an agent and zfs; ``Sshd.path_without``
#: links all of these except the ones a test wants missing.
HOST_PROGRAMS = (
    "sh", "bash", "dash", "env", "cat", "mkdir", "rmdir", "rm", "mv", "cp", "ln",
    "kill", "ls", "test", "[", "true", "false", "echo", "printf", "sleep", "head",
    "tail", "dd", "stat", "mktemp", "chmod", "id", "uname", "ps", "pgrep", "nohup",
    "setsid", "timeout", "sync", "df", "du", "sha256sum", "wc", "tr", "sed", "grep",
    "awk", "xargs", "readlink", "realpath", "basename", "dirname", "touch", "date",
    "python3", "zfs", "zpool", "gzip", "zstd", "xz", "lz4", "mbuffer", "pv",
)


class LabError(Exception):
    """The lab could not build or tear down one of its real parts."""


# --------------------------------------------------------------------------- helpers


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
        **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a system tool, capture its output as text; a failure names the command."""
    try:
        proc = subprocess.run(list(argv), check=False, capture_output=True, text=True,
                              timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """Serialise setup between labs in parallel processes (daemon start, subnets)."""
    with open(LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting for its parent."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (sshd's per-connection processes and their commands)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_pids(pids: Sequence[int], grace: float = 5.0,
              child: subprocess.Popen[Any] | None = None) -> None:
    """SIGTERM ``pids``, wait up to ``grace`` seconds, SIGKILL what is left.

    ``child`` (our own Popen, if among them) is reaped so it leaves no zombie.
    """
    def signal_all(sig: int) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def reap() -> None:
        if child is not None:
            child.poll()

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap()
        if not any(pid_alive(pid) for pid in pids):
            return
        time.sleep(0.05)
    signal_all(signal.SIGKILL)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)


def netns_argv(netns: str) -> list[str]:
    """Prefix that runs a command in network namespace ``netns`` and nothing else.

    Not ``ip netns exec``: that also makes a private mount namespace, and with
    "/" private (as in containers) zfs-fuse mounts made later never show there.
    nsenter without --fork execs the command, so its pid is the command's.
    """
    return ["nsenter", f"--net=/run/netns/{netns}", "--"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for an sshd on loopback)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def lab_prerequisites() -> list[str]:
    """What this machine lacks for the lab, as sentences; empty when all is there."""
    missing = []
    if os.geteuid() != 0:
        missing.append("the lab needs root (namespaces, zfs-fuse, sshd as root)")
    tools = ("zfs-fuse", "zfs", "zpool", "sshd", "ssh", "ssh-keygen", "ip", "tc",
             "iptables", "ss", "nsenter")
    for tool in tools:
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            missing.append(f"{tool} is not installed")
    if not Path("/dev/fuse").exists():
        missing.append("/dev/fuse is missing (zfs-fuse mounts through FUSE)")
    return missing


def require_root_tools(ci: bool) -> None:
    """Raise ``LabError`` naming every missing prerequisite of the lab."""
    missing = lab_prerequisites()
    if missing:
        where = ("CI must provide them" if ci else
                 "install zfs-fuse openssh-server iproute2 iptables and run as root")
        raise LabError("; ".join(missing) + f" ({where})")


# --------------------------------------------------------------------------- zfs


def zfs_daemon_running() -> bool:
    """A zfs-fuse daemon answers on its socket (whoever started it)."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(ZFS_SOCKET))
        except OSError:
            return False
    return True


def zfs_tier() -> str:
    """Which real ZFS the tests run on: "openzfs" inside the OpenZFS VM (scripts/openzfs-vm), else "zfs-fuse"."""
    return "openzfs" if os.environ.get("OPENZFS_VM") == "1" else "zfs-fuse"


class KernelZfs:
    """The OpenZFS tier: the module is loaded by the VM; nothing to start or stop."""

    started = False
    pid = None

    def __enter__(self) -> KernelZfs:
        if run(["zfs", "version"], check=False).returncode != 0:
            raise LabError("OPENZFS_VM=1 but `zfs version` fails: not in the OpenZFS VM?")
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class ZfsFuse:
    """Ensure a zfs-fuse daemon is running; stop it at exit only if we started it.

    Only one zfs-fuse daemon can run per machine (it locks /var/lock/zfs), and
    commands find it through a socket on the filesystem, so zfs commands inside
    the network namespaces reach it too.  A daemon someone else started is used
    and left running.
    """

    def __init__(self, binary: str = "/usr/sbin/zfs-fuse", log: Path | None = None,
                 start_timeout: float = 20.0) -> None:
        self.binary = binary
        self.log = log
        self.start_timeout = start_timeout
        self.started = False
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Pid of the daemon we started, None when we use someone else's."""
        return self._proc.pid if self._proc else None

    def __enter__(self) -> Self:
        with _machine_lock():
            if zfs_daemon_running():
                return self
            self._start()
        return self

    def _start(self) -> None:
        with open(self.log or os.devnull, "ab") as log:
            # -n: stay in the foreground, so the pid we hold is the daemon's.
            self._proc = subprocess.Popen(
                [self.binary, "-n", "--no-kstat-mount"], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True)
        self.started = True
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                self.started = False
                raise LabError(f"zfs-fuse exited {code} at start (log: {self.log})")
            if zfs_daemon_running() and run(["zpool", "list"], check=False).returncode == 0:
                return
            time.sleep(0.1)
        self.stop()
        raise LabError(f"zfs-fuse did not answer within {self.start_timeout:.0f} s")

    def stop(self) -> None:
        if self._proc is not None:
            stop_pids([self._proc.pid], grace=15.0, child=self._proc)
            self._proc = None

    def __exit__(self, *exc: object) -> None:
        self.stop()


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(size: str | int) -> int:
    """``"1G"`` -> 1073741824; bytes as int pass through."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", size, re.IGNORECASE)
    if not match:
        raise LabError(f"bad size {size!r}: write e.g. 512M or 1G")
    return int(match[1]) * _SIZE_UNITS[match[2].upper()]


class Pool:
    """A zfs-fuse pool on a sparse file under ``workdir``, destroyed at exit.

    zfs-fuse answers "dataset is busy" just after a receive, so destroy retries
    for up to ``destroy_timeout`` seconds.  The file is removed only once the
    pool is gone (a failed destroy leaves it, and says so).
    """

    def __init__(self, name: str, workdir: Path, size: str = "1G",
                 mountpoint: Path | None = None, destroy_timeout: float = 90.0) -> None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.:-]*", name):
            raise LabError(f"bad pool name {name!r}")
        self.name = name
        self.workdir = Path(workdir)
        self.size = parse_size(size)
        self.file = self.workdir / f"{name}.pool"
        self.mountpoint = Path(mountpoint) if mountpoint else self.workdir / f"{name}.mnt"
        self.destroy_timeout = destroy_timeout
        self._created = False

    def __enter__(self) -> Self:
        if run(["zpool", "list", self.name], check=False).returncode == 0:
            raise LabError(f"pool {self.name} already exists; not touching it")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.file, "xb") as fh:
            fh.truncate(self.size)
        try:
            run(["zpool", "create", "-m", str(self.mountpoint), self.name, str(self.file)])
        except LabError:
            self.file.unlink()
            raise
        self._created = True
        return self

    def destroy(self) -> None:
        """``zpool destroy -f`` with retries while busy, then remove the file."""
        if not self._created:
            return
        deadline = time.monotonic() + self.destroy_timeout
        # Looked for first: a failed `zpool destroy -f` detaches the mounts, and then a process inside
        # one no longer shows where it is. Reported only if the pool stays busy.
        holders = self._holders() or "no process under the mountpoint (zfs-fuse itself)"
        while True:
            proc = run(["zpool", "destroy", "-f", self.name], check=False)
            if proc.returncode == 0 or "no such pool" in proc.stderr:
                break
            if time.monotonic() > deadline:
                raise LabError(f"zpool destroy {self.name} still failing after "
                               f"{self.destroy_timeout:.0f} s: {proc.stderr.strip()}; "
                               f"kept {self.file}; held by {holders}")
            time.sleep(0.5)
        self._created = False
        self.file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.mountpoint.rmdir()

    def _holders(self) -> str:
        """Processes whose working directory, root or open files lie under the pool's mountpoint."""
        top = str(self.mountpoint)
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            links = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
            with contextlib.suppress(OSError):
                links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
            for link in links:
                with contextlib.suppress(OSError):
                    target = os.readlink(link)
                    if target == top or target.startswith(top + "/"):
                        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as fh:
                            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")[:80].strip()
                            found.append(f"{pid} ({cmd})")
                        break
        return ", ".join(found)

    def __exit__(self, *exc: object) -> None:
        self.destroy()


# --------------------------------------------------------------------------- data


_WORDS = [
    "zfs", "pool", "snapshot", "chunk", "spool", "agent", "stream", "receive", "send",
    "resume", "token", "checksum", "link", "outage", "retry", "window", "backlog",
    "dataset", "holds", "guid", "replica", "the", "a", "of", "to", "and", "in", "on",
    "for", "with", "from", "over", "under",
]
_BLOCK = 64 * 1024


def _text_lines(rng: random.Random, count: int = 512) -> list[bytes]:
    return [(f"{i:06d} " + " ".join(rng.choices(_WORDS, k=rng.randint(4, 14))) + "\n").encode()
            for i in range(count)]


def _file_sizes(rng: random.Random, total: int) -> list[int]:
    sizes = []
    while total > 0:
        size = min(total, int(rng.choice((1, 4, 64, 512, 2048, 8192)) * 1024 * rng.uniform(0.5, 1)))
        sizes.append(size)
        total -= size
    return sizes


def write_dataset(path: Path, size_bytes: int, seed: int = 0,
                  compressible_fraction: float = 0.5) -> None:
    """Write ``size_bytes`` of deterministic files under ``path`` (same seed, same bytes).

    Every 64 KiB block is ``compressible_fraction`` text-like lines and the rest
    ``random.Random(seed).randbytes``; files of assorted sizes spread over eight
    directories, named after the seed so a second seed adds files (for
    incrementals) instead of overwriting.  Files are fsynced so a snapshot
    taken right after sees them.
    """
    if not 0.0 <= compressible_fraction <= 1.0:
        raise LabError(f"compressible_fraction {compressible_fraction} is not in [0, 1]")
    rng = random.Random(seed)
    lines = _text_lines(rng)
    for index, size in enumerate(_file_sizes(rng, size_bytes)):
        target = Path(path) / f"d{index % 8}" / f"s{seed}-{index:05d}.dat"
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            left = size
            while left > 0:
                block = min(left, _BLOCK)
                text_len = int(block * compressible_fraction)
                text = b"".join(rng.choices(lines, k=text_len // 40 + 1))[:text_len]
                fh.write(text + rng.randbytes(block - text_len))
                left -= block
            fh.flush()
            os.fsync(fh.fileno())


def tree_digest(path: Path) -> str:
    """sha256 over relative names and contents of all regular files, sorted by name.

    Symlinks, directories and zfs-fuse's ``.zfs`` are not part of the digest;
    each file is framed by its name and length so moved bytes change it.
    """
    root = Path(path)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".zfs"]
        for name in filenames:
            full = Path(dirpath) / name
            if full.is_file() and not full.is_symlink():
                files.append(full.relative_to(root).as_posix())
    digest = hashlib.sha256()
    for rel in sorted(files):
        full = root / rel
        digest.update(rel.encode() + b"\0" + full.stat().st_size.to_bytes(8, "big"))
        with open(full, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- ssh


def snapshot_digest(snapshot: str) -> str:
    """tree_digest of a snapshot's files, read through a temporary clone mounted in a fresh directory.

    Not the dataset's mountpoint: replicas stay unmounted, zfs-fuse cannot overlay-mount over child
    mountpoint directories, and after a rollback and receive zfs-fuse's mount can show stale files.
    """
    pool = snapshot.split("/", 1)[0].split("@", 1)[0]
    clone = f"{pool}/zchunk-test-view-{os.getpid()}"
    where = Path(tempfile.mkdtemp(prefix="zchunk-view-"))
    run(["zfs", "clone", "-o", f"mountpoint={where}", snapshot, clone])
    try:
        return tree_digest(where)
    finally:
        for _ in range(30):
            if run(["zfs", "destroy", clone], check=False).returncode == 0:
                break
            time.sleep(1)
        with contextlib.suppress(OSError):
            where.rmdir()


def _keygen(path: Path, comment: str) -> str:
    """Generate an ed25519 key pair without passphrase; return the public line."""
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return path.with_suffix(".pub").read_text().strip()


def _account_locked(user: str) -> bool:
    """With UsePAM no, sshd refuses accounts whose password starts with '!'."""
    with contextlib.suppress(OSError):
        for line in Path("/etc/shadow").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user:
                return fields[1].startswith("!")
    return False


class Sshd:
    """A real sshd (as a child process) with generated host and user keys.

    Sessions run as root with HOME set to ``workdir/home`` (a fresh host's
    environment, not this machine's dotfiles). Files live in ``workdir``:
    ``ssh_config`` has a ``Host <alias>`` entry that needs nothing else
    (``ssh -F ssh_config alias cmd``); ``add_key`` adds more keys, each with
    its own alias ``<alias>-<name>`` so ssh offers only that key.
    ``extra_config`` goes first in sshd_config: sshd keeps the first value it
    reads for a keyword, so it overrides the defaults below (a ``Match`` block
    in it is moved to the end, where sshd needs it).
    """

    def __init__(self, workdir: Path, netns: str | None = None, listen: str = "127.0.0.1",
                 port: int = 2222, extra_config: str = "", alias: str = "lab",
                 start_timeout: float = 10.0) -> None:
        self.workdir = Path(workdir)
        self.netns = netns
        self.host = listen
        self.port = port
        self.alias = alias
        self.extra_config = extra_config
        self.start_timeout = start_timeout
        self.user_key = self.workdir / "id_root"
        self.host_key = self.workdir / "host_ed25519"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.known_hosts = self.workdir / "known_hosts"
        self.ssh_config = self.workdir / "ssh_config"
        self.sshd_config = self.workdir / "sshd_config"
        self.log = self.workdir / "sshd.log"
        self.pidfile = self.workdir / "sshd.pid"
        self.home = self.workdir / "home"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def host_pattern(self) -> str:
        """How known_hosts names this server (OpenSSH and asyncssh agree)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def __enter__(self) -> Self:
        if _account_locked("root"):
            raise LabError("root's password field starts with '!': sshd with UsePAM no "
                           "refuses it as locked; set it to '*' (usermod -p '*' root)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        self.home.mkdir(mode=0o700, exist_ok=True)
        host_pub = _keygen(self.host_key, "zchunk-lab-host")
        self.authorized_keys.write_text(
            self._authorized_line(_keygen(self.user_key, "zchunk-lab-root"), ""))
        kind, blob = host_pub.split()[:2]
        self.known_hosts.write_text(f"{self.host_pattern} {kind} {blob}\n")
        self.ssh_config.write_text(self._client_block(self.alias, self.user_key))
        self.sshd_config.write_text(self._server_config())
        self._start()
        return self

    def _server_config(self) -> str:
        extra, match = self.extra_config, ""
        if (found := re.search(r"(?im)^\s*Match\s", extra)) is not None:
            extra, match = extra[:found.start()], extra[found.start():]
        return f"""{extra}
ListenAddress {self.host}
Port {self.port}
HostKey {self.host_key}
PidFile {self.pidfile}
AuthorizedKeysFile {self.authorized_keys}
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
PermitUserEnvironment yes
LogLevel VERBOSE
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
MaxSessions 64
MaxStartups 64:30:128
Subsystem sftp internal-sftp
{match}"""

    def _client_block(self, alias: str, key: Path) -> str:
        return f"""Host {alias}
    HostName {self.host}
    Port {self.port}
    User root
    IdentityFile {key}
    IdentitiesOnly yes
    UserKnownHostsFile {self.known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 5
    LogLevel ERROR

"""

    def _start(self) -> None:
        argv = [SSHD, "-D", "-e", "-f", str(self.sshd_config), "-E", str(self.log)]
        if self.netns:
            argv = [*netns_argv(self.netns), *argv]
        self.pidfile.unlink(missing_ok=True)
        with open(self.workdir / "sshd.stderr", "wb") as err:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err,
                                          stderr=err, start_new_session=True)
        # sshd writes its PidFile after it bound the listening socket.
        deadline = time.monotonic() + self.start_timeout
        while not self.pidfile.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise LabError(f"sshd did not start on {self.host}:{self.port}"
                               f" (netns {self.netns}): {self._log_tail()}")
            time.sleep(0.02)

    def _log_tail(self) -> str:
        text = ""
        for path in (self.workdir / "sshd.stderr", self.log):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-8:])

    def add_key(self, name: str, options: str = "") -> Path:
        """Another root key, restricted by authorized_keys ``options``; its alias
        in ssh_config is ``key_alias(name)``.  Returns the private key path."""
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise LabError(f"bad key name {name!r}")
        key = self.workdir / f"id_{name}"
        pub = _keygen(key, f"zchunk-lab-{name}")
        with open(self.authorized_keys, "a") as fh:
            fh.write(self._authorized_line(pub, options))
        with open(self.ssh_config, "a") as fh:
            fh.write(self._client_block(self.key_alias(name), key))
        return key

    def _authorized_line(self, pub: str, options: str) -> str:
        # HOME points at a lab directory so the machine's own ~root/.bashrc (which
        # Debian's bash sources for ssh commands) cannot rewrite PATH.
        if "HOME=" not in options:
            options = ",".join(filter(None, [f'environment="HOME={self.home}"', options]))
        return f"{options} {pub}\n"

    def key_alias(self, name: str) -> str:
        return f"{self.alias}-{name}"

    def ssh_argv(self, *command: str, alias: str | None = None) -> list[str]:
        """``ssh -F ssh_config alias command...`` for subprocess."""
        return ["ssh", "-F", str(self.ssh_config), alias or self.alias, *command]

    def path_without(self, *programs: str) -> Path:
        """A directory of symlinks to ``HOST_PROGRAMS`` except ``programs``, to use as
        PATH (``add_key(options='environment="PATH=..."')``) for a host missing them."""
        label = "-".join(re.sub(r"[^A-Za-z0-9_.]", "_", p) for p in programs) or "nothing"
        directory = self.workdir / f"path-without-{label}"
        directory.mkdir(exist_ok=True)
        for name in HOST_PROGRAMS:
            found = shutil.which(name, path=SYSTEM_PATH)
            link = directory / name
            if name in programs or found is None or link.is_symlink():
                continue
            link.symlink_to(found)
        return directory

    def stop(self) -> None:
        """Stop the listener and every session process below it, by pid."""
        if self._proc is None:
            return
        pids = [self._proc.pid, *descendants(self._proc.pid)]
        stop_pids(pids, child=self._proc)
        self._proc = None

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- wan


@dataclass
class _Link:
    """One namespace and the veth pair that joins it to the root namespace."""

    ns: str
    root_dev: str
    root_addr: str
    ns_addr: str
    other_net: str  # the subnet of the other namespace, routed via the root side
    ns_dev: str = "wan0"


class Wan:
    """Root namespace <-> namespaces "src" and "dst", each over a veth pair.

    Routes let src and dst reach each other through the root namespace (for a
    coordinator running inside src); forwarding is enabled on the two root-side
    veths only, not machine-wide, and neither namespace gets a default route.
    Names carry our pid and a counter so parallel labs don't clash; when the
    default subnets 10.231.1.0/24 and 10.231.2.0/24 are taken by another lab,
    the next free pair (10.231.3/4, ...) is used.
    """

    _counter = 0

    def __init__(self, prefix: str = "zc") -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,3}", prefix):
            raise LabError(f"bad prefix {prefix!r}: 1-4 lowercase letters/digits")
        Wan._counter += 1
        self.tag = f"{prefix}{os.getpid():x}n{Wan._counter}"
        self._links: dict[str, _Link] = {}
        self._forward_rules: list[list[str]] = []
        self._ns_rules: dict[tuple[str, str], list[tuple[str, list[str]]]] = {}
        self._lock = threading.Lock()

    # -- addresses and names
    def _link(self, side: str) -> _Link:
        if side not in self._links:
            raise LabError(f"ns_side must be 'src' or 'dst', not {side!r}")
        return self._links[side]

    @property
    def src_ns(self) -> str:
        return self._link("src").ns

    @property
    def dst_ns(self) -> str:
        return self._link("dst").ns

    @property
    def src_addr(self) -> str:
        return self._link("src").ns_addr

    @property
    def dst_addr(self) -> str:
        return self._link("dst").ns_addr

    def gateway(self, side: str) -> str:
        """The root namespace's address on that side's link."""
        return self._link(side).root_addr

    def ns(self, side: str) -> str:
        return self._link(side).ns

    def addr(self, side: str) -> str:
        return self._link(side).ns_addr

    @staticmethod
    def _free_subnet_pair() -> int:
        used = run(["ip", "-4", "route", "show"]).stdout
        for base in range(1, 250, 2):
            if f"10.231.{base}.0/24" not in used and f"10.231.{base + 1}.0/24" not in used:
                return base
        raise LabError("no free 10.231.x.0/24 subnet pair for a new lab")

    # -- setup and teardown
    def __enter__(self) -> Self:
        with _machine_lock():
            base = self._free_subnet_pair()
            nets = {"src": base, "dst": base + 1}
            for side, other in (("src", "dst"), ("dst", "src")):
                n = nets[side]
                self._links[side] = _Link(
                    ns=f"{self.tag}-{side}", root_dev=f"{self.tag}{side[0]}",
                    root_addr=f"10.231.{n}.1", ns_addr=f"10.231.{n}.2",
                    other_net=f"10.231.{nets[other]}.0/24")
            try:
                for link in self._links.values():
                    self._build(link)
                src, dst = self._links["src"].root_dev, self._links["dst"].root_dev
                for a, b in ((src, dst), (dst, src)):
                    rule = ["FORWARD", "-i", a, "-o", b, "-m", "comment", "--comment",
                            f"zchunk-lab {self.tag}", "-j", "ACCEPT"]
                    run(["iptables", "-I", *rule])
                    self._forward_rules.append(rule)
            except BaseException:
                self._teardown()
                raise
        return self

    def _build(self, link: _Link) -> None:
        ns = ["ip", "-n", link.ns]
        run(["ip", "netns", "add", link.ns])
        run(["ip", "link", "add", link.root_dev, "type", "veth",
             "peer", "name", link.ns_dev, "netns", link.ns])
        run(["ip", "addr", "add", f"{link.root_addr}/24", "dev", link.root_dev])
        run(["ip", "link", "set", link.root_dev, "up"])
        # IPv4 forwards what arrives on an interface with forwarding on: no global ip_forward.
        Path(f"/proc/sys/net/ipv4/conf/{link.root_dev}/forwarding").write_text("1\n")
        run([*ns, "link", "set", "lo", "up"])
        run([*ns, "addr", "add", f"{link.ns_addr}/24", "dev", link.ns_dev])
        self._link_up(link)

    def _link_up(self, link: _Link) -> None:
        ns = ["ip", "-n", link.ns]
        run([*ns, "link", "set", link.ns_dev, "up"])
        # Link down drops routes through the device; put ours back.
        run([*ns, "route", "replace", link.other_net, "via", link.root_addr])

    def _teardown(self) -> list[str]:
        errors = []
        for link in self._links.values():
            pids = run(["ip", "netns", "pids", link.ns], check=False).stdout.split()
            if pids:  # whatever a test left running inside the namespace
                stop_pids([int(p) for p in pids])
            for argv in (["ip", "link", "del", link.root_dev], ["ip", "netns", "del", link.ns]):
                proc = run(argv, check=False)
                if proc.returncode != 0 and "Cannot find" not in proc.stderr \
                        and "No such file" not in proc.stderr:
                    errors.append(f"{' '.join(argv)}: {proc.stderr.strip()}")
        for rule in self._forward_rules:
            proc = run(["iptables", "-D", *rule], check=False)
            if proc.returncode != 0:
                errors.append(f"iptables -D {' '.join(rule)}: {proc.stderr.strip()}")
        self._forward_rules.clear()
        return errors

    def __exit__(self, *exc: object) -> None:
        errors = self._teardown()
        if errors:
            raise LabError("lab teardown: " + "; ".join(errors))

    # -- running things inside
    def ns_argv(self, ns_side: str, argv: Sequence[str]) -> list[str]:
        return [*netns_argv(self._link(ns_side).ns), *argv]

    def run_in(self, ns_side: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` of ``argv`` inside that namespace (kw as for subprocess.run)."""
        kw.setdefault("check", False)
        return subprocess.run(self.ns_argv(ns_side, argv), **kw)  # noqa: PLW1510

    # -- faults
    def rate(self, ns_side: str, mbit: float | None) -> None:
        """Token bucket at ``mbit`` on both directions of that link; None removes it."""
        link = self._link(ns_side)
        for tc in (["tc"], ["tc", "-n", link.ns]):
            dev = link.root_dev if len(tc) == 1 else link.ns_dev
            if mbit is None:
                run([*tc, "qdisc", "del", "dev", dev, "root"], check=False)
                continue
            if mbit <= 0:
                raise LabError(f"rate must be positive, not {mbit}")
            bytes_per_s = mbit * 1e6 / 8
            burst = max(16 * 1024, int(bytes_per_s / 100))  # 10 ms worth, at least 16 KiB
            run([*tc, "qdisc", "replace", "dev", dev, "root", "tbf",
                 "rate", f"{int(mbit * 1000)}kbit", "burst", str(burst), "latency", "50ms"])

    def _set_rules(self, ns_side: str, kind: str, rules: list[tuple[str, list[str]]],
                   keep: bool = False) -> None:
        """Put ``rules`` in place as this kind of iptables rules in that namespace,
        after removing the earlier ones of that kind unless ``keep``."""
        ipt = [*netns_argv(self._link(ns_side).ns), "iptables"]
        with self._lock:
            present = self._ns_rules.setdefault((ns_side, kind), [])
            if not keep:
                for chain, spec in present:
                    run([*ipt, "-D", chain, *spec], check=False)
                present.clear()
            for chain, spec in rules:
                run([*ipt, "-I", chain, *spec])
                present.append((chain, spec))

    def loss(self, ns_side: str, percent: float | None) -> None:
        """Drop ``percent`` of the packets entering and, independently, leaving that
        namespace's WAN interface (iptables statistic); None removes."""
        if percent is None:
            self._set_rules(ns_side, "loss", [])
            return
        if not 0 <= percent <= 100:
            raise LabError(f"loss must be 0..100 %, not {percent}")
        dev = self._link(ns_side).ns_dev
        stat = ["-m", "statistic", "--mode", "random", "--probability", f"{percent / 100:.6f}",
                "-j", "DROP"]
        self._set_rules(ns_side, "loss", [("INPUT", ["-i", dev, *stat]),
                                          ("OUTPUT", ["-o", dev, *stat])])

    def reset_port(self, ns_side: str, port: int, on: bool) -> None:
        """While on, tcp ``port`` in that namespace answers every packet with a reset,
        as a middlebox dropping the connection would: servers there and clients
        there connecting out to ``port``, new and established connections alike.

        An idle established connection sends nothing to be reset, so on also
        destroys the existing sockets (``ss -K``), which sends their peers a RST.
        """
        if not on:
            self._set_rules(ns_side, f"reset:{port}", [])
            return
        dev = self._link(ns_side).ns_dev
        reset = ["-p", "tcp", "--dport", str(port), "-j", "REJECT", "--reject-with", "tcp-reset"]
        inbound = ("INPUT", ["-i", dev, *reset])
        outbound = ("OUTPUT", ["-o", dev, *reset])
        self._set_rules(ns_side, f"reset:{port}", [inbound])
        self._kill_sockets(ns_side, port)  # before the OUTPUT rule, which would eat our RSTs
        self._set_rules(ns_side, f"reset:{port}", [outbound], keep=True)
        self._kill_sockets(ns_side, port)

    def _kill_sockets(self, ns_side: str, port: int) -> None:
        link = self._link(ns_side)
        run([*netns_argv(link.ns), "ss", "-K", "-t", "-n",
             f"( sport = :{port} or dport = :{port} )"], check=False)

    def outage(self, ns_side: str, port: int, seconds: float) -> None:
        """Reset ``port`` for ``seconds`` (blocking; tests call it from a thread)."""
        self.reset_port(ns_side, port, True)
        try:
            time.sleep(seconds)
        finally:
            self.reset_port(ns_side, port, False)

    def unplug(self, ns_side: str, seconds: float) -> None:
        """Take that namespace's NIC down for ``seconds`` (blocking); packets vanish,
        nobody gets a reset.  Routes through the NIC are restored afterwards."""
        link = self._link(ns_side)
        run(["ip", "-n", link.ns, "link", "set", link.ns_dev, "down"])
        try:
            time.sleep(seconds)
        finally:
            self._link_up(link)
