package replica

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
)

// auditKernel models the capture's in-flight marks (bpf/capture.bpf.c):
// an attribute mark per inode (emit_attr) and a data mark per chunk; a
// change covered by a mark emits no record, and only a forget deletes
// one. It hands every record to every primary of the device, as
// node.dispatch does. cut, when set, is called at every forget (the start
// of a pass or of a resync) so the test can end the connection there.
type auditKernel struct {
	mu     sync.Mutex
	seq    uint64
	attrs  map[capture.InodeKey]bool
	chunks map[capture.CaptureChunkKey]bool
	ps     []*Primary
	cut    atomic.Pointer[func()]
}

func newAuditKernel(ps ...*Primary) *auditKernel {
	return &auditKernel{attrs: map[capture.InodeKey]bool{}, chunks: map[capture.CaptureChunkKey]bool{}, ps: ps}
}

func (k *auditKernel) hook() {
	if f := k.cut.Load(); f != nil {
		(*f)()
	}
}

func (k *auditKernel) ForgetChunks(keys []capture.CaptureChunkKey) error {
	k.mu.Lock()
	for _, c := range keys {
		delete(k.chunks, c)
	}
	k.mu.Unlock()
	k.hook()
	return nil
}

func (k *auditKernel) ForgetAttr(key capture.InodeKey) {
	k.mu.Lock()
	delete(k.attrs, key)
	k.mu.Unlock()
}
func (k *auditKernel) Drain() error { return nil }
func (k *auditKernel) Seq() uint64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.seq
}

func (k *auditKernel) emit(r capture.Record) {
	k.mu.Lock()
	k.seq++
	r.Seq = k.seq
	k.mu.Unlock()
	for _, p := range k.ps {
		if p.Dev == r.Dev {
			p.Record(&r, time.Now())
		}
	}
}

// markedAttr says whether inode ino has an attribute mark.
func (k *auditKernel) markedAttr(ino uint64) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.attrs[capture.InodeKey{Ino: ino}]
}

// attr is an inode update (ext4_mark_inode_dirty): a record only if the
// inode has no mark, which it then gets.
func (k *auditKernel) attr(ino uint64) {
	key := capture.InodeKey{Ino: ino}
	k.mu.Lock()
	if k.attrs[key] {
		k.mu.Unlock()
		return
	}
	k.attrs[key] = true
	k.mu.Unlock()
	k.emit(capture.Record{Ino: ino, Kind: capture.KindAttr, Gen: 1})
}

// data reports [pos, pos+n) chunk by chunk, as data_tw does: a chunk
// with a mark emits nothing.
func (k *auditKernel) data(ino, pos, n uint64) {
	for end := pos + n; pos < end; {
		c := pos >> capture.ChunkShift
		ce := min(end, (c+1)<<capture.ChunkShift)
		key := capture.CaptureChunkKey{Ino: ino, Chunk: c}
		k.mu.Lock()
		marked := k.chunks[key]
		k.chunks[key] = true
		k.mu.Unlock()
		if !marked {
			k.emit(capture.Record{Ino: ino, Kind: capture.KindData, Pos: pos, Len: ce - pos, Gen: 1})
		}
		pos = ce
	}
}

func (k *auditKernel) write(t *testing.T, dir, name string, data []byte) {
	t.Helper()
	p := filepath.Join(dir, name)
	_, err := os.Stat(p)
	fresh := os.IsNotExist(err)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Error(err)
		return
	}
	ino := inoOf(t, p)
	if fresh {
		k.emit(capture.Record{Ino: ino, Kind: capture.KindNew, Gen: 1})
		k.attr(inoOf(t, dir))
	}
	k.attr(ino)
	k.data(ino, 0, uint64(len(data)))
}

func (k *auditKernel) stuck(p *Primary) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []string
	if p.j.Pending() != 0 || p.building {
		return nil
	}
	for a := range k.attrs {
		out = append(out, fmt.Sprintf("attr ino %d", a.Ino))
	}
	for c := range k.chunks {
		out = append(out, fmt.Sprintf("chunk ino %d/%d", c.Ino, c.Chunk))
	}
	return out
}

// TestMarksForgottenUnderCuts cuts the connection at random points (a
// pass's forget, a resync's steps, between writes) while files are
// written, then lets it settle: with the journal empty and no pass
// running, no capture mark may be left set, or the inode's next change
// emits no record and never reaches the peer while it says in sync
// (TestResyncCutAtStartLeavesMarksStuck is the route a review found; this
// one looks for others). On the code before that fix it failed in 3 of
// 5 runs; the route itself is pinned by that test.
func TestMarksForgottenUnderCuts(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	vol := filepath.Join(src, "vol")
	if err := os.MkdirAll(vol, 0o755); err != nil {
		t.Fatal(err)
	}
	sec := newTestSecondary(t, filepath.Join(top, "peer", "state"))
	p, err := NewPrimary(Dir{Name: "data", Path: src}, sec.addr, testLink, 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	k := newAuditKernel(p)
	rng := rand.New(rand.NewSource(3))
	var rmu sync.Mutex // the hooks run on the primary's goroutines
	intn := func(n int) int { rmu.Lock(); defer rmu.Unlock(); return rng.Intn(n) }
	var chaos atomic.Bool
	maybeDrop := func(where string) {
		if chaos.Load() && intn(2) == 0 {
			p.Drop("test: cut at " + where)
		}
	}
	cut := func() { maybeDrop("forget") }
	k.cut.Store(&cut)
	p.resyncStep = func(step string) { maybeDrop(step) }
	p.DiskCheck = func(context.Context) error { maybeDrop("disk check"); return nil }
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); p.Run(ctx, k) }()
	defer func() { cancel(); wg.Wait() }()
	waitFor(t, "the first sync", func() bool { return p.Streaming() })

	chaos.Store(true)
	for i := range 60 {
		k.write(t, vol, fmt.Sprintf("f-%03d", i%20), []byte(fmt.Sprintf("round %d\n", i)))
		if intn(6) == 0 {
			p.Resync(false)
		}
		maybeDrop("write")
		time.Sleep(time.Duration(intn(30)) * time.Millisecond)
	}
	chaos.Store(false)
	waitFor(t, "settled", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.streamingLocked() && p.j.Pending() == 0 && !p.building && p.out.settled()
	})
	if s := k.stuck(p); len(s) > 0 {
		t.Fatalf("marks left set with nothing in the journal: %v", s)
	}
	// And a change made now reaches the peer.
	k.write(t, vol, "last", []byte("last\n"))
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	if err := p.WaitShipped(wctx, k, Release{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(sec.data, "vol", "last")); err != nil {
		t.Fatalf("vol/last not on the peer: %v", err)
	}
	st := p.Status()
	t.Logf("full syncs %d, lost sessions %d", st.FullSyncs, p.lostSessions)
}

// TestMarksForgottenTwoDirsMovesEOF: the same with two replicated
// directories on one device (every record goes to both primaries), files
// moved out of both trees and back, and writes announced past EOF
// (requeued, then given up).
func TestMarksForgottenTwoDirsMovesEOF(t *testing.T) {
	for seed := int64(1); seed <= 2; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { markAuditTwoDirs(t, seed) })
	}
}

func markAuditTwoDirs(t *testing.T, seed int64) {
	top := t.TempDir()
	srcA, srcB, out := filepath.Join(top, "a"), filepath.Join(top, "b"), filepath.Join(top, "out")
	for _, d := range []string{filepath.Join(srcA, "vol"), filepath.Join(srcB, "vol"), out} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	secA := newTestSecondary(t, filepath.Join(top, "peerA", "state"))
	secB := newTestSecondary(t, filepath.Join(top, "peerB", "state"))
	pa, err := NewPrimary(Dir{Name: "data", Path: srcA}, secA.addr, testLink, 0, log)
	if err != nil {
		t.Fatal(err)
	}
	defer pa.Close()
	pb, err := NewPrimary(Dir{Name: "data", Path: srcB}, secB.addr, testLink, 0, log)
	if err != nil {
		t.Fatal(err)
	}
	defer pb.Close()
	ps := []*Primary{pa, pb}
	k := newAuditKernel(pa, pb)
	rng := rand.New(rand.NewSource(seed))
	var rmu sync.Mutex
	intn := func(n int) int { rmu.Lock(); defer rmu.Unlock(); return rng.Intn(n) }
	var chaos atomic.Bool
	maybeDrop := func(p *Primary) {
		if chaos.Load() && intn(3) == 0 {
			p.Drop("test cut")
		}
	}
	cut := func() { maybeDrop(ps[intn(2)]) }
	k.cut.Store(&cut)
	for _, p := range ps {
		p.resyncStep = func(string) { maybeDrop(p) }
		p.DiskCheck = func(context.Context) error { maybeDrop(p); return nil }
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, p := range ps {
		wg.Add(1)
		go func() { defer wg.Done(); p.Run(ctx, k) }()
	}
	defer func() { cancel(); wg.Wait() }()
	waitFor(t, "the first syncs", func() bool { return pa.Streaming() && pb.Streaming() })

	chaos.Store(true)
	vols := []string{filepath.Join(srcA, "vol"), filepath.Join(srcB, "vol")}
	for i := range 80 {
		d := vols[intn(2)]
		name := fmt.Sprintf("f-%03d", intn(15))
		switch intn(5) {
		case 0: // move out of both trees, or back in
			if _, err := os.Stat(filepath.Join(d, name)); err == nil {
				ino := inoOf(t, filepath.Join(d, name))
				if os.Rename(filepath.Join(d, name), filepath.Join(out, name)) == nil {
					k.attr(ino)
					k.attr(inoOf(t, d))
					k.attr(inoOf(t, out))
				}
			} else if _, err := os.Stat(filepath.Join(out, name)); err == nil {
				ino := inoOf(t, filepath.Join(out, name))
				if os.Rename(filepath.Join(out, name), filepath.Join(d, name)) == nil {
					k.attr(ino)
					k.attr(inoOf(t, d))
					k.attr(inoOf(t, out))
				}
			}
		case 1: // written where it is, out of the trees too
			dir := d
			if intn(2) == 0 {
				dir = out
			}
			k.write(t, dir, name, []byte(fmt.Sprintf("round %d\n", i)))
		default:
			data := []byte(fmt.Sprintf("round %d\n", i))
			k.write(t, d, name, data)
			if intn(3) == 0 {
				// announced ahead of the write, past EOF
				// (an extended mark: a new record, as data_tw's
				// touching branch emits)
				ino := inoOf(t, filepath.Join(d, name))
				k.mu.Lock()
				k.chunks[capture.CaptureChunkKey{Ino: ino}] = true
				k.mu.Unlock()
				k.emit(capture.Record{Ino: ino, Kind: capture.KindData, Pos: 0, Len: uint64(len(data)) + 64<<10, Gen: 1})
			}
		}
		if intn(8) == 0 {
			ps[intn(2)].Resync(false)
		}
		maybeDrop(ps[intn(2)])
		time.Sleep(time.Duration(intn(20)) * time.Millisecond)
	}
	chaos.Store(false)
	quiet := func() bool {
		for _, p := range ps {
			p.mu.Lock()
			ok := p.streamingLocked() && p.j.Pending() == 0 && !p.building && p.out.settled()
			p.mu.Unlock()
			if !ok {
				return false
			}
		}
		return true
	}
	waitFor(t, "settled", quiet)
	for _, p := range ps {
		if s := k.stuck(p); len(s) > 0 {
			t.Fatalf("marks left set with nothing in either journal: %v", s)
		}
	}
	// Everything moved back in, then one more change in each: on the peers.
	ents, _ := os.ReadDir(out)
	for i, e := range ents {
		d := vols[i%2]
		ino := inoOf(t, filepath.Join(out, e.Name()))
		if _, err := os.Stat(filepath.Join(d, e.Name())); err == nil {
			continue
		}
		if err := os.Rename(filepath.Join(out, e.Name()), filepath.Join(d, e.Name())); err != nil {
			t.Fatal(err)
		}
		k.attr(ino)
		k.attr(inoOf(t, d))
		k.attr(inoOf(t, out))
	}
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	for i, p := range ps {
		if err := p.WaitShipped(wctx, k, Release{}); err != nil {
			t.Fatal(err)
		}
		sec := []*testSecondary{secA, secB}[i]
		les, _ := os.ReadDir(vols[i])
		for _, e := range les {
			want, _ := os.ReadFile(filepath.Join(vols[i], e.Name()))
			got, err := os.ReadFile(filepath.Join(sec.data, "vol", e.Name()))
			if err != nil || string(got) != string(want) {
				t.Errorf("%s: vol/%s on the peer %q (%v), here %q", p.Dir.Name, e.Name(), got, err, want)
			}
		}
	}
	t.Logf("a: full syncs %d lost %d dropped %d; b: full syncs %d lost %d dropped %d",
		pa.Status().FullSyncs, pa.lostSessions, pa.dropped, pb.Status().FullSyncs, pb.lostSessions, pb.dropped)
}
