package replica

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// replayModel runs Server.replicate's apply loop (skip, opProgress, the
// saves around namespace ops, the batch-end save, acks) over a list of
// batches, against a real tree, with a state "file" and the daemon's
// in-memory copy of it kept apart. A run may be stopped at any of its
// events in one of two ways:
//
//   - kill: the daemon dies right after the event; the next run starts
//     from what the file holds (a new daemon, a fresh Applier);
//   - savefail: the save that is the event fails (nothing reaches the
//     file, the in-memory progress moved on), the connection is refused;
//     the same daemon serves the next connection from its memory.
//
// The primary resends every batch after the last one it heard acked; if
// the replica's welcome says less than that, the primary would resync:
// that scenario is dropped (not a replay).
// modelUnsave: after a failed save the in-memory progress goes back to
// the file's, as replicaState.unsave does (false models 42342c6, where
// it stayed ahead: TestReplayAfterRepeatedStops then fails).
var modelUnsave = true

type rsState struct {
	applied, partial uint64
	ops              uint32
}

type replayModel struct {
	root      string
	batches   [][]wire.Op
	file, mem rsState
	acked     uint64
}

type stopKind int

const (
	stopNone stopKind = iota
	stopKill
	stopSaveFail
)

type stopAt struct {
	event int
	kind  stopKind
}

// conn runs one connection. It returns the number of events seen, whether
// the stop was used, and an apply error.
func (m *replayModel) conn(stop stopAt) (events int, stopped bool, resync bool, err error) {
	if m.mem.applied < m.acked {
		return 0, false, true, nil
	}
	a, err := NewApplier(m.root)
	if err != nil {
		return 0, false, false, err
	}
	defer a.Close()
	ev := 0
	// event returns what to do at this event: continue, kill, or fail
	// the save (only for saves).
	event := func(isSave bool) stopKind {
		k := ev
		ev++
		if stop.kind != stopNone && k == stop.event {
			if stop.kind == stopSaveFail && !isSave {
				return stopNone
			}
			return stop.kind
		}
		return stopNone
	}
	save := func() stopKind {
		switch event(true) {
		case stopSaveFail:
			// Memory moved, the file did not (42342c6); with the
			// suggested fix (replicaState.unsave) memory goes back.
			if modelUnsave {
				m.mem = m.file
			}
			return stopSaveFail
		case stopKill: // the save happened, then the daemon died
			m.file = m.mem
			m.mem = m.file
			return stopKill
		}
		m.file = m.mem
		return stopNone
	}
	kill := func() { m.mem = m.file }
	for seq := m.acked + 1; seq <= uint64(len(m.batches)); seq++ {
		if seq <= m.mem.applied {
			m.acked = m.mem.applied
			continue
		}
		ops := m.batches[seq-1]
		skip := uint32(0)
		if m.mem.partial == seq {
			skip = m.mem.ops
		}
		m.mem.partial = seq
		var prog opProgress
		for i := range ops {
			if uint32(i) < skip {
				continue
			}
			if prog.before(ops[i].Code) {
				m.mem.ops = uint32(i)
				switch save() {
				case stopSaveFail:
					return ev, true, false, nil
				case stopKill:
					return ev, true, false, nil
				}
			}
			if e := a.Apply(&ops[i]); e != nil {
				return ev, false, false, fmt.Errorf("batch %d op %d: %w", seq, i, e)
			}
			if event(false) == stopKill {
				kill()
				return ev, true, false, nil
			}
			if prog.after(ops[i].Code) && i < len(ops)-1 {
				m.mem.ops = uint32(i + 1)
				switch save() {
				case stopSaveFail, stopKill:
					return ev, true, false, nil
				}
			}
		}
		m.mem.applied = seq
		m.mem.partial, m.mem.ops = 0, 0
		switch save() {
		case stopSaveFail, stopKill:
			return ev, true, false, nil
		}
		m.acked = seq
	}
	return ev, false, false, nil
}

// replayTree is a tree's entries: kind, mode, size, contents, symlink
// target, which names share an inode, and mtimes that a setattr set.
func replayTree(t *testing.T, root string, times map[int64]bool) string {
	t.Helper()
	var lines []string
	inodes := map[uint64]string{}
	filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(root, p)
		st := fi.Sys().(*syscall.Stat_t)
		var b strings.Builder
		fmt.Fprintf(&b, "%s %v %d", rel, fi.Mode(), fi.Size())
		switch {
		case fi.Mode().IsRegular():
			data, _ := os.ReadFile(p)
			fmt.Fprintf(&b, " %q", data)
		case fi.Mode()&os.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			fmt.Fprintf(&b, " -> %s", l)
		}
		if !fi.IsDir() {
			if first, ok := inodes[st.Ino]; ok {
				fmt.Fprintf(&b, " same inode as %s", first)
			} else {
				inodes[st.Ino] = rel
			}
		}
		if times[fi.ModTime().UnixNano()] {
			fmt.Fprintf(&b, " mtime %d", fi.ModTime().UnixNano())
		}
		lines = append(lines, b.String())
		return nil
	})
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// TestReplayAfterRepeatedStops: every sequence of up to depth stops (a
// kill after any event, or any save failing) followed by a connection
// that runs to the end leaves the tree applying each op once leaves, and
// no op fails.
func TestReplayAfterRepeatedStops(t *testing.T) {
	t1, t2 := time.Unix(1700000000, 0).UnixNano(), time.Unix(1700000500, 0).UnixNano()
	times := map[int64]bool{t1: true, t2: true}
	uid, gid := uint32(os.Getuid()), uint32(os.Getgid())
	sa := func(p string, mode uint32, tm int64) wire.Op {
		return wire.Op{Code: wire.OpSetattr, Path: p, Mode: mode, UID: uid, GID: gid, Mtime: tm, Atime: tm}
	}
	w := func(p string, off uint64, s string) wire.Op {
		return wire.Op{Code: wire.OpWrite, Path: p, Off: off, Data: []byte(s)}
	}
	setupAB := []wire.Op{
		{Code: wire.OpCreate, Path: "a", Mode: 0o644},
		w("a", 0, "the old contents of a"),
		{Code: wire.OpCreate, Path: "b", Mode: 0o600},
		w("b", 0, "the new contents, private"),
	}
	// mixed: every kind of op, namespace ops between data ops.
	mixed := [][]wire.Op{
		{{Code: wire.OpMkdir, Path: "d", Mode: 0o755},
			{Code: wire.OpCreate, Path: "d/a", Mode: 0o644},
			w("d/a", 0, "the old contents of a"),
			sa("d/a", 0o600, t1),
			{Code: wire.OpRename, Path: "d/a", Path2: "d/b"},
			{Code: wire.OpCreate, Path: "d/a", Mode: 0o644},
			{Code: wire.OpTruncate, Path: "d/a", Off: 20}},
		{w("d/a", 0, "new data"),
			{Code: wire.OpPunch, Path: "d/a", Off: 2, Len: 3},
			sa("d/a", 0o640, t2),
			{Code: wire.OpLink, Path: "d/b", Path2: "c"},
			{Code: wire.OpTruncate, Path: "c", Off: 7},
			{Code: wire.OpRename, Path: "d/a", Path2: "c"},
			{Code: wire.OpTruncate, Path: "d/b", Off: 2}},
	}
	cases := []struct {
		name     string
		setup    []wire.Op
		batches  [][]wire.Op
		depth    int
		killOnly bool
	}{
		{name: "truncate then rename over it (kills only)", setup: setupAB, depth: 3, killOnly: true, batches: [][]wire.Op{{
			sa("a", 0o644, t1),
			{Code: wire.OpTruncate, Path: "a", Off: 3},
			{Code: wire.OpRename, Path: "b", Path2: "a"},
			w("a", 30, "x"),
		}}},
		{name: "truncate then rename over it", setup: setupAB, depth: 2, batches: [][]wire.Op{{
			sa("a", 0o644, t1),
			{Code: wire.OpTruncate, Path: "a", Off: 3},
			{Code: wire.OpRename, Path: "b", Path2: "a"},
		}}},
		{name: "write, rename away, across batches (kills only)", depth: 3, killOnly: true, batches: [][]wire.Op{
			{{Code: wire.OpCreate, Path: "tmp", Mode: 0o644}, w("tmp", 0, "payload")},
			{w("tmp", 7, "!"), sa("tmp", 0o640, t1)},
			{{Code: wire.OpRename, Path: "tmp", Path2: "a"}, w("a", 0, "P")},
		}},
		{name: "write, rename away, across batches", depth: 2, batches: [][]wire.Op{
			{{Code: wire.OpCreate, Path: "tmp", Mode: 0o644}, w("tmp", 0, "payload")},
			{w("tmp", 7, "!"), sa("tmp", 0o640, t1)},
			{{Code: wire.OpRename, Path: "tmp", Path2: "a"}, w("a", 0, "P")},
		}},
		{name: "hard links renamed over each other", depth: 3, killOnly: true, batches: [][]wire.Op{
			{{Code: wire.OpCreate, Path: "a", Mode: 0o644}, w("a", 0, "one inode"),
				{Code: wire.OpLink, Path: "a", Path2: "b"},
				{Code: wire.OpRename, Path: "a", Path2: "b"},
				{Code: wire.OpLink, Path: "b", Path2: "c"},
				{Code: wire.OpCreate, Path: "b", Mode: 0o600},
				w("b", 0, "new b"),
				{Code: wire.OpLink, Path: "b", Path2: "c"},
				w("c", 5, "!"),
			}}},
		{name: "directories", depth: 3, killOnly: true, setup: []wire.Op{
			{Code: wire.OpCreate, Path: "x", Mode: 0o644}, w("x", 0, "file x"),
		}, batches: [][]wire.Op{
			{{Code: wire.OpMkdir, Path: "x", Mode: 0o750},
				{Code: wire.OpCreate, Path: "x/f", Mode: 0o644}, w("x/f", 0, "in x"),
				{Code: wire.OpMkdir, Path: "y", Mode: 0o755},
				{Code: wire.OpCreate, Path: "y/g", Mode: 0o644},
				{Code: wire.OpRename, Path: "x", Path2: "y"},
				w("y/f", 4, "!"),
				{Code: wire.OpRemove, Path: "y"},
				{Code: wire.OpSymlink, Path: "y", Path2: "target"},
				{Code: wire.OpMknod, Path: "fifo", Mode: syscall.S_IFIFO | 0o644},
				{Code: wire.OpRename, Path: "fifo", Path2: "y"},
			}}},
		{name: "builder's rename aside, chains, dirs with writes (kills only)", depth: 3, killOnly: true, setup: []wire.Op{
			{Code: wire.OpMkdir, Path: "w", Mode: 0o755},
			{Code: wire.OpCreate, Path: "w/f", Mode: 0o644}, w("w/f", 0, "old f"),
			{Code: wire.OpCreate, Path: "x", Mode: 0o644}, w("x", 0, "old x"),
		}, batches: [][]wire.Op{
			{w("w/f", 0, "NEW"), {Code: wire.OpTruncate, Path: "w/f", Off: 4}},
			{{Code: wire.OpRename, Path: "w", Path2: "w.old"},
				{Code: wire.OpMkdir, Path: "w", Mode: 0o700},
				w("w.old/f", 4, "tail"),
				{Code: wire.OpRename, Path: "x", Path2: ".duet-replaced-9"},
				{Code: wire.OpCreate, Path: "x", Mode: 0o600},
				w("x", 0, "new x")},
			{{Code: wire.OpRename, Path: ".duet-replaced-9", Path2: "w/x"},
				{Code: wire.OpTruncate, Path: "w/x", Off: 1},
				{Code: wire.OpRename, Path: "x", Path2: "w.old/f"},
				{Code: wire.OpRemove, Path: "w.old"}},
		}},
		{name: "mixed (kills only)", depth: 3, killOnly: true, batches: mixed},
		{name: "mixed with resumes", depth: 2, batches: mixed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			once := t.TempDir()
			if err := applyOps(once, tc.setup); err != nil {
				t.Fatal(err)
			}
			for _, b := range tc.batches {
				if err := applyOps(once, b); err != nil {
					t.Fatal(err)
				}
			}
			want := replayTree(t, once, times)
			fails, runs := 0, 0
			// run replays the stops in order, then a run to the end.
			var run func(stops []stopAt)
			run = func(stops []stopAt) {
				if fails > 5 {
					return
				}
				root := t.TempDir()
				if err := applyOps(root, tc.setup); err != nil {
					t.Fatal(err)
				}
				m := &replayModel{root: root, batches: tc.batches}
				for _, s := range stops {
					_, stopped, resync, err := m.conn(s)
					if resync {
						return
					}
					if err != nil {
						fails++
						t.Errorf("stops %v: %v", stops, err)
						return
					}
					if !stopped {
						return // the stop was past the end, or a savefail at no save
					}
				}
				n, _, resync, err := m.conn(stopAt{})
				runs++
				if resync {
					return
				}
				if err != nil {
					fails++
					t.Errorf("stops %v: final run: %v", stops, err)
					return
				}
				if got := replayTree(t, root, times); got != want {
					fails++
					t.Errorf("stops %v (event = index in its connection; kill=1, savefail=2):\n%s\nwant\n%s", stops, got, want)
				}
				if len(stops) < tc.depth {
					for e := 0; e < n; e++ {
						for _, k := range []stopKind{stopKill, stopSaveFail} {
							if k == stopSaveFail && tc.killOnly {
								continue
							}
							run(append(append([]stopAt(nil), stops...), stopAt{e, k}))
						}
					}
				}
			}
			run(nil)
			t.Logf("%d scenarios run to the end", runs)
		})
	}
}

// TestSecondaryResumeAfterFailedSave (end to end, the real Server): the
// save before a rename fails (EBADF here; EIO or ENOSPC on the state
// directory in life), the connection is refused; the same daemon serves
// the primary's next connection from its in-memory progress (op 1), whose
// first op is the rename; its save fails too, the daemon is restarted
// (same boot) and reads the file, which still says op 0: the truncate is
// applied again, to the file renamed over a.
func TestSecondaryResumeAfterFailedSave(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "state")
	s := newTestSecondary(t, stateDir)
	p := s.connect(t, 7)
	p.batch(1,
		wire.Op{Code: wire.OpCreate, Path: "a", Mode: 0o644},
		wire.Op{Code: wire.OpWrite, Path: "a", Data: []byte("the old contents of a")},
		wire.Op{Code: wire.OpCreate, Path: "b", Mode: 0o600},
		wire.Op{Code: wire.OpWrite, Path: "b", Data: []byte("the new contents, private")})
	p.ack(1, 0)
	p.c.Close()
	r, err := s.state("data")
	if err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()                       // the connection above is done with r
	ro, err := os.Open(r.file.Name()) // saves fail from now on
	if err != nil {
		t.Fatal(err)
	}
	rw := r.file
	r.file = ro
	r.mu.Unlock()
	batch2 := []wire.Op{
		{Code: wire.OpTruncate, Path: "a", Off: 3},
		{Code: wire.OpRename, Path: "b", Path2: "a"},
	}
	for conn := 0; conn < 2; conn++ {
		p = s.connect(t, 7)
		if p.w.Session != 7 || p.w.Applied != 1 {
			t.Fatalf("welcome %+v, want session 7 applied 1", p.w)
		}
		p.batch(2, batch2...)
		f, err := p.read()
		if err != nil || f.Type != wire.TypeError {
			t.Fatalf("connection %d: got %s %q (%v), want a refusal", conn, f.Type, f.Payload, err)
		}
		t.Logf("connection %d refused: %s", conn, f.Payload)
		p.c.Close()
	}
	b, _ := os.ReadFile(filepath.Join(s.data, "a"))
	t.Logf("before the restart a holds %q", b) // at 42342c6: b's contents, the rename done
	// The daemon is restarted: a new Server reads the state file.
	r.mu.Lock()
	rw.Close()
	r.mu.Unlock()
	s2 := newTestSecondary(t, stateDir)
	p = s2.connect(t, 7)
	if p.w.Session != 7 || p.w.Applied != 1 {
		t.Fatalf("welcome after the restart %+v, want session 7 applied 1", p.w)
	}
	p.batch(2, batch2...)
	p.ack(2, 0)
	if b, _ := os.ReadFile(filepath.Join(s2.data, "a")); string(b) != "the new contents, private" {
		t.Fatalf("a holds %q, want b's contents %q", b, "the new contents, private")
	}
}

// TestResumeSkipsNoOpOfAnotherBatch: batch 2 stops after a save that
// recorded one op of it (ops = 1) and is never resent (the primary
// resyncs in the same session: its queue is dropped, its next batches
// have new sequences). The resync's batch 5 then fails at its first op,
// before any save (ENOSPC on the replica in life; here a FIFO a local
// user left where a file is, removed before the retry). The in-memory
// progress is (partial 5, ops 1): the ops count is batch 2's. The
// primary resumes (same session, applied 1) and resends batch 5: its op
// 0 is skipped as "applied", batch 5 is acknowledged, the write is lost.
func TestResumeSkipsNoOpOfAnotherBatch(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "state")
	s := newTestSecondary(t, stateDir)
	p := s.connect(t, 7)
	p.batch(1,
		wire.Op{Code: wire.OpCreate, Path: "a", Mode: 0o644},
		wire.Op{Code: wire.OpWrite, Path: "a", Data: []byte("one")})
	p.ack(1, 0)
	// Batch 2: a create (saved after it: ops 1), then an op that fails.
	p.batch(2,
		wire.Op{Code: wire.OpCreate, Path: "b", Mode: 0o644},
		wire.Op{Code: wire.OpWrite, Path: "missing", Data: []byte("x")})
	if f, err := p.read(); err != nil || f.Type != wire.TypeError {
		t.Fatalf("batch 2: got %s (%v), want a refusal", f.Type, err)
	}
	p.c.Close()

	// The primary resyncs in session 7; its first batch (5) fails at op 0.
	fifo := filepath.Join(s.data, "a")
	os.Remove(fifo)
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	batch5 := []wire.Op{{Code: wire.OpWrite, Path: "a", Data: []byte("RESYNCED")}}
	p = s.connect(t, 7)
	if p.w.Session != 7 || p.w.Applied != 1 {
		t.Fatalf("welcome %+v, want session 7 applied 1", p.w)
	}
	p.batch(5, batch5...)
	if f, err := p.read(); err != nil || f.Type != wire.TypeError {
		t.Fatalf("batch 5: got %s (%v), want a refusal", f.Type, err)
	}
	p.c.Close()
	// The cause goes away (space freed, the FIFO removed).
	os.Remove(fifo)
	if err := os.WriteFile(fifo, []byte("one"), 0o644); err != nil {
		t.Fatal(err)
	}

	// Resumable for the primary: same session, applied 1 >= acked 1.
	p = s.connect(t, 7)
	if p.w.Session != 7 || p.w.Applied != 1 {
		t.Fatalf("welcome %+v, want session 7 applied 1", p.w)
	}
	p.batch(5, batch5...)
	p.ack(5, 0)
	if b, _ := os.ReadFile(fifo); string(b) != "RESYNCED" {
		t.Fatalf("batch 5 acknowledged, a holds %q, want %q: its op 0 was skipped as applied (batch 2's ops count)", b, "RESYNCED")
	}
}
