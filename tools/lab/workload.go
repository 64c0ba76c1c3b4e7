package lab

import (
	"fmt"
	"io/fs"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Workload makes seeded random changes of every kind duet replicates:
// buffered, mmap and O_DIRECT writes, truncates, punched holes, creates,
// removals, renames (over existing entries too), links, symlinks, FIFOs,
// permission, owner and time changes, a 1 GiB sparse file, and odd names.
// Errors from racing its own earlier changes are expected and ignored;
// the point is what ends up on disk.
type Workload struct {
	Root   string
	rng    *rand.Rand
	files  []string
	dirs   []string
	Counts map[string]int
	// Log, when set, receives one line per operation (for debugging).
	Log func(format string, a ...any)
}

func (w *Workload) logf(format string, a ...any) {
	if w.Log != nil {
		w.Log(format, a...)
	}
}

// NewWorkload prepares a workload on root.
func NewWorkload(root string, seed int64) *Workload {
	return &Workload{Root: root, rng: rand.New(rand.NewSource(seed)), Counts: map[string]int{}}
}

// odd names: spaces, newlines, 255 bytes, bytes that are not UTF-8.
var oddNames = []string{
	"with space", "new\nline", "tab\tand 'quote'", "\xff\xfe not utf8", "-dash", ".hidden",
	strings.Repeat("L", 255), "日本語", "a\\b",
}

func (w *Workload) name() string {
	if w.rng.Intn(10) == 0 {
		return oddNames[w.rng.Intn(len(oddNames))] + fmt.Sprint(w.rng.Intn(3))
	}
	return fmt.Sprintf("f%03d", w.rng.Intn(400))
}

func (w *Workload) dir() string {
	if len(w.dirs) == 0 || w.rng.Intn(4) == 0 {
		return w.Root
	}
	return w.dirs[w.rng.Intn(len(w.dirs))]
}

func (w *Workload) file() (string, bool) {
	if len(w.files) == 0 {
		return "", false
	}
	return w.files[w.rng.Intn(len(w.files))], true
}

// refresh re-reads the tree so choices stay mostly valid.
func (w *Workload) refresh() {
	w.files, w.dirs = nil, nil
	filepath.WalkDir(w.Root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == w.Root {
			return nil
		}
		switch {
		case d.IsDir():
			w.dirs = append(w.dirs, p)
		case d.Type().IsRegular():
			if !strings.HasSuffix(p, "sparse-1g") {
				w.files = append(w.files, p)
			}
		}
		return nil
	})
	sort.Strings(w.files)
	sort.Strings(w.dirs)
}

func (w *Workload) data(n int) []byte {
	b := make([]byte, n)
	if w.rng.Intn(2) == 0 {
		w.rng.Read(b) // incompressible
	} else {
		for i := range b {
			b[i] = byte('a' + (i/64)%26) // compressible
		}
	}
	return b
}

// Run performs n operations.
func (w *Workload) Run(n int) {
	for i := 0; i < n; i++ {
		if i%50 == 0 {
			w.refresh()
		}
		w.step()
	}
}

type op struct {
	name   string
	weight int
	fn     func(w *Workload)
}

var ops = []op{
	{"create", 10, (*Workload).create},
	{"write", 14, (*Workload).write},
	{"append", 6, (*Workload).append},
	{"truncate", 4, (*Workload).truncate},
	{"mmap", 5, (*Workload).mmap},
	{"direct", 3, (*Workload).direct},
	{"punch", 2, (*Workload).punch},
	{"rename", 5, (*Workload).rename},
	{"rename-over", 3, (*Workload).renameOver},
	{"unlink", 4, (*Workload).unlink},
	{"mkdir", 3, (*Workload).mkdir},
	{"rmdir", 1, (*Workload).rmdir},
	{"rename-dir", 1, (*Workload).renameDir},
	{"symlink", 2, (*Workload).symlink},
	{"link", 2, (*Workload).link},
	{"fifo", 1, (*Workload).fifo},
	{"chmod", 2, (*Workload).chmod},
	{"chown", 2, (*Workload).chown},
	{"utimes", 2, (*Workload).utimes},
	{"sparse", 3, (*Workload).sparse},
	// Found a rename over its source's ancestor (docs/DESIGN.md §8,
	// twenty-fifth session) with rename-dir.
	{"rotate-dir", 1, (*Workload).rotateDir},
	{"exchange", 1, (*Workload).exchange},
	{"rename-up", 1, (*Workload).renameUp},
}

func (w *Workload) step() {
	if w.Log != nil {
		w.Counts["_n"]++
	}
	total := 0
	for _, o := range ops {
		total += o.weight
	}
	r := w.rng.Intn(total)
	for _, o := range ops {
		if r < o.weight {
			o.fn(w)
			w.Counts[o.name]++
			return
		}
		r -= o.weight
	}
}

// open opens a random known file, or returns false.
func (w *Workload) open(flags int) (*os.File, bool) {
	p, ok := w.file()
	if !ok {
		return nil, false
	}
	f, err := os.OpenFile(p, flags, 0)
	return f, err == nil
}

func (w *Workload) create() {
	p := filepath.Join(w.dir(), w.name())
	d := w.data(w.rng.Intn(200 << 10))
	w.logf("create %q %d bytes", p, len(d))
	if err := os.WriteFile(p, d, 0o644); err == nil {
		w.files = append(w.files, p)
	}
}

func (w *Workload) write() {
	f, ok := w.open(os.O_WRONLY)
	if !ok {
		return
	}
	defer f.Close()
	st, _ := f.Stat()
	off := int64(0)
	if st.Size() > 0 {
		off = w.rng.Int63n(st.Size() + 4096)
	}
	d := w.data(1 + w.rng.Intn(64<<10))
	w.logf("write %q [%d,%d)", f.Name(), off, off+int64(len(d)))
	f.WriteAt(d, off)
}

func (w *Workload) append() {
	f, ok := w.open(os.O_WRONLY | os.O_APPEND)
	if !ok {
		return
	}
	defer f.Close()
	for i := 0; i < 1+w.rng.Intn(5); i++ {
		d := w.data(1 + w.rng.Intn(8<<10))
		w.logf("append %q %d bytes", f.Name(), len(d))
		f.Write(d)
	}
}

func (w *Workload) truncate() {
	p, ok := w.file()
	if !ok {
		return
	}
	size := w.rng.Int63n(300 << 10)
	w.logf("truncate %q %d", p, size)
	os.Truncate(p, size)
}

// mmap stores through a shared mapping, twice to the same page with a pause
// between (the second store must be seen although the page may still be
// dirty from the first).
func (w *Workload) mmap() {
	f, ok := w.open(os.O_RDWR)
	if !ok {
		return
	}
	defer f.Close()
	st, _ := f.Stat()
	if st.Size() == 0 {
		return
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return
	}
	defer unix.Munmap(m)
	for round := 0; round < 2; round++ {
		at := w.rng.Intn(len(m))
		n := min(len(m)-at, 1+w.rng.Intn(3000))
		w.logf("mmap store %q [%d,%d) round %d", f.Name(), at, at+n, round)
		copy(m[at:at+n], w.data(n))
		if round == 0 {
			time.Sleep(time.Duration(w.rng.Intn(5)) * time.Millisecond)
		}
	}
	if w.rng.Intn(2) == 0 {
		unix.Msync(m, unix.MS_SYNC)
	}
}

// direct writes aligned blocks with O_DIRECT.
func (w *Workload) direct() {
	p, ok := w.file()
	if !ok {
		return
	}
	fd, err := unix.Open(p, unix.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	const align = 4096
	raw := make([]byte, 4*align+align)
	off := int(uintptr(unsafe.Pointer(&raw[0])) & (align - 1))
	buf := raw[align-off : align-off+4*align]
	if off == 0 {
		buf = raw[:4*align]
	}
	copy(buf, w.data(len(buf)))
	n := align * (1 + w.rng.Intn(4))
	at := int64(align * w.rng.Intn(64))
	w.logf("direct %q [%d,%d)", p, at, at+int64(n))
	unix.Pwrite(fd, buf[:n], at)
}

func (w *Workload) punch() {
	f, ok := w.open(os.O_RDWR)
	if !ok {
		return
	}
	defer f.Close()
	mode := uint32(unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE)
	if w.rng.Intn(2) == 0 {
		mode = unix.FALLOC_FL_ZERO_RANGE
	}
	at, n := w.rng.Int63n(128<<10), 1+w.rng.Int63n(64<<10)
	w.logf("fallocate %q mode %#x [%d,%d)", f.Name(), mode, at, at+n)
	unix.Fallocate(int(f.Fd()), mode, at, n)
}

func (w *Workload) rename() {
	p, ok := w.file()
	if !ok {
		return
	}
	to := filepath.Join(w.dir(), w.name())
	if _, err := os.Lstat(to); err == nil {
		return // renameOver covers that
	}
	w.logf("rename %q -> %q", p, to)
	os.Rename(p, to)
}

func (w *Workload) renameOver() {
	a, ok1 := w.file()
	b, ok2 := w.file()
	if !ok1 || !ok2 || a == b {
		return
	}
	w.logf("rename %q over %q", a, b)
	os.Rename(a, b)
}

// exchange swaps two files, or two directories, with
// renameat2(RENAME_EXCHANGE) (`mv --exchange`): each name takes the
// other's inode at once.
func (w *Workload) exchange() {
	a, ok1 := w.file()
	b, ok2 := w.file()
	if w.rng.Intn(2) == 0 && len(w.dirs) > 1 {
		a, b = w.dirs[w.rng.Intn(len(w.dirs))], w.dirs[w.rng.Intn(len(w.dirs))]
		ok1, ok2 = true, true
		// Not a directory with one inside the other: EINVAL.
		if strings.HasPrefix(a+"/", b+"/") || strings.HasPrefix(b+"/", a+"/") {
			return
		}
	}
	if !ok1 || !ok2 || a == b {
		return
	}
	w.logf("exchange %q and %q", a, b)
	if unix.Renameat2(unix.AT_FDCWD, a, unix.AT_FDCWD, b, unix.RENAME_EXCHANGE) == nil {
		w.refresh()
	}
}

// listDir picks a directory and lists it.
func (w *Workload) listDir() (string, []os.DirEntry, bool) {
	if len(w.dirs) == 0 {
		return "", nil, false
	}
	d := w.dirs[w.rng.Intn(len(w.dirs))]
	ents, err := os.ReadDir(d)
	return d, ents, err == nil
}

// renameUp moves a directory's subdirectory up into its place (`mv d
// d.up; mv d.up/s d`): the name it takes held, on the peer, a directory
// with the moved one inside (the rename over its source's ancestor of
// docs/DESIGN.md §8).
func (w *Workload) renameUp() {
	d, ents, ok := w.listDir()
	if !ok {
		return
	}
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		up := d + ".up"
		w.logf("rename %q up over %q", filepath.Join(d, e.Name()), d)
		if os.Rename(d, up) == nil {
			os.Rename(filepath.Join(up, e.Name()), d)
		}
		w.refresh()
		return
	}
}

func (w *Workload) unlink() {
	if p, ok := w.file(); ok {
		w.logf("unlink %q", p)
		os.Remove(p)
	}
}

func (w *Workload) mkdir() {
	p := filepath.Join(w.dir(), fmt.Sprintf("d%02d", w.rng.Intn(40)))
	if os.Mkdir(p, 0o755) == nil {
		w.dirs = append(w.dirs, p)
	}
}

func (w *Workload) rmdir() {
	if len(w.dirs) == 0 {
		return
	}
	d := w.dirs[w.rng.Intn(len(w.dirs))]
	if w.rng.Intn(3) == 0 {
		os.RemoveAll(d)
	} else {
		os.Remove(d)
	}
}

func (w *Workload) renameDir() {
	if len(w.dirs) == 0 {
		return
	}
	d := w.dirs[w.rng.Intn(len(w.dirs))]
	to := filepath.Join(w.dir(), fmt.Sprintf("d%02d", w.rng.Intn(40)))
	if strings.HasPrefix(to+"/", d+"/") {
		return
	}
	os.Rename(d, to)
}

// rotateDir replaces a directory by another version of it, as a backup
// rotation does (`rm -r b.2; mv b.1 b.2`), in two operations: one makes
// the new version beside it (`d.next`: files of the same names, sizes and
// times as d's, other bytes, as `cp -a` of a copy made then), a later one
// moves it over d and, one time in two, makes an entry in it (its mtime
// then moves with its ctime). Between the two the new version's files
// become old ones the peer holds: a resync that judged the moved files by
// their size and mtime would keep d's old bytes on the peer.
func (w *Workload) rotateDir() {
	for _, d := range w.dirs {
		if !strings.HasSuffix(d, ".next") {
			continue
		}
		to := strings.TrimSuffix(d, ".next")
		w.logf("rotate %q over %q", d, to)
		os.RemoveAll(to)
		if os.Rename(d, to) == nil && w.rng.Intn(2) == 0 {
			os.WriteFile(filepath.Join(to, "stamp"), nil, 0o644)
		}
		w.refresh()
		return
	}
	d, ents, ok := w.listDir()
	if !ok {
		return
	}
	next := d + ".next"
	if err := os.Mkdir(next, 0o755); err != nil {
		return
	}
	w.logf("next version of %q", d)
	for _, e := range ents {
		fi, err := e.Info()
		if err != nil || !fi.Mode().IsRegular() || fi.Size() > 1<<20 {
			continue
		}
		p := filepath.Join(next, e.Name())
		if os.WriteFile(p, w.data(int(fi.Size())), 0o644) == nil {
			os.Chtimes(p, fi.ModTime(), fi.ModTime())
		}
	}
	w.dirs = append(w.dirs, next)
}

func (w *Workload) symlink() {
	target := "nowhere"
	if p, ok := w.file(); ok && w.rng.Intn(3) > 0 {
		target = filepath.Base(p)
	}
	os.Symlink(target, filepath.Join(w.dir(), "l-"+w.name()))
}

func (w *Workload) link() {
	if p, ok := w.file(); ok {
		to := filepath.Join(w.dir(), "h-"+w.name())
		w.logf("link %q -> %q", p, to)
		if os.Link(p, to) == nil {
			w.files = append(w.files, to)
		}
	}
}

func (w *Workload) fifo() {
	unix.Mkfifo(filepath.Join(w.dir(), "fifo-"+w.name()), 0o640)
}

func (w *Workload) chmod() {
	if p, ok := w.file(); ok {
		os.Chmod(p, fs.FileMode(0o400+w.rng.Intn(0o400)))
	}
}

func (w *Workload) chown() {
	if p, ok := w.file(); ok {
		os.Lchown(p, 1000+w.rng.Intn(3), 1000+w.rng.Intn(3))
	}
}

func (w *Workload) utimes() {
	if p, ok := w.file(); ok {
		t := time.Unix(1600000000+w.rng.Int63n(1e8), w.rng.Int63n(1e9))
		os.Chtimes(p, t, t)
	}
}

// sparse makes small random writes into a 1 GiB sparse file.
func (w *Workload) sparse() {
	p := filepath.Join(w.Root, "sparse-1g")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	if st, _ := f.Stat(); st.Size() != 1<<30 {
		f.Truncate(1 << 30)
	}
	f.WriteAt(w.data(1+w.rng.Intn(4096)), w.rng.Int63n(1<<30-4096))
}
