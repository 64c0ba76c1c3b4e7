package replica

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"runtime"
	"strings"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// Applier makes ops happen under a replica root, and nowhere else, even
// while a local user renames entries of the replica under it: every
// lookup goes through openat2 with RESOLVE_BENEATH, RESOLVE_NO_SYMLINKS
// and RESOLVE_NO_XDEV (fstree.OpenSameMount); final components are
// created, renamed and removed with *at calls on the parent, which never
// follow a symlink; and attributes are set on an O_PATH handle of the
// entry (see entryAt), never through its name. Ops are idempotent so that
// a batch replayed after a reconnect is harmless.
type Applier struct {
	root  *os.File
	sync  *os.File            // the root opened for reading: syncfs refuses O_PATH
	files map[string]*os.File // open for writing within one batch
	// What the batch touched, for a targeted flush: files written (true:
	// their attributes too) and directories whose entries changed.
	// overflow means "too many: syncfs".
	dirty    map[string]bool
	dirs     map[string]bool
	overflow bool
	syncfs   func(fd int) error // unix.Syncfs; a test counts or fails it
	// setattrDid is what the last setattr applied changed (for touch).
	setattrDid setattrDone
	// strict: the op to apply cannot be one applied before (a replay
	// after a restart): a link or rename whose source is gone and whose
	// target exists is then a copy that differs from the primary's, not
	// one already done. The replication loop sets it; the zero value
	// tolerates replays.
	strict bool
	// Warn, if set, logs what the applier does not apply as asked:
	// once a file (withheld) for as long as the applier lives.
	Warn     func(msg string, args ...any)
	withheld map[devIno]bool
}

type devIno struct{ dev, ino uint64 }

// maxWithheld bounds Applier.withheld: past it, withheld set-id bits are
// no longer logged.
const maxWithheld = 1 << 12

// madeMark is on an inode the applier made for a create that asked for
// set-id bits (made without them): a setattr may add them to it
// (withholdSetid), and the first that changes its owner or mode, bits
// given or not, takes the mark away (setattrChecked). An extended
// attribute in the trusted namespace: only a process with CAP_SYS_ADMIN
// sets or removes one, and it is the inode's, not its number's (a number
// freed and reused by a local user's file, a review: TestS46bMadeInodeNumberReused),
// and outlives the connection and the daemon (a create and its setattr
// may come over two: TestS46bSetidLostAcrossApplier). Not replicated.
const madeMark = "trusted.duet.setid"

// marked reports whether the inode h holds (a descriptor, or an O_PATH
// handle) carries madeMark.
func marked(h *os.File) bool {
	var b [1]byte
	_, err := unix.Fgetxattr(int(h.Fd()), madeMark, b[:])
	if errors.Is(err, unix.EBADF) { // an O_PATH handle
		_, err = unix.Getxattr(procLink(h), madeMark, b[:])
	}
	return err == nil
}

// procLink is the /proc/self/fd link of h, which leads to the inode h
// holds and no other: the way to the calls that refuse an O_PATH handle.
func procLink(h *os.File) string { return fmt.Sprintf("/proc/self/fd/%d", h.Fd()) }

// unmark takes madeMark away from the inode h holds (ENODATA: it had
// none).
func unmark(h *os.File) error {
	err := unix.Fremovexattr(int(h.Fd()), madeMark)
	if errors.Is(err, unix.EBADF) { // an O_PATH handle
		err = unix.Removexattr(procLink(h), madeMark)
	}
	return err
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
	// Flushed through the descriptors the batches wrote with, where
	// still open (no second lookup), closed after.
	defer a.closeFiles()
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
	// A file only written, truncated or punched needs fdatasync: it
	// makes the data and the size and block map that reach it durable,
	// and skips the journal commit that the write's new mtime would
	// cost (the peer's flush is on every durability call's path, and
	// the mtime a write leaves on the replica is this host's anyway). A
	// setattr's mode, owner and times must last: fsync.
	for p, attrs := range a.dirty {
		flush := unix.Fdatasync
		if attrs {
			flush = unix.Fsync
		}
		if f := a.files[p]; f != nil {
			if err := flush(int(f.Fd())); err != nil {
				return fmt.Errorf("flushing %q: %w", p, err)
			}
			continue
		}
		if err := a.flush(p, unix.O_RDONLY, flush); err != nil {
			return err
		}
	}
	for d := range a.dirs {
		if err := a.flush(d, unix.O_RDONLY|unix.O_DIRECTORY, unix.Fsync); err != nil {
			return err
		}
	}
	return nil
}

// flush flushes one path with sync. One that is gone since (removed later
// in the batch), is a symlink, a FIFO or a socket (its directory is
// flushed) needs nothing.
func (a *Applier) flush(p string, flags int, sync func(fd int) error) error {
	f, err := a.openRegular(p, flags)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) || errors.Is(err, errNotRegular) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("flushing %q: %w", p, err)
	}
	defer f.Close()
	if err := sync(int(f.Fd())); err != nil {
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
	pf, err := fstree.OpenSameMount(a.root, p, unix.O_PATH|unix.O_NOFOLLOW)
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
	// The path is looked up anew: non-blocking all the same, and what
	// opened must be what was checked. Something renamed over p meanwhile
	// (a FIFO whose reader would get the data) is closed unused.
	f, err := fstree.OpenSameMount(a.root, p, flags|unix.O_NONBLOCK|unix.O_NOFOLLOW)
	if err != nil {
		return nil, err
	}
	var now unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &now); err != nil || now.Dev != st.Dev || now.Ino != st.Ino {
		f.Close()
		return nil, fmt.Errorf("%w while it was being opened", errReplaced)
	}
	return f, nil
}

// errReplaced: an entry changed under an op, by something else than the
// applier (a local user renaming entries of the replica). The op fails
// there, and its batch with it (§8 of DESIGN.md: the primary sends it
// again after a pause).
var errReplaced = errors.New("replaced on this replica by a local change")

// errAncestor refuses a rename over a directory that holds its source.
var errAncestor = errors.New("refused: the target is a directory holding the source, which replacing it would remove (this replica differs from the primary)")

// entryAt opens name in d as an O_PATH handle of the entry the name holds
// now, never a symlink's target (the handle is the link itself) nor what
// is mounted on it (EXDEV). Attributes set through the handle change that
// inode whatever is renamed over the name meanwhile: a chmod by name
// after a check of the name follows a symlink swapped in between.
func entryAt(d *os.File, name string) (*os.File, unix.Stat_t, error) {
	var st unix.Stat_t
	h, err := fstree.OpenSameMount(d, name, unix.O_PATH|unix.O_NOFOLLOW)
	if err != nil {
		return nil, st, err
	}
	if err := unix.Fstat(int(h.Fd()), &st); err != nil {
		h.Close()
		return nil, st, &fs.PathError{Op: "stat", Path: name, Err: err}
	}
	return h, st, nil
}

// chmodHandle sets the mode of the inode h (from entryAt, not a symlink)
// holds. fchmodat2 (Linux 6.6) takes the handle itself; where it is
// missing (x/sys reports EOPNOTSUPP), chmodProc does it.
func chmodHandle(h *os.File, mode uint32) error {
	err := unix.Fchmodat(int(h.Fd()), "", mode, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.EOPNOTSUPP) {
		err = chmodProc(h, mode)
	}
	if err != nil {
		return &fs.PathError{Op: "chmod", Path: h.Name(), Err: err}
	}
	return nil
}

// chmodProc sets the mode of the inode that O_PATH handle h holds by its
// /proc/self/fd link, which leads to that inode and no other (glibc's
// fchmodat(AT_SYMLINK_NOFOLLOW) does the same before fchmodat2). For a
// symlink it fails with EOPNOTSUPP, as it should: the link's target is
// not to be touched.
func chmodProc(h *os.File, mode uint32) error {
	err := unix.Chmod(procLink(h), mode)
	runtime.KeepAlive(h)
	if errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("/proc is not mounted (needed to chmod without fchmodat2, before Linux 6.6): %w", err)
	}
	return err
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

// dirtyAt says whether the entry at p, or one beneath it, is a file
// written since the last Sync. An op that makes an entry at p may first
// remove what was there (a mkdir over a file: removeAt), and the file
// written may live on under another name (a hard link, as `ln p q; rm p;
// mkdir p` ships, or the name the builder keeps a replaced file aside
// under): flushed by its recorded path, Sync flushed the new entry, never
// the written file, and acknowledged it durable (a review:
// TestPowerCutReplacedByDirectory lost 64 KiB acknowledged durable on ext4
// and XFS). Such an op makes Sync a syncfs.
func (a *Applier) dirtyAt(p string) bool {
	if _, ok := a.dirty[p]; ok {
		return true
	}
	for d := range a.dirty {
		if strings.HasPrefix(d, p+"/") {
			return true
		}
	}
	return false
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
		if _, ok := a.dirty[op.Path]; !ok {
			a.dirty[op.Path] = false // data: fdatasync, unless a setattr asks more
		}
	case wire.OpSetattr:
		// Times alone ride with the data (fdatasync): a peer crash may
		// leave a file's times older than its content, which the next
		// comparison sees as a difference, never the reverse.
		if a.setattrDid.ownerOrMode {
			a.dirty[op.Path] = true
		} else if _, ok := a.dirty[op.Path]; !ok {
			a.dirty[op.Path] = false
		}
		if a.setattrDid.unopened {
			// A symlink, FIFO or socket cannot be opened to be
			// flushed, and its directory's fsync does not cover the
			// entry's own inode everywhere (XFS forces its log only
			// up to the directory's last change: a chown acknowledged
			// durable was lost to a power cut, a review's
			// TestPowerCutAfterDurableAck): syncfs for an owner or a
			// mode. Times alone need not last (see above): the
			// directory's fsync.
			if a.setattrDid.ownerOrMode {
				a.overflow = true
			} else {
				a.dirs[dirOf(op.Path)] = true
			}
		}
	case wire.OpRemove:
		// A removed subtree may hold files written earlier in the batch.
		a.overflow = true
	case wire.OpLink, wire.OpRename:
		if op.Code == wire.OpLink && a.dirtyAt(op.Path2) {
			// A link over a dirty name: that file may live on under
			// another name, which no recorded path names.
			a.overflow = true
		}
		if op.Code == wire.OpRename {
			// Dirty files may have moved: flush their new names too.
			a.overflow = a.overflow || len(a.dirty) > 0
			// So may directories whose entries changed, the source
			// itself or beneath it: their recorded paths would name
			// nothing, and the directories holding the changed entries
			// would go unflushed (TestFlushFollowsRenamedDirectory).
			for d := range a.dirs {
				if d == op.Path || strings.HasPrefix(d, op.Path+"/") {
					a.overflow = true
					break
				}
			}
		}
		a.dirs[dirOf(op.Path)] = true
		a.dirs[dirOf(op.Path2)] = true
	case wire.OpCreate, wire.OpMkdir:
		if a.dirtyAt(op.Path) {
			a.overflow = true // see dirtyAt
		}
		a.dirs[dirOf(op.Path)] = true
		// The mode is set after the entry is made (the umask strips
		// some bits): fsync, which a setattr of times alone that
		// follows would not ask.
		a.dirty[op.Path] = true
	default: // symlink, mknod
		if a.dirtyAt(op.Path) {
			a.overflow = true // see dirtyAt
		}
		a.dirs[dirOf(op.Path)] = true
	}
	if len(a.dirty)+len(a.dirs) > maxTargeted {
		a.overflow = true
	}
}

// parent opens the directory holding p and returns it with p's base name.
func (a *Applier) parent(p string) (*os.File, string, error) {
	dir, base := path.Split(p)
	d, err := fstree.OpenSameMount(a.root, dir, unix.O_PATH|unix.O_DIRECTORY)
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
	if op.Code == wire.OpLink || op.Code == wire.OpRename {
		if err := wire.ValidPath(op.Path2); err != nil {
			return fmt.Errorf("to %q: %w", op.Path2, err)
		}
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
	case wire.OpSetattr:
		if f := a.files[op.Path]; f != nil {
			// Written since the last namespace op: the descriptor is
			// the file's, and the times a write leaves need no
			// lookup.
			var st unix.Stat_t
			if err := unix.Fstat(int(f.Fd()), &st); err != nil {
				return err
			}
			var err error
			a.setattrDid, err = a.setattrChecked(f, &st, path.Base(op.Path), op)
			return err
		}
	}
	if op.Code != wire.OpSetattr {
		// Namespace ops change what paths name: drop cached files.
		a.closeFiles()
	}
	d, base, err := a.parent(op.Path)
	if err != nil {
		return err
	}
	defer d.Close()
	dfd := int(d.Fd())
	switch op.Code {
	case wire.OpMkdir:
		h, st, err := entryAt(d, base)
		switch {
		case err == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR:
			defer h.Close()
			return chmodHandle(h, op.Mode&0o7777)
		case err == nil:
			h.Close()
			if err := a.removeAt(d, base); err != nil {
				return err
			}
		case !errors.Is(err, unix.ENOENT):
			return err
		}
		if err := unix.Mkdirat(dfd, base, op.Mode&0o7777); err != nil {
			return err
		}
		// The mode again, free of the umask, on what the name holds now.
		h, st, err = entryAt(d, base)
		if err != nil {
			return err
		}
		defer h.Close()
		if t := st.Mode & unix.S_IFMT; t != unix.S_IFDIR {
			return fmt.Errorf("%w (%s where the directory was made)", errReplaced, kindOf(t))
		}
		return chmodHandle(h, op.Mode&0o7777)
	case wire.OpCreate:
		// A new inode on the primary: never truncate an existing one, it
		// may have other names. What holds the name is removed only if
		// there is one: most creates (a resync's) find it free.
		//
		// Made without set-id bits: the daemon makes it as root, and
		// its owner comes in the setattr after its content, maybe in a
		// later batch; meanwhile a set-uid program of the primary's
		// user would be set-uid root here, for any local user to run,
		// or to take away with a rename in a directory they may write
		// (a review, forty-sixth session:
		// TestReviewS46CreateIsSetuidRootBeforeItsOwner). That setattr
		// adds them (madeMark, withholdSetid).
		//
		// Nor, then, with write bits for group and others: the bytes
		// of a file that will be set-id are the applier's alone until
		// the setattr gives the bits and the mode.
		const excl = unix.O_CREAT | unix.O_EXCL | unix.O_WRONLY | unix.O_NOFOLLOW | unix.O_CLOEXEC
		perm := op.Mode & 0o1777
		if op.Mode&0o6000 != 0 {
			perm &^= 0o022
		}
		fd, err := unix.Openat(dfd, base, excl, perm)
		if errors.Is(err, unix.EEXIST) {
			if err := a.removeAt(d, base); err != nil {
				return err
			}
			fd, err = unix.Openat(dfd, base, excl, perm)
		}
		if err != nil {
			return err
		}
		if err := unix.Fchmod(fd, perm); err != nil {
			unix.Close(fd)
			return err
		}
		if op.Mode&0o6000 != 0 {
			if err := unix.Fsetxattr(fd, madeMark, []byte{1}, 0); err != nil && a.Warn != nil {
				a.Warn("cannot mark a new file as made for its set-id bits: they will be withheld", "path", op.Path, "err", err)
			}
		}
		// The size, data and times that follow go through this
		// descriptor: it is the inode just made, no lookup needed.
		a.files[op.Path] = os.NewFile(uintptr(fd), op.Path)
		return nil
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
		h, st, err := entryAt(d, base)
		if err != nil {
			return err
		}
		defer h.Close()
		a.setattrDid, err = a.setattrChecked(h, &st, base, op)
		return err
	}
	return fmt.Errorf("unknown op %d", op.Code)
}

// withholdSetid returns op without its set-id bits when the regular file
// h holds, whose stat is st, may not get them: they are added only to an
// inode the applier made for them (madeMark); an inode that has them
// keeps them while its owner and group stay. A file a local user of this host renamed or
// hard-linked over the name would otherwise run their bytes with the
// primary's owner's rights, set-uid root included (a review, forty-sixth
// session: TestReviewS46SetattrGivesUserFileSetuidRoot). Nothing in the
// inode tells it from one the applier wrote, once it holds the owner a
// setattr gave it: a setattr without the bits, then one with them, made
// the user's file set-uid root (TestSetidWithheldTwice). Withheld, the
// replica's mode lacks them (logged once a file; `duet verify` shows it)
// until the primary makes the file anew (a new inode, created here
// marked): no resync restores them, its setattr is withheld again.
func (a *Applier) withholdSetid(h *os.File, st *unix.Stat_t, op *wire.Op) (*wire.Op, bool) {
	want := op.Mode & 0o6000
	if want == 0 || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return op, false
	}
	if st.Uid == op.UID && st.Gid == op.GID && want&^st.Mode == 0 || marked(h) {
		return op, false
	}
	o := *op
	o.Mode &^= 0o6000
	if k := (devIno{st.Dev, st.Ino}); a.Warn != nil && !a.withheld[k] && len(a.withheld) <= maxWithheld {
		if a.withheld == nil {
			a.withheld = map[devIno]bool{}
		}
		a.withheld[k] = true
		if len(a.withheld) > maxWithheld {
			a.Warn("set-id bits withheld from more files: no longer logged on this connection", "files", maxWithheld)
			return &o, true
		}
		a.Warn("set-id bits withheld: the file this replica holds under the name is not one it made for them (a local user may have put it there)",
			"path", op.Path, "here", fmt.Sprintf("%d:%d %o, %d links", st.Uid, st.Gid, st.Mode&0o7777, st.Nlink),
			"primary", fmt.Sprintf("%d:%d %o", op.UID, op.GID, op.Mode&0o7777))
	}
	return &o, true
}

// setattrChecked applies op to the inode h holds, whose stat is st, set-id
// bits withheld where they may not be given (withholdSetid).
//
// The first setattr that changes the owner or the mode of a marked inode
// takes the mark away, whether it gives the bits or not: given to a user
// without them (the primary's chown cleared them before the replica saw
// its create's setattr), the file's bytes are that user's to write, and a
// later chown to root and chmod u+s must not find it marked (a review:
// TestS46cMarkOutlivesOwnerGiven).
func (a *Applier) setattrChecked(h *os.File, st *unix.Stat_t, name string, op *wire.Op) (setattrDone, error) {
	op, _ = a.withholdSetid(h, st, op)
	did, err := setattrOn(h, st, name, op)
	// Failed or not: a chown that went through before a failed chmod
	// has given the file away too (a review).
	if did.ownerOrMode && st.Mode&unix.S_IFMT == unix.S_IFREG {
		if err := unmark(h); err != nil && !errors.Is(err, unix.ENODATA) && a.Warn != nil {
			a.Warn("cannot take the set-id mark away from a file given its owner or mode", "path", op.Path, "err", err)
		}
	}
	return did, err
}

func (a *Applier) linkOrRename(code wire.OpCode, d *os.File, base string, d2 *os.File, base2 string) error {
	dfd, dfd2 := int(d.Fd()), int(d2.Fd())
	var src, dst unix.Stat_t
	srcErr := unix.Fstatat(dfd, base, &src, unix.AT_SYMLINK_NOFOLLOW)
	dstErr := unix.Fstatat(dfd2, base2, &dst, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(srcErr, unix.ENOENT) && dstErr == nil {
		if a.strict {
			// Not a replay: this copy lacks the source. Passed over,
			// the target kept whatever this copy had there while the
			// primary counted it in sync (TestRenameOfMissingSourceIsDivergence).
			return fmt.Errorf("the source is missing on this replica: %w", unix.ENOENT)
		}
		return nil // replayed: already done
	}
	if srcErr != nil {
		return srcErr
	}
	if dstErr == nil && src.Dev == dst.Dev && src.Ino == dst.Ino {
		if code != wire.OpRename {
			return nil
		}
		if src.Mode&unix.S_IFMT == unix.S_IFDIR || src.Nlink == 1 || sameEntry(d, base, d2, base2) {
			// Both paths name one entry: the same path, or a change of
			// case in a case-insensitive directory. Unlinking the
			// source would remove the file itself
			// (TestRenameOntoItsOwnEntryKeepsFile); the kernel's rename
			// changes the case, or nothing.
			return unix.Renameat(dfd, base, dfd2, base2)
		}
		// Two names of one inode (a hard link): the source name goes,
		// as on the primary.
		return unix.Unlinkat(dfd, base, 0)
	}
	if code == wire.OpLink {
		if src.Mode&unix.S_IFMT == unix.S_IFDIR {
			// A file on the primary (a link's source always is): this
			// copy holds a directory there.
			return fmt.Errorf("the source is a directory on this replica: %w", unix.EISDIR)
		}
		if dstErr == nil {
			if err := a.notAbove(d, &dst); err != nil {
				return err
			}
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
		if dstErr == nil {
			if err := a.notAbove(d, &dst); err != nil {
				return err
			}
		}
		if err := a.removeAt(d2, base2); err != nil {
			return err
		}
		err = unix.Renameat(dfd, base, dfd2, base2)
	}
	return err
}

// sameEntry reports whether base in d and base2 in d2 are the same name
// in the same directory.
func sameEntry(d *os.File, base string, d2 *os.File, base2 string) bool {
	if base != base2 {
		return false
	}
	var st, st2 unix.Stat_t
	if unix.Fstat(int(d.Fd()), &st) != nil || unix.Fstat(int(d2.Fd()), &st2) != nil {
		return false
	}
	return st.Dev == st2.Dev && st.Ino == st2.Ino
}

// notAbove refuses to replace dst, what a link or rename's target holds,
// if it is a directory holding the source (in d): no rename or link on
// the primary does that (Linux answers ENOTEMPTY), and removing it would
// remove the source with it (TestApplyRenameOverAncestorRefused).
func (a *Applier) notAbove(d *os.File, dst *unix.Stat_t) error {
	if dst.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil
	}
	above, err := a.within(d, dst)
	if err != nil {
		return err
	}
	if above {
		return errAncestor
	}
	return nil
}

// within says whether directory d is dir or lies beneath it, walking up
// from d to the replica's root.
func (a *Applier) within(d *os.File, dir *unix.Stat_t) (bool, error) {
	var root unix.Stat_t
	if err := unix.Fstat(int(a.root.Fd()), &root); err != nil {
		return false, err
	}
	fd, err := unix.Openat(int(d.Fd()), ".", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, err
	}
	defer func() { unix.Close(fd) }()
	for range 4096 {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return false, err
		}
		if st.Dev == dir.Dev && st.Ino == dir.Ino {
			return true, nil
		}
		if st.Dev != root.Dev || st.Ino == root.Ino {
			return false, nil
		}
		up, err := unix.Openat(fd, "..", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return false, err
		}
		unix.Close(fd)
		fd = up
	}
	return false, errors.New("directory nested too deep to tell its ancestors")
}

// setattrDone says what a setattr changed, for Sync: the owner or mode
// (the entry needs fsync), or its times only (a file written has them
// changed by every write: fdatasync with its data is enough); and whether
// the entry cannot be opened (a symlink, FIFO or socket: its directory is
// flushed).
type setattrDone struct {
	ownerOrMode, unopened bool
}

// setattrOn applies op to the inode h holds, whose stat is st.
func setattrOn(h *os.File, st *unix.Stat_t, name string, op *wire.Op) (setattrDone, error) {
	fd := int(h.Fd())
	t := st.Mode & unix.S_IFMT
	did := setattrDone{unopened: t != unix.S_IFREG && t != unix.S_IFDIR,
		ownerOrMode: st.Uid != op.UID || st.Gid != op.GID || st.Mode&0o7777 != op.Mode&0o7777}
	// A setattr follows most writes (their new times): owner and mode
	// are set only when they differ, sparing the inode two changes.
	if did.ownerOrMode {
		if err := unix.Fchownat(fd, "", int(op.UID), int(op.GID), unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return did, &fs.PathError{Op: "chown", Path: name, Err: err}
		}
		// chown clears set-id bits: chmod after it. Symlinks have no
		// mode.
		if t != unix.S_IFLNK {
			if err := chmodHandle(h, op.Mode&0o7777); err != nil {
				return did, err
			}
		}
	}
	ts := []unix.Timespec{unix.NsecToTimespec(op.Atime), unix.NsecToTimespec(op.Mtime)}
	if err := unix.UtimesNanoAt(fd, "", ts, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return did, &fs.PathError{Op: "utimes", Path: name, Err: err}
	}
	return did, nil
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
	sub, err := fstree.OpenSameMount(d, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW)
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
