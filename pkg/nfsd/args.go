package nfsd

import (
	"bufio"
	"errors"
	"fmt"
)

// go-nfs (through go-nfs-client's XDR decoder) allocates whatever length
// an opaque, string or list argument claims, up to 4 GiB, before it reads
// it: a 100-byte LOOKUP claiming a 2 GiB name costs the server 2 GiB. So
// the proxy checks the length fields of every call it passes to go-nfs
// against the protocol's bounds and the record's size first; a call that
// fails gets GARBAGE_ARGS and never reaches go-nfs.

const (
	progMount     = 100005
	mountVersion  = 3
	maxName       = 255  // NFS3 filename3: Linux's NAME_MAX
	maxPath       = 4096 // nfspath3 (SYMLINK's target): PATH_MAX
	maxMountPath  = 1024 // MNTPATHLEN
	maxPassedCall = 60 << 10
)

// checkArgs checks the length fields of a call's arguments (args: the
// record after the call header). A WRITE's data is checked against
// dataRoom, the bytes of the record left after its fixed fields, so that
// only the start of a large WRITE need be in args.
func checkArgs(h callHeader, args []byte, recordLen int) error {
	r := xdrReader{b: args}
	switch h.prog {
	case progMount:
		if h.vers == mountVersion && (h.proc == 1 || h.proc == 3) { // MNT, UMNT
			r.opaque(maxMountPath)
		}
	case progNFS:
		if h.vers != nfsVersion || h.proc == 0 || h.proc > procCommit {
			break // go-nfs answers PROC_UNAVAIL unread; other versions never come here (otherVersion)
		}
		r.opaque(maxHandle)
		switch h.proc {
		case procLookup, procCreate, procMkdir, procMknod, procRemove, procRmdir:
			r.opaque(maxName)
		case procSymlink:
			r.opaque(maxName)
			sattr3(&r)
			r.opaque(maxPath)
		case procRename:
			r.opaque(maxName)
			r.opaque(maxHandle)
			r.opaque(maxName)
		case procLink:
			r.opaque(maxHandle)
			r.opaque(maxName)
		case procWrite:
			r.u64() // offset
			r.u32() // count
			r.u32() // stable
			n := r.u32()
			if r.err == nil {
				room := recordLen - h.argsAt - (len(args) - len(r.b))
				if int64(n) > int64(room) {
					return fmt.Errorf("WRITE of %d bytes in a record with room for %d", n, room)
				}
			}
		}
	}
	if r.err != nil {
		return fmt.Errorf("program %d procedure %d: %w", h.prog, h.proc, r.err)
	}
	return nil
}

// sattr3 skips a sattr3 (RFC 1813): optional mode, uid, gid, size, and
// two times that are unchanged, set to the server's time, or given.
func sattr3(r *xdrReader) {
	for range 3 { // mode, uid, gid
		if r.u32() != 0 {
			r.u32()
		}
	}
	if r.u32() != 0 { // size
		r.u64()
	}
	for range 2 { // atime, mtime
		if r.u32() == 2 { // SET_TO_CLIENT_TIME
			r.u64()
		}
	}
}

// errPeek: the record could not be read; the connection is done.
var errPeek = errors.New("reading the call")

// checkPassed checks a call of n bytes that go-nfs is to answer, reading
// ahead in in without consuming: all of it, or a WRITE's fixed fields.
// A call of another program is go-nfs's to refuse.
func checkPassed(in *bufio.Reader, h callHeader, n int) error {
	if h.prog != progNFS && h.prog != progMount {
		return nil
	}
	look := n
	if h.prog == progNFS && h.proc == procWrite {
		if n > maxIntercepted {
			return fmt.Errorf("a WRITE call of %d bytes: at most %d", n, maxIntercepted)
		}
		look = min(n, h.argsAt+4+maxHandle+4*5)
	} else if n > maxPassedCall {
		return fmt.Errorf("a call of %d bytes: no call but a WRITE takes more than %d", n, maxPassedCall)
	}
	b, err := in.Peek(look)
	if err != nil {
		return fmt.Errorf("%w: %v", errPeek, err)
	}
	return checkArgs(h, b[h.argsAt:], n)
}
