package nfsd

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// noSync leaves durability to the page cache: for tests that count
// records, not crashes.
type noSync struct{}

func (noSync) Sync(*os.File) error { return nil }

func open(t *testing.T, dir string, s Syncer) *Handler {
	t.Helper()
	h, err := New(dir, s)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// put creates a file through the server, with content.
func put(t *testing.T, h *Handler, p, content string) []byte {
	t.Helper()
	f, err := h.fs.Create(p)
	if err != nil {
		t.Fatalf("creating %s: %v", p, err)
	}
	if _, err := f.Write([]byte(content)); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	fh := h.ToHandle(h.fs, []string{p})
	if fh == nil {
		t.Fatalf("no handle for %s", p)
	}
	return fh
}

// resolvesTo asserts that fh names path p holding content.
func resolvesTo(t *testing.T, h *Handler, what string, fh []byte, p, content string) {
	t.Helper()
	_, marked, err := h.FromHandle(fh)
	if err != nil {
		t.Errorf("%s: handle of %s: %v", what, p, err)
		return
	}
	h.ix.tmu.RLock()
	comps, err := h.fs.real(join(marked))
	h.ix.tmu.RUnlock()
	if got := join(comps); err != nil || got != p {
		t.Errorf("%s: handle of %s resolves to %q", what, p, got)
		return
	}
	b, err := os.ReadFile(filepath.Join(h.fs.root.Name(), p))
	if err != nil || string(b) != content {
		t.Errorf("%s: %s holds %q (%v), want %q", what, p, b, err, content)
	}
}

func isStale(t *testing.T, h *Handler, what string, fh []byte) {
	t.Helper()
	if _, comps, err := h.FromHandle(fh); !errors.Is(err, errStale) {
		t.Errorf("%s: handle resolves to %q (err %v), want stale", what, join(comps), err)
	}
}

func indexFile(dir string, gen uint64) string {
	return filepath.Join(dir, indexDir, fileName(gen))
}

// TestTornIndexTail cuts the index at every byte of its last append, as a
// crash in the middle of the write leaves it, and appends zeros and
// garbage, as a peer that got the new size before the bytes holds it: the
// tail is cut off, earlier handles resolve, the torn one resolves to
// nothing (its file gets a new ID), and appends go on after the cut.
func TestTornIndexTail(t *testing.T) {
	src := t.TempDir()
	h := open(t, src, Fsync{})
	ha := put(t, h, "a", "A")
	hb := put(t, h, "b", "B")
	fi, err := os.Stat(indexFile(src, 1))
	if err != nil {
		t.Fatal(err)
	}
	before := fi.Size()
	hc := put(t, h, "c", "C")
	h.Close()
	full, err := os.ReadFile(indexFile(src, 1))
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(full)) <= before {
		t.Fatalf("creating c appended nothing to the index (%d bytes)", len(full))
	}
	for cut := before; cut < int64(len(full)); cut++ {
		dir := t.TempDir()
		copyTree(t, src, dir)
		if err := os.Truncate(indexFile(dir, 1), cut); err != nil {
			t.Fatal(err)
		}
		h := open(t, dir, Fsync{})
		what := fmt.Sprintf("cut %d bytes into the last append", cut-before)
		resolvesTo(t, h, what, ha, "a", "A")
		resolvesTo(t, h, what, hb, "b", "B")
		isStale(t, h, what, hc)
		if fi, _ := os.Stat(indexFile(dir, 1)); fi.Size() != before {
			t.Errorf("%s: index is %d bytes after opening, want the torn tail cut to %d", what, fi.Size(), before)
		}
		hc2 := h.ToHandle(h.fs, []string{"c"})
		if hc2 == nil || bytes.Equal(hc2, hc) {
			t.Errorf("%s: c's new handle %x, old %x: want a new one", what, hc2, hc)
		}
		hd := put(t, h, "d", "D")
		h.Close()
		h = open(t, dir, Fsync{})
		resolvesTo(t, h, what+", reopened", hc2, "c", "C")
		resolvesTo(t, h, what+", reopened", hd, "d", "D")
		h.Close()
	}
	frame := record{kind: kindSet, id: 99, parent: rootID, name: "zz"}.encode(nil)
	frame[5] ^= 1 // checksum no longer matches
	for name, tail := range map[string][]byte{
		"zeros":           make([]byte, 100),
		"garbage":         []byte("\x07\x00\x00\x00not a record at all"),
		"a damaged frame": frame,
	} {
		dir := t.TempDir()
		copyTree(t, src, dir)
		if err := os.WriteFile(indexFile(dir, 1), append(append([]byte(nil), full...), tail...), 0o600); err != nil {
			t.Fatal(err)
		}
		h := open(t, dir, Fsync{})
		resolvesTo(t, h, name, ha, "a", "A")
		resolvesTo(t, h, name, hc, "c", "C")
		if fi, _ := os.Stat(indexFile(dir, 1)); fi.Size() != int64(len(full)) {
			t.Errorf("%s: index is %d bytes after opening, want %d", name, fi.Size(), len(full))
		}
		h.Close()
	}
}

// TestDamagedIndexRecord damages a record in the middle: what follows it
// is dropped (those handles are stale), nothing resolves to another file.
func TestDamagedIndexRecord(t *testing.T) {
	dir := t.TempDir()
	h := open(t, dir, Fsync{})
	ha := put(t, h, "a", "A")
	fi, _ := os.Stat(indexFile(dir, 1))
	at := fi.Size()
	hb := put(t, h, "b", "B")
	hc := put(t, h, "c", "C")
	h.Close()
	b, _ := os.ReadFile(indexFile(dir, 1))
	b[at+frameLen+2] ^= 0x40 // inside b's record
	os.WriteFile(indexFile(dir, 1), b, 0o600)
	h = open(t, dir, Fsync{})
	defer h.Close()
	resolvesTo(t, h, "damaged b", ha, "a", "A")
	isStale(t, h, "damaged b", hb)
	isStale(t, h, "damaged b", hc)
}

// TestUnfinishedRename opens an index whose last record is a rename, once
// with the rename not done (a crash right after the record) and once
// done: each handle names the file it was given to.
func TestUnfinishedRename(t *testing.T) {
	for _, done := range []bool{false, true} {
		dir := t.TempDir()
		h := open(t, dir, Fsync{})
		ha := put(t, h, "a", "A")
		hb := put(t, h, "b", "B")
		ida, _ := h.key.id(ha)
		idb, _ := h.key.id(hb)
		m := record{kind: kindMove, id: ida, from: rootID, fromName: "a", parent: rootID, name: "b", replaced: idb}
		if err := h.ix.log.append(m); err != nil {
			t.Fatal(err)
		}
		h.Close()
		if done {
			if err := os.Rename(filepath.Join(dir, "a"), filepath.Join(dir, "b")); err != nil {
				t.Fatal(err)
			}
		}
		h = open(t, dir, Fsync{})
		if done {
			resolvesTo(t, h, "rename done", ha, "b", "A")
			isStale(t, h, "rename done", hb)
		} else {
			resolvesTo(t, h, "rename not done", ha, "a", "A")
			resolvesTo(t, h, "rename not done", hb, "b", "B")
		}
		h.Close()
		// What settleMove decided was recorded: a second open agrees.
		h = open(t, dir, Fsync{})
		if !done {
			resolvesTo(t, h, "rename not done, reopened", hb, "b", "B")
		}
		h.Close()
	}
}

// TestCompaction renames one file back and forth until the log is
// compacted: the next generation replaces the first, and handles resolve
// after a restart. An incomplete newer generation (the server stopped
// while writing it) is ignored and removed.
func TestCompaction(t *testing.T) {
	dir := t.TempDir()
	h := open(t, dir, noSync{})
	ha := put(t, h, "a", "A")
	hd := h.ToHandle(h.fs, nil)
	if err := h.fs.MkdirAll("d", 0o755); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2500; i++ {
		if err := h.fs.Rename("a", "d/a"); err != nil {
			t.Fatal(err)
		}
		if err := h.fs.Rename("d/a", "a"); err != nil {
			t.Fatal(err)
		}
	}
	h.Close()
	if _, err := os.Stat(indexFile(dir, 1)); !os.IsNotExist(err) {
		t.Errorf("generation 1 still there after compaction (%v)", err)
	}
	fi, err := os.Stat(indexFile(dir, 2))
	if err != nil {
		t.Fatalf("no generation 2: %v", err)
	}
	// 5000 move records take about 235 KB; compacted at 4096 records, the
	// rest take about 42 KB.
	if fi.Size() > 64<<10 {
		t.Errorf("generation 2 is %d bytes: the records before compaction were kept", fi.Size())
	}
	partial := record{kind: kindHeader, gen: 3, key: make([]byte, keyLen)}.encode(nil)
	partial = record{kind: kindSet, id: 5, parent: rootID, name: "a"}.encode(partial)
	if err := os.WriteFile(indexFile(dir, 3), partial, 0o600); err != nil {
		t.Fatal(err)
	}
	h = open(t, dir, noSync{})
	defer h.Close()
	resolvesTo(t, h, "after compaction", ha, "a", "A")
	if !bytes.Equal(h.ToHandle(h.fs, nil), hd) {
		t.Error("root handle changed across compaction")
	}
	if _, err := os.Stat(indexFile(dir, 3)); !os.IsNotExist(err) {
		t.Errorf("the incomplete generation 3 was not removed (%v)", err)
	}
}
