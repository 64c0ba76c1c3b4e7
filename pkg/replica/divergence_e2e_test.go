package replica

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
)

// e2eKernel hands every record to the primary at once (no in-flight
// marks: a superset of what the capture emits) and may cut the
// connection at a pass's forget.
type e2eKernel struct {
	mu  sync.Mutex
	seq uint64
	p   *Primary
	cut atomic.Pointer[func()]
}

func (k *e2eKernel) ForgetChunks([]capture.CaptureChunkKey) error {
	if f := k.cut.Load(); f != nil {
		(*f)()
	}
	return nil
}
func (k *e2eKernel) ForgetAttr(capture.InodeKey) {}
func (k *e2eKernel) Drain() error                { return nil }
func (k *e2eKernel) Seq() uint64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.seq
}

// TestDivergenceE2E runs random histories (TestDivergenceModel's changes)
// against a Primary and a replica Server over a real connection, cut at
// random points (a pass's start, a resync's steps, any moment), with
// resyncs asked for and records lost. At random points it makes a
// durability call and, once it returns, compares the trees; at the end,
// once settled, it compares them fully. DUET_E2E_RUNS (default 2),
// DUET_E2E_SEED.
func TestDivergenceE2E(t *testing.T) {
	seededRuns(t, "DUET_E2E", 2, 1, 10*time.Second, runE2E)
}

func runE2E(t *testing.T, seed uint64) {
	noAtime = true
	defer func() { noAtime = false }()
	top := t.TempDir()
	src := filepath.Join(top, "src")
	m := &dmodel{history: &history{t: t, rng: rand.New(rand.NewPCG(seed, 7)), seq: 1000, src: src},
		r: rand.New(rand.NewPCG(seed^0x77, seed))}
	for i := range 4 + m.r.IntN(5) {
		writeRandom(t, filepath.Join(src, fmt.Sprintf("d%d/f%d", m.r.IntN(3), i)), 100+m.r.IntN(9000))
		writeRandom(t, filepath.Join(src, fmt.Sprintf("d%d/s%d/g%d", m.r.IntN(3), m.r.IntN(2), i)), 100)
	}
	var logw io.Writer = io.Discard
	if os.Getenv("DUET_E2E_LOG") != "" {
		logw = os.Stderr
	}
	log := slog.New(slog.NewTextHandler(logw, &slog.HandlerOptions{Level: slog.LevelDebug}))
	r := &restartPair{tb: t, src: src, top: filepath.Join(top, "peer"), margin: 50 * time.Millisecond, log: log}
	r.startReplica()
	state := filepath.Join(top, "state")
	os.MkdirAll(state, 0o755)
	ms, err := OpenMeta(state, "data")
	if err != nil {
		t.Fatal(err)
	}
	p, err := NewPrimary(Dir{Name: "data", Path: src}, r.addr, testLink, 0, log)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.BeginTerm(Term{Meta: ms, DirtyPath: filepath.Join(state, "bitmap-data"), Margin: r.margin}); err != nil {
		t.Fatal(err)
	}
	k := &e2eKernel{p: p}
	// The cuts' own generator: m.r is the main loop's (sharing it raced
	// with m.op, found by the race pass of make test).
	cutRng := rand.New(rand.NewPCG(seed, 11))
	var rmu sync.Mutex
	intn := func(n int) int { rmu.Lock(); defer rmu.Unlock(); return cutRng.IntN(n) }
	var chaos atomic.Bool
	var cuts atomic.Int64
	drop := func(where string) {
		if chaos.Load() && intn(4) == 0 {
			cuts.Add(1)
			p.Drop("test: cut at " + where)
		}
	}
	cut := func() { drop("pass") }
	k.cut.Store(&cut)
	p.resyncStep = func(step string) { drop(step) }
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); p.Run(ctx, k) }()
	defer func() { cancel(); wg.Wait(); r.stopServer() }()
	// Cuts at any moment too.
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(seed, 99))
		for ctx.Err() == nil {
			time.Sleep(time.Duration(1+rng.IntN(40)) * time.Millisecond)
			if chaos.Load() && rng.IntN(3) == 0 {
				cuts.Add(1)
				p.Drop("test: cut at a random moment")
			}
		}
	}()
	waitFor(t, "the first sync", p.Streaming)
	peer := filepath.Join(top, "peer", "data")
	fail := func(format string, args ...any) {
		t.Helper()
		var lines []string
		for _, l := range m.log {
			if !strings.HasPrefix(l, "    ") {
				lines = append(lines, l)
			}
		}
		msg := fmt.Sprintf("seed %d: %s\nhistory:\n  %s", seed, fmt.Sprintf(format, args...), strings.Join(lines, "\n  "))
		t.Fatal(strings.ReplaceAll(msg, strings.Repeat("L", 255), "<L*255>"))
	}
	forward := func() {
		for _, rec := range m.emitted {
			k.mu.Lock()
			k.seq++
			rec.Seq = k.seq
			k.mu.Unlock()
			if intn(40) == 0 {
				p.Rescan(capture.InodeKey{Dev: rec.Dev, Ino: rec.Ino})
				m.log = append(m.log, fmt.Sprintf("  (record of %d lost: rescan)", rec.Ino))
				continue
			}
			p.Record(&rec, time.Now())
		}
		m.emitted = m.emitted[:0]
	}
	settled := func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.streamingLocked() && p.j.Pending() == 0 && !p.building && p.out.settled() && len(p.asides) == 0
	}
	barrier := func(asides bool) {
		t.Helper()
		chaos.Store(false)
		wctx, wcancel := context.WithTimeout(ctx, 20*time.Second)
		defer wcancel()
		if err := p.WaitShipped(wctx, k, Release{}); err != nil {
			fail("durability call: %v", err)
		}
		if d := treeDiff(src, peer, asides); len(d) != 0 {
			fail("after a durability call returned: %v", d)
		}
	}
	ops := 30 + m.r.IntN(40)
	chaos.Store(true)
	for i := range ops {
		m.op()
		forward()
		switch intn(30) {
		case 0:
			p.Resync(false)
			m.log = append(m.log, "  (resync asked)")
		case 1:
			p.Resync(true)
			m.log = append(m.log, "  (full resync asked)")
		case 2, 3, 4:
			m.log = append(m.log, "  (durability call)")
			barrier(true)
			chaos.Store(true)
		}
		if i%3 == 0 {
			time.Sleep(time.Duration(intn(8)) * time.Millisecond)
		}
	}
	chaos.Store(false)
	m.log = append(m.log, "  (settle)")
	barrier(true)
	for deadline := time.Now().Add(15 * time.Second); !settled(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			fail("not settled")
		}
	}
	if d := treeDiff(src, peer, false); len(d) != 0 {
		fail("settled, in sync %v: %v", p.Streaming(), d)
	}
	st := p.Status()
	t.Logf("%d ops, %d cuts, %d full syncs, last resync mode %q, lost sessions %d", ops, cuts.Load(), st.FullSyncs, st.Resync.Mode, p.lostSessions)
}
