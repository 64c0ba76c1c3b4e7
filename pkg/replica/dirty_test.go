package replica

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/journal"
	"github.com/duet-ha/duet/pkg/wire"
)

func TestDirtySetChunksAndClear(t *testing.T) {
	d := newDirtySet()
	d.record(&capture.Record{Kind: capture.KindData, Ino: 5, Pos: 100, Len: 10}, 1) // chunk 0
	d.record(&capture.Record{Kind: capture.KindData, Ino: 5, Pos: 8190, Len: 4}, 2) // chunks 1 and 2
	d.record(&capture.Record{Kind: capture.KindData, Ino: 6, Pos: 0, Len: 4096}, 3) // chunk 0 of 6
	d.record(&capture.Record{Kind: capture.KindAttr, Ino: 7}, 4)                    // metadata only
	d.record(&capture.Record{Kind: capture.KindData, Ino: 5, Pos: 0, Len: 1}, 5)    // chunk 0 again, later
	if d.bytes() != 4*DirtyChunk {
		t.Fatalf("bytes %d, want 4 chunks", d.bytes())
	}
	spans, whole := d.spans(5, 1<<20)
	want := []journal.Span{{Off: 0, End: 3 * DirtyChunk}}
	if whole || !reflect.DeepEqual(spans, want) {
		t.Fatalf("spans of 5: %v whole %v, want %v", spans, whole, want)
	}
	// Clipped to the file's size.
	if spans, _ := d.spans(5, 5000); !reflect.DeepEqual(spans, []journal.Span{{Off: 0, End: 5000}}) {
		t.Fatalf("clipped spans %v", spans)
	}
	// The peer made changes up to 3 durable: chunk 0 of 5 was touched
	// again by change 5 and stays; 7's metadata (change 4) stays.
	d.clear(3)
	spans, _ = d.spans(5, 1<<20)
	if !reflect.DeepEqual(spans, []journal.Span{{Off: 0, End: DirtyChunk}}) {
		t.Fatalf("after clear(3): %v", spans)
	}
	if d.has(6) || !d.has(7) {
		t.Fatalf("after clear(3): has 6 %v, has 7 %v", d.has(6), d.has(7))
	}
	d.clear(5)
	if len(d.files) != 0 || d.chunks != 0 {
		t.Fatalf("after clear(5): %d files, %d chunks left", len(d.files), d.chunks)
	}
}

func TestDirtySetTailWholeAndFileClear(t *testing.T) {
	d := newDirtySet()
	d.record(&capture.Record{Kind: capture.KindData, Ino: 1, Pos: 10000, Len: journal.Unbounded}, 1) // truncate
	spans, _ := d.spans(1, 20000)
	if !reflect.DeepEqual(spans, []journal.Span{{Off: 10000, End: 20000}}) {
		t.Fatalf("tail spans %v", spans)
	}
	d.rescan(2, 2)
	if _, whole := d.spans(2, 10); !whole {
		t.Fatal("a rescanned inode must be sent whole")
	}
	d.record(&capture.Record{Kind: capture.KindData, Ino: 3, Pos: 0, Len: 1}, 3)
	d.clearFile(3, 2) // shipped by a resync that counted up to 2: change 3 stays
	if !d.has(3) {
		t.Fatal("clearFile forgot a later change")
	}
	d.clearFile(3, 3)
	if d.has(3) {
		t.Fatal("clearFile kept a change the peer holds")
	}
}

func TestDirtySetSaveLoad(t *testing.T) {
	d := newDirtySet()
	for i := uint64(0); i < 100; i++ {
		d.record(&capture.Record{Kind: capture.KindData, Ino: 9, Pos: i * 3 * DirtyChunk, Len: 1}, i+1)
	}
	d.record(&capture.Record{Kind: capture.KindData, Ino: 4, Pos: 77, Len: journal.Unbounded}, 200)
	d.record(&capture.Record{Kind: capture.KindAttr, Ino: 8}, 201)
	d.rescan(10, 202)
	d.record(&capture.Record{Kind: capture.KindNew, Ino: 11}, 203)
	d.record(&capture.Record{Kind: capture.KindData, Ino: 11, Pos: 8192, Len: 100}, 204)
	if _, whole := d.spans(11, 8292); !whole {
		t.Fatal("an inode made since the peer had it must be sent whole: the peer's file under its name is another")
	}
	path := filepath.Join(t.TempDir(), "bitmap")
	if err := d.save(path, 1234); err != nil {
		t.Fatal(err)
	}
	got, base, err := loadDirty(path)
	if err != nil || base != 1234 {
		t.Fatalf("load: base %d, %v", base, err)
	}
	for _, ino := range []uint64{9, 4, 8, 10, 11} {
		a, aw := d.spans(ino, 1<<30)
		b, bw := got.spans(ino, 1<<30)
		if !reflect.DeepEqual(a, b) || aw != bw || got.has(ino) != d.has(ino) {
			t.Fatalf("inode %d: saved %v/%v, loaded %v/%v", ino, a, aw, b, bw)
		}
	}
	if got.bytes() != d.bytes() {
		t.Fatalf("bytes %d, want %d", got.bytes(), d.bytes())
	}
	// A bitmap saved by a build before the born mark (DUETDIRTY1) is
	// still read.
	v1, _ := os.ReadFile(path)
	copy(v1, dirtyMagicV1)
	v1 = binary.LittleEndian.AppendUint32(v1[:len(v1)-4], crc32.Checksum(v1[:len(v1)-4], castagnoli))
	os.WriteFile(path+".v1", v1, 0o600)
	if _, _, err := loadDirty(path + ".v1"); err != nil {
		t.Fatalf("a DUETDIRTY1 bitmap: %v", err)
	}
	// A damaged file is refused, never half-used.
	b, _ := os.ReadFile(path)
	b[len(b)/2] ^= 0xff
	os.WriteFile(path, b, 0o600)
	if _, _, err := loadDirty(path); !errors.Is(err, errDirtyDamaged) {
		t.Fatalf("damaged bitmap: %v", err)
	}
	os.WriteFile(path, []byte("DUETDIRTY1"), 0o600)
	if _, _, err := loadDirty(path); !errors.Is(err, errDirtyDamaged) {
		t.Fatalf("truncated bitmap: %v", err)
	}
}

func TestMetaCrashMarker(t *testing.T) {
	dir := t.TempDir()
	ms, err := OpenMeta(dir, "d")
	if err != nil {
		t.Fatal(err)
	}
	if m := ms.Get(); m.Crashed || !m.Running {
		t.Fatalf("first start: %+v", m)
	}
	ms.Update(func(m *Meta) { m.Gen, m.Consistent = 7, true })
	// A daemon that dies without clearing Running: the next one sees a crash.
	ms2, _ := OpenMeta(dir, "d")
	if m := ms2.Get(); !m.Crashed || m.Gen != 7 {
		t.Fatalf("after a crash: %+v", m)
	}
	m2 := ms2.Get()
	if st := m2.welcomeState(); st&wire.CopyDiverged == 0 || st&wire.CopyConsistent == 0 {
		t.Fatalf("a crashed consistent replica announces %d", st)
	}
	// A clean stop, then a start: no crash.
	ms2.Update(func(m *Meta) { m.Running, m.Crashed = false, false })
	ms3, _ := OpenMeta(dir, "d")
	if m := ms3.Get(); m.Crashed {
		t.Fatalf("after a clean stop: %+v", m)
	}
	// A damaged file costs the lineage, not the start.
	os.WriteFile(filepath.Join(dir, "copy-d.json"), []byte("{not json"), 0o600)
	ms4, err := OpenMeta(dir, "d")
	if err != nil || ms4.Get().Gen != 0 {
		t.Fatalf("damaged meta: %+v, %v", ms4.Get(), err)
	}
}

func TestResyncPlan(t *testing.T) {
	now := time.Now().UnixNano()
	margin := DefaultMargin.Nanoseconds()
	mk := func(trusted bool, selfSync int64) *Primary {
		return &Primary{lin: lineage{gen: 20, base: 10, trusted: trusted, selfSync: selfSync}}
	}
	stopped := func(savedAt int64) *Primary {
		return &Primary{lin: lineage{gen: 20, base: 10, trusted: true, selfSync: savedAt - int64(time.Hour), untracked: savedAt}}
	}
	tests := []struct {
		name       string
		p          *Primary
		w          wire.Welcome
		mode       string
		cutS, cutT int64
		report     bool
	}{
		{"clean replica of the bitmap's base", mk(true, now), wire.Welcome{Gen: 10, State: wire.CopyConsistent}, "bitmap", 0, 0, false},
		{"unknown copy", mk(true, now), wire.Welcome{Gen: 99, State: wire.CopyConsistent}, "full", 0, 0, false},
		{"new replica", mk(true, now), wire.Welcome{}, "full", 0, 0, false},
		{"crashed replica", mk(true, now), wire.Welcome{Gen: 10, SyncTime: now, State: wire.CopyConsistent | wire.CopyDiverged}, "bitmap+recent", 0, now - margin, false},
		{"returning old primary", mk(true, now), wire.Welcome{Gen: 10, SyncTime: now, State: wire.CopyDiverged | wire.CopySource}, "bitmap+recent", now - margin, now - margin, true},
		{"crashed source, clean replica", mk(false, now), wire.Welcome{Gen: 10, State: wire.CopyConsistent}, "recent", now - margin, 0, false},
		{"crashed source without a sync point", mk(false, 0), wire.Welcome{Gen: 10, State: wire.CopyConsistent}, "full", 0, 0, false},
		{"crashed replica without a sync point", mk(true, now), wire.Welcome{Gen: 10, State: wire.CopyDiverged}, "full", 0, 0, false},
		// The bitmap saved at a clean stop holds nothing of what changed
		// while duet was stopped: those files are compared.
		{"cleanly stopped source", stopped(now), wire.Welcome{Gen: 10, State: wire.CopyConsistent}, "bitmap+recent", now - margin, 0, false},
	}
	for _, tc := range tests {
		pl := tc.p.plan(tc.w)
		if pl.mode != tc.mode || pl.cutoffS != tc.cutS || pl.cutoffT != tc.cutT || pl.report != tc.report {
			t.Errorf("%s: got %+v, want mode %s cutoffs %d/%d report %v", tc.name, pl, tc.mode, tc.cutS, tc.cutT, tc.report)
		}
	}
	p := mk(true, now)
	p.forceAll = true
	if pl := p.plan(wire.Welcome{Gen: 10, State: wire.CopyConsistent}); pl.mode != "full" {
		t.Fatalf("duet resync --full planned %q", pl.mode)
	}
}

func TestFileSpans(t *testing.T) {
	s1, s2 := wire.Sum{1}, wire.Sum{2}
	l := &wire.Entry{Path: "f", Size: 3 * wire.BlockSize, Ino: 1, Flags: wire.EntrySummed, Sums: []wire.Sum{s1, s1, s1}}
	p := &wire.Entry{Path: "f", Size: 3 * wire.BlockSize, Flags: wire.EntrySummed, Sums: []wire.Sum{s1, s2, s1}}
	spans, whole := fileSpans(l, p, &treeSync{window: true})
	if whole || !reflect.DeepEqual(spans, []journal.Span{{Off: wire.BlockSize, End: 2 * wire.BlockSize}}) {
		t.Fatalf("by checksums: %v %v", spans, whole)
	}
	// Not compared, not in the bitmap, same size: unchanged.
	l2, p2 := &wire.Entry{Size: 10, Ino: 2}, &wire.Entry{Size: 10}
	d := newDirtySet()
	if spans, whole := fileSpans(l2, p2, &treeSync{dirty: d, window: true}); whole || len(spans) != 0 {
		t.Fatalf("unchanged file: %v %v", spans, whole)
	}
	// The sizes differ although the bitmap says nothing: sent whole.
	p2.Size = 11
	if _, whole := fileSpans(l2, p2, &treeSync{dirty: d, window: true}); !whole {
		t.Fatal("a size the bitmap cannot explain must send the file whole")
	}
	// Changed here since the sync point but the peer's entry was not
	// summed (a rename matched by size and mtime): whole, never assumed equal.
	if _, whole := fileSpans(&wire.Entry{Size: 10, Ino: 3, Flags: wire.EntrySummed}, &wire.Entry{Size: 10}, &treeSync{window: true}); !whole {
		t.Fatal("a recent file compared with an unsummed peer entry must be sent whole")
	}
	// Full mode without checksums on one side: whole.
	if _, whole := fileSpans(l2, &wire.Entry{Size: 10}, &treeSync{}); !whole {
		t.Fatal("no checksums and no bitmap: whole")
	}
}

// A burst of changed files (a tree unpacked, the writeback of many new
// files) grows the bitmap's map; once the peer holds them, the map's room
// must go too, not stay for as long as the daemon runs: tens of bytes a
// file, 7 MiB of a lab primary's heap after 100,000 new files. The
// files still marked stay as they were.
func TestDirtySetLetsGoOfABurst(t *testing.T) {
	const burst, kept = 200_000, 1000
	base := liveHeap()
	d := newDirtySet()
	for i := range uint64(burst) {
		d.record(&capture.Record{Kind: capture.KindAttr, Ino: 1 + i}, 1+i)
	}
	for i := range uint64(kept) {
		d.record(&capture.Record{Kind: capture.KindData, Ino: 1 + i, Pos: 4096 * i, Len: 10}, burst+1+i)
	}
	held := liveHeap()
	d.clear(burst)
	d.shrink()
	after := liveHeap()
	if len(d.files) != kept {
		t.Fatalf("%d files marked after the clear, want %d", len(d.files), kept)
	}
	for i := range uint64(kept) {
		f := d.files[1+i]
		if f == nil || f.attr != 0 || len(f.chunks) != 1 || f.chunks[i] != burst+1+i {
			t.Fatalf("file %d after the clear: %+v", 1+i, f)
		}
	}
	runtime.KeepAlive(d)
	if held <= base {
		t.Fatal("no measurement: the heap did not grow with the burst")
	}
	grew, stays := held-base, int64(after)-int64(base)
	t.Logf("the burst took %d KiB of heap, %d KiB stay after the clear", grew>>10, stays>>10)
	if stays > int64(grew)/10 {
		t.Fatalf("%d KiB of the burst's %d KiB stay after the peer holds all but %d files", stays>>10, grew>>10, kept)
	}
}
