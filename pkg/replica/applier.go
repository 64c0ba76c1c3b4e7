package replica

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// Applier makes ops happen under a replica root, and nowhere else: every
// lookup goes through openat2 with RESOLVE_BENEATH and RESOLVE_NO_SYMLINKS,
// and final components are handled with *at calls on the parent. Ops are
// idempotent so that a batch replayed after a reconnect is harmless.
type Applier struct {
	root  *os.File
	sync  *os.File            // the root opened for reading: syncfs refuses O_PATH
	files map[string]*os.File // open for writing within one batch
	// What the batch touched, for a targeted flush: files written and
	// directories whose entries changed. overflow means "too many: syncfs".
	dirty    map[string]bool
	dirs     map[string]bool
	overflow bool
	syncfs   func(fd int) error // unix.Syncfs; a test counts or fails it
}

// maxTargeted is the most files and directories flushed one by one; past
// it one syncfs is cheaper than many flushes.
const maxTargeted = 16

// NewApplier applies ops beneath dir.
func NewApplier(dir string) (*Applier, error) {
	root, err := fstree.OpenRoot(dir)
	if err != nil {
		return nil, err
	}
	sync, err := fstree.OpenBeneath(root, ".", unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		root.Close()
		return nil, err
	}
	// What earlier appliers (an earlier connection, an earlier daemon run)
	// left in the page cache is unknown: the first Sync flushes the whole
	// filesystem, so that its durable acknowledgement covers them too.
	return &Applier{root: root, sync: sync, files: map[string]*os.File{},
		dirty: map[string]bool{}, dirs: map[string]bool{}, overflow: true, syncfs: unix.Syncfs}, nil
}

// Close releases the root and any open file.
func (a *Applier) Close() error {
	a.closeFiles()
	a.sync.Close()
	return a.root.Close()
}

func (a *Applier) closeFiles() {
	for p, f := range a.files {
		f.Close()
		delete(a.files, p)
	}
}

// Sync makes everything applied since the last Sync durable. A batch that
// touched a few entries flushes just those (fdatasync of the files, fsync
// of the directories whose entries changed), so that a barrier does not
// wait for unrelated dirty data; a larger one does one syncfs. A failed
// Sync leaves the next one a syncfs: what it did not flush stays owed.
func (a *Applier) Sync() error {
	a.closeFiles()
	if err := a.flushAll(); err != nil {
		a.overflow = true
		return err
	}
	clear(a.dirty)
	clear(a.dirs)
	a.overflow = false
	return nil
}

// flushAll flushes what Sync owes.
func (a *Applier) flushAll() error {
	if a.overflow || len(a.dirty)+len(a.dirs) > maxTargeted {
		if err := a.syncfs(int(a.sync.Fd())); err != nil {
			return fmt.Errorf("syncfs on replica: %w", err)
		}
		return nil
	}
	// fsync, not fdatasync: a setattr's mode, owner and times must last
	// too.
	for p := range a.dirty {
		if err := a.flush(p, unix.O_RDONLY); err != nil {
			return err
		}
	}
	for d := range a.dirs {
		if err := a.flush(d, unix.O_RDONLY|unix.O_DIRECTORY); err != nil {
			return err
		}
	}
	return nil
}

// flush fsyncs one path. One that is gone since (removed later in the
// batch), is a symlink, a FIFO or a socket (its directory is flushed)
// needs nothing.
func (a *Applier) flush(p string, flags int) error {
	f, err := a.openRegular(p, flags)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) || errors.Is(err, errNotRegular) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("flushing %q: %w", p, err)
	}
	defer f.Close()
	if err := unix.Fsync(int(f.Fd())); err != nil {
		return fmt.Errorf("flushing %q: %w", p, err)
	}
	return nil
}

// errNotRegular: the replica holds something else than a regular file or
// a directory where an op needs one.
var errNotRegular = errors.New("not a regular file on this replica")

// openRegular opens p with flags if it is a regular file or a directory.
// Anything else is reported without being opened: opening a FIFO for
// writing blocks until a reader comes, a socket's open fails, a device's
// has side effects.
func (a *Applier) openRegular(p string, flags int) (*os.File, error) {
	pf, err := fstree.OpenBeneath(a.root, p, unix.O_PATH|unix.O_NOFOLLOW)
	if err != nil {
		return nil, err
	}
	var st unix.Stat_t
	err = unix.Fstat(int(pf.Fd()), &st)
	pf.Close()
	if err != nil {
		return nil, &fs.PathError{Op: "stat", Path: p, Err: err}
	}
	if t := st.Mode & unix.S_IFMT; t != unix.S_IFREG && t != unix.S_IFDIR {
		return nil, fmt.Errorf("%w: %s", errNotRegular, kindOf(t))
	}
	// Non-blocking all the same: the path is looked up anew.
	return fstree.OpenBeneath(a.root, p, flags|unix.O_NONBLOCK|unix.O_NOFOLLOW)
}

// kindOf names a file type (S_IFMT bits) for an operator.
func kindOf(t uint32) string {
	switch t {
	case unix.S_IFIFO:
		return "a fifo"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFLNK:
		return "a symlink"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFDIR:
		return "a directory"
	}
	return fmt.Sprintf("a file of type %#o", t)
}

// touch records what an op changed, for Sync.
func (a *Applier) touch(op *wire.Op) {
	if a.overflow {
		return
	}
	dirOf := func(p string) string {
		d, _ := path.Split(p)
		if d == "" {
			return "."
		}
		return d[:len(d)-1]
	}
	switch op.Code {
	case wire.OpWrite, wire.OpTruncate, wire.OpPunch:
		a.dirty[op.Path] = true
	case wire.OpSetattr:
		a.dirty[op.Path] = true
		a.dirs[dirOf(op.Path)] = true // covers a symlink, which cannot be opened
	case wire.OpRemove:
		// A removed subtree may hold files written earlier in the batch.
		a.overflow = true
	case wire.OpLink, wire.OpRename:
		a.dirs[dirOf(op.Path)] = true
		a.dirs[dirOf(op.Path2)] = true
		// Dirty files may have moved: flush their new names too.
		if op.Code == wire.OpRename {
			a.overflow = a.overflow || len(a.dirty) > 0
		}
	default: // mkdir, create, symlink, mknod
		a.dirs[dirOf(op.Path)] = true
	}
	if len(a.dirty)+len(a.dirs) > maxTargeted {
		a.overflow = true
	}
}

// parent opens the directory holding p and returns it with p's base name.
func (a *Applier) parent(p string) (*os.File, string, error) {
	dir, base := path.Split(p)
	d, err := fstree.OpenBeneath(a.root, dir, unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return nil, "", err
	}
	return d, base, nil
}

// Apply performs one op. Errors name the op and path.
func (a *Applier) Apply(op *wire.Op) error {
	if err := a.apply(op); err != nil {
		return fmt.Errorf("%s %q: %w", op.Code, op.Path, err)
	}
	a.touch(op)
	return nil
}

func (a *Applier) apply(op *wire.Op) error {
	if err := wire.ValidPath(op.Path); err != nil {
		return err
	}
	switch op.Code {
	case wire.OpWrite:
		f, err := a.file(op.Path)
		if err != nil {
			return err
		}
		_, err = f.WriteAt(op.Data, int64(op.Off))
		return err
	case wire.OpTruncate:
		f, err := a.file(op.Path)
		if err != nil {
			return err
		}
		return f.Truncate(int64(op.Off))
	case wire.OpPunch:
		f, err := a.file(op.Path)
		if err != nil {
			return err
		}
		return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(op.Off), int64(op.Len))
	}
	// Namespace ops change what paths name: drop cached files.
	a.closeFiles()
	d, base, err := a.parent(op.Path)
	if err != nil {
		return err
	}
	defer d.Close()
	dfd := int(d.Fd())
	switch op.Code {
	case wire.OpMkdir:
		var st unix.Stat_t
		if unix.Fstatat(dfd, base, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
			if st.Mode&unix.S_IFMT == unix.S_IFDIR {
				return unix.Fchmodat(dfd, base, op.Mode&0o7777, 0)
			}
			if err := a.removeAt(d, base); err != nil {
				return err
			}
		}
		if err := unix.Mkdirat(dfd, base, op.Mode&0o7777); err != nil {
			return err
		}
		return unix.Fchmodat(dfd, base, op.Mode&0o7777, 0) // umask-free
	case wire.OpCreate:
		// A new inode on the primary: never truncate an existing one, it
		// may have other names.
		if err := a.removeAt(d, base); err != nil {
			return err
		}
		fd, err := unix.Openat(dfd, base, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, op.Mode&0o7777)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Fchmod(fd, op.Mode&0o7777)
	case wire.OpSymlink:
		if err := a.removeAt(d, base); err != nil {
			return err
		}
		return unix.Symlinkat(op.Path2, dfd, base)
	case wire.OpMknod:
		if t := op.Mode & unix.S_IFMT; t != unix.S_IFIFO && t != unix.S_IFSOCK {
			return fmt.Errorf("refusing to create a device node (mode %o)", op.Mode)
		}
		if err := a.removeAt(d, base); err != nil {
			return err
		}
		return unix.Mknodat(dfd, base, op.Mode, 0)
	case wire.OpRemove:
		return a.removeAt(d, base)
	case wire.OpLink, wire.OpRename:
		d2, base2, err := a.parent(op.Path2)
		if err != nil {
			return err
		}
		defer d2.Close()
		return a.linkOrRename(op.Code, d, base, d2, base2)
	case wire.OpSetattr:
		return setattr(dfd, base, op)
	}
	return fmt.Errorf("unknown op %d", op.Code)
}

func (a *Applier) linkOrRename(code wire.OpCode, d *os.File, base string, d2 *os.File, base2 string) error {
	dfd, dfd2 := int(d.Fd()), int(d2.Fd())
	var src, dst unix.Stat_t
	srcErr := unix.Fstatat(dfd, base, &src, unix.AT_SYMLINK_NOFOLLOW)
	dstErr := unix.Fstatat(dfd2, base2, &dst, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(srcErr, unix.ENOENT) && dstErr == nil {
		return nil // replayed: already done
	}
	if srcErr != nil {
		return srcErr
	}
	if dstErr == nil && src.Dev == dst.Dev && src.Ino == dst.Ino {
		if code == wire.OpRename {
			return unix.Unlinkat(dfd, base, 0) // both names of one inode
		}
		return nil
	}
	if code == wire.OpLink {
		if dstErr == nil {
			if err := a.removeAt(d2, base2); err != nil {
				return err
			}
		}
		return unix.Linkat(dfd, base, dfd2, base2, 0)
	}
	err := unix.Renameat(dfd, base, dfd2, base2)
	if errors.Is(err, unix.ENOTEMPTY) || errors.Is(err, unix.EEXIST) || errors.Is(err, unix.EISDIR) || errors.Is(err, unix.ENOTDIR) {
		// The replica had something else there: the primary's rename
		// replaced it, so do the same.
		if err := a.removeAt(d2, base2); err != nil {
			return err
		}
		err = unix.Renameat(dfd, base, dfd2, base2)
	}
	return err
}

func setattr(dfd int, base string, op *wire.Op) error {
	var st unix.Stat_t
	if err := unix.Fstatat(dfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return err
	}
	if err := unix.Fchownat(dfd, base, int(op.UID), int(op.GID), unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return err
	}
	// chown clears set-id bits: chmod after it. Symlinks have no mode.
	if st.Mode&unix.S_IFMT != unix.S_IFLNK {
		if err := unix.Fchmodat(dfd, base, op.Mode&0o7777, 0); err != nil {
			return err
		}
	}
	ts := []unix.Timespec{unix.NsecToTimespec(op.Atime), unix.NsecToTimespec(op.Mtime)}
	return unix.UtimesNanoAt(dfd, base, ts, unix.AT_SYMLINK_NOFOLLOW)
}

// file returns p open for writing, kept open for the rest of the batch.
func (a *Applier) file(p string) (*os.File, error) {
	if f := a.files[p]; f != nil {
		return f, nil
	}
	if len(a.files) >= 256 {
		a.closeFiles()
	}
	f, err := a.openRegular(p, unix.O_WRONLY)
	if err != nil {
		return nil, err
	}
	a.files[p] = f
	return f, nil
}

// removeAt removes name in d, recursively for a directory. A missing name
// is not an error.
func (a *Applier) removeAt(d *os.File, name string) error {
	dfd := int(d.Fd())
	err := unix.Unlinkat(dfd, name, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if !errors.Is(err, unix.EISDIR) {
		return err
	}
	sub, err := openDirAt(dfd, name)
	if err != nil {
		return err
	}
	ents, err := fstree.ReadDir(sub)
	if err == nil {
		for _, e := range ents {
			if err = a.removeAt(sub, e.Name); err != nil {
				break
			}
		}
	}
	sub.Close()
	if err != nil {
		return err
	}
	err = unix.Unlinkat(dfd, name, unix.AT_REMOVEDIR)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	return err
}

func openDirAt(dfd int, name string) (*os.File, error) {
	how := unix.OpenHow{Flags: unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC, Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS}
	fd, err := unix.Openat2(dfd, name, &how)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: name, Err: err}
	}
	return os.NewFile(uintptr(fd), name), nil
}
