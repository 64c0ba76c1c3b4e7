package nfsd

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"

	nfs "github.com/willscott/go-nfs"
	"golang.org/x/sys/unix"
)

// NFSv3 statuses this file answers with (nfsstat3, RFC 1813).
const (
	nfsOK    = 0
	nfsPerm  = 1
	nfsIO    = 5
	nfsAcces = 13
	nfsIsDir = 21
	nfsInval = 22
	nfsFBig  = 27
	nfsNoSpc = 28
	nfsROFS  = 30
	nfsDQuot = 69
	nfsStale = 70
)

// wcc is a file's attributes before and after a WRITE or COMMIT
// (wcc_data); either may be nil ("no attributes").
type wcc struct {
	pre  *nfs.FileCacheAttribute
	post *nfs.FileAttribute
}

// writeUnstable writes data at off, as c, to the regular file fh names
// and does not sync it: the client asked for UNSTABLE, and its COMMIT
// (commit) makes the bytes durable. It returns the bytes written.
func (h *Handler) writeUnstable(c *cred, fh []byte, off uint64, data []byte) (int, wcc, error) {
	path, err := h.pathOf(fh)
	if err != nil {
		return 0, wcc{}, err
	}
	var w wcc
	fi, err := h.fs.Lstat(path)
	if err != nil {
		return 0, w, err
	}
	if !fi.Mode().IsRegular() {
		return 0, w, fmt.Errorf("WRITE to %s, which is not a regular file: %w", fi.Name(), unix.EINVAL)
	}
	w.pre = nfs.ToFileAttribute(fi, path).AsCache()
	if off > math.MaxInt64-uint64(len(data)) {
		return 0, w, fmt.Errorf("WRITE at offset %d: %w", off, unix.EFBIG)
	}
	fs := h.fs.withCaller(c)
	bf, err := fs.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return 0, w, err
	}
	// The plain descriptor: file's Close would sync a written file.
	f := bf.(*file).File
	var n int
	err = c.as(func() (err error) {
		// As the caller: a write by anyone but root clears set-user-ID.
		n, err = f.WriteAt(data, int64(off))
		return err
	})
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	w.post = h.attrs(path)
	return n, w, err
}

// commit makes every write to the file fh names durable through the
// Syncer: under duet, on the peer too. It needs no permission: the
// writes were checked.
func (h *Handler) commit(fh []byte) (wcc, error) {
	path, err := h.pathOf(fh)
	if err != nil {
		return wcc{}, err
	}
	bf, err := h.fs.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return wcc{}, err
	}
	f := bf.(*file).File
	err = h.fs.sync.Sync(f)
	if err != nil {
		err = fmt.Errorf("syncing %s for a COMMIT: %w", f.Name(), err)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return wcc{post: h.attrs(path)}, err
}

// pathOf resolves fh to the path (ending in a marker) that the export's
// calls take, as FromHandle does for go-nfs. A failure that says nothing
// of the handle is an *unresolvedError.
func (h *Handler) pathOf(fh []byte) (string, error) {
	fsys, comps, err := h.FromHandle(fh)
	if err != nil {
		if !errors.Is(err, errStale) && !errors.Is(err, errClosed) {
			err = &unresolvedError{err}
		}
		return "", err
	}
	return fsys.Join(comps...), nil
}

// unresolvedError: a handle could not be resolved for a reason that is not
// the handle's (its supervisor gone, so that its calls fail with ENOSYS;
// an I/O error). As for go-nfs's calls (connHandler.FromHandle), the
// connection ends unanswered and the client sends the call again, to this
// server or the next one; answered NFS3ERR_IO, a COMMIT failed the
// application's fsync across a failover (a review, forty-second session:
// TestProxyCallsUnresolvedForAnotherReasonUnanswered).
type unresolvedError struct{ err error }

func (e *unresolvedError) Error() string { return "resolving a file handle: " + e.err.Error() }
func (e *unresolvedError) Unwrap() error { return e.err }

// endsUnanswered reports whether a call the proxy answers itself must end
// its connection unanswered instead: the server is stopping, a handle
// could not be resolved for a reason that is not its own, or a system
// call failed with ENOSYS (the supervisor of `duet exec` is gone: this
// server is being replaced).
func endsUnanswered(err error) bool {
	var u *unresolvedError
	return errors.Is(err, errClosed) || errors.As(err, &u) || errors.Is(err, unix.ENOSYS)
}

// attrs returns path's attributes, with its file ID as fileid, or nil.
func (h *Handler) attrs(path string) *nfs.FileAttribute {
	fi, err := h.fs.Lstat(path)
	if err != nil {
		return nil
	}
	return nfs.ToFileAttribute(fi, path)
}

// statusOf maps the error of a WRITE or COMMIT to its NFS status. A file
// that vanished after its handle resolved is STALE, as the handle is now.
func statusOf(err error) uint32 {
	var errno unix.Errno
	switch {
	case err == nil:
		return nfsOK
	case errors.Is(err, errStale), errors.Is(err, fs.ErrNotExist):
		return nfsStale
	case !errors.As(err, &errno):
		return nfsIO
	}
	switch errno {
	case unix.EACCES:
		return nfsAcces
	case unix.EPERM:
		// "Operation not permitted" on the client, as locally: the
		// caller is not the owner, or the file is immutable or
		// append-only, or a sticky directory protects it.
		return nfsPerm
	case unix.EISDIR:
		return nfsIsDir
	case unix.EINVAL:
		return nfsInval
	case unix.EFBIG:
		return nfsFBig
	case unix.ENOSPC:
		return nfsNoSpc
	case unix.EROFS:
		return nfsROFS
	case unix.EDQUOT:
		return nfsDQuot
	}
	return nfsIO
}

// ioStatus is the NFS status of a change that failed with errno, where
// go-nfs answered NFS3ERR_IO or ACCES; NFS3ERR_IO where none says more
// (EACCES among them: go-nfs's answer stands). An EPERM is PERM, where
// go-nfs said ACCES.
func ioStatus(errno unix.Errno) uint32 {
	switch errno {
	case unix.ENOTEMPTY:
		return uint32(nfs.NFSStatusNotEmpty)
	case unix.EEXIST:
		return uint32(nfs.NFSStatusExist)
	case unix.ENOTDIR:
		return uint32(nfs.NFSStatusNotDir)
	case unix.EXDEV:
		return uint32(nfs.NFSStatusXDev)
	case unix.ENAMETOOLONG:
		return uint32(nfs.NFSStatusNameTooLong)
	case unix.EMLINK:
		return uint32(nfs.NFSStatusMlink)
	case unix.EPERM, unix.EISDIR, unix.EINVAL, unix.EFBIG, unix.ENOSPC, unix.EROFS, unix.EDQUOT:
		return statusOf(errno)
	}
	return nfsIO
}
