package replica

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/journal"
	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// TestBuildRandomHistories runs the builder over random histories of
// namespace and data changes made on a real directory, with the records a
// capture would emit folded into a journal. Passes come at random points
// and take only the records drained so far (the rest arrive later, as from
// a ring buffer read behind the writer), some records are lost and stand
// for an overflow's rescan mark, and what a pass requeues goes back into
// the journal. After the last records and the passes they need, the
// peer's copy must equal the source, and no pass may fail, be refused by
// the applier or give a change up. The inode numbers ext4 hands out again
// at once make the reuse cases (retire, rekey) come up on their own.
//
// DUET_HISTORY_RUNS sets the number of histories (default 150); a failure
// prints its seed and its operations, DUET_HISTORY_SEED replays one.
// DUET_HISTORY_FS=xfs|btrfs runs them on a loop filesystem of that kind
// (root), whose inode numbers and file handles are its own (the default is
// the temporary directory's filesystem).
func TestBuildRandomHistories(t *testing.T) {
	var base string
	if fs := os.Getenv("DUET_HISTORY_FS"); fs != "" {
		base = loopfs.Make(t, fs, 512).Mount
	}
	seededRuns(t, "DUET_HISTORY", 150, uint64(time.Now().UnixNano()), 0, func(t *testing.T, seed uint64) { runHistory(t, seed, base) })
}

// history is one random history's state: the source tree, the records
// emitted and not yet drained, the journal and the builder.
type history struct {
	t       *testing.T
	rng     *rand.Rand
	src     string
	seq     uint64
	emitted []capture.Record // not drained yet
	j       *journal.Journal
	b       *builder
	log     []string
	// concurrent: changes are made during passes too (inOp while one
	// is; midOps counts those of the last pass).
	concurrent, inOp bool
	midOps, totalMid int
	dst              string
	// stable: the content of the files on the peer at the last check
	// pass, by inode, not written or removed since (settle, held);
	// partial: passes drain only some records.
	stable     map[uint64][32]byte
	stableName map[uint64]string
	partial    bool
}

// runHistory runs the history of seed in a new directory under base (the
// test's temporary directory if empty).
func runHistory(t *testing.T, seed uint64, base string) {
	h := &history{t: t, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), j: journal.New(), seq: 1000}
	var initial []string
	for i := range 3 + h.rng.IntN(6) {
		initial = append(initial, fmt.Sprintf("d%d/f%d", h.rng.IntN(3), i), fmt.Sprintf("d%d/s%d/g%d", h.rng.IntN(3), h.rng.IntN(2), i))
	}
	top := t.TempDir()
	if base != "" {
		var err error
		if top, err = os.MkdirTemp(base, "h"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(top) })
	}
	src, dst, b, _ := syncedPairIn(t, top, top, initial...)
	h.src, h.dst, h.b = src, dst, b
	failing := &historySink{h: h}
	a := b.out.(*applySink)
	failing.a = a.a
	b.out = failing
	b.log = slog.New(slog.NewTextHandler(logTo{h}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	if h.rng.IntN(2) == 0 {
		h.concurrent = true
		h.log = append(h.log, "changes during passes too")
	}
	if h.rng.IntN(2) == 0 {
		// A pass takes only some of the records emitted before it.
		// The Primary drains the ring before a pass, but an
		// operation's records are emitted one after the other and a
		// drain can fall between them: this is harder than that, and
		// of its kind. The held check runs after every pass here too
		// (it failed here until the scan read generations: an aside
		// of a scanned file removed while the file lived on under a
		// name whose records were not drained yet).
		h.partial = true
		h.log = append(h.log, "records drained late")
	}
	if h.rng.IntN(3) == 0 {
		bigFrom(b.sh, 3) // directories read by their records' names
		h.log = append(h.log, "big directories from 3 entries")
	}
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("seed %d: %s\nhistory:\n  %s", seed, fmt.Sprintf(format, args...), strings.Join(h.log, "\n  "))
	}
	ops := 20 + h.rng.IntN(40)
	for range ops {
		h.op()
		switch h.rng.IntN(8) {
		case 0, 1:
			if err := h.pass(false); err != nil {
				fail("%v", err)
			}
		case 2:
			// What a durability call waits for: a pass of every record
			// emitted so far with nothing blocked. Every file is then
			// on the peer as here; the peer may hold more names
			// (asides, removed a pass later).
			if err := h.pass(true); err != nil {
				fail("%v", err)
			}
			if h.b.blocked == 0 && h.midOps == 0 {
				if diffs := h.differences(src, dst, true); len(diffs) != 0 {
					fail("after a pass of every record, with nothing blocked: %v", diffs)
				}
				h.settle()
			}
		}
	}
	// Everything drained, then passes until nothing is left.
	h.concurrent = false
	for i := 0; ; i++ {
		if err := h.pass(true); err != nil {
			fail("%v", err)
		}
		// What is left may be bytes beyond the end of a file (a record
		// of an earlier inode of the number: given up after a time,
		// blocking nothing).
		if h.b.blocked == 0 && len(h.b.leftAsides()) == 0 {
			break
		}
		if i == 20 {
			fail("still %d changes (%d blocked) and %d asides after 20 passes", h.j.Pending(), h.b.blocked, len(h.b.leftAsides()))
		}
	}
	if failing.err != nil {
		fail("%v", failing.err)
	}
	if diffs := h.differences(src, dst, false); len(diffs) != 0 {
		fail("trees differ: %v", diffs)
	}
	t.Logf("%d changes, %d of them during passes", ops+h.totalMid, h.totalMid)
}

// differences compares the trees; with asides, entries only the peer has
// under a name kept aside, and the times of the directories that hold
// them, are not differences.
func (h *history) differences(src, dst string, asides bool) []string {
	r1, _ := fstree.OpenRoot(src)
	defer r1.Close()
	r2, _ := fstree.OpenRoot(dst)
	defer r2.Close()
	l, _, _ := fstree.Scan(r1, true)
	p, _, _ := fstree.Scan(r2, true)
	var out []string
	for _, d := range fstree.Compare(l, p) {
		if asides && strings.Contains(d.Path, ".duet-replaced-") && d.What == "only on peer" {
			continue
		}
		out = append(out, d.String())
	}
	return out
}

// logTo keeps the builder's debug lines in the history.
type logTo struct{ h *history }

func (l logTo) Write(p []byte) (int, error) {
	line := strings.TrimSpace(string(p))
	if i := strings.Index(line, "msg="); i >= 0 {
		line = line[i:]
	}
	l.h.log = append(l.h.log, "    "+line)
	return len(p), nil
}

// historySink applies each op to the peer's copy and keeps the first
// refusal, which fails the pass.
type historySink struct {
	a   *Applier
	err error
	h   *history
}

func (s *historySink) add(op *wire.Op) error {
	if s.h != nil {
		s.h.log = append(s.h.log, fmt.Sprintf("      > %s %q %q off %d, %d bytes, len %d", op.Code, op.Path, op.Path2, op.Off, len(op.Data), op.Len))
	}
	if err := s.a.Apply(op); err != nil {
		if s.err == nil {
			s.err = fmt.Errorf("the peer refused %s %q -> %q: %w", op.Code, op.Path, op.Path2, err)
		}
		return s.err
	}
	// The writer goes on while a pass reads the tree: a change made
	// between two of its ops, whose records a later pass takes.
	if h := s.h; h != nil && h.concurrent && !h.inOp && h.rng.IntN(15) == 0 {
		h.inOp = true
		h.log = append(h.log, "    (during the pass:)")
		h.op()
		h.inOp = false
		h.midOps++
		h.totalMid++
	}
	return nil
}

// pass drains a random prefix of the emitted records (all when all is
// set), losing a few for rescan marks, and runs a pass.
func (h *history) pass(all bool) error {
	n := len(h.emitted)
	if !all && n > 0 && h.partial {
		n = h.rng.IntN(n + 1)
	}
	for _, r := range h.emitted[:n] {
		if !all && h.rng.IntN(25) == 0 {
			// Lost in an overflow: the kernel marked the inode.
			h.j.MarkRescan(capture.InodeKey{Dev: r.Dev, Ino: r.Ino})
			h.log = append(h.log, fmt.Sprintf("  (record %d of %d lost: rescan)", r.Seq, r.Ino))
			continue
		}
		h.j.Add(&r, time.Now())
	}
	h.emitted = append(h.emitted[:0], h.emitted[n:]...)
	h.midOps = 0
	files := h.j.Take(time.Now())
	h.log = append(h.log, fmt.Sprintf("-- pass: %d records drained, %d files, %d asides pending", n, len(files), len(h.b.leftAsides())))
	// A builder of its own, as the Primary makes for each pass, with
	// what it carries from one to the next.
	old := h.b
	h.b = newBuilder(old.root, old.dev, old.sh, nil, old.out, old.log, old.buf)
	h.b.syncSeq, h.b.shipped, h.b.pendingAsides = old.syncSeq, old.shipped, old.leftAsides()
	requeue, err := h.b.build(files)
	if err != nil {
		return fmt.Errorf("pass: %w", err)
	}
	if len(h.b.gaveUp) > 0 {
		return fmt.Errorf("pass gave up %v", h.b.gaveUp)
	}
	for _, f := range requeue {
		h.j.Requeue(f)
	}
	return h.held()
}

// settle notes the content of every file here, all on the peer now: a
// file not written or removed after stays on the peer under some name,
// whatever is renamed, after every pass (held).
func (h *history) settle() {
	h.stable = map[uint64][32]byte{}
	h.stableName = map[uint64]string{}
	filepath.WalkDir(h.src, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			var st unix.Stat_t
			if b, err := os.ReadFile(p); err == nil && unix.Lstat(p, &st) == nil {
				h.stable[st.Ino] = sha256.Sum256(b)
				h.stableName[st.Ino] = p
			}
		}
		return nil
	})
}

// held checks, after any pass, that every file settle noted and nothing
// wrote or removed since is somewhere on the peer: one held nowhere there
// would be lost with this node then, though acknowledged long before
// (an aside removed while its inode lived on here, moved again).
func (h *history) held() error {
	if len(h.stable) == 0 {
		return nil
	}
	there := map[[32]byte]bool{}
	filepath.WalkDir(h.dst, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if b, err := os.ReadFile(p); err == nil {
				there[sha256.Sum256(b)] = true
			}
		}
		return nil
	})
	for ino, sum := range h.stable {
		if !there[sum] {
			n, _ := h.b.sh.node(ino)
			return fmt.Errorf("the file of inode %d (%s at settle; gen known %v), unchanged since it was on the peer, is held nowhere there", ino, h.stableName[ino], n.genKnown)
		}
	}
	return nil
}

// emit is what capture reports of the inode at path (Lstat) now.
func (h *history) emit(path string, kind capture.Kind, pos, n uint64) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return
	}
	if kind == capture.KindData {
		delete(h.stable, st.Ino)
	}
	gen := h.gen(path)
	h.seq++
	h.emitted = append(h.emitted, capture.Record{Seq: h.seq, Ino: st.Ino, Gen: gen, Kind: kind, Pos: pos, Len: n})
}

// emitIno reports an attribute change of an inode by number (one that may
// have no name any more).
func (h *history) emitIno(ino uint64, gen uint32) {
	delete(h.stable, ino)
	h.seq++
	h.emitted = append(h.emitted, capture.Record{Seq: h.seq, Ino: ino, Gen: gen, Kind: capture.KindAttr})
}

func (h *history) gen(path string) uint32 {
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return 0
	}
	defer d.Close()
	_, g, _ := fstree.Generation(int(d.Fd()), filepath.Base(path))
	return g
}

// dirty reports the directory at path changed.
func (h *history) dirty(path string) { h.emit(path, capture.KindAttr, 0, 0) }

// created reports a new inode at path.
func (h *history) created(path string) {
	h.emit(path, capture.KindNew, 0, 0)
	h.emit(path, capture.KindAttr, 0, 0)
}

// entries lists the tree's paths (relative), directories and others apart.
func (h *history) entries() (dirs, others []string) {
	dirs = []string{"."}
	filepath.WalkDir(h.src, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == h.src {
			return nil
		}
		rel, _ := filepath.Rel(h.src, p)
		if d.IsDir() {
			dirs = append(dirs, rel)
		} else {
			others = append(others, rel)
		}
		return nil
	})
	sort.Strings(dirs)
	sort.Strings(others)
	return dirs, others
}

func (h *history) pick(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[h.rng.IntN(len(s))]
}

func (h *history) abs(rel string) string { return filepath.Join(h.src, rel) }

// op makes one random change and emits its records.
func (h *history) op() {
	dirs, others := h.entries()
	dir := h.pick(dirs)
	name := fmt.Sprintf("n%d", h.rng.IntN(12))
	target := filepath.Join(dir, name)
	var inoGen = func(rel string) (uint64, uint32, bool) {
		var st unix.Stat_t
		if unix.Lstat(h.abs(rel), &st) != nil {
			return 0, 0, false
		}
		return st.Ino, h.gen(h.abs(rel)), true
	}
	// victim reports the inode a name held before it was replaced or
	// removed (its link count changed).
	victim := func(rel string) func() {
		ino, gen, ok := inoGen(rel)
		if !ok {
			return func() {}
		}
		return func() { h.emitIno(ino, gen) }
	}
	// move renames from to to, over what is there if it can.
	move := func(from, to string) {
		v := victim(to)
		ino, gen, _ := inoGen(from)
		if os.Rename(h.abs(from), h.abs(to)) == nil {
			v()
			h.emitIno(ino, gen)
			h.dirty(h.abs(filepath.Dir(from)))
			h.dirty(h.abs(filepath.Dir(to)))
			h.log = append(h.log, fmt.Sprintf("mv %s %s", from, to))
		}
	}
	switch k := h.rng.IntN(16); {
	case k == 15: // mkdir -p a chain of new directories, move something in
		from := h.pick(append(others, dirs[1:]...))
		chain := filepath.Join(target, fmt.Sprintf("p%d", h.rng.IntN(3)), fmt.Sprintf("q%d", h.rng.IntN(3)))
		if from == "" || strings.HasPrefix(chain+"/", from+"/") {
			return
		}
		var made []string
		for p := chain; p != dir; p = filepath.Dir(p) {
			if _, err := os.Lstat(h.abs(p)); err != nil {
				made = append([]string{p}, made...)
			}
		}
		if os.MkdirAll(h.abs(chain), 0o755) != nil {
			return
		}
		for _, p := range made {
			h.created(h.abs(p))
			h.dirty(h.abs(filepath.Dir(p)))
		}
		h.log = append(h.log, "mkdir -p "+chain)
		move(from, filepath.Join(chain, filepath.Base(from)))
	case k == 13: // truncate a file, shorter or longer
		f := h.pick(others)
		if fi, err := os.Lstat(h.abs(f)); f == "" || err != nil || !fi.Mode().IsRegular() {
			return
		}
		size := int64(h.rng.IntN(12000))
		if os.Truncate(h.abs(f), size) == nil {
			h.emit(h.abs(f), capture.KindData, uint64(size), 1<<62)
			h.emit(h.abs(f), capture.KindAttr, 0, 0)
			h.log = append(h.log, fmt.Sprintf("truncate %s to %d", f, size))
		}
	case k == 14: // chmod anything
		f := h.pick(append(others, dirs[1:]...))
		if fi, err := os.Lstat(h.abs(f)); f == "" || err != nil || fi.Mode()&fs.ModeSymlink != 0 {
			return
		}
		mode := fs.FileMode(0o600 | h.rng.IntN(0o100)&0o055)
		if fi, _ := os.Lstat(h.abs(f)); fi.IsDir() {
			mode |= 0o700
		}
		if os.Chmod(h.abs(f), mode) == nil {
			h.emit(h.abs(f), capture.KindAttr, 0, 0)
			h.log = append(h.log, fmt.Sprintf("chmod %o %s", mode, f))
		}
	case k < 3: // create or rewrite a file
		v := victim(target)
		if fi, err := os.Lstat(h.abs(target)); err == nil && fi.IsDir() {
			return
		}
		tmp := h.abs(target) + ".tmp"
		data := make([]byte, 1+h.rng.IntN(9000))
		for i := range data {
			data[i] = byte(h.rng.Uint32())
		}
		fi, err := os.Lstat(tmp)
		existed := err == nil
		if existed && !fi.Mode().IsRegular() {
			return // WriteFile would follow a symlink: its records are the target's
		}
		if err := os.WriteFile(tmp, data, 0o644); err != nil {
			return
		}
		if existed {
			// O_TRUNC: what the capture's truncate hook reports, and
			// the inode's update.
			h.emit(tmp, capture.KindData, 0, 1<<62)
			h.emit(tmp, capture.KindAttr, 0, 0)
		} else {
			h.created(tmp)
			h.dirty(h.abs(dir))
		}
		h.emit(tmp, capture.KindData, 0, uint64(len(data)))
		if h.rng.IntN(2) == 0 {
			if os.Rename(tmp, h.abs(target)) == nil {
				v()
				h.emit(h.abs(target), capture.KindAttr, 0, 0) // its ctime
				h.dirty(h.abs(dir))
				h.log = append(h.log, fmt.Sprintf("write %s (%d bytes) via rename", target, len(data)))
			}
		} else {
			h.log = append(h.log, fmt.Sprintf("write %s.tmp (%d bytes)", target, len(data)))
		}
	case k < 5: // write into an existing file
		f := h.pick(others)
		if f == "" {
			return
		}
		fd, err := os.OpenFile(h.abs(f), os.O_WRONLY|unix.O_NOFOLLOW, 0)
		if err != nil {
			return
		}
		off := int64(h.rng.IntN(12000))
		data := make([]byte, 1+h.rng.IntN(5000))
		for i := range data {
			data[i] = byte(h.rng.Uint32())
		}
		_, err = fd.WriteAt(data, off)
		fd.Close()
		if err == nil {
			h.emit(h.abs(f), capture.KindData, uint64(off), uint64(len(data)))
			h.emit(h.abs(f), capture.KindAttr, 0, 0)
			h.log = append(h.log, fmt.Sprintf("pwrite %s at %d, %d bytes", f, off, len(data)))
		}
	case k == 5: // mkdir
		if os.Mkdir(h.abs(target), 0o755) == nil {
			h.created(h.abs(target))
			h.dirty(h.abs(dir))
			h.log = append(h.log, "mkdir "+target)
		}
	case k < 9: // rename anything anywhere, over what is there if it can
		from := h.pick(append(others, dirs[1:]...))
		if from == "" || strings.HasPrefix(target+"/", from+"/") {
			return
		}
		move(from, target)
	case k == 9: // remove a file or a tree
		from := h.pick(append(others, dirs[1:]...))
		if from == "" {
			return
		}
		// Every inode of the tree is updated as it goes (its link
		// count), every directory of it too: each reports it.
		var gone []func()
		filepath.WalkDir(h.abs(from), func(p string, d fs.DirEntry, err error) error {
			if err == nil {
				rel, _ := filepath.Rel(h.src, p)
				gone = append(gone, victim(rel))
			}
			return nil
		})
		if os.RemoveAll(h.abs(from)) == nil {
			for _, v := range gone {
				v()
			}
			h.dirty(h.abs(filepath.Dir(from)))
			h.log = append(h.log, "rm -r "+from)
		}
	case k == 10: // hard link or symlink
		f := h.pick(others)
		if f == "" {
			return
		}
		if h.rng.IntN(2) == 0 {
			if os.Link(h.abs(f), h.abs(target)) == nil {
				h.emit(h.abs(target), capture.KindAttr, 0, 0)
				h.dirty(h.abs(dir))
				h.log = append(h.log, fmt.Sprintf("ln %s %s", f, target))
			}
		} else if os.Symlink(f, h.abs(target)) == nil {
			h.created(h.abs(target))
			h.dirty(h.abs(dir))
			h.log = append(h.log, fmt.Sprintf("ln -s %s %s", f, target))
		}
	case k == 11: // mv d d.up; mv d.up/s d
		d := h.pick(dirs[1:])
		if d == "" {
			return
		}
		var sub string
		if es, _ := os.ReadDir(h.abs(d)); len(es) > 0 {
			sub = es[h.rng.IntN(len(es))].Name()
		}
		if sub == "" || os.Rename(h.abs(d), h.abs(d)+".up") != nil {
			return
		}
		h.emit(h.abs(d)+".up", capture.KindAttr, 0, 0)
		h.dirty(h.abs(filepath.Dir(d)))
		if os.Rename(filepath.Join(h.abs(d)+".up", sub), h.abs(d)) == nil {
			h.emit(h.abs(d), capture.KindAttr, 0, 0)
			h.dirty(h.abs(d) + ".up")
			h.dirty(h.abs(filepath.Dir(d)))
		}
		h.log = append(h.log, fmt.Sprintf("mv %s %s.up; mv %s.up/%s %s", d, d, d, sub, d))
	default: // exchange two names
		a, c := h.pick(append(others, dirs[1:]...)), h.pick(append(others, dirs[1:]...))
		if a == "" || c == "" || a == c || strings.HasPrefix(a+"/", c+"/") || strings.HasPrefix(c+"/", a+"/") {
			return
		}
		err := unix.Renameat2(unix.AT_FDCWD, h.abs(a), unix.AT_FDCWD, h.abs(c), unix.RENAME_EXCHANGE)
		if err == nil {
			h.emit(h.abs(a), capture.KindAttr, 0, 0)
			h.emit(h.abs(c), capture.KindAttr, 0, 0)
			h.dirty(h.abs(filepath.Dir(a)))
			h.dirty(h.abs(filepath.Dir(c)))
			h.log = append(h.log, fmt.Sprintf("exchange %s %s", a, c))
		} else if !errors.Is(err, unix.ENOENT) {
			h.log = append(h.log, fmt.Sprintf("exchange %s %s: %v", a, c, err))
		}
	}
}
