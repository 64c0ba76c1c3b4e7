package node

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
)

// TestDrainShortOfTargetIsNotSuccess: a barrier's Drain waits for every
// record reserved before the call to be dispatched to the primaries; then
// WaitShipped takes p.added as the call's target. When the reader does not
// get there (it died, or it is starved), Drain gave up after drainTimeout
// and returned nil: the caller's record was then not in the target, the
// last pass covered the target, and the durability call was answered
// "ok" with its change in no batch. Drain must fail instead (the call
// gets EIO), as it does once reading stopped.
func TestDrainShortOfTargetIsNotSuccess(t *testing.T) {
	mount, c := captureOnLoop(t)
	n := &Node{log: slog.New(slog.NewTextHandler(os.Stderr, nil)), cap: c}
	n.drained = sync.NewCond(&n.drainMu)
	// The caller's write: a record reserved, never dispatched (no reader
	// runs, as after dispatch returned on a read error).
	if err := os.WriteFile(filepath.Join(mount, "committed"), []byte("record 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	reserved, err := c.Reserved()
	if err != nil || reserved == 0 {
		t.Fatalf("no record reserved (%d, %v)", reserved, err)
	}
	start := time.Now()
	err = kernel{n}.Drain()
	t.Logf("Drain returned after %v: %v (dispatched up to %d of %d ring bytes)", time.Since(start).Round(time.Millisecond), err, n.dispatchedEnd.Load(), reserved)
	if err == nil && n.dispatchedEnd.Load() < reserved {
		t.Fatalf("Drain returned nil with records reserved before the call never dispatched (up to %d of %d): "+
			"WaitShipped's target leaves the caller's write out and the call is answered ok", n.dispatchedEnd.Load(), reserved)
	}
}

// TestDrainCoversEveryRecordReservedBefore: writers on every CPU each
// write a new range of their own file and then Drain, as a durability
// call does; the range's record must have been dispatched when Drain
// returns. Drain waited for as many records as the kernel's sequence
// counted, and a record is numbered after its reservation: a record
// reserved by another CPU before the caller's and numbered after it could
// leave the caller's unread (a review counted 24 such inversions in
// 400,000 records). That needs the other program stalled between its
// reservation and its number past the caller's whole call, which this
// test does not force: it checks the contract under concurrency; the
// position (capture.Reserved) makes it hold by construction.
func TestDrainCoversEveryRecordReservedBefore(t *testing.T) {
	mount, c := captureOnLoop(t)
	if err := c.SetEagerWake(true); err != nil {
		t.Fatal(err)
	}
	n := &Node{log: slog.New(slog.NewTextHandler(os.Stderr, nil)), cap: c}
	n.drained = sync.NewCond(&n.drainMu)
	type key struct{ ino, pos uint64 }
	var mu sync.Mutex
	seen := map[key]bool{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		var r capture.Record
		for c.Read(&r) == nil {
			mu.Lock()
			for off := r.Pos &^ 4095; off < r.Pos+r.Len; off += 4096 {
				seen[key{r.Ino, off}] = true
			}
			mu.Unlock()
			n.dispatched.Add(1)
			n.dispatchedEnd.Store(r.End)
			n.wakeDrains()
		}
	}()
	const writes = 2000
	var wg sync.WaitGroup
	for w := 0; w < 2*runtime.NumCPU(); w++ {
		f, err := os.Create(filepath.Join(mount, fmt.Sprint("f", w)))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		var st syscall.Stat_t
		if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 4096)
			for i := 0; i < writes; i++ {
				// Each write a new 64 KiB chunk: a record of its own.
				off := int64(i) << 16
				if _, err := f.WriteAt(buf, off); err != nil {
					t.Error(err)
					return
				}
				if err := (kernel{n}).Drain(); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				ok := seen[key{st.Ino, uint64(off)}]
				mu.Unlock()
				if !ok {
					t.Errorf("file %d, write %d at %d: Drain returned before its record was dispatched", st.Ino, i, off)
					return
				}
			}
		}()
	}
	wg.Wait()
	c.StopReading()
	<-done
}
