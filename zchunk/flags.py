"""What zchunk adds to ``zfs send`` and ``zfs receive``, and what a user may add.

zchunk picks the stream's flags itself, from both hosts' zfs and the source's encryption:

- ``-L -e`` where both hosts run OpenZFS (large blocks whole, embedded data). Once a replica has
  received ``-L`` every later incremental must carry it too (OpenZFS refuses otherwise), so it is
  always sent where possible, never only sometimes. A legacy zfs (zfs-fuse) on either side gets
  plain streams (``compat.py``).
- Not ``-c`` (blocks as stored) unless asked (``--send-option -c``): zchunk compresses the plain
  stream in 32 MiB chunks, which beats the dataset's own per-record compression on the wire, by
  2.9x for text on lz4, 17-25 % on zstd and gzip datasets, and costs nothing on incompressible data
  (benchmarks/README.md, "Send flags and chunks stored as they are"). ``-c`` keeps the source's
  on-disk compression on the replica and saves decompressing on the source: worth it on a fast LAN.
- ``-w`` (raw) for an encrypted source unless ``--no-raw``: the replica keeps the source's keys and
  the target never needs them; raw incrementals cannot go onto an unencrypted replica, and plain ones
  cannot go onto a raw replica whose key is not loaded: both are refused before anything changes.

``--send-option`` / ``--recv-option`` pass more through an allowlist (as syncoid's ``--sendoptions`` and
``--recvoptions``); anything that changes which stream is sent or where it lands (``-R``, ``-I``, ``-F``,
``-d``...) is refused, naming the zchunk option that does it instead. Pure logic: no host is asked.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from . import errors as E
from .zfs import Encryption, Features

#: send options a user may add: option -> the short flag passed to zfs send.
SEND_OPTIONS = {
    "-L": "-L", "--large-block": "-L", "-e": "-e", "--embed": "-e", "-c": "-c", "--compressed": "-c",
    "-w": "-w", "--raw": "-w", "-h": "-h", "--holds": "-h",
}
#: send options refused, and why (what zchunk does instead).
REFUSED_SEND = {
    "-R": "it sends a whole tree as one stream; use -r, which replicates each dataset as its own resumable session",
    "-p": "it sets properties behind zchunk's back (mountpoint, canmount); use --preserve-properties",
    "-b": "it only matters with -p; use --preserve-properties",
    "-i": "zchunk picks the incremental base (the newest common snapshot)",
    "-I": "zchunk picks the incremental base; --no-stream sends -i",
    "-t": "zchunk resumes from the target's token itself",
    "-D": "deduplicated streams are deprecated and unsupported by current OpenZFS",
    "-n": "zchunk estimates with -nP itself; use --dry-run",
    "-P": "it changes what zfs send prints",
    "-v": "it changes what zfs send prints",
    "-V": "it changes what zfs send prints",
    "-S": "--saved streams are resumed by zchunk from the target's token",
}
#: receive options refused, and why.
REFUSED_RECV = {
    "-F": "zchunk rolls back only with --rollback and destroys only with --force-delete, after saying what goes",
    "-d": "it changes where the stream lands; name the target dataset instead",
    "-e": "it changes where the stream lands; name the target dataset instead",
    "-u": "zchunk always receives unmounted where zfs can",
    "-s": "zchunk keeps resume tokens where zfs can",
    "-n": "use --dry-run",
    "-v": "it changes what zfs receive prints",
    "-A": "zchunk aborts partial receives itself when their token is stale",
    "-M": "it forces an unmount behind zchunk's back",
    "-h": "it drops holds sent with -h; leave out --send-option -h instead",
    "-c": "corrective (healing) receives are not replication",
}
#: properties a raw stream brings with it: setting or excluding them on receive is refused by zfs.
KEY_PROPERTIES = frozenset({"encryption", "keyformat", "pbkdf2iters"})


@dataclass(frozen=True)
class ReceiveProperties:
    """``receive -o`` and ``-x`` a user asked for (--recv-option, --set-property, --exclude-property)."""

    set: tuple[tuple[str, str], ...] = ()
    excluded: tuple[str, ...] = ()

    def merge(self, preserved: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """The properties to set on the replica: the preserved ones less the excluded, then the set ones."""
        props = {k: v for k, v in preserved if k not in self.excluded}
        props.update(self.set)
        return tuple(sorted(props.items()))


@dataclass(frozen=True)
class StreamOptions:
    """What the user said about the stream's flags, checked."""

    raw: bool = True
    send: tuple[str, ...] = ()
    receive: ReceiveProperties = field(default_factory=ReceiveProperties)


def parse_send_options(values: list[str]) -> tuple[str, ...]:
    """``--send-option`` values (each may hold several: ``"-L -c"``, ``-Lc``) -> zfs send flags."""
    out: list[str] = []
    for value in values:
        for word in _words(value, "--send-option"):
            for opt in _expand(word):
                if opt in SEND_OPTIONS:
                    if SEND_OPTIONS[opt] not in out:
                        out.append(SEND_OPTIONS[opt])
                    continue
                why = REFUSED_SEND.get(opt)
                raise E.UsageError(reason=f"--send-option {opt} is not allowed: "
                                   + (why if why else f"allowed: {_allowed(SEND_OPTIONS)}"))
    return tuple(out)


def parse_recv_options(values: list[str]) -> ReceiveProperties:
    """``--recv-option`` values: ``-o NAME=VALUE`` and ``-x NAME`` (as zfs receive takes them)."""
    sets: list[tuple[str, str]] = []
    excluded: list[str] = []
    for value in values:
        words = _words(value, "--recv-option")
        while words:
            opt = words.pop(0)
            if opt in ("-o", "-x"):
                if not words:
                    raise E.UsageError(reason=f"--recv-option {opt} needs {'NAME=VALUE' if opt == '-o' else 'NAME'}"
                                       f" after it, e.g. --recv-option '{opt} compression"
                                       f"{'=zstd' if opt == '-o' else ''}'")
                arg = words.pop(0)
            elif opt[:2] in ("-o", "-x") and len(opt) > 2:
                opt, arg = opt[:2], opt[2:]
            else:
                why = REFUSED_RECV.get(opt)
                raise E.UsageError(reason=f"--recv-option {opt} is not allowed: "
                                   + (why if why else "allowed: -o NAME=VALUE, -x NAME"))
            if opt == "-o":
                sets.append(parse_property(arg, "--recv-option -o"))
            else:
                excluded.append(_property_name(arg, "--recv-option -x"))
    return ReceiveProperties(tuple(sets), tuple(excluded))


def parse_property(text: str, what: str = "--set-property") -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq:
        raise E.UsageError(reason=f"{what} {text!r}: write NAME=VALUE, e.g. compression=zstd")
    if "\n" in value or "\0" in value or len(value) > 4096:
        raise E.UsageError(reason=f"{what} {text!r}: the value must be one line of at most 4096 characters")
    return _property_name(name, what), value


def _property_name(name: str, what: str) -> str:
    if not name or name.startswith("-") or len(name) > 256 or \
            not all(c.isascii() and (c.isalnum() or c in ":._-") for c in name):
        raise E.UsageError(reason=f"{what} {name!r} is not a property name (letters, digits, ':', '.', '_', '-')")
    return name


def stream_options(raw: bool, send_options: list[str], recv_options: list[str], set_properties: list[str],
                   exclude_properties: list[str]) -> StreamOptions:
    """The CLI's stream options, checked (UsageError, exit 2, before any host is contacted)."""
    send = parse_send_options(send_options)
    if not raw and "-w" in send:
        raise E.UsageError(reason="--no-raw and --send-option -w contradict each other: choose one")
    parsed = parse_recv_options(recv_options)
    sets = parsed.set + tuple(parse_property(p) for p in set_properties)
    excluded = parsed.excluded + tuple(_property_name(p, "--exclude-property") for p in exclude_properties)
    both = sorted({k for k, _ in sets} & set(excluded))
    if both:
        raise E.UsageError(reason=f"property {both[0]} is both set and excluded: choose one")
    return StreamOptions(raw, send, ReceiveProperties(sets, excluded))


def _words(value: str, what: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError as e:
        raise E.UsageError(reason=f"{what} {value!r}: {e}") from e


def _expand(word: str) -> list[str]:
    """``-Lec`` -> ``-L -e -c``; long options and single letters as they are; a bare letter gets its dash
    (syncoid's ``--sendoptions=Lc``)."""
    if word.startswith("--"):
        return [word]
    letters = word[1:] if word.startswith("-") else word
    return [f"-{c}" for c in letters] if letters else [word]


def _allowed(table: dict[str, str]) -> str:
    return ", ".join(sorted(k for k in table if not k.startswith("--")))


def send_flags(source: str, target: str, src: Features, dst: Features, enc: Encryption,
               opts: StreamOptions, into_encrypted: bool = False) -> tuple[str, ...]:
    """The flags of every stream of this dataset, or a refusal (exit 4) naming what cannot work and the fix.
    ``into_encrypted``: the stream lands in an encrypted dataset (or under an encrypted parent), which takes
    no embedded data unless the stream is raw ("incompatible embedded data stream feature")."""
    flags: list[str] = list(src.compact_send_flags()) if dst.openzfs and src.openzfs else []
    raw = enc.on and opts.raw
    if into_encrypted and not raw:
        if "-e" in opts.send:
            raise E.UsageError(reason=f"--send-option -e: {target} is encrypted, and an encrypted dataset receives "
                               "embedded data only in raw streams")
        flags = [f for f in flags if f != "-e"]
    if enc.on and opts.raw:
        if not dst.encryption:
            raise E.RawNeedsEncryption(source=source, target=target, target_zfs=dst.implementation)
        flags.append("-w")
    elif enc.on and enc.keystatus != "available":
        raise E.SourceKeyNotLoaded(source=source, root=enc.root or source.split(":", 1)[-1])
    for flag in opts.send:
        if flag.lstrip("-") not in src.send_flags:
            raise E.UsageError(reason=f"--send-option {flag}: the source's zfs ({src.version}) has no send {flag}")
        if not dst.openzfs:
            raise E.UsageError(reason=f"--send-option {flag}: {target} runs {dst.implementation}, which receives "
                               "only plain streams")
        if flag == "-w" and not enc.on:
            continue  # raw of an unencrypted dataset is a plain one with -L -e -c: ask for those
        if flag not in flags:
            flags.append(flag)
    return tuple(flags)
