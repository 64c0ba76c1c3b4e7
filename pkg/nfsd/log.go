package nfsd

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/duet-ha/duet/pkg/fstree"
	"golang.org/x/sys/unix"
)

// indexDir is the directory at the export's root that holds the index. It
// lies inside the replicated tree so that the peer gets it with the data;
// the server hides it from clients.
const indexDir = ".duet-nfs"

// filePrefix starts the name of each generation of the index file.
const filePrefix = "index."

func fileName(gen uint64) string { return fmt.Sprintf("%s%016x", filePrefix, gen) }

// logFile is the index on disk: one file per generation, each a snapshot
// (header, set records, end) followed by the mutation records appended
// since. Compaction writes the next generation in full and makes it
// durable before it removes the previous one, so a copy taken at any
// moment holds at least one complete generation.
type logFile struct {
	dir      *os.File // indexDir, opened for *at calls and fsync
	f        *os.File // the current generation, opened for appending
	gen      uint64
	key      []byte
	size     int64 // bytes of f known to be whole
	appended int   // mutation records since the snapshot
	sync     Syncer
	// broken is set once an append could not be taken back or a sync
	// failed: what the file holds is then unknown, and appending more
	// could hide it. Every later change fails until the server restarts
	// and reloads the file.
	broken error
	// lastMove is the current generation's last record while that is a
	// move (see index.forget), nil otherwise.
	lastMove *record
}

// loaded is what openLog found on disk.
type loaded struct {
	log  *logFile
	tree *tree
	// last is the last mutation record replayed, for index.settleMove.
	last *record
}

// openLog opens or creates the index under root (an O_PATH directory).
// It uses the newest complete generation, cuts a torn tail off it, and
// removes every other generation.
func openLog(root *os.File, s Syncer) (*loaded, error) {
	dir, err := openIndexDir(root, s)
	if err != nil {
		return nil, err
	}
	ents, err := fstree.ReadDir(dir)
	if err != nil {
		dir.Close()
		return nil, err
	}
	var gens []uint64
	for _, e := range ents {
		if g, ok := strings.CutPrefix(e.Name, filePrefix); ok {
			if n, err := strconv.ParseUint(g, 16, 64); err == nil && len(g) == 16 {
				gens = append(gens, n)
			}
		}
	}
	sort.Slice(gens, func(i, j int) bool { return gens[i] > gens[j] })
	l := &logFile{dir: dir, sync: s}
	var got *loaded
	for _, g := range gens {
		got, err = l.load(g)
		if err != nil {
			slog.Warn("nfs index: generation not usable", "file", fileName(g), "err", err)
			continue
		}
		break
	}
	if got == nil {
		if len(gens) > 0 {
			slog.Warn("nfs index: no complete generation; starting a new index, every handle given out before is stale",
				"dir", dir.Name())
		}
		next := uint64(1)
		if len(gens) > 0 {
			next = gens[0] + 1
		}
		key := make([]byte, keyLen)
		if _, err := rand.Read(key); err != nil {
			dir.Close()
			return nil, err
		}
		l.key = key
		got = &loaded{log: l, tree: newTree()}
		if err := l.write(next, got.tree); err != nil {
			dir.Close()
			return nil, err
		}
	}
	removed := false
	for _, g := range gens {
		if g != l.gen {
			if err := unix.Unlinkat(int(dir.Fd()), fileName(g), 0); err != nil && !errors.Is(err, unix.ENOENT) {
				l.close()
				return nil, fmt.Errorf("removing %s/%s: %w", dir.Name(), fileName(g), err)
			}
			removed = true
		}
	}
	if removed {
		if err := s.Sync(dir); err != nil {
			l.close()
			return nil, fmt.Errorf("syncing %s: %w", dir.Name(), err)
		}
	}
	return got, nil
}

// openIndexDir opens indexDir, creating it (durably) on first use. The
// descriptor is named by its full path, for messages.
func openIndexDir(root *os.File, s Syncer) (*os.File, error) {
	open := func() (*os.File, error) {
		how := unix.OpenHow{Flags: unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC,
			Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS}
		fd, err := unix.Openat2(int(root.Fd()), indexDir, &how)
		if err != nil {
			return nil, &fs.PathError{Op: "open", Path: filepath.Join(root.Name(), indexDir), Err: err}
		}
		return os.NewFile(uintptr(fd), filepath.Join(root.Name(), indexDir)), nil
	}
	dir, err := open()
	if err == nil || !errors.Is(err, unix.ENOENT) {
		return dir, err
	}
	if err := unix.Mkdirat(int(root.Fd()), indexDir, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
		return nil, fmt.Errorf("creating %s/%s: %w", root.Name(), indexDir, err)
	}
	top, err := fstree.OpenBeneath(root, ".", unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return nil, err
	}
	defer top.Close()
	if err := s.Sync(top); err != nil {
		return nil, fmt.Errorf("syncing %s: %w", root.Name(), err)
	}
	return open()
}

// load reads generation g. A file whose header or snapshot end is missing
// is refused; a torn tail after the snapshot is cut off.
func (l *logFile) load(g uint64) (*loaded, error) {
	fd, err := unix.Openat(int(l.dir.Fd()), fileName(g), unix.O_RDWR|unix.O_APPEND|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), l.dir.Name()+"/"+fileName(g))
	b, err := io.ReadAll(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	recs, valid := decodeAll(b)
	t, last, err := replay(recs, g)
	if err != nil {
		f.Close()
		return nil, err
	}
	if valid < len(b) {
		slog.Warn("nfs index: cutting off a torn tail (a crash during an append: nothing in it was acknowledged)",
			"file", f.Name(), "at", valid, "bytes", len(b)-valid)
		if err := f.Truncate(int64(valid)); err != nil {
			f.Close()
			return nil, fmt.Errorf("truncating %s: %w", f.Name(), err)
		}
		if err := l.sync.Sync(f); err != nil {
			f.Close()
			return nil, fmt.Errorf("syncing %s: %w", f.Name(), err)
		}
	}
	l.f, l.gen, l.key, l.size = f, g, recs[0].key, int64(valid)
	l.appended = len(recs) - snapshotLen(recs) - 2
	return &loaded{log: l, tree: t, last: last}, nil
}

// snapshotLen counts the set records between the header and the end.
func snapshotLen(recs []record) int {
	n := 0
	for _, r := range recs[1:] {
		if r.kind != kindSet {
			break
		}
		n++
	}
	return n
}

// replay rebuilds the tree from one generation's records.
func replay(recs []record, g uint64) (*tree, *record, error) {
	if len(recs) == 0 || recs[0].kind != kindHeader {
		return nil, nil, errors.New("no header")
	}
	if recs[0].gen != g {
		return nil, nil, fmt.Errorf("header says generation %d", recs[0].gen)
	}
	n := snapshotLen(recs)
	if len(recs) < n+2 || recs[n+1].kind != kindEnd || recs[n+1].count != uint64(n) {
		return nil, nil, errors.New("snapshot incomplete (the server stopped while compacting)")
	}
	t := newTree()
	var last *record
	for i := 0; i < len(recs); i++ {
		r := recs[i]
		if r.kind == kindHeader || r.kind == kindEnd {
			if i != 0 && i != n+1 {
				return nil, nil, fmt.Errorf("record %d: a %d record inside the log", i, r.kind)
			}
			continue
		}
		if r.kind == kindMove && i > n+1 {
			// A rename that failed (or that a restart found not done)
			// is followed by the records that take it back: applied,
			// it dropped the directory it would have replaced with
			// everything under it, and the records put back only the
			// directory (a review: handles under it went stale on the
			// survivor, TestFailedRenameOverDirectoryKeepsHandles).
			// Neither is applied. The log's last rename is left to
			// openIndex (settleMove): applied here, it could not be
			// taken back whole either.
			if u := undo(r); undoneBy(recs[i+1:], u) {
				i += len(u)
				last = &recs[i]
				continue
			}
			if i == len(recs)-1 {
				last = &recs[i]
				continue
			}
		}
		if err := t.apply(r); err != nil {
			// Every record passed its checksum, so this is a bug of the
			// writer, not damage: skipping it can only make a handle
			// stale, never point it elsewhere.
			slog.Warn("nfs index: skipping a record that does not apply", "record", i, "err", err)
		}
		if i > n+1 {
			last = &recs[i]
		}
	}
	return t, last, nil
}

// undoneBy reports whether recs begin with the records u.
func undoneBy(recs, u []record) bool {
	if len(recs) < len(u) {
		return false
	}
	for k, w := range u {
		r := recs[k]
		if r.kind != w.kind || r.id != w.id || r.parent != w.parent || r.name != w.name {
			return false
		}
	}
	return true
}

// write creates generation g holding t, makes it durable, and switches
// appends to it. The caller removes the previous generation.
func (l *logFile) write(g uint64, t *tree) error {
	snap := t.snapshot()
	b := record{kind: kindHeader, gen: g, key: l.key}.encode(nil)
	for _, r := range snap {
		b = r.encode(b)
	}
	b = record{kind: kindEnd, count: uint64(len(snap))}.encode(b)
	name := fileName(g)
	fd, err := unix.Openat(int(l.dir.Fd()), name, unix.O_RDWR|unix.O_APPEND|unix.O_CREAT|unix.O_TRUNC|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("creating %s/%s: %w", l.dir.Name(), name, err)
	}
	f := os.NewFile(uintptr(fd), l.dir.Name()+"/"+name)
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", f.Name(), err)
	}
	if err := l.sync.Sync(f); err != nil {
		f.Close()
		return fmt.Errorf("syncing %s: %w", f.Name(), err)
	}
	if err := l.sync.Sync(l.dir); err != nil {
		f.Close()
		return fmt.Errorf("syncing %s: %w", l.dir.Name(), err)
	}
	if l.f != nil {
		l.f.Close()
	}
	l.f, l.gen, l.size, l.appended = f, g, int64(len(b)), 0
	l.lastMove = nil // a snapshot ends the file
	return nil
}

// append writes recs in one write and makes them durable. On an error the
// file is cut back to what it held, so that no later record follows a
// broken one.
func (l *logFile) append(recs ...record) error {
	if l.broken != nil {
		return l.broken
	}
	var b []byte
	for _, r := range recs {
		b = r.encode(b)
	}
	if _, err := l.f.Write(b); err != nil {
		if terr := l.f.Truncate(l.size); terr != nil {
			l.broken = fmt.Errorf("nfs index %s: cutting back a failed append: %v (restart the server)", l.f.Name(), terr)
		}
		return fmt.Errorf("appending to %s: %w", l.f.Name(), err)
	}
	if err := l.sync.Sync(l.f); err != nil {
		l.broken = fmt.Errorf("nfs index %s: sync failed: %v (restart the server)", l.f.Name(), err)
		return l.broken
	}
	l.size += int64(len(b))
	l.appended += len(recs)
	l.lastMove = nil
	if n := len(recs); n > 0 && recs[n-1].kind == kindMove {
		r := recs[n-1]
		l.lastMove = &r
	}
	return nil
}

// compact writes the next generation from t once the appended records
// outnumber twice the live entries (and at least minCompact), then
// removes the current one. A failure leaves the current generation in use.
func (l *logFile) compact(t *tree) {
	const minCompact = 4096
	if l.broken != nil || l.appended < minCompact || l.appended < 2*len(t.nodes) {
		return
	}
	old := l.gen
	if err := l.write(old+1, t); err != nil {
		slog.Warn("nfs index: compaction failed; keeping the current generation", "err", err)
		unix.Unlinkat(int(l.dir.Fd()), fileName(old+1), 0)
		return
	}
	if err := unix.Unlinkat(int(l.dir.Fd()), fileName(old), 0); err != nil {
		slog.Warn("nfs index: removing the previous generation", "file", fileName(old), "err", err)
		return
	}
	if err := l.sync.Sync(l.dir); err != nil {
		slog.Warn("nfs index: syncing after compaction", "dir", l.dir.Name(), "err", err)
	}
}

func (l *logFile) close() {
	if l.f != nil {
		l.f.Close()
	}
	l.dir.Close()
}
