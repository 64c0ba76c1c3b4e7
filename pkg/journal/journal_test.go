package journal

import (
	"math/rand"
	"reflect"
	"runtime"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
)

func TestRangesAdd(t *testing.T) {
	tests := []struct {
		name string
		add  [][2]uint64
		want []Span
	}{
		{"empty", nil, nil},
		{"zero length ignored", [][2]uint64{{5, 0}}, nil},
		{"one", [][2]uint64{{10, 5}}, []Span{{10, 15}}},
		{"disjoint sorted", [][2]uint64{{30, 5}, {10, 5}}, []Span{{10, 15}, {30, 35}}},
		{"adjacent merge", [][2]uint64{{10, 5}, {15, 5}}, []Span{{10, 20}}},
		{"overlap merge", [][2]uint64{{10, 10}, {15, 10}}, []Span{{10, 25}}},
		{"contained", [][2]uint64{{10, 20}, {12, 2}}, []Span{{10, 30}}},
		{"bridge three", [][2]uint64{{0, 2}, {4, 2}, {8, 2}, {1, 8}}, []Span{{0, 10}}},
		{"before all", [][2]uint64{{10, 2}, {0, 2}}, []Span{{0, 2}, {10, 12}}},
		{"overflow clamps", [][2]uint64{{^uint64(0) - 1, 10}}, []Span{{^uint64(0) - 1, ^uint64(0)}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var r Ranges
			for _, a := range tt.add {
				r.Add(a[0], a[1])
			}
			if got := r.Spans(); !reflect.DeepEqual(got, tt.want) && !(len(got) == 0 && len(tt.want) == 0) {
				t.Fatalf("spans = %v, want %v", got, tt.want)
			}
		})
	}
}

// TestRangesModel checks Ranges against a byte map for random inserts.
func TestRangesModel(t *testing.T) {
	for seed := int64(1); seed <= 50; seed++ {
		rng := rand.New(rand.NewSource(seed))
		var r Ranges
		model := make([]bool, 512)
		for i := 0; i < 40; i++ {
			off := uint64(rng.Intn(480))
			n := uint64(rng.Intn(32))
			r.Add(off, n)
			for b := off; b < off+n; b++ {
				model[b] = true
			}
		}
		got := make([]bool, 512)
		var prevEnd uint64
		for i, s := range r.Spans() {
			if s.Off >= s.End || (i > 0 && s.Off <= prevEnd) {
				t.Fatalf("seed %d: spans not sorted, disjoint and non-adjacent: %v", seed, r.Spans())
			}
			prevEnd = s.End
			for b := s.Off; b < s.End; b++ {
				got[b] = true
			}
		}
		if !reflect.DeepEqual(got, model) {
			t.Fatalf("seed %d: set differs from model", seed)
		}
	}
}

func TestRangesClip(t *testing.T) {
	var r Ranges
	r.Add(0, 10)
	r.Add(20, 10)
	r.Add(40, 10)
	r.Clip(25)
	if want := []Span{{0, 10}, {20, 25}}; !reflect.DeepEqual(r.Spans(), want) {
		t.Fatalf("clip = %v, want %v", r.Spans(), want)
	}
	if r.Bytes() != 15 {
		t.Fatalf("bytes = %d", r.Bytes())
	}
	r.Clip(0)
	if !r.Empty() {
		t.Fatal("clip(0) left bytes")
	}
}

func TestJournalPreopWaitsForAttr(t *testing.T) {
	j := New()
	now := time.Unix(1000, 0)
	k := capture.InodeKey{Dev: 1, Ino: 7}
	j.Add(&capture.Record{Seq: 5, Dev: 1, Ino: 7, Kind: capture.KindPreop, Pos: 100, Len: 50}, now)
	if got := j.Take(now); len(got) != 0 {
		t.Fatalf("preop shipped before completion: %+v", got)
	}
	// An ATTR older than the preop does not release it.
	j.Add(&capture.Record{Seq: 4, Dev: 1, Ino: 7, Kind: capture.KindAttr}, now)
	got := j.Take(now)
	if len(got) != 1 || !got[0].Data.Empty() {
		t.Fatalf("older attr released the preop: %+v", got)
	}
	j.Add(&capture.Record{Seq: 9, Dev: 1, Ino: 7, Kind: capture.KindAttr}, now)
	got = j.Take(now)
	if len(got) != 1 || got[0].Key != k || !reflect.DeepEqual(got[0].Data.Spans(), []Span{{100, 150}}) {
		t.Fatalf("after completion: %+v", got)
	}
	if j.Pending() != 0 {
		t.Fatalf("pending = %d after release", j.Pending())
	}
}

func TestJournalPreopTimeout(t *testing.T) {
	j := New()
	now := time.Unix(1000, 0)
	j.Add(&capture.Record{Seq: 5, Dev: 1, Ino: 7, Kind: capture.KindPreop, Pos: 0, Len: 10}, now)
	if got := j.Take(now.Add(PreopTimeout / 2)); len(got) != 0 {
		t.Fatalf("released early: %+v", got)
	}
	got := j.Take(now.Add(PreopTimeout))
	if len(got) != 1 || got[0].Data.Bytes() != 10 {
		t.Fatalf("not released after timeout: %+v", got)
	}
}

func TestJournalCoalescesAndFlags(t *testing.T) {
	j := New()
	now := time.Now()
	j.Add(&capture.Record{Seq: 1, Dev: 1, Ino: 2, Kind: capture.KindData, Pos: 0, Len: 4096}, now)
	j.Add(&capture.Record{Seq: 2, Dev: 1, Ino: 2, Kind: capture.KindData, Pos: 4096, Len: 4096}, now)
	j.Add(&capture.Record{Seq: 3, Dev: 1, Ino: 2, Kind: capture.KindMmap, Pos: 65536, Len: 4096}, now)
	j.MarkRescan(capture.InodeKey{Dev: 1, Ino: 3})
	got := j.Take(now)
	if len(got) != 2 {
		t.Fatalf("files = %d", len(got))
	}
	for _, f := range got {
		switch f.Key.Ino {
		case 2:
			if !f.Writeback || f.MaxSeq != 3 || !reflect.DeepEqual(f.Data.Spans(), []Span{{0, 8192}, {65536, 69632}}) {
				t.Fatalf("ino 2: %+v", f)
			}
		case 3:
			if !f.Rescan || !f.Attr {
				t.Fatalf("ino 3: %+v", f)
			}
		}
	}
	if len(j.Take(now)) != 0 {
		t.Fatal("take did not forget")
	}
}

// A "to end of file" range must not swallow bounded ranges: those carry
// in-kernel chunk marks that userspace deletes by range.
func TestJournalTailKeptApart(t *testing.T) {
	j := New()
	now := time.Now()
	j.Add(&capture.Record{Seq: 1, Dev: 1, Ino: 2, Kind: capture.KindData, Pos: 70000, Len: 100}, now)
	j.Add(&capture.Record{Seq: 2, Dev: 1, Ino: 2, Kind: capture.KindData, Pos: 50000, Len: 1 << 62}, now)
	j.Add(&capture.Record{Seq: 3, Dev: 1, Ino: 2, Kind: capture.KindData, Pos: 60000, Len: 1 << 62}, now)
	got := j.Take(now)
	if len(got) != 1 || !got[0].HasTail || got[0].Tail != 50000 || !reflect.DeepEqual(got[0].Data.Spans(), []Span{{70000, 70100}}) {
		t.Fatalf("got %+v", got)
	}
}

func TestDropSettled(t *testing.T) {
	j := New()
	now := time.Now()
	j.Add(&capture.Record{Kind: capture.KindData, Ino: 1, Pos: 0, Len: 10, Seq: 1}, now)
	j.Add(&capture.Record{Kind: capture.KindMmap, Ino: 2, Pos: 0, Len: 10, Seq: 2}, now)
	j.Add(&capture.Record{Kind: capture.KindPreop, Ino: 3, Pos: 0, Len: 10, Seq: 3}, now)
	j.Requeue(File{Key: capture.InodeKey{Ino: 4}, Data: func() Ranges { var r Ranges; r.Add(0, 5); return r }()})
	if d := j.DropSettled(); len(d) != 1 || d[0].Key.Ino != 1 {
		t.Fatalf("dropped %+v, want the plain write", d)
	}
	if j.Pending() != 3 {
		t.Fatalf("%d left, want the mapped write, the operation in progress and the requeued bytes", j.Pending())
	}
}

// A requeued change keeps its count of tries and the time of its first,
// unless a record about the inode came meanwhile: then what failed is
// merged with a change not tried yet, which must not be given up on the
// strength of the older one's tries.
func TestRequeueCountsAgainAfterNewRecord(t *testing.T) {
	j := New()
	now := time.Now()
	first := now.Add(-time.Minute)
	k := capture.InodeKey{Dev: 1, Ino: 7}
	j.Add(&capture.Record{Seq: 5, Dev: 1, Ino: 7, Kind: capture.KindData, Pos: 0, Len: 10}, now)
	got := j.Take(now)
	f := got[0]
	f.Retries, f.RetryFrom = 49, first
	j.Requeue(f)
	got = j.Take(now)
	if len(got) != 1 || got[0].Retries != 50 || !got[0].RetryFrom.Equal(first) {
		t.Fatalf("requeued alone: %+v, want 50 tries since %v", got, first)
	}
	f = got[0]
	j.Add(&capture.Record{Seq: 6, Dev: 1, Ino: 7, Kind: capture.KindData, Pos: 100, Len: 10}, now)
	j.Requeue(f)
	got = j.Take(now)
	if len(got) != 1 || got[0].Key != k || got[0].Retries != 1 || !got[0].RetryFrom.IsZero() {
		t.Fatalf("requeued after a new record: %+v, want the count started again", got)
	}
	if spans := got[0].Data.Spans(); len(spans) != 2 {
		t.Fatalf("spans %v, want the requeued and the new one", spans)
	}
}

// The generation kept is the last record's (a reused number reports the
// new inode's), and a requeued entry does not take the place of a newer
// record's.
func TestJournalKeepsLastGeneration(t *testing.T) {
	j := New()
	now := time.Now()
	j.Add(&capture.Record{Seq: 1, Ino: 7, Gen: 10, Kind: capture.KindAttr}, now)
	j.Add(&capture.Record{Seq: 3, Ino: 7, Gen: 11, Kind: capture.KindNew}, now)
	j.Add(&capture.Record{Seq: 2, Ino: 7, Gen: 10, Kind: capture.KindData, Len: 1}, now)
	taken := j.Take(now)
	if len(taken) != 1 || !taken[0].HasGen || taken[0].Gen != 11 {
		t.Fatalf("took %+v, want generation 11", taken)
	}
	j.Add(&capture.Record{Seq: 4, Ino: 7, Gen: 12, Kind: capture.KindAttr}, now)
	j.Requeue(taken[0])
	if got := j.Take(now); len(got) != 1 || got[0].Gen != 12 {
		t.Fatalf("after a requeue, took %+v, want generation 12", got)
	}
	j.Requeue(File{Key: capture.InodeKey{Ino: 8}, Gen: 5, HasGen: true, MaxSeq: 9, Attr: true})
	if got := j.Take(now); len(got) != 1 || got[0].Gen != 5 || !got[0].HasGen {
		t.Fatalf("requeued alone, took %+v, want generation 5", got)
	}
}

// heapInUse is the heap in use after two collections (the second frees
// what the first's finalizers let go).
func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// A burst of changed files grows the journal's map; once a pass took
// them the map's room must go too, not stay for as long as the daemon
// runs. What is still pending stays.
func TestTakeLetsGoOfABurst(t *testing.T) {
	const burst = 200_000
	base := heapInUse()
	j := New()
	now := time.Now()
	for i := range uint64(burst) {
		j.Add(&capture.Record{Kind: capture.KindAttr, Dev: 1, Ino: 1 + i}, now)
	}
	held := heapInUse()
	if got := len(j.Take(now)); got != burst {
		t.Fatalf("took %d files, want %d", got, burst)
	}
	j.Add(&capture.Record{Kind: capture.KindData, Dev: 1, Ino: 7, Pos: 0, Len: 10}, now)
	after := heapInUse()
	runtime.KeepAlive(j)
	if j.Pending() != 1 {
		t.Fatalf("%d files pending, want 1", j.Pending())
	}
	if held <= base {
		t.Fatal("no measurement: the heap did not grow with the burst")
	}
	grew, stays := held-base, int64(after)-int64(base)
	t.Logf("the burst took %d KiB of heap, %d KiB stay after the pass took it", grew>>10, stays>>10)
	if stays > int64(grew)/10 {
		t.Fatalf("%d KiB of the burst's %d KiB stay after the pass took it", stays>>10, grew>>10)
	}
}
