package nfsd

import (
	"errors"
	"io/fs"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/duet-ha/duet/pkg/fstree"
	billy "github.com/go-git/go-billy/v5"
	nfsfile "github.com/willscott/go-nfs/file"
	"golang.org/x/sys/unix"
)

// fsys is the billy filesystem go-nfs serves: the export, reached only
// beneath its root descriptor without following symlinks, with the index
// directory hidden, stable file IDs as the NFS fileid, every change that
// NFSv3 says is stable made durable before it returns, and every change
// of the namespace recorded in the index in the order index documents.
// Each client connection has its own fsys, whose calls act as the
// connection's current caller (cred.go): the object a call opens, creates,
// removes, renames or changes is reached as the caller, its directory and
// the index as the server.
type fsys struct {
	*export
	who func() *cred // nil, or returning nil: the server
	// failed, if set, keeps the errno of the last change or write that
	// failed (EIO for a failed sync): go-nfs answers most errors
	// NFS3ERR_IO or ACCES, and the proxy answers the call's status
	// instead (proxy.refine).
	failed *atomic.Uint32
	// removing, if set, is the procedure of the call go-nfs runs when it
	// is a REMOVE or RMDIR (proxy.removing), else 0.
	removing *atomic.Uint32
}

// noteFailed keeps err's errno in s.failed. A failed sync is kept as EIO,
// whatever its errno: a change that is not durable is answered IO (go-nfs
// said ACCES for a CREATE's, a review found).
func (s *fsys) noteFailed(err error) {
	var pe *fs.PathError
	var errno unix.Errno
	switch {
	case s.failed == nil || err == nil:
	case errors.As(err, &pe) && pe.Op == "sync", errors.Is(err, errSyncFailed):
		s.failed.Store(uint32(unix.EIO))
	case errors.As(err, &errno):
		s.failed.Store(uint32(errno))
	}
}

// errSyncFailed marks a file's failed sync at its close.
var errSyncFailed = errors.New("sync failed")

// export is the state every connection's fsys shares.
type export struct {
	ix   *index
	key  handleKey
	root *os.File // O_PATH
	sync Syncer
	// life holds close off while a call uses the export's descriptors: a
	// call running after they were closed could act on a reused number.
	// No guarded method calls another (a read lock is not reentrant).
	life   sync.RWMutex
	closed bool
}

// caller is who s's calls act as; nil is the server.
func (s *fsys) caller() *cred {
	if s.who == nil {
		return nil
	}
	return s.who()
}

// withCaller is the export as c sees it.
func (s *fsys) withCaller(c *cred) *fsys {
	return &fsys{export: s.export, who: func() *cred { return c }}
}

var errClosed = errors.New("nfs export closed: the server stopped")

// enter guards a call; leave ends it.
func (s *export) enter() error {
	s.life.RLock()
	if s.closed {
		s.life.RUnlock()
		return errClosed
	}
	return nil
}

func (s *export) leave() { s.life.RUnlock() }

// close waits for running calls and releases the export.
func (s *export) close() error {
	s.life.Lock()
	defer s.life.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	s.ix.close()
	return s.root.Close()
}

var (
	_ billy.Filesystem = (*fsys)(nil)
	_ billy.Change     = (*fsys)(nil)
	_ billy.Capable    = (*fsys)(nil)
)

// Join joins components without cleaning, so that a ".." a client sends
// as a name reaches split and is refused rather than resolved, and a
// marker stays one component.
func (s *fsys) Join(elem ...string) string { return strings.Join(elem, "/") }

// Capabilities leaves out locking: go-nfs does not use it.
func (s *fsys) Capabilities() billy.Capability {
	return billy.WriteCapability | billy.ReadCapability | billy.ReadAndWriteCapability |
		billy.SeekCapability | billy.TruncateCapability
}

// info is a stat result carrying the stable file ID as the NFS fileid.
// The Linux client compares fileids: one that changes for the same handle
// is an ESTALE.
type info struct {
	name string
	st   unix.Stat_t
	id   uint64
}

func (i *info) Name() string       { return i.name }
func (i *info) Size() int64        { return i.st.Size }
func (i *info) Mode() fs.FileMode  { return fstree.ModeOf(i.st.Mode) }
func (i *info) ModTime() time.Time { return time.Unix(i.st.Mtim.Unix()) }
func (i *info) IsDir() bool        { return i.st.Mode&unix.S_IFMT == unix.S_IFDIR }
func (i *info) Sys() any {
	return &nfsfile.FileInfo{Nlink: uint32(i.st.Nlink), UID: i.st.Uid, GID: i.st.Gid,
		Major: unix.Major(i.st.Rdev), Minor: unix.Minor(i.st.Rdev), Fileid: i.id}
}

// Lstat stats without following a final symlink, and gives the object an
// ID (durably) if it has none.
func (s *fsys) Lstat(p string) (os.FileInfo, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.leave()
	s.ix.tmu.RLock()
	comps, err := s.real(p)
	var st unix.Stat_t
	var ids []uint64
	if err == nil {
		st, err = fstree.Stat(s.root, join(comps))
		ids = s.ix.t.walk(comps)
	}
	s.ix.tmu.RUnlock()
	if err != nil {
		return nil, err
	}
	id := last(ids)
	if len(ids) < len(comps) {
		if id, err = s.idOf(p); err != nil {
			return nil, err
		}
	}
	name := "/"
	if len(comps) > 0 {
		name = comps[len(comps)-1]
	}
	return &info{name: name, st: st, id: id}, nil
}

// Stat is Lstat: the server never follows a symlink inside the export.
func (s *fsys) Stat(p string) (os.FileInfo, error) { return s.Lstat(p) }

// ReadDir lists a directory, the root without the index directory, giving
// entries without an ID one in a single durable append.
func (s *fsys) ReadDir(p string) ([]os.FileInfo, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.leave()
	s.ix.tmu.RLock()
	infos, names, ids, err := s.list(p)
	s.ix.tmu.RUnlock()
	if err != nil {
		return nil, err
	}
	if slices.Contains(ids, 0) {
		s.ix.mu.Lock()
		comps, err := s.real(p)
		if err == nil {
			ids, err = s.ix.namesLocked(comps, names)
		}
		s.ix.mu.Unlock()
		if err != nil {
			return nil, err
		}
	}
	out := make([]os.FileInfo, 0, len(infos))
	for k, i := range infos {
		if ids[k] != 0 {
			i.id = ids[k]
			out = append(out, i)
		}
	}
	return out, nil
}

// list reads the directory p and the IDs its entries have (0 for none).
// ix.tmu is held for reading.
func (s *fsys) list(p string) ([]*info, []string, []uint64, error) {
	comps, err := s.real(p)
	if err != nil {
		return nil, nil, nil, err
	}
	d, err := s.openAs(comps, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return nil, nil, nil, err
	}
	defer d.Close()
	ents, err := fstree.ReadDir(d)
	if err != nil {
		return nil, nil, nil, err
	}
	dirIDs := s.ix.t.walk(comps)
	var infos []*info
	var names []string
	var ids []uint64
	for _, e := range ents {
		if len(comps) == 0 && e.Name == indexDir {
			continue
		}
		i := &info{name: e.Name}
		if err := unix.Fstatat(int(d.Fd()), e.Name, &i.st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			continue // removed since the listing
		}
		var id uint64
		if len(dirIDs) == len(comps) {
			id, _ = s.ix.t.child(last(dirIDs), e.Name)
		}
		infos, names, ids = append(infos, i), append(names, e.Name), append(ids, id)
	}
	return infos, names, ids, nil
}

// Open opens a file for reading.
func (s *fsys) Open(p string) (billy.File, error) { return s.OpenFile(p, os.O_RDONLY, 0) }

// Create creates a file, or opens the one that exists, keeping its data.
// Its one caller is go-nfs's CREATE, which checks a GUARDED create's name
// first and applies the call's attributes after (a size among them
// truncates, as RFC 1813 says). billy's Create truncates: so an UNCHECKED
// CREATE of an existing file (Linux's open(O_CREAT) racing another
// client's create) emptied it, and so did a CREATE sent again on a new
// connection (a server stall, a failover) when it ran after the first one
// and the WRITEs the client sent once answered: acknowledged data lost.
func (s *fsys) Create(p string) (billy.File, error) {
	return s.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o666)
}

// OpenFile opens beneath the root without following symlinks; O_NONBLOCK
// keeps a FIFO from blocking the server.
func (s *fsys) OpenFile(p string, flag int, perm os.FileMode) (billy.File, error) {
	if flag&os.O_CREATE != 0 {
		return s.create(p, flag, perm)
	}
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.leave()
	s.ix.tmu.RLock()
	comps, err := s.real(p)
	var f *os.File
	if err == nil {
		f, err = s.openAs(comps, flag|unix.O_NONBLOCK)
	}
	s.ix.tmu.RUnlock()
	if err != nil {
		return nil, err
	}
	return s.file(f, p, flag&os.O_TRUNC != 0), nil
}

// openAs opens the object at comps for the caller: its directory as the
// server, then the object in it as the caller, which needs search
// permission on that directory and the access flags ask for. The
// directories above are not checked: a handle reaches an object without
// them, as with knfsd; LOOKUP checks each on the way down.
func (s *fsys) openAs(comps []string, flags int) (*os.File, error) {
	c := s.caller()
	if c == nil {
		return fstree.OpenBeneath(s.root, join(comps), flags)
	}
	dir, name := s.root, "."
	if n := len(comps); n > 0 {
		d, err := fstree.OpenBeneath(s.root, join(comps[:n-1]), unix.O_PATH|unix.O_DIRECTORY)
		if err != nil {
			return nil, err
		}
		defer d.Close()
		dir, name = d, comps[n-1]
	}
	var f *os.File
	err := c.as(func() (err error) {
		f, err = fstree.OpenBeneath(dir, name, flags)
		return err
	})
	return f, err
}

// file wraps an open file of the export; writes to it act as the caller.
func (s *fsys) file(f *os.File, name string, dirty bool) *file {
	return &file{File: f, name: name, sync: s.sync, dirty: dirty, caller: s.caller(), noteFailed: s.noteFailed}
}

// create opens p, creating it if it does not exist. A new file gets a new
// ID once its directory entry is durable; an existing one keeps its ID.
// The file is synced when closed (it is new, or truncated).
func (s *fsys) create(p string, flag int, perm os.FileMode) (billy.File, error) {
	var opened billy.File
	err := s.atPlace(p, func(at place) error {
		var st unix.Stat_t
		err := unix.Fstatat(int(at.dir.Fd()), at.name, &st, unix.AT_SYMLINK_NOFOLLOW)
		if err == nil {
			if flag&os.O_EXCL != 0 {
				return &fs.PathError{Op: "create", Path: p, Err: unix.EEXIST}
			}
			if _, err := s.ix.resolveLocked(at.comps); err != nil {
				return err
			}
			var f *os.File
			err := s.caller().as(func() (err error) {
				f, err = fstree.OpenBeneath(at.dir, at.name, flag&^os.O_CREATE|unix.O_NONBLOCK)
				return err
			})
			if err != nil {
				return err
			}
			opened = s.file(f, p, flag&os.O_TRUNC != 0)
			return nil
		}
		if !errors.Is(err, unix.ENOENT) {
			return &fs.PathError{Op: "create", Path: p, Err: err}
		}
		if err := s.ix.forget(at.pid, at.name); err != nil {
			return err
		}
		how := unix.OpenHow{Flags: uint64(flag | os.O_EXCL | unix.O_NONBLOCK | unix.O_NOFOLLOW | unix.O_CLOEXEC),
			Mode: uint64(fstree.UnixPerm(perm)), Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS}
		var fd int
		err = s.caller().as(func() (err error) {
			// As the caller: the kernel checks the directory, and the
			// file belongs to the caller.
			fd, err = unix.Openat2(int(at.dir.Fd()), at.name, &how)
			return err
		})
		if err != nil {
			return &fs.PathError{Op: "create", Path: p, Err: err}
		}
		f := os.NewFile(uintptr(fd), join(at.comps))
		if err := s.newEntry(at.dir, at.pid, at.name); err != nil {
			f.Close()
			return err
		}
		opened = s.file(f, p, true)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return opened, nil
}

// change runs do while the export is open, under ix.mu: the frame of
// every change of the namespace (see index.mu).
func (s *fsys) change(do func() error) error {
	if err := s.enter(); err != nil {
		return err
	}
	defer s.leave()
	s.ix.mu.Lock()
	defer s.ix.mu.Unlock()
	err := do()
	s.noteFailed(err)
	return err
}

// place is where an object that a change creates, renames or removes
// stands.
type place struct {
	comps []string // the object's path under the root
	pid   uint64   // the ID of its directory
	dir   *os.File // its directory, open
	name  string   // its name in dir
}

// atPlace runs do as a change on the place of p, an object to create or
// remove, with its directory open until do returns.
func (s *fsys) atPlace(p string, do func(at place) error) error {
	return s.change(func() error {
		comps, err := s.realNew(p)
		if err != nil {
			return err
		}
		at, err := s.parent(comps)
		if err != nil {
			return err
		}
		defer at.dir.Close()
		return do(at)
	})
}

// parent resolves the directory of comps: its ID and an open descriptor,
// which the caller closes. mu is held.
func (s *fsys) parent(comps []string) (place, error) {
	n := len(comps) - 1
	pid, err := s.ix.resolveLocked(comps[:n])
	if err != nil {
		return place{}, err
	}
	dir, err := fstree.OpenBeneath(s.root, join(comps[:n]), unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return place{}, err
	}
	return place{comps: comps, pid: pid, dir: dir, name: comps[n]}, nil
}

// newEntry makes a new directory entry durable, then gives it an ID.
func (s *fsys) newEntry(dir *os.File, pid uint64, name string) error {
	if err := s.sync.Sync(dir); err != nil {
		return &fs.PathError{Op: "sync", Path: dir.Name(), Err: err}
	}
	_, err := s.ix.placeNew(pid, name)
	return err
}

// MkdirAll creates the last component only: go-nfs checked its parent.
func (s *fsys) MkdirAll(p string, perm os.FileMode) error {
	return s.make(p, func(dir *os.File, name string) error {
		return unix.Mkdirat(int(dir.Fd()), name, fstree.UnixPerm(perm))
	})
}

// Symlink creates link pointing at target; the target is not checked (a
// symlink is never followed by the server).
func (s *fsys) Symlink(target, link string) error {
	return s.make(link, func(dir *os.File, name string) error {
		return unix.Symlinkat(target, int(dir.Fd()), name)
	})
}

// make creates a directory or symlink with do, as the caller, then
// records it.
func (s *fsys) make(p string, do func(dir *os.File, name string) error) error {
	return s.atPlace(p, func(at place) error {
		var st unix.Stat_t
		if err := unix.Fstatat(int(at.dir.Fd()), at.name, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil {
			return &fs.PathError{Op: "create", Path: p, Err: unix.EEXIST}
		}
		if err := s.ix.forget(at.pid, at.name); err != nil {
			return err
		}
		if err := s.caller().as(func() error { return do(at.dir, at.name) }); err != nil {
			return &fs.PathError{Op: "create", Path: p, Err: err}
		}
		return s.newEntry(at.dir, at.pid, at.name)
	})
}

// Readlink reads a symlink's target.
func (s *fsys) Readlink(p string) (string, error) {
	if err := s.enter(); err != nil {
		return "", err
	}
	defer s.leave()
	s.ix.tmu.RLock()
	defer s.ix.tmu.RUnlock()
	comps, err := s.real(p)
	if err != nil {
		return "", err
	}
	if len(comps) == 0 {
		return "", &fs.PathError{Op: "readlink", Path: p, Err: unix.EINVAL}
	}
	dir, err := fstree.OpenBeneath(s.root, join(comps[:len(comps)-1]), unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return "", err
	}
	defer dir.Close()
	buf := make([]byte, unix.PathMax)
	n, err := unix.Readlinkat(int(dir.Fd()), comps[len(comps)-1], buf)
	if err != nil {
		return "", &fs.PathError{Op: "readlink", Path: p, Err: err}
	}
	return string(buf[:n]), nil
}

// TempFile is not offered: go-nfs does not use it.
func (s *fsys) TempFile(dir, prefix string) (billy.File, error) { return nil, billy.ErrNotSupported }

// Chroot is not offered: one export, one root.
func (s *fsys) Chroot(string) (billy.Filesystem, error) { return nil, billy.ErrNotSupported }

// Root names the export.
func (s *fsys) Root() string { return s.root.Name() }
