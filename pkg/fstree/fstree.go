// Package fstree reads a directory tree the way duet compares it: entries
// with their metadata and per-block checksums, opened beneath a root file
// descriptor so that no path can leave the tree.
package fstree

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"runtime"
	"sort"
	"strings"
	"sync"

	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// Resolve flags for every lookup under a root: stay beneath it and never
// follow a symlink on the way.
const beneath = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS

// OpenRoot opens dir as the root that later lookups stay beneath.
func OpenRoot(dir string) (*os.File, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", dir, err)
	}
	return os.NewFile(uintptr(fd), dir), nil
}

// maxLookup is the longest path one lookup takes: PATH_MAX with its NUL.
const maxLookup = unix.PathMax - 1

// OpenBeneath opens rel (a wire path, or "." for the root) under root. A
// path longer than one lookup takes is walked a group of components at a
// time, each group beneath the directory the previous one opened.
//
// Files and directories duet reads to replicate them are opened with
// ReadFlags or ReadDirFlags: O_NOATIME, for a read that moved the access
// time dirtied the inode, which the capture reported as a change of its
// own, shipped in a pass of its own (a second batch, apply and flush on
// the peer for every synchronous write, and the primary's atimes moved
// by replication).
func OpenBeneath(root *os.File, rel string, flags int) (*os.File, error) {
	return openBeneath(root, rel, flags, beneath)
}

// ReadFlags opens a file to read it for replication (see OpenBeneath).
const ReadFlags = unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_NONBLOCK | unix.O_NOATIME

// ReadDirFlags opens a directory to list it for replication.
const ReadDirFlags = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_NOATIME

// OpenSameMount is OpenBeneath that also refuses to cross a mount point,
// rel's last component included (EXDEV): a filesystem mounted inside the
// root is not the one whose changes are replicated into it, and removing
// a directory there would empty whatever is mounted on it.
func OpenSameMount(root *os.File, rel string, flags int) (*os.File, error) {
	f, err := openBeneath(root, rel, flags, beneath|unix.RESOLVE_NO_XDEV)
	if pe, ok := err.(*fs.PathError); ok && pe.Err == unix.EXDEV {
		pe.Err = errCrossesMount
	}
	return f, err
}

// errCrossesMount names what EXDEV means to OpenSameMount.
var errCrossesMount = fmt.Errorf("leads across a mount point or out of the root: %w", unix.EXDEV)

func openBeneath(root *os.File, rel string, flags int, resolve uint64) (*os.File, error) {
	if rel == "" {
		rel = "."
	}
	dfd, left := int(root.Fd()), rel
	for len(left) > maxLookup {
		cut := strings.LastIndexByte(left[:maxLookup+1], '/')
		if cut <= 0 {
			closeUnless(dfd, root)
			return nil, &fs.PathError{Op: "open", Path: rel, Err: unix.ENAMETOOLONG}
		}
		fd, err := openat2(dfd, left[:cut], unix.O_PATH|unix.O_DIRECTORY, resolve)
		closeUnless(dfd, root)
		if err != nil {
			return nil, &fs.PathError{Op: "open", Path: rel, Err: err}
		}
		dfd, left = fd, left[cut+1:]
	}
	if left == "" {
		left = "." // rel ended with the slash of a directory
	}
	fd, err := openat2(dfd, left, flags, resolve)
	if err == unix.EPERM && flags&unix.O_NOATIME != 0 {
		// O_NOATIME needs the file's owner or CAP_FOWNER: without
		// either, the read moves the access time after all.
		fd, err = openat2(dfd, left, flags&^unix.O_NOATIME, resolve)
	}
	closeUnless(dfd, root)
	runtime.KeepAlive(root)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: rel, Err: err}
	}
	return os.NewFile(uintptr(fd), rel), nil
}

func openat2(dfd int, rel string, flags int, resolve uint64) (int, error) {
	how := unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC), Resolve: resolve}
	return unix.Openat2(dfd, rel, &how)
}

// closeUnless closes a descriptor OpenBeneath opened on its way.
func closeUnless(fd int, root *os.File) {
	if fd != int(root.Fd()) {
		unix.Close(fd)
	}
}

// Dirent is one directory entry as getdents reports it.
type Dirent struct {
	Ino  uint64
	Type uint8 // DT_*
	Name string
}

// ReadDir lists an open directory without following or stat'ing anything.
func ReadDir(dir *os.File) ([]Dirent, error) {
	var out []Dirent
	buf := make([]byte, 32<<10)
	fd := int(dir.Fd())
	if _, err := unix.Seek(fd, 0, io.SeekStart); err != nil {
		return nil, err
	}
	for {
		n, err := unix.Getdents(fd, buf)
		if err != nil {
			return nil, fmt.Errorf("reading directory %s: %w", dir.Name(), err)
		}
		if n <= 0 {
			return out, nil
		}
		for b := buf[:n]; len(b) >= 19; {
			reclen := int(binary.LittleEndian.Uint16(b[16:]))
			if reclen < 19 || reclen > len(b) {
				return nil, fmt.Errorf("reading directory %s: bad dirent length %d", dir.Name(), reclen)
			}
			name := b[19:reclen]
			for i, c := range name {
				if c == 0 {
					name = name[:i]
					break
				}
			}
			if s := string(name); s != "." && s != ".." {
				out = append(out, Dirent{Ino: binary.LittleEndian.Uint64(b), Type: b[18], Name: s})
			}
			b = b[reclen:]
		}
	}
}

// Stat returns the metadata of rel under root without following a final
// symlink.
func Stat(root *os.File, rel string) (unix.Stat_t, error) {
	var st unix.Stat_t
	dir, base := path.Split(rel)
	if rel == "" || rel == "." {
		err := unix.Fstat(int(root.Fd()), &st)
		return st, err
	}
	d, err := OpenBeneath(root, dir, unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return st, err
	}
	defer d.Close()
	err = unix.Fstatat(int(d.Fd()), base, &st, unix.AT_SYMLINK_NOFOLLOW)
	if err != nil {
		return st, &fs.PathError{Op: "lstat", Path: rel, Err: err}
	}
	return st, nil
}

// ModeOf converts a stat mode to io/fs form.
func ModeOf(m uint32) fs.FileMode {
	mode := fs.FileMode(m & 0o777)
	switch m & unix.S_IFMT {
	case unix.S_IFDIR:
		mode |= fs.ModeDir
	case unix.S_IFLNK:
		mode |= fs.ModeSymlink
	case unix.S_IFIFO:
		mode |= fs.ModeNamedPipe
	case unix.S_IFSOCK:
		mode |= fs.ModeSocket
	case unix.S_IFCHR:
		mode |= fs.ModeDevice | fs.ModeCharDevice
	case unix.S_IFBLK:
		mode |= fs.ModeDevice
	}
	if m&unix.S_ISUID != 0 {
		mode |= fs.ModeSetuid
	}
	if m&unix.S_ISGID != 0 {
		mode |= fs.ModeSetgid
	}
	if m&unix.S_ISVTX != 0 {
		mode |= fs.ModeSticky
	}
	return mode
}

// UnixPerm converts io/fs permission and special bits to a chmod mode.
func UnixPerm(m fs.FileMode) uint32 {
	p := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		p |= unix.S_ISUID
	}
	if m&fs.ModeSetgid != 0 {
		p |= unix.S_ISGID
	}
	if m&fs.ModeSticky != 0 {
		p |= unix.S_ISVTX
	}
	return p
}

// EntryOf builds an entry from stat data.
func EntryOf(rel string, st *unix.Stat_t) wire.Entry {
	return wire.Entry{
		Path:  rel,
		Mode:  ModeOf(st.Mode),
		UID:   st.Uid,
		GID:   st.Gid,
		Size:  uint64(st.Size),
		Mtime: st.Mtim.Nano(),
		Ctime: st.Ctim.Nano(),
		Rdev:  st.Rdev,
		Ino:   st.Ino,
	}
}

// SumBlock checksums one block.
func SumBlock(b []byte) wire.Sum {
	h := sha256.Sum256(b)
	var s wire.Sum
	copy(s[:], h[:])
	return s
}

// sumRead is the most Sums reads at once.
const sumRead = 1 << 20

// Sums checksums every block of 1 << shift bytes of f up to size (shift
// 0: wire.BlockShift).
func Sums(f *os.File, size uint64, shift uint8) ([]wire.Sum, error) {
	if shift == 0 {
		shift = wire.BlockShift
	}
	bs := uint64(1) << shift
	n := (size + bs - 1) / bs
	sums := make([]wire.Sum, 0, n)
	// Read in pieces of up to sumRead whatever the block (a file's
	// size, rounded up to a block, if smaller): from a cold cache one
	// reader of 64 KiB pieces read 356 MB/s where 1 MiB ones read 1.8
	// GB/s (ext4 on a loop device, 16 files of 64 MiB).
	buf := make([]byte, min(max(bs, wire.BlockSize, sumRead), (size+bs-1)/bs*bs))
	for off := uint64(0); off < size; off += uint64(len(buf)) {
		want := min(uint64(len(buf)), size-off)
		got, err := f.ReadAt(buf[:want], int64(off))
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("reading %s at %d: %w", f.Name(), off, err)
		}
		// A file that shrank meanwhile: the short block sums as zeros,
		// and a later record reports the change.
		clear(buf[got:want])
		for b := uint64(0); b < want; b += bs {
			sums = append(sums, SumBlock(buf[b:min(b+bs, want)]))
		}
	}
	return sums, nil
}

// SumEntry computes the block checksums of regular file e (found under
// root by its path), of blocks of 1 << e.Shift bytes. A file replaced
// since e was listed is left unsummed.
func SumEntry(root *os.File, e *wire.Entry) error {
	return sumEntry(root, e, false)
}

// SumEntryUnchanged is SumEntry that also leaves e unsummed if the file's
// size is no longer e's: summed some time after it was listed, a file
// removed and made anew under a reused inode number would give the new
// bytes with the old size (a replica's manifest: the requester would not
// truncate a longer copy). Not its ctime: a replica applies attribute
// changes while `duet verify` walks it, and a file left unsummed for one
// reads as a difference.
func SumEntryUnchanged(root *os.File, e *wire.Entry) error {
	return sumEntry(root, e, true)
}

func sumEntry(root *os.File, e *wire.Entry, strict bool) error {
	// O_NONBLOCK: a file replaced by a FIFO since the scan would block
	// the open (and a resync with it).
	f, err := OpenBeneath(root, e.Path, ReadFlags)
	if err != nil {
		return nil
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Ino != e.Ino || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil // replaced (an inode number is soon reused)
	}
	if strict && uint64(st.Size) != e.Size {
		return nil
	}
	e.Sums, err = Sums(f, e.Size, e.Shift)
	if err != nil {
		return err
	}
	e.Flags |= wire.EntrySummed
	return nil
}

// Scan lists the tree under root in pre-order (parents before children,
// siblings by name). With sums, regular files carry block checksums.
// Entries that vanish while scanning are skipped. An entry whose path is
// longer than wire.MaxPath cannot be sent: it is left out with what is
// under it, and counted in tooLong.
func Scan(root *os.File, sums bool) (entries []wire.Entry, tooLong int, err error) {
	return Collect(func(fn func(*wire.Entry) error) (int, error) { return Walk(root, sums, fn) })
}

// Collect lists what walk (Walk, or a walk built on it) passes to its
// function, for a caller that wants the whole list at once.
func Collect(walk func(fn func(*wire.Entry) error) (tooLong int, err error)) (entries []wire.Entry, tooLong int, err error) {
	tooLong, err = walk(func(e *wire.Entry) error {
		entries = append(entries, *e)
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	return entries, tooLong, nil
}

// Walk calls fn with every entry Scan would list, in the same order, as
// it goes: a manifest is sent while the tree is read, never held whole.
// fn may change the entry, which is not used after fn returns; an error
// from fn ends the walk.
func Walk(root *os.File, sums bool, fn func(*wire.Entry) error) (tooLong int, err error) {
	return walk(root, scanner{sums: sums, fn: fn})
}

// WalkGens is Walk with each entry's i_generation read from its file
// handle (Gen, flagged wire.EntryGen where the handle held it): what tells
// the inode listed from a later one given its number. One more system
// call an entry.
func WalkGens(root *os.File, sums bool, fn func(*wire.Entry) error) (tooLong int, err error) {
	return walk(root, scanner{sums: sums, gens: true, fn: fn})
}

func walk(root *os.File, sc scanner) (tooLong int, err error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(root.Fd()), &st); err != nil {
		return 0, err
	}
	d, err := OpenBeneath(root, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOATIME)
	if err != nil {
		return 0, err
	}
	defer d.Close()
	e := EntryOf(".", &st)
	if sc.gens {
		if h, _, err := unix.NameToHandleAt(int(root.Fd()), "", unix.AT_EMPTY_PATH); err == nil {
			if ino, gen, ok := HandleIDs(h.Type(), h.Bytes()); ok && ino == st.Ino {
				e.Gen, e.Flags = gen, e.Flags|wire.EntryGen
			}
		}
	}
	if err := sc.fn(&e); err != nil {
		return 0, err
	}
	if err := sc.dir(d, ""); err != nil {
		return 0, err
	}
	return sc.tooLong, nil
}

type scanner struct {
	sums    bool
	gens    bool
	fn      func(*wire.Entry) error
	tooLong int
}

// dir lists directory d, found at rel, and what is under it. Every lookup
// is one name beneath an open directory, so that no path given to the
// kernel grows with the depth of the tree.
func (sc *scanner) dir(d *os.File, rel string) error {
	ents, err := ReadDir(d)
	if err != nil {
		return err
	}
	sort.Slice(ents, func(i, j int) bool { return ents[i].Name < ents[j].Name })
	dfd := int(d.Fd())
	var sts statBatch
	for i, de := range ents {
		child := path.Join(rel, de.Name)
		if len(child) > wire.MaxPath {
			sc.tooLong++
			continue
		}
		if i >= sts.end {
			sts.fill(dfd, ents, i, sc.gens)
		}
		st := &sts.st[i-sts.start]
		if err := sts.err[i-sts.start]; err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue
			}
			return fmt.Errorf("lstat %s: %w", child, err)
		}
		e := EntryOf(child, st)
		if sts.genOK[i-sts.start] {
			e.Gen, e.Flags = sts.gen[i-sts.start], e.Flags|wire.EntryGen
		}
		switch {
		case e.Mode&fs.ModeSymlink != 0:
			buf := make([]byte, unix.PathMax)
			n, err := unix.Readlinkat(dfd, de.Name, buf)
			if err != nil {
				continue
			}
			e.Target = string(buf[:n])
		case e.Mode.IsRegular() && sc.sums:
			// O_NONBLOCK: an entry replaced by a FIFO since its lstat
			// would block the open.
			f, err := OpenBeneath(d, de.Name, ReadFlags)
			if err != nil {
				continue
			}
			var st unix.Stat_t
			if unix.Fstat(int(f.Fd()), &st) != nil || st.Ino != e.Ino || st.Mode&unix.S_IFMT != unix.S_IFREG {
				f.Close()
				continue // replaced since its lstat
			}
			e.Sums, err = Sums(f, e.Size, e.Shift)
			f.Close()
			if err != nil {
				return err
			}
			e.Flags |= wire.EntrySummed
		}
		isDir := e.Mode.IsDir()
		if err := sc.fn(&e); err != nil {
			return err
		}
		if isDir {
			sub, err := OpenBeneath(d, de.Name, ReadDirFlags)
			if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
				continue // replaced since
			}
			if err != nil {
				return err
			}
			err = sc.dir(sub, child)
			sub.Close()
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// statBatch holds the lstat results of a run of a directory's entries,
// read by several threads at once: on a cold cache each lstat waits for
// its inode's block, and a disk serves several such reads in the time of
// one (issue 18: the scans of a restart after the page cache was dropped).
// With gens, each entry's generation too (genOK where read).
type statBatch struct {
	start, end int
	st         []unix.Stat_t
	err        []error
	gen        []uint32
	genOK      []bool
}

// Entries stat'ed per batch, and threads per batch.
const (
	statBatchLen = 1024
	statThreads  = 8
)

// fill stats ents[from:] up to statBatchLen of them, beneath dfd, and
// reads their generations if gens.
func (b *statBatch) fill(dfd int, ents []Dirent, from int, gens bool) {
	n := min(statBatchLen, len(ents)-from)
	b.start, b.end = from, from+n
	if cap(b.st) < n {
		b.st, b.err = make([]unix.Stat_t, n), make([]error, n)
		b.gen, b.genOK = make([]uint32, n), make([]bool, n)
	}
	b.st, b.err, b.gen, b.genOK = b.st[:n], b.err[:n], b.gen[:n], b.genOK[:n]
	one := func(i int) {
		name := ents[from+i].Name
		b.genOK[i] = false
		if !gens {
			b.err[i] = unix.Fstatat(dfd, name, &b.st[i], unix.AT_SYMLINK_NOFOLLOW)
			return
		}
		// The handle first: should the name be given to another inode
		// of the same number between the two calls, the generation is
		// the earlier inode's, which a later allocation record of the
		// number does not match (the later one's would have been taken
		// for the inode listed).
		h, _, herr := unix.NameToHandleAt(dfd, name, 0)
		b.err[i] = unix.Fstatat(dfd, name, &b.st[i], unix.AT_SYMLINK_NOFOLLOW)
		if herr == nil && b.err[i] == nil {
			if ino, gen, ok := HandleIDs(h.Type(), h.Bytes()); ok && ino == b.st[i].Ino {
				b.gen[i], b.genOK[i] = gen, true
			}
		}
	}
	threads := min(statThreads, (n+63)/64)
	if threads <= 1 {
		for i := range n {
			one(i)
		}
		return
	}
	var wg sync.WaitGroup
	for t := range threads {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := t * n / threads; i < (t+1)*n/threads; i++ {
				one(i)
			}
		}()
	}
	wg.Wait()
}

// Generation reads the number and i_generation of the inode at name
// beneath dirfd from its file handle. A caller that found the inode by an
// earlier call (lstat) checks the number: the name may hold another inode
// by now.
func Generation(dirfd int, name string) (ino uint64, gen uint32, ok bool) {
	h, _, err := unix.NameToHandleAt(dirfd, name, 0)
	if err != nil {
		return 0, 0, false
	}
	return HandleIDs(h.Type(), h.Bytes())
}

// HandleIDs finds the inode number and i_generation in a file handle:
// ext4's (FILEID_INO32_GEN and _PARENT, 1 and 2) are {u32 ino, u32 gen,
// ...}; XFS's with 64-bit inode numbers, which it uses whatever the size
// of the filesystem (0x81, 0x82), are {u64 ino, u32 gen, ...}; btrfs's
// (0x4d to 0x4f) are {u64 ino, u64 subvolume, u32 gen, ...}.
func HandleIDs(typ int32, b []byte) (ino uint64, gen uint32, ok bool) {
	switch {
	case (typ == 1 || typ == 2) && len(b) >= 8:
		return uint64(binary.LittleEndian.Uint32(b)), binary.LittleEndian.Uint32(b[4:]), true
	case (typ == 0x81 || typ == 0x82) && len(b) >= 12:
		return binary.LittleEndian.Uint64(b), binary.LittleEndian.Uint32(b[8:]), true
	case typ >= 0x4d && typ <= 0x4f && len(b) >= 20:
		return binary.LittleEndian.Uint64(b), binary.LittleEndian.Uint32(b[16:]), true
	}
	return 0, 0, false
}

// ComparePaths orders two wire paths as Scan lists them: "." first, a
// directory before what is under it, siblings by name. Two scans can be
// matched entry by entry in one pass with it, without an index by path.
func ComparePaths(a, b string) int {
	switch {
	case a == b:
		return 0
	case a == ".":
		return -1
	case b == ".":
		return 1
	}
	for {
		ca, ra, moreA := strings.Cut(a, "/")
		cb, rb, moreB := strings.Cut(b, "/")
		if ca != cb {
			return strings.Compare(ca, cb)
		}
		switch {
		case !moreA && !moreB:
			return 0
		case !moreA:
			return -1 // a is b's ancestor
		case !moreB:
			return 1
		}
		a, b = ra, rb
	}
}

// Difference is one way two trees differ.
type Difference struct {
	Path string
	What string
}

func (d Difference) String() string { return fmt.Sprintf("%s: %s", d.Path, d.What) }

// Compare lists every difference between a local and a peer tree: entries
// present on one side only, type, permissions, owner, size, symlink target
// and content (by block checksums). Times are not compared.
func Compare(local, peer []wire.Entry) []Difference {
	pm := make(map[string]*wire.Entry, len(peer))
	for i := range peer {
		pm[peer[i].Path] = &peer[i]
	}
	var out []Difference
	seen := make(map[string]bool, len(local))
	for i := range local {
		l := &local[i]
		seen[l.Path] = true
		p := pm[l.Path]
		if p == nil {
			out = append(out, Difference{l.Path, "missing on peer"})
			continue
		}
		if l.Mode.Type() != p.Mode.Type() {
			out = append(out, Difference{l.Path, fmt.Sprintf("type %v here, %v on peer", l.Mode.Type(), p.Mode.Type())})
			continue
		}
		if l.Path != "." && l.Mode&fs.ModeSymlink == 0 && l.Mode != p.Mode {
			out = append(out, Difference{l.Path, fmt.Sprintf("mode %v here, %v on peer", l.Mode, p.Mode)})
		}
		if l.Path != "." && (l.UID != p.UID || l.GID != p.GID) {
			out = append(out, Difference{l.Path, fmt.Sprintf("owner %d:%d here, %d:%d on peer", l.UID, l.GID, p.UID, p.GID)})
		}
		switch {
		case l.Mode&fs.ModeSymlink != 0 && l.Target != p.Target:
			out = append(out, Difference{l.Path, fmt.Sprintf("symlink to %q here, %q on peer", l.Target, p.Target)})
		case l.Mode.IsRegular() && l.Size != p.Size:
			out = append(out, Difference{l.Path, fmt.Sprintf("size %d here, %d on peer", l.Size, p.Size)})
		case l.Mode.IsRegular() && len(l.Sums) > 0 && len(p.Sums) > 0 && l.SumShift() != p.SumShift():
			out = append(out, Difference{l.Path, fmt.Sprintf("checksums of %d-byte blocks here, %d-byte on peer", 1<<l.SumShift(), 1<<p.SumShift())})
		case l.Mode.IsRegular():
			for b := range l.Sums {
				if b >= len(p.Sums) || l.Sums[b] != p.Sums[b] {
					out = append(out, Difference{l.Path, fmt.Sprintf("content differs at offset %d", uint64(b)<<l.SumShift())})
					break
				}
			}
		}
	}
	for i := range peer {
		if !seen[peer[i].Path] {
			out = append(out, Difference{peer[i].Path, "only on peer"})
		}
	}
	return out
}
