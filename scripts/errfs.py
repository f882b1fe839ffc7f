#!/usr/bin/env python3
"""A tiny in-memory FUSE file system (raw /dev/fuse protocol, writeback cache on) whose WRITE
requests to files named seg* fail with a chosen errno over a chosen byte range while the control
file exists (its content: "errno start end [name|* [delay-seconds]]"), as a FUSE, NFS or CIFS
server can fail a write at writeback. Failed ranges are logged to stderr.

Usage: errfs.py MOUNTPOINT CONTROL-FILE (as root, with /dev/fuse; unmount with umount -l).
Used by scripts/writeback-errors.sh for crates/store/tests/writeback_errors.rs."""
import errno, os, struct, subprocess, sys, stat, time

MNT = sys.argv[1]
FAIL = sys.argv[2]
fd = os.open("/dev/fuse", os.O_RDWR)
subprocess.check_call(["mount", "-i", "-t", "fuse", "-o",
                       f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other",
                       "errfs", MNT], pass_fds=[fd])

nodes = {1: {"name": "", "dir": True}}  # nodeid -> {name, dir, data}
by_name = {}
next_ino = [2]
fhs = [1]
now = int(time.time())


def log(*a):
    print("errfs:", *a, file=sys.stderr, flush=True)


def attr(nid):
    n = nodes[nid]
    if n["dir"]:
        mode, size = stat.S_IFDIR | 0o755, 0
    else:
        mode, size = stat.S_IFREG | 0o644, len(n["data"])
    return struct.pack("<QQQQQQIIIIIIIIII", nid, size, (size + 511) // 512, now, now, now,
                       0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)


def entry(nid):
    return struct.pack("<QQQQII", nid, 0, 0, 0, 0, 0) + attr(nid)


def attr_out(nid):
    return struct.pack("<QII", 0, 0, 0) + attr(nid)


def reply(unique, err=0, body=b""):
    os.write(fd, struct.pack("<IiQ", 16 + len(body), -err, unique) + body)


def names(buf):
    return [p.decode() for p in buf.split(b"\0")[:-1]]


def fail_for(name, off, size):
    if not name.startswith("seg") or not os.path.exists(FAIL):
        return 0
    f = open(FAIL).read().split()
    e, s, t = int(f[0]), int(f[1]), int(f[2])
    if len(f) > 3 and f[3] != "*" and f[3] != name:
        return 0
    if off < t and off + size > s:
        if len(f) > 4:
            time.sleep(float(f[4]))
        return e
    return 0


def new_file(name):
    nid = next_ino[0]
    next_ino[0] += 1
    nodes[nid] = {"name": name, "dir": False, "data": bytearray()}
    by_name[name] = nid
    return nid


while True:
    try:
        req = os.read(fd, (1 << 20) + 65536)
    except OSError as e:
        if e.errno == errno.ENODEV:
            break
        if e.errno == errno.EINTR or e.errno == errno.ENOENT:
            continue
        raise
    ln, op, unique, nid, uid, gid, pid, ext, _ = struct.unpack_from("<IIQQIIIHH", req)
    arg = req[40:]
    try:
        if op == 26:  # INIT
            flags = (1 << 0) | (1 << 5) | (1 << 16) | (1 << 22)
            reply(unique, 0, struct.pack("<IIIIHHIIHHI7I", 7, 31, 1 << 20, flags, 16, 12,
                                         1 << 20, 1, 256, 0, 0, *([0] * 7)))
        elif op == 1:  # LOOKUP
            (name,) = names(arg)
            if name in by_name:
                reply(unique, 0, entry(by_name[name]))
            else:
                reply(unique, errno.ENOENT)
        elif op in (2, 42):  # FORGET, BATCH_FORGET: no reply
            pass
        elif op == 3:  # GETATTR
            reply(unique, 0, attr_out(nid))
        elif op == 4:  # SETATTR
            valid, _, fh, size = struct.unpack_from("<IIQQ", arg)
            if valid & (1 << 3):
                d = nodes[nid]["data"]
                if size < len(d):
                    del d[size:]
                else:
                    d.extend(bytes(size - len(d)))
            reply(unique, 0, attr_out(nid))
        elif op == 35 or op == 8:  # CREATE, MKNOD
            name = names(arg[16:])[0]
            if name in by_name:
                reply(unique, errno.EEXIST)
            else:
                n = new_file(name)
                body = entry(n)
                if op == 35:
                    fhs[0] += 1
                    body += struct.pack("<QII", fhs[0], 0, 0)
                reply(unique, 0, body)
        elif op in (14, 27):  # OPEN, OPENDIR
            fhs[0] += 1
            reply(unique, 0, struct.pack("<QII", fhs[0], 0, 0))
        elif op == 15:  # READ
            fh, off, size = struct.unpack_from("<QQI", arg)
            reply(unique, 0, bytes(nodes[nid]["data"][off:off + size]))
        elif op == 16:  # WRITE
            fh, off, size = struct.unpack_from("<QQI", arg)
            data = arg[40:40 + size]
            n = nodes[nid]
            e = fail_for(n["name"], off, size)
            if e:
                log(f"WRITE {n['name']} [{off}, {off + size}) failed with errno {e}")
                reply(unique, e)
            else:
                d = n["data"]
                if len(d) < off:
                    d.extend(bytes(off - len(d)))
                d[off:off + size] = data
                reply(unique, 0, struct.pack("<II", size, 0))
        elif op == 10:  # UNLINK
            (name,) = names(arg)
            if name in by_name:
                del nodes[by_name.pop(name)]
                reply(unique)
            else:
                reply(unique, errno.ENOENT)
        elif op == 12 or op == 45:  # RENAME, RENAME2
            rest = arg[8:] if op == 12 else arg[16:]
            old, new = names(rest)
            if old not in by_name:
                reply(unique, errno.ENOENT)
            else:
                if new in by_name:
                    del nodes[by_name.pop(new)]
                n = by_name.pop(old)
                nodes[n]["name"] = new
                by_name[new] = n
                reply(unique)
        elif op == 28:  # READDIR
            fh, off, size = struct.unpack_from("<QQI", arg)
            ents = [(1, ".", 4), (1, "..", 4)] + [(i, nm, 8) for nm, i in sorted(by_name.items())]
            out = b""
            for k, (ino, nm, typ) in enumerate(ents):
                if k < off:
                    continue
                b = nm.encode()
                rec = struct.pack("<QQII", ino, k + 1, len(b), typ) + b
                rec += bytes((-len(rec)) % 8)
                if len(out) + len(rec) > size:
                    break
                out += rec
            reply(unique, 0, out)
        elif op == 17:  # STATFS
            reply(unique, 0, struct.pack("<QQQQQIIII6I", 1 << 24, 1 << 23, 1 << 23, 1 << 20,
                                         1 << 19, 4096, 255, 4096, 0, *([0] * 6)))
        elif op == 20:  # FSYNC
            log(f"FSYNC {nodes[nid]['name']}")
            reply(unique)
        elif op in (18, 29, 25, 30, 34):  # RELEASE, RELEASEDIR, FLUSH, FSYNC, FSYNCDIR, ACCESS
            reply(unique)
        elif op == 38:  # DESTROY
            reply(unique)
            break
        elif op == 36:  # INTERRUPT
            pass
        else:
            reply(unique, errno.ENOSYS)
    except Exception as ex:  # keep serving
        log("op", op, "failed:", repr(ex))
        reply(unique, errno.EIO)
