package nfsd

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	"github.com/duet-ha/duet/pkg/fstree"
	nfs "github.com/willscott/go-nfs"
	"golang.org/x/sys/unix"
)

// Rename renames oldpath to newpath; the file keeps its ID, and the ID of
// a file it replaces is taken back. The rename is recorded before it is
// done (see index.move and index.settleMove).
func (s *fsys) Rename(oldpath, newpath string) error {
	return s.change(func() error {
		from, err := s.realNew(oldpath)
		if err != nil {
			return err
		}
		to, err := s.realNew(newpath)
		if err != nil {
			return err
		}
		src, err := s.parent(from)
		if err != nil {
			return err
		}
		defer src.dir.Close()
		dst, err := s.parent(to)
		if err != nil {
			return err
		}
		defer dst.dir.Close()
		if src.pid == dst.pid && src.name == dst.name {
			return nil
		}
		id, err := s.ix.resolveLocked(from)
		if err != nil {
			return err
		}
		if s.ix.under(id, dst.pid) {
			return &fs.PathError{Op: "rename", Path: newpath, Err: unix.EINVAL}
		}
		replaced, _ := s.ix.t.child(dst.pid, dst.name)
		m := record{kind: kindMove, id: id, from: src.pid, fromName: src.name, parent: dst.pid, name: dst.name, replaced: replaced}
		err = s.ix.move(m, func() error {
			return s.caller().as(func() error {
				return unix.Renameat(int(src.dir.Fd()), src.name, int(dst.dir.Fd()), dst.name)
			})
		})
		if err != nil {
			return &fs.PathError{Op: "rename", Path: oldpath, Err: err}
		}
		if err := s.sync.Sync(src.dir); err != nil {
			return &fs.PathError{Op: "sync", Path: src.dir.Name(), Err: err}
		}
		if src.pid != dst.pid {
			if err := s.sync.Sync(dst.dir); err != nil {
				return &fs.PathError{Op: "sync", Path: dst.dir.Name(), Err: err}
			}
		}
		// Only now: a snapshot drops the move record, which must not happen
		// before the rename is durable.
		s.ix.log.compact(s.ix.t)
		return nil
	})
}

// Remove removes a file or an empty directory. Its ID is taken back
// durably first (a crash then leaves the file without an ID, never an ID
// on another file) and put back if the removal fails. A removal of the
// wrong kind (an RMDIR of a file, a REMOVE of a directory) is left to the
// kernel's refusal without touching the ID; only if another process
// changed the name's kind in between does it succeed, and the ID is then
// taken back after it (a crash between leaves the ID on the name, as an
// outside replacement of the entry does anyway: the index goes by name).
func (s *fsys) Remove(p string) error {
	return s.atPlace(p, func(at place) error {
		var st unix.Stat_t
		if err := unix.Fstatat(int(at.dir.Fd()), at.name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return &fs.PathError{Op: "remove", Path: p, Err: err}
		}
		isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
		flags := 0
		if isDir {
			flags = unix.AT_REMOVEDIR
		}
		// go-nfs makes an RMDIR and a REMOVE the same removal: the
		// call's own kind decides, as rmdir(2) and unlink(2) do. An
		// RMDIR of anything but a directory (a symlink to one, say)
		// removed it; a REMOVE of an empty directory removed it. The
		// kernel now answers ENOTDIR or EISDIR, after its checks of the
		// caller's right, as it does locally
		// (TestRemoveAndRmdirKeepTheirKinds).
		if s.removing != nil {
			switch s.removing.Load() {
			case procRmdir:
				flags = unix.AT_REMOVEDIR
			case procRemove:
				flags = 0
			}
		}
		if isDir != (flags == unix.AT_REMOVEDIR) {
			// Bound to fail: its ID is not taken back, which would
			// make the live file or directory stale to other clients
			// until it is put back (a review). Should the name have
			// changed kind since the look (another process replaced
			// it), what was removed loses its ID as in a removal.
			err := s.caller().as(func() error { return unix.Unlinkat(int(at.dir.Fd()), at.name, flags) })
			if err != nil {
				return &fs.PathError{Op: "remove", Path: p, Err: err}
			}
			if err := s.ix.remove(at.pid, at.name, func() error { return nil }); err != nil {
				return &fs.PathError{Op: "remove", Path: p, Err: err}
			}
			if err := s.sync.Sync(at.dir); err != nil {
				return &fs.PathError{Op: "sync", Path: at.dir.Name(), Err: err}
			}
			return nil
		}
		if isDir {
			// The common failure is checked before the ID is taken back, so
			// that readers do not see the directory stale for a moment; as
			// the caller, who must not learn whether a directory it may not
			// read is empty (NOTEMPTY where rmdir(2) says EACCES or EPERM:
			// a review). A directory it may not read is left to the
			// removal itself, where the kernel checks the caller's right
			// (write and search on the parent, the sticky bit, an
			// immutable parent) before its emptiness.
			err := s.caller().as(func() error { return empty(at.dir, at.name) })
			if err != nil && !errors.Is(err, unix.EACCES) && !errors.Is(err, unix.EPERM) {
				return &fs.PathError{Op: "remove", Path: p, Err: err}
			}
		}
		err := s.ix.remove(at.pid, at.name, func() error {
			return s.caller().as(func() error { return unix.Unlinkat(int(at.dir.Fd()), at.name, flags) })
		})
		if err != nil {
			return &fs.PathError{Op: "remove", Path: p, Err: err}
		}
		if err := s.sync.Sync(at.dir); err != nil {
			return &fs.PathError{Op: "sync", Path: at.dir.Name(), Err: err}
		}
		return nil
	})
}

// empty returns ENOTEMPTY unless the directory name in dir is empty.
func empty(dir *os.File, name string) error {
	d, err := fstree.OpenBeneath(dir, name, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer d.Close()
	ents, err := fstree.ReadDir(d)
	if err != nil {
		return err
	}
	if len(ents) > 0 {
		return unix.ENOTEMPTY
	}
	return nil
}

// Chmod sets permission bits. A symlink's are left alone (they mean
// nothing, and fchmodat would follow it).
func (s *fsys) Chmod(p string, mode os.FileMode) error {
	return s.setattr(p, func(dir *os.File, name string, st *unix.Stat_t) error {
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			return nil
		}
		return unix.Fchmodat(int(dir.Fd()), name, fstree.UnixPerm(mode), 0)
	})
}

// Lchown sets the owner without following a symlink.
func (s *fsys) Lchown(p string, uid, gid int) error {
	return s.setattr(p, func(dir *os.File, name string, _ *unix.Stat_t) error {
		return unix.Fchownat(int(dir.Fd()), name, uid, gid, unix.AT_SYMLINK_NOFOLLOW)
	})
}

// Chown is Lchown: the server never follows a symlink inside the export.
func (s *fsys) Chown(p string, uid, gid int) error { return s.Lchown(p, uid, gid) }

// Chtimes sets access and modification times without following a symlink.
func (s *fsys) Chtimes(p string, atime, mtime time.Time) error {
	return s.setattr(p, func(dir *os.File, name string, _ *unix.Stat_t) error {
		ts := []unix.Timespec{unix.NsecToTimespec(atime.UnixNano()), unix.NsecToTimespec(mtime.UnixNano())}
		return unix.UtimesNanoAt(int(dir.Fd()), name, ts, unix.AT_SYMLINK_NOFOLLOW)
	})
}

// setattr runs do as the caller on p's directory entry under mu (no
// rename can swap a symlink in between the check and the change), then
// makes the change durable: NFSv3 SETATTR is stable when it returns.
func (s *fsys) setattr(p string, do func(dir *os.File, name string, st *unix.Stat_t) error) error {
	return s.change(func() error {
		comps, err := s.real(p)
		if err != nil {
			return err
		}
		name := "." // the root's attributes are set through itself
		if n := len(comps); n > 0 {
			comps, name = comps[:n-1], comps[n-1]
		}
		dir, err := fstree.OpenBeneath(s.root, join(comps), unix.O_RDONLY|unix.O_DIRECTORY)
		if err != nil {
			return err
		}
		defer dir.Close()
		var st unix.Stat_t
		if err := unix.Fstatat(int(dir.Fd()), name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return &fs.PathError{Op: "setattr", Path: p, Err: err}
		}
		err = s.caller().as(func() error { return do(dir, name, &st) })
		if errors.Is(err, unix.EPERM) {
			// Not the owner (mode, times), or not root (owner): PERM.
			// go-nfs would answer ACCES for any errno it knows as a
			// permission error, and IO for an NFSStatusError that wraps
			// one, so the cause is kept as text.
			return &nfs.NFSStatusError{NFSStatus: nfs.NFSStatusPerm, WrappedErr: fmt.Errorf("setattr %s: %v", p, err)}
		}
		if err != nil {
			return &fs.PathError{Op: "setattr", Path: p, Err: err}
		}
		// A file or directory is synced itself; anything else (a symlink, a
		// FIFO) cannot be opened for fsync, so its directory is.
		target := dir
		if t := st.Mode & unix.S_IFMT; t == unix.S_IFREG || t == unix.S_IFDIR {
			f, err := fstree.OpenBeneath(dir, name, unix.O_RDONLY|unix.O_NONBLOCK)
			if err != nil {
				return err
			}
			defer f.Close()
			target = f
		}
		if err := s.sync.Sync(target); err != nil {
			return &fs.PathError{Op: "sync", Path: p, Err: err}
		}
		return nil
	})
}
