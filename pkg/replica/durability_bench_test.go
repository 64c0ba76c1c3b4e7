package replica

import (
	"context"
	"io"
	"log/slog"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/latency"
)

// BenchmarkDurabilityCall times the daemon's side of a durability call
// without the lab: a 4 KiB write at a random offset of an 8 MiB file,
// its record handed to the primary as the capture reader does, and
// WaitShipped until the peer (a Server in this process, over the
// loopback with TLS) has applied and flushed it. No seccomp trap, no
// control socket, no local flush: what is left is the primary's
// goroutines (builder, sender, acknowledgement reader), the link and the
// secondary's apply and flush. Put TMPDIR on a tmpfs to take the disk
// out and see the hand-offs alone; on a disk the peer's flush dominates.
// Reports the context switches of the process per call (voluntary and
// involuntary, from getrusage) and the stages' medians.
//
// append: 4 KiB appends instead, each record reaching 64 KiB past the end
// of the file, so that every pass requeues bytes beyond EOF: a steady
// form of what a database's concurrent commits to its logs make a pass
// find (the capture announces a growing file's bytes up to the next
// 64 KiB boundary, and a writer's record can come before its size
// moves). The next call's pass must not wait out the batch window that a
// requeue starts (it did: 2 ms a call). A single writer in the lab does
// not meet it: the pass covering its call has run before the next call.
func BenchmarkDurabilityCall(b *testing.B) {
	b.Run("random", func(b *testing.B) { benchmarkDurabilityCall(b, false) })
	b.Run("append", func(b *testing.B) { benchmarkDurabilityCall(b, true) })
}

func benchmarkDurabilityCall(b *testing.B, appends bool) {
	top := b.TempDir()
	src := filepath.Join(top, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		b.Fatal(err)
	}
	path := filepath.Join(src, "f")
	const size = 8 << 20
	if err := os.WriteFile(path, make([]byte, size), 0o644); err != nil {
		b.Fatal(err)
	}
	discard := slog.New(slog.NewTextHandler(io.Discard, nil))
	sec := newTestSecondaryLink(b, filepath.Join(top, "peer", "state"), testLink, discard)
	secStages := &latency.Stages{}
	sec.Stages = secStages
	p, err := NewPrimary(Dir{Name: "data", Path: src}, sec.addr, testLink, 0, discard)
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	stages := &latency.Stages{}
	p.Stages = stages
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { p.Run(ctx, nil) })
	defer func() { cancel(); wg.Wait() }()
	for deadline := time.Now().Add(time.Minute); !p.Status().InSync; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			b.Fatal("the first full sync did not end within a minute")
		}
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 4096)
	rng := rand.New(rand.NewSource(1))
	var ru0, ru1 syscall.Rusage
	seq := uint64(0)
	b.ResetTimer()
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	end := int64(size)
	for range b.N {
		off := rng.Int63n(size/int64(len(buf))) * int64(len(buf))
		announced := uint64(len(buf))
		if appends {
			off, end = end, end+int64(len(buf))
			announced = 64 << 10
		}
		rng.Read(buf)
		if _, err := f.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
		seq++
		p.Record(&capture.Record{Seq: seq, Ino: st.Ino, Pos: uint64(off), Len: announced, Kind: capture.KindData}, time.Now())
		if err := p.WaitShipped(ctx, nil, Release{}); err != nil {
			b.Fatal(err)
		}
	}
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
	b.StopTimer()
	b.ReportMetric(float64(ru1.Nvcsw-ru0.Nvcsw)/float64(b.N), "vcsw/op")
	b.ReportMetric(float64(ru1.Nivcsw-ru0.Nivcsw)/float64(b.N), "ivcsw/op")
	for _, s := range append(stages.Snapshot(), secStages.Snapshot()...) {
		b.ReportMetric(float64(s.Counts.Quantile(0.5).Microseconds()), s.Stage+"-p50-µs")
	}
}
