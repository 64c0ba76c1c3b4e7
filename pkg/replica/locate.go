package replica

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path"
	"runtime"
	"slices"
	"strings"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/journal"
	"golang.org/x/sys/unix"
)

// Finding what changed in a big directory without reading it (issue 18).
//
// A directory's inode update says that its entries changed, not which:
// reading it whole to find out cost in proportion to its entries, in every
// pass. A big directory (shadow.big) is not read: the pass looks where the
// inodes whose records it holds were and where they are now. Every change
// of an entry updates the inode it names or named (a new inode, its link
// count, a rename's ctime: ext4, XFS and btrfs alike), and capture reports
// that update as any other (docs/CAPTURE.md).
//
// For each such inode the names the shadow has for it are looked up, and
// where it is now is read from the dentry cache: the path of its file
// handle (open_by_handle_at, then /proc/self/fd). Each name is looked up
// after a barrier on its directory: reading a directory takes its lock,
// which an operation on its entries holds from before it updates the
// inodes until the dentry cache has the change. A record of this pass was
// emitted before the pass dropped the inode's mark; an operation still
// running then holds the lock, and the barrier waits for it to end. One
// that updates the inode after the mark was dropped emits a new record,
// for a later pass.
//
// An inode is placed for sure when the names found account for its link
// count (a directory has one name). When they do not (a name outside the
// tree beside one inside, two new links in one pass, a dentry the cache
// no longer has), the pass reads every big directory whole.

// locate returns, by directory, the names that the pass's inodes may have
// entered or left, and whether some inode could not be placed for sure
// (readAll: every big directory must then be read whole).
func (b *builder) locate(files []journal.File) (near map[uint64]map[string]bool, readAll bool) {
	var todo []journal.File
	for _, f := range files {
		// A name changes with the inode's metadata (Attr), or it is
		// new; data alone moves no name.
		if f.Key.Dev == b.dev && f.Key.Ino != b.sh.root && (f.Attr || f.Rescan || f.NewSeq != 0) {
			todo = append(todo, f)
		}
	}
	if len(todo) == 0 {
		return nil, false
	}
	// Placing an inode costs what reading some hundred entries does:
	// a pass with many (an archive unpacked) reads the big directories,
	// unless it has few.
	entries := 0
	for ino := range b.sh.big {
		entries += b.sh.childCount(ino)
	}
	if len(todo) > max(placeCost, entries/placeCost) {
		b.log.Debug("many inodes to place: every big directory is read", "inodes", len(todo), "entries", entries)
		return nil, true
	}
	l, err := newLocator(b)
	if err != nil {
		b.log.Debug("inodes cannot be placed: every big directory is read", "err", err)
		return nil, true
	}
	defer l.close()
	near = map[uint64]map[string]bool{}
	add := func(dir uint64, name string) {
		m := near[dir]
		if m == nil {
			m = map[string]bool{}
			near[dir] = m
		}
		m[name] = true
	}
	for _, f := range todo {
		if err := l.place(f, add); err != nil {
			b.log.Debug("inode not placed: every big directory is read", "ino", f.Key.Ino, "why", err)
			return near, true
		}
	}
	return near, false
}

// placeCost is what placing an inode costs, in entries read whole
// (BenchmarkHugeDirCreate: about 60 µs against 0.6 µs).
const placeCost = 100

// locator looks inodes up for one pass.
type locator struct {
	b       *builder
	rootAbs string // the root's path as /proc/self/fd shows paths
	rootDev uint64
	// mount opens files by handle: the root open for reading
	// (open_by_handle_at refuses an O_PATH descriptor).
	mount *os.File
	// The root's file handle, the model of every other (handleFor).
	htype int32
	hroot []byte
	// Directories opened (and so passed the barrier) in this pass, by
	// path: beneath the root, or absolute for those outside the tree.
	dirs map[string]*lookDir
}

type lookDir struct {
	f   *os.File
	ino uint64
}

// maxLookDirs bounds the directories a pass keeps open.
const maxLookDirs = 256

func newLocator(b *builder) (*locator, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(b.root.Fd()), &st); err != nil {
		return nil, err
	}
	abs, err := fdPath(b.root)
	if err != nil {
		return nil, err
	}
	h, _, err := unix.NameToHandleAt(int(b.root.Fd()), "", unix.AT_EMPTY_PATH)
	if err != nil {
		return nil, fmt.Errorf("file handle of the root: %w", err)
	}
	mount, err := fstree.OpenBeneath(b.root, ".", unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return nil, err
	}
	return &locator{b: b, rootAbs: abs, rootDev: st.Dev, mount: mount, htype: h.Type(), hroot: h.Bytes(), dirs: map[string]*lookDir{}}, nil
}

func (l *locator) close() {
	l.closeDirs()
	l.mount.Close()
}

func (l *locator) closeDirs() {
	for p, d := range l.dirs {
		d.f.Close()
		delete(l.dirs, p)
	}
}

// fdPath is the path /proc/self/fd shows for f.
func fdPath(f *os.File) (string, error) {
	p, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
	runtime.KeepAlive(f)
	return p, err
}

// place adds the names where f's inode was and is, or returns why it
// cannot be placed for sure.
func (l *locator) place(f journal.File, add func(dir uint64, name string)) error {
	ino := f.Key.Ino
	sh := l.b.sh
	n, known := sh.node(ino)
	// The names the shadow has, and which of them hold the inode still.
	var held []link
	var nlink uint64
	if known {
		for _, ln := range sh.names(ino) {
			add(ln.parent, ln.name)
			dir, ok := sh.path(ln.parent)
			if !ok {
				continue
			}
			if st, ok := l.lookup(dir, ln.parent, ln.name); ok && st.Ino == ino {
				held = append(held, ln)
				nlink = uint64(st.Nlink)
			}
		}
		if len(held) > 0 && len(held) == sh.nameCount(ino) && (n.mode.IsDir() || nlink == uint64(len(held))) {
			return nil // where the shadow has it, and nowhere else
		}
	}
	// Where the dentry cache has it now.
	gen, genOK := f.Gen, f.HasGen
	if !genOK && known && n.genKnown {
		gen, genOK = n.gen, true
	}
	now, err := l.where(ino, gen)
	switch {
	case errors.Is(err, unix.ESTALE) && genOK && f.Rescan:
		// Records about the number were lost: one may have been the
		// allocation of a new inode that holds it now, with another
		// generation, under a name no record of this pass names.
		// Taken for gone, `rm A/g; ln -s x A/n1` with n1 taking g's
		// number and its records lost left n1 off the peer for good
		// (TestLocateNumberTakenWithRecordsLost, found by the random
		// histories).
		return fmt.Errorf("records of number %d lost, its inode of generation %d gone: another may hold it", ino, gen)
	case errors.Is(err, unix.ESTALE) && genOK:
		return nil // no such inode any more: it has no name
	case err != nil:
		return err
	case now.nlink == 0:
		return nil // unlinked: no name
	}
	if now.known {
		add(now.parent, now.name)
	}
	found := len(held)
	if !now.inTree || !slices.Contains(held, link{now.parent, now.name}) {
		found++
	}
	if !now.dir && uint64(found) != now.nlink {
		return fmt.Errorf("%d of its %d names found", found, now.nlink)
	}
	return nil
}

// spot is an inode's place, as its file handle's path shows it.
type spot struct {
	nlink uint64
	dir   bool
	// inTree: the path is beneath the root; known: its directory is in
	// the shadow (one that is not is new, and read whole when made).
	inTree, known bool
	parent        uint64
	name          string
	// dirPath is the path of its directory beneath the root (inTree).
	dirPath string
}

// where finds a name of inode ino (generation gen) and checks, after the
// barrier on its directory, that the name holds it.
func (l *locator) where(ino uint64, gen uint32) (spot, error) {
	h, ok := handleFor(l.htype, l.hroot, ino, gen)
	if !ok {
		return spot{}, fmt.Errorf("file handles of type %#x are not known", l.htype)
	}
	fd, err := unix.OpenByHandleAt(int(l.mount.Fd()), unix.NewFileHandle(l.htype, h), unix.O_PATH|unix.O_CLOEXEC)
	if err != nil {
		return spot{}, fmt.Errorf("open_by_handle_at: %w", err)
	}
	f := os.NewFile(uintptr(fd), "")
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return spot{}, err
	}
	if st.Ino != ino || st.Dev != l.rootDev {
		return spot{}, fmt.Errorf("the handle opened inode %d of device %d", st.Ino, st.Dev)
	}
	w := spot{nlink: uint64(st.Nlink), dir: st.Mode&unix.S_IFMT == unix.S_IFDIR}
	if w.nlink == 0 {
		return w, nil
	}
	// An operation running on the name's directory may move it: look
	// again after the barrier, until the name holds still.
	for range 3 {
		p, err := fdPath(f)
		if err != nil {
			return w, err
		}
		if !path.IsAbs(p) {
			return w, fmt.Errorf("no path: %q", p)
		}
		if p == "/" && !w.dir && l.rootAbs != "/" {
			// A file whose dentry the kernel let go is opened
			// disconnected, with no name (directories are connected
			// again): alive, place unknown (from a review).
			return w, errNoPath
		}
		var dir, rel string
		switch {
		case l.rootAbs == "/":
			rel = p[1:]
		case strings.HasPrefix(p, l.rootAbs+"/"):
			rel = p[len(l.rootAbs)+1:]
		default:
			dir = path.Dir(p) // outside the tree
		}
		w.inTree = dir == ""
		if w.inTree {
			dir = path.Dir(rel)
		}
		w.name = path.Base(p)
		d, err := l.open(dir, w.inTree)
		if err != nil {
			continue // renamed or removed meanwhile
		}
		var now unix.Stat_t
		if err := unix.Fstatat(int(d.f.Fd()), w.name, &now, unix.AT_SYMLINK_NOFOLLOW); err != nil || now.Ino != ino || now.Dev != l.rootDev {
			continue
		}
		if w.inTree {
			w.parent, w.dirPath = d.ino, dir
			dn, ok := l.b.sh.node(d.ino)
			w.known = ok && dn.mode.IsDir()
		}
		return w, nil
	}
	return w, errNotStill
}

// errNotStill: where found a live inode's name three times, and each time
// it had moved before it was checked (w.inTree tells where the last one
// was).
var errNotStill = errors.New("no name of it holds still")

// errNoPath: where opened a live file by its handle with no path (its
// dentry disconnected): it cannot tell where the file is.
var errNoPath = errors.New("opened with no path")

// knownAncestor is the nearest directory above dir (beneath the root)
// that the shadow knows, the root at the latest: reading it finds what
// is new below it, down to dir.
func (l *locator) knownAncestor(dir string) (uint64, bool) {
	for dir != "." {
		dir = path.Dir(dir)
		d, err := l.open(dir, true)
		if err != nil {
			return 0, false
		}
		if n, ok := l.b.sh.node(d.ino); ok && n.mode.IsDir() {
			return d.ino, true
		}
	}
	return 0, false
}

// lookup stats name in directory ino at dir (beneath the root) after the
// barrier; false if the directory is not there or the name holds nothing.
func (l *locator) lookup(dir string, ino uint64, name string) (unix.Stat_t, bool) {
	var st unix.Stat_t
	d, err := l.open(dir, true)
	if err != nil || d.ino != ino {
		return st, false
	}
	if err := unix.Fstatat(int(d.f.Fd()), name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil || st.Dev != l.rootDev {
		return st, false
	}
	return st, true
}

// open opens a directory, beneath the root (inTree) or by its absolute
// path, once a pass, and passes the barrier on it: an operation on its
// entries that was running has ended when open returns.
func (l *locator) open(dir string, inTree bool) (*lookDir, error) {
	key := dir
	if !inTree {
		key = "\x00" + dir // apart from the paths beneath the root
	}
	if d := l.dirs[key]; d != nil {
		return d, nil
	}
	if len(l.dirs) >= maxLookDirs {
		l.closeDirs()
	}
	var f *os.File
	var err error
	if inTree {
		f, err = fstree.OpenBeneath(l.b.root, dir, fstree.ReadDirFlags)
	} else {
		// Outside the tree, on its filesystem: its reading would be
		// captured too (the capture goes by device), and placed by
		// reading its parent in turn.
		f, err = os.OpenFile(dir, fstree.ReadDirFlags, 0)
		if errors.Is(err, unix.EPERM) {
			f, err = os.OpenFile(dir, fstree.ReadDirFlags&^unix.O_NOATIME, 0)
		}
	}
	if err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, err
	}
	// The barrier: getdents takes the directory's lock, whatever it
	// reads.
	var buf [1024]byte
	if _, err := unix.Getdents(int(f.Fd()), buf[:]); err != nil {
		f.Close()
		return nil, fmt.Errorf("reading directory %s: %w", dir, err)
	}
	d := &lookDir{f: f, ino: st.Ino}
	l.dirs[key] = d
	return d, nil
}

// handleFor makes the file handle of inode ino (generation gen) from the
// root's handle, of type typ: the layouts handleGeneration reads, without
// the parent. ext4 (1) is {u32 ino, u32 gen}; XFS (1, or 0x81 with 64-bit
// numbers) {u32 or u64 ino, u32 gen}; btrfs (0x4d) {u64 ino, u64
// subvolume, u32 gen}, the subvolume the root's.
func handleFor(typ int32, root []byte, ino uint64, gen uint32) ([]byte, bool) {
	le := binary.LittleEndian
	switch {
	case typ == 1 && len(root) >= 8 && ino <= 0xffffffff:
		h := make([]byte, 8)
		le.PutUint32(h, uint32(ino))
		le.PutUint32(h[4:], gen)
		return h, true
	case typ == 0x81 && len(root) >= 12:
		h := make([]byte, 12)
		le.PutUint64(h, ino)
		le.PutUint32(h[8:], gen)
		return h, true
	case typ == 0x4d && len(root) >= 20:
		h := make([]byte, 20)
		le.PutUint64(h, ino)
		copy(h[8:16], root[8:16])
		le.PutUint32(h[16:], gen)
		return h, true
	}
	return nil, false
}
