"""Every error a user can see. Each class's docstring is its message template.

Only the CLI turns these into text and an exit code (``docs/errors.md`` is
generated from this module by ``python -m zchunk.errors``). Errors from an
agent arrive as ``{code, reason, details}`` and are rebuilt by ``from_remote``:
each class an agent's code maps to fixes that code (``remote_code``), so callers
catch by class and never compare codes or search messages. A daemon that
failed says so in its state file, and ``from_daemon`` rebuilds that the same way.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any


class ZchunkError(Exception):
    """{reason}"""

    exit_code = 1
    fix = ""
    #: The agent's error code this class is rebuilt from (``from_remote``), if any.
    remote_code = ""

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        template = (type(self).__doc__ or "{reason}").strip().splitlines()[0]
        try:
            text = template.format(**fields)
        except (KeyError, IndexError):
            text = f"{template} {fields}"
        super().__init__(text)

    @property
    def message(self) -> str:
        return str(self)

    @property
    def hint(self) -> str:
        return self.fix.format(**self.fields) if self.fix else ""


class UsageError(ZchunkError):
    """{reason}"""

    exit_code = 2


class BadDatasetName(ZchunkError):
    """invalid dataset name {name!r}: {reason}"""

    exit_code = 2
    fix = "ZFS names use letters, digits and _ - . : space; write pool/dataset or [user@]host:pool/dataset"


class UnknownDataset(ZchunkError):
    """{host}: dataset {dataset} does not exist"""

    exit_code = 3
    fix = "check the name with `zfs list -r {dataset_parent}` on {host}"


class SourceGone(ZchunkError):
    """{source} does not exist any more; its replica {target} is left as it is"""

    exit_code = 3
    fix = ("if it was destroyed on purpose, move the replica out of the way of a future dataset of that name: "
           "zchunk resync {source} {target} --rename-target NEW --yes")


class NoSnapshot(ZchunkError):
    """{host}: {dataset} has no snapshot to send"""

    exit_code = 3
    fix = "take one first: zfs snapshot {dataset}@NAME"


class NoCommonSnapshot(ZchunkError):
    """{target} exists but shares no snapshot with {source} (matched by guid)"""

    exit_code = 4
    fix = ("nothing was changed. To re-seed, rename or destroy the target yourself "
           "(zfs rename {target_ds} {target_ds}.old) and run the same command again")


class ReseedNeeded(ZchunkError):
    """{target} shares no snapshot with {source}: the repair is a full re-seed"""

    exit_code = 4
    fix = "nothing was changed; its plan: zchunk resync {source} {target} --reseed; to do it: --reseed --yes"


class TargetDiverged(ZchunkError):
    """{target} has changed since the common snapshot {common}: {reason}"""

    exit_code = 4
    fix = "nothing was changed. Inspect the target; `zfs rollback -r {common_full}` on the target discards its changes"


class TypeMismatch(ZchunkError):
    """{source} is a {source_type} but {target} is a {target_type}"""

    exit_code = 4
    fix = "pick a target of the same type or a new name"


class UpToDate(ZchunkError):
    """{target} already has {snapshot}: nothing to send"""

    exit_code = 0


class StreamIncompatible(ZchunkError):
    """{target} ({target_zfs}) cannot receive {source}: its stream would carry feature {feature} ({flag}: {why})"""

    exit_code = 4
    fix = ("nothing was changed. {target} knows filesystem (ZPL) versions up to {zpl_max}, pool version "
           "{pool_version}; replicate {source} to an OpenZFS target instead (legacy ZFS receives only streams "
           "without feature flags, e.g. back from a replica it once sent itself)")


class RootObjectIncompatible(ZchunkError):
    """{target} could not read {source} once received: it was made by OpenZFS, its root is object {root}, not 3"""

    exit_code = 4
    fix = ("nothing was changed. zfs-fuse can only read filesystems whose root directory is object 3 (those legacy "
           "ZFS created, and their OpenZFS replicas; never one OpenZFS created, also not with -o version=4), and "
           "zchunk treats every {target_zfs} alike. {source}'s root was read from {how}. Replicate it to an "
           "OpenZFS target, or copy its files into a filesystem created by {target}'s own zfs")


class RootObjectUnknown(ZchunkError):
    """cannot tell whether {target} ({target_zfs}) could read {source} once received: {reason}"""

    exit_code = 4
    fix = ("nothing was changed. zfs-fuse/legacy ZFS can only read filesystems whose root directory is object 3; "
           "zchunk learns it from the mounted filesystem's root inode or from zdb. Mount it (`zfs mount {dataset}` "
           "on {host}) or run zchunk as a user who can read the pool's devices there, then run again")


class RawNeedsEncryption(ZchunkError):
    """{source} is encrypted and is sent raw, but {target} runs {target_zfs}, which has no encryption"""

    exit_code = 4
    fix = ("nothing was changed. Replicate to an OpenZFS target to keep the replica encrypted with the source's "
           "keys, or pass --no-raw to send it decrypted (the replica is then unencrypted; the source's key must be "
           "loaded)")


class SourceKeyNotLoaded(ZchunkError):
    """{source} is encrypted and its key is not loaded: --no-raw cannot send it decrypted"""

    exit_code = 4
    fix = ("nothing was changed. Load the key on the source (zfs load-key {root}), or leave out --no-raw: a raw "
           "send needs no key and keeps the replica encrypted")


class TargetKeyNotLoaded(ZchunkError):
    """{target} {why}, and the key of {root} is not loaded there"""

    exit_code = 4
    fix = ("nothing was changed. Load it on the target (zfs load-key {root}) for this run, or {instead}")


class RawOntoUnencrypted(ZchunkError):
    """{target} is an unencrypted replica: the raw stream of encrypted {source} cannot go onto it"""

    exit_code = 4
    fix = ("nothing was changed. Keep sending it decrypted with --no-raw (as the replica was made), or re-seed a raw "
           "replica under a new name (zfs rename the old one away first)")


class HostUnreachable(ZchunkError):
    """cannot reach {host}: {reason}"""

    exit_code = 5
    fix = "check the host name, port and network; zchunk retries for --patience once a session has started"


class HostKeyError(ZchunkError):
    """{host}: host key verification failed: {reason}"""

    exit_code = 5
    fix = ("if the key is known to be right, add it: ssh-keyscan -p {port} {hostname} >> ~/.ssh/known_hosts, "
           "or pass -o StrictHostKeyChecking=accept-new")


class AuthError(ZchunkError):
    """{host}: SSH authentication failed for user {user}: {reason}"""

    exit_code = 5
    fix = "give a key with --ssh-key or an IdentityFile in --ssh-config; zchunk never prompts for passwords"


class MissingPython(ZchunkError):
    """{host}: python3 not found (the zchunk agent needs python3 >= 3.9)"""

    exit_code = 6
    fix = "install it on {host}: apt-get install python3 (Debian/Proxmox)"


class OldPython(ZchunkError):
    """{host}: python3 is {version}, the zchunk agent needs >= 3.9"""

    exit_code = 6
    fix = "install a newer python3 on {host}"


class MissingZfs(ZchunkError):
    """{host}: zfs command not found"""

    exit_code = 6
    fix = "install ZFS on {host} (apt-get install zfsutils-linux) or put zfs on the PATH of the SSH user"


class PermissionDenied(ZchunkError):
    """{host}: not allowed to {action} {dataset}: {reason}"""

    exit_code = 7
    fix = "run as root or delegate: zfs allow -u {user} {perms} {dataset}"


class SessionDirError(ZchunkError):
    """{host}: unsafe session directory: {reason}"""

    exit_code = 8
    remote_code = "session-dir"
    fix = "remove or fix it by hand (it must be owned by the SSH user, mode 0700), or pick --spool-dir"


class SessionNotFound(ZchunkError):
    """no session {session} in {state_dir}"""

    exit_code = 9
    fix = "list sessions with: zchunk sessions"


class AlreadyRunning(ZchunkError):
    """{target} is already being replicated by session {session} (pid {pid} on {host})"""

    exit_code = 9
    fix = "wait for it, or stop it with: zchunk abort {session}"


class TargetLocked(ZchunkError):
    """{target} is locked against replication: {lock}"""

    exit_code = 9
    fix = "it was failed over to (zchunk:locked); end that first, or clear it: zfs inherit zchunk:locked {target}"


class ProtocolError(ZchunkError):
    """{host}: protocol error talking to the agent: {reason}"""

    exit_code = 10
    remote_code = "protocol"


class CapabilityMismatch(ZchunkError):
    """no common {what}: coordinator offers {ours}, {host} agent offers {theirs}"""

    exit_code = 10


class PatienceExhausted(ZchunkError):
    """no progress for {waited} (patience {patience}): {reason}"""

    exit_code = 11
    fix = "the agents are still there; continue later with: zchunk resume {session}"


class ZfsSendFailed(ZchunkError):
    """{host}: zfs send failed (status {status}): {stderr}"""

    exit_code = 12


class ZfsReceiveFailed(ZchunkError):
    """{host}: zfs receive failed (status {status}): {stderr}"""

    exit_code = 12


class TargetFull(ZchunkError):
    """{host}: no space to receive {dataset}: the stream needs about {needed}, {where} has {free} free ({stderr})"""

    exit_code = 12
    fix = ("free space on {where} (or grow its pool), then run the same command again; the source is untouched and "
           "zfs discarded the partial receive (or kept it resumable, where zfs has resume tokens)")


class AgentDied(ZchunkError):
    """{host}: the {role} agent of session {session} is gone ({state})"""

    exit_code = 12
    fix = "nothing on the target was changed by the partial stream; abort it (zchunk abort {session}) and run again"


class IntegrityError(ZchunkError):
    """integrity check failed: {reason}"""

    exit_code = 13


class StreamChecksumMismatch(IntegrityError):
    """integrity check failed: {host}: {reason}"""

    exit_code = 13
    remote_code = "stream-checksum"


class RemoteError(ZchunkError):
    """{host}: agent error [{code}]: {reason}"""

    exit_code = 14


class SpoolFull(RemoteError):
    """{host}: the spool filesystem is full: {reason}"""

    exit_code = 14
    remote_code = "spool-no-space"  # the engine waits for room itself; elsewhere (e.g. at install) it is final
    fix = ("free space under the spool directory on {host} (or give --spool-dir on a larger filesystem), "
           "then run the same command again")


class ChunkCorrupt(RemoteError):
    """{host}: a chunk arrived damaged: {reason}"""

    exit_code = 14
    remote_code = "chunk-corrupt"  # the engine moves it again


class NoChunk(RemoteError):
    """{host}: no such chunk: {reason}"""

    exit_code = 14
    remote_code = "no-chunk"  # the engine takes it for consumed and released: the next status shows it


class CommandFailed(ZchunkError):
    """{host}: `{command}` failed (status {status}): {stderr}"""

    exit_code = 14


class CommandHung(ZchunkError):
    """{host}: `{command}` did not finish in {seconds} s, though the host answers other commands"""

    exit_code = 14
    fix = ("see what it waits on there (ps -o pid,stat,wchan:20,args -C zfs); a zfs command that never returns "
           "is zfs's own hang (zfs-fuse can lose a mount made beside another: docs/reliability.md)")


class PartialFailure(ZchunkError):
    """{failed} of {total} {what} failed: {names}"""

    exit_code = 15
    fix = "the others were replicated; fix the errors above and run the same command again"


class HistoryError(ZchunkError):
    """run history {path}: could not {what}: {why}"""

    exit_code = 17
    fix = "make room or fix the state directory (--state-dir); the runs recorded so far are intact"


class HookFailed(ZchunkError):
    """{which} command `{command}` failed: {why}"""

    exit_code = 18
    fix = "a failing pre-snapshot command skips the run: nothing was snapshotted or sent; fix the command " \
          "(it runs without a shell, as zchunk's user) and run again"


class SeedIncomplete(ZchunkError):
    """seed {seed}: volume(s) {need} of {count} not here yet (staged so far: {staged}, in {where})"""

    exit_code = 19
    fix = "mount the missing volume(s) and run zchunk seed import again with their directories (staged " \
          "volumes need not be given again), or add --wait to wait for them; nothing reached zfs receive"


class SeedDiskFull(ZchunkError):
    """{dir}: no room for the seed: {why}"""

    exit_code = 20
    fix = ("the chunks written are kept: make room there, or copy {dir} to a larger disk and export into the "
           "copy; the same command then goes on from the last whole chunk")


class LeftBehind(ZchunkError):
    """{host}: left behind by the other targets of the fan-out (session {session}): {reason}"""

    exit_code = 21
    fix = ("the other targets were replicated; once {host} is reachable, the next run continues it from its own "
           "common snapshot (held on the source under its own tag)")


class ConfigError(ZchunkError):
    """{path}: {count} problem(s) in the configuration, the first: {first}"""

    exit_code = 16
    fix = "`zchunk config check --config {path}` lists every one with its line; nothing was run"


def _error_classes() -> list[type[ZchunkError]]:
    return [c for _, c in inspect.getmembers(sys.modules[__name__], inspect.isclass) if issubclass(c, ZchunkError)]


def from_remote(host: str, err: Any) -> ZchunkError:
    """Rebuild an agent's ``{code, reason, details}`` into our error classes.

    Anything malformed still becomes a ``RemoteError``: an odd or newer agent
    must never crash the coordinator's error handling.
    """
    if not isinstance(err, dict):
        return RemoteError(host=host, code="malformed-error", reason=repr(err)[:500], details={})
    code = str(err.get("code", "unknown"))
    reason = str(err.get("reason", "no reason given"))
    details = err.get("details")
    details = dict(details) if isinstance(details, dict) else ({"value": details} if details else {})
    cls = _REMOTE_CODES.get(code, RemoteError)
    return cls(host=host, code=code, reason=reason, details=details)


def from_daemon(host: str, role: str, state: dict[str, Any]) -> ZchunkError:
    """A daemon's ``failed`` state file as an error: by its ``code`` when it gave one (``from_remote``'s
    table), else zfs send or zfs receive failed, with the zfs command's exit status and stderr."""
    reason = str(state.get("reason") or "")
    code = str(state.get("code") or "")
    if code in _REMOTE_CODES:
        return _REMOTE_CODES[code](host=host, code=code, reason=reason, details={})
    stderr = state.get("zfs_stderr") or reason
    if role == "send":
        return ZfsSendFailed(host=host, status=state.get("zfs_exit"), stderr=stderr)
    return ZfsReceiveFailed(host=host, status=state.get("zfs_exit"), stderr=stderr)


def error_table() -> str:
    """Markdown table of every error class, for docs/errors.md."""
    rows = ["| exit | error | message |", "|---:|---|---|"]
    for cls in sorted(_error_classes(), key=lambda c: (c.exit_code, c.__name__)):
        msg = (cls.__doc__ or "").strip().splitlines()[0]
        rows.append(f"| {cls.exit_code} | {cls.__name__} | {msg} |")
    return "\n".join(rows) + "\n"


#: An agent's error code -> the class it is rebuilt as (each class fixes its own code).
_REMOTE_CODES: dict[str, type[ZchunkError]] = {c.remote_code: c for c in _error_classes() if c.remote_code}


if __name__ == "__main__":
    print("# zchunk errors and exit codes\n\nGenerated by `python -m zchunk.errors`.\n")
    print(error_table())
